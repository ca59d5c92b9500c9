//! The group-commit writer (DESIGN.md §6: "fsync (with group commit across
//! streams) before acknowledging the agent"; "segments are dropped once
//! they are applied").
//!
//! Every replication has one writer thread that owns its segment files. The
//! ingest streams hand it frames; it takes everything queued as one batch,
//! appends each frame as an entry of the newest segment, fdatasyncs once,
//! and only then answers each frame with the durable seq, so nothing is
//! acknowledged before it is on disk. The same thread deletes segments once
//! the master target has applied them, so file changes never race.
//!
//! The newest segment is never deleted: its name (durable seq + 1 when it
//! was created) keeps the durable seq across restarts even when everything
//! was applied and trimmed.
//!
//! A batch the cache's disk has no room for (ENOSPC, or a quota) is not
//! refused: the partial append is cut off, every stream pauses (see
//! `cap.rs`), an event names the replication and the segment, and the
//! writer retries the same batch once the filesystem has room for it (or
//! every [`DISK_FULL_FORCE_RETRY`] anyway), trimming applied segments every
//! [`DISK_FULL_RETRY`] in between, until it is stored. Only then are its
//! frames acknowledged, so nothing is acknowledged that is not on disk, and
//! replication resumes by itself once space returns.

use super::applied_mark;
use super::error::{AppendError, CacheError, SegmentFailure};
use super::recovery::ActiveSegment;
use super::replication::{SegMeta, Shared};
use crate::segment;
use prost::bytes::Bytes;
use rebound_common::durable::fsync_dir;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

/// Frames the writer takes into one group commit at most.
const BATCH_MAX_FRAMES: usize = 256;
/// Frame bytes the writer takes into one group commit at most.
const BATCH_MAX_BYTES: u64 = 32 << 20;
/// Queue between the ingest streams and a replication's writer.
const WRITER_QUEUE: usize = 64;
/// How often the writer looks for free space (and trims what the master
/// target applied) while a batch waits for the full disk.
const DISK_FULL_RETRY: Duration = Duration::from_secs(1);
/// How long a waiting batch goes without a write attempt at most, even
/// when the filesystem reports too little free space for it (its count
/// may miss space a write would find, e.g. freed by a delete in progress).
const DISK_FULL_FORCE_RETRY: Duration = Duration::from_secs(5);
/// How often the master target's applied seq is stored at most, unless
/// segments are about to be trimmed on its account (then it is stored
/// first, always).
const APPLIED_STORE_EVERY: Duration = Duration::from_millis(100);
/// How often a disk that stays full is reported again.
const DISK_FULL_REPEAT: Duration = Duration::from_secs(60);

/// Whether a write failed for want of space (ENOSPC, or a quota): the
/// writer waits and retries instead of refusing the frames.
fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Since when, and when last reported, a replication's writer has been
/// waiting for space.
struct DiskFull {
    since: Instant,
    reported: Instant,
    attempts: u64,
}

/// Whether a batch needing `need` bytes is worth writing again after
/// `waited` since its last attempt, given the filesystem's free space
/// (`available`): only when it fits, or every [`DISK_FULL_FORCE_RETRY`]
/// (or when the free space cannot be read), so a full disk is not
/// rewritten and truncated every second.
fn worth_retrying(available: io::Result<u64>, need: u64, waited: Duration) -> bool {
    match available {
        Ok(free) => free >= need || waited >= DISK_FULL_FORCE_RETRY,
        Err(_) => true,
    }
}

/// What the replication handle asks of its writer.
pub(super) enum WriterMsg {
    Append(Append),
    /// Re-check what can be trimmed.
    Wake,
    /// Finish what is queued before this and exit.
    Stop,
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

/// One frame to store, in its stored form.
pub(super) struct Append {
    pub(super) bytes: Bytes,
    pub(super) first_seq: u64,
    pub(super) last_seq: u64,
    /// The frame's bytes with its body uncompressed (for the compression
    /// ratio), counted once the frame is stored.
    pub(super) plain_len: u64,
    /// Bytes reserved in the account for this frame, released once done.
    pub(super) reserved: u64,
    pub(super) reply: oneshot::Sender<Result<u64, AppendError>>,
}

/// Starts the writer thread of a recovered replication.
pub(super) fn spawn(
    sh: Arc<Shared>,
    seg_dir: PathBuf,
    seg_max: u64,
    active: ActiveSegment,
) -> Result<(mpsc::Sender<WriterMsg>, JoinHandle<()>), CacheError> {
    let (tx, rx) = mpsc::channel(WRITER_QUEUE);
    let name = format!("ps-writer-{}", short(&sh.id));
    let replication = sh.id.clone();
    let writer = Writer {
        sh,
        seg_dir,
        seg_max,
        file: active.file,
        name: active.name,
        len: active.len,
        synced_len: active.len,
        held: active.last_seq,
        durable: active.last_seq,
        broken: None,
        applied_stored_at: None,
    };
    let handle = std::thread::Builder::new()
        .name(name)
        .spawn(move || writer.run(rx))
        .map_err(|source| CacheError::WriterThread {
            replication,
            source,
        })?;
    Ok((tx, handle))
}

/// The first characters of a replication id, for a thread name.
fn short(id: &str) -> &str {
    let mut end = id.len().min(6);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    &id[..end]
}

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
    broken: Option<AppendError>,
    /// When the applied seq was last stored (see [`APPLIED_STORE_EVERY`]).
    applied_stored_at: Option<Instant>,
}

enum Outcome {
    /// Acknowledge with the durable seq once the batch is synced.
    Ack,
    Refuse(AppendError),
}

/// What writing a batch did, counted once it is synced.
struct Written {
    /// One per frame, in order.
    outcomes: Vec<Outcome>,
    /// Frames the cache already held.
    duplicates: u64,
    /// Frame bytes written.
    bytes: u64,
    /// The written frames' bytes with their bodies uncompressed.
    plain: u64,
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

    /// What failed, where: `e` on the newest segment.
    fn failure(&self, e: io::Error) -> SegmentFailure {
        SegmentFailure {
            replication: self.sh.id.clone(),
            segment: self.seg_dir.join(segment::file_name(self.name)),
            source: Arc::new(e),
        }
    }

    /// Appends a batch, syncs once, then answers every frame of it. A full
    /// disk is waited out (see the module doc); any other failure refuses
    /// the batch.
    fn commit(&mut self, batch: Vec<Append>) {
        let reserved: u64 = batch.iter().map(|a| a.reserved).sum();
        let mut full: Option<DiskFull> = None;
        let result = loop {
            let attempt = self.write_batch(&batch).and_then(|outcomes| {
                if self.len != self.synced_len {
                    self.sync()?;
                }
                Ok(outcomes)
            });
            match attempt {
                Ok(outcomes) => break Ok(outcomes),
                Err(e) => {
                    let failure = self.failure(e);
                    // The partial append is cut off before any retry.
                    self.undo();
                    if is_disk_full(&failure.source) && self.broken.is_none() && !self.sh.closing()
                    {
                        let need = batch
                            .iter()
                            .map(|a| segment::entry_len(a.bytes.len()))
                            .sum();
                        self.wait_for_space(&failure, &mut full, need);
                        continue;
                    }
                    break Err(AppendError::Io(failure));
                }
            }
        };
        if let Some(f) = full {
            self.space_returned(f, result.is_ok());
        }
        match result {
            Ok(written) => {
                self.publish();
                self.sh.account.release(reserved);
                let stats = &self.sh.stats;
                stats
                    .frames_duplicate
                    .fetch_add(written.duplicates, Ordering::Relaxed);
                stats
                    .bytes_stored
                    .fetch_add(written.bytes, Ordering::Relaxed);
                stats
                    .bytes_uncompressed
                    .fetch_add(written.plain, Ordering::Relaxed);
                let durable = self.durable;
                for (a, outcome) in batch.into_iter().zip(written.outcomes) {
                    let _ = a.reply.send(match outcome {
                        Outcome::Ack => Ok(durable),
                        Outcome::Refuse(e) => Err(e),
                    });
                }
            }
            Err(e) => {
                error!(replication = %self.sh.id, "{e}; the frames were not acknowledged");
                self.sh.account.release(reserved);
                for a in batch {
                    let _ = a.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Reports the full disk (at once, then every [`DISK_FULL_REPEAT`]),
    /// pauses every stream, and waits until the batch of `need` bytes is
    /// worth writing again (see [`worth_retrying`]), trimming what the
    /// master target applied meanwhile (which may free the space) every
    /// [`DISK_FULL_RETRY`].
    fn wait_for_space(&mut self, failure: &SegmentFailure, full: &mut Option<DiskFull>, need: u64) {
        let now = Instant::now();
        let what = format!(
            "replication {}: the process server's cache disk is full: cannot append to segment {} ({}); its agent streams are paused (the agents keep their changes and fall back to bitmap mode) and the frames are not acknowledged; free space on that filesystem (or lower cache_max_bytes below its size); the process server retries once there is room (at least every {} s) and resumes by itself",
            self.sh.id,
            failure.segment.display(),
            failure.source,
            DISK_FULL_FORCE_RETRY.as_secs()
        );
        match full {
            None => {
                error!(replication = %self.sh.id, event = "disk-full", path = %failure.segment.display(), "disk-full: {what}");
                self.sh.account.event("error", "disk-full", what);
                self.sh.account.set_disk_full(true);
                *full = Some(DiskFull {
                    since: now,
                    reported: now,
                    attempts: 1,
                });
            }
            Some(f) => {
                f.attempts += 1;
                if now.duration_since(f.reported) >= DISK_FULL_REPEAT {
                    f.reported = now;
                    let secs = now.duration_since(f.since).as_secs();
                    warn!(replication = %self.sh.id, event = "disk-full", path = %failure.segment.display(), "disk-full for {secs} s ({} attempts): {what}", f.attempts);
                    self.sh.account.event(
                        "error",
                        "disk-full",
                        format!("{what} (full for {secs} s)"),
                    );
                }
            }
        }
        let attempt = Instant::now();
        loop {
            std::thread::sleep(DISK_FULL_RETRY);
            self.trim();
            let free = rebound_common::sys::available_bytes(&self.seg_dir);
            if self.sh.closing() || worth_retrying(free, need, attempt.elapsed()) {
                return;
            }
        }
    }

    /// Ends a full-disk wait: the batch was stored (`stored`), or the
    /// writer gave up (the replication is closing or removed).
    fn space_returned(&self, f: DiskFull, stored: bool) {
        self.sh.account.set_disk_full(false);
        let secs = f.since.elapsed().as_secs();
        if stored {
            let what = format!(
                "replication {}: disk space returned: the process server's cache stored the frames it waited {secs} s for ({} attempts); its agent streams resumed",
                self.sh.id, f.attempts
            );
            info!(replication = %self.sh.id, event = "disk-space-returned", "{what}");
            self.sh.account.event("info", "disk-space-returned", what);
        }
    }

    /// Writes a batch after the newest segment's synced data (not synced
    /// yet) and says how each frame is to be answered once it is.
    fn write_batch(&mut self, batch: &[Append]) -> io::Result<Written> {
        let mut w = Written {
            outcomes: Vec::with_capacity(batch.len()),
            duplicates: 0,
            bytes: 0,
            plain: 0,
        };
        let outcomes = &mut w.outcomes;
        for a in batch {
            if let Some(e) = &self.broken {
                outcomes.push(Outcome::Refuse(e.clone()));
                continue;
            }
            if a.last_seq <= self.held {
                w.duplicates += 1;
                outcomes.push(Outcome::Ack);
                continue;
            }
            if a.first_seq > self.held + 1 {
                outcomes.push(Outcome::Refuse(AppendError::Gap {
                    replication: self.sh.id.clone(),
                    first_seq: a.first_seq,
                    held: self.held,
                }));
                continue;
            }
            outcomes.push(Outcome::Ack);
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
            w.bytes += a.bytes.len() as u64;
            w.plain += a.plain_len;
        }
        Ok(w)
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
                let e = AppendError::Broken(self.failure(e));
                error!(replication = %self.sh.id, "{e}");
                self.broken = Some(e);
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

    /// Stores the master target's applied seq in the replication's
    /// directory when it changed: at most every [`APPLIED_STORE_EVERY`],
    /// or now when `force` (before anything is trimmed on its account).
    /// Whether the stored seq is `applied` (or the disk is full, where
    /// trimming must go on to free space).
    fn store_applied(&mut self, applied: u64, force: bool) -> bool {
        if self.sh.applied_stored.load(Ordering::SeqCst) == applied {
            return true;
        }
        if !force
            && self
                .applied_stored_at
                .is_some_and(|t| t.elapsed() < APPLIED_STORE_EVERY)
        {
            return false;
        }
        self.applied_stored_at = Some(Instant::now());
        match applied_mark::store(&self.sh.dir, applied) {
            Ok(()) => {
                self.sh.applied_stored.store(applied, Ordering::SeqCst);
                true
            }
            Err(e) => {
                let full = is_disk_full(&e);
                warn!(
                    replication = %self.sh.id,
                    dir = %self.sh.dir.display(),
                    "cannot store the master target's applied seq {applied}: {e}; {}",
                    if full {
                        "applied segments are trimmed anyway to free space"
                    } else {
                        "applied segments are kept until it can be stored"
                    }
                );
                full
            }
        }
    }

    /// Deletes segments the master target has applied. The newest segment
    /// is replaced by a fresh one first when it is fully applied.
    fn trim(&mut self) {
        let Some(applied) = *self.sh.applied.borrow() else {
            return;
        };
        self.store_applied(applied, false);
        if self.broken.is_none() && applied > self.held && self.len == self.synced_len {
            if !self.store_applied(applied, true) {
                return;
            }
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
            // Streams resumed below it end, so their agents reconnect and
            // resume after it instead of having seqs acknowledged as
            // duplicates that the master target never got from them.
            self.sh.skipped_to.send_replace(applied);
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
        let any = self
            .sh
            .segments()
            .map
            .iter()
            .any(|(n, m)| *n != self.name && m.last_seq <= applied);
        if !any || !self.store_applied(applied, true) {
            return;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_retried_when_the_batch_fits_or_every_few_seconds() {
        let short = Duration::from_secs(1);
        assert!(!worth_retrying(Ok(4095), 4096, short), "too little room");
        assert!(worth_retrying(Ok(4096), 4096, short), "room for the batch");
        assert!(
            worth_retrying(Ok(0), 4096, DISK_FULL_FORCE_RETRY),
            "a retry every few seconds anyway"
        );
        let unknown = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(
            worth_retrying(Err(unknown), 4096, short),
            "free space unknown"
        );
    }
}
