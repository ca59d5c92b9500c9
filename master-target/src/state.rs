//! Small persisted files of a replication: `info.json` (what is replicated)
//! and `state.json` (how far apply got, rollback progress).
//!
//! `state.json` is replaced atomically (tmp + fsync + rename + fsync dir)
//! whenever a rarely changing field changes (rollback, resync window,
//! hand-over). The applied seq and current interval, which change with
//! every apply cycle, are persisted in `applied.seq` (see `seqfile`);
//! recovery takes the larger of the two for each, so the applied seq the
//! MT acknowledges is never ahead of what a restart finds.

use crate::error::{io_err, MtError, Result};
use crate::storage::{sync_data, Storage, Target};
use rebound_common::durable::{fsync_dir, write_atomic};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fs::OpenOptions;
use std::path::Path;

/// `info.json`: the replication and its disks, fixed at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredInfo {
    pub replication_id: String,
    pub machine_id: String,
    pub disks: Vec<StoredDisk>,
    /// When the MT created the replication (ms since the epoch).
    #[serde(default)]
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDisk {
    pub index: u32,
    pub name: String,
    pub size: u64,
}

impl StoredInfo {
    pub fn to_proto(&self) -> rebound_proto::ReplicationInfo {
        rebound_proto::ReplicationInfo {
            replication_id: self.replication_id.clone(),
            machine_id: self.machine_id.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| rebound_proto::DiskInfo {
                    index: d.index,
                    name: d.name.clone(),
                    size: d.size,
                })
                .collect(),
        }
    }
}

/// A reference to a recovery point that survives catalog rewrites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointRef {
    pub id: String,
    pub seq: u64,
    /// The interval the point closes.
    pub interval: u64,
}

/// A rollback that has started but not finished (DESIGN.md §7 "Rollback").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackProgress {
    pub point: PointRef,
    /// Phase 1 is done: `rollback/preimages` holds the content of every
    /// affected block before the rollback. A re-run must not save again.
    pub preimages_complete: bool,
}

/// An open resync window (between ResyncBegin and ResyncEnd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncWindow {
    pub begin_seq: u64,
    pub disks: Vec<u32>,
    pub reason: String,
}

/// `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PersistedState {
    /// Every record up to this seq is applied durably.
    pub applied_seq: u64,
    /// The current (open) interval.
    pub interval: u64,
    /// The replica is at this point (a finished rollback).
    pub rolled_back_to: Option<PointRef>,
    /// A rollback in progress (or interrupted by a crash).
    pub rollback: Option<RollbackProgress>,
    pub resync: Option<ResyncWindow>,
    /// The replica was handed over (DESIGN.md §7 "Hand-over"): apply is
    /// refused from then on.
    pub handed_over: Option<HandOverState>,
    /// The replication ended (commit): its retention and catalog are gone.
    pub ended: Option<EndedState>,
    /// The replication's own retention (its machine's policy, SetRetention).
    pub retention: RetentionPolicy,
    /// The id of the only PS whose Apply and ChunkHashes are accepted: the
    /// CS's PrepareReplication names it; without a CS the first PS binds.
    /// Empty: none recorded yet.
    pub ps_id: String,
    /// A running test failover: its point is pinned (retention keeps every
    /// interval it needs) until EndTestFailover.
    pub test_failover: Option<TestFailoverState>,
}

/// A test failover (DESIGN.md §7 views): a writable copy of `point` served
/// as `<machine>/<disk>@test`, its writes kept in overlay files of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestFailoverState {
    /// The pinned point the copy shows where the overlay holds nothing.
    pub point: PointRef,
    /// When it started (ms since the epoch).
    pub started_ms: u64,
    /// The last run of the test_power_on hook; a successful run is not
    /// repeated by a re-sent StartTestFailover.
    #[serde(default)]
    pub test_power_on: Option<HookOutcome>,
}

/// The retention of one replication as the CS set it: 0 in a field means
/// the MT's `[retention]` default for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetentionPolicy {
    pub window_secs: u64,
    pub max_bytes: u64,
}

/// A hand-over: the point the replica was handed over at, and the power-on
/// hook's outcome once it ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandOverState {
    /// The point id, or "latest" when there was no point.
    pub point: String,
    pub seq: u64,
    pub time_ms: u64,
    /// The last run of the power_on hook; a successful run is not repeated.
    #[serde(default)]
    pub power_on: Option<HookOutcome>,
}

/// What a hook run did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookOutcome {
    pub command: String,
    pub success: bool,
    /// "exit status 0", "killed by signal 9", "timed out after 60 s", ...
    pub status: String,
    /// The last lines of its stdout and stderr.
    pub output_tail: String,
}

/// The replication ended (EndReplication).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedState {
    pub time_ms: u64,
    pub keep_replica: bool,
}

pub fn load_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes =
        std::fs::read(path).map_err(io_err(|| format!("cannot read {}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        MtError::DataLoss(format!(
            "{} is corrupt ({e}); restore it from a backup or remove the replication directory and resync",
            path.display()
        ))
    })
}

pub fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).expect("state serializes");
    write_atomic(path, &bytes).map_err(io_err(|| format!("cannot write {}", path.display())))
}

/// Saves `state` to `path` like [`save_json`] (tmp, fdatasync, rename,
/// fsync of the directory), with the write and the fdatasync of the new
/// copy going through `storage`: a failed fdatasync is [`MtError::Sync`],
/// which poisons the replication.
pub(crate) fn save_state(storage: &dyn Storage, path: &Path, state: &PersistedState) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let tmp = dir.join(".state.json.tmp");
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err(|| format!("cannot create {}", tmp.display())))?;
    storage
        .write_all_at(Target::State, &f, &bytes, 0)
        .map_err(io_err(|| format!("cannot write {}", tmp.display())))?;
    sync_data(storage, Target::State, &f, &tmp)?;
    std::fs::rename(&tmp, path).map_err(io_err(|| {
        format!("cannot rename {} to {}", tmp.display(), path.display())
    }))?;
    fsync_dir(dir).map_err(io_err(|| {
        format!("cannot fsync directory {}", dir.display())
    }))
}
