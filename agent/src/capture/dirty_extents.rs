//! The dirty-extent map: which extents the dirty-extent log must keep set
//! (DESIGN.md §5 "Dirty-extent log"), on top of [`crate::dirty_log`].
//!
//! A write marks its extents durably before it is acknowledged (step 1 of
//! the write path), but only when an extent goes clean → dirty; that sync
//! is the only slow step and runs outside the ordering point's lock, with
//! the extent marked in flight so it cannot be cleared meanwhile. A mark is
//! cleared only once every record touching the extent is durable at the PS
//! (its highest seq ≤ the durable seq), no resync still has to cover it,
//! and it went cold, so hot extents skip step 1.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use rebound_common::chunk::EXTENT_SIZE;
use rebound_common::nbd::NbdError;
use tracing::error;

use super::{fenced_error, Capture, State};
use crate::dirty_log::DirtyLog;

/// When a sequential writer dirties a new extent, this many following clean
/// extents are marked in the same sync (DRBD-style activity-log look-ahead).
const LOOKAHEAD: u64 = 7;

/// The extents a byte range touches.
pub(super) fn extents_of(offset: u64, len: u64) -> RangeInclusive<u64> {
    offset / EXTENT_SIZE..=(offset + len.max(1) - 1) / EXTENT_SIZE
}

/// Per extent: the last record touching it and when it was last written.
pub(super) struct ExtentMap {
    /// Highest seq of a record touching each extent.
    hi_seq: Vec<Vec<u64>>,
    /// When each extent was last written, in seconds since `epoch`.
    last_write: Vec<Vec<u32>>,
    /// Extents whose dirty bit is being synced by a writer outside the lock.
    inflight: HashMap<(u32, u64), u32>,
    epoch: Instant,
}

impl ExtentMap {
    pub fn new(extents: &[u64]) -> ExtentMap {
        ExtentMap {
            hi_seq: extents.iter().map(|&n| vec![0; n as usize]).collect(),
            last_write: extents.iter().map(|&n| vec![0; n as usize]).collect(),
            inflight: HashMap::new(),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u32 {
        self.epoch.elapsed().as_secs() as u32
    }

    /// The extents were written just now.
    pub fn touch(&mut self, disk: u32, exts: impl IntoIterator<Item = u64>) {
        let now = self.now();
        if let Some(lw) = self.last_write.get_mut(disk as usize) {
            for e in exts {
                if let Some(t) = lw.get_mut(e as usize) {
                    *t = now;
                }
            }
        }
    }

    /// Record `seq` touches the extents; `raise` keeps a higher seq already
    /// there (resync records may trail a later write's record).
    pub fn recorded(
        &mut self,
        disk: u32,
        exts: impl IntoIterator<Item = u64>,
        seq: u64,
        raise: bool,
    ) {
        if let Some(hi) = self.hi_seq.get_mut(disk as usize) {
            for e in exts {
                if let Some(h) = hi.get_mut(e as usize) {
                    *h = if raise { (*h).max(seq) } else { seq };
                }
            }
        }
    }

    /// A new stream: no record touches anything yet.
    pub fn forget_seqs(&mut self) {
        for h in self.hi_seq.iter_mut() {
            h.iter_mut().for_each(|x| *x = 0);
        }
    }

    fn begin_sync(&mut self, disk: u32, exts: &[u64]) {
        for &e in exts {
            *self.inflight.entry((disk, e)).or_insert(0) += 1;
        }
    }

    fn end_sync(&mut self, disk: u32, exts: &[u64]) {
        for &e in exts {
            if let Some(c) = self.inflight.get_mut(&(disk, e)) {
                *c -= 1;
                if *c == 0 {
                    self.inflight.remove(&(disk, e));
                }
            }
        }
    }

    /// Whether every record touching the extent is durable and nothing is
    /// about to write it.
    fn settled(&self, disk: u32, e: u64, durable: u64) -> bool {
        !self.inflight.contains_key(&(disk, e))
            && self.hi_seq[disk as usize]
                .get(e as usize)
                .is_some_and(|&h| h <= durable)
    }
}

/// Which of the clearable extents to clear, per disk: all of them (`None`),
/// or by the activity-log rule (`Some((idle, keep))`): those with no write
/// for `idle`, then, while more than `keep` are dirty, the least recently
/// written. `clearable` holds (extent, last write) per disk, `dirty` the
/// number of dirty extents, `now` the current time in map seconds.
fn choose(
    clearable: &[Vec<(u64, u64)>],
    rule: Option<(Duration, u64)>,
    dirty: u64,
    now: u64,
) -> Vec<Vec<u64>> {
    let mut clear: Vec<Vec<u64>> = vec![Vec::new(); clearable.len()];
    let Some((idle, keep)) = rule else {
        for (c, all) in clear.iter_mut().zip(clearable) {
            c.extend(all.iter().map(|&(e, _)| e));
        }
        return clear;
    };
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
    let excess = dirty.saturating_sub(cold).saturating_sub(keep);
    warm.sort_unstable();
    for (_, disk, e) in warm.into_iter().take(excess as usize) {
        clear[disk].push(e);
    }
    clear
}

impl Capture {
    /// Step 1 of the write path: durably marks the extents `exts` of `disk`
    /// that are not yet, with the look-ahead for a sequential writer. The
    /// sync runs with the lock released; the guard comes back re-taken.
    pub(super) fn mark_dirty<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        disk: u32,
        disk_name: &str,
        offset: u64,
        exts: RangeInclusive<u64>,
    ) -> Result<MutexGuard<'a, State>, NbdError> {
        let dlog = &self.dlog;
        let clean: Vec<u64> = exts
            .clone()
            .filter(|&e| !dlog.is_durably_set(disk, e))
            .collect();
        if clean.is_empty() {
            return Ok(st);
        }
        st.extents.begin_sync(disk, &clean);
        let mut to_set = clean.clone();
        let (first, last) = (*exts.start(), *exts.end());
        if first > 0 && dlog.is_set(disk, first - 1) {
            let n = dlog.extents(disk);
            to_set
                .extend((last + 1..=last + LOOKAHEAD).filter(|&e| e < n && !dlog.is_set(disk, e)));
        }
        drop(st);
        let r = dlog.set_and_sync(disk, &to_set);
        st = self.lock();
        st.extents.end_sync(disk, &clean);
        if let Err(e) = r {
            error!(disk = %disk_name, offset, "cannot sync the dirty-extent log {}: {e}", dlog.path().display());
            return Err(NbdError::from_io(
                &e,
                format!("dirty-extent log {}", dlog.path().display()),
            ));
        }
        // The look-ahead extents count as just written, so the clear loop
        // keeps them for a sequential writer about to reach them.
        st.extents.touch(disk, to_set);
        if st.order.fenced {
            return Err(fenced_error());
        }
        Ok(st)
    }

    /// Clearing marks from the dirty-extent log.
    pub fn dirty_extents(&self) -> DirtyExtents<'_> {
        DirtyExtents(self)
    }
}

/// The dirty-extent log as the clear loop and a clean stop see it.
pub struct DirtyExtents<'a>(&'a Capture);

impl DirtyExtents<'_> {
    pub fn log(&self) -> &Arc<DirtyLog> {
        &self.0.dlog
    }

    /// Clears the dirty bits of every extent whose every record is durable at
    /// the PS and that no resync still needs (clean shutdown). Returns how
    /// many were cleared.
    pub fn clear_durable(&self) -> std::io::Result<u64> {
        self.clear(None)
    }

    /// The activity-log rule, run every second: among the extents that
    /// [`DirtyExtents::clear_durable`] could clear, clears those with no
    /// write for `idle`, then, while more than `keep` extents are dirty, the
    /// least recently written ones. A hot extent thus stays dirty and its
    /// writes never wait for a dirty-log sync; after a crash the resync
    /// compares at most the extents whose records the PS did not hold plus
    /// `keep` extents written in the last `idle`.
    pub fn clear_cold(&self, idle: Duration, keep: u64) -> std::io::Result<u64> {
        self.clear(Some((idle, keep)))
    }

    fn clear(&self, rule: Option<(Duration, u64)>) -> std::io::Result<u64> {
        let cap = self.0;
        let st = cap.lock();
        let map = &st.extents;
        let now = map.epoch.elapsed().as_secs();
        let durable = st.buffer.durable_seq;
        let clearable: Vec<Vec<(u64, u64)>> = (0..cap.disks.len())
            .map(|disk| {
                let d = disk as u32;
                cap.dlog
                    .set_extents(d)
                    .into_iter()
                    .filter(|&e| !st.modes.covers(disk, e) && map.settled(d, e, durable))
                    .map(|e| (e, map.last_write[disk][e as usize] as u64))
                    .collect()
            })
            .collect();
        let mut cleared = 0;
        for (disk, mut c) in choose(&clearable, rule, cap.dlog.count(), now)
            .into_iter()
            .enumerate()
        {
            if c.is_empty() {
                continue;
            }
            c.sort_unstable();
            cleared += c.len() as u64;
            cap.dlog.clear(disk as u32, &c)?;
        }
        Ok(cleared)
    }
}
