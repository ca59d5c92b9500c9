//! The retention journal of one replication (DESIGN.md §7): one file of
//! undo records per interval, which blocks each interval saved, and the one
//! rule every reader of the past goes through.
//!
//! Apply saves the old content of a block the first time the current
//! interval writes it ([`RetentionJournal::save_undo`]), makes it durable
//! ([`RetentionJournal::sync`]) before the replica is written, and a tag
//! closes the interval ([`RetentionJournal::close_interval`]). The content
//! of a block at the point closing interval k is the earliest undo record
//! after k; that rule lives here only, in [`build_map`], and views and
//! rollback reach it through [`RetentionJournal::locate`] and
//! [`RetentionJournal::point_map`]. Retention drops the oldest intervals
//! with [`RetentionJournal::drop_through`].
//!
//! Resolving the rule block by block across thousands of intervals would be
//! slow, so each point gets a *point map*: for every block saved after it,
//! where its earliest undo record is. Maps are built on first use, cached (a
//! few per replication), and kept current by [`RetentionJournal::sync`],
//! which adds each newly saved block to every cached map that lacks it.
//!
//! A journal whose records fail their checks is *damaged*. The torn tail of
//! the current interval (a crash mid-append, before the replica was
//! written) is cut: a last record shorter than its header says, or a tail
//! of zeroes (the file grew but its data never reached the disk). Anything
//! else — a bad record in a closed interval's journal, in the middle of the
//! current one, or a full-length record whose checksum fails at the end of
//! the current one (bit rot of a record the replica already relies on) —
//! is not: the file stays as it is, the bytes from the first damaged record
//! on are copied aside to `interval-<n>.undo.damaged-<offset>` (for
//! analysis; a failed copy, e.g. on a full disk, is logged and reported but
//! does not stop the replication), every valid record (also after the
//! damage) stays indexed, and an error is logged. The aside file is deleted
//! with its interval's journal when retention drops the interval. A damaged record's block
//! cannot be known (its header may be the damaged part), so every point
//! that needs interval n — those closing an interval before n — can no
//! longer be rebuilt exactly: reading it ([`RetentionJournal::locate`],
//! [`RetentionJournal::point_map`]) is refused with
//! [`JournalError::Damaged`]. Points cut after n do not need it and stay
//! exact. The damage is found again by the scan at every open.

use crate::interval::IntervalIndex;
use crate::journal::{self, RecordError};
use crate::layout::{parse_journal_name, Layout};
use crate::storage::{open_or_create, Storage, Target};
use rebound_common::durable::fsync_dir;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use thiserror::Error;
use tracing::{error, warn};

/// Open journal files kept for reads (views, rollback).
const MAX_JOURNAL_FDS: usize = 256;
/// Point maps cached per replication.
const MAX_MAPS: usize = 8;

/// What went wrong with a retention journal; every variant names the file.
#[derive(Debug, Error)]
pub enum JournalError {
    #[error("cannot list the retention directory {path}: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open retention journal {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read retention journal {path}: {source}")]
    Scan {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot cut the damaged tail of retention journal {path}: {source}")]
    Truncate {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove retention journal {path} of a dropped interval: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot fsync the retention directory {path}: {source}")]
    SyncDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot append to retention journal {path} (is the disk full?): {source}")]
    Append {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("fdatasync of retention journal {path} failed: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("retention journal {path}: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: RecordError,
    },
    #[error(
        "cannot set the damaged records of retention journal {path} aside in {aside}: {source}"
    )]
    SetAside {
        path: PathBuf,
        aside: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the recovery point closing interval {point_interval} cannot be rebuilt exactly: \
         retention journal {path} (interval {interval}) is damaged from offset {offset} \
         (the damaged bytes are kept in {aside}); choose a point cut after interval {interval}"
    )]
    Damaged {
        point_interval: u64,
        interval: u64,
        offset: u64,
        path: PathBuf,
        aside: PathBuf,
    },
}

/// Where an interval's journal is damaged (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Damage {
    /// Offset of the first damaged record.
    pub offset: u64,
    /// Bytes in damaged ranges.
    pub bytes: u64,
    /// Valid records found after the first damaged one.
    pub kept_after: usize,
    /// The copy of the journal from `offset` on.
    pub aside: PathBuf,
    /// Why that copy could not be made, if it could not.
    pub aside_failed: Option<String>,
    /// Raised as an event since the journal was opened.
    pub reported: bool,
}

impl Damage {
    /// What is damaged, what it costs and what to do, for the log and the
    /// event of interval `n`'s journal at `path`.
    pub fn message(&self, replication: &str, n: u64, path: &std::path::Path) -> String {
        let aside = match &self.aside_failed {
            None => format!(
                "the bytes from offset {} on are copied to {} (kept for analysis until retention drops \
                 interval {n}, then deleted with its journal)",
                self.offset,
                self.aside.display()
            ),
            Some(e) => format!(
                "the bytes from offset {} on could not be copied to {} ({e}; the journal itself still \
                 holds them)",
                self.offset,
                self.aside.display()
            ),
        };
        format!(
            "retention journal {} of replication {replication} (interval {n}) is damaged from offset {}: \
             the recovery points cut before interval {n} cannot be rebuilt exactly and are refused \
             (views and rollback to them fail); points cut after it stay exact. The journal is left as it was \
             and {aside}: check the disk under the MT's data directory, and choose a point cut after interval {n}",
            path.display(),
            self.offset,
        )
    }
}

/// Where an undo record is: its interval and its offset in that interval's
/// journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Undo {
    pub interval: u64,
    pub offset: u64,
}

/// Block key → its earliest undo record after a point.
type PointMap = HashMap<u64, Undo>;

/// The rule of the retention journal: the content of a block at the point
/// closing interval `k` is the undo record of the earliest interval after
/// `k` that saved it (no entry: the replica's current content).
fn build_map(intervals: &BTreeMap<u64, IntervalIndex>, k: u64) -> PointMap {
    let mut map = PointMap::new();
    for (&n, idx) in intervals.range(k + 1..) {
        idx.for_each(|key, offset| {
            map.entry(key).or_insert(Undo {
                interval: n,
                offset,
            });
        });
    }
    map
}

/// Cached point maps, keyed by the interval the point closes.
#[derive(Default)]
struct MapCache {
    maps: HashMap<u64, (u64, PointMap)>,
    tick: u64,
}

impl MapCache {
    fn get_or_build(&mut self, intervals: &BTreeMap<u64, IntervalIndex>, k: u64) -> &PointMap {
        self.tick += 1;
        let tick = self.tick;
        if !self.maps.contains_key(&k) && self.maps.len() >= MAX_MAPS {
            if let Some(&old) = self
                .maps
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| k)
            {
                self.maps.remove(&old);
            }
        }
        let e = self
            .maps
            .entry(k)
            .or_insert_with(|| (tick, build_map(intervals, k)));
        e.0 = tick;
        &e.1
    }

    /// Interval `n` (newer than every cached point) saved these blocks: a
    /// map that has no earlier record of a block takes this one.
    fn note_saved(&mut self, n: u64, saved: &[(u64, u64)]) {
        for (&k, (_, map)) in self.maps.iter_mut() {
            debug_assert!(k < n);
            for &(key, offset) in saved {
                map.entry(key).or_insert(Undo {
                    interval: n,
                    offset,
                });
            }
        }
    }
}

/// Journals retention gave up: deleted by [`DroppedJournals::delete`] once
/// the replication's lock is released (unlinking a large file takes long).
#[must_use]
pub(crate) struct DroppedJournals {
    paths: Vec<PathBuf>,
    dir: PathBuf,
    _indexes: Vec<IntervalIndex>,
}

impl DroppedJournals {
    /// Deletes the files; what cannot be deleted now is deleted at the next
    /// open (it is older than every retained point).
    pub fn delete(self, replication: &str) {
        for path in &self.paths {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(replication = %replication, journal = %path.display(), error = %e,
                        "cannot delete a dropped journal; it is deleted at the next start");
                }
            }
        }
        if let Err(e) = fsync_dir(&self.dir) {
            warn!(replication = %replication, error = %e, "cannot fsync the retention directory");
        }
    }
}

/// One replication's retention journal.
pub(crate) struct RetentionJournal {
    layout: Layout,
    storage: Arc<dyn Storage>,
    /// Block index of every retained interval that has a journal, plus the
    /// current interval.
    intervals: BTreeMap<u64, IntervalIndex>,
    current: u64,
    /// Append handle of the current interval's journal, opened on first use.
    append: Option<File>,
    /// Records written since the last sync: (block key, offset). They join
    /// the index (and so become visible to views) only once synced.
    unsynced: Vec<(u64, u64)>,
    /// End of the current journal including unsynced records.
    end: u64,
    maps: Mutex<MapCache>,
    fds: Mutex<HashMap<u64, Arc<File>>>,
    /// Damaged journals by interval (see the module doc).
    damage: BTreeMap<u64, Damage>,
}

impl RetentionJournal {
    /// Opens the journal of a replication whose current interval is
    /// `current` and whose oldest retained point needs the intervals from
    /// `oldest_needed` on: scans every journal (cutting a torn or corrupt
    /// tail) and deletes journals a crash left behind after retention gave
    /// them up.
    pub fn open(
        layout: &Layout,
        replication: &str,
        current: u64,
        oldest_needed: u64,
        disk_ok: impl Fn(u32) -> bool,
        storage: Arc<dyn Storage>,
    ) -> Result<RetentionJournal, JournalError> {
        let dir = layout.retention_dir();
        let list = |source| JournalError::List {
            path: dir.clone(),
            source,
        };
        let mut intervals = BTreeMap::new();
        let mut damage = BTreeMap::new();
        let mut removed = false;
        for entry in std::fs::read_dir(&dir).map_err(list)? {
            let entry = entry.map_err(list)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            let Some(n) = parse_journal_name(name) else {
                // The aside copy of a dropped interval's damage goes with it.
                if parse_aside_name(name).is_some_and(|n| n < oldest_needed) {
                    let path = entry.path();
                    std::fs::remove_file(&path)
                        .map_err(|source| JournalError::Remove { path, source })?;
                    removed = true;
                }
                continue;
            };
            let path = layout.journal(n);
            if n < oldest_needed {
                std::fs::remove_file(&path).map_err(|source| JournalError::Remove {
                    path: path.clone(),
                    source,
                })?;
                removed = true;
                continue;
            }
            if n > current {
                warn!(replication = %replication, journal = %path.display(), current, "journal of a future interval; ignoring it");
                continue;
            }
            let (idx, damaged) = scan_one(replication, n, path, n == current, &disk_ok)?;
            intervals.insert(n, idx);
            if let Some(d) = damaged {
                damage.insert(n, d);
            }
        }
        if removed {
            fsync_dir(&dir).map_err(|source| JournalError::SyncDir { path: dir, source })?;
        }
        intervals
            .entry(current)
            .or_insert_with(IntervalIndex::new_open);
        let end = intervals[&current].len;
        Ok(RetentionJournal {
            layout: layout.clone(),
            storage,
            intervals,
            current,
            append: None,
            unsynced: Vec::new(),
            end,
            maps: Mutex::new(MapCache::default()),
            fds: Mutex::new(HashMap::new()),
            damage,
        })
    }

    /// The damaged journals not raised as an event yet (interval, damage,
    /// journal path), marked raised.
    pub fn unreported_damage(&mut self) -> Vec<(u64, Damage, PathBuf)> {
        let mut out = Vec::new();
        for (&n, d) in self.damage.iter_mut().filter(|(_, d)| !d.reported) {
            d.reported = true;
            out.push((n, d.clone(), self.layout.journal(n)));
        }
        out
    }

    /// Refuses the point closing interval `k` when a journal it needs (one
    /// of an interval after `k`) is damaged.
    pub fn check_point(&self, k: u64) -> Result<(), JournalError> {
        match self.damage.range(k + 1..).next() {
            None => Ok(()),
            Some((&n, d)) => Err(JournalError::Damaged {
                point_interval: k,
                interval: n,
                offset: d.offset,
                path: self.layout.journal(n),
                aside: d.aside.clone(),
            }),
        }
    }

    /// Whether the current interval has saved (and synced) block `key`.
    pub fn saved(&self, key: u64) -> bool {
        self.intervals
            .get(&self.current)
            .is_some_and(|c| c.contains(key))
    }

    /// Appends encoded undo records (`records`) to the current interval's
    /// journal; `saved` holds (block key, offset in `records`) of each.
    /// Nothing is durable, or visible to readers, before [`Self::sync`].
    pub fn save_undo(&mut self, records: &[u8], saved: &[(u64, u64)]) -> Result<(), JournalError> {
        if records.is_empty() {
            return Ok(());
        }
        if self.append.is_none() {
            self.append = Some(self.open_append()?);
        }
        let f = self.append.as_ref().expect("journal open");
        let base = self.end;
        if let Err(source) = self.storage.write_all_at(Target::Journal, f, records, base) {
            // Cut what part of it was written; a scan would cut it anyway.
            let _ = f.set_len(base);
            return Err(JournalError::Append {
                path: self.layout.journal(self.current),
                source,
            });
        }
        self.end += records.len() as u64;
        self.unsynced
            .extend(saved.iter().map(|&(k, rel)| (k, base + rel)));
        Ok(())
    }

    /// fdatasyncs the current journal; then the saved records count: they
    /// join the interval's index and every cached point map.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        let Some(f) = self.append.as_ref() else {
            return Ok(());
        };
        if self.unsynced.is_empty() {
            return Ok(());
        }
        self.storage
            .sync_data(Target::Journal, f)
            .map_err(|source| JournalError::Sync {
                path: self.layout.journal(self.current),
                source,
            })?;
        let idx = self
            .intervals
            .entry(self.current)
            .or_insert_with(IntervalIndex::new_open);
        idx.len = self.end;
        for &(k, off) in &self.unsynced {
            idx.insert(k, off);
        }
        self.maps
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .note_saved(self.current, &self.unsynced);
        self.unsynced.clear();
        Ok(())
    }

    /// A tag closed the current interval: its index shrinks to what reads
    /// need (or goes, when it saved nothing) and the next interval starts.
    /// Returns the new current interval.
    pub fn close_interval(&mut self) -> u64 {
        debug_assert!(self.unsynced.is_empty(), "close after sync");
        let cur = self.current;
        self.append = None;
        if let Some(idx) = self.intervals.get_mut(&cur) {
            if idx.count() == 0 {
                self.intervals.remove(&cur);
            } else {
                idx.close();
            }
        }
        self.current = cur + 1;
        self.end = 0;
        self.intervals
            .insert(self.current, IntervalIndex::new_open());
        self.current
    }

    /// Forgets every interval (the replication ended): only an empty
    /// current interval remains.
    pub fn forget_all(&mut self) {
        self.append = None;
        self.unsynced.clear();
        self.end = 0;
        self.intervals = BTreeMap::from([(self.current, IntervalIndex::new_open())]);
        self.damage.clear();
        *self.maps.get_mut().unwrap_or_else(PoisonError::into_inner) = MapCache::default();
        self.fds
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Where the content at the point closing interval `k` of each block
    /// of `keys` is: `Some` an undo record, `None` the block has not
    /// changed since (it is the replica's, or the pre-images'). Refused
    /// when the point cannot be rebuilt exactly ([`Self::check_point`]).
    pub fn locate(
        &self,
        k: u64,
        keys: impl Iterator<Item = u64>,
    ) -> Result<Vec<Option<Undo>>, JournalError> {
        self.check_point(k)?;
        let mut cache = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        let map = cache.get_or_build(&self.intervals, k);
        Ok(keys.map(|key| map.get(&key).copied()).collect())
    }

    /// Every block changed since the point closing interval `k`, with its
    /// content at that point, in key order. Refused when the point cannot
    /// be rebuilt exactly ([`Self::check_point`]).
    pub fn point_map(&self, k: u64) -> Result<Vec<(u64, Undo)>, JournalError> {
        self.check_point(k)?;
        let mut v: Vec<(u64, Undo)> = build_map(&self.intervals, k).into_iter().collect();
        v.sort_unstable_by_key(|&(key, _)| key);
        Ok(v)
    }

    /// Reads the block `key` saved by the record `undo` into `out` (one
    /// block), checking it.
    pub fn read_undo(&self, key: u64, undo: Undo, out: &mut [u8]) -> Result<(), JournalError> {
        let f = self.file(undo.interval)?;
        journal::read_block(&f, undo.offset, key, out).map_err(|source| JournalError::Record {
            path: self.layout.journal(undo.interval),
            source,
        })
    }

    /// A read handle on interval `n`'s journal and its valid length.
    pub fn file(&self, n: u64) -> Result<Arc<File>, JournalError> {
        let mut fds = self.fds.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = fds.get(&n) {
            return Ok(f.clone());
        }
        let path = self.layout.journal(n);
        let f = Arc::new(File::open(&path).map_err(|source| JournalError::Open { path, source })?);
        if fds.len() >= MAX_JOURNAL_FDS {
            fds.clear();
        }
        fds.insert(n, f.clone());
        Ok(f)
    }

    /// Bytes of valid records in interval `n`'s journal.
    pub fn len(&self, n: u64) -> u64 {
        self.intervals.get(&n).map_or(0, |i| i.len)
    }

    /// The path of interval `n`'s journal, for messages.
    pub fn path(&self, n: u64) -> PathBuf {
        self.layout.journal(n)
    }

    /// (interval, bytes) of every retained interval, oldest first.
    pub fn interval_bytes(&self) -> Vec<(u64, u64)> {
        self.intervals.iter().map(|(&k, i)| (k, i.len)).collect()
    }

    /// Bytes of every retained journal.
    pub fn bytes(&self) -> u64 {
        self.intervals.values().map(|i| i.len).sum()
    }

    /// Retention dropped the points closing intervals up to `k`: the
    /// intervals up to and including `k` are no longer needed. They are
    /// forgotten now and their files deleted by the returned value.
    pub fn drop_through(&mut self, k: u64) -> DroppedJournals {
        let freed: Vec<u64> = self.intervals.range(..=k).map(|(&n, _)| n).collect();
        let mut fds = self.fds.lock().unwrap_or_else(PoisonError::into_inner);
        let mut indexes = Vec::with_capacity(freed.len());
        for n in &freed {
            indexes.extend(self.intervals.remove(n));
            fds.remove(n);
        }
        drop(fds);
        let mut paths: Vec<PathBuf> = freed.iter().map(|&n| self.layout.journal(n)).collect();
        let dropped_damage = self.damage.range(..=k).map(|(_, d)| d.aside.clone());
        paths.extend(dropped_damage.collect::<Vec<_>>());
        self.damage.retain(|&n, _| n > k);
        self.maps
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .maps
            .retain(|&pk, _| pk >= k);
        DroppedJournals {
            paths,
            dir: self.layout.retention_dir(),
            _indexes: indexes,
        }
    }

    fn open_append(&self) -> Result<File, JournalError> {
        let path = self.layout.journal(self.current);
        let existed = path.exists();
        let f = open_or_create(&path).map_err(|source| JournalError::Open { path, source })?;
        if !existed {
            let dir = self.layout.retention_dir();
            fsync_dir(&dir).map_err(|source| JournalError::SyncDir { path: dir, source })?;
        }
        Ok(f)
    }
}

/// Scans interval `n`'s journal into its index: cuts the torn tail of the
/// current interval, and sets any other damage aside (see the module doc).
fn scan_one(
    replication: &str,
    n: u64,
    path: PathBuf,
    current: bool,
    disk_ok: impl Fn(u32) -> bool,
) -> Result<(IntervalIndex, Option<Damage>), JournalError> {
    let f = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(source) => return Err(JournalError::Open { path, source }),
    };
    let scanned = journal::scan(&f, 0, &disk_ok).and_then(|scan| {
        let after = if scan.valid_len < scan.file_len {
            journal::salvage(&f, scan.valid_len, &disk_ok)?
        } else {
            journal::Salvage::default()
        };
        Ok((scan, after))
    });
    let (scan, mut after) = match scanned {
        Ok(s) => s,
        Err(source) => return Err(JournalError::Scan { path, source }),
    };
    let mut len = scan.file_len;
    // The current interval's last damaged range, reaching the end of the
    // file, is the torn tail of a crash mid-append when it is short or
    // zeroes: the replica was not written after it, so it is cut. A
    // full-length record there that fails its checksum is damage.
    if current {
        if let Some(&(from, to)) = after.damaged.last() {
            let torn = to == scan.file_len
                && journal::torn_tail(&f, from, to).map_err(|source| JournalError::Scan {
                    path: path.clone(),
                    source,
                })?;
            if torn {
                warn!(replication = %replication, journal = %path.display(), valid = from, len = scan.file_len,
                    problem = %scan.problem.clone().unwrap_or_default(),
                    "cutting the torn tail of the current interval's journal (crash mid-append)");
                if let Err(source) = f.set_len(from).and_then(|_| f.sync_all()) {
                    return Err(JournalError::Truncate { path, source });
                }
                after.damaged.pop();
                len = from;
            }
        }
    }
    let damage = after
        .damaged
        .first()
        .map(|&(offset, _)| set_aside(replication, n, &path, &f, offset, &after, len));
    let mut entries = scan.entries;
    entries.extend(after.entries);
    Ok((IntervalIndex::from_scan(entries, len, current), damage))
}

/// Copies interval `n`'s journal from `offset` (its first damaged record)
/// to its end into `<journal>.damaged-<offset>` (once: a copy made at an
/// earlier open is kept) and logs what is lost and what to do.
fn set_aside(
    replication: &str,
    n: u64,
    path: &std::path::Path,
    f: &File,
    offset: u64,
    found: &journal::Salvage,
    len: u64,
) -> Damage {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".damaged-{offset}"));
    let aside = PathBuf::from(name);
    // The journal is not cut, so the copy is for analysis only: failing to
    // make it (a full disk, most likely) is said, not fatal.
    let mut aside_failed = None;
    if !aside.exists() {
        if let Err(source) = copy_tail(f, offset, len, &aside) {
            let e = JournalError::SetAside {
                path: path.to_path_buf(),
                aside: aside.clone(),
                source,
            };
            error!(replication = %replication, interval = n, error = %e,
                "cannot copy the damaged records aside; the journal keeps them, replication goes on");
            aside_failed = Some(e.to_string());
        }
    }
    let d = Damage {
        offset,
        bytes: found.damaged.iter().map(|&(a, b)| b - a).sum(),
        kept_after: found.entries.len(),
        aside,
        aside_failed,
        reported: false,
    };
    error!(
        replication = %replication,
        interval = n,
        offset = d.offset,
        damaged_bytes = d.bytes,
        records_kept_after_damage = d.kept_after,
        aside = %d.aside.display(),
        "{}",
        d.message(replication, n, path)
    );
    d
}

/// The interval of an aside file `interval-<n>.undo.damaged-<offset>`.
fn parse_aside_name(name: &str) -> Option<u64> {
    let (journal, offset) = name.split_once(".damaged-")?;
    offset.parse::<u64>().ok()?;
    parse_journal_name(journal)
}

/// Writes bytes `from..to` of `f` to a new file `dst`, durably (a temporary
/// file, fsynced, renamed, and the directory fsynced).
fn copy_tail(f: &File, from: u64, to: u64, dst: &std::path::Path) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut tmp_name = dst.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let copied = (|| {
        let mut src = f.try_clone()?;
        src.seek(SeekFrom::Start(from))?;
        let mut out = File::create(&tmp)?;
        io::copy(&mut src.take(to.saturating_sub(from)), &mut out)?;
        out.sync_all()?;
        std::fs::rename(&tmp, dst)
    })();
    if copied.is_err() {
        // A partial copy only takes space (the disk may well be full).
        let _ = std::fs::remove_file(&tmp);
    }
    copied?;
    match dst.parent() {
        Some(dir) => fsync_dir(dir),
        None => Ok(()),
    }
}
