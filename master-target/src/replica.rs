//! One replica disk of a replication: the sparse file, sized to the
//! protected disk, that apply writes and views, chunk hashes and rollback
//! read.

use crate::error::{io_err, Result};
use crate::state::StoredDisk;
use crate::storage::open_or_create;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use tracing::warn;

/// One replica disk, open for reading and writing.
#[derive(Debug)]
pub(crate) struct Disk {
    index: u32,
    name: String,
    size: u64,
    file: File,
    path: PathBuf,
}

impl Disk {
    /// Creates the sparse replica file of `d` at `path` (kept when it
    /// exists), sized and synced.
    pub fn create(path: &Path, d: &StoredDisk) -> Result<()> {
        let f = open_or_create(path).map_err(io_err(|| {
            format!("cannot create replica {}", path.display())
        }))?;
        f.set_len(d.size)
            .and_then(|_| f.sync_all())
            .map_err(io_err(|| {
                format!("cannot size replica {} to {} bytes", path.display(), d.size)
            }))
    }

    /// Opens the replica of `d` of replication `replication` at `path`,
    /// resizing a file of the wrong length to the disk size.
    pub fn open(path: PathBuf, d: &StoredDisk, replication: &str) -> Result<Disk> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(|| {
                format!(
                    "cannot open replica {} of disk {} of replication {replication}",
                    path.display(),
                    d.index,
                )
            }))?;
        let len = file
            .metadata()
            .map_err(io_err(|| format!("cannot stat {}", path.display())))?
            .len();
        if len != d.size {
            warn!(
                replication = %replication,
                replica = %path.display(),
                len,
                size = d.size,
                "replica file has the wrong length; resizing it to the disk size"
            );
            file.set_len(d.size)
                .and_then(|_| file.sync_all())
                .map_err(io_err(|| format!("cannot resize {}", path.display())))?;
        }
        Ok(Disk {
            index: d.index,
            name: d.name.clone(),
            size: d.size,
            file,
            path,
        })
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The disk size in bytes (the replica file's length).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
