//! One-time enrollment tokens as text: what `rebound token create` prints
//! and `enroll --token` takes.
//!
//! `"<token id>.<secret>.<CA hash>"`: the CA hash (blake3 of the CA
//! certificate's DER, hex) lets the client pin the deployment's CA before it
//! sends anything secret, as kubeadm's join does; the client then sends only
//! `"<token id>.<secret>"`, and the CS, which keeps
//! [`verifier`]`(secret)`, never the secret, redeems it once.

use rand::RngCore;
use thiserror::Error;

/// A token text that does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "the enrollment token is malformed ({why}): pass the whole text `rebound token create` \
     printed, <id>.<secret>.<CA hash>"
)]
pub struct MalformedToken {
    pub why: &'static str,
}

/// A token as the operator hands it to a component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenText {
    pub token_id: String,
    pub secret: String,
    /// blake3 of the CA certificate's DER, lower-case hex.
    pub ca_hash: String,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    super::hex(&b)
}

impl TokenText {
    /// A fresh token for the CA whose DER is `ca_der`: an 8-byte id and a
    /// 16-byte (128-bit) secret.
    pub fn generate(ca_der: &[u8]) -> TokenText {
        TokenText {
            token_id: random_hex(8),
            secret: random_hex(16),
            ca_hash: super::hex(blake3::hash(ca_der).as_bytes()),
        }
    }

    pub fn parse(text: &str) -> Result<TokenText, MalformedToken> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        let [id, secret, ca] = parts[..] else {
            return Err(MalformedToken {
                why: "it has not three parts separated by '.'",
            });
        };
        let (id, secret) = Presented::check(id, secret)?;
        if !is_hex(ca, 64) {
            return Err(MalformedToken {
                why: "its CA hash is not 64 hex digits",
            });
        }
        Ok(TokenText {
            token_id: id,
            secret,
            ca_hash: ca.to_ascii_lowercase(),
        })
    }

    /// What the client sends once it pinned the CA: `"<id>.<secret>"`.
    pub fn presented(&self) -> String {
        format!("{}.{}", self.token_id, self.secret)
    }

    /// Whether `ca_der` is the CA this token pins.
    pub fn pins(&self, ca_der: &[u8]) -> bool {
        super::hex(blake3::hash(ca_der).as_bytes()) == self.ca_hash
    }
}

impl std::fmt::Display for TokenText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.token_id, self.secret, self.ca_hash)
    }
}

/// `"<id>.<secret>"` as the CS receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub token_id: String,
    pub secret: String,
}

impl Presented {
    fn check(id: &str, secret: &str) -> Result<(String, String), MalformedToken> {
        if !is_hex(id, 16) {
            return Err(MalformedToken {
                why: "its id is not 16 hex digits",
            });
        }
        if !is_hex(secret, 32) {
            return Err(MalformedToken {
                why: "its secret is not 32 hex digits",
            });
        }
        Ok((id.to_ascii_lowercase(), secret.to_ascii_lowercase()))
    }

    pub fn parse(text: &str) -> Result<Presented, MalformedToken> {
        let Some((id, secret)) = text.trim().split_once('.') else {
            return Err(MalformedToken {
                why: "it is not <id>.<secret>",
            });
        };
        let (token_id, secret) = Presented::check(id, secret)?;
        Ok(Presented { token_id, secret })
    }

    /// What the CS stores for this secret.
    pub fn verifier(&self) -> [u8; 32] {
        verifier(&self.secret)
    }
}

/// The CS's record of a secret: a keyed hash that does not give it back.
pub fn verifier(secret: &str) -> [u8; 32] {
    blake3::derive_key("rebound enrollment token verifier v1", secret.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_pins_its_ca() {
        let t = TokenText::generate(b"ca der");
        let parsed = TokenText::parse(&format!(" {t}\n")).unwrap();
        assert_eq!(parsed, t);
        assert!(t.pins(b"ca der"));
        assert!(!t.pins(b"another ca"));
        let p = Presented::parse(&t.presented()).unwrap();
        assert_eq!(p.verifier(), verifier(&t.secret));
        assert!(!t.presented().contains(&t.ca_hash));
        for bad in ["", "a.b", "a.b.c", &format!("{}.{}", t.presented(), "ab")] {
            let e = TokenText::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("malformed") && e.contains("rebound token create"),
                "{e}"
            );
        }
        assert!(Presented::parse(&t.to_string()).is_err());
    }
}
