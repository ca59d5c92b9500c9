//! Enrollment as both sides decode it (common/src/enrollment, the
//! `Enrollment` service of proto/control.proto): the four messages, the
//! token texts an operator pastes and the CS receives, the stored
//! passphrase verifier and the client's proof, and the PEM texts and ids
//! the messages carry.

use std::sync::OnceLock;

use rebound_common::enrollment::{
    check_id, first_cert_der, passphrase_key, PassphraseVerifier, Presented, ProofRequest,
    TokenText,
};
use rebound_common::pki::{peer_identity, Role};
use rebound_proto::control::{EnrollParamsResponse, EnrollRequest, EnrollResponse};

use crate::control::round_trips;

pub fn enrollment(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    token_texts(&text);
    if let Some(v) = PassphraseVerifier::from_bytes(data) {
        assert_eq!(v.to_bytes(), data, "the verifier does not round trip");
    }
    check_text(&text);

    if let Some(req) = round_trips::<EnrollRequest>(data) {
        // What the CS checks of a request, in its order.
        let _ = Role::parse(&req.role);
        let _ = check_id(&req.id);
        token_texts(&req.token);
        check_text(&req.csr_pem);
        let verifier = verifier();
        let fp = [7u8; 32];
        let request = ProofRequest {
            role: &req.role,
            id: &req.id,
            csr_pem: &req.csr_pem,
            client_nonce: &req.client_nonce,
            server_cert_fp: &fp,
        };
        assert!(
            !verifier.check_client_proof(&req.proof, &request),
            "a proof made without the passphrase was accepted"
        );
    }
    if let Some(resp) = round_trips::<EnrollResponse>(data) {
        check_text(&resp.cert_pem);
        check_text(&resp.ca_pem);
    }
    if let Some(params) = round_trips::<EnrollParamsResponse>(data) {
        check_text(&params.ca_pem);
        let _ = params.salt.len() + params.kdf.len();
    }
}

/// The CS's verifier of a passphrase the fuzzer does not know.
fn verifier() -> &'static PassphraseVerifier {
    static VERIFIER: OnceLock<PassphraseVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| PassphraseVerifier::from_key(&passphrase_key(b"salt", "passphrase")))
}

/// The token parsers: what parses prints back to the same token, and the
/// part a client presents parses at the CS.
fn token_texts(text: &str) {
    if let Ok(t) = TokenText::parse(text) {
        assert_eq!(TokenText::parse(&t.to_string()).ok(), Some(t.clone()));
        let p = Presented::parse(&t.presented()).expect("a token's presented part parses");
        assert_eq!(
            (p.token_id, p.secret),
            (t.token_id.clone(), t.secret.clone())
        );
        assert_eq!(t.ca_hash.len(), 64);
    }
    if let Ok(p) = Presented::parse(text) {
        let again = Presented::parse(&format!("{}.{}", p.token_id, p.secret));
        assert_eq!(again.ok(), Some(p.clone()));
        assert_eq!(
            p.verifier(),
            rebound_common::enrollment::token_verifier(&p.secret)
        );
    }
}

/// A PEM text (CSR, certificate, CA) and ids as a component or the CS
/// reads them from a message; a certificate that parses names someone or
/// is refused, never panics.
fn check_text(text: &str) {
    let _ = check_id(text);
    if let Ok(der) = first_cert_der(text) {
        let _ = peer_identity(&der);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_message_of_each_kind_round_trips() {
        let req = EnrollRequest {
            role: "agent".into(),
            id: "m1".into(),
            token: "0123456789abcdef.0123456789abcdef0123456789abcdef".into(),
            ..Default::default()
        };
        enrollment(&req.encode_to_vec());
    }
}
