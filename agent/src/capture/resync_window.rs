//! Resync windows at the ordering point (DESIGN.md §4 `ResyncBegin` …
//! `ResyncEnd`, §5 "Resync source").
//!
//! Leaving bitmap mode opens a window over the extents missing from the
//! stream; the resync driver ([`crate::resync`]) takes them in batches,
//! copies the chunks that differ from the replica as records appended under
//! the same ordering point as writes, and closes the window once nothing is
//! missing: `ResyncEnd`, then a crash tag right after it. No tag is cut while
//! a window is open.

use std::time::{Duration, Instant};

use rebound_common::chunk::{is_zero, EXTENT_SIZE, SUB_CHUNK_SIZE};
use rebound_common::frame::{Record, TagKind};
use tracing::info;

use super::dirty_extents::extents_of;
use super::mode::Window;
use super::{Capture, CaptureError};

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

/// Runs of same-kind 64 KiB sub-chunks in `buf` (read at `offset`), aligned
/// to the disk's sub-chunk grid: (offset, length, all zero).
fn runs(buf: &[u8], offset: u64) -> Vec<(u64, u64, bool)> {
    let end = offset + buf.len() as u64;
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let next = ((pos / SUB_CHUNK_SIZE + 1) * SUB_CHUNK_SIZE).min(end);
        let zero = is_zero(&buf[(pos - offset) as usize..(next - offset) as usize]);
        match pieces.last_mut() {
            Some(last) if last.2 == zero && last.0 + last.1 == pos => last.1 += next - pos,
            _ => pieces.push((pos, next - pos, zero)),
        }
        pos = next;
    }
    pieces
}

impl Capture {
    /// The resync driver's side: windows, batches and copies.
    pub fn resync(&self) -> ResyncWindow<'_> {
        ResyncWindow(self)
    }
}

/// Resync windows as the resync driver and crash recovery see them.
pub struct ResyncWindow<'a>(&'a Capture);

impl ResyncWindow<'_> {
    /// Switches to bitmap mode (e.g. the PS has been unreachable too long).
    pub fn enter_bitmap(&self, reason: &str) {
        let mut st = self.0.lock();
        let bytes = st.buffer.bytes();
        st.modes.enter_bitmap(reason, bytes);
    }

    /// Queues extents for a resync (crash recovery, undrained stop).
    pub fn mark_need(&self, disk: u32, exts: &[u64], reason: &str) {
        let mut st = self.0.lock();
        for &e in exts {
            st.modes.mark_need(disk, e..=e, reason);
        }
    }

    /// Queues every extent of every disk (initial replication).
    pub fn mark_need_all(&self, reason: &str) {
        self.0.lock().modes.mark_need_all(reason);
    }

    /// Whether the resync driver has something to do: leave bitmap mode,
    /// start or extend a window, or close one.
    pub fn wanted(&self) -> bool {
        let st = self.0.lock();
        st.order.is_known()
            && !st.order.fenced
            && (!st.modes.is_recording() || st.modes.window.is_some() || st.modes.any_needed())
    }

    /// Leaves bitmap mode, and when changes are missing from the stream,
    /// opens (or extends) a resync window and takes them.
    pub fn next_batch(&self) -> Option<Batch> {
        let cap = self.0;
        let mut st = cap.lock();
        if !st.order.is_known() || st.order.fenced {
            return None;
        }
        st.modes.leave_bitmap();
        let pending = st.modes.needed();
        if pending == 0 {
            return None;
        }
        let (reason, full) = st.modes.take_reason();
        let mut opened = false;
        if st.modes.window.is_none() {
            let disks = st.modes.needy_disks();
            let rec = Record::ResyncBegin {
                disks: disks.clone(),
                reason: reason.clone(),
            };
            let seq = cap.append(&mut st, |b| b.push(&rec));
            st.order.last_change_seq = seq;
            st.modes.window = Some(Window {
                reason: reason.clone(),
                full,
                started: Instant::now(),
                bytes_at_start: st.stats.resync_bytes,
                chunks_at_start: st.stats.resync_chunks,
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
            if let Some(w) = st.modes.window.as_mut() {
                w.full = true;
            }
        }
        let disks = st.modes.take_needed();
        let reason = st
            .modes
            .window
            .as_ref()
            .map_or(reason, |w| w.reason.clone());
        Some(Batch {
            reason,
            full,
            opened,
            min_seq: st.order.last(),
            disks,
        })
    }

    /// Gives extents of a failed batch back, to be taken again.
    pub fn requeue(&self, disk: u32, exts: &[u64]) {
        self.0.lock().modes.requeue(disk, exts);
    }

    /// Closes the open window when nothing is missing any more: appends
    /// ResyncEnd and, right after it, a crash tag.
    pub fn finish(&self) -> Option<WindowEnd> {
        let cap = self.0;
        let mut st = cap.lock();
        if st.modes.window.is_none()
            || st.order.fenced
            || !st.modes.is_recording()
            || !st.order.is_known()
            || st.modes.any_needed()
        {
            return None;
        }
        let end_seq = cap.append(&mut st, |b| b.push(&Record::ResyncEnd));
        let (w, taken) = st.modes.close_window()?;
        for (disk, exts) in taken.into_iter().enumerate() {
            st.extents.recorded(disk as u32, exts, end_seq, true);
        }
        let (tag, tag_seq) = cap.append_tag(&mut st, TagKind::Crash, "", "");
        st.order.window_end_tag_seq = tag_seq;
        Some(WindowEnd {
            reason: w.reason,
            full: w.full,
            end_seq,
            tag,
            tag_seq,
            bytes: st.stats.resync_bytes - w.bytes_at_start,
            chunks: st.stats.resync_chunks - w.chunks_at_start,
            elapsed: w.started.elapsed(),
        })
    }

    /// Reads `len` bytes of `disk` at `offset` under the ordering point and
    /// appends them as resync records: `Write` for data, `Zero` for all-zero
    /// 64 KiB sub-chunks (skipped entirely with `skip_zero`, when the replica
    /// is known to be zero there). Returns (data bytes, sub-chunks) sent.
    pub fn copy(
        &self,
        disk: u32,
        offset: u64,
        len: u64,
        skip_zero: bool,
    ) -> Result<(u64, u64), CaptureError> {
        let cap = self.0;
        let d = cap
            .disks
            .get(disk as usize)
            .ok_or(CaptureError::NotStreaming)?
            .clone();
        let len = len.min(d.size().saturating_sub(offset));
        if len == 0 {
            return Ok((0, 0));
        }
        let mut st = cap.lock();
        if !st.order.is_known() || st.order.fenced || st.modes.window.is_none() {
            return Err(CaptureError::NotStreaming);
        }
        // The read buffer is kept between copies: a fresh one per chunk cost
        // page faults on every read.
        let mut buf = std::mem::take(&mut st.read_buf);
        buf.resize(len as usize, 0);
        d.read_at(&mut buf, offset)
            .map_err(|source| CaptureError::Read {
                disk: d.name.clone(),
                offset,
                source,
            })?;
        let mut bytes = 0;
        let mut chunks = 0;
        let mut seq = 0;
        for (off, n, zero) in runs(&buf, offset) {
            if zero && skip_zero {
                continue;
            }
            chunks += n.div_ceil(SUB_CHUNK_SIZE);
            if zero {
                let rec = Record::Zero {
                    disk,
                    offset: off,
                    len: n,
                };
                seq = cap.append(&mut st, |b| b.push(&rec));
            } else {
                let s = (off - offset) as usize;
                seq = cap.append(&mut st, |b| {
                    b.push_write(disk, off, &buf[s..s + n as usize])
                });
                bytes += n;
            }
        }
        if seq != 0 {
            st.order.last_change_seq = seq;
            st.extents
                .recorded(disk, extents_of(offset, len), seq, true);
        }
        st.stats.resync_bytes += bytes;
        st.stats.resync_chunks += chunks;
        st.read_buf = buf;
        Ok((bytes, chunks))
    }
}
