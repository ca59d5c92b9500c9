//! The enrollment client's connection to the CS, made before it trusts any
//! CA: TLS that accepts whatever certificate the CS presents and remembers
//! it (the handshake signature is still checked, so the peer owns that
//! certificate's key), and the checks that later tie what was seen to a CA
//! ([`CaCheck`]).

use super::EnrollError;
use crate::tls::error_chain;
use rebound_proto::control::enrollment_client::EnrollmentClient;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The server certificate (and chain) the handshake presented.
pub(super) type Seen = Arc<Mutex<Option<(CertificateDer<'static>, Vec<CertificateDer<'static>>)>>>;

/// Accepts any server certificate, remembering it; checks the handshake
/// signature. Only for enrollment (see the module doc).
#[derive(Debug)]
struct RememberingVerifier {
    /// The crypto provider's algorithms, for the handshake signatures.
    algorithms: WebPkiSupportedAlgorithms,
    seen: Seen,
}

impl ServerCertVerifier for RememberingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| rustls::Error::General("verifier lock poisoned".into()))?;
        *seen = Some((
            end_entity.clone().into_owned(),
            intermediates
                .iter()
                .map(|c| c.clone().into_owned())
                .collect(),
        ));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The host part of `host:port` (IPv6 in brackets allowed).
pub(super) fn host_of(addr: &str) -> Result<String, EnrollError> {
    let bad = || EnrollError::Invalid(format!("--cs {addr:?} is not host:port"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok(host.to_string())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Connects to the CS's enrollment service at `addr`, presenting
/// `server_name` and remembering the certificate it answers with.
pub(super) async fn connect(
    addr: &str,
    server_name: ServerName<'static>,
) -> Result<(EnrollmentClient<tonic::transport::Channel>, Seen), EnrollError> {
    let provider = provider();
    let seen: Seen = Arc::new(Mutex::new(None));
    let verifier = Arc::new(RememberingVerifier {
        algorithms: provider.signature_verification_algorithms,
        seen: seen.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| EnrollError::Pki(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp_addr = addr.to_string();
    let connect = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let connector = connector.clone();
        let tcp_addr = tcp_addr.clone();
        let sni = server_name.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&tcp_addr).await?;
            tcp.set_nodelay(true)?;
            let stream = connector.connect(sni, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    // The scheme is http because TLS is already done by our connector.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| EnrollError::Invalid(format!("--cs {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .connect_with_connector(connect)
        .await
        .map_err(|e| EnrollError::Connect {
            addr: addr.to_string(),
            message: error_chain(&e),
        })?;
    Ok((EnrollmentClient::new(channel), seen))
}

/// Checks certificates against one CA: a server's for a name, and a
/// client's.
pub(super) struct CaCheck {
    server: Arc<WebPkiServerVerifier>,
    client: Arc<dyn ClientCertVerifier>,
}

impl CaCheck {
    pub(super) fn new(ca_der: &[u8]) -> Result<CaCheck, String> {
        let unusable = |e: String| format!("its CA certificate is unusable: {e}");
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca_der.to_vec()))
            .map_err(|e| unusable(e.to_string()))?;
        let roots = Arc::new(roots);
        let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| unusable(e.to_string()))?;
        let client = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| unusable(e.to_string()))?;
        Ok(CaCheck { server, client })
    }

    /// Whether `cert` (with `intermediates`) is signed by the CA and serves
    /// TLS for `name`.
    pub(super) fn server(
        &self,
        cert: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
    ) -> Result<(), rustls::Error> {
        self.server
            .verify_server_cert(cert, intermediates, name, &[], UnixTime::now())
            .map(|_| ())
    }

    /// Whether `cert_der` is a client certificate the CA signed.
    pub(super) fn client(&self, cert_der: &[u8]) -> Result<(), rustls::Error> {
        self.client
            .verify_client_cert(
                &CertificateDer::from(cert_der.to_vec()),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
    }
}
