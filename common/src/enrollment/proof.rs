//! The passphrase proofs of enrollment, both directions.
//!
//! The passphrase and salt give a key ([`passphrase_key`]); from it the
//! client derives an Ed25519 signing key and signs the request transcript
//! ([`client_proof`]). The CS keeps only a [`PassphraseVerifier`]: the
//! Ed25519 public key, which checks a proof but cannot make one, so a copy
//! of the CS database enrolls nothing. The CS proves the passphrase back
//! with a MAC key derived from the same key ([`server_proof`]); that one the
//! CS must hold, so a copy of the database could pose as the CS to a *new*
//! agent enrolling with the passphrase (hand it a false CA), never enroll.
//! Token enrollment does not rest on it: the token pins the CA.

use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};

/// The key derivation named in `EnrollParamsResponse.kdf`.
pub const KDF: &str = "blake3-ed25519-v2";

/// The passphrase key: `blake3::derive_key(context, salt || passphrase)`.
///
/// Why a fast hash is enough here: the passphrase is machine-generated at
/// `init` with 128 bits of entropy, so guessing it from a stolen database is
/// infeasible however cheap one guess is; a slow, memory-hard KDF (argon2)
/// only helps for human-chosen passwords. The salt makes the derived keys
/// differ between deployments even for an equal passphrase. Surrounding
/// whitespace (a trailing newline in the passphrase file) is ignored.
pub fn passphrase_key(salt: &[u8], passphrase: &str) -> [u8; 32] {
    let mut m = Vec::with_capacity(salt.len() + passphrase.len() + 8);
    m.extend_from_slice(&(salt.len() as u64).to_le_bytes());
    m.extend_from_slice(salt);
    m.extend_from_slice(passphrase.trim().as_bytes());
    blake3::derive_key("rebound enrollment passphrase v1", &m)
}

/// What the CS stores for the passphrase: it checks a client's proof and
/// makes the CS's own, and does not make a client's proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassphraseVerifier {
    /// Ed25519 public key of the client signing key.
    pub public_key: [u8; 32],
    /// The MAC key of the CS's proof.
    pub server_key: [u8; 32],
}

impl PassphraseVerifier {
    /// From the passphrase key (what `init` and a CS upgrading a database
    /// that stored the key itself call).
    pub fn from_key(key: &[u8; 32]) -> PassphraseVerifier {
        PassphraseVerifier {
            public_key: public_key_bytes(&signing_key(key)),
            server_key: server_key(key),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        [self.public_key, self.server_key].concat()
    }

    pub fn from_bytes(b: &[u8]) -> Option<PassphraseVerifier> {
        if b.len() != 64 {
            return None;
        }
        let (p, s) = b.split_at(32);
        Some(PassphraseVerifier {
            public_key: p.try_into().ok()?,
            server_key: s.try_into().ok()?,
        })
    }

    /// Whether `proof` is the signature of the passphrase's holder over
    /// this request (see [`client_proof`]).
    pub fn check_client_proof(&self, proof: &[u8], request: &ProofRequest<'_>) -> bool {
        let t = request.transcript();
        UnparsedPublicKey::new(&ED25519, &self.public_key)
            .verify(&t, proof)
            .is_ok()
    }
}

fn signing_key(key: &[u8; 32]) -> Ed25519KeyPair {
    let seed = blake3::derive_key("rebound enrollment client signing key v2", key);
    // A 32-byte seed is always a valid Ed25519 private key.
    Ed25519KeyPair::from_seed_unchecked(&seed).unwrap_or_else(|_| unreachable!())
}

fn public_key_bytes(k: &Ed25519KeyPair) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(k.public_key().as_ref());
    out
}

/// The MAC key of the CS's proof, from the passphrase key.
pub fn server_key(key: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key("rebound enrollment server proof key v2", key)
}

/// Hashes length-prefixed fields, so no two field lists hash alike.
fn transcript(label: &str, fields: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(label.as_bytes());
    for f in fields {
        h.update(&(f.len() as u64).to_le_bytes());
        h.update(f);
    }
    *h.finalize().as_bytes()
}

/// What a passphrase proof covers: the request and the fingerprint (blake3
/// of the DER) of the server certificate the client saw, so a proof cannot
/// be relayed through a man in the middle.
#[derive(Debug, Clone, Copy)]
pub struct ProofRequest<'a> {
    pub role: &'a str,
    pub id: &'a str,
    pub csr_pem: &'a str,
    pub client_nonce: &'a [u8],
    pub server_cert_fp: &'a [u8; 32],
}

impl ProofRequest<'_> {
    fn transcript(&self) -> [u8; 32] {
        transcript(
            "rebound enroll client v2",
            &[
                self.role.as_bytes(),
                self.id.as_bytes(),
                self.csr_pem.as_bytes(),
                self.client_nonce,
                self.server_cert_fp,
            ],
        )
    }
}

/// The client's proof of the passphrase: an Ed25519 signature (64 bytes)
/// over the request transcript.
pub fn client_proof(key: &[u8; 32], request: &ProofRequest<'_>) -> Vec<u8> {
    signing_key(key)
        .sign(&request.transcript())
        .as_ref()
        .to_vec()
}

/// The CS's proof of the passphrase, bound to the client's proof (so it is
/// fresh: the client nonce is inside) and to what the CS hands out.
pub fn server_proof(
    server_key: &[u8; 32],
    client_proof: &[u8],
    cert_pem: &str,
    ca_pem: &str,
    server_cert_fp: &[u8; 32],
) -> [u8; 32] {
    let t = transcript(
        "rebound enroll server v2",
        &[
            client_proof,
            cert_pem.as_bytes(),
            ca_pem.as_bytes(),
            server_cert_fp,
        ],
    );
    *blake3::keyed_hash(server_key, &t).as_bytes()
}

/// Constant-time comparison of two proofs.
pub fn proofs_equal(a: &[u8], b: &[u8; 32]) -> bool {
    match <[u8; 32]>::try_from(a) {
        Ok(a) => blake3::Hash::from(a) == blake3::Hash::from(*b),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verifier_checks_proofs_it_cannot_make() {
        let k = passphrase_key(b"salt", "pass\n");
        assert_eq!(k, passphrase_key(b"salt", "pass"));
        assert_ne!(k, passphrase_key(b"salt2", "pass"));
        let v = PassphraseVerifier::from_key(&k);
        assert_eq!(
            PassphraseVerifier::from_bytes(&v.to_bytes()),
            Some(v.clone())
        );
        assert!(
            !v.to_bytes().windows(32).any(|w| w == k),
            "the key is not stored"
        );
        let fp = [1u8; 32];
        let req = ProofRequest {
            role: "agent",
            id: "m1",
            csr_pem: "csr",
            client_nonce: b"n",
            server_cert_fp: &fp,
        };
        let p = client_proof(&k, &req);
        assert_eq!(p.len(), 64);
        assert!(v.check_client_proof(&p, &req));
        let other_fp = [2u8; 32];
        for changed in [
            ProofRequest { id: "m2", ..req },
            ProofRequest { role: "ps", ..req },
            ProofRequest {
                server_cert_fp: &other_fp,
                ..req
            },
        ] {
            assert!(!v.check_client_proof(&p, &changed), "{changed:?}");
        }
        let wrong = PassphraseVerifier::from_key(&passphrase_key(b"salt", "other"));
        assert!(!wrong.check_client_proof(&p, &req));
        let s = server_proof(&v.server_key, &p, "cert", "ca", &fp);
        assert!(proofs_equal(
            &s,
            &server_proof(&server_key(&k), &p, "cert", "ca", &fp)
        ));
        assert!(!proofs_equal(&s[..31], &s));
    }
}
