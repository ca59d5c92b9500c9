//! Where a replication's files live (DESIGN.md §7), in one place:
//!
//! ```text
//! <data_dir>/.pending-retention.json  retention policies of replications not created yet
//! <data_dir>/<replication id>/
//!   info.json                    the replication: machine, disks (index, name, size)
//!   state.json                   applied seq, current interval, rollback state, retention policy
//!   applied.seq                  applied seq and current interval, two fixed slots (hot path)
//!   points.log                   recovery-point catalog, one checksummed line per point
//!   replica/<disk name>.img      the replica disks, sparse, at the disk size
//!   retention/interval-<n>.undo  undo records of interval n (old content of blocks)
//!   rollback/preimages           content before a rollback, for RestorePreImages
//! ```

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: PathBuf) -> Layout {
        Layout { root }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn info(&self) -> PathBuf {
        self.root.join("info.json")
    }
    pub fn state(&self) -> PathBuf {
        self.root.join("state.json")
    }
    pub fn applied_seq(&self) -> PathBuf {
        self.root.join("applied.seq")
    }
    pub fn catalog(&self) -> PathBuf {
        self.root.join("points.log")
    }
    pub fn replica_dir(&self) -> PathBuf {
        self.root.join("replica")
    }
    pub fn replica(&self, disk_name: &str) -> PathBuf {
        self.replica_dir().join(format!("{disk_name}.img"))
    }
    pub fn retention_dir(&self) -> PathBuf {
        self.root.join("retention")
    }
    pub fn journal(&self, interval: u64) -> PathBuf {
        self.retention_dir()
            .join(format!("interval-{interval}.undo"))
    }
    pub fn rollback_dir(&self) -> PathBuf {
        self.root.join("rollback")
    }
    pub fn preimages(&self) -> PathBuf {
        self.rollback_dir().join("preimages")
    }
}

/// The interval number of a journal file name (`interval-<n>.undo`).
pub fn parse_journal_name(name: &str) -> Option<u64> {
    name.strip_prefix("interval-")?
        .strip_suffix(".undo")?
        .parse()
        .ok()
}

/// Names used as directory or file names (replication ids, disk names) and
/// in NBD export names (machine ids): no separators, no leading dot.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '+'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_journal_name("interval-17.undo"), Some(17));
        assert_eq!(parse_journal_name("interval-x.undo"), None);
        assert!(valid_name("m1-ab_2"));
        assert!(!valid_name("../x"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name(""));
        assert!(!valid_name("a@b"));
    }
}
