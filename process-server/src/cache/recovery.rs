//! Recovery of a replication's segments on restart (DESIGN.md §6: "a torn
//! tail is cut off on restart"). Scans the segment files in seq order, cuts
//! the newest one where its valid entries end, and sets aside every segment
//! after a break in the run, so the durable seq is exactly what was synced
//! and the agent resends the rest.

use super::error::{io_err, CacheError};
use super::replication::SegMeta;
use crate::segment;
use rebound_common::durable::fsync_dir;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::path::Path;
use tracing::{error, info, warn};

/// The newest segment, which the writer appends to.
#[derive(Debug)]
pub(super) struct ActiveSegment {
    /// Its first seq (file name).
    pub(super) name: u64,
    pub(super) file: File,
    /// Its valid (synced) length.
    pub(super) len: u64,
    /// The last seq it holds: the durable seq.
    pub(super) last_seq: u64,
}

/// What a replication's segment directory holds after recovery.
#[derive(Debug)]
pub(super) struct Recovered {
    pub(super) map: BTreeMap<u64, SegMeta>,
    /// Sum of the segments' lengths.
    pub(super) bytes: u64,
    pub(super) durable: u64,
    pub(super) active: ActiveSegment,
}

/// Recovers the segments in `seg_dir` (created when missing), blocking.
pub(super) fn recover(seg_dir: &Path, id: &str) -> Result<Recovered, CacheError> {
    fs::create_dir_all(seg_dir).map_err(io_err(seg_dir))?;
    let names = segment_names(seg_dir)?;
    let mut map = BTreeMap::new();
    let mut held: Option<u64> = None;
    let mut set_aside_from = None;
    for (i, &name) in names.iter().enumerate() {
        let path = seg_dir.join(segment::file_name(name));
        let prev = match held {
            None => name.saturating_sub(1),
            Some(h) if name == h + 1 => h,
            Some(h) => {
                error!(
                    replication = %id,
                    segment = %path.display(),
                    "segment does not continue the previous one (it starts at seq {name}, the cache holds up to seq {h}); it and every later segment are set aside as *.corrupt and the agent resumes from seq {next}",
                    next = h + 1
                );
                set_aside_from = Some(i);
                break;
            }
        };
        let scan = segment::scan(&path, prev).map_err(io_err(&path))?;
        if let Some(why) = &scan.cut {
            if i + 1 == names.len() {
                warn!(
                    replication = %id,
                    segment = %path.display(),
                    offset = scan.valid_len,
                    dropped_bytes = scan.file_len - scan.valid_len,
                    durable_seq = scan.last_seq,
                    "cutting the torn tail of the newest segment: {why}"
                );
            } else {
                error!(
                    replication = %id,
                    segment = %path.display(),
                    offset = scan.valid_len,
                    durable_seq = scan.last_seq,
                    "segment is corrupt before its end ({why}); cutting it there and setting every later segment aside as *.corrupt; the agent resumes from seq {next}",
                    next = scan.last_seq + 1
                );
                set_aside_from = Some(i + 1);
            }
            cut(&path, scan.valid_len)?;
        }
        map.insert(
            name,
            SegMeta {
                len: scan.valid_len,
                last_seq: scan.last_seq,
            },
        );
        held = Some(scan.last_seq);
        if set_aside_from.is_some() {
            break;
        }
    }
    if let Some(from) = set_aside_from {
        set_aside(seg_dir, &names[from..])?;
    }
    let (name, meta) = match map.last_key_value() {
        Some((&n, &m)) => (n, m),
        None => {
            // A new replication: its first, empty segment.
            let path = seg_dir.join(segment::file_name(1));
            File::create(&path).map_err(io_err(&path))?;
            fsync_dir(seg_dir).map_err(io_err(seg_dir))?;
            let empty = SegMeta {
                len: 0,
                last_seq: 0,
            };
            map.insert(1, empty);
            (1, empty)
        }
    };
    let active_path = seg_dir.join(segment::file_name(name));
    let file = OpenOptions::new()
        .write(true)
        .open(&active_path)
        .map_err(io_err(&active_path))?;
    let bytes: u64 = map.values().map(|m| m.len).sum();
    let durable = meta.last_seq;
    if bytes > 0 || durable > 0 {
        info!(
            replication = %id,
            durable_seq = durable,
            segments = map.len(),
            cache_bytes = bytes,
            "recovered replication cache"
        );
    }
    Ok(Recovered {
        map,
        bytes,
        durable,
        active: ActiveSegment {
            name,
            file,
            len: meta.len,
            last_seq: durable,
        },
    })
}

/// The first seqs of the segment files in `seg_dir`, in order.
fn segment_names(seg_dir: &Path) -> Result<Vec<u64>, CacheError> {
    let mut names = Vec::new();
    for ent in fs::read_dir(seg_dir).map_err(io_err(seg_dir))? {
        let ent = ent.map_err(io_err(seg_dir))?;
        if let Some(n) = ent.file_name().to_str().and_then(segment::parse_file_name) {
            names.push(n);
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// Cuts a segment file at `valid_len` and syncs it.
fn cut(path: &Path, valid_len: u64) -> Result<(), CacheError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(valid_len).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Renames segments to `*.corrupt`, kept for inspection but never read.
fn set_aside(seg_dir: &Path, names: &[u64]) -> Result<(), CacheError> {
    for &name in names {
        let path = seg_dir.join(segment::file_name(name));
        let aside = seg_dir.join(format!("{}.corrupt", segment::file_name(name)));
        fs::rename(&path, &aside).map_err(io_err(&path))?;
    }
    fsync_dir(seg_dir).map_err(io_err(seg_dir))
}
