//! TLS loading for gRPC: mutual TLS everywhere (DESIGN.md §3).
//!
//! Servers require a client certificate from the deployment's CA, so a peer
//! without one is refused at the handshake. Handlers then authorise by the
//! identity in the peer certificate (`require_role`).
//!
//! Clients check the server the same way: its certificate must chain to the
//! CA, be valid for the name dialled, and carry the role the connection is
//! for (a PS certificate cannot serve as an MT or as the CS; agent and admin
//! certificates cannot serve at all), so a wrong address in a config fails at
//! the handshake with a message that says so. tonic's own client TLS checks
//! only the chain and the name, hence the connector here ([`server_role`]).

/// The handshake-signature checks of a certificate verifier that adds
/// its own checks on top of WebPKI's: they are WebPKI's (`self.inner`).
macro_rules! webpki_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
}
pub(crate) use webpki_signature_checks;

pub mod renewal;
pub mod renewed;
pub mod revocation;
mod server;
mod server_identity;
mod server_revocation;
mod server_role;

pub use revocation::Revocations;
pub use server::{Acceptor, ClientAuth, Conn, Incoming, HANDSHAKE_TIMEOUT};
pub use server_role::WrongServerRole;

use crate::pki::{peer_identity, CertKeyPem, PeerIdentity, Role};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// The largest HTTP/2 DATA frame a peer may send us (SETTINGS_MAX_FRAME_SIZE).
/// HTTP/2's default, 16 KiB, cuts every 2 MiB replication message into 128
/// frames, each with its own header, flow-control step and wakeup on both
/// ends, so larger frames make the whole path cheaper per byte. 256 KiB is
/// where that gain ends: 1 MiB frames cost no less CPU but add about 45 MiB
/// to the PS's peak RSS. Servers that receive frames (PS, MT) and every
/// client endpoint advertise it.
pub const HTTP2_MAX_FRAME: u32 = 256 << 10;
/// HTTP/2 receive windows: hyper's default 1 MiB per stream lets at most
/// 1 MiB of a 1-2 MiB frame cross before a window-update round trip; these
/// keep several frames in flight on a replication stream.
pub const HTTP2_STREAM_WINDOW: u32 = 16 << 20;
pub const HTTP2_CONNECTION_WINDOW: u32 = 32 << 20;
/// HTTP/2 keepalive: a dead peer is noticed within 30 s.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the TCP connect and TLS handshake to a server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A gRPC server builder for a component that receives replication frames
/// (PS, MT): the same windows, frame size and keepalive as every client
/// endpoint ([`TlsFiles::connect`]), so both directions of a stream are
/// tuned alike. The caller adds its services and serves the connections of
/// an [`Acceptor`] (no `tls_config`: they are TLS already).
pub fn frame_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(HTTP2_STREAM_WINDOW))
        .initial_connection_window_size(Some(HTTP2_CONNECTION_WINDOW))
        .max_frame_size(Some(HTTP2_MAX_FRAME))
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source} (set [tls] in the config, or enroll the component with the CS)")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no usable PEM: {reason} (enroll the component again, or point [tls] at the right file)")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("certificate {cert} and key {key} do not make a TLS identity: {source} (enroll the component again)")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("invalid address {addr:?}: {message}")]
    Address { addr: String, message: String },
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error(transparent)]
    WrongServerRole(WrongServerRole),
}

/// The `[tls]` section of every component's config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    /// The deployment's CA certificate (PEM).
    pub ca: PathBuf,
    /// This component's certificate (PEM).
    pub cert: PathBuf,
    /// This component's private key (PEM).
    pub key: PathBuf,
    /// The renewed identity (`tls::renewed`), used instead of `cert` and
    /// `key` once it exists, by the server and by every new connection.
    /// Not configured: the daemon sets it from its state directory.
    #[serde(skip)]
    pub renewed: Option<PathBuf>,
}

fn pem(what: &'static str, path: &Path, reason: String) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_path_buf(),
        reason,
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The host part of `host:port` (`[v6]:port` gives the bare v6 address);
/// the whole text when it has no port.
pub fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The TLS name to check a server by: `server_name` when set, else the host
/// dialled (a certificate enrolled with `--name` for that host matches).
pub fn server_name_for<'a>(server_name: &'a str, addr: &'a str) -> &'a str {
    if server_name.trim().is_empty() {
        host_of(addr)
    } else {
        server_name.trim()
    }
}

impl TlsFiles {
    /// Where the install layout keeps `component`'s files:
    /// `/etc/rebound/tls/{ca.pem,<component>.pem,<component>.key}`, as
    /// `enroll` writes them by default.
    pub fn installed(component: &str) -> TlsFiles {
        TlsFiles::in_dir(Path::new(crate::cli_args::TLS_DIR), component)
    }

    /// Files named `<name>.pem`/`<name>.key` and `ca.pem` in one directory.
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            renewed: None,
        }
    }

    /// The same files, with the renewed identity of the component whose
    /// state directory is `state_dir` preferred once it exists.
    pub fn with_renewed(mut self, state_dir: &Path) -> TlsFiles {
        self.renewed = Some(renewed::path_in(state_dir));
        self
    }

    /// The CA certificates from `ca`.
    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let ca = read("CA certificate", &self.ca)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca) {
            let cert = cert.map_err(|e| pem("CA certificate", &self.ca, e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| pem("CA certificate", &self.ca, e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(pem("CA certificate", &self.ca, "no certificate".into()));
        }
        Ok(roots)
    }

    /// The renewed identity when it is the one to use: it exists and the
    /// enrolled certificate is not newer (a component enrolled again after
    /// its last renewal uses its new enrollment).
    pub fn renewed_in_use(&self) -> Result<Option<CertKeyPem>, TlsError> {
        let Some(path) = &self.renewed else {
            return Ok(None);
        };
        let renewed = renewed::load(path).map_err(|source| TlsError::Read {
            what: "renewed identity",
            path: path.clone(),
            source,
        })?;
        let Some(ck) = renewed else {
            return Ok(None);
        };
        let enrolled = std::fs::read(&self.cert).ok();
        let newer_enrollment = match (
            enrolled.as_deref().and_then(not_before),
            not_before(ck.cert_pem.as_bytes()),
        ) {
            (Some(enrolled), Some(renewed)) => enrolled > renewed,
            _ => false,
        };
        Ok(if newer_enrollment { None } else { Some(ck) })
    }

    /// Our certificate chain and key (see [`TlsFiles::renewed_in_use`]).
    fn chain_and_key(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let (cert_path, key_path) = self.identity_paths();
        let (cert, key) = match self.renewed_in_use()? {
            Some(ck) => (ck.cert_pem.into_bytes(), ck.key_pem.into_bytes()),
            None => (
                read("certificate", &self.cert)?,
                read("private key", &self.key)?,
            ),
        };
        let chain = CertificateDer::pem_slice_iter(&cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem("certificate", &cert_path, e.to_string()))?;
        if chain.is_empty() {
            return Err(pem("certificate", &cert_path, "no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&key)
            .map_err(|e| pem("private key", &key_path, e.to_string()))?;
        Ok((chain, key))
    }

    /// Our identity for a TLS server, its key checked against the
    /// certificate.
    fn certified_key(
        &self,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<rustls::sign::CertifiedKey, TlsError> {
        let (chain, key) = self.chain_and_key()?;
        rustls::sign::CertifiedKey::from_der(chain, key, provider).map_err(|source| {
            let (cert, key) = self.identity_paths();
            TlsError::Identity { cert, key, source }
        })
    }

    /// The files our identity is read from, for messages.
    fn identity_paths(&self) -> (PathBuf, PathBuf) {
        match (&self.renewed, self.renewed_in_use()) {
            (Some(p), Ok(Some(_))) => (p.clone(), p.clone()),
            _ => (self.cert.clone(), self.key.clone()),
        }
    }

    /// Client side: trust only the CA, check the server's name and role,
    /// present our identity (the renewed one once there is one); ALPN h2.
    pub fn client_config(
        &self,
        addr: &str,
        expected: Role,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let roots = self.roots()?;
        let (chain, key) = self.chain_and_key()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = server_role::RoleVerifier::new(roots, provider.clone(), addr, expected)
            .map_err(|e| pem("CA certificate", &self.ca, e.to_string()))?;
        let identity = |source| {
            let (cert, key) = self.identity_paths();
            TlsError::Identity { cert, key, source }
        };
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(identity)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain, key)
            .map_err(identity)?;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(tls)
    }

    /// Connects to the `expected` server at `addr` (`host:port`) with mutual
    /// TLS, checked by `server_name` (empty: the host of `addr`).
    pub async fn connect(
        &self,
        addr: &str,
        server_name: &str,
        expected: Role,
    ) -> Result<Channel, TlsError> {
        let (endpoint, connector) = self.endpoint(addr, server_name, expected)?;
        endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| match server_role::RoleVerifier::find(&e) {
                Some(w) => TlsError::WrongServerRole(w.clone()),
                None => TlsError::Connect {
                    addr: addr.to_string(),
                    message: error_chain(&e),
                },
            })
    }

    /// The tuned endpoint for `addr` and the connector that does TCP and
    /// the checked TLS handshake for it.
    fn endpoint(
        &self,
        addr: &str,
        server_name: &str,
        expected: Role,
    ) -> Result<(Endpoint, server_role::Connector), TlsError> {
        let bad = |message: String| TlsError::Address {
            addr: addr.to_string(),
            message,
        };
        let name = server_name_for(server_name, addr);
        let sni = ServerName::try_from(name.to_string())
            .map_err(|e| bad(format!("server name {name:?}: {e}")))?;
        let connector =
            server_role::Connector::new(addr.to_string(), sni, self.client_config(addr, expected)?);
        // http: TLS is done by the connector, not by tonic.
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
            .initial_stream_window_size(Some(HTTP2_STREAM_WINDOW))
            .initial_connection_window_size(Some(HTTP2_CONNECTION_WINDOW))
            .max_frame_size(Some(HTTP2_MAX_FRAME));
        Ok((endpoint, connector))
    }
}

/// The notBefore of the first certificate in a PEM text, in seconds.
fn not_before(pem: &[u8]) -> Option<i64> {
    let der = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.validity().not_before.timestamp())
}

/// Joins an error and its sources, so "transport error" shows its cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        // An io::Error made from a TLS error shows that error's text, and
        // then has it as its source too: say it once.
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// Installs rustls' ring provider as the process default. Call once in main.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The caller's identity from its TLS certificate.
pub fn peer<T>(req: &Request<T>) -> Result<PeerIdentity, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
    let first = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
    peer_identity(first.as_ref()).map_err(|e| Status::unauthenticated(e.to_string()))
}

/// The caller's identity, refused unless its role is one of `roles`.
pub fn require_role<T>(req: &Request<T>, roles: &[Role]) -> Result<PeerIdentity, Status> {
    let who = peer(req)?;
    if roles.contains(&who.role) {
        Ok(who)
    } else {
        let allowed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        Err(Status::permission_denied(format!(
            "certificate {who} may not call this: only {} certificates may",
            allowed.join("/")
        )))
    }
}

/// Test servers other modules' tests reuse.
#[cfg(test)]
pub(crate) mod tests;
