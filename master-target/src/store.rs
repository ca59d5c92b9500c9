//! Every replication at this MT: opening them all at start, creating one
//! on its first hello (with the retention policy the CS sent before it, see
//! `retention_policy`), and looking them up by id.

use crate::error::{io_err, Result};
use crate::events::Events;
use crate::metrics::MtMetrics;
use crate::replication::{Env, Replication};
use crate::retention_policy::PendingRetention;
use crate::storage::Disk;
use rebound_proto::ReplicationInfo;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use tracing::{error, info, warn};

/// Every replication at this MT.
pub struct Store {
    data_dir: PathBuf,
    repls: RwLock<BTreeMap<String, Arc<Replication>>>,
    /// Held to create a replication; holds the retention policies of
    /// replications not created yet.
    create: Mutex<PendingRetention>,
    env: Env,
}

impl Store {
    /// Opens every replication under `data_dir` (creating the directory).
    /// A replication that cannot be opened is logged and left out, so one
    /// damaged replication does not stop the others.
    pub fn open(data_dir: &Path) -> Result<Store> {
        Store::open_in(data_dir, Env::default())
    }

    /// Like [`Store::open`], its replications counting in `metrics` (the
    /// families the MT's endpoint serves).
    pub fn open_measured(data_dir: &Path, metrics: MtMetrics) -> Result<Store> {
        Store::open_in(data_dir, Env::measured(Arc::new(Disk), metrics))
    }

    /// Like [`Store::open`], with the durable writes going through
    /// `env.storage` (tests fail them there).
    pub(crate) fn open_in(data_dir: &Path, env: Env) -> Result<Store> {
        std::fs::create_dir_all(data_dir).map_err(io_err(|| {
            format!("cannot create data dir {}", data_dir.display())
        }))?;
        let mut repls = BTreeMap::new();
        let entries = std::fs::read_dir(data_dir).map_err(io_err(|| {
            format!("cannot list data dir {}", data_dir.display())
        }))?;
        for entry in entries {
            let entry = entry.map_err(io_err(|| format!("cannot list {}", data_dir.display())))?;
            let root = entry.path();
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(".deleting-")
            {
                // A deletion interrupted by a crash (EndReplication).
                if let Err(e) = std::fs::remove_dir_all(&root) {
                    warn!(dir = %root.display(), error = %e, "cannot finish deleting an ended replication");
                }
                continue;
            }
            if !root.join("info.json").exists() {
                continue;
            }
            match Replication::open_in(&root, &env) {
                Ok(r) => {
                    info!(replication = %r.id(), machine = %r.machine_id(), applied_seq = r.applied_seq(),
                        points = r.status().points, "replication opened");
                    repls.insert(r.id().to_string(), Arc::new(r));
                }
                Err(e) => error!(dir = %root.display(), error = %e,
                    "cannot open replication; it is left out until the problem is fixed and the MT restarted"),
            }
        }
        let mut pending = PendingRetention::load(data_dir)?;
        // A policy whose replication exists was written into its state when
        // it was created (a crash came before the entry was forgotten).
        pending.forget(|id| repls.contains_key(id))?;
        Ok(Store {
            data_dir: data_dir.to_path_buf(),
            repls: RwLock::new(repls),
            create: Mutex::new(pending),
            env,
        })
    }

    /// The metric families its replications count in (register them, and
    /// refresh the gauges from [`MtMetrics::refresh`]).
    pub fn metrics(&self) -> &MtMetrics {
        &self.env.metrics
    }

    /// Where replications raise events for the CS.
    pub fn events(&self) -> &Events {
        &self.env.events
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn get(&self, id: &str) -> Option<Arc<Replication>> {
        self.repls
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Every replication, ordered by id.
    pub fn list(&self) -> Vec<Arc<Replication>> {
        self.repls
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// The creation lock and the policies of replications not created yet.
    pub(crate) fn lock_pending(&self) -> MutexGuard<'_, PendingRetention> {
        self.create
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn remove_entry(&self, id: &str) {
        self.repls
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }

    /// The replication named by `info`, created (empty sparse replicas of
    /// the given sizes) if this MT does not have it yet.
    pub fn get_or_create(&self, info: &ReplicationInfo) -> Result<Arc<Replication>> {
        if let Some(r) = self.get(&info.replication_id) {
            r.check_hello(info)?;
            return Ok(r);
        }
        let mut pending = self.lock_pending();
        if let Some(r) = self.get(&info.replication_id) {
            r.check_hello(info)?;
            return Ok(r);
        }
        let retention = pending.get(&info.replication_id).unwrap_or_default();
        let r = Arc::new(Replication::create(
            &self.data_dir,
            info,
            retention,
            &self.env,
        )?);
        info!(
            replication = %r.id(),
            machine = %r.machine_id(),
            disks = %r.disks().iter().map(|d| format!("{}:{}:{}", d.0, d.1, d.2)).collect::<Vec<_>>().join(","),
            dir = %r.root().display(),
            "replication created"
        );
        self.repls
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(r.id().to_string(), r.clone());
        if let Err(e) = pending.forget(|id| id == r.id()) {
            // Its state.json holds the policy; the entry goes at the next start.
            warn!(replication = %r.id(), error = %e, "cannot forget the applied retention policy");
        }
        Ok(r)
    }
}
