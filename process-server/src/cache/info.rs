//! `info.json`: the agent's hello, kept in the replication's cache
//! directory so forwarding can start after a restart before the agent
//! reconnects (the master target's apply stream opens with it).

use super::error::{io_err, CacheError};
use rebound_common::durable::write_atomic;
use rebound_proto::{DiskInfo, ReplicationInfo};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::Path;
use tracing::warn;

const FILE_NAME: &str = "info.json";

#[derive(Debug, Serialize, Deserialize)]
struct StoredInfo {
    replication_id: String,
    machine_id: String,
    disks: Vec<StoredDisk>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredDisk {
    index: u32,
    name: String,
    size: u64,
}

impl From<&ReplicationInfo> for StoredInfo {
    fn from(i: &ReplicationInfo) -> Self {
        StoredInfo {
            replication_id: i.replication_id.clone(),
            machine_id: i.machine_id.clone(),
            disks: i
                .disks
                .iter()
                .map(|d| StoredDisk {
                    index: d.index,
                    name: d.name.clone(),
                    size: d.size,
                })
                .collect(),
        }
    }
}

impl From<StoredInfo> for ReplicationInfo {
    fn from(s: StoredInfo) -> Self {
        ReplicationInfo {
            replication_id: s.replication_id,
            machine_id: s.machine_id,
            disks: s
                .disks
                .into_iter()
                .map(|d| DiskInfo {
                    index: d.index,
                    name: d.name,
                    size: d.size,
                })
                .collect(),
        }
    }
}

/// Writes the hello to `<dir>/info.json`, atomically (blocking).
pub(super) fn store(dir: &Path, hello: &ReplicationInfo) -> Result<(), CacheError> {
    let path = dir.join(FILE_NAME);
    let text = serde_json::to_vec_pretty(&StoredInfo::from(hello)).map_err(|source| {
        CacheError::InfoEncoding {
            path: path.clone(),
            source,
        }
    })?;
    write_atomic(&path, &text).map_err(io_err(&path))
}

/// The stored hello of replication `id`, if there is a valid one. A missing
/// or unreadable file only delays forwarding until the agent's hello, so it
/// is logged, not an error.
pub(super) fn load(dir: &Path, id: &str) -> Option<ReplicationInfo> {
    let path = dir.join(FILE_NAME);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(replication = %id, "cannot read {}: {e}; forwarding waits for the agent's hello", path.display());
            return None;
        }
    };
    match serde_json::from_slice::<StoredInfo>(&bytes) {
        Ok(s) if s.replication_id == id => Some(s.into()),
        Ok(s) => {
            warn!(replication = %id, "{} names replication {:?}; ignored until the agent's hello", path.display(), s.replication_id);
            None
        }
        Err(e) => {
            warn!(replication = %id, "{} is invalid ({e}); ignored until the agent's hello", path.display());
            None
        }
    }
}
