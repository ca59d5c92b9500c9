//! The client half of the server check: WebPKI verification (chain to the
//! deployment's CA, valid for the name dialled) followed by the role in the
//! leaf's CN, and the connector that runs that handshake under tonic.
//!
//! The role check lives in the certificate verifier so that a wrong server
//! fails the handshake itself, before any request is sent to it.

use crate::pki::{peer_identity, PeerIdentity, Role};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::{VerifierBuilderError, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, OtherError, RootCertStore};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A server presented a valid certificate of the wrong role: the address in
/// the config points at another component.
#[derive(Debug, Clone, Error)]
#[error("the server at {addr} presented certificate {presented}, but a {expected} certificate is required here: check the address in the config")]
pub struct WrongServerRole {
    pub addr: String,
    pub presented: PeerIdentity,
    pub expected: Role,
}

/// WebPKI's server verification, then the role.
#[derive(Debug)]
pub(super) struct RoleVerifier {
    inner: Arc<WebPkiServerVerifier>,
    addr: String,
    expected: Role,
}

impl RoleVerifier {
    pub(super) fn new(
        roots: RootCertStore,
        provider: Arc<CryptoProvider>,
        addr: &str,
        expected: Role,
    ) -> Result<RoleVerifier, VerifierBuilderError> {
        Ok(RoleVerifier {
            inner: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()?,
            addr: addr.to_string(),
            expected,
        })
    }

    fn wrong_role(&self, presented: PeerIdentity) -> rustls::Error {
        let e = WrongServerRole {
            addr: self.addr.clone(),
            presented,
            expected: self.expected,
        };
        rustls::Error::Other(OtherError(Arc::new(e)))
    }

    /// The first [`WrongServerRole`] in an error's chain of sources.
    pub(super) fn find<'a>(
        e: &'a (dyn std::error::Error + 'static),
    ) -> Option<&'a WrongServerRole> {
        let mut cur = Some(e);
        while let Some(e) = cur {
            if let Some(w) = e.downcast_ref::<WrongServerRole>() {
                return Some(w);
            }
            cur = e.source();
        }
        None
    }
}

fn is_purpose_error(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
        )
    )
}

impl ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let who = peer_identity(end_entity.as_ref());
        if let Err(e) = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // An agent or admin certificate has no server purpose at all:
            // say whose it is rather than which extension it lacks.
            return Err(match who {
                Ok(who) if who.role != self.expected && is_purpose_error(&e) => {
                    self.wrong_role(who)
                }
                _ => e,
            });
        }
        match who {
            Ok(who) if who.role == self.expected => Ok(ServerCertVerified::assertion()),
            Ok(who) => Err(self.wrong_role(who)),
            Err(e) => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(e)),
            ))),
        }
    }

    super::webpki_signature_checks!();
}

/// TCP to one address, then the checked TLS handshake; tonic speaks h2 over
/// the stream it returns.
#[derive(Clone)]
pub(super) struct Connector {
    addr: Arc<str>,
    sni: ServerName<'static>,
    tls: TlsConnector,
}

impl Connector {
    pub(super) fn new(
        addr: String,
        sni: ServerName<'static>,
        config: rustls::ClientConfig,
    ) -> Connector {
        Connector {
            addr: addr.into(),
            sni,
            tls: TlsConnector::from(Arc::new(config)),
        }
    }

    async fn connect(self) -> std::io::Result<TokioIo<TlsStream<TcpStream>>> {
        let handshake = async {
            let tcp = TcpStream::connect(&*self.addr).await?;
            tcp.set_nodelay(true)?;
            self.tls.connect(self.sni.clone(), tcp).await
        };
        match tokio::time::timeout(super::CONNECT_TIMEOUT, handshake).await {
            Ok(stream) => stream.map(TokioIo::new),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no TLS connection to {} within {:?}",
                    self.addr,
                    super::CONNECT_TIMEOUT
                ),
            )),
        }
    }
}

type Connecting =
    Pin<Box<dyn Future<Output = std::io::Result<TokioIo<TlsStream<TcpStream>>>> + Send>>;

impl tower::Service<tonic::transport::Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::transport::Uri) -> Self::Future {
        Box::pin(self.clone().connect())
    }
}
