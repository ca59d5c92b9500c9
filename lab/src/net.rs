//! Loopback addresses and ports: one 127.0.0.x per simulated host, and one
//! port allocator for every server a lab starts.
//!
//! Linux routes all of 127.0.0.0/8 to the loopback device, so each host of
//! a lab (a site's PS, its MT, a protected machine) gets its own address
//! and the processes talk as they would between machines.
//!
//! Ports come from 20000–32767, below Linux's ephemeral range, so neither a
//! client connection's source port nor another program's port-0 bind can
//! take one between the allocation and the server's bind; a per-process
//! counter keeps the labs of one test binary (its tests run in parallel)
//! apart, and the pid spreads concurrent processes (a bench beside a test
//! run).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

const LOW: u32 = 20000;
const SPAN: u32 = 12700;

/// One simulated host: a loopback address of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host(pub Ipv4Addr);

impl Host {
    /// The next host address, 127.0.0.2 to 127.0.0.254 in turn (127.0.0.1
    /// stays for the tools and the test itself).
    pub fn next() -> Host {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % 253;
        Host(Ipv4Addr::new(127, 0, 0, 2 + n as u8))
    }

    /// 127.0.0.1.
    pub fn localhost() -> Host {
        Host(Ipv4Addr::LOCALHOST)
    }

    /// A free port on this host, as an address to listen on.
    pub fn addr(self) -> SocketAddr {
        SocketAddr::from((self.0, free_port_on(self.0)))
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A free port on 127.0.0.1 (see the module doc for the range).
pub fn free_port() -> u16 {
    free_port_on(Ipv4Addr::LOCALHOST)
}

/// A free port on `ip`: one a bind to it succeeds on now.
pub fn free_port_on(ip: Ipv4Addr) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(997) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (base + n * 7) % SPAN) as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip} in {LOW}-{}", LOW + SPAN - 1)
}
