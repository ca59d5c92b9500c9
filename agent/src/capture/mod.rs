//! Write capture: what turns a protected disk's writes into the change
//! stream (DESIGN.md §4, §5 "Write path", "Modes", "Resync source").
//!
//! [`Capture`] is the composition the NBD front end ([`crate::disk`]), the
//! sender, the resync driver and the control plane call. Its state sits
//! behind one lock, the replication's ordering point, and is made of parts
//! that each live in the module named after them:
//! - [`ordering_point`]: seq assignment and the write path's steps in order;
//! - [`change_buffer`]: the bounded buffer of data-mode records, as frames;
//! - [`dirty_extents`]: which extents the dirty-extent log keeps set;
//! - [`mode`]: data or bitmap mode and the extents missing from the stream;
//! - [`resync_window`]: resync windows and copies under the ordering point;
//! - [`stats`]: counters and the status snapshot;
//! - [`snapshot_hash`]: a verify's chunk hashes as they were at its tag.
//!
//! The callers reach the parts through small views: [`Capture::stream`]
//! (the sender's end), [`Capture::resync`], [`Capture::dirty_extents`] and
//! [`Capture::hold`].

mod change_buffer;
mod dirty_extents;
mod hold;
mod mode;
mod ordering_point;
mod resync_window;
mod snapshot_hash;
mod stats;
mod stream;

use std::sync::{Arc, Mutex, MutexGuard};

use rebound_common::chunk::EXTENT_SIZE;
use rebound_common::nbd::NbdError;
use thiserror::Error;
use tokio::sync::{watch, Notify};
use tracing::warn;

pub use change_buffer::{PendingFrame, FRAME_TARGET, IDLE_FLUSH, MAX_FRAME_AGE, MAX_RECORD_DATA};
pub use dirty_extents::DirtyExtents;
pub use hold::WriteHold;
pub use mode::Mode;
pub use resync_window::{Batch, ResyncWindow, WindowEnd};
pub use snapshot_hash::{SnapshotError, SnapshotHash};
pub use stats::Snapshot;
pub use stream::{ResumeOutcome, StreamEnd};

use crate::dirty_log::DirtyLog;
use crate::disk::Disk;
use crate::frame_pool::FramePool;
use crate::metrics::PointsByKind;
use change_buffer::ChangeBuffer;
use dirty_extents::ExtentMap;
use mode::Modes;
use ordering_point::{Change, Order};
use stats::Stats;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum TagError {
    #[error("the stream position is not known yet: the agent has not reached the process server since it started")]
    NotConnected,
    #[error("no recovery point can be cut now: the agent is in {0} mode and changes are missing from the stream until the resync finishes")]
    Inconsistent(&'static str),
    #[error("writes are fenced (the agent is stopping)")]
    Fenced,
}

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("the change stream is not running (not connected yet, or stopping)")]
    NotStreaming,
    #[error("reading disk {disk} at offset {offset}: {source}")]
    Read {
        disk: String,
        offset: u64,
        source: std::io::Error,
    },
}

/// What the ordering point's lock covers.
struct State {
    order: Order,
    buffer: ChangeBuffer,
    extents: ExtentMap,
    modes: Modes,
    stats: Stats,
    /// The resync copy's read buffer, kept between copies.
    read_buf: Vec<u8>,
    /// A verify's hashes at its tag: writes hash what they change first.
    snapshot: Option<Arc<snapshot_hash::SnapshotHash>>,
}

impl State {
    /// Every change is in the stream and its position is known.
    fn is_consistent(&self) -> bool {
        self.order.is_known() && self.modes.is_complete()
    }
}

/// The write capture of one machine: its ordering point and change buffer.
pub struct Capture {
    rid: Mutex<String>,
    hold: WriteHold,
    disks: Vec<Arc<Disk>>,
    dlog: Arc<DirtyLog>,
    state: Mutex<State>,
    /// Wakes the sender: a frame is ready, or a partial frame was started.
    wake: Notify,
    durable: watch::Sender<u64>,
    /// Bodies of acknowledged frames, reused for new ones.
    pool: Arc<FramePool>,
    /// Tags cut since the agent started, by kind (`rebound_agent_points_total`).
    points: PointsByKind,
}

fn fenced_error() -> NbdError {
    NbdError::eperm("writes are fenced: the agent is stopping or failing over")
}

impl Capture {
    pub fn new(
        rid: &str,
        disks: Vec<Arc<Disk>>,
        dlog: Arc<DirtyLog>,
        buffer_limit: u64,
    ) -> Capture {
        let extents: Vec<u64> = disks
            .iter()
            .map(|d| d.size().div_ceil(EXTENT_SIZE))
            .collect();
        let state = State {
            order: Order::new(),
            buffer: ChangeBuffer::new(buffer_limit),
            extents: ExtentMap::new(&extents),
            modes: Modes::new(&extents),
            stats: Stats::default(),
            read_buf: Vec::new(),
            snapshot: None,
        };
        Capture {
            rid: Mutex::new(rid.to_string()),
            hold: WriteHold::default(),
            disks,
            dlog,
            state: Mutex::new(state),
            wake: Notify::new(),
            durable: watch::channel(0).0,
            pool: Arc::new(FramePool::default()),
            points: PointsByKind::default(),
        }
    }

    /// The tags cut since the agent started, by kind, for the metrics registry.
    pub fn points_cut(&self) -> &PointsByKind {
        &self.points
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn replication_id(&self) -> String {
        self.rid.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn disks(&self) -> &[Arc<Disk>] {
        &self.disks
    }

    /// The write hold (consistency-group barrier, app tag).
    pub fn hold(&self) -> &WriteHold {
        &self.hold
    }

    fn disk(&self, disk: u32) -> Result<&Arc<Disk>, NbdError> {
        self.disks
            .get(disk as usize)
            .ok_or_else(|| NbdError::einval(format!("no disk {disk}")))
    }

    /// NBD WRITE (DESIGN.md §5 "Write path", steps 1–4).
    pub fn write(&self, disk: u32, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        if data.is_empty() {
            return Ok(());
        }
        self.modify(disk, offset, data.len() as u64, Change::Write(data))?;
        self.sync_if(fua, disk)
    }

    /// NBD TRIM and WRITE_ZEROES: the range reads as zeroes afterwards and a
    /// `Zero` record goes into the stream.
    pub fn zero(&self, disk: u32, offset: u64, len: u64, fua: bool) -> Result<(), NbdError> {
        if len == 0 {
            return Ok(());
        }
        self.modify(disk, offset, len, Change::Zero)?;
        self.sync_if(fua, disk)
    }

    /// FUA: fdatasync of the backing disk before the acknowledgement.
    fn sync_if(&self, fua: bool, disk: u32) -> Result<(), NbdError> {
        if !fua {
            return Ok(());
        }
        let d = self.disk(disk)?;
        d.sync()
            .map_err(|e| NbdError::from_io(&e, format!("fdatasync of disk {}", d.name)))
    }

    /// Stops accepting writes: later writes get EPERM.
    pub fn fence(&self) {
        self.lock().order.fenced = true;
    }

    /// Accepts writes again after [`Capture::fence`].
    pub fn unfence(&self) {
        self.lock().order.fenced = false;
    }

    pub fn is_fenced(&self) -> bool {
        self.lock().order.fenced
    }

    /// Starts a new stream for replication `rid` (the configuration server
    /// moved this agent to another replication/PS): drops the change buffer
    /// and the stream position (the new PS says where to resume), resets
    /// the dirty log's durable mark and marks every disk for a differential
    /// resync against the new target replica.
    pub fn switch_replication(&self, rid: &str) {
        *self.rid.lock().unwrap_or_else(|p| p.into_inner()) = rid.to_string();
        let mut st = self.lock();
        st.buffer.reset(0);
        st.order.forget();
        st.modes.restart();
        st.extents.forget_seqs();
        st.modes.mark_need_all("initial");
        // Under the state lock, so no durable seq of the old stream is
        // noted after it. Kept, the old mark would make the new stream's
        // low resume look like a loss of acknowledged records.
        if let Err(e) = self.dlog.reset_durable_mark() {
            warn!(
                replication = rid,
                path = %self.dlog.path().display(),
                "cannot reset the dirty log's durable mark after the switch: {e}; the next fresh stream may resync every disk once more (harmless, only slower)"
            );
        }
        drop(st);
        self.durable.send_replace(0);
    }

    pub fn mode(&self) -> Mode {
        self.lock().modes.mode()
    }

    pub fn is_consistent(&self) -> bool {
        self.lock().is_consistent()
    }
}

#[cfg(test)]
pub(crate) mod tests;
