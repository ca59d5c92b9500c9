//! TLS for NBD (proto.md "TLS support"): the master target's views show
//! every protected machine's disks at every point, so they are served only
//! over TLS, to a client certificate from the deployment's CA, and each
//! client sees only what its certificate may see.
//!
//! The server side upgrades a connection after NBD_OPT_STARTTLS with
//! rustls; clients are libnbd's and qemu's (GnuTLS, x509 from a directory
//! holding `ca-cert.pem`, `client-cert.pem`, `client-key.pem`) and Rebound's
//! own [`client`](super::client), which reads the same directory. The
//! rustls config is the gRPC servers' ([`TlsFiles::server_tls`]: the renewed
//! identity, a revoked client certificate refused at the handshake), and a
//! connection whose certificate is revoked later is closed
//! ([`Revocations::watch`]).
//!
//! The transmission loop is blocking std IO on one thread per connection,
//! so the TLS stream is a rustls `StreamOwned` shared by the connection's
//! reader and writer behind a mutex that only that thread takes.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection, StreamOwned};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::server::Conn;
use crate::pki::{peer_identity, serial_hex, PeerIdentity, Role};
use crate::tls::{host_of, ClientAuth, Revocations, TlsError, TlsFiles};

/// The files of a client certificate directory, named as libnbd's
/// `tls-certificates=DIR` and qemu's `tls-creds-x509,dir=DIR` want them.
pub fn client_dir_files(dir: &Path) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca-cert.pem"),
        cert: dir.join("client-cert.pem"),
        key: dir.join("client-key.pem"),
        renewed: None,
    }
}

/// Copies the CA, certificate and key of `files` into `dir` (created when
/// missing) under the names of [`client_dir_files`], the key with mode
/// 0600: the directory an operator hands to nbdcopy, qemu-img or
/// Rebound's own client.
pub fn write_client_dir(files: &TlsFiles, dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let want = client_dir_files(dir);
    for (from, to) in [
        (&files.ca, &want.ca),
        (&files.cert, &want.cert),
        (&files.key, &want.key),
    ] {
        std::fs::copy(from, to).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot copy {} to {}: {e}", from.display(), to.display()),
            )
        })?;
    }
    std::fs::set_permissions(&want.key, std::fs::Permissions::from_mode(0o600))
}

/// Why a TLS client was not let in.
#[derive(Debug, Error)]
pub enum TlsRefused {
    #[error("NBD TLS handshake with {peer} failed: {source} (the client needs a certificate from the deployment's CA)")]
    Handshake { peer: String, source: io::Error },
    #[error("NBD client {peer} presented no usable certificate: {reason}")]
    Certificate { peer: String, reason: String },
}

/// The server half: this server's identity, client certificates required
/// from the deployment's CA, and the revocation list to enforce.
pub struct NbdTls {
    config: Arc<rustls::ServerConfig>,
    revocations: Revocations,
}

impl NbdTls {
    /// This server's identity from `files` (the renewed one once there is
    /// one), client certificates required from the CA and checked against
    /// `revocations` at the handshake.
    pub fn new(files: &TlsFiles, revocations: Revocations) -> Result<NbdTls, TlsError> {
        let grpc = files.server_tls(ClientAuth::Required, &revocations)?;
        let mut config = (*grpc).clone();
        config.alpn_protocols.clear();
        Ok(NbdTls {
            config: Arc::new(config),
            revocations,
        })
    }

    /// Runs the TLS handshake on `sock` after STARTTLS was acknowledged;
    /// the stream, the client's identity, and the watch that closes the
    /// connection if its certificate is revoked while it is open (the
    /// watch ends when dropped).
    pub(crate) fn accept<S: Conn>(
        &self,
        mut sock: S,
        peer: &str,
    ) -> Result<(TlsConn<S>, PeerIdentity, RevocationWatch), TlsRefused> {
        let control = sock.clone_conn().map_err(|source| TlsRefused::Handshake {
            peer: peer.to_string(),
            source,
        })?;
        let handshake = |source| TlsRefused::Handshake {
            peer: peer.to_string(),
            source,
        };
        let mut conn = ServerConnection::new(self.config.clone())
            .map_err(|e| handshake(io::Error::other(e)))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).map_err(handshake)?;
        }
        let bad = |reason: String| TlsRefused::Certificate {
            peer: peer.to_string(),
            reason,
        };
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| bad("no client certificate".into()))?;
        let who = peer_identity(leaf.as_ref()).map_err(|e| bad(e.to_string()))?;
        let serial = serial_hex(leaf.as_ref()).map_err(|e| bad(e.to_string()))?;
        let watch = RevocationWatch::start(&self.revocations, &serial, &who, peer, control);
        let stream = TlsConn {
            inner: Arc::new(Mutex::new(StreamOwned::new(conn, sock))),
        };
        Ok((stream, who, watch))
    }
}

/// Closes a connection when its client certificate is revoked, from a
/// small thread that waits on the revocation list's cancellation token.
pub(crate) struct RevocationWatch {
    token: CancellationToken,
    ended: Arc<AtomicBool>,
}

impl RevocationWatch {
    fn start<S: Conn>(
        revocations: &Revocations,
        serial: &str,
        who: &PeerIdentity,
        peer: &str,
        control: S,
    ) -> RevocationWatch {
        let token = CancellationToken::new();
        let ended = Arc::new(AtomicBool::new(false));
        revocations.watch(serial, token.clone());
        let (t, e) = (token.clone(), ended.clone());
        let (who, peer, serial) = (who.to_string(), peer.to_string(), serial.to_string());
        let spawned = std::thread::Builder::new()
            .name("nbd-revocation".into())
            .spawn(move || {
                futures::executor::block_on(t.cancelled());
                if !e.load(Ordering::SeqCst) {
                    warn!(peer = %peer, certificate = %who, serial = %serial, "NBD client certificate revoked; closing its connection");
                    let _ = control.shutdown_conn(Shutdown::Both);
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the revocation watch of an NBD connection; it is closed only at the next handshake after a revocation");
        }
        RevocationWatch { token, ended }
    }
}

impl Drop for RevocationWatch {
    fn drop(&mut self) {
        self.ended.store(true, Ordering::SeqCst);
        self.token.cancel();
    }
}

/// A TLS stream shared by a connection's reader and writer.
pub(crate) struct TlsConn<S: Conn> {
    inner: Arc<Mutex<StreamOwned<ServerConnection, S>>>,
}

impl<S: Conn> TlsConn<S> {
    fn lock(&self) -> MutexGuard<'_, StreamOwned<ServerConnection, S>> {
        // Only the connection's own thread takes the lock.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<S: Conn> Clone for TlsConn<S> {
    fn clone(&self) -> Self {
        TlsConn {
            inner: self.inner.clone(),
        }
    }
}

impl<S: Conn> Read for TlsConn<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.lock().read(buf)
    }
}

impl<S: Conn> Write for TlsConn<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.lock().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.lock().flush()
    }
}

impl<S: Conn> Conn for TlsConn<S> {
    fn clone_conn(&self) -> io::Result<Self> {
        Ok(self.clone())
    }
    fn shutdown_conn(&self, how: Shutdown) -> io::Result<()> {
        self.lock().sock.shutdown_conn(how)
    }
    fn set_read_timeout_conn(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.lock().sock.set_read_timeout_conn(timeout)
    }
    fn prepare(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The client half: STARTTLS is acknowledged, now the TLS handshake with
/// the certificate directory `dir` (see [`client_dir_files`]), checking
/// that the server at `addr` is a master target of the deployment.
pub(crate) fn client_upgrade<S: Read + Write>(
    mut sock: S,
    addr: &str,
    dir: &Path,
) -> Result<StreamOwned<ClientConnection, S>, ClientTlsError> {
    let files = client_dir_files(dir);
    let mut config = files.client_config(addr, Role::Mt)?;
    config.alpn_protocols.clear();
    let host = host_of(addr);
    let name = ServerName::try_from(host.to_string()).map_err(|e| ClientTlsError::Name {
        host: host.to_string(),
        reason: e.to_string(),
    })?;
    let mut conn =
        ClientConnection::new(Arc::new(config), name).map_err(|e| ClientTlsError::Handshake {
            addr: addr.to_string(),
            source: io::Error::other(e),
        })?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|source| ClientTlsError::Handshake {
                addr: addr.to_string(),
                source,
            })?;
    }
    Ok(StreamOwned::new(conn, sock))
}

/// Why the client could not start TLS.
#[derive(Debug, Error)]
pub enum ClientTlsError {
    #[error(transparent)]
    Files(#[from] TlsError),
    #[error("{host:?} is not a TLS server name: {reason}")]
    Name { host: String, reason: String },
    #[error("TLS handshake with the NBD server at {addr} failed: {source} (check the certificate directory: ca-cert.pem, client-cert.pem, client-key.pem from the deployment's CA)")]
    Handshake { addr: String, source: io::Error },
}
