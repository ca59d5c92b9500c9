//! The NBD server (DESIGN.md §5 "NBD front end").
//!
//! The agent exposes each protected disk through NBD (read-write) and the
//! master target exposes recovery-point views through it (read-only), so the
//! protocol lives here once. Callers implement [`BlockDevice`] for one disk and
//! [`ExportRegistry`] for the set of exports, then hand a bound listener to
//! [`serve_tcp`] or [`serve_unix`], or to [`serve_tcp_tls`] for a server
//! that serves nothing before NBD_OPT_STARTTLS and a client certificate
//! from the deployment's CA ([`tls`]).
//!
//! What the server guarantees a [`BlockDevice`]:
//! - every request is inside `0..size()`; out-of-range requests are answered
//!   with `EINVAL` (reads) or `ENOSPC` (writes, trims, zeroes) by the server;
//! - reads and writes are at most [`MAX_BLOCK_SIZE`] bytes and never empty;
//! - writes, trims and zeroes start on a [`MIN_BLOCK_SIZE`] boundary and their
//!   length is a multiple of it, except a request that ends exactly at the
//!   end of the device (trims are shrunk inwards to whole blocks);
//! - on a read-only device (`read_only() == true`) write, trim and zeroes are
//!   refused with `EPERM` before the device sees them;
//! - requests of one connection arrive one at a time, in the client's order;
//!   several connections to the same export run on several threads, so a
//!   device must be internally synchronised (hence `Send + Sync`).
//!
//! Threading: one accept thread per listener and one std thread per
//! connection, blocking IO. Stopping: set the `shutdown` flag and join the
//! returned handle; see [`serve_tcp`].

pub mod client;
mod error;
mod handshake;
mod proto;
mod server;
mod stream;
pub mod tls;
mod transmission;
mod uri;

#[cfg(test)]
mod client_tests;
#[cfg(test)]
mod interop_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;
#[cfg(test)]
mod tls_tests;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

pub use error::NbdError;
pub use stream::serve_stream;
pub use tls::NbdTls;

use crate::pki::PeerIdentity;

/// Smallest block size advertised to clients (NBD_INFO_BLOCK_SIZE minimum).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Preferred block size advertised to clients.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Largest READ or WRITE the server accepts (32 MiB); larger ones get EINVAL.
pub const MAX_BLOCK_SIZE: u32 = 32 << 20;

/// One disk behind an NBD export.
///
/// The server validates every request before calling these methods (see the
/// module docs), so an implementation only has to do the IO. Errors go back
/// to the client as the [`NbdError::errno`] of the error.
pub trait BlockDevice: Send + Sync {
    /// Size of the device in bytes; fixed for the life of a connection.
    fn size(&self) -> u64;
    /// A read-only device gets NBD_FLAG_READ_ONLY, and writes are refused
    /// with EPERM by the server without reaching the device.
    fn read_only(&self) -> bool;
    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError>;
    /// Writes `data` at `offset`; with `fua` the data must be durable before
    /// this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError>;
    /// Makes every write acknowledged so far durable.
    fn flush(&self) -> Result<(), NbdError>;
    /// The client no longer needs `len` bytes at `offset`; the device may
    /// discard them (reading them afterwards may return anything).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), NbdError>;
    /// Makes `len` bytes at `offset` read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), NbdError>;
}

/// The set of exports a server offers.
pub trait ExportRegistry: Send + Sync {
    /// Export names, for NBD_OPT_LIST. The first one is the default export,
    /// served to clients that ask for the empty name.
    fn list(&self) -> Vec<String>;
    /// Opens an export for one connection. An error is sent to the client as
    /// an option error: `EPERM` → NBD_REP_ERR_POLICY, `ESHUTDOWN` →
    /// NBD_REP_ERR_SHUTDOWN, anything else → NBD_REP_ERR_UNKNOWN, with the
    /// error's message as the text the client shows.
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, NbdError>;
    /// The exports `client` may see (NBD_OPT_LIST, the default export).
    /// `client` is the identity of the TLS client certificate, or `None` on
    /// a server without TLS, whose transport decides who connects. All of
    /// them unless a registry says otherwise.
    fn list_for(&self, client: Option<&PeerIdentity>) -> Vec<String> {
        let _ = client;
        self.list()
    }
    /// Opens an export for `client` (see [`list_for`](Self::list_for)); a
    /// registry refuses what the client may not see with `EPERM`.
    fn open_for(
        &self,
        name: &str,
        client: Option<&PeerIdentity>,
    ) -> Result<Arc<dyn BlockDevice>, NbdError> {
        let _ = client;
        self.open(name)
    }
}

/// Serves NBD on a bound TCP listener until `shutdown` becomes true.
///
/// Returns the accept thread's handle. The accept loop waits for clients
/// with poll(2) and a 50 ms timeout, so it accepts at once and notices
/// `shutdown` within 50 ms. Each connection runs on its own thread with
/// TCP_NODELAY and blocking IO. When `shutdown` is set, the server stops
/// accepting, shuts the read side of every connection so that requests
/// already received are still answered, and after a grace period (5 s)
/// closes whatever is left. The handle finishes once the connections are
/// gone (at most about 10 s; a connection stuck inside a device call is
/// detached with a warning). The listener is closed when the handle
/// finishes; a unix socket's path is not removed.
pub fn serve_tcp(
    listener: TcpListener,
    registry: Arc<dyn ExportRegistry>,
    shutdown: Arc<AtomicBool>,
) -> JoinHandle<()> {
    server::spawn(listener, registry, None, shutdown)
}

/// Serves NBD on a bound TCP listener with TLS required: a client must
/// start TLS (NBD_OPT_STARTTLS) and present a certificate the deployment's
/// CA signed before anything is listed or opened, and the registry lists
/// and opens exports by that certificate's identity. Otherwise as
/// [`serve_tcp`].
pub fn serve_tcp_tls(
    listener: TcpListener,
    registry: Arc<dyn ExportRegistry>,
    tls: Arc<NbdTls>,
    shutdown: Arc<AtomicBool>,
) -> JoinHandle<()> {
    server::spawn(listener, registry, Some(tls), shutdown)
}

/// Serves NBD on a bound unix-domain listener until `shutdown` becomes true.
/// Same behaviour as [`serve_tcp`].
pub fn serve_unix(
    listener: UnixListener,
    registry: Arc<dyn ExportRegistry>,
    shutdown: Arc<AtomicBool>,
) -> JoinHandle<()> {
    server::spawn(listener, registry, None, shutdown)
}
