//! The retained recovery points of a replication: the in-memory copy of
//! its catalog (`points.log`, see `catalog`), oldest first, changed only
//! together with the file so the two never disagree.

use crate::catalog::{self, PointEntry};
use crate::error::Result;
use crate::storage::Storage;
use std::path::{Path, PathBuf};

/// Retained recovery points, oldest first (ascending seq and interval).
#[derive(Debug)]
pub(crate) struct RecoveryPoints {
    entries: Vec<PointEntry>,
    catalog: PathBuf,
}

impl RecoveryPoints {
    /// Loads the catalog at `path`, cutting a torn tail.
    pub fn load(path: &Path) -> Result<RecoveryPoints> {
        Ok(RecoveryPoints {
            entries: catalog::load(path, true)?,
            catalog: path.to_path_buf(),
        })
    }

    pub fn as_slice(&self) -> &[PointEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn first(&self) -> Option<&PointEntry> {
        self.entries.first()
    }

    pub fn last(&self) -> Option<&PointEntry> {
        self.entries.last()
    }

    /// The newest point named `id` (ids may repeat).
    pub fn by_id(&self, id: &str) -> Option<&PointEntry> {
        self.entries.iter().rev().find(|p| p.id == id)
    }

    /// The point that closes interval `interval`.
    pub fn by_interval(&self, interval: u64) -> Option<&PointEntry> {
        self.entries
            .binary_search_by_key(&interval, |p| p.interval)
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Whether the tag at `seq` has been cut already.
    pub fn has_seq(&self, seq: u64) -> bool {
        self.entries.iter().rev().any(|p| p.seq == seq)
    }

    /// Appends a new point to the catalog (fdatasynced through `storage`),
    /// then to memory.
    pub fn append(&mut self, entry: PointEntry, storage: &dyn Storage) -> Result<()> {
        catalog::append(storage, &self.catalog, &entry)?;
        self.entries.push(entry);
        Ok(())
    }

    /// Drops the `n` oldest points: the catalog is rewritten atomically
    /// first. Returns the new oldest point.
    pub fn drop_oldest(&mut self, n: usize) -> Result<Option<&PointEntry>> {
        let keep = self.entries[n.min(self.entries.len())..].to_vec();
        catalog::rewrite(&self.catalog, &keep)?;
        self.entries = keep;
        Ok(self.entries.first())
    }

    /// Forgets every point in memory (the replication ended; the caller
    /// removes the catalog file).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}
