//! The churn writer: a minimal NBD client and a rate-limited, multi-connection
//! writer of a data profile.
//!
//! The sustained-replication, RPO and RTO sections need a write load at an
//! exact rate that can be changed while it runs (the throughput search ramps
//! it) and whose bytes are known per profile; fio's `--rate` cannot change
//! mid-run, so the bench speaks NBD itself (fixed newstyle, EXPORT_NAME,
//! simple replies): just enough to issue WRITEs to the agent's export.

use anyhow::{anyhow, bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rebound_lab::Rng;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;

/// One NBD connection to one export.
pub struct NbdClient {
    s: TcpStream,
    pub size: u64,
    cookie: u64,
    head: Vec<u8>,
}

impl NbdClient {
    pub fn connect(addr: SocketAddr, export: &str) -> Result<NbdClient> {
        let mut s = TcpStream::connect(addr)
            .with_context(|| format!("connecting to the NBD server at {addr}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut b8 = [0u8; 8];
        s.read_exact(&mut b8)?;
        if u64::from_be_bytes(b8) != NBDMAGIC {
            bail!("NBD server {addr}: not an NBD server (bad magic)");
        }
        s.read_exact(&mut b8)?;
        if u64::from_be_bytes(b8) != IHAVEOPT {
            bail!("NBD server {addr}: the server does not speak fixed newstyle");
        }
        let mut b2 = [0u8; 2];
        s.read_exact(&mut b2)?;
        let hflags = u16::from_be_bytes(b2);
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let cflags = u32::from(FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 });
        let mut msg = Vec::new();
        msg.extend_from_slice(&cflags.to_be_bytes());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        msg.extend_from_slice(&(export.len() as u32).to_be_bytes());
        msg.extend_from_slice(export.as_bytes());
        s.write_all(&msg)?;
        s.read_exact(&mut b8)
            .with_context(|| format!("NBD server {addr}: export {export:?} refused"))?;
        let size = u64::from_be_bytes(b8);
        s.read_exact(&mut b2)?;
        if !no_zeroes {
            let mut z = [0u8; 124];
            s.read_exact(&mut z)?;
        }
        Ok(NbdClient {
            s,
            size,
            cookie: 0,
            head: Vec::with_capacity(28),
        })
    }

    fn request(&mut self, cmd: u16, offset: u64, len: u32) -> u64 {
        self.cookie += 1;
        self.head.clear();
        self.head.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        self.head.extend_from_slice(&0u16.to_be_bytes());
        self.head.extend_from_slice(&cmd.to_be_bytes());
        self.head.extend_from_slice(&self.cookie.to_be_bytes());
        self.head.extend_from_slice(&offset.to_be_bytes());
        self.head.extend_from_slice(&len.to_be_bytes());
        self.cookie
    }

    /// One WRITE, waiting for its reply.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let cookie = self.request(CMD_WRITE, offset, data.len() as u32);
        self.s.write_all(&self.head)?;
        self.s.write_all(data)?;
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        let magic = u32::from_be_bytes(r[0..4].try_into().expect("4 bytes"));
        let err = u32::from_be_bytes(r[4..8].try_into().expect("4 bytes"));
        let got = u64::from_be_bytes(r[8..16].try_into().expect("8 bytes"));
        if magic != REPLY_MAGIC || got != cookie {
            bail!("NBD reply out of sync (magic {magic:#x}, cookie {got} for {cookie})");
        }
        if err != 0 {
            bail!("NBD WRITE at offset {offset} failed with errno {err}");
        }
        Ok(())
    }

    pub fn disconnect(mut self) {
        self.request(CMD_DISC, 0, 0);
        let _ = self.s.write_all(&self.head);
    }
}

/// Paces writers to a byte rate shared by all connections.
struct Pacer {
    /// Bytes per second; 0 = unlimited.
    rate: AtomicU64,
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    fn acquire(&self, n: u64) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        let now = Instant::now();
        let at = {
            let mut g = self.next.lock().unwrap_or_else(|p| p.into_inner());
            // At most 100 ms of catch-up burst after a stall.
            let burst = Duration::from_millis(100);
            let t = match *g {
                Some(t) if t + burst >= now => t,
                Some(_) => now.checked_sub(burst).unwrap_or(now),
                None => now,
            };
            *g = Some(t + Duration::from_secs_f64(n as f64 / rate as f64));
            t
        };
        if at > now {
            std::thread::sleep(at - now);
        }
    }
}

/// What a writer does.
#[derive(Clone)]
pub struct WriterSpec {
    pub addr: SocketAddr,
    pub export: String,
    /// Bytes per write (a multiple of 4096).
    pub write_size: usize,
    /// Parallel connections, one write in flight each.
    pub conns: usize,
    /// Initial rate in bytes per second (0 = as fast as possible).
    pub rate: u64,
    /// Data the writes are cut from.
    pub pool: Arc<Vec<u8>>,
    pub seed: u64,
}

/// A running writer.
pub struct Writer {
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    pacer: Arc<Pacer>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl Writer {
    pub fn start(spec: WriterSpec) -> Result<Writer> {
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let pacer = Arc::new(Pacer {
            rate: AtomicU64::new(spec.rate),
            next: Mutex::new(None),
        });
        let mut threads = Vec::new();
        for i in 0..spec.conns.max(1) {
            let mut c = NbdClient::connect(spec.addr, &spec.export)?;
            let (stop, bytes, pacer, spec) =
                (stop.clone(), bytes.clone(), pacer.clone(), spec.clone());
            threads.push(std::thread::spawn(move || -> Result<()> {
                let ws = spec.write_size as u64;
                let slots = c.size / ws;
                let pool_slots = (spec.pool.len() - spec.write_size) as u64 / 4096;
                if slots == 0 || spec.pool.len() < spec.write_size {
                    bail!("the disk or the data pool is smaller than one write");
                }
                let mut rng = Rng(spec.seed ^ ((i as u64) << 32));
                while !stop.load(Ordering::Relaxed) {
                    pacer.acquire(ws);
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let off = rng.below(slots) * ws;
                    let p = (rng.below(pool_slots + 1) * 4096) as usize;
                    c.write(off, &spec.pool[p..p + spec.write_size])?;
                    bytes.fetch_add(ws, Ordering::Relaxed);
                }
                c.disconnect();
                Ok(())
            }));
        }
        Ok(Writer {
            stop,
            bytes,
            pacer,
            threads,
        })
    }

    /// Changes the rate (bytes per second, 0 = unlimited) from now on.
    pub fn set_rate(&self, rate: u64) {
        *self.pacer.next.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.pacer.rate.store(rate, Ordering::Relaxed);
    }

    /// Whether every connection is still writing (none stopped on an error).
    pub fn running(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }

    /// Bytes acknowledged so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Stops every connection after its write in flight; fails if a write failed.
    pub fn stop(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut first_err = None;
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(anyhow!("a writer thread panicked"));
                }
            }
        }
        match first_err {
            Some(e) => Err(e.context("the churn writer failed")),
            None => Ok(self.bytes.load(Ordering::Relaxed)),
        }
    }
}
