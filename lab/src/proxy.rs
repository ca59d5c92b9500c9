//! A TCP fault proxy, placed on a link of a lab (agent → PS, PS → MT) so
//! tests and the soak can break the network the way real networks break:
//! connections reset ([`Fault::Cut`]), a link that forwards nothing for a
//! while with the bytes queueing ([`Fault::Stall`]), a slow link
//! ([`Fault::Delay`]), and a stream that ends in the middle of a message
//! ([`Fault::Truncate`]).
//!
//! The proxy listens on a loopback address of its own and forwards every
//! connection to its upstream byte for byte, so TLS runs end to end through
//! it and the components see only their peer. It runs on a runtime and a
//! thread of its own: killing or restarting the components on either side
//! does not stop it (a connection whose upstream is down is closed at once,
//! as a refused connect would be), and dropping it stops it.
//!
//! A fault acts on every connection open when it is injected; a stall or a
//! delay also holds the connections made while it lasts. [`FaultSchedule`]
//! picks faults from a seed, so a failing run replays.

use crate::net::Host;
use crate::rng::Rng;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Bytes read from one side before they are forwarded to the other: the
/// unit a delay holds and a truncation cuts in half.
const CHUNK: usize = 16 << 10;

/// One network fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Resets every open connection (RST to both peers).
    Cut,
    /// Forwards nothing either way for the duration; the connections stay
    /// open and the bytes queue (in the proxy and the kernels' buffers).
    Stall(Duration),
    /// Holds each chunk `per_chunk` before forwarding it, for `for_`.
    Delay { per_chunk: Duration, for_: Duration },
    /// Forwards only the first half of each open connection's next chunk,
    /// then closes it: the peer sees the stream end mid-message.
    Truncate,
}

/// What a proxy did. `cuts` counts the cuts that found at least one
/// connection open and `truncations` those that truncated at least one;
/// `stalls` and `delays` count every one injected (they hold the link
/// itself, also for connections made while they last).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    pub cuts: u64,
    pub stalls: u64,
    pub delays: u64,
    pub truncations: u64,
    /// Bytes forwarded, both ways.
    pub bytes: u64,
    /// Connections accepted.
    pub connections: u64,
}

/// A TCP proxy on its own loopback address in front of `upstream`.
pub struct FaultProxy {
    name: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// Listens on a new loopback address and forwards to `upstream`.
    /// `name` (e.g. `agent-ps`) names the proxy in errors and its thread.
    pub fn start(name: &str, upstream: SocketAddr) -> Result<FaultProxy> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("proxy-{name}"))
            .enable_all()
            .build()
            .with_context(|| format!("cannot start the runtime of fault proxy {name}"))?;
        let listener = rt.block_on(bind(name))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(upstream));
        rt.spawn(accept_loop(shared.clone(), listener));
        Ok(FaultProxy {
            name: name.to_string(),
            addr,
            shared,
            rt: Some(rt),
        })
    }

    /// Where the proxy listens: the address to give the client side.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Injects `fault` into every open connection (see [`Fault`]).
    pub fn inject(&self, fault: Fault) {
        let s = &self.shared;
        match fault {
            Fault::Cut => {
                if s.open.load(Ordering::SeqCst) > 0 {
                    s.stats.cuts.fetch_add(1, Ordering::Relaxed);
                }
                s.cut.send_modify(|g| *g += 1);
            }
            Fault::Stall(d) => {
                s.stats.stalls.fetch_add(1, Ordering::Relaxed);
                let until = Instant::now() + d;
                let mut hold = s.hold();
                hold.stall_until = Some(hold.stall_until.map_or(until, |u| u.max(until)));
            }
            Fault::Delay { per_chunk, for_ } => {
                s.stats.delays.fetch_add(1, Ordering::Relaxed);
                s.hold().delay = Some((per_chunk, Instant::now() + for_));
            }
            Fault::Truncate => s.truncate.send_modify(|g| *g += 1),
        }
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            cuts: get(&c.cuts),
            stalls: get(&c.stalls),
            delays: get(&c.delays),
            truncations: get(&c.truncations),
            bytes: get(&c.bytes),
            connections: get(&c.connections),
        }
    }

    /// The number of connections open now.
    pub fn open_connections(&self) -> u64 {
        self.shared.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Drops every task, so every socket closes.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .finish()
    }
}

/// Picks faults from a seeded [`Rng`]: the same seed gives the same
/// faults. It only picks; the caller decides when and on which link.
#[derive(Debug, Clone)]
pub struct FaultSchedule {
    rng: Rng,
}

impl FaultSchedule {
    pub fn new(seed: u64) -> Self {
        FaultSchedule {
            rng: Rng::new(seed),
        }
    }

    /// Cuts and stalls three times in ten each, delays and truncations
    /// twice; stalls of 0.1–3 s, delays of 1–20 ms a chunk for 0.2–2 s.
    pub fn next_fault(&mut self) -> Fault {
        let ms = |rng: &mut Rng, lo: u64, hi: u64| Duration::from_millis(lo + rng.below(hi - lo));
        match self.rng.below(10) {
            0..=2 => Fault::Cut,
            3..=5 => Fault::Stall(ms(&mut self.rng, 100, 3000)),
            6..=7 => Fault::Delay {
                per_chunk: ms(&mut self.rng, 1, 20),
                for_: ms(&mut self.rng, 200, 2000),
            },
            _ => Fault::Truncate,
        }
    }
}

/// The state the proxy's tasks share with its handle.
struct Shared {
    upstream: SocketAddr,
    hold: Mutex<Hold>,
    /// Bumped by each cut; a connection resets when it changes.
    cut: watch::Sender<u64>,
    /// Bumped by each truncation; a connection made before the bump
    /// truncates its next chunk.
    truncate: watch::Sender<u64>,
    /// The newest truncation already counted.
    truncate_counted: AtomicU64,
    open: AtomicU64,
    stats: Counters,
}

#[derive(Default)]
struct Counters {
    cuts: AtomicU64,
    stalls: AtomicU64,
    delays: AtomicU64,
    truncations: AtomicU64,
    bytes: AtomicU64,
    connections: AtomicU64,
}

/// The stall and delay in force.
#[derive(Default)]
struct Hold {
    stall_until: Option<Instant>,
    /// Per chunk, until.
    delay: Option<(Duration, Instant)>,
}

/// What to do with a chunk now.
enum Wait {
    Stalled(Duration),
    Delayed(Duration),
    Go,
}

impl Shared {
    fn new(upstream: SocketAddr) -> Shared {
        Shared {
            upstream,
            hold: Mutex::default(),
            cut: watch::Sender::new(0),
            truncate: watch::Sender::new(0),
            truncate_counted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            stats: Counters::default(),
        }
    }

    fn hold(&self) -> std::sync::MutexGuard<'_, Hold> {
        self.hold.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait(&self) -> Wait {
        let now = Instant::now();
        let hold = self.hold();
        match (hold.stall_until, hold.delay) {
            (Some(until), _) if until > now => Wait::Stalled(until - now),
            (_, Some((per_chunk, until))) if until > now => Wait::Delayed(per_chunk),
            _ => Wait::Go,
        }
    }

    /// Sleeps through the stall in force (and any stall injected
    /// meanwhile); with `delay`, then through one chunk's delay.
    async fn hold_chunk(&self, delay: bool) {
        loop {
            match self.wait() {
                Wait::Stalled(d) => tokio::time::sleep(d).await,
                Wait::Delayed(d) if delay => return tokio::time::sleep(d).await,
                _ => return,
            }
        }
    }

    fn count_truncation(&self, order: u64) {
        if self.truncate_counted.fetch_max(order, Ordering::SeqCst) < order {
            self.stats.truncations.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Binds a new loopback host's address (a few tries: another process may
/// take the port between the allocation and the bind).
async fn bind(name: &str) -> Result<TcpListener> {
    let mut last = None;
    for _ in 0..10 {
        let addr = Host::next().addr();
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some((addr, e)),
        }
    }
    let (addr, e) = last.expect("ten tries");
    Err(e).with_context(|| format!("fault proxy {name} cannot listen on {addr}"))
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                shared.stats.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(shared.clone(), client));
            }
            // Out of descriptors, for instance: try again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Counts a connection as open while it lives.
struct Open<'a>(&'a Shared);

impl<'a> Open<'a> {
    fn new(s: &'a Shared) -> Open<'a> {
        s.open.fetch_add(1, Ordering::SeqCst);
        Open(s)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One client connection: connect upstream (after any stall), forward both
/// ways until either side ends it, a cut resets it or a truncation closes it.
async fn serve(shared: Arc<Shared>, mut client: TcpStream) {
    let _open = Open::new(&shared);
    let mut cut = shared.cut.subscribe();
    let truncated_before = *shared.truncate.borrow();
    let connect = async {
        shared.hold_chunk(false).await;
        TcpStream::connect(shared.upstream).await
    };
    let mut upstream = tokio::select! {
        r = connect => match r {
            Ok(s) => s,
            // The upstream is down: close, as a refused connect would.
            Err(_) => return,
        },
        _ = cut.changed() => return reset(&client),
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let was_cut = tokio::select! {
        _ = forward(&shared, truncated_before, &mut client, &mut upstream) => false,
        _ = cut.changed() => true,
    };
    if was_cut {
        reset(&client);
        reset(&upstream);
    }
}

/// Makes the close of `s` a reset rather than an orderly end of stream.
fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

/// Both directions until both ended or either failed.
async fn forward(
    shared: &Shared,
    truncated_before: u64,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
) -> std::io::Result<()> {
    let (cr, cw) = client.split();
    let (ur, uw) = upstream.split();
    tokio::try_join!(
        pump(shared, truncated_before, cr, uw),
        pump(shared, truncated_before, ur, cw)
    )?;
    Ok(())
}

/// One direction: read a chunk, hold it through stalls and delays, forward
/// it (or half of it and end, when a truncation is pending). An end of
/// stream is passed on as a half-close.
async fn pump<R, W>(
    shared: &Shared,
    truncated_before: u64,
    mut from: R,
    mut to: W,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        shared.hold_chunk(true).await;
        let order = *shared.truncate.borrow();
        if order > truncated_before {
            to.write_all(&buf[..n / 2]).await?;
            to.flush().await?;
            shared.count_truncation(order);
            return Err(std::io::Error::other("truncated by the fault proxy"));
        }
        to.write_all(&buf[..n]).await?;
        shared.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream as StdStream;

    /// An echo server on a loopback host, on threads.
    fn echo_server() -> SocketAddr {
        let l = std::net::TcpListener::bind(Host::next().addr()).unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                });
            }
        });
        addr
    }

    fn connect(p: &FaultProxy) -> StdStream {
        let s = StdStream::connect(p.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn echo_ok(s: &mut StdStream, msg: &[u8]) {
        s.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    }

    fn wait_open(p: &FaultProxy, n: u64) {
        crate::wait::wait_until("connections open", Duration::from_secs(5), || {
            p.open_connections() == n
        })
        .unwrap();
    }

    #[test]
    fn forwards_both_ways_and_counts() {
        let p = FaultProxy::start("t-fwd", echo_server()).unwrap();
        let mut s = connect(&p);
        echo_ok(&mut s, b"hello through the proxy");
        // The echo reaches the client before the proxy counts it.
        crate::wait::wait_until("both directions counted", Duration::from_secs(5), || {
            p.stats().bytes == 2 * 23
        })
        .unwrap();
        let st = p.stats();
        assert_eq!(st.connections, 1);
        assert_eq!(st.bytes, 2 * 23);
    }

    #[test]
    fn a_cut_resets_open_connections_and_new_ones_work() {
        let p = FaultProxy::start("t-cut", echo_server()).unwrap();
        p.inject(Fault::Cut);
        assert_eq!(p.stats().cuts, 0, "no connection was open");
        let mut s = connect(&p);
        echo_ok(&mut s, b"before");
        p.inject(Fault::Cut);
        let mut buf = [0u8; 8];
        let r = s.read(&mut buf);
        assert!(
            matches!(r, Err(_) | Ok(0)),
            "a cut connection still reads: {r:?}"
        );
        assert_eq!(p.stats().cuts, 1);
        wait_open(&p, 0);
        echo_ok(&mut connect(&p), b"after");
    }

    #[test]
    fn a_stall_holds_bytes_until_it_ends() {
        let p = FaultProxy::start("t-stall", echo_server()).unwrap();
        let mut s = connect(&p);
        echo_ok(&mut s, b"x");
        let t = Instant::now();
        p.inject(Fault::Stall(Duration::from_millis(400)));
        echo_ok(&mut s, b"held");
        assert!(
            t.elapsed() >= Duration::from_millis(390),
            "{:?}",
            t.elapsed()
        );
        // A connection made during a stall waits too.
        p.inject(Fault::Stall(Duration::from_millis(300)));
        let t = Instant::now();
        echo_ok(&mut connect(&p), b"new");
        assert!(
            t.elapsed() >= Duration::from_millis(290),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(p.stats().stalls, 2);
    }

    #[test]
    fn a_delay_slows_each_chunk_for_its_time() {
        let p = FaultProxy::start("t-delay", echo_server()).unwrap();
        let mut s = connect(&p);
        p.inject(Fault::Delay {
            per_chunk: Duration::from_millis(50),
            for_: Duration::from_millis(500),
        });
        let t = Instant::now();
        echo_ok(&mut s, b"slow");
        // One chunk each way.
        assert!(
            t.elapsed() >= Duration::from_millis(95),
            "{:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        echo_ok(&mut s, b"fast");
        assert!(t.elapsed() < Duration::from_millis(95), "{:?}", t.elapsed());
        assert_eq!(p.stats().delays, 1);
    }

    #[test]
    fn a_truncation_forwards_part_of_the_next_chunk_then_closes() {
        let p = FaultProxy::start("t-trunc", echo_server()).unwrap();
        let mut s = connect(&p);
        echo_ok(&mut s, b"whole");
        p.inject(Fault::Truncate);
        let msg = vec![7u8; 4000];
        s.write_all(&msg).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(
            got.len() < msg.len(),
            "the whole message came back: {}",
            got.len()
        );
        assert_eq!(p.stats().truncations, 1);
        // Connections made after it are not truncated.
        echo_ok(&mut connect(&p), &msg);
        assert_eq!(p.stats().truncations, 1);
    }

    #[test]
    fn an_unreachable_upstream_closes_the_client() {
        let dead = Host::next().addr();
        let p = FaultProxy::start("t-dead", dead).unwrap();
        let mut s = connect(&p);
        let mut buf = [0u8; 1];
        assert!(matches!(s.read(&mut buf), Err(_) | Ok(0)));
    }

    #[test]
    fn the_schedule_replays_from_its_seed_and_picks_every_kind() {
        let a: Vec<Fault> = {
            let mut s = FaultSchedule::new(42);
            (0..200).map(|_| s.next_fault()).collect()
        };
        let mut s = FaultSchedule::new(42);
        assert!(a.iter().all(|f| *f == s.next_fault()));
        assert!(a.contains(&Fault::Cut) && a.contains(&Fault::Truncate));
        assert!(a.iter().any(|f| matches!(f, Fault::Stall(_))));
        assert!(a.iter().any(|f| matches!(f, Fault::Delay { .. })));
    }
}
