//! Counters and the status snapshot the admin socket, the control plane
//! and the summary log report (DESIGN.md §5: mode, buffer fill and lag;
//! INTERFACES.md "Agent local admin socket").

use std::time::Instant;

use serde::Serialize;

use super::mode::Mode;
use super::Capture;

/// Running totals since the agent started.
#[derive(Default)]
pub(super) struct Stats {
    pub resync_bytes: u64,
    pub resync_chunks: u64,
    pub bytes_captured: u64,
}

/// The status fields (INTERFACES.md "Agent local admin socket").
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub mode: Mode,
    /// Last seq assigned (0 = none yet).
    pub seq: u64,
    pub durable_seq: u64,
    pub buffer_bytes: u64,
    pub buffer_limit: u64,
    pub dirty_extents: u64,
    pub resync_bytes_sent: u64,
    pub resync_chunks_sent: u64,
    pub bytes_captured: u64,
    pub last_tag: String,
    /// Extents waiting for (or inside) a resync window.
    pub resync_pending_extents: u64,
    /// Age of the oldest change the PS does not hold yet (the RPO), ms.
    pub lag_ms: u64,
    /// Every change is in the stream (no pending resync, data mode).
    pub consistent: bool,
    /// Seq of the tag cut after the last resync window (0 = none).
    #[serde(skip)]
    pub window_end_tag_seq: u64,
}

impl Capture {
    pub fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        let now = Instant::now();
        let last = st.order.last();
        let mut lag = st.buffer.lag(now, last);
        if let Some(t) = st.modes.missing_since() {
            lag = lag.max(now.duration_since(t));
        }
        Snapshot {
            mode: st.modes.mode(),
            seq: last,
            durable_seq: st.buffer.durable_seq,
            buffer_bytes: st.buffer.bytes(),
            buffer_limit: st.buffer.limit(),
            dirty_extents: self.dlog.count(),
            resync_bytes_sent: st.stats.resync_bytes,
            resync_chunks_sent: st.stats.resync_chunks,
            bytes_captured: st.stats.bytes_captured,
            last_tag: st.order.last_tag.clone(),
            resync_pending_extents: st.modes.pending(),
            lag_ms: lag.as_millis() as u64,
            consistent: st.is_consistent(),
            window_end_tag_seq: st.order.window_end_tag_seq,
        }
    }
}
