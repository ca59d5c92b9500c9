//! Seeding a reprotect target's replica from the disks the machine left at
//! this site (kept at commit), so the first reverse resync is differential
//! (DESIGN.md §8 reprotect): the files are copied in locally, all-zero runs
//! left as holes, and the resync's hash comparison then sends only the
//! chunks that changed since. A copy that is partial or stale is safe: the
//! comparison finds every chunk that differs. The paths come from the
//! machine's agent, so only those whose real location lies under the MT's
//! `[reprotect] seed_dirs` are read: an agent cannot make the MT copy any
//! other file of its host into a replica it can read back.

use crate::control::MtControl;
use crate::error::{io_err, Result};
use crate::replication::Replication;
use crate::storage::Target;
use rebound_common::chunk::read_full_at;
use rebound_common::durable::write_atomic;
use rebound_common::time::now_ms;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
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
        let unusable = r.seed(seed_paths, &self.reprotect.seed_dirs)?;
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
    /// under one of `seed_dirs`, readable and of the disk's size, then
    /// fdatasyncs. Only a replica
    /// nothing was applied to yet is seeded (a re-sent PrepareReplication
    /// after the resync began leaves it alone). Returns why each disk that
    /// was not seeded was not ("disk0: …").
    pub(crate) fn seed(&self, seed_paths: &[String], seed_dirs: &[PathBuf]) -> Result<Vec<String>> {
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
            let src = match open_seed(Path::new(path), d.size(), seed_dirs) {
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

/// Opens a kept copy for reading when its real location (symlinks and
/// `..` resolved) is under one of `seed_dirs`, it is a file or a block
/// device, and it has the disk's size; why not otherwise.
fn open_seed(path: &Path, size: u64, seed_dirs: &[PathBuf]) -> std::result::Result<File, String> {
    let unreadable = |e: std::io::Error| format!("cannot be read ({e})");
    let real = path.canonicalize().map_err(unreadable)?;
    let allowed = (seed_dirs.iter())
        .filter_map(|d| d.canonicalize().ok())
        .any(|d| real.starts_with(d));
    if !allowed {
        let dirs: Vec<String> = seed_dirs.iter().map(|d| d.display().to_string()).collect();
        let shown = if real == path {
            String::new()
        } else {
            format!(" (really {})", real.display())
        };
        return Err(format!(
            "is not read{shown}: it is outside the directories this MT seeds from ([{}]); \
             add its directory to [reprotect] seed_dirs in the MT's config to seed from it",
            dirs.join(", ")
        ));
    }
    let kind = std::fs::metadata(&real).map_err(unreadable)?.file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        return Err("is neither a file nor a block device".into());
    }
    // The path was just resolved: a symlink put in its place since is not
    // followed, and a FIFO swapped in does not block the open.
    let f = (OpenOptions::new().read(true))
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&real)
        .map_err(unreadable)?;
    let len = seek_size(&f).map_err(unreadable)?;
    if len != size {
        return Err(format!("has {len} bytes but the disk has {size}"));
    }
    Ok(f)
}

/// The size of a kept copy from its end offset: a block device's metadata
/// says 0 bytes, seeking to its end gives its size (as for a file).
fn seek_size(mut f: &File) -> std::io::Result<u64> {
    f.seek(SeekFrom::End(0))
}

#[cfg(test)]
mod tests;
