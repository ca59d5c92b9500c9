//! The handle of one replication's cache: what the ingest stream, the
//! forwarder, the control channel and the status see of it (durable and
//! applied seqs, the segment table, counters), and the one door to its
//! writer, [`Replication::append`], whose answer comes only after the
//! frame's group commit is synced (DESIGN.md §6).

use super::cap::{Account, Share};
use super::error::{AppendError, CacheError};
use super::group_commit::{self, Append, WriterMsg};
use super::{applied_mark, info, recovery};
use prost::bytes::Bytes;
use rebound_proto::ReplicationInfo;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;
use tokio::sync::{mpsc, oneshot, watch};

/// One segment as the forwarder and the accounting see it: only synced data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegMeta {
    /// Synced length of the file.
    pub len: u64,
    /// Last seq held once this segment is read (name - 1 when empty).
    pub last_seq: u64,
}

/// The segment table of a replication (synced data only).
#[derive(Debug, Default)]
pub(super) struct Segments {
    /// Segments by first seq (file name).
    pub(super) map: BTreeMap<u64, SegMeta>,
    /// Sum of `len`.
    pub(super) bytes: u64,
}

/// Counters for the periodic summary and Status.
#[derive(Debug, Default)]
pub struct Stats {
    pub frames_in: AtomicU64,
    /// Frame bytes as the agent sent them.
    pub bytes_in: AtomicU64,
    /// Frame bytes as stored (after compression).
    pub bytes_stored: AtomicU64,
    /// Frame bytes with their bodies uncompressed, of the frames stored
    /// (counted with `bytes_stored`): against it, what compression saved.
    pub bytes_uncompressed: AtomicU64,
    /// Frames (or their seqs) the cache already held.
    pub frames_duplicate: AtomicU64,
    pub frames_forwarded: AtomicU64,
    pub bytes_forwarded: AtomicU64,
}

/// State shared between a replication's handle and its writer thread.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) id: String,
    pub(super) dir: PathBuf,
    info: watch::Sender<Option<ReplicationInfo>>,
    segments: Mutex<Segments>,
    pub(super) durable: watch::Sender<u64>,
    /// The master target's applied seq; `None` until it said so.
    pub(super) applied: watch::Sender<Option<u64>>,
    /// The applied seq last stored in `applied.seq` (see `applied_mark`).
    pub(super) applied_stored: AtomicU64,
    /// The seq the writer last skipped ahead to (0 if never): the MT had
    /// applied more than the cache held. A stream resumed below it ends.
    pub(super) skipped_to: watch::Sender<u64>,
    pub(super) account: Arc<Share>,
    pub(super) stats: Stats,
    /// RemoveReplication dropped this replication: frames are refused.
    removed: AtomicBool,
    /// The writer is asked to stop: it no longer waits for disk space.
    stopping: AtomicBool,
}

impl Shared {
    /// Whether the writer should give up waiting (the process server
    /// stops, or the replication was removed).
    pub(super) fn closing(&self) -> bool {
        self.stopping.load(Ordering::SeqCst) || self.removed.load(Ordering::SeqCst)
    }
    pub(super) fn segments(&self) -> MutexGuard<'_, Segments> {
        self.segments.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A replication's cache: its info, segments and writer.
#[derive(Debug)]
pub struct Replication {
    sh: Arc<Shared>,
    tx: mpsc::Sender<WriterMsg>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Replication {
    pub fn id(&self) -> &str {
        &self.sh.id
    }
    pub fn dir(&self) -> &Path {
        &self.sh.dir
    }
    pub(super) fn segments_dir(&self) -> PathBuf {
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
    /// The master target's applied seq as last stored on disk (0 when none
    /// was): what the cache must hold before it may answer a hello while
    /// the master target is silent.
    pub fn applied_stored(&self) -> u64 {
        self.sh.applied_stored.load(Ordering::SeqCst)
    }
    /// The seq the cache last skipped ahead to because the master target
    /// had applied more than it held (0 if never).
    pub fn skipped_watch(&self) -> watch::Receiver<u64> {
        self.sh.skipped_to.subscribe()
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
    /// Segment bytes holding records the master target has not applied
    /// yet (whole segments: a partly applied one counts in full).
    pub fn backlog_bytes(&self) -> u64 {
        let applied = self.applied();
        self.with_segments(|s| {
            s.map
                .values()
                .filter(|m| m.last_seq > applied)
                .map(|m| m.len)
                .sum()
        })
    }
    /// Each segment holding records the master target has not applied
    /// (as far as it said, or as last stored), by its last seq and when it
    /// was last written: when that seq became durable, at the latest. A
    /// segment whose time cannot be read is left out.
    pub fn unapplied_segment_times(&self) -> Vec<(u64, SystemTime)> {
        let applied = self.applied().max(self.applied_stored());
        let dir = self.segments_dir();
        self.segments()
            .into_iter()
            .filter(|(_, m)| m.last_seq > applied)
            .filter_map(|(first, m)| {
                let path = dir.join(crate::segment::file_name(first));
                let written = std::fs::metadata(path).and_then(|md| md.modified()).ok()?;
                Some((m.last_seq, written))
            })
            .collect()
    }
    pub fn stats(&self) -> &Stats {
        &self.sh.stats
    }
    /// A copy of the segment table (synced data only).
    pub fn segments(&self) -> BTreeMap<u64, SegMeta> {
        self.sh.segments().map.clone()
    }
    /// Runs `f` on the segment table under its lock.
    pub(super) fn with_segments<T>(&self, f: impl FnOnce(&Segments) -> T) -> T {
        f(&self.sh.segments())
    }

    /// Queues a frame (already in its stored form) for the writer. The
    /// returned receiver answers with the durable seq once the batch holding
    /// the frame is fsynced, or with why it was refused. `reserved` bytes,
    /// reserved in the account by the caller, are released once the frame
    /// is done with. `plain_len` is the frame's length with its body
    /// uncompressed, counted in [`Stats::bytes_uncompressed`] once stored.
    pub async fn append(
        &self,
        bytes: Bytes,
        first_seq: u64,
        last_seq: u64,
        plain_len: u64,
        reserved: u64,
    ) -> Result<oneshot::Receiver<Result<u64, AppendError>>, AppendError> {
        if self.is_removed() {
            self.sh.account.release(reserved);
            return Err(self.closed_error());
        }
        let (reply, rx) = oneshot::channel();
        let sent = self
            .tx
            .send(WriterMsg::Append(Append {
                bytes,
                first_seq,
                last_seq,
                plain_len,
                reserved,
                reply,
            }))
            .await;
        if sent.is_err() {
            self.sh.account.release(reserved);
            return Err(self.closed_error());
        }
        Ok(rx)
    }

    /// Why the writer takes no more frames: the replication was removed,
    /// or the process server shuts down.
    fn closed_error(&self) -> AppendError {
        let replication = self.sh.id.clone();
        if self.is_removed() {
            AppendError::Removed { replication }
        } else {
            AppendError::Closed { replication }
        }
    }

    /// RemoveReplication dropped it: every later frame is refused.
    pub(super) fn mark_removed(&self) {
        self.sh.removed.store(true, Ordering::SeqCst);
    }

    pub fn is_removed(&self) -> bool {
        self.sh.removed.load(Ordering::SeqCst)
    }

    /// This replication's share of the cache's account: what its frames
    /// count against, and whether its stream is paused.
    pub fn account(&self) -> &Arc<Share> {
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
            self.sh.stopping.store(true, Ordering::SeqCst);
            let _ = self.tx.blocking_send(WriterMsg::Stop);
            let _ = h.join();
        }
    }

    /// Stores the agent's hello in `info.json` when it changed (blocking).
    pub(super) fn store_info(&self, hello: &ReplicationInfo) -> Result<(), CacheError> {
        if self.sh.info.borrow().as_ref() == Some(hello) {
            return Ok(());
        }
        info::store(&self.sh.dir, hello)?;
        self.sh.info.send_replace(Some(hello.clone()));
        Ok(())
    }

    /// Recovers a replication's cache from disk and starts its writer
    /// (blocking).
    pub(super) fn open(
        dir: PathBuf,
        id: String,
        account: Arc<Account>,
        seg_max: u64,
    ) -> Result<Replication, CacheError> {
        let seg_dir = dir.join("segments");
        let recovered = recovery::recover(&seg_dir, &id)?;
        let stored_info = info::load(&dir, &id);
        let applied_stored = applied_mark::load(&dir, &id);
        let account = account.share(&id);
        account.add(recovered.bytes);
        let sh = Arc::new(Shared {
            id,
            dir,
            info: watch::Sender::new(stored_info),
            segments: Mutex::new(Segments {
                map: recovered.map,
                bytes: recovered.bytes,
            }),
            durable: watch::Sender::new(recovered.durable),
            applied: watch::Sender::new(None),
            applied_stored: AtomicU64::new(applied_stored),
            skipped_to: watch::Sender::new(0),
            account,
            stats: Stats::default(),
            removed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        });
        let (tx, handle) = group_commit::spawn(sh.clone(), seg_dir, seg_max, recovered.active)?;
        Ok(Replication {
            sh,
            tx,
            writer: Mutex::new(Some(handle)),
        })
    }
}
