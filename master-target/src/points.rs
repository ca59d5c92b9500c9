//! The retained recovery points of a replication: the in-memory copy of
//! its catalog (`points.log`, see `catalog`), oldest first, changed only
//! together with the file so the two never disagree. A point appended here
//! is stamped with the MT's clock: retention ages points by that stamp.

use crate::catalog::{self, Cataloged, PointEntry};
use crate::error::Result;
use crate::storage::Storage;
use rebound_common::time::now_ms;
use std::path::{Path, PathBuf};

/// Retained recovery points, oldest first (ascending seq and interval).
#[derive(Debug)]
pub(crate) struct RecoveryPoints {
    entries: Vec<PointEntry>,
    /// The MT's clock when each entry was cut (`None`: a catalog line
    /// that predates the stamp), index for index with `entries`.
    cut_ms: Vec<Option<u64>>,
    catalog: PathBuf,
}

impl RecoveryPoints {
    /// Loads the catalog at `path`, cutting a torn tail.
    pub fn load(path: &Path) -> Result<RecoveryPoints> {
        let (entries, cut_ms) = catalog::load_lines(path, true)?
            .into_iter()
            .map(|c| (c.point, c.cut_ms))
            .unzip();
        Ok(RecoveryPoints {
            entries,
            cut_ms,
            catalog: path.to_path_buf(),
        })
    }

    /// The time retention ages point `i` from: the MT's clock when it was
    /// cut, or the agent's time for a point cataloged before that stamp.
    pub fn retention_ms(&self, i: usize) -> u64 {
        self.cut_ms[i].unwrap_or(self.entries[i].time_ms)
    }

    /// The catalog lines of the points from index `from` on.
    fn lines(&self, from: usize) -> Vec<Cataloged> {
        self.entries[from..]
            .iter()
            .zip(&self.cut_ms[from..])
            .map(|(p, &cut_ms)| Cataloged {
                point: p.clone(),
                cut_ms,
            })
            .collect()
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

    /// Appends a new point, stamped with the MT's clock now, to the
    /// catalog (fdatasynced through `storage`), then to memory.
    pub fn append(&mut self, entry: PointEntry, storage: &dyn Storage) -> Result<()> {
        let line = Cataloged {
            point: entry,
            cut_ms: Some(now_ms()),
        };
        catalog::append(storage, &self.catalog, &line)?;
        self.entries.push(line.point);
        self.cut_ms.push(line.cut_ms);
        Ok(())
    }

    /// Drops the `n` oldest points: the catalog is rewritten atomically
    /// first. Returns the new oldest point.
    pub fn drop_oldest(&mut self, n: usize) -> Result<Option<&PointEntry>> {
        let n = n.min(self.entries.len());
        catalog::rewrite(&self.catalog, &self.lines(n))?;
        self.entries.drain(..n);
        self.cut_ms.drain(..n);
        Ok(self.entries.first())
    }

    /// Forgets every point in memory (the replication ended; the caller
    /// removes the catalog file).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.cut_ms.clear();
    }
}
