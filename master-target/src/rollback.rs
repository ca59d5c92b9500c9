//! Rolling a replica back to a recovery point, and undoing that
//! (DESIGN.md §7 "Rollback").
//!
//! The affected blocks are those saved by any interval after the point P.
//! 1. Their current content goes to `rollback/preimages` (a header naming
//!    P, then undo-format records), which is fsynced; then state.json marks
//!    the pre-images complete.
//! 2. Each affected block gets its content at P (read from the journals and
//!    written in large IOs, see `copyback`); the replicas are fsynced.
//! 3. state.json records `rolled_back_to = P`.
//!
//! Re-running after a crash at any moment ends at exactly P: before step 1
//! completes the replica is untouched and the pre-images are saved again;
//! after it they are not (they would capture half-rolled-back content), and
//! step 2 is idempotent. `RestorePreImages` writes the pre-images back so a
//! different point can be chosen.
//!
//! Steps 1 and 2 read and checksum on worker threads and write on the
//! calling one, in order (`ordered`): the writes, and which fsync follows
//! which, are those of a single thread.

use crate::catalog::PointEntry;
use crate::copyback::{SavedBlock, Source};
use crate::error::{io_err, MtError, Result};
use crate::journal::{self, key_block, key_disk, BLOCK};
use crate::layout::Layout;
use crate::ordered::{ordered, window_buffers, WORKERS};
use crate::replication::Replication;
use crate::retention_journal::Undo;
use crate::state::PointRef;
use crate::storage::Target;
use crate::sys::start_writeback;
use rebound_common::alloc::BufferPool;
use rebound_common::chunk::read_full_at;
use rebound_common::durable::fsync_dir;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tracing::info;

const BS: u64 = BLOCK as u64;
const PRE_MAGIC: [u8; 4] = *b"RBP1";
const PRE_VERSION: u8 = 1;
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Blocks restored between two looks at the progress clock (256 MiB).
const PROGRESS_BLOCKS: usize = 1 << 16;
/// Pre-image bytes written between two writeback starts.
const WRITEBACK_EVERY: u64 = 16 << 20;
/// Blocks of the replica read with one pread when saving pre-images.
const PRE_READ_BLOCKS: usize = 256;
/// Blocks of pre-images read and encoded as one piece of work (4 MiB).
#[cfg(not(test))]
const PRE_SEGMENT_BLOCKS: usize = 1024;
/// Small in tests, so their small disks take many segments on the workers.
#[cfg(test)]
const PRE_SEGMENT_BLOCKS: usize = 16;

/// Pre-image records of a segment of blocks, and (block key, offset of its
/// record in them) for each block.
type EncodedSegment = (Vec<u8>, Vec<(u64, u64)>);

/// The pre-image file of a rollback, indexed.
pub(crate) struct PreImages {
    file: File,
    /// Block key → record offset.
    blocks: HashMap<u64, u64>,
}

fn encode_header(point: &PointRef, count: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(64 + point.id.len());
    h.extend_from_slice(&PRE_MAGIC);
    h.push(PRE_VERSION);
    h.extend_from_slice(&[0u8; 3]);
    h.extend_from_slice(&point.interval.to_le_bytes());
    h.extend_from_slice(&point.seq.to_le_bytes());
    h.extend_from_slice(&count.to_le_bytes());
    let id = &point.id.as_bytes()[..point.id.len().min(u16::MAX as usize)];
    h.extend_from_slice(&(id.len() as u16).to_le_bytes());
    h.extend_from_slice(id);
    let sum = blake3::hash(&h);
    h.extend_from_slice(&sum.as_bytes()[..8]);
    h
}

/// Why a pre-image file's header cannot be used.
#[derive(Debug, Error)]
enum HeaderError {
    #[error("cannot read the header: {0}")]
    Read(#[from] std::io::Error),
    #[error("not a pre-image file (bad magic or version)")]
    Magic,
    #[error("header checksum mismatch")]
    Checksum,
    #[error("point id is not UTF-8")]
    PointId,
}

/// Parses a pre-image header: (point, record count, header length).
fn parse_header(f: &File) -> Result<(PointRef, u64, u64), HeaderError> {
    let mut fixed = [0u8; 34];
    f.read_exact_at(&mut fixed, 0)?;
    if fixed[..4] != PRE_MAGIC || fixed[4] != PRE_VERSION {
        return Err(HeaderError::Magic);
    }
    let interval = u64::from_le_bytes(fixed[8..16].try_into().expect("8"));
    let seq = u64::from_le_bytes(fixed[16..24].try_into().expect("8"));
    let count = u64::from_le_bytes(fixed[24..32].try_into().expect("8"));
    let id_len = u16::from_le_bytes(fixed[32..34].try_into().expect("2")) as usize;
    let mut rest = vec![0u8; id_len + 8];
    f.read_exact_at(&mut rest, 34)?;
    let mut all = fixed.to_vec();
    all.extend_from_slice(&rest[..id_len]);
    if blake3::hash(&all).as_bytes()[..8] != rest[id_len..] {
        return Err(HeaderError::Checksum);
    }
    let id = String::from_utf8(rest[..id_len].to_vec()).map_err(|_| HeaderError::PointId)?;
    Ok((
        PointRef { id, seq, interval },
        count,
        (34 + id_len + 8) as u64,
    ))
}

impl PreImages {
    /// The offset of the pre-image record of block `key`, if the rollback
    /// changed that block.
    pub fn offset_of(&self, key: u64) -> Option<u64> {
        self.blocks.get(&key).copied()
    }

    /// The pre-image file, to read the records [`PreImages::offset_of`]
    /// locates.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Opens and indexes the pre-image file, which must be complete and
    /// belong to `point`.
    pub fn open(
        layout: &Layout,
        point: &PointRef,
        disk_ok: impl Fn(u32) -> bool,
    ) -> Result<PreImages> {
        let path = layout.preimages();
        let bad = |m: String| MtError::DataLoss(format!("pre-image file {}: {m}", path.display()));
        let file = OpenOptions::new()
            .read(true)
            .open(&path)
            .map_err(io_err(|| {
                format!("cannot open pre-image file {}", path.display())
            }))?;
        let (p, count, hlen) = parse_header(&file).map_err(|e| bad(e.to_string()))?;
        if &p != point {
            return Err(bad(format!(
                "it belongs to a rollback to {} (seq {}) but the replica state names {} (seq {})",
                p.id, p.seq, point.id, point.seq
            )));
        }
        let scan = journal::scan(&file, hlen, disk_ok).map_err(io_err(|| {
            format!("cannot read pre-image file {}", path.display())
        }))?;
        if scan.entries.len() as u64 != count || scan.valid_len != scan.file_len {
            return Err(bad(format!(
                "it should hold {count} blocks but {} are readable ({})",
                scan.entries.len(),
                scan.problem.unwrap_or_else(|| "short file".into())
            )));
        }
        Ok(PreImages {
            file,
            blocks: scan.entries.into_iter().collect(),
        })
    }
}

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackReport {
    pub point: PointEntry,
    /// Blocks written to bring the replica to the point.
    pub blocks_restored: u64,
    /// Bytes of undo content read from the retention journal.
    pub undo_bytes: u64,
}

impl Replication {
    /// Rolls the replica back to recovery point `point` (an id). Idempotent:
    /// re-running after an interruption, or when already at the point,
    /// ends at exactly the point.
    pub fn rollback(&self, point: &str) -> Result<RollbackReport> {
        let mut inner = self.write_for_change()?;
        let machine = self.machine_id().to_string();
        let p = inner
            .points()
            .by_id(point)
            .cloned()
            .ok_or_else(|| {
                MtError::NotFound(format!(
                    "replication {} (machine {machine}) has no recovery point {point:?}; it may have expired from retention: list the points with ListPoints",
                    self.id()
                ))
            })?;
        let pref = PointRef {
            id: p.id.clone(),
            seq: p.seq,
            interval: p.interval,
        };
        if let Some(rb) = &inner.state().rolled_back_to {
            if *rb == pref {
                info!(replication = %self.id(), point = %p.id, "replica is already rolled back to this point");
                return Ok(RollbackReport {
                    point: p,
                    blocks_restored: 0,
                    undo_bytes: 0,
                });
            }
            return Err(MtError::FailedPrecondition(format!(
                "replica of {machine} is rolled back to {}; restore pre-images first (RestorePreImages), then roll back to {}",
                rb.id, p.id
            )));
        }
        self.check_not_ended(&inner, "it has no recovery points to roll back to")?;
        if let Some(h) = &inner.state().handed_over {
            return Err(MtError::FailedPrecondition(format!(
                "replica of {machine} was handed over at {}; stop the machine and restore pre-images (RestorePreImages) first, then roll back to {}",
                h.point, p.id
            )));
        }
        if let Some(r) = &inner.state().rollback {
            if r.point != pref {
                return Err(MtError::FailedPrecondition(format!(
                    "an interrupted rollback of {machine} to {} is pending; re-run the rollback to {} or restore pre-images first",
                    r.point.id, r.point.id
                )));
            }
        }
        // Affected blocks and where their content at P is, in disk order.
        let blocks = inner.journal().point_map(p.interval)?;
        info!(replication = %self.id(), machine = %machine, point = %p.id, seq = p.seq, blocks = blocks.len(), "rollback started");
        let started = Instant::now();
        let progress = self.observed().rollback_started(blocks.len() as u64 * BS);

        let result = (|| -> Result<RollbackReport> {
            // 1. Pre-images.
            let complete = inner
                .state()
                .rollback
                .as_ref()
                .is_some_and(|r| r.preimages_complete);
            if complete {
                info!(replication = %self.id(), point = %p.id, "rollback resumes: pre-images are already complete, not saving them again");
            } else {
                inner.set_pre(None);
                inner.set_rollback(pref.clone(), false)?;
                let pre = self.write_preimages(&pref, &blocks)?;
                inner.set_rollback(pref.clone(), true)?;
                inner.set_pre(Some(pre));
                info!(replication = %self.id(), point = %p.id, blocks = blocks.len(),
                    ms = started.elapsed().as_millis() as u64, "rollback: pre-images saved");
            }
            // 2. The content at P, in large reads and writes.
            let mut files: Vec<(u64, Arc<File>, u64)> = Vec::new();
            let mut saved = Vec::with_capacity(blocks.len());
            for &(
                key,
                Undo {
                    interval: n,
                    offset,
                },
            ) in &blocks
            {
                let src = match files.iter().position(|(m, _, _)| *m == n) {
                    Some(i) => i,
                    None => {
                        files.push((n, inner.journal().file(n)?, inner.journal().len(n)));
                        files.len() - 1
                    }
                };
                saved.push(SavedBlock {
                    key,
                    src,
                    off: offset,
                });
            }
            let sources: Vec<Source<'_>> = files
                .iter()
                .map(|(_, f, len)| Source { file: f, len: *len })
                .collect();
            let mut last_log = Instant::now();
            let mut undo_bytes = 0u64;
            for (i, part) in saved.chunks(PROGRESS_BLOCKS).enumerate() {
                undo_bytes += self.copy_saved_blocks(part, &sources, |src, e| {
                    MtError::DataLoss(format!(
                        "rollback of {machine} to {}: retention journal {}: {e}; the replica is partly rolled back: fix the journal or restore pre-images",
                        p.id,
                        inner.journal().path(files[src].0).display()
                    ))
                })?;
                progress.restored(part.len() as u64 * BS);
                if last_log.elapsed() >= PROGRESS_EVERY {
                    info!(replication = %self.id(), point = %p.id, done = (i + 1) * PROGRESS_BLOCKS, of = blocks.len(), "rollback progress");
                    last_log = Instant::now();
                }
            }
            let copied_ms = started.elapsed().as_millis() as u64;
            self.sync_all_replicas()?;
            // 3. The replica is at P.
            inner.rolled_back(pref.clone())?;
            info!(replication = %self.id(), machine = %machine, point = %p.id, seq = p.seq, blocks = blocks.len(),
                copied_ms, ms = started.elapsed().as_millis() as u64, "replica rolled back to the recovery point");
            Ok(RollbackReport {
                point: p.clone(),
                blocks_restored: blocks.len() as u64,
                undo_bytes,
            })
        })();
        if let Err(e) = &result {
            // Memory may be ahead of disk.
            self.recover_after(&mut inner, e);
        }
        result
    }

    fn write_preimages(&self, point: &PointRef, blocks: &[(u64, Undo)]) -> Result<PreImages> {
        let path = self.layout().preimages();
        let ctx = || format!("cannot write pre-image file {}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err(ctx))?;
        let storage = self.storage();
        let header = encode_header(point, blocks.len() as u64);
        storage
            .write_all_at(Target::PreImages, &file, &header, 0)
            .map_err(io_err(ctx))?;
        let mut pos = header.len() as u64;
        // Written back up to here: the device writes the pre-images while
        // the next segments are read, not all at the final fsync.
        let mut kicked = 0u64;
        let mut offsets = HashMap::with_capacity(blocks.len());
        // Segments are read and encoded on the workers and appended here in
        // order (see `ordered`).
        let segments: Vec<std::ops::Range<usize>> = (0..blocks.len())
            .step_by(PRE_SEGMENT_BLOCKS)
            .map(|s| s..(s + PRE_SEGMENT_BLOCKS).min(blocks.len()))
            .collect();
        let bufs = window_buffers();
        ordered(
            segments,
            WORKERS,
            |seg| self.encode_preimages(&blocks[seg], &bufs),
            |(rec, saved)| {
                storage
                    .write_all_at(Target::PreImages, &file, &rec, pos)
                    .map_err(io_err(ctx))?;
                for (key, rel) in saved {
                    offsets.insert(key, pos + rel);
                }
                pos += rec.len() as u64;
                bufs.give(rec);
                if pos - kicked >= WRITEBACK_EVERY {
                    start_writeback(&file, kicked, pos - kicked);
                    kicked = pos;
                }
                Ok::<(), MtError>(())
            },
        )?;
        self.sync_file(Target::PreImages, &file, &path)?;
        let dir = self.layout().rollback_dir();
        fsync_dir(&dir).map_err(io_err(|| format!("cannot fsync {}", dir.display())))?;
        Ok(PreImages {
            file,
            blocks: offsets,
        })
    }

    /// The pre-image records of `blocks` (their current content, in
    /// undo format) and each block's offset in them. The buffers come from
    /// `bufs`; the records' buffer is the caller's to give back.
    fn encode_preimages(
        &self,
        blocks: &[(u64, Undo)],
        bufs: &BufferPool,
    ) -> Result<EncodedSegment> {
        let mut buf = bufs.take().unwrap_or_default();
        buf.resize(PRE_READ_BLOCKS * BLOCK, 0);
        let mut rec = bufs.take().unwrap_or_default();
        rec.reserve(blocks.len() * (BLOCK + journal::HEADER_LEN));
        let mut saved = Vec::with_capacity(blocks.len());
        let mut i = 0;
        while i < blocks.len() {
            // A run of adjacent blocks of one disk, read with one pread.
            let disk = key_disk(blocks[i].0);
            let mut j = i + 1;
            while j < blocks.len()
                && j - i < PRE_READ_BLOCKS
                && blocks[j].0 == blocks[j - 1].0 + 1
                && key_disk(blocks[j].0) == disk
            {
                j += 1;
            }
            let d = self.disk(disk)?;
            let start = key_block(blocks[i].0) * BS;
            let run = &mut buf[..(j - i) * BLOCK];
            read_full_at(d.file(), run, start).map_err(io_err(|| {
                format!(
                    "cannot read replica {} at offset {start}",
                    d.path().display()
                )
            }))?;
            for (k, data) in run.chunks_exact(BLOCK).enumerate() {
                let key = blocks[i + k].0;
                saved.push((key, rec.len() as u64));
                journal::encode(&mut rec, d.index(), key_block(key), data);
            }
            i = j;
        }
        bufs.give(buf);
        Ok((rec, saved))
    }

    /// Writes the pre-images of a rollback back, returning the replica to
    /// where it was before (latest), and forgets the rollback. Returns the
    /// number of blocks written. Idempotent; 0 when nothing is rolled back.
    pub fn restore_pre_images(&self) -> Result<u64> {
        let mut inner = self.write_for_change()?;
        let machine = self.machine_id().to_string();
        self.check_not_ended(&inner, "its pre-images are gone")?;
        // Undoing a hand-over: PowerOff stopped the machine and undid its
        // writes first; the replica is the MT's again once the pre-images
        // are back.
        if inner.state().handed_over.is_some() {
            self.check_machine_powered_off()?;
        }
        let handed_over = inner.take_handed_over();
        let result = (|| -> Result<u64> {
            let point = match (&inner.state().rolled_back_to, &inner.state().rollback) {
                (Some(p), _) => p.clone(),
                (None, Some(r)) if r.preimages_complete => r.point.clone(),
                (None, Some(r)) => {
                    // Interrupted while saving pre-images: the replica was
                    // never touched.
                    let point = r.point.id.clone();
                    self.remove_preimages()?;
                    inner.clear_rollback()?;
                    info!(replication = %self.id(), point = %point, "interrupted rollback abandoned; the replica was not changed");
                    return Ok(0);
                }
                (None, None) => {
                    if handed_over.is_some() {
                        inner.save_state()?;
                    }
                    info!(replication = %self.id(), "restore pre-images: the replica is not rolled back; nothing to do");
                    return Ok(0);
                }
            };
            if inner.pre().is_none() {
                let disk_ok = |d: u32| self.replica_disks().iter().any(|x| x.index() == d);
                inner.set_pre(Some(PreImages::open(self.layout(), &point, disk_ok).map_err(|e| {
                    MtError::DataLoss(format!(
                        "cannot restore the pre-images of {machine} (rolled back to {}): {e}; the replica stays at that point",
                        point.id
                    ))
                })?));
            }
            let pre = inner.pre().expect("pre-images loaded");
            let mut entries: Vec<SavedBlock> = pre
                .blocks
                .iter()
                .map(|(&key, &off)| SavedBlock { key, src: 0, off })
                .collect();
            entries.sort_unstable_by_key(|b| b.key);
            let len = pre
                .file
                .metadata()
                .map_err(io_err(|| {
                    format!("cannot stat {}", self.layout().preimages().display())
                }))?
                .len();
            self.copy_saved_blocks(
                &entries,
                &[Source {
                    file: &pre.file,
                    len,
                }],
                |_, e| {
                    MtError::DataLoss(format!(
                        "cannot restore the pre-images of {machine}: {}: {e}",
                        self.layout().preimages().display()
                    ))
                },
            )?;
            self.sync_all_replicas()?;
            inner.clear_rollback()?;
            inner.set_pre(None);
            self.remove_preimages()?;
            info!(replication = %self.id(), machine = %machine, point = %point.id, blocks = entries.len(),
                "pre-images restored: the replica is back at latest and apply may resume");
            Ok(entries.len() as u64)
        })();
        if let Err(e) = &result {
            self.recover_after(&mut inner, e);
        }
        result
    }

    fn remove_preimages(&self) -> Result<()> {
        let path = self.layout().preimages();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(MtError::io(format!("cannot remove {}", path.display()), e)),
        }
        let dir = self.layout().rollback_dir();
        fsync_dir(&dir).map_err(io_err(|| format!("cannot fsync {}", dir.display())))
    }
}
