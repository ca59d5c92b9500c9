//! Applying frames to the replica (DESIGN.md §7 "Apply").
//!
//! Every frame is verified (hash, replication, seq range, disk bounds) on its
//! own before anything of it is applied. The frames received so far are then
//! applied as one sequence of records in one durability cycle, in this order:
//! 1. for every 4 KiB block written for the first time in the current
//!    interval, its old content is appended to the interval's journal as an
//!    undo record; the journal is fdatasynced;
//! 2. the new data is written to the replicas; the replicas are fdatasynced;
//! 3. the applied seq (the last record of the cycle) is persisted:
//!    `applied.seq` with one pwrite + fdatasync (see `seqfile`), or
//!    `state.json` when a rarely changing field changed too;
//! 4. only then does the caller acknowledge that seq (acks are cumulative).
//!
//! A tag inside the cycle closes the interval exactly where it is in the
//! sequence: steps 1-2 run for the records before it, the point is appended
//! to the catalog (fsynced) and the applied seq persisted at the tag, and the
//! records after it start the next interval (their first write per block
//! saves an undo record again). Very large cycles are flushed in pieces
//! (step 1 then 2) before the end; steps 2's fdatasync and 3 are once per
//! cycle.
//!
//! A refused frame (bad hash, gap, wrong disk) stops the cycle before it:
//! the frames before it are applied and acknowledged, nothing of it is. An
//! IO error halfway through leaves the applied seq where it was; after a
//! failed write the in-memory state is rebuilt from disk (as after a
//! crash), and re-applying the frames is harmless because blocks already
//! saved in the interval are not saved again and writes are idempotent.
//! After a failed fdatasync nothing is rebuilt: the replication is poisoned
//! and refuses apply until the MT restarts (see `replication`). A write
//! that failed for want of space is retried by `disk_full` once space
//! returns.

use crate::catalog::PointEntry;
use crate::error::{io_err, MtError, Result};
use crate::journal::{self, BLOCK};
use crate::replication::{Inner, Replication};
use crate::state::ResyncWindow;
use crate::storage::Target;
use prost::bytes::Bytes;
use rebound_common::chunk::read_full_at;
use rebound_common::frame::{seq_range_flaw, Frame, FrameError, FrameRef, Record, Tag};
use rebound_common::time::now_ms;
use std::collections::HashSet;
use tracing::{error, info, warn};

const BS: u64 = BLOCK as u64;
/// Undo bytes or data bytes gathered before they are written out.
const BATCH_BYTES: usize = 16 << 20;
/// Zero records are applied in pieces of this size (their undo can be large).
const ZERO_PIECE: u64 = 16 << 20;
/// Decoded record data gathered for one durability cycle (a compressed
/// frame of zeroes can expand a thousandfold).
const CYCLE_BYTES: usize = 32 << 20;

#[derive(Clone, Copy)]
enum Op<'a> {
    Data {
        disk: usize,
        offset: u64,
        data: &'a [u8],
    },
    Zero {
        disk: usize,
        offset: u64,
        len: u64,
    },
}

/// Writes gathered for one fdatasync of the journal.
#[derive(Default)]
struct Batch<'a> {
    ops: Vec<Op<'a>>,
    data_bytes: usize,
    /// Encoded undo records, appended to the journal at flush.
    undo: Vec<u8>,
    /// Old content read for staging, reused (no fresh pages per read).
    old: Vec<u8>,
    /// (key, offset in `undo`) of the blocks saved by this batch.
    saved: Vec<(u64, u64)>,
    saved_set: HashSet<u64>,
}

impl Batch<'_> {
    fn full(&self) -> bool {
        self.undo.len() >= BATCH_BYTES || self.data_bytes >= BATCH_BYTES
    }
}

/// A verified, decoded frame waiting for its durability cycle (a clone
/// shares the records' data).
#[derive(Clone)]
pub(crate) struct Prepared {
    first_seq: u64,
    last_seq: u64,
    records: Vec<Record>,
    /// Bytes of record data it holds in memory.
    data_bytes: usize,
    /// Bytes its zero records clear.
    zero_bytes: u64,
}

impl Prepared {
    /// Bytes of record data it holds in memory.
    pub(crate) fn data_bytes(&self) -> usize {
        self.data_bytes
    }

    /// Disk space applying it can take, at most: an undo record and a
    /// replica block for every byte written, an undo record for every
    /// byte zeroed.
    pub(crate) fn space_needed(&self) -> u64 {
        (self.data_bytes as u64)
            .saturating_mul(2)
            .saturating_add(self.zero_bytes)
    }
}

impl Replication {
    /// Parses, verifies and applies one encoded frame. Returns the applied
    /// seq to acknowledge.
    pub fn apply_frame(&self, bytes: &[u8]) -> Result<u64> {
        let (applied, r) = self.apply_frames([Bytes::copy_from_slice(bytes)]);
        r.map(|()| applied)
    }

    /// Applies encoded frames in stream order, in as few durability cycles
    /// as their size allows (one for everything received so far, normally).
    /// Returns the applied seq to acknowledge (cumulative) and, when a frame
    /// was refused or applying failed, why: the frames before the refused
    /// one are applied and covered by the seq; nothing of the refused frame
    /// or of those after it is. The records' data are slices of the frames
    /// (no copy); each frame's buffer is dropped once its records are.
    pub fn apply_frames(&self, frames: impl IntoIterator<Item = Bytes>) -> (u64, Result<()>) {
        let prepared = frames.into_iter().map(|b| self.prepare_frame(&b));
        self.apply_batch(prepared)
    }

    /// Applies frames prepared ahead with [`Replication::prepare_frame`],
    /// in stream order, as [`Replication::apply_frames`] does: a refused
    /// one (`Err`) stops the apply after the frames before it.
    pub(crate) fn apply_prepared(&self, frames: Vec<Result<Prepared>>) -> (u64, Result<()>) {
        self.apply_batch(frames.into_iter())
    }

    /// Verifies and applies one frame. Returns the applied seq.
    pub fn apply(&self, frame: &Frame) -> Result<u64> {
        self.apply_frame(&frame.to_bytes())
    }

    /// Step 1: checks a frame's replication and hash and decodes its records;
    /// nothing is applied yet, and no lock is held, so this can run while
    /// another cycle is applied.
    pub(crate) fn prepare_frame(&self, bytes: &Bytes) -> Result<Prepared> {
        let frame = FrameRef::parse(bytes).map_err(|e| {
            MtError::InvalidArgument(format!(
                "replication {}: refused a frame that cannot be parsed ({e}); nothing of it was applied",
                self.id()
            ))
        })?;
        let h = &frame.header;
        let range = format!("{}..={}", h.first_seq, h.last_seq);
        if h.replication_id != self.id() {
            return Err(MtError::InvalidArgument(format!(
                "frame seq {range} belongs to replication {} but was sent on the stream of replication {}; nothing of it was applied",
                h.replication_id, self.id()
            )));
        }
        if let Some(why) = seq_range_flaw(h.first_seq, h.last_seq) {
            return Err(self.malformed(&range, why));
        }
        let records = frame.shared_records(bytes).map_err(|e| {
            let msg = format!(
                "replication {} frame seq {range} refused: {e}; nothing of it was applied; the process server must resend it",
                self.id()
            );
            warn!(replication = %self.id(), seq = %range, error = %e, "frame refused");
            match e {
                FrameError::HashMismatch { .. } | FrameError::Decompress(_) => MtError::DataLoss(msg),
                _ => MtError::InvalidArgument(msg),
            }
        })?;
        // The range is valid, so the count cannot overflow.
        if records.len() as u64 != h.last_seq - h.first_seq + 1 {
            return Err(self.malformed(&range, "its body holds a different number of records"));
        }
        let (mut data_bytes, mut zero_bytes) = (0usize, 0u64);
        for r in &records {
            match r {
                Record::Write { data, .. } => data_bytes += data.len(),
                Record::Zero { len, .. } => zero_bytes = zero_bytes.saturating_add(*len),
                _ => {}
            }
        }
        Ok(Prepared {
            first_seq: h.first_seq,
            last_seq: h.last_seq,
            records,
            data_bytes,
            zero_bytes,
        })
    }

    /// The refusal of a frame whose seq range cannot be right.
    fn malformed(&self, range: &str, why: &str) -> MtError {
        warn!(replication = %self.id(), seq = %range, why, "malformed frame refused");
        MtError::InvalidArgument(format!(
            "replication {} refused the frame seq {range}: {why}; nothing of it was applied; the process server sent a malformed frame and must not resend it as it is",
            self.id()
        ))
    }

    /// Applies prepared frames, at most [`CYCLE_BYTES`] of data per
    /// durability cycle, stopping at the first refused one.
    fn apply_batch(&self, frames: impl Iterator<Item = Result<Prepared>>) -> (u64, Result<()>) {
        let mut pending = Vec::new();
        let mut bytes = 0usize;
        for p in frames {
            match p {
                Ok(p) => {
                    bytes += p.data_bytes;
                    pending.push(p);
                    if bytes >= CYCLE_BYTES {
                        if let Err(e) = self.commit(&mut pending) {
                            return (self.applied_seq(), Err(e));
                        }
                        bytes = 0;
                    }
                }
                Err(e) => {
                    let r = self.commit(&mut pending).and(Err(e));
                    return (self.applied_seq(), r);
                }
            }
        }
        let r = self.commit(&mut pending);
        (self.applied_seq(), r)
    }

    /// One durability cycle for `pending` (emptied): the admissible frames'
    /// records are applied as one sequence; the first frame refused stops
    /// the admission and its error is returned after the cycle.
    fn commit(&self, pending: &mut Vec<Prepared>) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let frames = std::mem::take(pending);
        let mut inner = self.write_inner()?;
        // Checked under the lock: a cycle that failed its fdatasync while
        // this one waited has poisoned the replication by now.
        self.check_not_poisoned()?;
        let mut next = inner.applied_seq() + 1;
        let mut first_seq = None;
        let mut recs: Vec<Record> = Vec::new();
        let mut refused = None;
        for f in frames {
            match self.admit(&inner, next, &f) {
                Ok(None) => {}
                Ok(Some(skip)) => {
                    first_seq.get_or_insert(f.first_seq + skip as u64);
                    next = f.last_seq + 1;
                    if recs.is_empty() && skip == 0 {
                        recs = f.records;
                    } else {
                        recs.extend(f.records.into_iter().skip(skip));
                    }
                }
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        if let Some(first) = first_seq {
            if let Err(e) = self.apply_records(&mut inner, first, &recs) {
                error!(replication = %self.id(), seq = %format!("{first}..={}", next - 1), error = %e,
                    "applying frames failed; they were not acknowledged and can be resent");
                self.recover_after(&mut inner, &e);
                return Err(e);
            }
        }
        refused.map_or(Ok(()), Err)
    }

    /// Whether frame `f` may follow seq `next - 1`: `None` when everything
    /// in it is applied already, else how many leading records to skip.
    fn admit(&self, inner: &Inner, next: u64, f: &Prepared) -> Result<Option<usize>> {
        if let Some(msg) = self.rolled_back_refusal(inner) {
            return Err(MtError::FailedPrecondition(msg));
        }
        if f.last_seq < next {
            return Ok(None);
        }
        if f.first_seq > next {
            return Err(MtError::FailedPrecondition(format!(
                "replication {} frame seq {}..={} leaves a gap: this MT has applied up to seq {}; resend from seq {next}",
                self.id(),
                f.first_seq,
                f.last_seq,
                next - 1
            )));
        }
        let skip = (next - f.first_seq) as usize;
        let Some(rest) = f.records.get(skip..) else {
            return Err(self.malformed(
                &format!("{}..={}", f.first_seq, f.last_seq),
                "it holds fewer records than its range",
            ));
        };
        self.validate(next, rest)?;
        Ok(Some(skip))
    }

    /// Why apply must refuse frames now, if it must.
    pub(crate) fn rolled_back_refusal(&self, inner: &Inner) -> Option<String> {
        if let Some(msg) = self.ended_refusal(inner, "it no longer accepts changes") {
            return Some(msg);
        }
        if let Some(h) = &inner.state().handed_over {
            return Some(format!(
                "replication {} was handed over at point {}; it no longer accepts changes",
                self.id(),
                h.point
            ));
        }
        if let Some(p) = &inner.state().rolled_back_to {
            return Some(format!(
                "replica of {} is rolled back to {}; restore pre-images first",
                self.machine_id(),
                p.id
            ));
        }
        if let Some(r) = &inner.state().rollback {
            return Some(format!(
                "replica of {} is being rolled back to {} (or that rollback was interrupted); re-run the rollback or restore pre-images first",
                self.machine_id(), r.point.id
            ));
        }
        None
    }

    fn disk_pos(&self, index: u32) -> Option<usize> {
        self.replica_disks().iter().position(|d| d.index() == index)
    }

    /// Checks every record before anything is applied.
    fn validate(&self, first_seq: u64, recs: &[Record]) -> Result<()> {
        for (i, rec) in recs.iter().enumerate() {
            let seq = first_seq + i as u64;
            let (disk, offset, len) = match rec {
                Record::Write { disk, offset, data } => (*disk, *offset, data.len() as u64),
                Record::Zero { disk, offset, len } => (*disk, *offset, *len),
                _ => continue,
            };
            let Some(pos) = self.disk_pos(disk) else {
                return Err(MtError::InvalidArgument(format!(
                    "replication {} record seq {seq} is for disk {disk}, which this replication does not have; nothing of the frame was applied",
                    self.id()
                )));
            };
            let d = &self.replica_disks()[pos];
            if offset.checked_add(len).is_none_or(|end| end > d.size()) {
                return Err(MtError::InvalidArgument(format!(
                    "replication {} record seq {seq} writes {len} bytes at offset {offset} of disk {disk} ({}), past its end at {}; nothing of the frame was applied",
                    self.id(), d.name(), d.size()
                )));
            }
        }
        Ok(())
    }

    /// Steps 2-5 for a sequence of admitted records (see the module doc).
    fn apply_records(&self, inner: &mut Inner, first_seq: u64, recs: &[Record]) -> Result<()> {
        let mut batch = Batch {
            undo: inner.take_scratch(),
            ..Batch::default()
        };
        let mut touched = vec![false; self.replica_disks().len()];
        // Bytes written or zeroed, counted once the cycle is durable.
        let mut applied_bytes = 0u64;
        for (i, rec) in recs.iter().enumerate() {
            let seq = first_seq + i as u64;
            match rec {
                Record::Write { disk, offset, data } => {
                    if data.is_empty() {
                        continue;
                    }
                    let pos = self.disk_pos(*disk).expect("validated");
                    self.stage(inner, &mut batch, pos, *offset, data.len() as u64)?;
                    batch.data_bytes += data.len();
                    applied_bytes += data.len() as u64;
                    batch.ops.push(Op::Data {
                        disk: pos,
                        offset: *offset,
                        data,
                    });
                    if batch.full() {
                        self.flush(inner, &mut batch, &mut touched)?;
                    }
                }
                Record::Zero { disk, offset, len } => {
                    let pos = self.disk_pos(*disk).expect("validated");
                    let end = offset + len;
                    applied_bytes += len;
                    let mut o = *offset;
                    while o < end {
                        let n = ZERO_PIECE.min(end - o);
                        self.stage(inner, &mut batch, pos, o, n)?;
                        batch.ops.push(Op::Zero {
                            disk: pos,
                            offset: o,
                            len: n,
                        });
                        if batch.full() {
                            self.flush(inner, &mut batch, &mut touched)?;
                        }
                        o += n;
                    }
                }
                Record::Tag(tag) => {
                    self.flush(inner, &mut batch, &mut touched)?;
                    self.sync_replicas(&mut touched)?;
                    self.cut_point(inner, seq, tag)?;
                }
                Record::ResyncBegin { disks, reason } => {
                    info!(replication = %self.id(), seq, disks = ?disks, reason = %reason, "resync window opened");
                    inner.open_resync(ResyncWindow {
                        begin_seq: seq,
                        disks: disks.clone(),
                        reason: reason.clone(),
                    });
                }
                Record::ResyncEnd => {
                    let begin = inner.close_resync().map(|w| w.begin_seq);
                    info!(replication = %self.id(), seq, begin_seq = ?begin, "resync window closed");
                }
            }
        }
        // Steps 2-4 for what is left; the replicas' fdatasync.
        self.flush(inner, &mut batch, &mut touched)?;
        self.sync_replicas(&mut touched)?;
        // Step 5: persist the applied seq; the caller acknowledges it.
        let last = first_seq + recs.len() as u64 - 1;
        inner.set_applied(last);
        inner.persist_applied()?;
        self.publish_applied(last);
        self.observed().applied(applied_bytes);
        if batch.undo.capacity() <= 2 * BATCH_BYTES {
            batch.undo.clear();
            inner.keep_scratch(batch.undo);
        }
        Ok(())
    }

    /// Step 2, staging: the old content of every block of
    /// `offset..offset+len` that the current interval has not saved yet goes
    /// into the batch's undo buffer.
    fn stage(
        &self,
        inner: &Inner,
        batch: &mut Batch<'_>,
        pos: usize,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        if len == 0 || !inner.journaling() {
            return Ok(());
        }
        let d = &self.replica_disks()[pos];
        let needs = |b: u64, batch: &Batch<'_>| {
            let k = journal::key(d.index(), b);
            !batch.saved_set.contains(&k) && !inner.journal().saved(k)
        };
        let first = offset / BS;
        let last = (offset + len - 1) / BS;
        let mut b = first;
        while b <= last {
            if !needs(b, batch) {
                b += 1;
                continue;
            }
            let mut e = b;
            while e < last && needs(e + 1, batch) {
                e += 1;
            }
            // None of these blocks is touched by a pending op of the batch
            // (those are all saved), so the replica holds their old content.
            let mut old = std::mem::take(&mut batch.old);
            old.clear();
            old.resize(((e - b + 1) * BS) as usize, 0);
            read_full_at(d.file(), &mut old, b * BS).map_err(io_err(|| {
                format!(
                    "cannot read old content of disk {} ({}) of replication {} at offset {}",
                    d.index(),
                    d.name(),
                    self.id(),
                    b * BS
                )
            }))?;
            for (j, chunk) in old.chunks_exact(BLOCK).enumerate() {
                let blk = b + j as u64;
                let rel = batch.undo.len() as u64;
                journal::encode(&mut batch.undo, d.index(), blk, chunk);
                let k = journal::key(d.index(), blk);
                batch.saved.push((k, rel));
                batch.saved_set.insert(k);
            }
            batch.old = old;
            b = e + 1;
        }
        Ok(())
    }

    /// Steps 2-4 for a batch: saves its undo records in the retention
    /// journal, fdatasyncs the journal, then writes the batch's data to the
    /// replicas (their fdatasync is [`Replication::sync_replicas`]).
    fn flush(&self, inner: &mut Inner, batch: &mut Batch<'_>, touched: &mut [bool]) -> Result<()> {
        inner.journal_mut().save_undo(&batch.undo, &batch.saved)?;
        inner.journal_mut().sync()?;
        batch.undo.clear();
        batch.saved.clear();
        batch.saved_set.clear();
        self.write_replicas(inner, batch, touched)
    }

    /// Step 4, the writes: the batch's data goes to the replicas. A chunk's
    /// cached hash is forgotten before it is written, and its new hash kept
    /// only once the write succeeded (see `hash_cache`).
    fn write_replicas(
        &self,
        inner: &mut Inner,
        batch: &mut Batch<'_>,
        touched: &mut [bool],
    ) -> Result<()> {
        let storage = self.storage();
        let hashes = inner.cached_hashes_mut();
        for op in batch.ops.drain(..) {
            let (disk, offset, len) = match op {
                Op::Data { disk, offset, data } => (disk, offset, data.len() as u64),
                Op::Zero { disk, offset, len } => (disk, offset, len),
            };
            let d = &self.replica_disks()[disk];
            hashes.forget_range(disk, offset, len);
            let written = match op {
                Op::Data { data, .. } => {
                    storage.write_all_at(Target::Replica, d.file(), data, offset)
                }
                Op::Zero { .. } => storage.zero_range(Target::Replica, d.file(), offset, len),
            };
            written.map_err(io_err(|| {
                format!(
                    "cannot write {len} bytes to replica {} of replication {} at offset {offset}",
                    d.path().display(),
                    self.id()
                )
            }))?;
            match op {
                Op::Data { data, .. } => hashes.wrote(disk, offset, data),
                Op::Zero { .. } => hashes.zeroed(disk, offset, len),
            }
            touched[disk] = true;
        }
        batch.data_bytes = 0;
        Ok(())
    }

    /// Step 4, the fdatasync of every replica the cycle wrote.
    fn sync_replicas(&self, touched: &mut [bool]) -> Result<()> {
        for (i, t) in touched.iter_mut().enumerate() {
            if *t {
                let d = &self.replica_disks()[i];
                self.sync_file(Target::Replica, d.file(), d.path())?;
                *t = false;
            }
        }
        Ok(())
    }

    /// A tag: the current interval becomes a recovery point.
    fn cut_point(&self, inner: &mut Inner, seq: u64, tag: &Tag) -> Result<()> {
        if inner.points().has_seq(seq) {
            return Ok(());
        }
        let cur = inner.state().interval;
        let entry = PointEntry {
            id: if tag.id.is_empty() {
                format!("seq-{seq}")
            } else {
                tag.id.clone()
            },
            kind: tag.kind.as_str().to_string(),
            time_ms: tag.time_ms,
            seq,
            group: tag.group.clone(),
            interval: cur,
        };
        if let Some(w) = &inner.state().resync {
            warn!(replication = %self.id(), point = %entry.id, resync_begin_seq = w.begin_seq,
                "recovery point cut inside a resync window; it may not be consistent");
        }
        let (id, kind, group) = (entry.id.clone(), entry.kind.clone(), entry.group.clone());
        inner.cut_point(entry)?;
        self.publish_applied(seq);
        self.observed().point_applied(tag.time_ms, now_ms());
        info!(
            replication = %self.id(),
            point = %id,
            kind = %kind,
            seq,
            interval = cur,
            group = %group,
            "recovery point cut"
        );
        Ok(())
    }
}
