//! Copying saved blocks (undo-format records of retention journals or of
//! rollback pre-images) onto the replicas in large IOs, for rollback and
//! RestorePreImages (DESIGN.md §7 "Rollback").
//!
//! Blocks come in disk order and are handled in windows of up to
//! [`WINDOW_BLOCKS`], read and checked on worker threads and written in
//! order by the caller's thread (`ordered`). Within a window the records
//! are read in file order, records close together with one pread (gaps up
//! to [`READ_GAP`] are read through, at most [`READ_MAX`] per pread); every
//! record of the window is checked (its key and checksum) before anything
//! of the window is written; then each run of adjacent blocks is written
//! with one pwrite, and the device starts writing the window back
//! ([`start_writeback`]) while the next one is read. Nothing here syncs:
//! the caller fdatasyncs the replicas and only then records the new state,
//! so the durable order of rollback and restore is theirs, unchanged.

use crate::error::{io_err, MtError, Result};
use crate::journal::{self, key_block, key_disk, BLOCK, HEADER_LEN};
use crate::ordered::{ordered, window_buffers, WORKERS};
use crate::replication::Replication;
use crate::storage::Target;
use crate::sys::start_writeback;
use rebound_common::alloc::BufferPool;
use std::fs::File;
use std::os::unix::fs::FileExt;

const BS: u64 = BLOCK as u64;
/// Blocks gathered in memory before they are written (4 MiB; with the
/// workers, up to 2 per worker plus the one being written exist at once).
#[cfg(not(test))]
const WINDOW_BLOCKS: usize = 1024;
/// Small in tests, so their small disks take many windows on the workers.
#[cfg(test)]
const WINDOW_BLOCKS: usize = 16;
/// A gap between two wanted records read through rather than split.
const READ_GAP: u64 = 64 << 10;
/// Largest single read of records.
const READ_MAX: u64 = 4 << 20;
/// Largest record.
const REC_MAX: u64 = (HEADER_LEN + BLOCK) as u64;

/// A file of undo-format records and how much of it is valid.
pub(crate) struct Source<'a> {
    pub file: &'a File,
    pub len: u64,
}

/// A block to restore: its key, and where its record is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SavedBlock {
    pub key: u64,
    /// Index into the sources.
    pub src: usize,
    pub off: u64,
}

impl Replication {
    /// Writes the saved content of every block of `blocks` (in key order)
    /// to the replicas, without syncing. `bad(src, why)` makes the error for
    /// a record that cannot be read or does not check out. Returns the
    /// bytes of block content restored.
    ///
    /// The windows are read and checked on [`WORKERS`] threads and written
    /// on this one, in window order (see `ordered`).
    pub(crate) fn copy_saved_blocks(
        &self,
        blocks: &[SavedBlock],
        sources: &[Source<'_>],
        bad: impl Fn(usize, String) -> MtError + Sync,
    ) -> Result<u64> {
        let mut restored = 0u64;
        let bufs = window_buffers();
        ordered(
            blocks.chunks(WINDOW_BLOCKS).collect(),
            WORKERS,
            |win| {
                let content = window_content(win, sources, &bad, &bufs)?;
                Ok((win, content))
            },
            |(win, content)| {
                self.write_window(win, &content)?;
                bufs.give(content);
                restored += win.len() as u64 * BS;
                Ok::<(), MtError>(())
            },
        )?;
        Ok(restored)
    }

    /// Writes a window's content, each run of adjacent blocks with one
    /// pwrite, and starts its writeback.
    fn write_window(&self, win: &[SavedBlock], content: &[u8]) -> Result<()> {
        // Per disk, the span this window wrote, to start its writeback.
        let mut spans: Vec<(u32, u64, u64)> = Vec::new();
        let mut i = 0;
        while i < win.len() {
            let disk = key_disk(win[i].key);
            let mut j = i + 1;
            while j < win.len() && win[j].key == win[j - 1].key + 1 && key_disk(win[j].key) == disk
            {
                j += 1;
            }
            let d = self.disk(disk)?;
            let at = key_block(win[i].key) * BS;
            let len = ((j - i) as u64 * BS).min(d.size() - at) as usize;
            self.storage()
                .write_all_at(
                    Target::Replica,
                    d.file(),
                    &content[i * BLOCK..i * BLOCK + len],
                    at,
                )
                .map_err(io_err(|| {
                    format!(
                        "cannot write {len} bytes to replica {} at offset {at}",
                        d.path().display()
                    )
                }))?;
            match spans.iter_mut().find(|s| s.0 == disk) {
                Some(s) => {
                    s.1 = s.1.min(at);
                    s.2 = s.2.max(at + len as u64);
                }
                None => spans.push((disk, at, at + len as u64)),
            }
            i = j;
        }
        for (disk, start, end) in spans {
            start_writeback(self.disk(disk)?.file(), start, end - start);
        }
        Ok(())
    }
}

/// The saved content of a window's blocks, in window order: its records
/// read in file order and every one of them checked. The buffers come from
/// `bufs`; the content's is the caller's to give back.
fn window_content(
    win: &[SavedBlock],
    sources: &[Source<'_>],
    bad: &impl Fn(usize, String) -> MtError,
    bufs: &BufferPool,
) -> Result<Vec<u8>> {
    let mut content = bufs.take().unwrap_or_default();
    content.resize(win.len() * BLOCK, 0);
    let mut rbuf = bufs.take().unwrap_or_default();
    let mut order: Vec<usize> = (0..win.len()).collect();
    order.sort_unstable_by_key(|&i| (win[i].src, win[i].off));
    let mut g = 0;
    while g < order.len() {
        let first = win[order[g]];
        let src = &sources[first.src];
        let rec_end = |off: u64| (off + REC_MAX).min(src.len);
        let start = first.off;
        let mut end = rec_end(start);
        let mut h = g + 1;
        while h < order.len() {
            let b = win[order[h]];
            if b.src != first.src
                || b.off > end + READ_GAP
                || rec_end(b.off).saturating_sub(start) > READ_MAX
            {
                break;
            }
            end = end.max(rec_end(b.off));
            h += 1;
        }
        rbuf.resize(end.saturating_sub(start) as usize, 0);
        src.file.read_exact_at(&mut rbuf, start).map_err(|e| {
            bad(
                first.src,
                format!("cannot read undo records at offset {start}: {e}"),
            )
        })?;
        for &i in &order[g..h] {
            let b = win[i];
            let rel = (b.off - start) as usize;
            let rec = rbuf.get(rel..).unwrap_or_default();
            let dst = &mut content[i * BLOCK..(i + 1) * BLOCK];
            match journal::check_record(rec, b.off, b.key).map_err(|e| bad(b.src, e.to_string()))? {
                Some(data) => dst.copy_from_slice(data),
                None => dst.fill(0),
            }
        }
        g = h;
    }
    bufs.give(rbuf);
    Ok(content)
}
