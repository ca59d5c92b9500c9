//! TLS loading for gRPC: mutual TLS everywhere (DESIGN.md §3).
//!
//! Servers require a client certificate from the deployment's CA, so a peer
//! without one is refused at the handshake. Handlers then authorise by the
//! identity in the peer certificate (`require_role`).

use crate::pki::{peer_identity, PeerIdentity, Role};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};
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

/// A gRPC server builder for a component that receives replication frames
/// (PS, MT): the same windows, frame size and keepalive as every client
/// endpoint ([`TlsFiles::endpoint`]), so both directions of a stream are
/// tuned alike. The caller adds TLS and its services.
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
    #[error("cannot read {what} {path}: {source} (set [tls] in the config, or run `rebound certs --out DIR` for a lab PKI)")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid address {addr:?}: {message}")]
    Address { addr: String, message: String },
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: String, message: String },
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
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl TlsFiles {
    /// Files named `<name>.pem`/`<name>.key` and `ca.pem` in one directory.
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }

    fn identity(&self) -> Result<Identity, TlsError> {
        Ok(Identity::from_pem(
            read("certificate", &self.cert)?,
            read("private key", &self.key)?,
        ))
    }

    /// Server side: our identity, and client certificates required from the CA.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        Ok(ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(Certificate::from_pem(read("CA certificate", &self.ca)?)))
    }

    /// Client side: trust only the CA, present our identity.
    pub fn client_config(&self, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("CA certificate", &self.ca)?))
            .identity(self.identity()?)
            .domain_name(server_name))
    }

    /// An endpoint for `addr` (`host:port`) with mutual TLS; not yet connected.
    pub fn endpoint(&self, addr: &str, server_name: &str) -> Result<Endpoint, TlsError> {
        let bad = |message: String| TlsError::Address {
            addr: addr.to_string(),
            message,
        };
        Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| bad(e.to_string()))?
            .tls_config(self.client_config(server_name)?)
            .map_err(|e| bad(e.to_string()))
            .map(|e| {
                e.connect_timeout(Duration::from_secs(5))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
                    .initial_stream_window_size(Some(HTTP2_STREAM_WINDOW))
                    .initial_connection_window_size(Some(HTTP2_CONNECTION_WINDOW))
                    .max_frame_size(Some(HTTP2_MAX_FRAME))
            })
    }

    /// Connects to `addr` with mutual TLS.
    pub async fn connect(&self, addr: &str, server_name: &str) -> Result<Channel, TlsError> {
        self.endpoint(addr, server_name)?
            .connect()
            .await
            .map_err(|e| TlsError::Connect {
                addr: addr.to_string(),
                message: error_chain(&e),
            })
    }
}

/// Joins an error and its sources, so "transport error" shows its cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
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
