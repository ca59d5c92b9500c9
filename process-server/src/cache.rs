//! The durable frame cache (DESIGN.md §6): per replication, appends with
//! group commit, the durable seq, trimming of applied segments, and the
//! accounting behind the cache cap.
//!
//! Every replication has one writer thread that owns its segment files. The
//! ingest streams hand it frames; it takes everything queued as one batch,
//! writes the entries, fdatasyncs once, and only then answers each frame
//! with the durable seq, so nothing is acknowledged before it is on disk.
//! The same thread deletes segments once the master target has applied
//! them, so file changes never race. Layout:
//!
//! ```text
//! <cache_dir>/<replication_id>/info.json             the agent's hello
//! <cache_dir>/<replication_id>/segments/<seq:020>.seg see segment.rs
//! ```
//!
//! The newest segment is never deleted: its name (durable seq + 1 when it
//! was created) keeps the durable seq across restarts even when everything
//! was applied and trimmed.

use crate::segment::{self, EntryMeta};
use prost::bytes::Bytes;
use rebound_common::durable::{fsync_dir, write_atomic};
use rebound_proto::{DiskInfo, ReplicationInfo};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

/// Largest segment file before the writer starts a new one.
pub const SEGMENT_MAX_BYTES: u64 = 64 << 20;
/// Frames the writer takes into one group commit at most.
const BATCH_MAX_FRAMES: usize = 256;
/// Frame bytes the writer takes into one group commit at most.
const BATCH_MAX_BYTES: u64 = 32 << 20;
/// Queue between the ingest streams and a replication's writer.
const WRITER_QUEUE: usize = 64;

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("cache {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("invalid replication id {id:?}: {why}")]
    BadReplicationId { id: String, why: String },
    #[error("replication {replication} belongs to machine {stored}, not to machine {claimed}")]
    WrongMachine {
        replication: String,
        stored: String,
        claimed: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Why a frame was not appended. Every variant means "not acknowledged".
#[derive(Debug, Clone, Error)]
pub enum AppendError {
    #[error("replication {replication}: the frame starts at seq {first_seq} but the cache holds seqs only up to {held}; resend from seq {next}", next = held + 1)]
    Gap {
        replication: String,
        first_seq: u64,
        held: u64,
    },
    #[error("replication {replication}: cannot write the cache: {message}")]
    Io {
        replication: String,
        message: String,
    },
    #[error("replication {replication}: the cache writer has stopped (the process server is shutting down)")]
    Closed { replication: String },
}

impl From<AppendError> for tonic::Status {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Gap { .. } => tonic::Status::failed_precondition(e.to_string()),
            AppendError::Io { .. } => tonic::Status::internal(e.to_string()),
            AppendError::Closed { .. } => tonic::Status::unavailable(e.to_string()),
        }
    }
}

/// Checks that a replication id is usable as a directory name.
pub fn check_replication_id(id: &str) -> Result<(), CacheError> {
    let bad = |why: &str| {
        Err(CacheError::BadReplicationId {
            id: id.to_string(),
            why: why.to_string(),
        })
    };
    if id.is_empty() {
        return bad("it is empty");
    }
    if id.len() > 200 {
        return bad("it is longer than 200 bytes");
    }
    if id.starts_with('.') {
        return bad("it starts with '.'");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:@+".contains(&b))
    {
        return bad("only letters, digits and - _ . : @ + are allowed");
    }
    Ok(())
}

// ------------------------------------------------------------------ account

/// Total segment bytes of all replications against the cap. Ingest streams
/// stop reading once the total reaches the cap (backpressure) and resume
/// once trimming brings it below the low watermark (cap - cap/16), so a
/// full cache does not flap between paused and running on every trim. A
/// frame read from a stream reserves its size until the writer has stored
/// it, so frames queued for the writer count against the cap too.
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
    pub fn low_watermark(&self) -> u64 {
        self.cap - self.cap / 16
    }
    /// Counts `n` bytes of a frame that is on its way to the writer.
    pub fn reserve(&self, n: u64) {
        self.update(|u| u.reserved = u.reserved.saturating_add(n));
    }
    /// Drops a reservation (the frame was stored, dropped or refused).
    pub fn release(&self, n: u64) {
        self.update(|u| u.reserved = u.reserved.saturating_sub(n));
    }
    fn add(&self, n: u64) {
        self.update(|u| u.stored = u.stored.saturating_add(n));
    }
    fn sub(&self, n: u64) {
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

// ---------------------------------------------------------------- replication

/// One segment as the forwarder and the accounting see it: only synced data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegMeta {
    /// Synced length of the file.
    pub len: u64,
    /// Last seq held once this segment is read (name - 1 when empty).
    pub last_seq: u64,
}

#[derive(Debug, Default)]
pub struct Segments {
    /// Segments by first seq (file name).
    pub map: BTreeMap<u64, SegMeta>,
    /// Sum of `len`.
    pub bytes: u64,
}

/// Counters for the periodic summary and Status.
#[derive(Debug, Default)]
pub struct Stats {
    pub frames_in: AtomicU64,
    /// Frame bytes as the agent sent them.
    pub bytes_in: AtomicU64,
    /// Frame bytes as stored (after compression).
    pub bytes_stored: AtomicU64,
    /// Frames (or their seqs) the cache already held.
    pub frames_duplicate: AtomicU64,
    pub frames_forwarded: AtomicU64,
    pub bytes_forwarded: AtomicU64,
}

/// State shared between a replication's handle and its writer thread.
#[derive(Debug)]
struct Shared {
    id: String,
    dir: PathBuf,
    info: watch::Sender<Option<ReplicationInfo>>,
    segments: Mutex<Segments>,
    durable: watch::Sender<u64>,
    /// The master target's applied seq; `None` until it said so.
    applied: watch::Sender<Option<u64>>,
    account: Arc<Account>,
    stats: Stats,
}

impl Shared {
    fn segments(&self) -> MutexGuard<'_, Segments> {
        self.segments.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum WriterMsg {
    Append(Append),
    /// Re-check what can be trimmed.
    Wake,
    /// Finish what is queued before this and exit.
    Stop,
}

struct Append {
    bytes: Bytes,
    first_seq: u64,
    last_seq: u64,
    /// Bytes reserved in the account for this frame, released once done.
    reserved: u64,
    reply: oneshot::Sender<Result<u64, AppendError>>,
}

/// A replication's cache: its info, segments and writer.
#[derive(Debug)]
pub struct Replication {
    sh: Arc<Shared>,
    tx: mpsc::Sender<WriterMsg>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for WriterMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriterMsg::Append(a) => write!(f, "Append({}..={})", a.first_seq, a.last_seq),
            WriterMsg::Wake => f.write_str("Wake"),
            WriterMsg::Stop => f.write_str("Stop"),
        }
    }
}

impl Replication {
    pub fn id(&self) -> &str {
        &self.sh.id
    }
    pub fn dir(&self) -> &Path {
        &self.sh.dir
    }
    pub fn segments_dir(&self) -> PathBuf {
        self.sh.dir.join("segments")
    }
    /// The agent's hello as last stored, if any.
    pub fn info(&self) -> Option<ReplicationInfo> {
        self.sh.info.borrow().clone()
    }
    pub fn info_watch(&self) -> watch::Receiver<Option<ReplicationInfo>> {
        self.sh.info.subscribe()
    }
    /// Last seq that is durable in the cache.
    pub fn durable(&self) -> u64 {
        *self.sh.durable.borrow()
    }
    pub fn durable_watch(&self) -> watch::Receiver<u64> {
        self.sh.durable.subscribe()
    }
    /// Last seq the master target said it applied (0 until it said so).
    pub fn applied(&self) -> u64 {
        self.sh.applied.borrow().unwrap_or(0)
    }
    /// The master target's applied seq, `None` until it said so.
    pub fn applied_watch(&self) -> watch::Receiver<Option<u64>> {
        self.sh.applied.subscribe()
    }
    /// Records the master target's applied seq and lets the writer trim.
    pub fn set_applied(&self, seq: u64) {
        if self.sh.applied.send_if_modified(|a| {
            let changed = *a != Some(seq);
            *a = Some(seq);
            changed
        }) {
            self.wake();
        }
    }
    /// Segment bytes of this replication.
    pub fn cache_bytes(&self) -> u64 {
        self.sh.segments().bytes
    }
    pub fn stats(&self) -> &Stats {
        &self.sh.stats
    }
    /// A copy of the segment table (synced data only).
    pub fn segments(&self) -> BTreeMap<u64, SegMeta> {
        self.sh.segments().map.clone()
    }
    /// Runs `f` on the segment table under its lock.
    pub fn with_segments<T>(&self, f: impl FnOnce(&Segments) -> T) -> T {
        f(&self.sh.segments())
    }

    /// Queues a frame (already in its stored form) for the writer. The
    /// returned receiver answers with the durable seq once the batch holding
    /// the frame is fsynced, or with why it was refused. `reserved` bytes,
    /// reserved in the account by the caller, are released once the frame
    /// is done with.
    pub async fn append(
        &self,
        bytes: Bytes,
        first_seq: u64,
        last_seq: u64,
        reserved: u64,
    ) -> Result<oneshot::Receiver<Result<u64, AppendError>>, AppendError> {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .tx
            .send(WriterMsg::Append(Append {
                bytes,
                first_seq,
                last_seq,
                reserved,
                reply,
            }))
            .await;
        if sent.is_err() {
            self.sh.account.release(reserved);
            return Err(AppendError::Closed {
                replication: self.sh.id.clone(),
            });
        }
        Ok(rx)
    }

    /// The account of the cache this replication belongs to.
    pub fn account(&self) -> &Arc<Account> {
        &self.sh.account
    }

    /// Asks the writer to re-check trimming.
    pub fn wake(&self) {
        let _ = self.tx.try_send(WriterMsg::Wake);
    }

    /// Stops the writer after what is queued and waits for it (blocking).
    pub fn stop_blocking(&self) {
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = self.tx.blocking_send(WriterMsg::Stop);
            let _ = h.join();
        }
    }

    /// Stores the agent's hello in `info.json` when it changed (blocking).
    fn store_info(&self, info: &ReplicationInfo) -> Result<(), CacheError> {
        if self.sh.info.borrow().as_ref() == Some(info) {
            return Ok(());
        }
        let path = self.sh.dir.join("info.json");
        let text =
            serde_json::to_vec_pretty(&StoredInfo::from(info)).map_err(|e| CacheError::Io {
                path: path.clone(),
                source: io::Error::other(e),
            })?;
        write_atomic(&path, &text).map_err(io_err(&path))?;
        self.sh.info.send_replace(Some(info.clone()));
        Ok(())
    }

    /// Recovers a replication's cache from disk (blocking): scans its
    /// segments, cuts a torn tail, and starts its writer.
    fn open(
        dir: PathBuf,
        id: String,
        account: Arc<Account>,
        seg_max: u64,
    ) -> Result<Replication, CacheError> {
        let seg_dir = dir.join("segments");
        fs::create_dir_all(&seg_dir).map_err(io_err(&seg_dir))?;
        let info = load_info(&dir, &id);

        let mut names = Vec::new();
        for ent in fs::read_dir(&seg_dir).map_err(io_err(&seg_dir))? {
            let ent = ent.map_err(io_err(&seg_dir))?;
            if let Some(n) = ent.file_name().to_str().and_then(segment::parse_file_name) {
                names.push(n);
            }
        }
        names.sort_unstable();

        let mut map = BTreeMap::new();
        let mut held: Option<u64> = None;
        let mut set_aside_from = None;
        for (i, &name) in names.iter().enumerate() {
            let path = seg_dir.join(segment::file_name(name));
            let prev = match held {
                None => name.saturating_sub(1),
                Some(h) if name == h + 1 => h,
                Some(h) => {
                    error!(
                        replication = %id,
                        segment = %path.display(),
                        "segment does not continue the previous one (it starts at seq {name}, the cache holds up to seq {h}); it and every later segment are set aside as *.corrupt and the agent resumes from seq {next}",
                        next = h + 1
                    );
                    set_aside_from = Some(i);
                    break;
                }
            };
            let scan = segment::scan(&path, prev).map_err(io_err(&path))?;
            if let Some(why) = &scan.cut {
                let last = i + 1 == names.len();
                if last {
                    warn!(
                        replication = %id,
                        segment = %path.display(),
                        offset = scan.valid_len,
                        dropped_bytes = scan.file_len - scan.valid_len,
                        durable_seq = scan.last_seq,
                        "cutting the torn tail of the newest segment: {why}"
                    );
                } else {
                    error!(
                        replication = %id,
                        segment = %path.display(),
                        offset = scan.valid_len,
                        durable_seq = scan.last_seq,
                        "segment is corrupt before its end ({why}); cutting it there and setting every later segment aside as *.corrupt; the agent resumes from seq {next}",
                        next = scan.last_seq + 1
                    );
                    set_aside_from = Some(i + 1);
                }
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(scan.valid_len).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
            }
            map.insert(
                name,
                SegMeta {
                    len: scan.valid_len,
                    last_seq: scan.last_seq,
                },
            );
            held = Some(scan.last_seq);
            if set_aside_from.is_some() {
                break;
            }
        }
        if let Some(from) = set_aside_from {
            for &name in &names[from..] {
                let path = seg_dir.join(segment::file_name(name));
                let aside = seg_dir.join(format!("{}.corrupt", segment::file_name(name)));
                fs::rename(&path, &aside).map_err(io_err(&path))?;
            }
            fsync_dir(&seg_dir).map_err(io_err(&seg_dir))?;
        }
        if map.is_empty() {
            let path = seg_dir.join(segment::file_name(1));
            File::create(&path).map_err(io_err(&path))?;
            fsync_dir(&seg_dir).map_err(io_err(&seg_dir))?;
            map.insert(
                1,
                SegMeta {
                    len: 0,
                    last_seq: 0,
                },
            );
        }
        let (&active, &meta) = map.iter().next_back().expect("at least one segment");
        let active_path = seg_dir.join(segment::file_name(active));
        let file = OpenOptions::new()
            .write(true)
            .open(&active_path)
            .map_err(io_err(&active_path))?;
        let bytes: u64 = map.values().map(|m| m.len).sum();
        account.add(bytes);
        let durable = meta.last_seq;
        if bytes > 0 || durable > 0 {
            info!(
                replication = %id,
                durable_seq = durable,
                segments = map.len(),
                cache_bytes = bytes,
                "recovered replication cache"
            );
        }

        let sh = Arc::new(Shared {
            id: id.clone(),
            dir,
            info: watch::Sender::new(info),
            segments: Mutex::new(Segments { map, bytes }),
            durable: watch::Sender::new(durable),
            applied: watch::Sender::new(None),
            account,
            stats: Stats::default(),
        });
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let writer = Writer {
            sh: sh.clone(),
            seg_dir,
            seg_max,
            file,
            name: active,
            len: meta.len,
            synced_len: meta.len,
            held: durable,
            durable,
            broken: None,
        };
        let handle = std::thread::Builder::new()
            .name(format!("ps-writer-{}", short(&id)))
            .spawn(move || writer.run(rx))
            .map_err(io_err(Path::new("writer thread")))?;
        Ok(Replication {
            sh,
            tx,
            writer: Mutex::new(Some(handle)),
        })
    }
}

fn short(id: &str) -> &str {
    let mut end = id.len().min(6);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    &id[..end]
}

/// `info.json`: the agent's hello, kept so forwarding can start after a
/// restart before the agent reconnects.
#[derive(Debug, Serialize, Deserialize)]
struct StoredInfo {
    replication_id: String,
    machine_id: String,
    disks: Vec<StoredDisk>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredDisk {
    index: u32,
    name: String,
    size: u64,
}

impl From<&ReplicationInfo> for StoredInfo {
    fn from(i: &ReplicationInfo) -> Self {
        StoredInfo {
            replication_id: i.replication_id.clone(),
            machine_id: i.machine_id.clone(),
            disks: i
                .disks
                .iter()
                .map(|d| StoredDisk {
                    index: d.index,
                    name: d.name.clone(),
                    size: d.size,
                })
                .collect(),
        }
    }
}

impl From<StoredInfo> for ReplicationInfo {
    fn from(s: StoredInfo) -> Self {
        ReplicationInfo {
            replication_id: s.replication_id,
            machine_id: s.machine_id,
            disks: s
                .disks
                .into_iter()
                .map(|d| DiskInfo {
                    index: d.index,
                    name: d.name,
                    size: d.size,
                })
                .collect(),
        }
    }
}

fn load_info(dir: &Path, id: &str) -> Option<ReplicationInfo> {
    let path = dir.join("info.json");
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(replication = %id, "cannot read {}: {e}; forwarding waits for the agent's hello", path.display());
            return None;
        }
    };
    match serde_json::from_slice::<StoredInfo>(&bytes) {
        Ok(s) if s.replication_id == id => Some(s.into()),
        Ok(s) => {
            warn!(replication = %id, "{} names replication {:?}; ignored until the agent's hello", path.display(), s.replication_id);
            None
        }
        Err(e) => {
            warn!(replication = %id, "{} is invalid ({e}); ignored until the agent's hello", path.display());
            None
        }
    }
}

// --------------------------------------------------------------------- writer

/// Owns a replication's newest segment; appends with group commit and trims.
struct Writer {
    sh: Arc<Shared>,
    seg_dir: PathBuf,
    seg_max: u64,
    /// The newest segment, which entries are appended to.
    file: File,
    name: u64,
    /// Bytes written to `file` (maybe not yet synced).
    len: u64,
    synced_len: u64,
    /// Last seq written (maybe not yet synced).
    held: u64,
    /// Last seq synced.
    durable: u64,
    /// Set when a failed write could not be undone; every append is refused.
    broken: Option<String>,
}

enum Outcome {
    /// Acknowledge with the durable seq once the batch is synced.
    Ack,
    Refuse(AppendError),
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriterMsg>) {
        while let Some(msg) = rx.blocking_recv() {
            let mut batch = Vec::new();
            let mut bytes = 0u64;
            let mut stop = false;
            let mut next = Some(msg);
            while let Some(m) = next.take() {
                match m {
                    WriterMsg::Append(a) => {
                        bytes += a.bytes.len() as u64;
                        batch.push(a);
                    }
                    WriterMsg::Wake => {}
                    WriterMsg::Stop => {
                        stop = true;
                        break;
                    }
                }
                if batch.len() < BATCH_MAX_FRAMES && bytes < BATCH_MAX_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.commit(batch);
            }
            self.trim();
            if stop {
                break;
            }
        }
    }

    /// Appends a batch, syncs once, then answers every frame of it.
    fn commit(&mut self, batch: Vec<Append>) {
        let reserved: u64 = batch.iter().map(|a| a.reserved).sum();
        let mut replies = Vec::with_capacity(batch.len());
        let result = self.write_batch(batch, &mut replies);
        let result = result.and_then(|()| {
            if self.len != self.synced_len {
                self.sync()?;
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                self.publish();
                self.sh.account.release(reserved);
                let durable = self.durable;
                for (reply, outcome) in replies {
                    let _ = reply.send(match outcome {
                        Outcome::Ack => Ok(durable),
                        Outcome::Refuse(e) => Err(e),
                    });
                }
            }
            Err(e) => {
                let message = format!(
                    "segment {}: {e}",
                    self.seg_dir.join(segment::file_name(self.name)).display()
                );
                error!(replication = %self.sh.id, "cannot write the cache: {message}; the frames were not acknowledged");
                self.undo();
                self.sh.account.release(reserved);
                for (reply, _) in replies {
                    let _ = reply.send(Err(AppendError::Io {
                        replication: self.sh.id.clone(),
                        message: message.clone(),
                    }));
                }
            }
        }
    }

    fn write_batch(
        &mut self,
        batch: Vec<Append>,
        replies: &mut Vec<(oneshot::Sender<Result<u64, AppendError>>, Outcome)>,
    ) -> io::Result<()> {
        let sh = self.sh.clone();
        let stats = &sh.stats;
        for a in batch {
            if let Some(why) = &self.broken {
                let e = AppendError::Io {
                    replication: self.sh.id.clone(),
                    message: why.clone(),
                };
                replies.push((a.reply, Outcome::Refuse(e)));
                continue;
            }
            if a.last_seq <= self.held {
                stats.frames_duplicate.fetch_add(1, Ordering::Relaxed);
                replies.push((a.reply, Outcome::Ack));
                continue;
            }
            if a.first_seq > self.held + 1 {
                let e = AppendError::Gap {
                    replication: self.sh.id.clone(),
                    first_seq: a.first_seq,
                    held: self.held,
                };
                replies.push((a.reply, Outcome::Refuse(e)));
                continue;
            }
            // Registered before the write, so a failed write answers it too.
            replies.push((a.reply, Outcome::Ack));
            let n = segment::entry_len(a.bytes.len());
            if self.len > 0 && self.len + n > self.seg_max {
                self.sync()?;
                self.publish();
                self.rotate()?;
            }
            let header = segment::entry_header(&a.bytes);
            self.file.write_all_at(&header, self.len)?;
            self.file
                .write_all_at(&a.bytes, self.len + segment::ENTRY_HEADER as u64)?;
            self.len += n;
            self.held = a.last_seq;
            stats
                .bytes_stored
                .fetch_add(a.bytes.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        self.synced_len = self.len;
        self.durable = self.held;
        Ok(())
    }

    /// Makes synced data visible: segment table, cache bytes, durable seq.
    fn publish(&self) {
        let added = {
            let mut segs = self.sh.segments();
            let meta = SegMeta {
                len: self.synced_len,
                last_seq: self.durable,
            };
            let old = segs.map.insert(self.name, meta).map(|m| m.len).unwrap_or(0);
            let added = self.synced_len.saturating_sub(old);
            segs.bytes += added;
            added
        };
        self.sh.account.add(added);
        let d = self.durable;
        self.sh.durable.send_if_modified(|v| {
            let changed = *v != d;
            *v = d;
            changed
        });
    }

    /// Drops unsynced writes after an error.
    fn undo(&mut self) {
        let res = self
            .file
            .set_len(self.synced_len)
            .and_then(|()| self.file.sync_data());
        match res {
            Ok(()) => {
                self.len = self.synced_len;
                self.held = self.durable;
            }
            Err(e) => {
                let why = format!(
                    "a failed write to segment {} could not be undone ({e}); restart the process server to recover the cache",
                    self.seg_dir.join(segment::file_name(self.name)).display()
                );
                error!(replication = %self.sh.id, "{why}");
                self.broken = Some(why);
            }
        }
    }

    /// Starts a new, empty newest segment named after the next seq. The
    /// current one must be synced.
    fn rotate(&mut self) -> io::Result<()> {
        let name = self.durable + 1;
        let path = self.seg_dir.join(segment::file_name(name));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        fsync_dir(&self.seg_dir)?;
        self.file = file;
        self.name = name;
        self.len = 0;
        self.synced_len = 0;
        self.publish();
        Ok(())
    }

    /// Deletes segments the master target has applied. The newest segment
    /// is replaced by a fresh one first when it is fully applied.
    fn trim(&mut self) {
        let Some(applied) = *self.sh.applied.borrow() else {
            return;
        };
        if self.broken.is_none() && applied > self.held && self.len == self.synced_len {
            // The MT holds more than this cache (the cache was lost or set
            // aside, or the replication moved to this PS): nothing cached is
            // needed any more, and the agent must resume after the MT's seq,
            // not ours.
            info!(
                replication = %self.sh.id,
                applied_seq = applied,
                durable_seq = self.durable,
                "the master target has applied more than this cache holds; the cache skips ahead to its seq"
            );
            self.held = applied;
            self.durable = applied;
            if let Err(e) = self.rotate() {
                warn!(replication = %self.sh.id, "cannot start a new segment: {e}");
            }
        }
        if self.broken.is_none()
            && self.len > 0
            && self.len == self.synced_len
            && self.durable <= applied
        {
            if let Err(e) = self.rotate() {
                warn!(replication = %self.sh.id, "cannot start a new segment: {e}; the applied one is kept");
            }
        }
        let victims: Vec<(u64, SegMeta)> = {
            let mut segs = self.sh.segments();
            let v: Vec<(u64, SegMeta)> = segs
                .map
                .iter()
                .filter(|(n, m)| **n != self.name && m.last_seq <= applied)
                .map(|(n, m)| (*n, *m))
                .collect();
            for (n, _) in &v {
                segs.map.remove(n);
            }
            v
        };
        if victims.is_empty() {
            return;
        }
        let mut freed = 0;
        for (name, meta) in &victims {
            let path = self.seg_dir.join(segment::file_name(*name));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(replication = %self.sh.id, "cannot delete applied segment {}: {e}", path.display())
                }
            }
            freed += meta.len;
        }
        if let Err(e) = fsync_dir(&self.seg_dir) {
            warn!(replication = %self.sh.id, "cannot sync {}: {e}", self.seg_dir.display());
        }
        {
            let mut segs = self.sh.segments();
            segs.bytes = segs.bytes.saturating_sub(freed);
        }
        self.sh.account.sub(freed);
    }
}

// ---------------------------------------------------------------------- cache

/// All replications' caches under one directory, sharing one cap.
#[derive(Debug)]
pub struct Cache {
    root: PathBuf,
    account: Arc<Account>,
    seg_max: u64,
    reps: Mutex<BTreeMap<String, Arc<Replication>>>,
}

impl Cache {
    /// Opens the cache directory and recovers every replication in it
    /// (blocking).
    pub fn open(root: &Path, cap: u64) -> Result<Cache, CacheError> {
        Cache::open_with_segment_max(root, cap, (cap / 8).clamp(1 << 20, SEGMENT_MAX_BYTES))
    }

    /// As [`Cache::open`] with a chosen segment size (tests).
    pub fn open_with_segment_max(root: &Path, cap: u64, seg_max: u64) -> Result<Cache, CacheError> {
        fs::create_dir_all(root).map_err(io_err(root))?;
        let account = Arc::new(Account::new(cap));
        let mut reps = BTreeMap::new();
        let mut entries = Vec::new();
        for ent in fs::read_dir(root).map_err(io_err(root))? {
            let ent = ent.map_err(io_err(root))?;
            if !ent.file_type().map_err(io_err(root))?.is_dir() {
                continue;
            }
            let Some(id) = ent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if id.starts_with(".removed-") {
                // A RemoveReplication interrupted by a crash.
                let _ = fs::remove_dir_all(ent.path());
                continue;
            }
            if check_replication_id(&id).is_err() {
                continue;
            }
            entries.push(id);
        }
        entries.sort();
        for id in entries {
            let rep = Replication::open(root.join(&id), id.clone(), account.clone(), seg_max)?;
            reps.insert(id, Arc::new(rep));
        }
        Ok(Cache {
            root: root.to_path_buf(),
            account,
            seg_max,
            reps: Mutex::new(reps),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn account(&self) -> &Arc<Account> {
        &self.account
    }
    fn reps(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Replication>>> {
        self.reps.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn replications(&self) -> Vec<Arc<Replication>> {
        self.reps().values().cloned().collect()
    }
    pub fn get(&self, id: &str) -> Option<Arc<Replication>> {
        self.reps().get(id).cloned()
    }

    /// The replication an agent's hello names, created on first use, with
    /// its stored info refreshed (blocking). Refused when the replication
    /// belongs to another machine. Returns whether it was created.
    pub fn hello(&self, info: &ReplicationInfo) -> Result<(Arc<Replication>, bool), CacheError> {
        let id = &info.replication_id;
        check_replication_id(id)?;
        let mut reps = self.reps();
        let (rep, created) = match reps.get(id) {
            Some(r) => (r.clone(), false),
            None => {
                let dir = self.root.join(id);
                let rep = Arc::new(Replication::open(
                    dir,
                    id.clone(),
                    self.account.clone(),
                    self.seg_max,
                )?);
                fsync_dir(&self.root).map_err(io_err(&self.root))?;
                reps.insert(id.clone(), rep.clone());
                (rep, true)
            }
        };
        drop(reps);
        if let Some(stored) = rep.info() {
            if stored.machine_id != info.machine_id {
                return Err(CacheError::WrongMachine {
                    replication: id.clone(),
                    stored: stored.machine_id,
                    claimed: info.machine_id.clone(),
                });
            }
        }
        rep.store_info(info)?;
        Ok((rep, created))
    }

    /// The replication `id`, created empty (no info until the agent's
    /// hello) on first use (blocking). For the CS's AddReplication.
    pub fn ensure(&self, id: &str) -> Result<Arc<Replication>, CacheError> {
        check_replication_id(id)?;
        let mut reps = self.reps();
        if let Some(r) = reps.get(id) {
            return Ok(r.clone());
        }
        let rep = Arc::new(Replication::open(
            self.root.join(id),
            id.to_string(),
            self.account.clone(),
            self.seg_max,
        )?);
        fsync_dir(&self.root).map_err(io_err(&self.root))?;
        reps.insert(id.to_string(), rep.clone());
        Ok(rep)
    }

    /// Forgets replication `id`: stops its writer, deletes its cached
    /// frames and files (blocking). Returns whether it existed. Agents still
    /// streaming it get refusals until they stop or say hello again.
    pub fn remove(&self, id: &str) -> Result<bool, CacheError> {
        let Some(rep) = self.reps().remove(id) else {
            return Ok(false);
        };
        rep.stop_blocking();
        let bytes = rep.cache_bytes();
        let dir = rep.dir().to_path_buf();
        // Renamed first, so a crash mid-delete leaves no half replication
        // (`open` skips names that are not replication ids).
        let gone = self.root.join(format!(".removed-{id}"));
        fs::rename(&dir, &gone).map_err(io_err(&dir))?;
        fsync_dir(&self.root).map_err(io_err(&self.root))?;
        fs::remove_dir_all(&gone).map_err(io_err(&gone))?;
        self.account.sub(bytes);
        Ok(true)
    }

    /// Stops every writer after what is queued (blocking).
    pub fn shutdown(&self) {
        for rep in self.replications() {
            rep.stop_blocking();
        }
    }
}

/// Reads the frames stored for `rep` in seq order (tests and tools; the
/// forwarder streams them itself).
pub fn read_all(rep: &Replication) -> io::Result<Vec<(EntryMeta, Vec<u8>)>> {
    let mut out = Vec::new();
    for (name, meta) in rep.segments() {
        let path = rep.segments_dir().join(segment::file_name(name));
        let f = File::open(&path)?;
        let mut off = 0;
        loop {
            match segment::read_entry(&f, off, meta.len) {
                Ok(Some((m, bytes))) => {
                    off = m.end();
                    out.push((m, bytes));
                }
                Ok(None) => break,
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::tests::frame_bytes;

    fn info(rid: &str, machine: &str) -> ReplicationInfo {
        ReplicationInfo {
            replication_id: rid.into(),
            machine_id: machine.into(),
            disks: vec![DiskInfo {
                index: 0,
                name: "disk0".into(),
                size: 1 << 30,
            }],
        }
    }

    async fn put(rep: &Replication, first: u64, last: u64) -> Result<u64, AppendError> {
        let bytes = frame_bytes(rep.id(), first, last);
        rep.append(bytes.into(), first, last, 0)
            .await?
            .await
            .expect("writer answers")
    }

    async fn open(root: &Path, cap: u64, seg_max: u64) -> Cache {
        let root = root.to_path_buf();
        tokio::task::spawn_blocking(move || Cache::open_with_segment_max(&root, cap, seg_max))
            .await
            .unwrap()
            .unwrap()
    }

    async fn hello(
        cache: &Arc<Cache>,
        rid: &str,
        machine: &str,
    ) -> Result<Arc<Replication>, CacheError> {
        let c = cache.clone();
        let i = info(rid, machine);
        tokio::task::spawn_blocking(move || c.hello(&i).map(|(r, _)| r))
            .await
            .unwrap()
    }

    async fn shutdown(cache: Arc<Cache>) {
        tokio::task::spawn_blocking(move || cache.shutdown())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn dedup_overlap_and_gap_rules() {
        let d = tempfile::tempdir().unwrap();
        let cache = Arc::new(open(d.path(), 1 << 30, 1 << 20).await);
        let rep = hello(&cache, "r1", "m1").await.unwrap();
        assert_eq!(rep.durable(), 0);
        assert_eq!(put(&rep, 1, 3).await.unwrap(), 3);
        assert_eq!(put(&rep, 4, 6).await.unwrap(), 6);
        // Already held: dropped, answered with the durable seq.
        assert_eq!(put(&rep, 2, 5).await.unwrap(), 6);
        assert_eq!(put(&rep, 1, 6).await.unwrap(), 6);
        // Overlapping: stored as it is.
        assert_eq!(put(&rep, 5, 8).await.unwrap(), 8);
        // Gap: refused, nothing stored.
        let e = put(&rep, 10, 12).await.unwrap_err();
        assert!(
            matches!(
                e,
                AppendError::Gap {
                    first_seq: 10,
                    held: 8,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            tonic::Status::from(e).code(),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(put(&rep, 9, 9).await.unwrap(), 9);

        let seqs: Vec<(u64, u64)> = read_all(&rep)
            .unwrap()
            .iter()
            .map(|(m, _)| (m.first_seq, m.last_seq))
            .collect();
        assert_eq!(seqs, vec![(1, 3), (4, 6), (5, 8), (9, 9)]);
        assert_eq!(rep.stats().frames_duplicate.load(Ordering::Relaxed), 2);

        // Another machine may not use this replication.
        let e = hello(&cache, "r1", "m2").await.unwrap_err();
        assert!(matches!(e, CacheError::WrongMachine { .. }), "{e}");
        assert!(hello(&cache, "../x", "m1").await.is_err());

        // Restart: the durable seq and the info come back.
        shutdown(cache).await;
        drop(rep);
        let cache = Arc::new(open(d.path(), 1 << 30, 1 << 20).await);
        let rep = cache.get("r1").unwrap();
        assert_eq!(rep.durable(), 9);
        assert_eq!(rep.info().unwrap().machine_id, "m1");
        assert_eq!(put(&rep, 10, 10).await.unwrap(), 10);
        shutdown(cache).await;
    }

    #[tokio::test]
    async fn torn_tail_is_cut_on_restart_and_earlier_frames_survive() {
        for damage in ["truncate", "flip"] {
            let d = tempfile::tempdir().unwrap();
            let cache = Arc::new(open(d.path(), 1 << 30, 1 << 20).await);
            let rep = hello(&cache, "r", "m").await.unwrap();
            for s in 1..=5 {
                put(&rep, s, s).await.unwrap();
            }
            let seg = rep.segments_dir().join(segment::file_name(1));
            shutdown(cache).await;
            drop(rep);

            let full = fs::read(&seg).unwrap();
            let entry = full.len() / 5;
            match damage {
                "truncate" => fs::write(&seg, &full[..full.len() - entry / 2]).unwrap(),
                _ => {
                    let mut b = full.clone();
                    b[full.len() - 10] ^= 1;
                    fs::write(&seg, &b).unwrap();
                }
            }
            let cache = Arc::new(open(d.path(), 1 << 30, 1 << 20).await);
            let rep = cache.get("r").unwrap();
            assert_eq!(rep.durable(), 4, "{damage}");
            assert_eq!(
                fs::metadata(&seg).unwrap().len(),
                (entry * 4) as u64,
                "{damage}"
            );
            assert_eq!(read_all(&rep).unwrap().len(), 4);
            // The agent resends seq 5 and appending carries on from the cut.
            assert_eq!(put(&rep, 5, 6).await.unwrap(), 6);
            assert_eq!(read_all(&rep).unwrap().len(), 5);
            shutdown(cache).await;
        }
    }

    #[tokio::test]
    async fn rotation_trim_and_cap_accounting() {
        let d = tempfile::tempdir().unwrap();
        let frame_len = frame_bytes("r", 1, 1).len() as u64 + segment::ENTRY_HEADER as u64;
        // Three entries per segment; the cap is reached after eight.
        let cache = Arc::new(open(d.path(), frame_len * 8, frame_len * 3).await);
        let account = cache.account().clone();
        let rep = hello(&cache, "r", "m").await.unwrap();
        for s in 1..=7 {
            put(&rep, s, s).await.unwrap();
        }
        assert_eq!(account.total(), frame_len * 7);
        assert!(!account.is_full());
        put(&rep, 8, 8).await.unwrap();
        assert!(account.is_full());
        assert_eq!(rep.cache_bytes(), frame_len * 8);
        let names: Vec<u64> = rep.segments().keys().copied().collect();
        assert_eq!(names, vec![1, 4, 7]);

        // Reserved bytes count against the cap but are not cache bytes.
        account.release(0);
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

        // Waiters are released once trimming brings the total under the cap.
        let waiter = {
            let a = account.clone();
            tokio::spawn(async move { a.wait_below_cap().await })
        };
        rep.set_applied(4);
        let t0 = std::time::Instant::now();
        while rep.segments().contains_key(&1) {
            assert!(t0.elapsed().as_secs() < 5, "trim did not happen");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(account.total(), frame_len * 5);
        assert!(!rep.segments_dir().join(segment::file_name(1)).exists());
        // Segment 4 holds seqs up to 6, not all applied yet.
        assert!(rep.segments().contains_key(&4));

        // Everything applied: the newest segment is replaced by an empty one
        // that still records the durable seq.
        rep.set_applied(8);
        let t0 = std::time::Instant::now();
        while account.total() != 0 {
            assert!(t0.elapsed().as_secs() < 5, "trim did not happen");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(rep.segments().keys().copied().collect::<Vec<_>>(), vec![9]);
        shutdown(cache).await;
        drop(rep);
        let cache = Arc::new(open(d.path(), frame_len * 8, frame_len * 3).await);
        let rep = cache.get("r").unwrap();
        assert_eq!((rep.durable(), rep.cache_bytes()), (8, 0));
        shutdown(cache).await;
    }

    #[tokio::test]
    async fn frames_sent_back_to_back_are_durable_in_order_across_rotations() {
        // Frames queued faster than the writer syncs them go into group
        // commits: every answer must still come after its own frame is
        // synced, in order, also when a group crosses into a new segment.
        let d = tempfile::tempdir().unwrap();
        let frame_len = frame_bytes("r", 1, 1).len() as u64 + segment::ENTRY_HEADER as u64;
        let cache = Arc::new(open(d.path(), 1 << 30, frame_len * 5).await);
        let rep = hello(&cache, "r", "m").await.unwrap();
        let mut answers = Vec::new();
        for s in 1..=200u64 {
            let bytes = frame_bytes(rep.id(), s, s);
            answers.push((s, rep.append(bytes.into(), s, s, 0).await.unwrap()));
        }
        let mut last = 0;
        for (s, rx) in answers {
            let durable = rx.await.expect("writer answers").unwrap();
            assert!(
                durable >= s,
                "frame {s} answered with durable seq {durable}"
            );
            assert!(
                durable >= last,
                "answers went back from {last} to {durable}"
            );
            last = durable;
        }
        assert_eq!(rep.durable(), 200);
        shutdown(cache).await;
        drop(rep);
        let cache = Arc::new(open(d.path(), 1 << 30, frame_len * 5).await);
        let rep = cache.get("r").unwrap();
        assert_eq!(rep.durable(), 200);
        assert_eq!(rep.cache_bytes(), frame_len * 200);
        shutdown(cache).await;
    }

    #[tokio::test]
    async fn cache_skips_ahead_to_the_mt() {
        let d = tempfile::tempdir().unwrap();
        let cache = Arc::new(open(d.path(), 1 << 30, 1 << 20).await);
        let rep = hello(&cache, "r", "m").await.unwrap();
        put(&rep, 1, 2).await.unwrap();
        let mut durable = rep.durable_watch();
        rep.set_applied(10);
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            durable.wait_for(|d| *d == 10),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(put(&rep, 5, 10).await.unwrap(), 10);
        assert!(put(&rep, 12, 12).await.is_err());
        assert_eq!(put(&rep, 11, 11).await.unwrap(), 11);
        let seqs: Vec<u64> = read_all(&rep)
            .unwrap()
            .iter()
            .map(|(m, _)| m.first_seq)
            .collect();
        assert_eq!(seqs, vec![11]);
        shutdown(cache.clone()).await;
        drop(rep);
        let cache = Arc::new(open(d.path(), 1 << 30, 1 << 20).await);
        assert_eq!(cache.get("r").unwrap().durable(), 11);
        shutdown(cache).await;
    }

    #[tokio::test]
    async fn corrupt_middle_segment_sets_later_ones_aside() {
        let d = tempfile::tempdir().unwrap();
        let frame_len = frame_bytes("r", 1, 1).len() as u64 + segment::ENTRY_HEADER as u64;
        let cache = Arc::new(open(d.path(), 1 << 30, frame_len * 2).await);
        let rep = hello(&cache, "r", "m").await.unwrap();
        for s in 1..=6 {
            put(&rep, s, s).await.unwrap();
        }
        let dir = rep.segments_dir();
        shutdown(cache).await;
        drop(rep);
        // Segments 1 (1-2), 3 (3-4), 5 (5-6). Damage the second entry of 3.
        let p = dir.join(segment::file_name(3));
        let mut b = fs::read(&p).unwrap();
        let n = b.len();
        b[n - 5] ^= 0xff;
        fs::write(&p, &b).unwrap();
        let cache = Arc::new(open(d.path(), 1 << 30, frame_len * 2).await);
        let rep = cache.get("r").unwrap();
        assert_eq!(rep.durable(), 3);
        assert!(dir
            .join(format!("{}.corrupt", segment::file_name(5)))
            .exists());
        assert_eq!(put(&rep, 4, 4).await.unwrap(), 4);
        shutdown(cache).await;
    }
}
