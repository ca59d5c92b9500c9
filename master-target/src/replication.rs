//! A replication: creating it, opening it, its replica disks, and the
//! lock around its mutable state (`replication_state`), which is recovered
//! from disk on open and after a failed write (DESIGN.md §7).
//!
//! A failed fdatasync poisons the replication: Linux may have dropped the
//! dirty pages and marked them clean, so neither memory nor a re-read of
//! the files can be trusted. A poisoned replication refuses every change
//! until the process restarts and recovers it from what the disk holds.

use crate::catalog::PointEntry;
use crate::disk_full::DiskFull;
use crate::error::{io_err, MtError, Result};
use crate::events::Events;
use crate::layout::{valid_name, Layout};
use crate::metrics::{MtMetrics, Observer, Timed};
pub(crate) use crate::replica::Disk;
pub(crate) use crate::replication_state::Inner;
use crate::state::{load_json, save_json, PersistedState, RetentionPolicy, StoredDisk, StoredInfo};
use crate::storage::{sync_data, Storage, Target};
pub use crate::store::Store;
use rebound_common::durable::fsync_dir;
use rebound_common::time::now_ms;
use rebound_proto::ReplicationInfo;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError,
};
use tokio::sync::watch;
use tracing::{error, warn};

/// What every replication of a store shares: the storage its durable
/// writes go through (timed into the fsync histogram), where it raises
/// events, and the metric families it counts in.
#[derive(Clone)]
pub(crate) struct Env {
    pub storage: Arc<dyn Storage>,
    pub events: Events,
    pub metrics: MtMetrics,
}

impl Env {
    /// An environment whose durable writes go through `storage`.
    pub(crate) fn new(storage: Arc<dyn Storage>) -> Env {
        Env::measured(storage, MtMetrics::default())
    }

    /// Like [`Env::new`], counting in `metrics`.
    pub(crate) fn measured(storage: Arc<dyn Storage>, metrics: MtMetrics) -> Env {
        Env {
            storage: Arc::new(Timed::new(storage, metrics.fsync())),
            events: Events::default(),
            metrics,
        }
    }
}

impl Default for Env {
    fn default() -> Env {
        Env::new(Arc::new(crate::storage::Disk))
    }
}

/// One replication (machine × direction) at this master target.
pub struct Replication {
    id: String,
    info: StoredInfo,
    layout: Layout,
    disks: Vec<Disk>,
    /// Apply takes the write side per frame; views and chunk hashes take the
    /// read side, so they always see the replica at a frame boundary.
    inner: RwLock<Inner>,
    applied_tx: watch::Sender<u64>,
    env: Env,
    /// Why the replication refuses changes until the process restarts: a
    /// failed fdatasync (see the module doc).
    poisoned: Mutex<Option<String>>,
    /// Memory may not match the files: a failed write path could not
    /// rebuild the state from disk, so the next writer does first.
    stale: AtomicBool,
    /// Apply waits for space (see `disk_full`).
    disk_full: Mutex<Option<DiskFull>>,
    /// What apply, retention and rollback count for the metrics.
    observed: Observer,
}

/// A summary for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationStatus {
    pub applied_seq: u64,
    pub points: usize,
    /// Id of the point the replica is rolled back to.
    pub rolled_back_to: Option<String>,
    /// An interrupted rollback awaits a re-run or RestorePreImages.
    pub rollback_pending: Option<String>,
    pub journal_bytes: u64,
    /// Why the replication refuses changes until the MT restarts (a failed
    /// fdatasync), if it does.
    pub poisoned: Option<String>,
    /// Why apply waits for space, if it does.
    pub disk_full: Option<String>,
}

fn validate_info(info: &StoredInfo) -> Result<()> {
    let bad = |m: String| Err(MtError::InvalidArgument(m));
    if !valid_name(&info.replication_id) {
        return bad(format!(
            "replication id {:?} is not usable: use 1-200 characters of A-Z a-z 0-9 - _ . : +, not starting with a dot",
            info.replication_id
        ));
    }
    if !valid_name(&info.machine_id) {
        return bad(format!(
            "machine id {:?} of replication {} is not usable: use 1-200 characters of A-Z a-z 0-9 - _ . : +",
            info.machine_id, info.replication_id
        ));
    }
    if info.disks.is_empty() {
        return bad(format!(
            "replication {} has no disks; the hello must list the machine's disks",
            info.replication_id
        ));
    }
    for (i, d) in info.disks.iter().enumerate() {
        if !valid_name(&d.name) {
            return bad(format!(
                "disk {} of replication {} has an unusable name {:?}",
                d.index, info.replication_id, d.name
            ));
        }
        if d.index >= 1 << 16 {
            return bad(format!(
                "disk index {} of replication {} is too large (at most 65535)",
                d.index, info.replication_id
            ));
        }
        if d.size == 0 || d.size >= 1 << 60 {
            return bad(format!(
                "disk {} ({}) of replication {} has an unusable size {}",
                d.index, d.name, info.replication_id, d.size
            ));
        }
        if info.disks[..i]
            .iter()
            .any(|e| e.index == d.index || e.name == d.name)
        {
            return bad(format!(
                "replication {} lists disk {} ({}) twice",
                info.replication_id, d.index, d.name
            ));
        }
    }
    Ok(())
}

fn info_from_proto(p: &ReplicationInfo) -> StoredInfo {
    StoredInfo {
        replication_id: p.replication_id.clone(),
        machine_id: p.machine_id.clone(),
        disks: p
            .disks
            .iter()
            .map(|d| StoredDisk {
                index: d.index,
                name: if d.name.is_empty() {
                    format!("disk{}", d.index)
                } else {
                    d.name.clone()
                },
                size: d.size,
            })
            .collect(),
        created_ms: now_ms(),
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fsync_dir(dir).map_err(io_err(|| {
        format!("cannot fsync directory {}", dir.display())
    }))
}

pub(crate) fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(|| {
        format!("cannot create directory {}", dir.display())
    }))
}

impl Replication {
    /// Creates the replication's directory and sparse replica files, then
    /// opens it, with `retention` as its policy. `info.json` is written
    /// last: a directory without it is an interrupted creation and is redone.
    pub(crate) fn create(
        data_dir: &Path,
        p: &ReplicationInfo,
        retention: RetentionPolicy,
        env: &Env,
    ) -> Result<Replication> {
        let info = info_from_proto(p);
        validate_info(&info)?;
        let layout = Layout::new(data_dir.join(&info.replication_id));
        for d in [
            layout.root().to_path_buf(),
            layout.replica_dir(),
            layout.retention_dir(),
            layout.rollback_dir(),
        ] {
            mkdir(&d)?;
        }
        for d in &info.disks {
            Disk::create(&layout.replica(&d.name), d)?;
        }
        sync_dir(&layout.replica_dir())?;
        let state = PersistedState {
            retention,
            ..PersistedState::default()
        };
        save_json(&layout.state(), &state)?;
        save_json(&layout.info(), &info)?;
        sync_dir(data_dir)?;
        Replication::open_in(layout.root(), env)
    }

    /// Opens an existing replication directory and recovers its state.
    pub fn open(root: &Path) -> Result<Replication> {
        Replication::open_in(root, &Env::default())
    }

    pub(crate) fn open_in(root: &Path, env: &Env) -> Result<Replication> {
        let layout = Layout::new(root.to_path_buf());
        let info: StoredInfo = load_json(&layout.info())?;
        validate_info(&info)?;
        let disks = info
            .disks
            .iter()
            .map(|d| Disk::open(layout.replica(&d.name), d, &info.replication_id))
            .collect::<Result<Vec<Disk>>>()?;
        let inner = Inner::recover(&layout, &info, env.storage.clone())?;
        let (applied_tx, _) = watch::channel(inner.applied_seq());
        let observed = env.metrics.observer(&info.replication_id, &info.machine_id);
        Ok(Replication {
            id: info.replication_id.clone(),
            info,
            layout,
            disks,
            inner: RwLock::new(inner),
            applied_tx,
            env: env.clone(),
            poisoned: Mutex::new(None),
            stale: AtomicBool::new(false),
            disk_full: Mutex::new(None),
            observed,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn machine_id(&self) -> &str {
        &self.info.machine_id
    }

    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    pub fn created_ms(&self) -> u64 {
        self.info.created_ms
    }

    pub fn info(&self) -> ReplicationInfo {
        self.info.to_proto()
    }

    /// Disks as (index, name, size, replica path).
    pub fn disks(&self) -> Vec<(u32, String, u64, PathBuf)> {
        self.disks
            .iter()
            .map(|d| {
                (
                    d.index(),
                    d.name().to_string(),
                    d.size(),
                    d.path().to_path_buf(),
                )
            })
            .collect()
    }

    pub(crate) fn disk(&self, index: u32) -> Result<&Disk> {
        self.disks
            .iter()
            .find(|d| d.index() == index)
            .ok_or_else(|| {
                MtError::NotFound(format!(
                    "replication {} has no disk {index} (it has {})",
                    self.id,
                    self.disks
                        .iter()
                        .map(|d| format!("{} ({})", d.index(), d.name()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// The replica disks, in the order of the replication's info.
    pub(crate) fn replica_disks(&self) -> &[Disk] {
        &self.disks
    }

    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Where the replication raises events.
    pub(crate) fn events(&self) -> &Events {
        &self.env.events
    }

    /// Apply's disk-full episode, if one is going on.
    pub(crate) fn disk_full(&self) -> Option<DiskFull> {
        self.disk_full_slot().clone()
    }

    pub(crate) fn disk_full_slot(&self) -> MutexGuard<'_, Option<DiskFull>> {
        self.disk_full
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What apply, retention and rollback count for the metrics.
    pub(crate) fn observed(&self) -> &Observer {
        &self.observed
    }

    /// The storage the replication's durable writes go through.
    pub(crate) fn storage(&self) -> &dyn Storage {
        self.env.storage.as_ref()
    }

    pub(crate) fn disk_by_name(&self, name: &str) -> Option<&Disk> {
        self.disks.iter().find(|d| d.name() == name)
    }

    pub fn applied_seq(&self) -> u64 {
        *self.applied_tx.borrow()
    }

    /// Publishes a newly applied seq to the watchers of
    /// [`Replication::subscribe_applied`].
    pub(crate) fn publish_applied(&self, seq: u64) {
        self.applied_tx.send_replace(seq);
    }

    /// Watches the applied seq (for ChunkHashes' wait).
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// The retained recovery points, oldest first.
    pub fn points(&self) -> Vec<PointEntry> {
        self.read_summary().points().as_slice().to_vec()
    }

    /// The retained recovery points, oldest first, each with why it cannot
    /// be rebuilt exactly (a retention journal it needs is damaged; empty
    /// when it can).
    pub fn points_with_damage(&self) -> Vec<(PointEntry, String)> {
        let inner = self.read_summary();
        inner
            .points()
            .as_slice()
            .iter()
            .map(|p| {
                let damaged = inner.journal().check_point(p.interval).err();
                (
                    p.clone(),
                    damaged.map(|e| e.to_string()).unwrap_or_default(),
                )
            })
            .collect()
    }

    pub fn status(&self) -> ReplicationStatus {
        let inner = self.read_summary();
        ReplicationStatus {
            applied_seq: inner.applied_seq(),
            points: inner.points().len(),
            rolled_back_to: inner.state().rolled_back_to.as_ref().map(|p| p.id.clone()),
            rollback_pending: inner.state().rollback.as_ref().map(|r| r.point.id.clone()),
            journal_bytes: inner.journal_bytes(),
            poisoned: self.poisoned(),
            disk_full: self.disk_full_cause(),
        }
    }

    /// Why this replication refuses changes until the MT restarts, if it
    /// does: an fdatasync failed.
    pub fn poisoned(&self) -> Option<String> {
        self.poisoned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The refusal of a poisoned replication, if it is.
    pub(crate) fn check_not_poisoned(&self) -> Result<()> {
        match self.poisoned() {
            Some(cause) => Err(MtError::Poisoned {
                replication: self.id.clone(),
                cause,
            }),
            None => Ok(()),
        }
    }

    /// Called with every error of a write path: a failed fdatasync poisons
    /// the replication (logged, and raised to the CS as an event). Returns
    /// whether it did, so the caller does not rebuild its state from files
    /// it can no longer trust.
    pub(crate) fn poison_on_failed_sync(&self, e: &MtError) -> bool {
        if !e.is_failed_sync() {
            return false;
        }
        let cause = e.to_string();
        let first = {
            let mut p = self.poisoned.lock().unwrap_or_else(PoisonError::into_inner);
            let first = p.is_none();
            p.get_or_insert_with(|| cause.clone());
            first
        };
        if first {
            let err = MtError::Poisoned {
                replication: self.id.clone(),
                cause,
            };
            error!(replication = %self.id, machine = %self.info.machine_id, error = %err, "replication poisoned");
            self.env
                .events
                .error("replication-poisoned", &self.id, err.to_string());
        }
        true
    }

    /// [`Replication::poison_on_failed_sync`] for a `map_err`: returns the
    /// error.
    pub(crate) fn noting_failed_sync(&self, e: MtError) -> MtError {
        self.poison_on_failed_sync(&e);
        e
    }

    /// Changes a rarely changing field of `state.json` with `set`, unless
    /// `holds` says it already has the value: saved before it returns,
    /// refused while the replication is poisoned (its files cannot be
    /// trusted). Returns whether it changed.
    pub(crate) fn change_state(
        &self,
        holds: impl FnOnce(&PersistedState) -> bool,
        set: impl FnOnce(&mut Inner) -> Result<()>,
    ) -> Result<bool> {
        let mut inner = self.write_inner()?;
        self.check_not_poisoned()?;
        if holds(inner.state()) {
            return Ok(false);
        }
        set(&mut inner).map_err(|e| self.noting_failed_sync(e))?;
        Ok(true)
    }

    /// The write side for a change of the replica other than apply
    /// (rollback, restore, hand-over, end): refused while poisoned (checked
    /// under the lock, after any cycle that could poison it), and the cached
    /// chunk hashes are forgotten first.
    pub(crate) fn write_for_change(&self) -> Result<RwLockWriteGuard<'_, Inner>> {
        let mut inner = self.write_inner()?;
        self.check_not_poisoned()?;
        inner.forget_chunk_hashes();
        Ok(inner)
    }

    /// The refusal of an ended replication, saying what that means for the
    /// operation (`consequence`).
    pub(crate) fn ended_refusal(&self, inner: &Inner, consequence: &str) -> Option<String> {
        inner.state().ended.as_ref().map(|_| {
            format!(
                "replication {} of {} has ended (committed); {consequence}",
                self.id, self.info.machine_id
            )
        })
    }

    /// Fails with [`MtError::FailedPrecondition`] when the replication has
    /// ended.
    pub(crate) fn check_not_ended(&self, inner: &Inner, consequence: &str) -> Result<()> {
        match self.ended_refusal(inner, consequence) {
            Some(msg) => Err(MtError::FailedPrecondition(msg)),
            None => Ok(()),
        }
    }

    /// fdatasyncs every replica (after something other than apply wrote
    /// them: rollback, restore, hand-over).
    pub(crate) fn sync_all_replicas(&self) -> Result<()> {
        for d in &self.disks {
            self.sync_file(Target::Replica, d.file(), d.path())?;
        }
        Ok(())
    }

    /// fdatasyncs a file of this replication through the storage; a
    /// failure poisons the replication.
    pub(crate) fn sync_file(&self, target: Target, file: &File, path: &Path) -> Result<()> {
        sync_data(self.storage(), target, file, path).map_err(|e| self.noting_failed_sync(e))
    }

    /// Checks that a hello describes this replication.
    pub fn check_hello(&self, p: &ReplicationInfo) -> Result<()> {
        if !p.machine_id.is_empty() && p.machine_id != self.info.machine_id {
            return Err(MtError::FailedPrecondition(format!(
                "replication {} belongs to machine {} at this MT, but the hello says machine {}; use a new replication id for another machine",
                self.id, self.info.machine_id, p.machine_id
            )));
        }
        if p.disks.is_empty() {
            return Ok(());
        }
        let given = info_from_proto(p).disks;
        let mut a = given.clone();
        let mut b = self.info.disks.clone();
        a.sort_by_key(|d| d.index);
        b.sort_by_key(|d| d.index);
        if a != b {
            let show = |v: &[StoredDisk]| {
                v.iter()
                    .map(|d| format!("{}:{}:{}", d.index, d.name, d.size))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(MtError::FailedPrecondition(format!(
                "replication {} has disks [{}] at this MT but the hello says [{}]; the disks of a replication cannot change: protect the machine again as a new replication",
                self.id,
                show(&b),
                show(&a)
            )));
        }
        Ok(())
    }

    /// The read side for data (views, chunk hashes): memory that may not
    /// match the files — a panic mid-update, or a failed write whose state
    /// could not be rebuilt — is healed first when the lock is free, and
    /// refused with [`MtError::Unavailable`] while it cannot be.
    pub(crate) fn read_inner(&self) -> Result<RwLockReadGuard<'_, Inner>> {
        self.heal_if_free();
        match self.inner.read() {
            Ok(g) if !self.stale.load(Ordering::SeqCst) => Ok(g),
            _ => Err(MtError::Unavailable(format!(
                "replication {} of {}: its state is being recovered from disk after a failed \
                 write (see the MT log for why it cannot be yet); retry in a moment",
                self.id, self.info.machine_id
            ))),
        }
    }

    /// The read side for summaries (status, the point list, the state
    /// name): healed first when it can be, never refused (a summary of a
    /// state being recovered is still the best answer there is).
    pub(crate) fn read_summary(&self) -> RwLockReadGuard<'_, Inner> {
        self.heal_if_free();
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The read side if it is free now (a scrape of the metrics must not
    /// wait behind a rollback); `None` while a writer holds it or the
    /// state needs healing.
    pub(crate) fn try_read_inner(&self) -> Option<RwLockReadGuard<'_, Inner>> {
        if self.stale.load(Ordering::SeqCst) {
            return None;
        }
        self.inner.try_read().ok()
    }

    /// Heals a poisoned or stale state if no one holds the lock. A reader
    /// only tries: waiting could deadlock with a read guard of its own
    /// thread, and a writer heals anyway.
    fn heal_if_free(&self) {
        if !self.inner.is_poisoned() && !self.stale.load(Ordering::SeqCst) {
            return;
        }
        let g = match self.inner.try_write() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(poisoned)) => self.unpoison(poisoned),
            Err(TryLockError::WouldBlock) => return,
        };
        // On failure the state stays stale and the reader is refused.
        drop(self.healed(g));
    }

    /// The write side. A lock poisoned by a panic mid-update, or a state
    /// a failed write could not rebuild, is healed by recovering the state
    /// from disk, exactly as after a crash; until that succeeds every
    /// writer gets its error.
    pub(crate) fn write_inner(&self) -> Result<RwLockWriteGuard<'_, Inner>> {
        let g = match self.inner.write() {
            Ok(g) => g,
            Err(poisoned) => self.unpoison(poisoned),
        };
        self.healed(g)
    }

    /// Takes a lock a panic poisoned, marking the state stale.
    fn unpoison<'a>(
        &self,
        poisoned: PoisonError<RwLockWriteGuard<'a, Inner>>,
    ) -> RwLockWriteGuard<'a, Inner> {
        self.stale.store(true, Ordering::SeqCst);
        self.inner.clear_poison();
        poisoned.into_inner()
    }

    /// Reloads a stale state under the write lock `g`.
    fn healed<'a>(
        &self,
        mut g: RwLockWriteGuard<'a, Inner>,
    ) -> Result<RwLockWriteGuard<'a, Inner>> {
        if self.stale.load(Ordering::SeqCst) {
            if let Err(e) = self.reload(&mut g) {
                error!(replication = %self.id, error = %e, "cannot recover the replication state from disk; the next reader or writer tries again");
                return Err(e);
            }
            self.stale.store(false, Ordering::SeqCst);
        }
        Ok(g)
    }

    /// After a failed write path: rebuilds the in-memory state from disk,
    /// as a restart would, unless an fdatasync failed. Then the files are
    /// not to be trusted (the replication is poisoned, see the module doc)
    /// and memory is left as it is until the process restarts.
    pub(crate) fn recover_after(&self, inner: &mut Inner, e: &MtError) {
        if self.poison_on_failed_sync(e) {
            return;
        }
        if let Err(e2) = self.reload(inner) {
            self.stale.store(true, Ordering::SeqCst);
            error!(replication = %self.id, error = %e2, "cannot recover the replication state from disk; the next change tries again first");
        }
    }

    /// Rebuilds the in-memory state from disk, as a restart would.
    fn reload(&self, inner: &mut Inner) -> Result<()> {
        warn!(replication = %self.id, "recovering replication state from disk after an error");
        *inner = Inner::recover(&self.layout, &self.info, self.env.storage.clone())?;
        self.applied_tx.send_replace(inner.applied_seq());
        Ok(())
    }
}
