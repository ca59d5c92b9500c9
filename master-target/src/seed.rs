//! Seeding a reprotect target's replica from the disks the machine left at
//! this site (kept at commit), so the first reverse resync is differential
//! (DESIGN.md §8 reprotect): the files are copied in locally, all-zero runs
//! left as holes, and the resync's hash comparison then sends only the
//! chunks that changed since. A copy that is partial or stale is safe: the
//! comparison finds every chunk that differs.

use crate::control::MtControl;
use crate::error::{io_err, Result};
use crate::replication::Replication;
use crate::storage::Target;
use rebound_common::chunk::read_full_at;
use rebound_common::durable::write_atomic;
use rebound_common::time::now_ms;
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Bytes copied per read; an all-zero run of this size stays a hole.
const RUN: usize = 1 << 20;
/// How often a long copy logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Marks a replication whose replica was seeded, so a re-sent
/// PrepareReplication does not copy again.
const SEEDED: &str = "seeded";

impl MtControl {
    /// Copies the kept disks in as `r`'s replica when they are usable; the
    /// warning to show the operator ("" when seeded or nothing to do).
    pub(crate) fn seed_replica(&self, r: &Replication, seed_paths: &[String]) -> Result<String> {
        let unusable = r.seed(seed_paths)?;
        Ok(not_seeded_warning(
            r.machine_id(),
            &self.identity.site,
            &unusable,
        ))
    }
}

/// The operator's warning for the disks not seeded ("" when none).
fn not_seeded_warning(machine: &str, site: &str, unusable: &[String]) -> String {
    if unusable.is_empty() {
        return String::new();
    }
    format!(
        "no usable source copy of {machine} kept at {site} ({}): the first resync copies the whole disk{}",
        unusable.join("; "),
        if unusable.len() > 1 { "s" } else { "" }
    )
}

impl Replication {
    /// Copies `seed_paths[disk index]` into each replica disk whose file is
    /// readable and has the disk's size, then fdatasyncs. Only a replica
    /// nothing was applied to yet is seeded (a re-sent PrepareReplication
    /// after the resync began leaves it alone). Returns why each disk that
    /// was not seeded was not ("disk0: …").
    pub(crate) fn seed(&self, seed_paths: &[String]) -> Result<Vec<String>> {
        if seed_paths.iter().all(|p| p.is_empty()) {
            return Ok(Vec::new());
        }
        let marker = self.root().join(SEEDED);
        // Held while copying: nothing applies or reads hashes meanwhile, and
        // the chunk-hash cache is forgotten.
        let inner = self.write_for_change()?;
        if marker.exists() || inner.applied_seq() > 0 || !inner.points().is_empty() {
            info!(replication = %self.id(), machine = %self.machine_id(),
                "replica already seeded or already receiving the resync: not seeded again");
            return Ok(Vec::new());
        }
        let mut unusable = Vec::new();
        for d in self.replica_disks() {
            let path = seed_paths
                .get(d.index() as usize)
                .map(String::as_str)
                .unwrap_or("");
            if path.is_empty() {
                unusable.push(format!("disk {}: no copy was kept", d.name()));
                continue;
            }
            let src = match open_seed(Path::new(path), d.size()) {
                Ok(f) => f,
                Err(why) => {
                    warn!(replication = %self.id(), machine = %self.machine_id(), disk = %d.name(), path,
                        why = %why, "kept source copy not usable: this disk's first resync copies it whole");
                    unusable.push(format!("disk {}: {path} {why}", d.name()));
                    continue;
                }
            };
            info!(replication = %self.id(), machine = %self.machine_id(), disk = %d.name(), from = path,
                replica = %d.path().display(), bytes = d.size(), "seeding the replica from the kept source copy");
            let copied = self.copy_seed(&src, Path::new(path), d)?;
            self.sync_file(Target::Replica, d.file(), d.path())?;
            info!(replication = %self.id(), machine = %self.machine_id(), disk = %d.name(), from = path,
                bytes = d.size(), written = copied,
                "replica seeded: the first resync sends only the chunks that differ");
        }
        write_atomic(&marker, now_ms().to_string().as_bytes())
            .map_err(io_err(|| format!("cannot write {}", marker.display())))?;
        Ok(unusable)
    }

    /// Copies `src` over replica disk `d` in runs of [`RUN`]: an all-zero
    /// run is skipped where the replica reads zero too (a hole stays one);
    /// bytes written.
    fn copy_seed(&self, src: &File, src_path: &Path, d: &crate::replica::Disk) -> Result<u64> {
        let mut buf = vec![0u8; RUN];
        let mut cur = vec![0u8; RUN];
        let (mut off, mut written) = (0u64, 0u64);
        let mut last = Instant::now();
        while off < d.size() {
            let len = (d.size() - off).min(RUN as u64) as usize;
            read_full_at(src, &mut buf[..len], off).map_err(io_err(|| {
                format!(
                    "cannot read the kept copy {} at offset {off}",
                    src_path.display()
                )
            }))?;
            let zero = buf[..len].iter().all(|&b| b == 0);
            let skip = zero && {
                read_full_at(d.file(), &mut cur[..len], off).map_err(io_err(|| {
                    format!("cannot read replica {} at offset {off}", d.path().display())
                }))?;
                cur[..len].iter().all(|&b| b == 0)
            };
            if !skip {
                (self.storage())
                    .write_all_at(Target::Replica, d.file(), &buf[..len], off)
                    .map_err(io_err(|| {
                        format!(
                            "cannot write replica {} at offset {off}",
                            d.path().display()
                        )
                    }))?;
                written += len as u64;
            }
            off += len as u64;
            if last.elapsed() >= PROGRESS_EVERY {
                last = Instant::now();
                info!(replication = %self.id(), disk = %d.name(), done = off, of = d.size(), written,
                    "seeding the replica");
            }
        }
        Ok(written)
    }
}

/// Opens a kept copy for reading when it has the disk's size; why not
/// otherwise.
fn open_seed(path: &Path, size: u64) -> std::result::Result<File, String> {
    let f = File::open(path).map_err(|e| format!("cannot be read ({e})"))?;
    let len = f
        .metadata()
        .map_err(|e| format!("cannot be read ({e})"))?
        .len();
    if len != size {
        return Err(format!("has {len} bytes but the disk has {size}"));
    }
    Ok(f)
}

#[cfg(test)]
mod tests;
