//! A cap on failed enrollments per remote address, so the passphrase and
//! token secrets cannot be guessed at network speed and a flood of refusals
//! does not flood the event log.
//!
//! A fixed window per IP address: after `MAX_FAILURES` refusals within
//! `WINDOW`, every enrollment from that address is refused until the window
//! ends. Successful enrollments do not count. The table is pruned as it is
//! used, so it stays as small as the set of addresses failing right now.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refusals one address may collect per window.
pub const MAX_FAILURES: u32 = 20;
pub const WINDOW: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct FailureLimit {
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimit {
    /// `Some(wait)` when `addr` used up its failures for this window.
    pub fn blocked(&self, addr: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        w.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        match w.get(&addr) {
            Some((start, n)) if *n >= MAX_FAILURES => {
                Some(WINDOW.saturating_sub(now.duration_since(*start)))
            }
            _ => None,
        }
    }

    /// Counts one refusal from `addr`.
    pub fn failed(&self, addr: IpAddr) {
        let now = Instant::now();
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let e = w.entry(addr).or_insert((now, 0));
        if now.duration_since(e.0) >= WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_blocked_after_its_failures_and_others_are_not() {
        let l = FailureLimit::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert!(l.blocked(a).is_none());
            l.failed(a);
        }
        let wait = l.blocked(a).unwrap();
        assert!(wait > Duration::from_secs(50) && wait <= WINDOW, "{wait:?}");
        assert!(l.blocked(b).is_none());
    }
}
