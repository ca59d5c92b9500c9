//! The one TLS acceptor every gRPC server (PS, MT, CS) serves through.
//!
//! tonic's own TLS takes a fixed identity and knows nothing of revocation,
//! so the servers hand tonic connections that are already TLS:
//! - accept never waits on a handshake: each runs in its own task with a
//!   deadline, so a slow or silent client holds nothing up;
//! - the client's certificate must chain to the deployment's CA (optional
//!   only at the CS, whose Enrollment service serves components that have
//!   none yet) and must not be revoked ([`server_revocation`]);
//! - each connection registers its certificate's serial with
//!   [`Revocations::watch`]: a later revocation fails its next read and
//!   write, hyper drops it, the socket closes and every stream on it ends
//!   with an error;
//! - the server's certificate is resolved per handshake
//!   ([`server_identity`]), so a renewed identity is served without a
//!   restart;
//! - a connection carries tonic's TLS connect info, so `Request::peer_certs`
//!   (and [`super::require_role`]) work as with tonic's TLS.

use super::{server_identity, server_revocation, Revocations, TlsError, TlsFiles};
use crate::pki::{peer_identity, serial_hex};
use futures::Stream;
use rustls::server::WebPkiClientVerifier;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tracing::{info, warn};

/// How long a client may take from TCP accept to a finished handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const QUEUE: usize = 64;

/// Whether a server requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate from the CA (PS, MT).
    Required,
    /// A client may connect without one (the CS: enrollment); handlers
    /// check the role of every call that needs one.
    Optional,
}

/// The TLS side of a gRPC server: its rustls config and the revocation list
/// it enforces.
#[derive(Clone)]
pub struct Acceptor {
    tls: TlsAcceptor,
    revocations: Revocations,
}

impl TlsFiles {
    /// The rustls server config: this component's identity (the renewed one
    /// once there is one, reloaded when it changes), client certificates
    /// from the CA checked against `revocations`, ALPN h2.
    pub fn server_tls(
        &self,
        clients: ClientAuth,
        revocations: &Revocations,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(self.roots()?);
        let builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
        let builder = match clients {
            ClientAuth::Required => builder,
            ClientAuth::Optional => builder.allow_unauthenticated(),
        };
        let inner = builder.build().map_err(|e| TlsError::Pem {
            what: "CA certificate",
            path: self.ca.clone(),
            reason: e.to_string(),
        })?;
        let verifier = server_revocation::RevocationCheck {
            inner,
            revocations: revocations.clone(),
        };
        let identity = server_identity::ReloadingIdentity::new(self, provider.clone())?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Identity {
                cert: self.cert.clone(),
                key: self.key.clone(),
                source,
            })?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(identity));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The acceptor a gRPC server serves through (see the module).
    pub fn acceptor(
        &self,
        clients: ClientAuth,
        revocations: &Revocations,
    ) -> Result<Acceptor, TlsError> {
        Ok(Acceptor {
            tls: TlsAcceptor::from(self.server_tls(clients, revocations)?),
            revocations: revocations.clone(),
        })
    }
}

impl Acceptor {
    /// Accepts on `listener` and yields the connections whose handshake
    /// succeeded: hand it to tonic's `serve_with_incoming*` on a server
    /// without `tls_config`. Accepting stops when the stream is dropped.
    pub fn incoming(self, listener: TcpListener) -> Incoming {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(accept_loop(self, listener, tx));
        Incoming { rx, task }
    }

    async fn handshake(self, tcp: TcpStream, peer: SocketAddr, tx: mpsc::Sender<Conn>) {
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                info!(peer = %peer, "TLS handshake from {peer} failed: {e}");
                return;
            }
            Err(_) => {
                info!(peer = %peer, "TLS handshake from {peer} did not finish within {HANDSHAKE_TIMEOUT:?}; closed");
                return;
            }
        };
        let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
        let who = leaf
            .and_then(|c| peer_identity(c.as_ref()).ok())
            .map(|p| p.to_string())
            .unwrap_or_else(|| "(no certificate)".into());
        let cut = CancellationToken::new();
        if let Some(serial) = leaf.and_then(|c| serial_hex(c.as_ref()).ok()) {
            self.revocations.watch(&serial, cut.clone());
        }
        let conn = Conn {
            tls,
            cancelled: Box::pin(cut.clone().cancelled_owned()),
            cut,
            who,
            peer,
            logged: false,
        };
        // The server is gone when the receiver is: the connection closes.
        let _ = tx.send(conn).await;
    }
}

async fn accept_loop(acceptor: Acceptor, listener: TcpListener, tx: mpsc::Sender<Conn>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = tx.closed() => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(acceptor.clone().handshake(tcp, peer, tx.clone()));
            }
            Err(e) => {
                // Out of file descriptors or the like: do not spin.
                warn!("accepting a connection failed: {e}; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The connections an [`Acceptor`] handshook, for tonic.
pub struct Incoming {
    rx: mpsc::Receiver<Conn>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stream for Incoming {
    type Item = Result<Conn, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

/// One accepted TLS connection; it fails its reads and writes once its
/// client certificate is revoked.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    cut: CancellationToken,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    who: String,
    peer: SocketAddr,
    logged: bool,
}

impl Conn {
    /// The error every read and write returns once the connection is cut.
    fn revoked(&mut self) -> io::Error {
        if !self.logged {
            self.logged = true;
            warn!(
                certificate = %self.who,
                peer = %self.peer,
                "closed the connection of certificate {} from {}: it was revoked",
                self.who,
                self.peer
            );
        }
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("certificate {} is revoked: connection closed", self.who),
        )
    }
}

impl Drop for Conn {
    /// Cancels the token so the revocation registry forgets this connection
    /// (nothing polls a dropped connection, so no revocation is logged).
    fn drop(&mut self) {
        self.cut.cancel();
    }
}

impl Connected for Conn {
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Polled for its waker: a revocation wakes the connection's task.
        if self.cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(self.revoked()));
        }
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.cut.is_cancelled() {
            return Poll::Ready(Err(self.revoked()));
        }
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.cut.is_cancelled() {
            return Poll::Ready(Err(self.revoked()));
        }
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cut.is_cancelled() {
            return Poll::Ready(Err(self.revoked()));
        }
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cut.is_cancelled() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({} from {})", self.who, self.peer)
    }
}
