//! The ordering point of the replication: seq assignment, and the write
//! path's steps in order (DESIGN.md §4 invariant, §5 "Write path").
//!
//! One lock for the whole machine covers "pwrite + assign seq + append to
//! the change buffer", so the order of the stream equals the order in which
//! writes took effect on the disks, across all disks: every prefix of the
//! stream at a write boundary is a crash-consistent state. Tags and resync
//! records take seqs here too, so a tag is exactly such a prefix.
//!
//! Durable order of a write: (1) every extent it touches is durably marked
//! in the dirty-extent log ([`super::dirty_extents`]) unless it already
//! was; (2) pwrite of the data; (3) the record into the change buffer
//! ([`super::change_buffer`]), or in bitmap mode only the mark
//! ([`super::mode`]); (4) the acknowledgement, by returning.

use std::ops::RangeInclusive;

use rebound_common::frame::{FrameBuilder, Record, Tag, TagKind};
use rebound_common::nbd::NbdError;
use rebound_common::time::now_ms;

use super::change_buffer::MAX_RECORD_DATA;
use super::dirty_extents::extents_of;
use super::{fenced_error, Capture, State, TagError};
use crate::tags;

/// The stream position and the seqs the tag rules compare.
pub(super) struct Order {
    /// Seq of the next record; 0 = not known until the PS says resume_seq.
    pub next_seq: u64,
    /// New writes get EPERM (the agent is stopping or failing over).
    pub fenced: bool,
    pub last_change_seq: u64,
    pub last_tag: String,
    pub last_tag_seq: u64,
    /// Seq of the tag cut right after the last resync window (0 = none).
    pub window_end_tag_seq: u64,
}

impl Order {
    pub fn new() -> Order {
        Order {
            next_seq: 0,
            fenced: false,
            last_change_seq: 0,
            last_tag: String::new(),
            last_tag_seq: 0,
            window_end_tag_seq: 0,
        }
    }

    /// Whether the stream position is known (the PS answered once).
    pub fn is_known(&self) -> bool {
        self.next_seq != 0
    }

    /// The last seq assigned.
    pub fn last(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    /// The stream continues after `resume`.
    pub fn resume_at(&mut self, resume: u64) {
        self.next_seq = resume + 1;
        self.last_tag_seq = resume;
        self.last_change_seq = resume;
    }

    /// A new replication: its PS will say where to resume.
    pub fn forget(&mut self) {
        self.next_seq = 0;
        self.last_tag_seq = 0;
        self.last_change_seq = 0;
        self.last_tag.clear();
        self.window_end_tag_seq = 0;
    }
}

/// What a write does to the disk.
pub(super) enum Change<'a> {
    Write(&'a [u8]),
    Zero,
}

impl Capture {
    /// Steps 1–3 of the write path for `len` bytes of `disk` at `offset`.
    pub(super) fn modify(
        &self,
        disk: u32,
        offset: u64,
        len: u64,
        change: Change<'_>,
    ) -> Result<(), NbdError> {
        let d = self.disk(disk)?.clone();
        let exts = extents_of(offset, len);
        self.hold.wait();
        let st = self.lock();
        if st.order.fenced {
            return Err(fenced_error());
        }
        // Step 1: the dirty-extent log, synced before the acknowledgement.
        let mut st = self.mark_dirty(st, disk, &d.name, offset, exts.clone())?;
        // A running verify hashes what this write changes, as it was at its tag.
        if let Some(s) = &st.snapshot {
            s.before_write(disk, offset, len);
        }
        // Step 2: the IO, inside the critical section (stream order = disk order).
        let io = match change {
            Change::Write(data) => d.write_at(data, offset),
            Change::Zero => d.zero_range(offset, len),
        };
        if let Err(e) = io {
            // Part of it may have reached the disk: make sure a resync covers it.
            st.modes.mark_need(disk, exts, "io-error");
            return Err(NbdError::from_io(
                &e,
                format!("disk {} at offset {offset}", d.name),
            ));
        }
        st.extents.touch(disk, exts.clone());
        // Step 3: the record (data mode) or only the mark (bitmap mode).
        self.record(&mut st, disk, offset, len, &change, exts);
        Ok(())
    }

    fn record(
        &self,
        st: &mut State,
        disk: u32,
        offset: u64,
        len: u64,
        change: &Change<'_>,
        exts: RangeInclusive<u64>,
    ) {
        if !st.modes.is_recording() || !st.order.is_known() {
            st.modes.mark_need(disk, exts, "bitmap");
            return;
        }
        let encoded = match change {
            Change::Write(data) => {
                let pieces = data.len().div_ceil(MAX_RECORD_DATA) as u64;
                data.len() as u64 + 17 * pieces
            }
            Change::Zero => 21,
        };
        if !st.buffer.fits(encoded) {
            let reason = format!(
                "the change buffer is full ({} of {} bytes)",
                st.buffer.bytes(),
                st.buffer.limit()
            );
            st.modes.enter_bitmap(&reason, st.buffer.bytes());
            st.modes.mark_need(disk, exts, "bitmap");
            return;
        }
        let mut seq = 0;
        match change {
            Change::Write(data) => {
                for (i, piece) in data.chunks(MAX_RECORD_DATA).enumerate() {
                    let off = offset + (i * MAX_RECORD_DATA) as u64;
                    seq = self.append(st, |b| b.push_write(disk, off, piece));
                }
                st.stats.bytes_captured += data.len() as u64;
            }
            Change::Zero => {
                seq = self.append(st, |b| b.push(&Record::Zero { disk, offset, len }));
            }
        }
        st.extents.recorded(disk, exts, seq, false);
        st.order.last_change_seq = seq;
    }

    /// Assigns the next seq to the record `f` appends to the change buffer.
    pub(super) fn append(&self, st: &mut State, f: impl FnOnce(&mut FrameBuilder)) -> u64 {
        let seq = st.order.next_seq;
        st.order.next_seq += 1;
        if st
            .buffer
            .append(seq, || self.replication_id(), &self.pool, f)
        {
            self.wake.notify_one();
        }
        seq
    }

    /// Appends a tag with this id (generated from its seq when empty).
    pub(super) fn append_tag(
        &self,
        st: &mut State,
        kind: TagKind,
        id: &str,
        group: &str,
    ) -> (String, u64) {
        let seq = st.order.next_seq;
        let id = if id.is_empty() {
            tags::tag_id(kind, seq)
        } else {
            id.to_string()
        };
        let rec = Record::Tag(Tag {
            id: id.clone(),
            kind,
            time_ms: now_ms(),
            group: group.to_string(),
        });
        self.append(st, |b| b.push(&rec));
        self.points.count(kind);
        st.order.last_tag = id.clone();
        st.order.last_tag_seq = seq;
        (id, seq)
    }

    /// Why no tag of `kind` can be cut now, if none can.
    pub(super) fn check_taggable(st: &State, kind: TagKind) -> Result<(), TagError> {
        if !st.order.is_known() {
            return Err(TagError::NotConnected);
        }
        if st.order.fenced && kind != TagKind::Shutdown {
            return Err(TagError::Fenced);
        }
        if !st.modes.is_complete() {
            return Err(TagError::Inconsistent(st.modes.mode().as_str()));
        }
        Ok(())
    }

    /// Cuts a recovery point now, in write order. Without `force`, only when
    /// something changed since the last tag (`Ok(None)` otherwise).
    pub fn cut_tag(&self, kind: TagKind, force: bool) -> Result<Option<(String, u64)>, TagError> {
        let mut st = self.lock();
        Self::check_taggable(&st, kind)?;
        if !force && st.order.last_change_seq <= st.order.last_tag_seq {
            return Ok(None);
        }
        Ok(Some(self.append_tag(&mut st, kind, "", "")))
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
        Self::check_taggable(&st, kind)?;
        Ok(self.append_tag(&mut st, kind, id, group))
    }
}
