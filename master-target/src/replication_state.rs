//! The mutable state of a replication, behind its lock: the apply cursor
//! (how far apply got, persisted in `state.json` and `applied.seq`), the
//! recovery points, the retention journal, the rollback pre-images and the
//! cached chunk hashes.
//!
//! Its fields are private so every change goes through a method that keeps
//! memory and files in step: a change of a rarely changing field
//! (rollback, hand-over, end) is saved to `state.json` at once; the applied
//! seq and interval are persisted by [`Inner::persist_applied`] at the end
//! of an apply cycle.
//!
//! Recovery ([`Inner::recover`]) rebuilds everything from the files
//! themselves: the point catalog (torn tail cut), `state.json` and
//! `applied.seq` (the larger applied seq and interval win; see `seqfile`),
//! reconciled with the catalog (since a crash can fall between appending a
//! point and persisting the state), and the block index of every retained
//! interval, scanned from its journal with a torn or corrupt tail cut off
//! (see `retention_journal`).

use crate::catalog::PointEntry;
use crate::error::{io_err, Result};
use crate::hash_cache::HashCache;
use crate::layout::Layout;
use crate::points::RecoveryPoints;
use crate::replication::{mkdir, sync_dir};
use crate::retention_journal::{DroppedJournals, RetentionJournal};
use crate::rollback::PreImages;
use crate::seqfile::{SeqFile, SeqRecord};
use crate::state::{
    load_json, save_json, save_state, EndedState, HandOverState, HookOutcome, PersistedState,
    PointRef, ResyncWindow, RetentionPolicy, RollbackProgress, StoredInfo, TestFailoverState,
};
use crate::storage::Storage;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tracing::{error, info, warn};

/// The mutable state of a replication (see the module doc).
pub(crate) struct Inner {
    st: PersistedState,
    /// Where `st` is saved.
    state_path: PathBuf,
    /// What `state.json`, `applied.seq` and the catalog are written through.
    storage: Arc<dyn Storage>,
    /// A field only `state.json` holds (the resync window) changed since
    /// it was last saved.
    st_dirty: bool,
    points: RecoveryPoints,
    /// The retention journal: undo records of every retained interval.
    journal: RetentionJournal,
    /// Rollback pre-images, when they are complete.
    pre: Option<PreImages>,
    /// `applied.seq`: where apply persists `st.applied_seq` and
    /// `st.interval` (see `seqfile`).
    seq: SeqFile,
    /// The undo buffer of apply, kept between cycles so each cycle does not
    /// fault in fresh pages.
    scratch: Vec<u8>,
    /// Chunk hashes known without reading the replica (see `hash_cache`):
    /// apply updates it under the write lock, ChunkHashes under the read
    /// lock.
    chunk_hashes: Mutex<HashCache>,
    /// The pinned point retention last logged as holding points it would
    /// have dropped: each pin is logged once, not at every pass.
    pin_logged: Option<PointRef>,
}

impl Inner {
    /// Rebuilds a replication's in-memory state from its files (see the
    /// module doc of `replication`).
    pub fn recover(layout: &Layout, info: &StoredInfo, storage: Arc<dyn Storage>) -> Result<Inner> {
        let rid = &info.replication_id;
        let mut st: PersistedState = if layout.state().exists() {
            load_json(&layout.state())?
        } else {
            warn!(replication = %rid, "state.json is missing; starting from applied seq 0");
            PersistedState::default()
        };
        // The hot fields live in applied.seq (created from state.json the first
        // time); both only grow, so the larger value is the durable one.
        let (seq, hot) = SeqFile::open(
            &layout.applied_seq(),
            SeqRecord {
                applied_seq: st.applied_seq,
                interval: st.interval,
            },
        )?;
        st.applied_seq = st.applied_seq.max(hot.applied_seq);
        st.interval = st.interval.max(hot.interval);
        let points = RecoveryPoints::load(&layout.catalog())?;
        // A crash between appending a point and persisting the state leaves the
        // catalog ahead: the tag's interval is closed and its seq applied.
        if let Some(last) = points.last() {
            let mut changed = false;
            if last.interval >= st.interval {
                st.interval = last.interval + 1;
                changed = true;
            }
            if last.seq > st.applied_seq {
                st.applied_seq = last.seq;
                changed = true;
            }
            if changed {
                info!(replication = %rid, point = %last.id, "completing a recovery point cut interrupted by a restart");
                save_json(&layout.state(), &st)?;
            }
        }
        let current = st.interval;
        // Intervals the retained points need: after the oldest point.
        let lo = points.first().map(|p| p.interval + 1).unwrap_or(current);
        mkdir(&layout.retention_dir())?;
        mkdir(&layout.rollback_dir())?;
        let disk_ok = |d: u32| info.disks.iter().any(|x| x.index == d);
        let journal = RetentionJournal::open(layout, rid, current, lo, disk_ok, storage.clone())?;
        let pre_complete = st.rolled_back_to.is_some()
            || st.rollback.as_ref().is_some_and(|r| r.preimages_complete);
        let mut pre = None;
        if pre_complete {
            let point = st
                .rolled_back_to
                .clone()
                .or(st.rollback.as_ref().map(|r| r.point.clone()))
                .expect("a rollback point");
            match PreImages::open(layout, &point, disk_ok) {
                Ok(p) => pre = Some(p),
                Err(e) => error!(replication = %rid, error = %e,
                    "rollback pre-images cannot be read: views of points after the rollback point and RestorePreImages will fail"),
            }
        } else if st.rollback.is_none() && layout.preimages().exists() {
            let p = layout.preimages();
            std::fs::remove_file(&p)
                .map_err(io_err(|| format!("cannot remove {}", p.display())))?;
            sync_dir(&layout.rollback_dir())?;
        }
        Ok(Inner {
            st,
            state_path: layout.state(),
            storage,
            st_dirty: false,
            points,
            journal,
            pre,
            seq,
            scratch: Vec::new(),
            chunk_hashes: Mutex::new(HashCache::new(info.disks.iter().map(|d| d.size))),
            pin_logged: None,
        })
    }

    /// The persisted state as it is in memory.
    pub fn state(&self) -> &PersistedState {
        &self.st
    }

    pub fn applied_seq(&self) -> u64 {
        self.st.applied_seq
    }

    /// The retained recovery points, oldest first.
    pub fn points(&self) -> &RecoveryPoints {
        &self.points
    }

    pub fn journal(&self) -> &RetentionJournal {
        &self.journal
    }

    pub fn journal_mut(&mut self) -> &mut RetentionJournal {
        &mut self.journal
    }

    pub fn journal_bytes(&self) -> u64 {
        self.journal.bytes()
    }

    /// The complete pre-images of the rollback, if loaded.
    pub fn pre(&self) -> Option<&PreImages> {
        self.pre.as_ref()
    }

    pub fn set_pre(&mut self, pre: Option<PreImages>) {
        self.pre = pre;
    }

    /// The point the replica is (being) rolled back to, if any.
    pub fn rollback_point(&self) -> Option<&PointRef> {
        self.st
            .rolled_back_to
            .as_ref()
            .or(self.st.rollback.as_ref().map(|r| &r.point))
    }

    /// Undo records are needed only when a retained point precedes the
    /// current interval (the first interval has nothing to roll back to).
    pub fn journaling(&self) -> bool {
        !self.points.is_empty()
    }

    /// Whether cached chunk hashes may answer ChunkHashes: only while apply
    /// is the one writer of the replica, so not while a rollback is
    /// unfinished, after a hand-over or after the end (each of those also
    /// clears the cache when it starts).
    pub fn hashes_cacheable(&self) -> bool {
        self.st.rollback.is_none() && self.st.handed_over.is_none() && self.st.ended.is_none()
    }

    /// The cached chunk hashes, for a reader.
    pub fn cached_hashes(&self) -> MutexGuard<'_, HashCache> {
        self.chunk_hashes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached chunk hashes, for apply (which holds the write lock).
    pub fn cached_hashes_mut(&mut self) -> &mut HashCache {
        self.chunk_hashes
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets every cached chunk hash: something other than apply is about
    /// to change the replica.
    pub fn forget_chunk_hashes(&mut self) {
        self.cached_hashes_mut().clear();
    }

    /// Apply's undo buffer, to be given back with [`Inner::keep_scratch`].
    pub fn take_scratch(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.scratch)
    }

    pub fn keep_scratch(&mut self, buf: Vec<u8>) {
        self.scratch = buf;
    }

    /// Apply: a resync window opens at `w.begin_seq` (saved with the next
    /// [`Inner::persist_applied`]).
    pub fn open_resync(&mut self, w: ResyncWindow) {
        self.st.resync = Some(w);
        self.st_dirty = true;
    }

    /// Apply: the resync window closes; returns it.
    pub fn close_resync(&mut self) -> Option<ResyncWindow> {
        self.st_dirty = true;
        self.st.resync.take()
    }

    /// Apply: every record up to `seq` is applied (persisted by
    /// [`Inner::persist_applied`]).
    pub fn set_applied(&mut self, seq: u64) {
        self.st.applied_seq = seq;
    }

    /// Persists the apply cursor durably: all of `state.json` when a field
    /// only it holds changed, else just the applied seq and interval
    /// (`applied.seq`).
    pub fn persist_applied(&mut self) -> Result<()> {
        if self.st_dirty {
            return self.save_state();
        }
        let rec = SeqRecord {
            applied_seq: self.st.applied_seq,
            interval: self.st.interval,
        };
        self.seq.store(rec, self.storage.as_ref())
    }

    /// Apply, at a tag: `entry` closes the current interval. The catalog
    /// gets the point first, so a crash before the cursor is persisted is
    /// completed by recovery.
    pub fn cut_point(&mut self, entry: PointEntry) -> Result<()> {
        let seq = entry.seq;
        self.points.append(entry, self.storage.as_ref())?;
        self.st.interval = self.journal.close_interval();
        self.st.applied_seq = seq;
        self.persist_applied()
    }

    /// Retention: drops the `n` oldest points (the catalog first) and the
    /// journals only they needed, which the caller deletes once the lock is
    /// released. Returns the new oldest point.
    pub fn drop_oldest_points(&mut self, n: usize) -> Result<(PointEntry, DroppedJournals)> {
        let oldest = self
            .points
            .drop_oldest(n)?
            .cloned()
            .expect("retention keeps the newest point");
        let dropped = self.journal.drop_through(oldest.interval);
        Ok((oldest, dropped))
    }

    /// Rollback: the rollback to `point` started (`preimages_complete`:
    /// its pre-images are saved). Saved to `state.json`.
    pub fn set_rollback(&mut self, point: PointRef, preimages_complete: bool) -> Result<()> {
        self.st.rollback = Some(RollbackProgress {
            point,
            preimages_complete,
        });
        self.save_state()
    }

    /// Rollback: the replica is at `point`. Saved to `state.json`.
    pub fn rolled_back(&mut self, point: PointRef) -> Result<()> {
        self.st.rolled_back_to = Some(point);
        self.st.rollback = None;
        self.save_state()
    }

    /// Restore: the replica is back at latest, or an interrupted rollback
    /// is abandoned. Saved to `state.json`.
    pub fn clear_rollback(&mut self) -> Result<()> {
        self.st.rolled_back_to = None;
        self.st.rollback = None;
        self.save_state()
    }

    /// Restore: forgets the hand-over in memory (saved with the next
    /// change, or by [`Inner::save_state`]).
    pub fn take_handed_over(&mut self) -> Option<HandOverState> {
        self.st.handed_over.take()
    }

    /// Hand-over: apply stops for good. Saved to `state.json`.
    pub fn hand_over(&mut self, h: HandOverState) -> Result<()> {
        self.st.handed_over = Some(h);
        self.save_state()
    }

    /// Hand-over: the power_on hook ran. Saved to `state.json`.
    pub fn power_on_ran(&mut self, outcome: HookOutcome) -> Result<()> {
        if let Some(h) = self.st.handed_over.as_mut() {
            h.power_on = Some(outcome);
        }
        self.save_state()
    }

    /// Test failover: pins a point (`Some`) or unpins it (`None`). Saved
    /// to `state.json`.
    pub fn set_test_failover(&mut self, t: Option<TestFailoverState>) -> Result<()> {
        if t.is_none() {
            self.pin_logged = None;
        }
        self.st.test_failover = t;
        self.save_state()
    }

    /// The index among the retained points of the point a test failover
    /// pins, if any: retention drops no point from it on.
    pub fn pinned_index(&self) -> Option<usize> {
        let pin = &self.st.test_failover.as_ref()?.point;
        self.points
            .as_slice()
            .iter()
            .position(|p| p.interval == pin.interval && p.id == pin.id)
    }

    /// Retention: whether the pin holding points retention would have
    /// dropped is news for the log (a pin not logged yet).
    pub fn pin_news(&mut self) -> bool {
        let pin = self.st.test_failover.as_ref().map(|t| t.point.clone());
        if pin.is_none() || self.pin_logged == pin {
            return false;
        }
        self.pin_logged = pin;
        true
    }

    /// SetRetention: the replication's own retention. Saved to `state.json`.
    pub fn set_retention(&mut self, policy: RetentionPolicy) -> Result<()> {
        self.st.retention = policy;
        self.save_state()
    }

    /// The PS the replication is assigned to. Saved to `state.json`.
    pub fn set_ps(&mut self, ps_id: &str) -> Result<()> {
        self.st.ps_id = ps_id.to_string();
        self.save_state()
    }

    /// End: the replication ended. Saved to `state.json`.
    pub fn end(&mut self, ended: EndedState) -> Result<()> {
        self.st.ended = Some(ended);
        self.save_state()
    }

    /// End: forgets the points, the retention journal and the pre-images
    /// in memory (the caller removes their files).
    pub fn forget_retention(&mut self) {
        self.points.clear();
        self.journal.forget_all();
        self.pre = None;
    }

    /// Saves the persisted state to `state.json` atomically, through the
    /// storage (a failed fdatasync poisons the replication).
    pub fn save_state(&mut self) -> Result<()> {
        save_state(self.storage.as_ref(), &self.state_path, &self.st)?;
        self.st_dirty = false;
        Ok(())
    }
}
