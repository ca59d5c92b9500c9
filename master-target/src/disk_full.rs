//! Apply on a full disk (DESIGN.md §7): a cycle whose write fails with
//! ENOSPC (or EDQUOT) is not an error the process server should see and
//! resend at once. The replication says once that its disk is full (an
//! error log and a `disk-full` event naming it, the path and the bytes
//! needed), acknowledges nothing more, keeps the frames it holds and
//! retries the same cycle when the filesystem has room for it again, and
//! at the latest after a delay that doubles from [`RETRY_MIN`] to
//! [`RETRY_MAX`]. Meanwhile the stream stops reading (its read-ahead
//! budget is full), so the process server's cache is the buffer.
//!
//! A failed cycle leaves nothing behind that a retry would stack on: the
//! journal's partial append is cut and the state is rebuilt from disk (see
//! `apply`). Each replication waits on its own, without its lock, so
//! views go on and other replications apply as far as their space allows.

use crate::apply::Prepared;
use crate::error::{MtError, Result};
use crate::replication::Replication;
use rebound_common::sys::available_bytes;
use std::time::{Duration, Instant};
use tracing::{debug, error, info};

/// How often a waiting apply looks at the free space and whether its
/// stream ended.
const POLL: Duration = Duration::from_millis(500);
/// The first delay before a cycle is retried even though the free space
/// looks too small (the need is an upper bound); it doubles up to
/// [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Room for `applied.seq`, `state.json` and the catalog besides the
/// cycle's own data.
const SLACK: u64 = 1 << 20;

/// Why and since when a replication's apply waits for space.
#[derive(Debug, Clone)]
pub(crate) struct DiskFull {
    since: Instant,
    needed: u64,
    error: String,
    retries: u64,
}

impl Replication {
    /// Applies `frames` as [`Replication::apply_prepared`] does; while a
    /// cycle fails for want of space it waits for space and retries (see
    /// the module doc) until it succeeds, fails otherwise, or `ended()`
    /// says the stream is gone (then the last error is returned).
    pub(crate) fn apply_waiting_for_space(
        &self,
        frames: Vec<Prepared>,
        ended: &dyn Fn() -> bool,
    ) -> (u64, Result<()>) {
        let needed = frames
            .iter()
            .map(Prepared::space_needed)
            .fold(SLACK, u64::saturating_add);
        let mut retry_in = RETRY_MIN;
        // A new stream of a replication that is waiting already does not
        // try at once either.
        if self.disk_full().is_some() && !self.wait_for_space(needed, retry_in, ended) {
            return (self.applied_seq(), Ok(()));
        }
        loop {
            let (applied, r) = self.apply_prepared(frames.iter().cloned().map(Ok).collect());
            let e = match r {
                Err(e) if e.is_no_space() => e,
                other => {
                    self.space_returned();
                    return (applied, other);
                }
            };
            self.note_disk_full(&e, needed);
            if !self.wait_for_space(needed, retry_in, ended) {
                return (applied, Err(e));
            }
            retry_in = (retry_in * 2).min(RETRY_MAX);
        }
    }

    /// Why apply waits for space, if it does.
    pub fn disk_full_cause(&self) -> Option<String> {
        self.disk_full().map(|d| d.error)
    }

    /// Waits until the filesystem of the replication has `needed` bytes
    /// free or `max` has passed (true), or the stream ended (false).
    fn wait_for_space(&self, needed: u64, max: Duration, ended: &dyn Fn() -> bool) -> bool {
        let start = Instant::now();
        loop {
            std::thread::sleep(POLL);
            if ended() {
                return false;
            }
            if start.elapsed() >= max {
                return true;
            }
            if available_bytes(self.root()).is_ok_and(|free| free >= needed) {
                return true;
            }
        }
    }

    /// A cycle failed for want of space: said once (log and event) per
    /// episode, then only counted.
    fn note_disk_full(&self, e: &MtError, needed: u64) {
        let mut state = self.disk_full_slot();
        if let Some(d) = state.as_mut() {
            d.retries += 1;
            debug!(replication = %self.id(), retries = d.retries, error = %e, "still no space to apply");
            return;
        }
        let root = self.root().display().to_string();
        let free = available_bytes(self.root())
            .map_or_else(|e| format!("unknown ({e})"), |b| b.to_string());
        let msg = format!(
            "replication {} of {} cannot apply: the master target's disk is full ({e}); the frames waiting need about {needed} bytes and {free} bytes are free on the filesystem of {root}; nothing more is acknowledged (the process server keeps the frames) and apply resumes by itself once there is space: free space there, or lower the retention (max_bytes) of the replications on it",
            self.id(),
            self.machine_id()
        );
        error!(replication = %self.id(), event = "disk-full", path = %root, needed, free = %free, "{msg}");
        self.events().error("disk-full", self.id(), msg.clone());
        *state = Some(DiskFull {
            since: Instant::now(),
            needed,
            error: msg,
            retries: 0,
        });
    }

    /// A cycle succeeded (or failed otherwise): a disk-full episode ends.
    fn space_returned(&self) {
        let Some(d) = self.disk_full_slot().take() else {
            return;
        };
        let msg = format!(
            "replication {}: space returned on the master target's disk after {} s ({} retries); apply resumed",
            self.id(),
            d.since.elapsed().as_secs(),
            d.retries
        );
        info!(replication = %self.id(), event = "disk-space-returned", needed = d.needed, "{msg}");
        self.events().info("disk-space-returned", self.id(), msg);
    }
}
