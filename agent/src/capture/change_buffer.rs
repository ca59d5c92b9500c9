//! The change buffer: data-mode records not yet durable at the PS, bounded
//! (DESIGN.md §5 "Modes", default 256 MiB).
//!
//! The buffer holds records already encoded into frame bodies
//! ([`FrameBuilder`]), so write data is copied exactly once, from the NBD
//! request into the frame. The sender takes whole builders, seals them
//! outside the lock and keeps them until the process server says they are
//! durable; the bytes stay counted here until then.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rebound_common::frame::FrameBuilder;

use crate::frame_pool::FramePool;

/// A frame is handed to the sender once its body reaches this size.
pub const FRAME_TARGET: usize = 2 << 20;
/// Writes larger than this are split into several records (same critical
/// section, consecutive seqs), so frames stay well below 4 MiB.
pub const MAX_RECORD_DATA: usize = 1 << 20;
/// A partial frame is handed over after this long without appends ...
pub const IDLE_FLUSH: Duration = Duration::from_millis(5);
/// ... or once it is this old, so latency stays low under a trickle.
pub const MAX_FRAME_AGE: Duration = Duration::from_millis(20);

/// Records not yet handed to the sender, as an unsealed frame.
#[derive(Debug)]
pub struct PendingFrame {
    pub builder: FrameBuilder,
    pub started: Instant,
    last_append: Instant,
}

pub(super) struct ChangeBuffer {
    open: Option<PendingFrame>,
    ready: VecDeque<PendingFrame>,
    /// Frame bytes not yet durable at the PS (handed over or not).
    bytes: u64,
    limit: u64,
    /// Last seq the PS holds durably.
    pub durable_seq: u64,
    /// First seq and start time of every frame not yet fully durable.
    frame_starts: VecDeque<(u64, Instant)>,
}

impl ChangeBuffer {
    pub fn new(limit: u64) -> ChangeBuffer {
        ChangeBuffer {
            open: None,
            ready: VecDeque::new(),
            bytes: 0,
            limit,
            durable_seq: 0,
            frame_starts: VecDeque::new(),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether `encoded` more bytes fit under the limit.
    pub fn fits(&self, encoded: u64) -> bool {
        self.bytes + encoded <= self.limit
    }

    /// Appends the record with `seq` through `f`, opening a frame for
    /// replication `rid` (body from `pool`) when none is open. True when
    /// the sender should wake: the record started a frame or completed one.
    pub fn append(
        &mut self,
        seq: u64,
        rid: impl FnOnce() -> String,
        pool: &FramePool,
        f: impl FnOnce(&mut FrameBuilder),
    ) -> bool {
        let now = Instant::now();
        let mut wake = false;
        if self.open.is_none() {
            self.frame_starts.push_back((seq, now));
            wake = true;
        }
        let open = self.open.get_or_insert_with(|| PendingFrame {
            builder: FrameBuilder::with_body(&rid(), seq, pool.take()),
            started: now,
            last_append: now,
        });
        let before = open.builder.len();
        f(&mut open.builder);
        open.last_append = now;
        self.bytes += (open.builder.len() - before) as u64;
        if open.builder.len() >= FRAME_TARGET {
            self.flush();
            wake = true;
        }
        wake
    }

    /// Frames ready for the sender, plus the partial frame when it has been
    /// idle long enough (or `force`). The flag says a partial frame remains.
    pub fn take(&mut self, force: bool) -> (Vec<PendingFrame>, bool) {
        let mut out: Vec<PendingFrame> = self.ready.drain(..).collect();
        let now = Instant::now();
        let take_open = self.open.as_ref().is_some_and(|o| {
            force
                || now.duration_since(o.last_append) >= IDLE_FLUSH
                || now.duration_since(o.started) >= MAX_FRAME_AGE
        });
        if take_open {
            out.extend(self.open.take());
        }
        (out, self.open.is_some())
    }

    /// Makes the partial frame ready now.
    pub fn flush(&mut self) {
        if let Some(o) = self.open.take() {
            self.ready.push_back(o);
        }
    }

    /// Drops every record; the PS holds the stream up to `durable`.
    pub fn reset(&mut self, durable: u64) {
        self.open = None;
        self.ready.clear();
        self.frame_starts.clear();
        self.bytes = 0;
        self.durable_seq = durable;
    }

    /// `freed` bytes of frames are no longer needed.
    pub fn free(&mut self, freed: u64) {
        self.bytes = self.bytes.saturating_sub(freed);
    }

    /// The PS holds everything up to `durable`; `next_seq` is the seq the
    /// next record gets. A durable seq outside the stream is ignored.
    pub fn set_durable(&mut self, durable: u64, next_seq: u64) {
        if durable > self.durable_seq && durable < next_seq {
            self.durable_seq = durable;
        }
        while self.frame_starts.len() >= 2 && self.frame_starts[1].0 <= self.durable_seq + 1 {
            self.frame_starts.pop_front();
        }
        if self.durable_seq + 1 >= next_seq {
            self.frame_starts.clear();
        }
    }

    /// Age of the oldest record the PS does not hold yet, `last` being the
    /// last seq assigned.
    pub fn lag(&self, now: Instant, last: u64) -> Duration {
        match self.frame_starts.front() {
            Some((_, t)) if self.durable_seq < last => now.duration_since(*t),
            _ => Duration::ZERO,
        }
    }
}
