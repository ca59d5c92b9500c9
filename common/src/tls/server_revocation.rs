//! The server's check of a client certificate: WebPKI (chain to the
//! deployment's CA, in its validity period, client purpose), then the
//! revocation list.
//!
//! A revoked certificate is refused in the handshake itself, with TLS's
//! `certificate_revoked` alert, so the client's link error says its own
//! certificate is revoked (`link-cert-revoked`) rather than that a request
//! failed.

use super::Revocations;
use crate::pki::{peer_identity, serial_hex};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName};
use std::sync::Arc;
use tracing::warn;

#[derive(Debug)]
pub(super) struct RevocationCheck {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) revocations: Revocations,
}

impl ClientCertVerifier for RevocationCheck {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let serial = serial_hex(end_entity.as_ref()).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        if self.revocations.is_revoked(&serial) {
            let who = peer_identity(end_entity.as_ref())
                .map(|p| p.to_string())
                .unwrap_or_else(|_| "(no identity)".into());
            warn!(
                certificate = %who,
                serial = %serial,
                "refused certificate {who} (serial {serial}) at the TLS handshake: it is revoked; \
                 the component must be enrolled again with a token (rebound token create)"
            );
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    super::webpki_signature_checks!();
}
