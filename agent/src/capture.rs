//! The machine's ordering point: seq assignment, the change buffer and the
//! modes (DESIGN.md §4 invariant, §5 "Write path" and "Modes").
//!
//! One mutex for the whole machine covers "pwrite + assign seq + append to
//! the change buffer", so the order of the stream equals the order in which
//! writes took effect on the disks, across all disks: every prefix of the
//! stream at a write boundary is a crash-consistent state. The only slow
//! step, syncing the dirty-extent log when an extent goes clean → dirty, runs
//! outside the mutex (the extent is marked in flight so it cannot be cleared
//! meanwhile).
//!
//! Durable order of a write: (1) every extent it touches is durably marked
//! in the dirty-extent log (set, pwrite, fdatasync shared with concurrent
//! setters) unless it already was; (2) pwrite of the data; (3) the record
//! into the change buffer; (4) the acknowledgement. A mark is cleared only
//! once every record touching the extent is durable at the PS and the extent
//! went cold ([`Capture::clear_cold_extents`]), so hot extents skip step 1.
//!
//! The change buffer holds records already encoded into frame bodies
//! ([`FrameBuilder`]), so write data is copied exactly once, from the NBD
//! request into the frame. The sender takes whole builders, seals them
//! outside the lock and keeps them until the process server says they are
//! durable.
//!
//! Modes: in data mode writes become records; in bitmap mode (buffer full,
//! PS unreachable too long, or the stream position not known yet) writes
//! only mark their extents as needing a resync. Leaving bitmap mode opens a
//! resync window over those extents ([`crate::resync`]); no tag is cut while
//! any change is missing from the stream.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rebound_common::chunk::{is_zero, EXTENT_SIZE, SUB_CHUNK_SIZE};
use rebound_common::frame::{FrameBuilder, Record, Tag, TagKind};
use rebound_common::nbd::NbdError;
use serde::Serialize;
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use crate::dirty_log::{Bitset, DirtyLog};
use crate::disk::Disk;
use crate::frame_pool::FramePool;
use crate::tags;

/// A frame is handed to the sender once its body reaches this size.
pub const FRAME_TARGET: usize = 2 << 20;
/// Writes larger than this are split into several records (same critical
/// section, consecutive seqs), so frames stay well below 4 MiB.
pub const MAX_RECORD_DATA: usize = 1 << 20;
/// A partial frame is handed over after this long without appends ...
pub const IDLE_FLUSH: Duration = Duration::from_millis(5);
/// ... or once it is this old, so latency stays low under a trickle.
pub const MAX_FRAME_AGE: Duration = Duration::from_millis(20);
/// When a sequential writer dirties a new extent, this many following clean
/// extents are marked in the same sync (DRBD-style activity-log look-ahead).
const LOOKAHEAD: u64 = 7;

/// What the agent does with new writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Data,
    Bitmap,
    Resync,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Data => "data",
            Mode::Bitmap => "bitmap",
            Mode::Resync => "resync",
        }
    }
}

/// Records not yet handed to the sender, as an unsealed frame.
#[derive(Debug)]
pub struct PendingFrame {
    pub builder: FrameBuilder,
    pub started: Instant,
    last_append: Instant,
}

#[derive(Debug, Error, PartialEq, Eq)]
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

/// How a reconnect's `resume_seq` fits the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeOutcome {
    /// First connection since start: the stream continues at resume + 1.
    Fresh,
    /// The buffer continues the PS's stream: re-send after resume.
    Continue,
    /// The PS's stream does not fit the buffer (it lost acknowledged data or
    /// is ahead of us): the buffer was dropped and a full resync is queued.
    Reset,
}

/// Extents taken into a resync window, per disk.
#[derive(Debug, Clone)]
pub struct Batch {
    pub reason: String,
    /// A full-disk resync (initial replication): completes initialisation.
    pub full: bool,
    /// This call opened the window (appended ResyncBegin).
    pub opened: bool,
    /// Last seq in the stream when the extents were taken: the replica's
    /// hashes for them must include at least this seq.
    pub min_seq: u64,
    pub disks: Vec<(u32, Vec<u64>)>,
}

/// A closed resync window.
#[derive(Debug, Clone)]
pub struct WindowEnd {
    pub reason: String,
    pub full: bool,
    pub end_seq: u64,
    pub tag: String,
    pub tag_seq: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub elapsed: Duration,
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

struct Window {
    reason: String,
    full: bool,
    started: Instant,
    bytes_at_start: u64,
    chunks_at_start: u64,
}

struct State {
    /// Seq of the next record; 0 = not known until the PS says resume_seq.
    next_seq: u64,
    recording: bool,
    fenced: bool,
    bitmap_since: Option<Instant>,
    window: Option<Window>,
    need: Vec<Bitset>,
    need_reason: Option<String>,
    need_full: bool,
    taken: Vec<Bitset>,
    /// Highest seq of a record touching each extent.
    hi_seq: Vec<Vec<u64>>,
    /// When each extent was last written, in seconds since `Capture::epoch`.
    last_write: Vec<Vec<u32>>,
    /// Extents whose dirty bit is being synced by a writer outside the lock.
    inflight: HashMap<(u32, u64), u32>,
    open: Option<PendingFrame>,
    ready: VecDeque<PendingFrame>,
    buffer_bytes: u64,
    durable_seq: u64,
    /// First seq and start time of every frame not yet fully durable.
    frame_starts: VecDeque<(u64, Instant)>,
    last_tag: String,
    last_tag_seq: u64,
    last_change_seq: u64,
    window_end_tag_seq: u64,
    resync_bytes: u64,
    resync_chunks: u64,
    bytes_captured: u64,
    /// The resync copy's read buffer, kept between copies (a fresh one per
    /// chunk cost page faults on every read).
    resync_buf: Vec<u8>,
}

/// The ordering point and change buffer of one machine.
pub struct Capture {
    rid: Mutex<String>,
    /// Token of the write hold in force (consistency-group barrier, app
    /// tag): new writes wait at the ordering point while it is set.
    hold: Mutex<Option<String>>,
    hold_cv: Condvar,
    disks: Vec<Arc<Disk>>,
    dlog: Arc<DirtyLog>,
    buffer_limit: u64,
    /// Origin of `State::last_write`.
    epoch: Instant,
    state: Mutex<State>,
    /// Wakes the sender: a frame is ready, or a partial frame was started.
    wake: Notify,
    durable: watch::Sender<u64>,
    /// Bodies of acknowledged frames, reused for new ones.
    pool: Arc<FramePool>,
}

enum Change<'a> {
    Write(&'a [u8]),
    Zero,
}

fn extents_of(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    offset / EXTENT_SIZE..=(offset + len.max(1) - 1) / EXTENT_SIZE
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
            next_seq: 0,
            recording: false,
            fenced: false,
            bitmap_since: None,
            window: None,
            need: extents.iter().map(|&n| Bitset::new(n)).collect(),
            need_reason: None,
            need_full: false,
            taken: extents.iter().map(|&n| Bitset::new(n)).collect(),
            hi_seq: extents.iter().map(|&n| vec![0; n as usize]).collect(),
            last_write: extents.iter().map(|&n| vec![0; n as usize]).collect(),
            inflight: HashMap::new(),
            open: None,
            ready: VecDeque::new(),
            buffer_bytes: 0,
            durable_seq: 0,
            frame_starts: VecDeque::new(),
            last_tag: String::new(),
            last_tag_seq: 0,
            last_change_seq: 0,
            window_end_tag_seq: 0,
            resync_bytes: 0,
            resync_chunks: 0,
            bytes_captured: 0,
            resync_buf: Vec::new(),
        };
        Capture {
            rid: Mutex::new(rid.to_string()),
            hold: Mutex::new(None),
            hold_cv: Condvar::new(),
            disks,
            dlog,
            buffer_limit,
            epoch: Instant::now(),
            state: Mutex::new(state),
            wake: Notify::new(),
            durable: watch::channel(0).0,
            pool: Arc::new(FramePool::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the sender takes wire buffers and gives back the bodies of
    /// acknowledged frames.
    pub fn frame_pool(&self) -> &Arc<FramePool> {
        &self.pool
    }

    pub fn replication_id(&self) -> String {
        self.rid.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn disks(&self) -> &[Arc<Disk>] {
        &self.disks
    }
    pub fn dirty_log(&self) -> &Arc<DirtyLog> {
        &self.dlog
    }
    pub fn buffer_limit(&self) -> u64 {
        self.buffer_limit
    }
    /// Notified when the sender has something to take.
    pub fn sender_wake(&self) -> &Notify {
        &self.wake
    }
    /// The PS's durable seq, as it changes.
    pub fn durable_watch(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    fn disk(&self, disk: u32) -> Result<&Arc<Disk>, NbdError> {
        self.disks
            .get(disk as usize)
            .ok_or_else(|| NbdError::einval(format!("no disk {disk}")))
    }

    // ------------------------------------------------------------ write path

    /// NBD WRITE (DESIGN.md §5 "Write path", steps 1–4).
    pub fn write(&self, disk: u32, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        if data.is_empty() {
            return Ok(());
        }
        self.modify(disk, offset, data.len() as u64, Change::Write(data))?;
        if fua {
            self.sync_disk(disk)?;
        }
        Ok(())
    }

    /// NBD TRIM and WRITE_ZEROES: the range reads as zeroes afterwards and a
    /// `Zero` record goes into the stream.
    pub fn zero(&self, disk: u32, offset: u64, len: u64, fua: bool) -> Result<(), NbdError> {
        if len == 0 {
            return Ok(());
        }
        self.modify(disk, offset, len, Change::Zero)?;
        if fua {
            self.sync_disk(disk)?;
        }
        Ok(())
    }

    fn sync_disk(&self, disk: u32) -> Result<(), NbdError> {
        let d = self.disk(disk)?;
        d.sync()
            .map_err(|e| NbdError::from_io(&e, format!("fdatasync of disk {}", d.name)))
    }

    fn modify(&self, disk: u32, offset: u64, len: u64, change: Change<'_>) -> Result<(), NbdError> {
        let d = self.disk(disk)?.clone();
        let exts = extents_of(offset, len);
        self.wait_hold();
        let mut st = self.lock();
        if st.fenced {
            return Err(NbdError::eperm(
                "writes are fenced: the agent is stopping or failing over",
            ));
        }
        // Step 1: the dirty-extent log, synced before the acknowledgement.
        let clean: Vec<u64> = exts
            .clone()
            .filter(|&e| !self.dlog.is_durably_set(disk, e))
            .collect();
        if !clean.is_empty() {
            for &e in &clean {
                *st.inflight.entry((disk, e)).or_insert(0) += 1;
            }
            let mut to_set = clean.clone();
            let first = *exts.start();
            let last = *exts.end();
            if first > 0 && self.dlog.is_set(disk, first - 1) {
                let n = self.dlog.extents(disk);
                to_set.extend(
                    (last + 1..=last + LOOKAHEAD).filter(|&e| e < n && !self.dlog.is_set(disk, e)),
                );
            }
            drop(st);
            let r = self.dlog.set_and_sync(disk, &to_set);
            st = self.lock();
            for &e in &clean {
                if let Some(c) = st.inflight.get_mut(&(disk, e)) {
                    *c -= 1;
                    if *c == 0 {
                        st.inflight.remove(&(disk, e));
                    }
                }
            }
            if let Err(e) = r {
                error!(disk = %d.name, offset, "cannot sync the dirty-extent log {}: {e}", self.dlog.path().display());
                return Err(NbdError::from_io(
                    &e,
                    format!("dirty-extent log {}", self.dlog.path().display()),
                ));
            }
            // The look-ahead extents count as just written, so the clear
            // loop keeps them for a sequential writer about to reach them.
            let now = self.epoch.elapsed().as_secs() as u32;
            if let Some(lw) = st.last_write.get_mut(disk as usize) {
                for &e in &to_set {
                    if let Some(t) = lw.get_mut(e as usize) {
                        *t = now;
                    }
                }
            }
            if st.fenced {
                return Err(NbdError::eperm(
                    "writes are fenced: the agent is stopping or failing over",
                ));
            }
        }
        // Step 2: the IO, inside the critical section (stream order = disk order).
        let io = match change {
            Change::Write(data) => d.write_at(data, offset),
            Change::Zero => d.zero_range(offset, len),
        };
        if let Err(e) = io {
            // Part of it may have reached the disk: make sure a resync covers it.
            Self::mark_need_locked(&mut st, disk, exts, "io-error");
            return Err(NbdError::from_io(
                &e,
                format!("disk {} at offset {offset}", d.name),
            ));
        }
        let now = self.epoch.elapsed().as_secs() as u32;
        if let Some(lw) = st.last_write.get_mut(disk as usize) {
            for e in exts.clone() {
                if let Some(t) = lw.get_mut(e as usize) {
                    *t = now;
                }
            }
        }
        // Step 3: the record (data mode) or only the mark (bitmap mode).
        self.record_locked(&mut st, disk, offset, len, &change, exts);
        Ok(())
    }

    fn record_locked(
        &self,
        st: &mut State,
        disk: u32,
        offset: u64,
        len: u64,
        change: &Change<'_>,
        exts: std::ops::RangeInclusive<u64>,
    ) {
        if !st.recording || st.next_seq == 0 {
            Self::mark_need_locked(st, disk, exts, "bitmap");
            return;
        }
        let encoded = match change {
            Change::Write(data) => {
                let pieces = data.len().div_ceil(MAX_RECORD_DATA) as u64;
                data.len() as u64 + 17 * pieces
            }
            Change::Zero => 21,
        };
        if st.buffer_bytes + encoded > self.buffer_limit {
            self.enter_bitmap_locked(
                st,
                &format!(
                    "the change buffer is full ({} of {} bytes)",
                    st.buffer_bytes, self.buffer_limit
                ),
            );
            Self::mark_need_locked(st, disk, exts, "bitmap");
            return;
        }
        let mut seq = 0;
        match change {
            Change::Write(data) => {
                for (i, piece) in data.chunks(MAX_RECORD_DATA).enumerate() {
                    let off = offset + (i * MAX_RECORD_DATA) as u64;
                    seq = self.push_locked(st, |b| b.push_write(disk, off, piece));
                }
                st.bytes_captured += data.len() as u64;
            }
            Change::Zero => {
                seq = self.push_locked(st, |b| b.push(&Record::Zero { disk, offset, len }));
            }
        }
        let hi = &mut st.hi_seq[disk as usize];
        for e in exts {
            if let Some(h) = hi.get_mut(e as usize) {
                *h = seq;
            }
        }
        st.last_change_seq = seq;
    }

    /// Appends one record through `f`; returns its seq.
    fn push_locked(&self, st: &mut State, f: impl FnOnce(&mut FrameBuilder)) -> u64 {
        let seq = st.next_seq;
        st.next_seq += 1;
        let now = Instant::now();
        if st.open.is_none() {
            st.frame_starts.push_back((seq, now));
            self.wake.notify_one();
        }
        let open = st.open.get_or_insert_with(|| PendingFrame {
            builder: FrameBuilder::with_body(&self.replication_id(), seq, self.pool.take()),
            started: now,
            last_append: now,
        });
        let before = open.builder.len();
        f(&mut open.builder);
        open.last_append = now;
        let grown = (open.builder.len() - before) as u64;
        let full = open.builder.len() >= FRAME_TARGET;
        st.buffer_bytes += grown;
        if full {
            if let Some(f) = st.open.take() {
                st.ready.push_back(f);
            }
            self.wake.notify_one();
        }
        seq
    }

    fn mark_need_locked(
        st: &mut State,
        disk: u32,
        exts: std::ops::RangeInclusive<u64>,
        reason: &str,
    ) {
        let Some(need) = st.need.get_mut(disk as usize) else {
            return;
        };
        for e in exts {
            need.set(e);
        }
        if st.need_reason.is_none() {
            st.need_reason = Some(reason.to_string());
        }
        if st.bitmap_since.is_none() {
            st.bitmap_since = Some(Instant::now());
        }
    }

    fn enter_bitmap_locked(&self, st: &mut State, reason: &str) {
        if st.recording {
            st.recording = false;
            warn!(
                mode = "bitmap",
                buffer_bytes = st.buffer_bytes,
                "entering bitmap mode: {reason}; new writes only mark dirty extents until the link catches up"
            );
        }
    }

    /// Switches to bitmap mode (e.g. the PS has been unreachable too long).
    pub fn enter_bitmap(&self, reason: &str) {
        let mut st = self.lock();
        self.enter_bitmap_locked(&mut st, reason);
    }

    // ------------------------------------------------------------ write hold

    fn wait_hold(&self) {
        let mut h = self.hold.lock().unwrap_or_else(|p| p.into_inner());
        while h.is_some() {
            h = self.hold_cv.wait(h).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Holds new writes (they wait before the ordering point) under `token`.
    /// False when another hold is in force.
    pub fn hold_writes(&self, token: &str) -> bool {
        let mut h = self.hold.lock().unwrap_or_else(|p| p.into_inner());
        match h.as_deref() {
            Some(t) => t == token,
            None => {
                *h = Some(token.to_string());
                true
            }
        }
    }

    /// Releases the hold `token` (false when that hold is not in force).
    pub fn release_writes(&self, token: &str) -> bool {
        let mut h = self.hold.lock().unwrap_or_else(|p| p.into_inner());
        if h.as_deref() == Some(token) {
            *h = None;
            self.hold_cv.notify_all();
            true
        } else {
            false
        }
    }

    /// The token of the hold in force.
    pub fn held_by(&self) -> Option<String> {
        self.hold.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Accepts writes again after [`Capture::fence`].
    pub fn unfence(&self) {
        self.lock().fenced = false;
    }

    pub fn is_fenced(&self) -> bool {
        self.lock().fenced
    }

    /// Starts a new stream for replication `rid` (the configuration server
    /// moved this agent to another replication/PS): drops the change buffer
    /// and the stream position (the new PS says where to resume) and marks
    /// every disk for a differential resync against the new target replica.
    pub fn switch_replication(&self, rid: &str) {
        *self.rid.lock().unwrap_or_else(|p| p.into_inner()) = rid.to_string();
        let mut st = self.lock();
        st.open = None;
        st.ready.clear();
        st.frame_starts.clear();
        st.buffer_bytes = 0;
        st.next_seq = 0;
        st.recording = false;
        st.durable_seq = 0;
        st.last_tag_seq = 0;
        st.last_change_seq = 0;
        st.window = None;
        for t in st.taken.iter_mut() {
            t.clear_all();
        }
        for h in st.hi_seq.iter_mut() {
            h.iter_mut().for_each(|x| *x = 0);
        }
        st.last_tag.clear();
        st.window_end_tag_seq = 0;
        drop(st);
        self.durable.send_replace(0);
        self.mark_need_all("initial");
    }

    /// Stops accepting writes: later writes get EPERM.
    pub fn fence(&self) {
        self.lock().fenced = true;
    }

    /// Queues extents for a resync (crash recovery, undrained stop).
    pub fn mark_need(&self, disk: u32, exts: &[u64], reason: &str) {
        let mut st = self.lock();
        for &e in exts {
            Self::mark_need_locked(&mut st, disk, e..=e, reason);
        }
    }

    /// Queues every extent of every disk (initial replication).
    pub fn mark_need_all(&self, reason: &str) {
        let mut st = self.lock();
        for n in st.need.iter_mut() {
            n.set_all();
        }
        st.need_reason = Some(reason.to_string());
        st.need_full = true;
        if st.bitmap_since.is_none() {
            st.bitmap_since = Some(Instant::now());
        }
    }

    // --------------------------------------------------------------- sender

    /// Frames ready for the sender, plus the partial frame when it has been
    /// idle long enough (or `force`). The flag says a partial frame remains.
    pub fn take_frames(&self, force: bool) -> (Vec<PendingFrame>, bool) {
        let mut st = self.lock();
        let mut out: Vec<PendingFrame> = st.ready.drain(..).collect();
        let now = Instant::now();
        let take_open = st.open.as_ref().is_some_and(|o| {
            force
                || now.duration_since(o.last_append) >= IDLE_FLUSH
                || now.duration_since(o.started) >= MAX_FRAME_AGE
        });
        if take_open {
            if let Some(o) = st.open.take() {
                out.push(o);
            }
        }
        (out, st.open.is_some())
    }

    /// Hands the partial frame over now (wait_durable, shutdown, resync).
    pub fn request_flush(&self) {
        let mut st = self.lock();
        if let Some(o) = st.open.take() {
            st.ready.push_back(o);
        }
        drop(st);
        self.wake.notify_one();
    }

    /// The PS answered a hello with `resume`.
    pub fn on_resume(&self, resume: u64) -> ResumeOutcome {
        let mut st = self.lock();
        if st.next_seq == 0 {
            st.next_seq = resume + 1;
            st.durable_seq = resume;
            st.last_tag_seq = resume;
            st.last_change_seq = resume;
            drop(st);
            self.durable.send_replace(resume);
            return ResumeOutcome::Fresh;
        }
        let last = st.next_seq - 1;
        if resume > last || resume < st.durable_seq {
            error!(
                resume_seq = resume,
                durable_seq = st.durable_seq,
                last_seq = last,
                "the process server's stream does not continue ours (it lost acknowledged records or is ahead); \
                 dropping the change buffer and resyncing every disk"
            );
            st.open = None;
            st.ready.clear();
            st.frame_starts.clear();
            st.buffer_bytes = 0;
            st.next_seq = resume + 1;
            st.durable_seq = resume;
            st.last_tag_seq = resume;
            st.last_change_seq = resume;
            st.window = None;
            for n in st.need.iter_mut() {
                n.set_all();
            }
            for t in st.taken.iter_mut() {
                t.clear_all();
            }
            st.need_reason = Some("stream-gap".into());
            st.need_full = true;
            st.bitmap_since.get_or_insert_with(Instant::now);
            self.enter_bitmap_locked(&mut st, "the stream must restart with a full resync");
            drop(st);
            self.durable.send_replace(resume);
            return ResumeOutcome::Reset;
        }
        if resume > st.durable_seq {
            st.durable_seq = resume;
            Self::pop_frame_starts(&mut st);
        }
        let d = st.durable_seq;
        drop(st);
        self.durable.send_replace(d);
        ResumeOutcome::Continue
    }

    fn pop_frame_starts(st: &mut State) {
        while st.frame_starts.len() >= 2 && st.frame_starts[1].0 <= st.durable_seq + 1 {
            st.frame_starts.pop_front();
        }
        if st.durable_seq + 1 >= st.next_seq {
            st.frame_starts.clear();
        }
    }

    /// The PS holds everything up to `durable`; `freed` bytes of frames are
    /// no longer needed.
    pub fn on_durable(&self, durable: u64, freed: u64) {
        let mut st = self.lock();
        st.buffer_bytes = st.buffer_bytes.saturating_sub(freed);
        if durable > st.durable_seq && durable < st.next_seq {
            st.durable_seq = durable;
        }
        Self::pop_frame_starts(&mut st);
        let d = st.durable_seq;
        drop(st);
        self.durable.send_replace(d);
    }

    /// The seq up to which records have been handed to the stream.
    pub fn handed_over_seq(&self) -> u64 {
        self.lock().next_seq.saturating_sub(1)
    }

    pub fn buffer_bytes(&self) -> u64 {
        self.lock().buffer_bytes
    }

    // --------------------------------------------------------------- resync

    /// Whether the resync driver has something to do: leave bitmap mode,
    /// start or extend a window, or close one.
    pub fn resync_wanted(&self) -> bool {
        let st = self.lock();
        st.next_seq != 0
            && !st.fenced
            && (!st.recording || st.window.is_some() || st.need.iter().any(|n| !n.is_empty()))
    }

    /// Leaves bitmap mode, and when changes are missing from the stream,
    /// opens (or extends) a resync window and takes them.
    pub fn next_resync_batch(&self) -> Option<Batch> {
        let mut st = self.lock();
        if st.next_seq == 0 || st.fenced {
            return None;
        }
        let pending: u64 = st.need.iter().map(|n| n.count()).sum();
        if !st.recording {
            st.recording = true;
            if pending == 0 && st.window.is_none() {
                st.bitmap_since = None;
                info!(
                    mode = "data",
                    "leaving bitmap mode: no write was missed, back to data mode"
                );
            } else {
                info!(
                    mode = "resync",
                    extents = pending,
                    "leaving bitmap mode: writes are recorded again; the missed extents are resynced"
                );
            }
        }
        if pending == 0 {
            return None;
        }
        let reason = st.need_reason.take().unwrap_or_else(|| "bitmap".into());
        let full = std::mem::take(&mut st.need_full);
        let mut opened = false;
        if st.window.is_none() {
            let disks: Vec<u32> = st
                .need
                .iter()
                .enumerate()
                .filter(|(_, n)| !n.is_empty())
                .map(|(i, _)| i as u32)
                .collect();
            let rec = Record::ResyncBegin {
                disks: disks.clone(),
                reason: reason.clone(),
            };
            let seq = self.push_locked(&mut st, |b| b.push(&rec));
            st.last_change_seq = seq;
            st.window = Some(Window {
                reason: reason.clone(),
                full,
                started: Instant::now(),
                bytes_at_start: st.resync_bytes,
                chunks_at_start: st.resync_chunks,
            });
            opened = true;
            info!(
                mode = "resync",
                seq,
                reason = %reason,
                disks = ?disks,
                extents = pending,
                "resync begin: comparing {pending} extents ({} MiB) with the replica",
                (pending * EXTENT_SIZE) >> 20
            );
        } else if full {
            if let Some(w) = st.window.as_mut() {
                w.full = true;
            }
        }
        let mut disks = Vec::new();
        let st = &mut *st;
        for (i, (need, taken)) in st.need.iter_mut().zip(st.taken.iter_mut()).enumerate() {
            if need.is_empty() {
                continue;
            }
            let exts: Vec<u64> = need.iter().collect();
            for &e in &exts {
                taken.set(e);
            }
            need.clear_all();
            disks.push((i as u32, exts));
        }
        let reason = st.window.as_ref().map_or(reason, |w| w.reason.clone());
        Some(Batch {
            reason,
            full,
            opened,
            min_seq: st.next_seq - 1,
            disks,
        })
    }

    /// Gives extents of a failed batch back, to be taken again.
    pub fn requeue(&self, disk: u32, exts: &[u64]) {
        let mut st = self.lock();
        let st = &mut *st;
        let (Some(need), Some(taken)) = (
            st.need.get_mut(disk as usize),
            st.taken.get_mut(disk as usize),
        ) else {
            return;
        };
        for &e in exts {
            taken.clear(e);
            need.set(e);
        }
    }

    /// Closes the open window when nothing is missing any more: appends
    /// ResyncEnd and, right after it, a crash tag.
    pub fn finish_window(&self) -> Option<WindowEnd> {
        let mut st = self.lock();
        if st.window.is_none()
            || st.fenced
            || !st.recording
            || st.next_seq == 0
            || st.need.iter().any(|n| !n.is_empty())
        {
            return None;
        }
        let end_seq = self.push_locked(&mut st, |b| b.push(&Record::ResyncEnd));
        let st = &mut *st;
        for (taken, hi) in st.taken.iter_mut().zip(st.hi_seq.iter_mut()) {
            for e in taken.iter() {
                if let Some(h) = hi.get_mut(e as usize) {
                    *h = (*h).max(end_seq);
                }
            }
            taken.clear_all();
        }
        let w = st.window.take()?;
        st.bitmap_since = None;
        let (tag, tag_seq) = self.push_tag_locked(st, TagKind::Crash);
        st.window_end_tag_seq = tag_seq;
        Some(WindowEnd {
            reason: w.reason,
            full: w.full,
            end_seq,
            tag,
            tag_seq,
            bytes: st.resync_bytes - w.bytes_at_start,
            chunks: st.resync_chunks - w.chunks_at_start,
            elapsed: w.started.elapsed(),
        })
    }

    /// Reads `len` bytes of `disk` at `offset` under the ordering point and
    /// appends them as resync records: `Write` for data, `Zero` for all-zero
    /// 64 KiB sub-chunks (skipped entirely with `skip_zero`, when the replica
    /// is known to be zero there). Returns (data bytes, sub-chunks) sent.
    pub fn resync_copy(
        &self,
        disk: u32,
        offset: u64,
        len: u64,
        skip_zero: bool,
    ) -> Result<(u64, u64), CaptureError> {
        let d = self
            .disks
            .get(disk as usize)
            .ok_or(CaptureError::NotStreaming)?
            .clone();
        let len = len.min(d.size().saturating_sub(offset));
        if len == 0 {
            return Ok((0, 0));
        }
        let mut st = self.lock();
        if st.next_seq == 0 || st.fenced || st.window.is_none() {
            return Err(CaptureError::NotStreaming);
        }
        let mut buf = std::mem::take(&mut st.resync_buf);
        buf.resize(len as usize, 0);
        d.read_at(&mut buf, offset)
            .map_err(|source| CaptureError::Read {
                disk: d.name.clone(),
                offset,
                source,
            })?;
        // Split into sub-chunks (aligned to the disk's sub-chunk grid), and
        // merge neighbours of the same kind into one record.
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let end = ((pos / SUB_CHUNK_SIZE + 1) * SUB_CHUNK_SIZE).min(offset + len);
            let s = (pos - offset) as usize;
            let zero = is_zero(&buf[s..(end - offset) as usize]);
            match pieces.last_mut() {
                Some(last) if last.2 == zero && last.0 + last.1 == pos => last.1 += end - pos,
                _ => pieces.push((pos, end - pos, zero)),
            }
            pos = end;
        }
        let mut bytes = 0;
        let mut chunks = 0;
        let mut seq = 0;
        for (off, n, zero) in pieces {
            if zero && skip_zero {
                continue;
            }
            chunks += n.div_ceil(SUB_CHUNK_SIZE);
            if zero {
                seq = self.push_locked(&mut st, |b| {
                    b.push(&Record::Zero {
                        disk,
                        offset: off,
                        len: n,
                    })
                });
            } else {
                let s = (off - offset) as usize;
                seq = self.push_locked(&mut st, |b| {
                    b.push_write(disk, off, &buf[s..s + n as usize])
                });
                bytes += n;
            }
        }
        if seq != 0 {
            st.last_change_seq = seq;
            let hi = &mut st.hi_seq[disk as usize];
            for e in extents_of(offset, len) {
                if let Some(h) = hi.get_mut(e as usize) {
                    *h = (*h).max(seq);
                }
            }
        }
        st.resync_bytes += bytes;
        st.resync_chunks += chunks;
        st.resync_buf = buf;
        Ok((bytes, chunks))
    }

    // ----------------------------------------------------------------- tags

    fn push_tag_locked(&self, st: &mut State, kind: TagKind) -> (String, u64) {
        self.push_named_tag_locked(st, kind, None, String::new())
    }

    fn push_named_tag_locked(
        &self,
        st: &mut State,
        kind: TagKind,
        id: Option<String>,
        group: String,
    ) -> (String, u64) {
        let seq = st.next_seq;
        let id = id
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| tags::tag_id(kind, seq));
        let rec = Record::Tag(Tag {
            id: id.clone(),
            kind,
            time_ms: tags::now_ms(),
            group,
        });
        self.push_locked(st, |b| b.push(&rec));
        st.last_tag = id.clone();
        st.last_tag_seq = seq;
        (id, seq)
    }

    fn consistent_locked(st: &State) -> bool {
        st.next_seq != 0
            && st.recording
            && st.window.is_none()
            && st.need.iter().all(|n| n.is_empty())
    }

    /// Cuts a recovery point now, in write order. Without `force`, only when
    /// something changed since the last tag (`Ok(None)` otherwise).
    pub fn cut_tag(&self, kind: TagKind, force: bool) -> Result<Option<(String, u64)>, TagError> {
        let mut st = self.lock();
        if st.next_seq == 0 {
            return Err(TagError::NotConnected);
        }
        if st.fenced && kind != TagKind::Shutdown {
            return Err(TagError::Fenced);
        }
        if !Self::consistent_locked(&st) {
            return Err(TagError::Inconsistent(Self::mode_locked(&st).as_str()));
        }
        if !force && st.last_change_seq <= st.last_tag_seq {
            return Ok(None);
        }
        Ok(Some(self.push_tag_locked(&mut st, kind)))
    }

    /// Cuts a recovery point now with this id (generated when empty) and
    /// consistency-group tag, whether or not anything changed.
    pub fn cut_named_tag(
        &self,
        kind: TagKind,
        id: &str,
        group: &str,
    ) -> Result<(String, u64), TagError> {
        let mut st = self.lock();
        if st.next_seq == 0 {
            return Err(TagError::NotConnected);
        }
        if st.fenced && kind != TagKind::Shutdown {
            return Err(TagError::Fenced);
        }
        if !Self::consistent_locked(&st) {
            return Err(TagError::Inconsistent(Self::mode_locked(&st).as_str()));
        }
        Ok(self.push_named_tag_locked(&mut st, kind, Some(id.to_string()), group.to_string()))
    }

    // ---------------------------------------------------- dirty-log clearing

    /// Clears the dirty bits of every extent whose every record is durable at
    /// the PS and that no resync still needs (clean shutdown). Returns how
    /// many were cleared.
    pub fn clear_durable_extents(&self) -> std::io::Result<u64> {
        self.clear_extents(None)
    }

    /// The activity-log rule, run every second: among the extents that
    /// [`Capture::clear_durable_extents`] could clear, clears those with no
    /// write for `idle`, then, while more than `keep` extents are dirty, the
    /// least recently written ones. A hot extent thus stays dirty and its
    /// writes never wait for a dirty-log sync; after a crash the resync
    /// compares at most the extents whose records the PS did not hold plus
    /// `keep` extents written in the last `idle`.
    pub fn clear_cold_extents(&self, idle: Duration, keep: u64) -> std::io::Result<u64> {
        self.clear_extents(Some((idle, keep)))
    }

    fn clear_extents(&self, rule: Option<(Duration, u64)>) -> std::io::Result<u64> {
        let st = self.lock();
        let now = self.epoch.elapsed().as_secs();
        // Per disk: (extent, last write) of the clearable extents.
        let mut clearable: Vec<Vec<(u64, u64)>> = Vec::with_capacity(self.disks.len());
        for disk in 0..self.disks.len() {
            let d = disk as u32;
            let set = self.dlog.set_extents(d);
            clearable.push(
                set.into_iter()
                    .filter(|&e| {
                        !st.need[disk].get(e)
                            && !st.taken[disk].get(e)
                            && !st.inflight.contains_key(&(d, e))
                            && st.hi_seq[disk]
                                .get(e as usize)
                                .is_some_and(|&h| h <= st.durable_seq)
                    })
                    .map(|e| (e, st.last_write[disk][e as usize] as u64))
                    .collect(),
            );
        }
        let mut clear: Vec<Vec<u64>> = vec![Vec::new(); self.disks.len()];
        match rule {
            None => {
                for (c, all) in clear.iter_mut().zip(&clearable) {
                    c.extend(all.iter().map(|&(e, _)| e));
                }
            }
            Some((idle, keep)) => {
                let idle = idle.as_secs();
                let mut warm = Vec::new();
                for (disk, all) in clearable.iter().enumerate() {
                    for &(e, t) in all {
                        if now.saturating_sub(t) >= idle {
                            clear[disk].push(e);
                        } else {
                            warm.push((t, disk, e));
                        }
                    }
                }
                let cold: u64 = clear.iter().map(|c| c.len() as u64).sum();
                let mut excess = self.dlog.count().saturating_sub(cold).saturating_sub(keep);
                if excess > 0 {
                    warm.sort_unstable();
                    for (_, disk, e) in warm {
                        if excess == 0 {
                            break;
                        }
                        clear[disk].push(e);
                        excess -= 1;
                    }
                }
            }
        }
        let mut cleared = 0;
        for (disk, c) in clear.iter_mut().enumerate() {
            if c.is_empty() {
                continue;
            }
            c.sort_unstable();
            cleared += c.len() as u64;
            self.dlog.clear(disk as u32, c)?;
        }
        Ok(cleared)
    }

    // --------------------------------------------------------------- status

    fn mode_locked(st: &State) -> Mode {
        if !st.recording {
            Mode::Bitmap
        } else if st.window.is_some() {
            Mode::Resync
        } else {
            Mode::Data
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        let now = Instant::now();
        let last = st.next_seq.saturating_sub(1);
        let mut lag = Duration::ZERO;
        if st.durable_seq < last {
            if let Some((_, t)) = st.frame_starts.front() {
                lag = now.duration_since(*t);
            }
        }
        let pending: u64 = st.need.iter().map(|n| n.count()).sum::<u64>()
            + st.taken.iter().map(|t| t.count()).sum::<u64>();
        if pending > 0 {
            if let Some(t) = st.bitmap_since {
                lag = lag.max(now.duration_since(t));
            }
        }
        Snapshot {
            mode: Self::mode_locked(&st),
            seq: last,
            durable_seq: st.durable_seq,
            buffer_bytes: st.buffer_bytes,
            buffer_limit: self.buffer_limit,
            dirty_extents: self.dlog.count(),
            resync_bytes_sent: st.resync_bytes,
            resync_chunks_sent: st.resync_chunks,
            bytes_captured: st.bytes_captured,
            last_tag: st.last_tag.clone(),
            resync_pending_extents: pending,
            lag_ms: lag.as_millis() as u64,
            consistent: Self::consistent_locked(&st),
            window_end_tag_seq: st.window_end_tag_seq,
        }
    }

    pub fn mode(&self) -> Mode {
        Self::mode_locked(&self.lock())
    }

    pub fn is_consistent(&self) -> bool {
        Self::consistent_locked(&self.lock())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rebound_common::frame::Frame;
    use std::path::Path;

    pub(crate) fn make_disk(dir: &Path, i: u32, size: u64) -> Arc<Disk> {
        let p = dir.join(format!("d{i}.img"));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(size).unwrap();
        Arc::new(Disk::open(i, &format!("disk{i}"), &p).unwrap())
    }

    pub(crate) fn make_capture(dir: &Path, sizes: &[u64], limit: u64) -> Arc<Capture> {
        let disks: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| make_disk(dir, i as u32, s))
            .collect();
        let extents: Vec<u64> = sizes.iter().map(|s| s.div_ceil(EXTENT_SIZE)).collect();
        let (dlog, _) = DirtyLog::open(&dir.join("dirty.log"), &extents).unwrap();
        Arc::new(Capture::new("m1", disks, Arc::new(dlog), limit))
    }

    /// Drains the buffer into records with their seqs.
    pub(crate) fn drain(cap: &Capture) -> Vec<(u64, Record)> {
        let (frames, _) = cap.take_frames(true);
        let mut out = Vec::new();
        for f in frames {
            let frame = f.builder.finish();
            let bytes = frame.to_bytes();
            let parsed = Frame::parse(&bytes).unwrap();
            let first = parsed.header.first_seq;
            for (i, r) in parsed.records().unwrap().into_iter().enumerate() {
                out.push((first + i as u64, r));
            }
        }
        out
    }

    /// Connected at `resume` and in data mode.
    pub(crate) fn start(cap: &Capture, resume: u64) {
        assert_eq!(cap.on_resume(resume), ResumeOutcome::Fresh);
        assert!(cap.next_resync_batch().is_none());
        assert_eq!(cap.mode(), Mode::Data);
    }

    #[test]
    fn seqs_are_consecutive_across_disks_and_follow_write_order() {
        let dir = tempfile::tempdir().unwrap();
        let cap = make_capture(dir.path(), &[4 << 20, 2 << 20], 64 << 20);
        start(&cap, 41);
        cap.write(0, 0, &[1u8; 4096], false).unwrap();
        cap.write(1, 512, &[2u8; 1024], false).unwrap();
        cap.write(0, 2048, &[3u8; 4096], true).unwrap();
        cap.zero(1, 0, 4096, false).unwrap();
        cap.write(0, 0, &[4u8; 512], false).unwrap();
        let recs = drain(&cap);
        let seqs: Vec<u64> = recs.iter().map(|r| r.0).collect();
        assert_eq!(seqs, vec![42, 43, 44, 45, 46]);
        assert!(matches!(&recs[0].1, Record::Write { disk: 0, offset: 0, data } if data[0] == 1));
        assert!(matches!(
            &recs[1].1,
            Record::Write {
                disk: 1,
                offset: 512,
                ..
            }
        ));
        assert!(matches!(
            &recs[3].1,
            Record::Zero {
                disk: 1,
                offset: 0,
                len: 4096
            }
        ));
        // Replaying the stream on a zeroed disk gives the source disk.
        let mut img = vec![0u8; 4 << 20];
        for (_, r) in &recs {
            if let Record::Write {
                disk: 0,
                offset,
                data,
            } = r
            {
                img[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
        }
        let mut src = vec![0u8; 4 << 20];
        cap.disks()[0].read_at(&mut src, 0).unwrap();
        assert_eq!(img, src);
        assert_eq!(cap.snapshot().seq, 46);
        assert_eq!(cap.dirty_log().count(), 2);
    }

    #[test]
    fn concurrent_overlapping_writes_stream_order_matches_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cap = make_capture(dir.path(), &[1 << 20, 1 << 20], 256 << 20);
        start(&cap, 0);
        let hs: Vec<_> = (0..4u8)
            .map(|t| {
                let cap = cap.clone();
                std::thread::spawn(move || {
                    for i in 0..200u32 {
                        let v = t.wrapping_mul(50).wrapping_add(i as u8);
                        let off = ((i * 7 + t as u32 * 3) % 64) as u64 * 4096;
                        cap.write(i % 2, off, &[v; 8192], false).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let recs = drain(&cap);
        assert_eq!(recs.len(), 800);
        for (i, (s, _)) in recs.iter().enumerate() {
            assert_eq!(*s, i as u64 + 1);
        }
        for disk in 0..2u32 {
            let mut img = vec![0u8; 1 << 20];
            for (_, r) in &recs {
                if let Record::Write {
                    disk: d,
                    offset,
                    data,
                } = r
                {
                    if *d == disk {
                        img[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                    }
                }
            }
            let mut src = vec![0u8; 1 << 20];
            cap.disks()[disk as usize].read_at(&mut src, 0).unwrap();
            assert!(img == src, "replayed stream differs from disk {disk}");
        }
    }

    #[test]
    fn full_buffer_switches_to_bitmap_and_back_through_a_window() {
        let dir = tempfile::tempdir().unwrap();
        let cap = make_capture(dir.path(), &[16 << 20], 3 << 20);
        start(&cap, 0);
        for i in 0..3u64 {
            cap.write(0, i << 20, &vec![7u8; 1 << 20], false).unwrap();
        }
        assert_eq!(cap.mode(), Mode::Bitmap);
        let s = cap.snapshot();
        assert_eq!(s.seq, 2);
        assert_eq!(s.resync_pending_extents, 1);
        assert!(cap.cut_tag(TagKind::Crash, true).is_err());
        cap.write(0, 5 << 20, &[9u8; 4096], false).unwrap();
        assert_eq!(cap.snapshot().resync_pending_extents, 2);
        // The sender drains and the PS acknowledges everything.
        let recs = drain(&cap);
        assert_eq!(recs.len(), 2);
        let freed = cap.buffer_bytes();
        cap.on_durable(2, freed);
        assert_eq!(cap.buffer_bytes(), 0);
        // Back to data mode: a window over exactly the missed extents.
        let b = cap.next_resync_batch().unwrap();
        assert!(b.opened);
        assert_eq!(b.reason, "bitmap");
        assert_eq!(b.disks, vec![(0, vec![2, 5])]);
        assert_eq!(cap.mode(), Mode::Resync);
        assert!(cap.cut_tag(TagKind::Crash, true).is_err());
        cap.resync_copy(0, 2 << 20, 1 << 20, false).unwrap();
        cap.resync_copy(0, 5 << 20, 1 << 20, false).unwrap();
        let end = cap.finish_window().unwrap();
        assert_eq!(cap.mode(), Mode::Data);
        let recs = drain(&cap);
        assert!(matches!(recs[0].1, Record::ResyncBegin { .. }));
        assert_eq!(recs[0].0, 3);
        assert!(matches!(recs[recs.len() - 2].1, Record::ResyncEnd));
        assert!(
            matches!(&recs[recs.len() - 1].1, Record::Tag(t) if t.id == end.tag && t.kind == TagKind::Crash)
        );
        assert_eq!(end.tag, format!("crash-{}", end.tag_seq));
        // Extent 5: 4 KiB data + 15 zero sub-chunks, extent 2: one 1 MiB write.
        assert_eq!(end.bytes, (1 << 20) + 65536);
        // Dirty bits clear once the window is durable (extents 0 and 1 and the
        // look-ahead ones now; 2 and 5 wait for the window's records).
        cap.clear_durable_extents().unwrap();
        assert_eq!(cap.dirty_log().count(), 2);
        let freed = cap.buffer_bytes();
        cap.on_durable(end.tag_seq, freed);
        cap.clear_durable_extents().unwrap();
        assert_eq!(cap.dirty_log().count(), 0);
    }

    #[test]
    fn hot_extents_stay_dirty_until_cold_or_over_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let cap = make_capture(dir.path(), &[8 << 20], 64 << 20);
        start(&cap, 0);
        // Extents 0, 2, 4 written; 0 and 2 durable at the PS, 4 not.
        cap.write(0, 0, &[1u8; 4096], false).unwrap();
        cap.write(0, 2 << 20, &[2u8; 4096], false).unwrap();
        let durable = cap.handed_over_seq();
        cap.write(0, 4 << 20, &[3u8; 4096], false).unwrap();
        assert_eq!(cap.dirty_log().count(), 3);
        cap.on_durable(durable, 0);
        // Hot (written within the idle time) and under the limit: all kept,
        // and a new write to them does not touch the log.
        let idle = Duration::from_secs(3600);
        assert_eq!(cap.clear_cold_extents(idle, 8).unwrap(), 0);
        assert!(cap.dirty_log().is_durably_set(0, 0));
        // Over the limit: durable extents are cleared, oldest first; extent 4
        // (records not durable) is never cleared.
        assert_eq!(cap.clear_cold_extents(idle, 2).unwrap(), 1);
        assert_eq!(cap.dirty_log().count(), 2);
        assert!(cap.dirty_log().is_set(0, 4));
        assert_eq!(cap.clear_cold_extents(idle, 0).unwrap(), 1);
        assert_eq!(cap.dirty_log().set_extents(0), vec![4]);
        // Idle time 0: every durable extent is cold.
        cap.write(0, 6 << 20, &[4u8; 4096], false).unwrap();
        cap.on_durable(cap.handed_over_seq(), 0);
        assert_eq!(cap.clear_cold_extents(Duration::ZERO, 4096).unwrap(), 2);
        assert_eq!(cap.dirty_log().count(), 0);
        assert!(!cap.dirty_log().is_durably_set(0, 6));
    }

    #[test]
    fn tags_only_after_changes_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let cap = make_capture(dir.path(), &[1 << 20], 64 << 20);
        assert_eq!(
            cap.cut_tag(TagKind::Crash, false),
            Err(TagError::NotConnected)
        );
        start(&cap, 10);
        assert_eq!(cap.cut_tag(TagKind::Crash, false), Ok(None));
        cap.write(0, 0, &[1u8; 512], false).unwrap();
        assert_eq!(
            cap.cut_tag(TagKind::Crash, false),
            Ok(Some(("crash-12".into(), 12)))
        );
        assert_eq!(cap.cut_tag(TagKind::Crash, false), Ok(None));
        assert_eq!(
            cap.cut_tag(TagKind::App, true),
            Ok(Some(("app-13".into(), 13)))
        );
        assert_eq!(cap.snapshot().last_tag, "app-13");
    }

    #[test]
    fn resume_trims_or_resets() {
        let dir = tempfile::tempdir().unwrap();
        let cap = make_capture(dir.path(), &[4 << 20], 64 << 20);
        // Writes before the first connection: bitmap until the PS answers.
        cap.write(0, 0, &[1u8; 512], false).unwrap();
        assert_eq!(cap.mode(), Mode::Bitmap);
        assert_eq!(cap.on_resume(100), ResumeOutcome::Fresh);
        let b = cap.next_resync_batch().unwrap();
        assert_eq!(b.disks, vec![(0, vec![0])]);
        cap.resync_copy(0, 0, 1 << 20, false).unwrap();
        cap.finish_window().unwrap();
        let recs = drain(&cap);
        assert_eq!(recs[0].0, 101);
        assert!(matches!(recs[0].1, Record::ResyncBegin { .. }));
        cap.write(0, 0, &[2u8; 512], false).unwrap();
        let last = cap.handed_over_seq();
        assert_eq!(cap.on_resume(last - 1), ResumeOutcome::Continue);
        assert_eq!(cap.snapshot().durable_seq, last - 1);
        // The PS went backwards: everything is resynced.
        assert_eq!(cap.on_resume(50), ResumeOutcome::Reset);
        assert_eq!(cap.mode(), Mode::Bitmap);
        let b = cap.next_resync_batch().unwrap();
        assert!(b.full);
        assert_eq!(b.reason, "stream-gap");
        assert_eq!(b.disks, vec![(0, vec![0, 1, 2, 3])]);
        let recs = drain(&cap);
        assert_eq!(recs[0].0, 51);
    }
}
