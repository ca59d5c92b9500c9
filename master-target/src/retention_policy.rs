//! The retention of one replication (its machine's policy, DESIGN.md §7
//! "Retention"): the CS sends `SetRetention` before the first frame
//! (protect, reprotect) and on every policy change. Each field overrides
//! the MT's `[retention]` default; 0 keeps the default.
//!
//! A replication's policy lives in its `state.json`, saved durably (tmp,
//! fdatasync, rename, fsync of the directory) before the command is
//! acknowledged. A policy for a replication this MT does not have yet is
//! kept in `<data_dir>/.pending-retention.json` (same durable write; the
//! leading dot keeps it apart from replication ids) and written into the
//! replication's `state.json` when the replication is created.

use crate::config::RetentionConfig;
use crate::error::{io_err, MtError, Result};
use crate::replication::Replication;
use crate::state::{load_json, RetentionPolicy};
use crate::store::Store;
use rebound_common::durable::write_atomic;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// The file of policies that arrived before their replication.
pub const PENDING_FILE: &str = ".pending-retention.json";

impl RetentionPolicy {
    /// The retention this policy gives with the MT's `defaults`: each field
    /// that is 0 takes the default's.
    pub fn resolve(&self, defaults: &RetentionConfig) -> RetentionConfig {
        let or = |v: u64, d: u64| if v > 0 { v } else { d };
        RetentionConfig {
            window_secs: or(self.window_secs, defaults.window_secs),
            max_bytes: or(self.max_bytes, defaults.max_bytes),
            check_secs: defaults.check_secs,
        }
    }
}

/// Policies for replications this MT does not have yet, by replication id,
/// as persisted in [`PENDING_FILE`].
#[derive(Debug)]
pub(crate) struct PendingRetention {
    path: PathBuf,
    by_replication: BTreeMap<String, RetentionPolicy>,
}

impl PendingRetention {
    /// Loads the pending policies of `data_dir` (none when the file is
    /// missing).
    pub fn load(data_dir: &Path) -> Result<PendingRetention> {
        let path = data_dir.join(PENDING_FILE);
        let by_replication = if path.exists() {
            load_json(&path)?
        } else {
            BTreeMap::new()
        };
        Ok(PendingRetention {
            path,
            by_replication,
        })
    }

    pub fn get(&self, id: &str) -> Option<RetentionPolicy> {
        self.by_replication.get(id).copied()
    }

    /// Keeps `policy` for replication `id`, durably.
    pub fn put(&mut self, id: &str, policy: RetentionPolicy) -> Result<()> {
        if self.get(id) == Some(policy) {
            return Ok(());
        }
        let mut next = self.by_replication.clone();
        next.insert(id.to_string(), policy);
        self.save(next)
    }

    /// Forgets the policies of the replications `done` says are settled
    /// (created with it, or ended), durably.
    pub fn forget(&mut self, done: impl Fn(&str) -> bool) -> Result<()> {
        let mut next = self.by_replication.clone();
        next.retain(|id, _| !done(id));
        if next.len() == self.by_replication.len() {
            return Ok(());
        }
        self.save(next)
    }

    fn save(&mut self, next: BTreeMap<String, RetentionPolicy>) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&next).expect("policies serialize");
        write_atomic(&self.path, &bytes)
            .map_err(io_err(|| format!("cannot write {}", self.path.display())))?;
        self.by_replication = next;
        Ok(())
    }
}

impl Replication {
    /// The replication's own retention (0 fields: the MT's defaults).
    pub fn retention_policy(&self) -> RetentionPolicy {
        self.read_summary().state().retention
    }

    /// Sets the replication's retention, saved in `state.json` before it
    /// returns; the retention task applies it from its next pass. Refused
    /// while the replication is poisoned (its files cannot be trusted).
    pub(crate) fn set_retention(&self, policy: RetentionPolicy) -> Result<()> {
        let same = |st: &crate::state::PersistedState| st.retention == policy;
        if self.change_state(same, |inner| inner.set_retention(policy))? {
            info!(replication = %self.id(), machine = %self.machine_id(), window_secs = policy.window_secs,
                max_bytes = policy.max_bytes, "retention policy set (0 = the MT's default)");
        }
        Ok(())
    }
}

impl Store {
    /// SetRetention: the retention of replication `id`, kept with its state
    /// when this MT has it, else kept until it is created. Durable when it
    /// returns. Idempotent.
    pub fn set_retention(&self, id: &str, policy: RetentionPolicy) -> Result<()> {
        if !crate::layout::valid_name(id) {
            return Err(MtError::InvalidArgument(format!(
                "SetRetention names an unusable replication id {id:?}"
            )));
        }
        let mut pending = self.lock_pending();
        if let Some(r) = self.get(id) {
            return r.set_retention(policy);
        }
        pending.put(id, policy)?;
        info!(replication = %id, window_secs = policy.window_secs, max_bytes = policy.max_bytes,
            "retention policy kept for a replication this MT does not have yet; applied when it is created");
        Ok(())
    }

    /// Forgets the pending policy of `id` (the replication ended before it
    /// was created here). A failure is logged: the entry is harmless and
    /// dropped again at the next start.
    pub(crate) fn forget_pending_retention(&self, id: &str) {
        if let Err(e) = self.lock_pending().forget(|p| p == id) {
            warn!(replication = %id, error = %e, "cannot forget the pending retention policy");
        }
    }
}
