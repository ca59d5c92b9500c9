//! The store's trust records (DESIGN.md §3): the certificates the CS issued
//! and the one-time enrollment tokens. Kept apart from the fleet's rows
//! because revocation, renewal and enrollment read them and nothing else
//! does.

use rebound_common::pki::Role;

/// One certificate the CS issued (at enrollment, renewal or `init`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// `pki::serial_hex` of the issued DER.
    pub serial: String,
    pub role: Role,
    pub id: String,
    pub issued_ms: u64,
    /// The certificate's notAfter (ms since the epoch).
    pub expiry_ms: u64,
    /// When an operator revoked it; `None` while it is good.
    pub revoked_ms: Option<u64>,
}

impl IssuedCert {
    /// Whether it still grants its identity at `now_ms`: not revoked and
    /// not expired.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.revoked_ms.is_none() && self.expiry_ms > now_ms
    }
}

/// A one-time enrollment token for exactly one role and id. The store keeps
/// only `verifier` (blake3 of the secret), so a copy of the database does
/// not enroll anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub token_id: String,
    pub role: Role,
    pub id: String,
    pub verifier: Vec<u8>,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// When it was redeemed; a token is good once.
    pub used_ms: Option<u64>,
}

#[cfg(test)]
impl Token {
    /// An unused, never-expiring agent token for m1: the fixture tests start
    /// from.
    pub(crate) fn test_for(token_id: &str) -> Token {
        Token {
            token_id: token_id.into(),
            role: Role::Agent,
            id: "m1".into(),
            verifier: vec![9],
            created_ms: 1,
            expires_ms: u64::MAX,
            used_ms: None,
        }
    }
}
