//! Data mode, bitmap mode and the extents a resync must cover
//! (DESIGN.md §5 "Modes").
//!
//! In data mode writes become records. In bitmap mode (buffer full, PS
//! unreachable too long, or the stream position not known yet) writes only
//! mark their extents as *needed*. Leaving bitmap mode takes the needed
//! extents into a resync window ([`super::resync_window`]); while a window
//! is open the extents it took are *taken*, so the dirty-extent map keeps
//! them dirty until the window is closed and durable.

use std::ops::RangeInclusive;
use std::time::Instant;

use serde::Serialize;
use tracing::{info, warn};

use crate::dirty_log::Bitset;

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

/// An open resync window: what it is for and where its counters started.
pub(super) struct Window {
    pub reason: String,
    pub full: bool,
    pub started: Instant,
    pub bytes_at_start: u64,
    pub chunks_at_start: u64,
}

/// The mode and the extents missing from the stream, per disk.
pub(super) struct Modes {
    /// Data (or resync) mode; false = bitmap mode.
    recording: bool,
    /// Since when some change has been missing from the stream.
    bitmap_since: Option<Instant>,
    pub window: Option<Window>,
    /// Extents a resync must still take.
    need: Vec<Bitset>,
    need_reason: Option<String>,
    need_full: bool,
    /// Extents taken into the open window.
    taken: Vec<Bitset>,
}

impl Modes {
    /// Bitmap mode with nothing needed: the stream position is not known yet.
    pub fn new(extents: &[u64]) -> Modes {
        Modes {
            recording: false,
            bitmap_since: None,
            window: None,
            need: extents.iter().map(|&n| Bitset::new(n)).collect(),
            need_reason: None,
            need_full: false,
            taken: extents.iter().map(|&n| Bitset::new(n)).collect(),
        }
    }

    pub fn mode(&self) -> Mode {
        if !self.recording {
            Mode::Bitmap
        } else if self.window.is_some() {
            Mode::Resync
        } else {
            Mode::Data
        }
    }

    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// Every change is in the stream: data mode, no window, nothing needed.
    pub fn is_complete(&self) -> bool {
        self.recording && self.window.is_none() && !self.any_needed()
    }

    pub fn any_needed(&self) -> bool {
        self.need.iter().any(|n| !n.is_empty())
    }

    /// Extents still needed.
    pub fn needed(&self) -> u64 {
        self.need.iter().map(|n| n.count()).sum()
    }

    /// Extents needed or inside the open window.
    pub fn pending(&self) -> u64 {
        self.needed() + self.taken.iter().map(|t| t.count()).sum::<u64>()
    }

    /// Whether a resync still has to cover this extent.
    pub fn covers(&self, disk: usize, e: u64) -> bool {
        self.need[disk].get(e) || self.taken[disk].get(e)
    }

    /// Since when a change has been missing, when one still is.
    pub fn missing_since(&self) -> Option<Instant> {
        self.bitmap_since.filter(|_| self.pending() > 0)
    }

    /// Stops recording; later writes only mark their extents.
    pub fn enter_bitmap(&mut self, reason: &str, buffer_bytes: u64) {
        if self.recording {
            self.recording = false;
            warn!(
                mode = "bitmap",
                buffer_bytes,
                "entering bitmap mode: {reason}; new writes only mark dirty extents until the link catches up"
            );
        }
    }

    /// Records again; a resync follows when a change was missed.
    pub fn leave_bitmap(&mut self) {
        if self.recording {
            return;
        }
        self.recording = true;
        let pending = self.needed();
        if pending == 0 && self.window.is_none() {
            self.bitmap_since = None;
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

    pub fn mark_need(&mut self, disk: u32, exts: RangeInclusive<u64>, reason: &str) {
        let Some(need) = self.need.get_mut(disk as usize) else {
            return;
        };
        for e in exts {
            need.set(e);
        }
        if self.need_reason.is_none() {
            self.need_reason = Some(reason.to_string());
        }
        self.bitmap_since.get_or_insert_with(Instant::now);
    }

    /// Every extent of every disk (initial replication, a stream gap).
    pub fn mark_need_all(&mut self, reason: &str) {
        for n in self.need.iter_mut() {
            n.set_all();
        }
        self.need_reason = Some(reason.to_string());
        self.need_full = true;
        self.bitmap_since.get_or_insert_with(Instant::now);
    }

    /// Forgets the open window and what it took (a new stream starts).
    pub fn drop_window(&mut self) {
        self.window = None;
        for t in self.taken.iter_mut() {
            t.clear_all();
        }
    }

    /// A new stream position is coming: bitmap mode without a log line.
    pub fn restart(&mut self) {
        self.recording = false;
        self.drop_window();
    }

    /// The reason and the full flag of the needed extents, consumed.
    pub fn take_reason(&mut self) -> (String, bool) {
        let reason = self.need_reason.take().unwrap_or_else(|| "bitmap".into());
        (reason, std::mem::take(&mut self.need_full))
    }

    /// The disks with needed extents.
    pub fn needy_disks(&self) -> Vec<u32> {
        self.need
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.is_empty())
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Moves every needed extent into the window, per disk.
    pub fn take_needed(&mut self) -> Vec<(u32, Vec<u64>)> {
        let mut disks = Vec::new();
        for (i, (need, taken)) in self.need.iter_mut().zip(self.taken.iter_mut()).enumerate() {
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
        disks
    }

    /// Gives taken extents back to be taken again.
    pub fn requeue(&mut self, disk: u32, exts: &[u64]) {
        let (Some(need), Some(taken)) = (
            self.need.get_mut(disk as usize),
            self.taken.get_mut(disk as usize),
        ) else {
            return;
        };
        for &e in exts {
            taken.clear(e);
            need.set(e);
        }
    }

    /// Closes the window: returns it and, per disk, the extents it took.
    pub fn close_window(&mut self) -> Option<(Window, Vec<Vec<u64>>)> {
        let w = self.window.take()?;
        let taken = self
            .taken
            .iter_mut()
            .map(|t| {
                let exts = t.iter().collect();
                t.clear_all();
                exts
            })
            .collect();
        self.bitmap_since = None;
        Some((w, taken))
    }
}
