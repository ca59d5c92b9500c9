//! The cache's size cap, its fair sharing between replications, and the
//! backpressure both drive (DESIGN.md §6: "when the cache is full it stops
//! acknowledging, the agent's buffer fills, and the agent goes to bitmap
//! mode").
//!
//! One [`Account`] counts the segment bytes of every replication against
//! the cap; each replication holds its [`Share`] of it. A replication's
//! ingest stream stops reading when
//! - the whole cache reached the cap (until trimming brings it below the
//!   low watermark, cap - cap/16, so it does not flap on every trim);
//! - the cache is past half its cap and the replication holds its fair
//!   share, cap / replications (until it is back under 15/16 of it or the
//!   cache under its low half). Below half the cap anyone grows, so a lone
//!   busy replication uses the whole cache; above it a replication whose
//!   master target is down or slow stops at its share instead of filling
//!   the cache and pausing every other agent. Every replication the cache
//!   knows counts, idle or not: one whose agent is away for a while (or
//!   reconnecting) still finds its share free. A replication created while
//!   the cache is already at its cap waits for trimming like everyone;
//! - a writer found the cache's disk full ([`Share::set_disk_full`]):
//!   every replication shares that disk, so every stream pauses until the
//!   writer's retry succeeds.
//!
//! A frame read from a stream holds a [`Reservation`] of its size until the
//! writer has stored it, so frames queued for the writer count too.

use rebound_common::link_error::report::EventSink;
use rebound_proto::control::Event;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{info, warn};

/// Segment bytes of all replications, and frames on their way in, against
/// the cap.
#[derive(Debug)]
pub struct Account {
    cap: u64,
    usage: watch::Sender<Usage>,
    /// Where the cache's events go: the control channel, once it runs.
    events: EventSink,
    /// Numbers each [`Share`], so a replication removed and added again
    /// does not count what its old handles still release.
    generations: AtomicU64,
}

#[derive(Debug, Clone, Default)]
struct Usage {
    /// Bytes of segment files.
    stored: u64,
    /// Bytes of frames read and not yet stored.
    reserved: u64,
    /// Backpressure is on for everyone: the cache is at its cap.
    paused: bool,
    /// Every replication's part, by id.
    reps: BTreeMap<String, Part>,
    /// Replications whose writer waits for space on the cache's disk.
    disk_full: BTreeSet<String>,
}

/// One replication's bytes, and whether it holds its fair share.
#[derive(Debug, Clone, Copy, Default)]
struct Part {
    /// The generation of the [`Share`] that counts here.
    generation: u64,
    stored: u64,
    reserved: u64,
    over_share: bool,
}

impl Part {
    fn used(&self) -> u64 {
        self.stored.saturating_add(self.reserved)
    }
}

impl Usage {
    fn used(&self) -> u64 {
        self.stored.saturating_add(self.reserved)
    }
    /// Whether replication `id`'s stream must not be read now.
    fn paused_for(&self, id: &str) -> bool {
        self.paused || !self.disk_full.is_empty() || self.reps.get(id).is_some_and(|p| p.over_share)
    }
}

/// Below this the cache takes frames of any replication.
fn fair_from(cap: u64) -> u64 {
    cap / 2
}

/// The fair share of each of `n` replications.
fn fair_share(cap: u64, n: usize) -> u64 {
    cap / n.max(1) as u64
}

/// Where backpressure ends: 15/16 of `limit`.
fn low(limit: u64) -> u64 {
    limit - limit / 16
}

impl Account {
    pub fn new(cap: u64) -> Account {
        Account {
            cap,
            usage: watch::Sender::new(Usage::default()),
            events: EventSink::default(),
            generations: AtomicU64::new(0),
        }
    }
    pub fn cap(&self) -> u64 {
        self.cap
    }
    /// Bytes of all segment files.
    pub fn total(&self) -> u64 {
        self.usage.borrow().stored
    }
    /// Whether backpressure is on for every replication: stored plus
    /// reserved bytes reached the cap and have not yet dropped below the
    /// low watermark.
    pub fn is_full(&self) -> bool {
        self.usage.borrow().paused
    }
    /// Resolves once the cache as a whole is below its cap again.
    pub async fn wait_below_cap(&self) {
        let mut rx = self.usage.subscribe();
        let _ = rx.wait_for(|u| !u.paused).await;
    }
    /// Whether a writer waits for space on the cache's disk.
    pub fn is_disk_full(&self) -> bool {
        !self.usage.borrow().disk_full.is_empty()
    }
    /// Sends the cache's events to `events` from now on.
    pub fn set_events(&self, events: rebound_common::control::ControlHandle) {
        self.events.set(events);
    }

    /// Adds replication `id` to the account (its share is created empty).
    pub(super) fn share(self: &Arc<Self>, id: &str) -> Arc<Share> {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        self.update(|u| {
            let part = Part {
                generation,
                ..Part::default()
            };
            u.reps.insert(id.to_string(), part);
        });
        Arc::new(Share {
            account: self.clone(),
            id: id.to_string(),
            generation,
        })
    }

    /// Forgets replication `id` and its bytes (its files were deleted).
    pub(super) fn forget(&self, id: &str) {
        self.update(|u| {
            if let Some(p) = u.reps.remove(id) {
                u.stored = u.stored.saturating_sub(p.stored);
                u.reserved = u.reserved.saturating_sub(p.reserved);
            }
            u.disk_full.remove(id);
        });
    }

    fn update(&self, f: impl FnOnce(&mut Usage)) {
        let cap = self.cap;
        self.usage.send_modify(|u| {
            f(u);
            let used = u.used();
            if !u.paused && used >= cap {
                u.paused = true;
                info!(
                    cache_bytes = u.stored,
                    queued_bytes = u.reserved,
                    cache_max_bytes = cap,
                    "cache full: backpressure on, agent streams paused until applied segments are trimmed"
                );
            } else if u.paused && used < low(cap) {
                u.paused = false;
                info!(
                    cache_bytes = u.stored,
                    cache_max_bytes = cap,
                    "cache below its cap: backpressure off, agent streams resumed"
                );
            }
            let share = fair_share(cap, u.reps.len());
            let n = u.reps.len();
            for (id, p) in &mut u.reps {
                let over = if p.over_share {
                    used >= low(fair_from(cap)) && p.used() >= low(share)
                } else {
                    used >= fair_from(cap) && p.used() >= share
                };
                if over && !p.over_share {
                    warn!(
                        replication = %id,
                        replication_cache_bytes = p.used(),
                        fair_share_bytes = share,
                        cache_bytes = used,
                        cache_max_bytes = cap,
                        replications = n,
                        "the replication holds its fair share of the cache: its agent stream is paused until its master target applies and the cache trims (the other replications go on); if this lasts, check its master target"
                    );
                } else if !over && p.over_share {
                    info!(
                        replication = %id,
                        replication_cache_bytes = p.used(),
                        fair_share_bytes = share,
                        "the replication is back under its fair share of the cache: its agent stream resumed"
                    );
                }
                p.over_share = over;
            }
        });
    }
}

/// A replication's part of the [`Account`]: its bytes count against the
/// cap and against its fair share, and its stream is paused on either.
#[derive(Debug)]
pub struct Share {
    account: Arc<Account>,
    id: String,
    generation: u64,
}

/// Which bytes of a replication's part a change counts.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Frames read and not yet stored.
    Reserved,
    /// Segment files.
    Stored,
}

impl Share {
    /// The account of the whole cache.
    pub fn account(&self) -> &Arc<Account> {
        &self.account
    }
    /// Whether this replication's stream must not be read now: the cache
    /// is at its cap, this replication holds its fair share past half the
    /// cap, or the cache's disk is full.
    pub fn is_full(&self) -> bool {
        self.account.usage.borrow().paused_for(&self.id)
    }
    /// Resolves once this replication's stream may be read again.
    pub async fn wait_below_cap(&self) {
        let mut rx = self.account.usage.subscribe();
        let _ = rx.wait_for(|u| !u.paused_for(&self.id)).await;
    }
    /// Counts `n` bytes of a frame that is on its way to the writer.
    fn reserve(&self, n: u64) {
        self.count(Kind::Reserved, n, true);
    }
    /// Drops a reservation (the frame was stored, dropped or refused).
    pub(super) fn release(&self, n: u64) {
        self.count(Kind::Reserved, n, false);
    }
    /// Counts `n` bytes that reached a segment file.
    pub(super) fn add(&self, n: u64) {
        self.count(Kind::Stored, n, true);
    }
    /// Forgets `n` bytes of deleted segment files.
    pub(super) fn sub(&self, n: u64) {
        self.count(Kind::Stored, n, false);
    }
    /// Adds (`more`) or takes away `n` bytes of `kind` in this
    /// replication's part and in the totals; nothing once the replication
    /// left the account (or was added again: a newer share counts there).
    fn count(&self, kind: Kind, n: u64, more: bool) {
        let step = |v: &mut u64| {
            *v = if more {
                v.saturating_add(n)
            } else {
                v.saturating_sub(n)
            }
        };
        self.account.update(|u| {
            let Some(p) = u.reps.get_mut(&self.id) else {
                return;
            };
            if p.generation != self.generation {
                return;
            }
            match kind {
                Kind::Reserved => {
                    step(&mut p.reserved);
                    step(&mut u.reserved);
                }
                Kind::Stored => {
                    step(&mut p.stored);
                    step(&mut u.stored);
                }
            }
        });
    }
    /// Marks the cache's disk full (every stream pauses) or, once this
    /// replication's writer stored again, no longer full for it.
    pub(super) fn set_disk_full(&self, full: bool) {
        self.account.update(|u| {
            if full {
                u.disk_full.insert(self.id.clone());
            } else {
                u.disk_full.remove(&self.id);
            }
        });
    }
    /// Sends `ev` to the control channel (when one runs).
    pub(super) fn event(&self, severity: &str, kind: &str, message: String) {
        if let Some(h) = self.account.events.get() {
            h.event(Event {
                severity: severity.into(),
                kind: kind.into(),
                message,
                replication_id: self.id.clone(),
                ..Event::default()
            });
        }
    }
}

/// A frame's bytes counted against the cap until the writer takes them;
/// dropped unused (a refused frame, a stream that ends while frames are
/// still prepared), it gives them back.
#[derive(Debug)]
pub struct Reservation {
    /// `None` once handed to the writer.
    share: Option<Arc<Share>>,
    bytes: u64,
}

impl Reservation {
    pub fn new(share: &Arc<Share>, bytes: u64) -> Reservation {
        share.reserve(bytes);
        Reservation {
            share: Some(share.clone()),
            bytes,
        }
    }
    /// Hands the reservation to the writer, which releases it once stored.
    pub fn into_writer(mut self) -> u64 {
        self.share = None;
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(share) = &self.share {
            share.release(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_bytes_count_against_the_cap_but_are_not_cache_bytes() {
        let small = Arc::new(Account::new(160));
        let r = small.share("r");
        r.reserve(100);
        assert!(!small.is_full());
        r.add(60);
        assert!(small.is_full());
        assert!(r.is_full());
        assert_eq!(small.total(), 60);
        // Backpressure ends below the low watermark (150), not at the cap.
        r.release(5);
        assert!(small.is_full());
        r.release(10);
        assert!(!small.is_full());
        assert!(!r.is_full(), "a lone replication may use the whole cap");
    }

    #[test]
    fn a_reservation_dropped_unused_gives_its_bytes_back() {
        let account = Arc::new(Account::new(100));
        let share = account.share("r");
        let r = Reservation::new(&share, 100);
        assert!(account.is_full());
        drop(r);
        assert!(!account.is_full());
        let r = Reservation::new(&share, 100);
        assert_eq!(r.into_writer(), 100);
        assert!(account.is_full(), "the writer releases it once stored");
    }

    #[test]
    fn past_half_the_cap_a_replication_stops_at_its_fair_share() {
        let account = Arc::new(Account::new(1600));
        let (stuck, busy, idle) = (account.share("a"), account.share("b"), account.share("c"));
        // Below half the cap anyone grows, even past its share (533).
        stuck.add(700);
        assert!(!stuck.is_full());
        // Past half the cap the one over its share pauses, alone.
        busy.add(100);
        assert!(stuck.is_full());
        assert!(!busy.is_full() && !idle.is_full());
        busy.add(400);
        assert!(!busy.is_full());
        busy.add(100);
        assert!(busy.is_full(), "b holds its share (533) past half the cap");
        assert!(!idle.is_full(), "the idle replication still has its share");
        // b's MT applies: b resumes once under 15/16 of its share (500).
        busy.sub(50);
        assert!(busy.is_full());
        busy.sub(60);
        assert!(!busy.is_full());
        // Forgetting a replication gives its share to the others and its
        // bytes back.
        account.forget("c");
        assert!(!stuck.is_full(), "a holds 700 of an 800 share now");
        assert_eq!(account.total(), 1190);
        stuck.add(200);
        assert!(stuck.is_full());
        // c added again: what its old share still releases is not counted.
        let again = account.share("c");
        idle.add(300);
        assert_eq!(account.total(), 1390);
        again.add(10);
        assert_eq!(account.total(), 1400);
    }

    #[test]
    fn a_full_disk_pauses_every_replication_until_its_writer_stores_again() {
        let account = Arc::new(Account::new(1 << 30));
        let (a, b) = (account.share("a"), account.share("b"));
        a.set_disk_full(true);
        assert!(account.is_disk_full());
        assert!(a.is_full() && b.is_full());
        b.set_disk_full(false);
        assert!(
            b.is_full(),
            "only the writer that found the disk full clears it"
        );
        a.set_disk_full(false);
        assert!(!a.is_full() && !b.is_full());
    }
}
