//! The cache's size cap and the backpressure it drives (DESIGN.md §6: "when
//! the cache is full it stops acknowledging, the agent's buffer fills, and
//! the agent goes to bitmap mode").
//!
//! One [`Account`] counts the segment bytes of every replication against
//! the cap. Ingest streams stop reading once the total reaches the cap and
//! resume once trimming brings it below the low watermark (cap - cap/16),
//! so a full cache does not flap between paused and running on every trim.
//! A frame read from a stream holds a [`Reservation`] of its size until the
//! writer has stored it, so frames queued for the writer count too.

use std::sync::Arc;
use tokio::sync::watch;
use tracing::info;

/// Segment bytes of all replications, and frames on their way in, against
/// the cap.
#[derive(Debug)]
pub struct Account {
    cap: u64,
    usage: watch::Sender<Usage>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    /// Bytes of segment files.
    stored: u64,
    /// Bytes of frames read and not yet stored.
    reserved: u64,
    /// Backpressure is on.
    paused: bool,
}

impl Usage {
    fn used(&self) -> u64 {
        self.stored.saturating_add(self.reserved)
    }
}

impl Account {
    pub fn new(cap: u64) -> Account {
        Account {
            cap,
            usage: watch::Sender::new(Usage::default()),
        }
    }
    pub fn cap(&self) -> u64 {
        self.cap
    }
    /// Bytes of all segment files.
    pub fn total(&self) -> u64 {
        self.usage.borrow().stored
    }
    /// Whether backpressure is on: stored plus reserved bytes reached the
    /// cap and have not yet dropped below the low watermark.
    pub fn is_full(&self) -> bool {
        self.usage.borrow().paused
    }
    /// Resolves once backpressure is off.
    pub async fn wait_below_cap(&self) {
        let mut rx = self.usage.subscribe();
        let _ = rx.wait_for(|u| !u.paused).await;
    }
    /// Where backpressure ends.
    fn low_watermark(&self) -> u64 {
        self.cap - self.cap / 16
    }
    /// Counts `n` bytes of a frame that is on its way to the writer.
    fn reserve(&self, n: u64) {
        self.update(|u| u.reserved = u.reserved.saturating_add(n));
    }
    /// Drops a reservation (the frame was stored, dropped or refused).
    pub(super) fn release(&self, n: u64) {
        self.update(|u| u.reserved = u.reserved.saturating_sub(n));
    }
    /// Counts `n` bytes that reached a segment file.
    pub(super) fn add(&self, n: u64) {
        self.update(|u| u.stored = u.stored.saturating_add(n));
    }
    /// Forgets `n` bytes of deleted segment files.
    pub(super) fn sub(&self, n: u64) {
        self.update(|u| u.stored = u.stored.saturating_sub(n));
    }
    fn update(&self, f: impl FnOnce(&mut Usage)) {
        let cap = self.cap;
        let low = self.low_watermark();
        self.usage.send_modify(|u| {
            f(u);
            if !u.paused && u.used() >= cap {
                u.paused = true;
                info!(
                    cache_bytes = u.stored,
                    queued_bytes = u.reserved,
                    cache_max_bytes = cap,
                    "cache full: backpressure on, agent streams paused until applied segments are trimmed"
                );
            } else if u.paused && u.used() < low {
                u.paused = false;
                info!(
                    cache_bytes = u.stored,
                    cache_max_bytes = cap,
                    "cache below its cap: backpressure off, agent streams resumed"
                );
            }
        });
    }
}

/// A frame's bytes counted against the cap until the writer takes them;
/// dropped unused (a refused frame, a stream that ends while frames are
/// still prepared), it gives them back.
#[derive(Debug)]
pub struct Reservation {
    /// `None` once handed to the writer.
    account: Option<Arc<Account>>,
    bytes: u64,
}

impl Reservation {
    pub fn new(account: &Arc<Account>, bytes: u64) -> Reservation {
        account.reserve(bytes);
        Reservation {
            account: Some(account.clone()),
            bytes,
        }
    }
    /// Hands the reservation to the writer, which releases it once stored.
    pub fn into_writer(mut self) -> u64 {
        self.account = None;
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(account) = &self.account {
            account.release(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_bytes_count_against_the_cap_but_are_not_cache_bytes() {
        let small = Account::new(160);
        small.reserve(100);
        assert!(!small.is_full());
        small.add(60);
        assert!(small.is_full());
        assert_eq!(small.total(), 60);
        // Backpressure ends below the low watermark (150), not at the cap.
        small.release(5);
        assert!(small.is_full());
        small.release(10);
        assert!(!small.is_full());
    }

    #[test]
    fn a_reservation_dropped_unused_gives_its_bytes_back() {
        let account = Arc::new(Account::new(100));
        let r = Reservation::new(&account, 100);
        assert!(account.is_full());
        drop(r);
        assert!(!account.is_full());
        let r = Reservation::new(&account, 100);
        assert_eq!(r.into_writer(), 100);
        assert!(account.is_full(), "the writer releases it once stored");
    }
}
