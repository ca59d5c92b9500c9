//! Accept loop and connection threads, shared by TCP and unix listeners.
//!
//! The NBD server uses plain std threads and blocking IO: one thread per
//! connection keeps requests of a connection in order without any locking,
//! and a non-blocking listener watched with poll(2) and a 50 ms timeout
//! accepts at once yet notices the shutdown flag without a self-pipe. Every live connection is kept in a
//! table so that shutdown can close its socket and wake its thread.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::handshake::{self, ClientFlags, Haggled, Tls};
use super::{transmission, ExportRegistry, NbdTls};

/// How often the accept loop looks at the shutdown flag when idle.
const ACCEPT_POLL: Duration = Duration::from_millis(50);
/// How long answering requests already received may take at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// A client must finish option haggling within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(120);
/// Socket buffer sizes: several pipelined 4 KiB requests per read syscall
/// (15 at 64 KiB), and replies batched until the client's queue is drained.
/// The read buffer stays small because a WRITE's payload beyond what it
/// holds is read straight into place (`transmission::read_payload`).
const READ_BUF: usize = 64 << 10;
const WRITE_BUF: usize = 256 << 10;

/// A connected stream the server can split and close from another thread.
pub(crate) trait Conn: Read + Write + Send + Sized + 'static {
    fn clone_conn(&self) -> io::Result<Self>;
    fn shutdown_conn(&self, how: Shutdown) -> io::Result<()>;
    fn set_read_timeout_conn(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Blocking mode, and TCP_NODELAY where it applies.
    fn prepare(&self) -> io::Result<()>;
}

/// A bound listener the accept loop can poll.
pub(crate) trait Listener: AsFd + Send + 'static {
    type Stream: Conn;
    fn set_nonblocking_listener(&self) -> io::Result<()>;
    fn accept_conn(&self) -> io::Result<(Self::Stream, String)>;
    fn local_name(&self) -> String;
}

/// `TcpStream` and `UnixStream` have these methods under the same names but
/// share no trait; `prepare` also runs `$tune` (TCP_NODELAY for TCP).
macro_rules! impl_conn {
    ($stream:ty $(, $tune:ident($arg:expr))?) => {
        impl Conn for $stream {
            fn clone_conn(&self) -> io::Result<Self> {
                self.try_clone()
            }
            fn shutdown_conn(&self, how: Shutdown) -> io::Result<()> {
                self.shutdown(how)
            }
            fn set_read_timeout_conn(&self, timeout: Option<Duration>) -> io::Result<()> {
                self.set_read_timeout(timeout)
            }
            fn prepare(&self) -> io::Result<()> {
                self.set_nonblocking(false)?;
                $(self.$tune($arg)?;)?
                Ok(())
            }
        }
    };
}

impl_conn!(TcpStream, set_nodelay(true));
impl_conn!(UnixStream);

impl Listener for TcpListener {
    type Stream = TcpStream;
    fn set_nonblocking_listener(&self) -> io::Result<()> {
        self.set_nonblocking(true)
    }
    fn accept_conn(&self) -> io::Result<(TcpStream, String)> {
        self.accept().map(|(s, peer)| (s, peer.to_string()))
    }
    fn local_name(&self) -> String {
        let addr = self.local_addr().map_or("?".to_string(), |a| a.to_string());
        format!("tcp:{addr}")
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    fn set_nonblocking_listener(&self) -> io::Result<()> {
        self.set_nonblocking(true)
    }
    fn accept_conn(&self) -> io::Result<(UnixStream, String)> {
        self.accept().map(|(s, _)| (s, "unix".to_string()))
    }
    fn local_name(&self) -> String {
        let addr = self.local_addr().ok();
        let path = addr.as_ref().and_then(|a| a.as_pathname());
        let path = path.map_or("?".to_string(), |p| p.display().to_string());
        format!("unix:{path}")
    }
}

/// Live connections, by id: a clone of each socket, to close it at shutdown.
struct ConnTable<S> {
    conns: Mutex<HashMap<u64, S>>,
}

impl<S> ConnTable<S> {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, S>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a connection from the table when its thread ends (or unwinds).
struct TableEntry<S> {
    table: Arc<ConnTable<S>>,
    id: u64,
}

impl<S> Drop for TableEntry<S> {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

pub(crate) fn spawn<L: Listener>(
    listener: L,
    registry: Arc<dyn ExportRegistry>,
    tls: Option<Arc<NbdTls>>,
    shutdown: Arc<AtomicBool>,
) -> JoinHandle<()> {
    thread::Builder::new()
        .name("nbd-accept".to_string())
        .spawn(move || accept_loop(listener, registry, tls, shutdown))
        .expect("the OS refused to start the NBD accept thread")
}

fn accept_loop<L: Listener>(
    listener: L,
    registry: Arc<dyn ExportRegistry>,
    tls: Option<Arc<NbdTls>>,
    shutdown: Arc<AtomicBool>,
) {
    let local = listener.local_name();
    if let Err(e) = listener.set_nonblocking_listener() {
        error!(listen = %local, error = %e, "NBD server cannot poll its listener; not serving");
        return;
    }
    info!(listen = %local, tls = tls.is_some(), "NBD server listening");
    let table = Arc::new(ConnTable {
        conns: Mutex::new(HashMap::new()),
    });
    let mut threads: Vec<(u64, JoinHandle<()>)> = Vec::new();
    let mut next_id = 0u64;
    while !shutdown.load(Ordering::SeqCst) {
        match listener.accept_conn() {
            Ok((stream, peer)) => {
                next_id += 1;
                if let Some(h) = start_connection(
                    next_id,
                    stream,
                    peer,
                    &table,
                    registry.clone(),
                    tls.clone(),
                    shutdown.clone(),
                ) {
                    threads.push((next_id, h));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                crate::sys::wait_readable(&listener, ACCEPT_POLL)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: keep serving the connections we have.
                warn!(listen = %local, error = %e, "NBD accept failed");
                thread::sleep(ACCEPT_POLL);
            }
        }
        reap_finished(&mut threads);
    }
    info!(listen = %local, connections = table.lock().len(), "NBD server stopping");
    stop_connections(&local, &table, threads);
}

fn start_connection<S: Conn>(
    id: u64,
    stream: S,
    peer: String,
    table: &Arc<ConnTable<S>>,
    registry: Arc<dyn ExportRegistry>,
    tls: Option<Arc<NbdTls>>,
    shutdown: Arc<AtomicBool>,
) -> Option<JoinHandle<()>> {
    let clones = stream
        .prepare()
        .and_then(|()| Ok((stream.clone_conn()?, stream.clone_conn()?)));
    let (writer, control) = match clones {
        Ok(c) => c,
        Err(e) => {
            warn!(peer = %peer, error = %e, "NBD connection setup failed");
            return None;
        }
    };
    table.lock().insert(id, control);
    let entry = TableEntry {
        table: table.clone(),
        id,
    };
    let spawned = thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            let _entry = entry;
            serve_connection(stream, writer, &peer, &*registry, tls.as_deref(), &shutdown);
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            // The closure (and with it the table entry and socket) is dropped.
            warn!(error = %e, "cannot start an NBD connection thread; dropping the connection");
            None
        }
    }
}

fn serve_connection<S: Conn>(
    stream: S,
    writer: S,
    peer: &str,
    registry: &dyn ExportRegistry,
    tls: Option<&NbdTls>,
    shutdown: &AtomicBool,
) {
    debug!(peer, "NBD client connected");
    if let Err(e) = stream.set_read_timeout_conn(Some(HANDSHAKE_TIMEOUT)) {
        debug!(peer, error = %e, "cannot set the NBD handshake timeout");
    }
    let mut reader = BufReader::with_capacity(READ_BUF, stream);
    let mut writer = BufWriter::with_capacity(WRITE_BUF, writer);
    let flags = match handshake::greet(&mut reader, &mut writer, peer) {
        Ok(f) => f,
        Err(e) => {
            debug!(peer, error = %e, "NBD handshake ended");
            return;
        }
    };
    let Some(tls) = tls else {
        return attach_and_serve(
            reader,
            writer,
            flags,
            Tls::NotOffered,
            peer,
            registry,
            shutdown,
        );
    };
    match handshake::haggle(
        &mut reader,
        &mut writer,
        flags,
        Tls::Required,
        registry,
        shutdown,
        peer,
    ) {
        Ok(Haggled::StartTls) => {}
        Ok(Haggled::Attached(_)) => {
            error!(
                peer,
                "NBD client attached without TLS on a server that requires it; closing"
            );
            return;
        }
        Ok(Haggled::Left) => {
            debug!(peer, "NBD client left before STARTTLS");
            return;
        }
        Err(e) => {
            debug!(peer, error = %e, "NBD handshake ended before STARTTLS");
            return;
        }
    }
    if !reader.buffer().is_empty() {
        warn!(
            peer,
            "NBD client sent data after STARTTLS before the TLS handshake; closing"
        );
        return;
    }
    drop(writer);
    let (conn, who, _watch) = match tls.accept(reader.into_inner(), peer) {
        Ok(x) => x,
        Err(e) => {
            warn!(peer, error = %e, "NBD TLS handshake refused");
            return;
        }
    };
    let reader = BufReader::with_capacity(READ_BUF, conn.clone());
    let writer = BufWriter::with_capacity(WRITE_BUF, conn);
    attach_and_serve(
        reader,
        writer,
        flags,
        Tls::Established(&who),
        peer,
        registry,
        shutdown,
    );
}

/// Option haggling up to the chosen export, then the transmission phase.
fn attach_and_serve<C: Conn>(
    mut reader: BufReader<C>,
    mut writer: BufWriter<C>,
    flags: ClientFlags,
    tls: Tls<'_>,
    peer: &str,
    registry: &dyn ExportRegistry,
    shutdown: &AtomicBool,
) {
    let negotiated = match handshake::haggle(
        &mut reader,
        &mut writer,
        flags,
        tls,
        registry,
        shutdown,
        peer,
    ) {
        Ok(Haggled::Attached(n)) => n,
        Ok(Haggled::Left | Haggled::StartTls) => {
            debug!(peer, "NBD client left during option haggling");
            return;
        }
        Err(e) => {
            debug!(peer, error = %e, "NBD handshake ended");
            return;
        }
    };
    if let Err(e) = reader.get_ref().set_read_timeout_conn(None) {
        warn!(peer, error = %e, "cannot clear the NBD handshake timeout; closing");
        return;
    }
    let export = negotiated.name.clone();
    match transmission::serve(&mut reader, &mut writer, &negotiated, peer) {
        Ok(()) => info!(peer, export = %export, "NBD client disconnected"),
        Err(e) => info!(peer, export = %export, error = %e, "NBD connection closed"),
    }
}

/// Joins connection threads that have finished, logging panics.
fn reap_finished(threads: &mut Vec<(u64, JoinHandle<()>)>) {
    let mut i = 0;
    while i < threads.len() {
        if threads[i].1.is_finished() {
            let (id, h) = threads.swap_remove(i);
            if h.join().is_err() {
                error!(conn = id, "NBD connection thread panicked");
            }
        } else {
            i += 1;
        }
    }
}

/// Closes the read side of every connection, gives them [`SHUTDOWN_GRACE`]
/// to answer what they already received, then closes them fully and waits
/// once more before detaching whatever is still stuck.
fn stop_connections<S: Conn>(
    local: &str,
    table: &Arc<ConnTable<S>>,
    mut threads: Vec<(u64, JoinHandle<()>)>,
) {
    for conn in table.lock().values() {
        let _ = conn.shutdown_conn(Shutdown::Read);
    }
    if !wait_empty(table, SHUTDOWN_GRACE) {
        for conn in table.lock().values() {
            let _ = conn.shutdown_conn(Shutdown::Both);
        }
        wait_empty(table, SHUTDOWN_GRACE);
    }
    let stuck: Vec<u64> = table.lock().keys().copied().collect();
    for (id, h) in threads.drain(..) {
        if stuck.contains(&id) {
            warn!(listen = %local, conn = id, "NBD connection still busy in its device after shutdown; detaching it");
        } else if h.join().is_err() {
            error!(conn = id, "NBD connection thread panicked");
        }
    }
    info!(listen = %local, "NBD server stopped");
}

fn wait_empty<S>(table: &ConnTable<S>, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if table.lock().is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}
