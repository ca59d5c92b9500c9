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

/// The TCP addresses the processes `pids` listen on, from `/proc`: each
/// socket inode a process holds open, matched against the kernel's table
/// of listening sockets (`/proc/net/tcp`, `/proc/net/tcp6`, state 0A).
/// A test uses it to show which addresses a lab's processes bound.
pub fn listening(pids: &[u32]) -> std::io::Result<Vec<SocketAddr>> {
    let mut inodes = std::collections::HashSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue; // exited since
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            if let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
            {
                inodes.insert(inode.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table)?;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                if let Some(a) = parse_proc_addr(f[1]) {
                    out.push(a);
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `0100007F:1F90` (IPv4, or 32 hex digits for IPv6, each 32-bit word in
/// host byte order) as a socket address.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip: std::net::IpAddr = match words.as_slice() {
        [w] => Ipv4Addr::from(w.swap_bytes()).into(),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            std::net::Ipv6Addr::from(bytes).into()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_of_this_process_is_found_at_its_address() {
        let host = Host::next();
        let l = TcpListener::bind(host.addr()).unwrap();
        let found = listening(&[std::process::id()]).unwrap();
        assert!(found.contains(&l.local_addr().unwrap()), "{found:?}");
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
    }
}
