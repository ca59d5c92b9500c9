//! The registry of replications: every replication's cache under one
//! directory, sharing one cap. Creates a replication on the agent's hello
//! or the CS's AddReplication, refuses a replication id that another
//! machine claims, and removes a replication's files on RemoveReplication.
//! A removed replication is remembered (in memory) so that an agent still
//! streaming it is refused with the reason instead of recreating its cache;
//! the CS's AddReplication (a new protect) lifts that.
//!
//! ```text
//! <cache_dir>/<replication_id>/info.json              the agent's hello
//! <cache_dir>/<replication_id>/segments/<seq:020>.seg see segment.rs
//! ```

use super::cap::Account;
use super::error::{io_err, CacheError};
use super::replication::Replication;
use super::SEGMENT_MAX_BYTES;
use rebound_common::durable::fsync_dir;
use rebound_proto::ReplicationInfo;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Prefix of a replication directory whose removal a crash interrupted.
const REMOVED_PREFIX: &str = ".removed-";

/// Names in the cache directory that are the PS's own, not replications:
/// the renewed identity's directory (`tls::renewed::path_in`) and the
/// revocation list.
const RESERVED: &[&str] = &["tls", "revoked"];

/// Checks that a replication id is usable as a directory name.
fn check_replication_id(id: &str) -> Result<(), CacheError> {
    let bad = |why: &'static str| {
        Err(CacheError::BadReplicationId {
            id: id.to_string(),
            why,
        })
    };
    if id.is_empty() {
        return bad("it is empty");
    }
    if id.len() > 200 {
        return bad("it is longer than 200 bytes");
    }
    if id.starts_with('.') {
        return bad("it starts with '.'");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:@+".contains(&b))
    {
        return bad("only letters, digits and - _ . : @ + are allowed");
    }
    if RESERVED.contains(&id) {
        return bad("it names the process server's own files in its cache directory");
    }
    Ok(())
}

/// All replications' caches under one directory, sharing one cap.
#[derive(Debug)]
pub struct Cache {
    root: PathBuf,
    account: Arc<Account>,
    seg_max: u64,
    reps: Mutex<BTreeMap<String, Arc<Replication>>>,
    /// Replications removed since the PS started (taken after `reps`).
    removed: Mutex<BTreeSet<String>>,
}

impl Cache {
    /// Opens the cache directory and recovers every replication in it
    /// (blocking).
    pub fn open(root: &Path, cap: u64) -> Result<Cache, CacheError> {
        Cache::open_with_segment_max(root, cap, (cap / 8).clamp(1 << 20, SEGMENT_MAX_BYTES))
    }

    /// As [`Cache::open`] with a chosen segment size (tests).
    pub fn open_with_segment_max(root: &Path, cap: u64, seg_max: u64) -> Result<Cache, CacheError> {
        fs::create_dir_all(root).map_err(io_err(root))?;
        let account = Arc::new(Account::new(cap));
        let mut reps = BTreeMap::new();
        for id in replication_dirs(root)? {
            let rep = Replication::open(root.join(&id), id.clone(), account.clone(), seg_max)?;
            reps.insert(id, Arc::new(rep));
        }
        Ok(Cache {
            root: root.to_path_buf(),
            account,
            seg_max,
            reps: Mutex::new(reps),
            removed: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn account(&self) -> &Arc<Account> {
        &self.account
    }
    fn reps(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Replication>>> {
        self.reps.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn removed(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.removed.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn replications(&self) -> Vec<Arc<Replication>> {
        self.reps().values().cloned().collect()
    }
    pub fn get(&self, id: &str) -> Option<Arc<Replication>> {
        self.reps().get(id).cloned()
    }

    /// The replication an agent's hello names, created on first use, with
    /// its stored info refreshed (blocking). Refused when the replication
    /// belongs to another machine or was removed. Returns whether it was
    /// created.
    pub fn hello(&self, info: &ReplicationInfo) -> Result<(Arc<Replication>, bool), CacheError> {
        let id = &info.replication_id;
        let (rep, created) = self.get_or_create(id, false)?;
        if let Some(stored) = rep.info() {
            if stored.machine_id != info.machine_id {
                return Err(CacheError::WrongMachine {
                    replication: id.clone(),
                    stored: stored.machine_id,
                    claimed: info.machine_id.clone(),
                });
            }
        }
        rep.store_info(info)?;
        Ok((rep, created))
    }

    /// The replication `id`, created empty (no info until the agent's
    /// hello) on first use (blocking). For the CS's AddReplication, which
    /// also takes it back after a removal.
    pub fn ensure(&self, id: &str) -> Result<Arc<Replication>, CacheError> {
        self.get_or_create(id, true).map(|(rep, _)| rep)
    }

    /// The replication `id` and whether it was created now; a removed one
    /// is refused unless `readd`, which forgets the removal.
    fn get_or_create(&self, id: &str, readd: bool) -> Result<(Arc<Replication>, bool), CacheError> {
        check_replication_id(id)?;
        let mut reps = self.reps();
        if let Some(r) = reps.get(id) {
            return Ok((r.clone(), false));
        }
        let mut removed = self.removed();
        if readd {
            removed.remove(id);
        } else if removed.contains(id) {
            return Err(CacheError::Removed {
                replication: id.to_string(),
            });
        }
        drop(removed);
        let rep = Arc::new(Replication::open(
            self.root.join(id),
            id.to_string(),
            self.account.clone(),
            self.seg_max,
        )?);
        fsync_dir(&self.root).map_err(io_err(&self.root))?;
        reps.insert(id.to_string(), rep.clone());
        Ok((rep, true))
    }

    /// Forgets replication `id`: stops its writer, deletes its cached
    /// frames and files (blocking). Returns whether it existed. Agents still
    /// streaming it are refused ([`CacheError::Removed`]) until the CS adds
    /// it again.
    pub fn remove(&self, id: &str) -> Result<bool, CacheError> {
        let rep = {
            let mut reps = self.reps();
            self.removed().insert(id.to_string());
            reps.remove(id)
        };
        let Some(rep) = rep else {
            return Ok(false);
        };
        rep.mark_removed();
        rep.stop_blocking();
        let dir = rep.dir().to_path_buf();
        // Renamed first, so a crash mid-delete leaves no half replication
        // (`open` skips names that are not replication ids).
        let gone = self.root.join(format!("{REMOVED_PREFIX}{id}"));
        fs::rename(&dir, &gone).map_err(io_err(&dir))?;
        fsync_dir(&self.root).map_err(io_err(&self.root))?;
        fs::remove_dir_all(&gone).map_err(io_err(&gone))?;
        self.account.forget(id);
        Ok(true)
    }

    /// Stops every writer after what is queued (blocking).
    pub fn shutdown(&self) {
        for rep in self.replications() {
            rep.stop_blocking();
        }
    }
}

/// The replication ids under `root`, sorted; finishes removals a crash
/// interrupted and skips names that are not replication ids.
fn replication_dirs(root: &Path) -> Result<Vec<String>, CacheError> {
    let mut ids = Vec::new();
    for ent in fs::read_dir(root).map_err(io_err(root))? {
        let ent = ent.map_err(io_err(root))?;
        if !ent.file_type().map_err(io_err(root))?.is_dir() {
            continue;
        }
        let Some(id) = ent.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if id.starts_with(REMOVED_PREFIX) {
            let _ = fs::remove_dir_all(ent.path());
            continue;
        }
        if check_replication_id(&id).is_ok() {
            ids.push(id);
        }
    }
    ids.sort();
    Ok(ids)
}
