//! Small per-machine records kept as settings (JSON under a key naming the
//! machine), for facts that are not part of a replication: the source
//! copy a commit kept (what a reprotect seeds from), a source-copy removal
//! waiting for its agent, the disks a machine had where it failed over
//! from, and the last verify's result.
//!
//! An empty value is a cleared record (the settings table has no delete).

use super::{Store, StoreError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The machine's disk files at a site (by disk index).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteDisks {
    pub site: String,
    pub paths: Vec<String>,
}

/// A `commit --remove-source-copy` whose source agent was offline: sent to
/// the agent when it next connects from `site`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRemoval {
    pub replication_id: String,
    pub site: String,
    pub job_id: String,
}

/// One chunk a verify found different.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkAt {
    pub disk: u32,
    pub offset: u64,
}

/// The most chunks a verify result keeps by name (the count is exact).
pub const MAX_CHUNKS_KEPT: usize = 1000;

/// The result of the machine's last verify.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VerifyRecord {
    pub time_ms: u64,
    pub job_id: String,
    pub point_id: String,
    pub point_seq: u64,
    pub chunk_size: u32,
    pub chunks_compared: u64,
    pub differing: u64,
    /// The first [`MAX_CHUNKS_KEPT`] differing chunks.
    pub differing_chunks: Vec<ChunkAt>,
    pub repaired: bool,
    /// Why it did not run to the end; empty when it did.
    pub error: String,
}

/// Which record of a machine.
#[derive(Debug, Clone, Copy)]
pub enum Record {
    /// [`SiteDisks`]: the disks at the site a failover left.
    FailedOverFrom,
    /// [`SiteDisks`]: the source copy a commit kept.
    KeptCopy,
    /// [`PendingRemoval`].
    PendingRemoval,
    /// [`VerifyRecord`].
    LastVerify,
}

impl Record {
    fn key(self, machine: &str) -> String {
        let what = match self {
            Record::FailedOverFrom => "failed-over-from",
            Record::KeptCopy => "kept-source-copy",
            Record::PendingRemoval => "pending-source-removal",
            Record::LastVerify => "last-verify",
        };
        format!("machine.{machine}.{what}")
    }
}

/// The record, `None` when never written or cleared.
pub async fn get<T: DeserializeOwned>(
    store: &dyn Store,
    r: Record,
    machine: &str,
) -> Result<Option<T>, StoreError> {
    let key = r.key(machine);
    match store.get_setting(&key).await? {
        Some(v) if !v.is_empty() => {
            serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    what: format!("reading setting {key}"),
                    message: e.to_string(),
                })
        }
        _ => Ok(None),
    }
}

/// Writes the record.
pub async fn put<T: Serialize>(
    store: &dyn Store,
    r: Record,
    machine: &str,
    value: &T,
) -> Result<(), StoreError> {
    let key = r.key(machine);
    let v = serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        what: format!("writing setting {key}"),
        message: e.to_string(),
    })?;
    store.put_setting(&key, &v).await
}

/// Clears the record.
pub async fn clear(store: &dyn Store, r: Record, machine: &str) -> Result<(), StoreError> {
    store.put_setting(&r.key(machine), &[]).await
}
