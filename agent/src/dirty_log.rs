//! The dirty-extent log (DESIGN.md §5 "Dirty-extent log").
//!
//! One bit per 1 MiB extent per disk, in a small file that is synced before
//! the first write to a clean extent is acknowledged (DRBD's activity log
//! works the same way). After a crash the set bits are exactly the extents
//! whose changes might not have reached the process server, so the agent
//! resyncs only those. Setting is durable (group commit: concurrent setters
//! share one fdatasync); clearing is lazy, because a stale set bit only costs
//! a hash comparison at the next start.
//!
//! Durable order: set the bit in memory, pwrite its word, fdatasync, and only
//! then mark the bit *durable* in memory; a write to an extent is
//! acknowledged without touching the log only when its bit is durable
//! ([`DirtyLog::is_durably_set`]). A bit is marked durable only when the last
//! pwrite of its word is covered by a completed fdatasync (per-word write
//! generations), so a concurrent clear or re-set of a neighbour can never make
//! an unsynced bit look durable. Clearing drops the durable mark first.
//!
//! Clearing a bit says "the process server holds every record of this
//! extent", which is only as true as the PS's durable seq. So the log also
//! keeps the highest durable seq the PS acknowledged (the *durable mark*),
//! synced before any bit it allowed to clear reaches the file. A PS that
//! later resumes the stream below the mark has lost records whose bits are
//! gone, and the agent resyncs every disk (see [`crate::sender`]).
//!
//! File layout (little endian): a header page
//! `"RBDL" | version u32 | disks u32 | 0 u32 | extents u64 per disk`, padded
//! to 4 KiB, whose last 8 bytes hold the durable mark (0 in logs written
//! before it existed), then each disk's bitmap as u64 words, disk after
//! disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const MAGIC: [u8; 4] = *b"RBDL";
const VERSION: u32 = 1;

/// A plain growable bitset (used for the in-memory extent sets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bitset {
    words: Vec<u64>,
    len: u64,
    count: u64,
}

impl Bitset {
    pub fn new(len: u64) -> Self {
        Bitset {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            count: 0,
        }
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn count(&self) -> u64 {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    /// Sets bit `i`; returns whether it was clear before.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1u64 << (i % 64);
        let was_clear = *w & m == 0;
        *w |= m;
        self.count += was_clear as u64;
        was_clear
    }
    /// Clears bit `i`; returns whether it was set before.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1u64 << (i % 64);
        let was_set = *w & m != 0;
        *w &= !m;
        self.count -= was_set as u64;
        was_set
    }
    pub fn set_all(&mut self) {
        for i in 0..self.len {
            self.set(i);
        }
    }
    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.count = 0;
    }
    /// Indices of the set bits, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(wi as u64 * 64 + b)
            })
        })
    }
}

/// What `DirtyLog::open` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// No log existed; a clean one was created.
    Created,
    /// The log was read back; bits as they were at the last sync.
    Loaded,
    /// A log existed for other disks or sizes; it was replaced by a clean
    /// one. The caller must treat every disk as dirty.
    GeometryChanged(String),
}

struct DiskBits {
    words: Vec<AtomicU64>,
    /// Bits known to be set in the file on disk (a subset of `words`).
    durable: Vec<AtomicU64>,
    extents: u64,
    /// File offset of word 0.
    file_off: u64,
}

/// Guarded by `DirtyLog::io`: every change of a bit happens under it,
/// together with the pwrite of its word.
struct IoState {
    /// Bumped by every call that writes words.
    gen: u64,
    /// Per disk, per word: the `gen` of the last pwrite of that word.
    word_gen: Vec<Vec<u64>>,
}

/// The dirty-extent log of all disks of the machine.
pub struct DirtyLog {
    path: PathBuf,
    file: File,
    disks: Vec<DiskBits>,
    /// Number of set bits over all disks.
    count: AtomicU64,
    /// Serialises bit changes with the writes of their words to the file, so
    /// the latest in-memory value is what lands last.
    io: Mutex<IoState>,
    /// Highest `IoState::gen` covered by a completed fdatasync.
    synced: AtomicU64,
    sync_lock: Mutex<()>,
    /// The durable mark as synced in the file; its lock serialises writes
    /// of the mark.
    mark_synced: Mutex<u64>,
    /// The highest durable seq noted, to be synced before the next clear.
    mark_noted: AtomicU64,
}

fn header_len(ndisks: usize) -> u64 {
    (16 + 8 * ndisks as u64 + 8).div_ceil(4096) * 4096
}

/// File offset of the durable mark: the last 8 bytes of the header page.
fn mark_offset(ndisks: usize) -> u64 {
    header_len(ndisks) - 8
}

fn encode_header(extents: &[u64]) -> Vec<u8> {
    let mut h = vec![0u8; header_len(extents.len()) as usize];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&(extents.len() as u32).to_le_bytes());
    for (i, e) in extents.iter().enumerate() {
        h[16 + 8 * i..24 + 8 * i].copy_from_slice(&e.to_le_bytes());
    }
    h
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DirtyLog {
    /// Opens or creates the log for disks with `extents[i]` extents each.
    pub fn open(path: &Path, extents: &[u64]) -> io::Result<(DirtyLog, Opened)> {
        let header = encode_header(extents);
        let mut file_off = header.len() as u64;
        let mut disks = Vec::with_capacity(extents.len());
        for &n in extents {
            let nwords = n.div_ceil(64);
            disks.push(DiskBits {
                words: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
                durable: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
                extents: n,
                file_off,
            });
            file_off += nwords * 8;
        }
        let total_len = file_off;
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut opened = Opened::Created;
        let mark_at = mark_offset(extents.len()) as usize;
        let mut mark = 0;
        if existed {
            let mut old = vec![0u8; header.len()];
            let n = file.metadata()?.len();
            let readable = n >= total_len && {
                rebound_common::chunk::read_full_at(&file, &mut old, 0)?;
                true
            };
            if readable && old[..mark_at] == header[..mark_at] {
                mark = u64::from_le_bytes(old[mark_at..].try_into().expect("8 bytes"));
                let mut buf = vec![0u8; (total_len - header.len() as u64) as usize];
                rebound_common::chunk::read_full_at(&file, &mut buf, header.len() as u64)?;
                let mut pos = 0;
                for d in &disks {
                    for w in &d.words {
                        let v = u64::from_le_bytes(buf[pos..pos + 8].try_into().expect("8 bytes"));
                        w.store(v, Ordering::Relaxed);
                        pos += 8;
                    }
                }
                opened = Opened::Loaded;
            } else {
                opened = Opened::GeometryChanged(if readable {
                    "the dirty log was written for other disks or disk sizes".into()
                } else {
                    format!("the dirty log is truncated ({n} bytes, expected {total_len})")
                });
            }
        }
        let word_gen = disks.iter().map(|d| vec![0; d.words.len()]).collect();
        let log = DirtyLog {
            path: path.to_path_buf(),
            file,
            disks,
            count: AtomicU64::new(0),
            io: Mutex::new(IoState { gen: 0, word_gen }),
            synced: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
            mark_synced: Mutex::new(0),
            mark_noted: AtomicU64::new(0),
        };
        // Mask bits past the last extent (a corrupt file must not count them).
        let mut count = 0;
        for d in &log.disks {
            for (i, w) in d.words.iter().enumerate() {
                let first = i as u64 * 64;
                let valid = (d.extents - first).min(64);
                let mask = if valid == 64 {
                    u64::MAX
                } else {
                    (1u64 << valid) - 1
                };
                let v = w.load(Ordering::Relaxed) & mask;
                w.store(v, Ordering::Relaxed);
                // What was read back is on disk.
                d.durable[i].store(v, Ordering::Relaxed);
                count += v.count_ones() as u64;
            }
        }
        log.count.store(count, Ordering::Relaxed);
        if opened == Opened::Loaded {
            *lock(&log.mark_synced) = mark;
            log.mark_noted.store(mark, Ordering::Relaxed);
        } else {
            for d in &log.disks {
                d.words.iter().for_each(|w| w.store(0, Ordering::Relaxed));
                d.durable.iter().for_each(|w| w.store(0, Ordering::Relaxed));
            }
            log.count.store(0, Ordering::Relaxed);
            log.file.set_len(0)?;
            log.file.write_all_at(&header, 0)?;
            log.file.set_len(total_len)?;
            log.file.sync_all()?;
            if let Some(dir) = path.parent() {
                rebound_common::durable::fsync_dir(dir)?;
            }
        }
        Ok((log, opened))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The highest durable seq of the PS that is synced in the file: the
    /// PS acknowledged every record up to it, and bits may have been
    /// cleared on that word. 0 for a new log.
    pub fn durable_mark(&self) -> u64 {
        *lock(&self.mark_synced)
    }

    /// Notes that the PS holds every record up to `seq`; synced into the
    /// file before the next [`DirtyLog::clear`] writes cleared bits.
    pub fn note_durable(&self, seq: u64) {
        self.mark_noted.fetch_max(seq, Ordering::SeqCst);
    }

    /// Sets the durable mark back to 0, synced: the stream it counted is
    /// gone (the agent switched to another replication), and the new one
    /// starts its seqs afresh.
    pub fn reset_durable_mark(&self) -> io::Result<()> {
        let mut synced = lock(&self.mark_synced);
        self.mark_noted.store(0, Ordering::SeqCst);
        self.file
            .write_all_at(&0u64.to_le_bytes(), mark_offset(self.disks.len()))?;
        self.file.sync_data()?;
        *synced = 0;
        Ok(())
    }

    /// Writes and syncs the noted durable mark when it is ahead of the
    /// synced one.
    fn sync_mark(&self) -> io::Result<()> {
        let mut synced = lock(&self.mark_synced);
        let noted = self.mark_noted.load(Ordering::SeqCst);
        if noted <= *synced {
            return Ok(());
        }
        self.file
            .write_all_at(&noted.to_le_bytes(), mark_offset(self.disks.len()))?;
        self.file.sync_data()?;
        *synced = noted;
        Ok(())
    }

    /// Number of set bits (dirty extents) over all disks.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn disks(&self) -> usize {
        self.disks.len()
    }

    pub fn extents(&self, disk: u32) -> u64 {
        self.disks.get(disk as usize).map_or(0, |d| d.extents)
    }

    /// Whether the bit is set (not necessarily synced yet).
    pub fn is_set(&self, disk: u32, ext: u64) -> bool {
        let Some(d) = self.disks.get(disk as usize) else {
            return false;
        };
        ext < d.extents
            && d.words[(ext / 64) as usize].load(Ordering::SeqCst) & (1 << (ext % 64)) != 0
    }

    /// Whether the bit is set and known to be on disk (its last pwrite is
    /// covered by a completed fdatasync). A `false` answer is conservative:
    /// the caller takes the slow path ([`DirtyLog::set_and_sync`]).
    pub fn is_durably_set(&self, disk: u32, ext: u64) -> bool {
        let Some(d) = self.disks.get(disk as usize) else {
            return false;
        };
        ext < d.extents
            && d.durable[(ext / 64) as usize].load(Ordering::SeqCst) & (1 << (ext % 64)) != 0
    }

    /// The set bits of one disk, ascending.
    pub fn set_extents(&self, disk: u32) -> Vec<u64> {
        let Some(d) = self.disks.get(disk as usize) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, w) in d.words.iter().enumerate() {
            let mut v = w.load(Ordering::SeqCst);
            while v != 0 {
                out.push(i as u64 * 64 + v.trailing_zeros() as u64);
                v &= v - 1;
            }
        }
        out
    }

    /// Writes the words holding `exts` of `disk` from memory to the file,
    /// under `io` (`st`), stamping them with a new generation; returns it.
    fn write_words(&self, st: &mut IoState, disk: u32, exts: &[u64]) -> io::Result<u64> {
        let d = &self.disks[disk as usize];
        let mut idx: Vec<usize> = exts
            .iter()
            .filter(|&&e| e < d.extents)
            .map(|e| (e / 64) as usize)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        st.gen += 1;
        let gen = st.gen;
        for &w in &idx {
            st.word_gen[disk as usize][w] = gen;
        }
        // Contiguous word runs become one pwrite each.
        let mut i = 0;
        while i < idx.len() {
            let mut j = i + 1;
            while j < idx.len() && idx[j] == idx[j - 1] + 1 {
                j += 1;
            }
            let mut buf = Vec::with_capacity((j - i) * 8);
            for &w in &idx[i..j] {
                buf.extend_from_slice(&d.words[w].load(Ordering::SeqCst).to_le_bytes());
            }
            self.file
                .write_all_at(&buf, d.file_off + idx[i] as u64 * 8)?;
            i = j;
        }
        Ok(gen)
    }

    /// Sets the bits and returns once they are durable in the file. Setters
    /// running at the same time share one fdatasync (group commit): the
    /// first to reach the sync covers every word written before it.
    pub fn set_and_sync(&self, disk: u32, exts: &[u64]) -> io::Result<()> {
        let Some(d) = self.disks.get(disk as usize) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no disk {disk}"),
            ));
        };
        let my_gen = {
            let mut st = lock(&self.io);
            for &e in exts.iter().filter(|&&e| e < d.extents) {
                let w = (e / 64) as usize;
                let m = 1u64 << (e % 64);
                if d.words[w].load(Ordering::SeqCst) & m == 0 {
                    // Not durable until this write is synced.
                    d.durable[w].fetch_and(!m, Ordering::SeqCst);
                    d.words[w].fetch_or(m, Ordering::SeqCst);
                    self.count.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.write_words(&mut st, disk, exts)?
        };
        {
            let _s = lock(&self.sync_lock);
            if self.synced.load(Ordering::SeqCst) < my_gen {
                let target = lock(&self.io).gen;
                self.file.sync_data()?;
                self.synced.store(target, Ordering::SeqCst);
            }
        }
        self.mark_durable(disk, exts);
        Ok(())
    }

    /// Marks the set bits among `exts` durable when the last pwrite of their
    /// word is covered by a completed fdatasync.
    fn mark_durable(&self, disk: u32, exts: &[u64]) {
        let d = &self.disks[disk as usize];
        let st = lock(&self.io);
        let synced = self.synced.load(Ordering::SeqCst);
        for &e in exts.iter().filter(|&&e| e < d.extents) {
            let w = (e / 64) as usize;
            let m = 1u64 << (e % 64);
            if st.word_gen[disk as usize][w] <= synced && d.words[w].load(Ordering::SeqCst) & m != 0
            {
                d.durable[w].fetch_or(m, Ordering::SeqCst);
            }
        }
    }

    /// Clears the bits in memory and writes them to the file without a sync
    /// (a lost clear only costs a hash comparison after a crash). The noted
    /// durable mark is synced first, so a cleared bit on disk is always
    /// covered by the mark that allowed it.
    pub fn clear(&self, disk: u32, exts: &[u64]) -> io::Result<()> {
        let Some(d) = self.disks.get(disk as usize) else {
            return Ok(());
        };
        if exts.is_empty() {
            return Ok(());
        }
        self.sync_mark()?;
        let mut st = lock(&self.io);
        for &e in exts.iter().filter(|&&e| e < d.extents) {
            let w = (e / 64) as usize;
            let m = 1u64 << (e % 64);
            // The durable mark goes first: it never outlives the bit.
            d.durable[w].fetch_and(!m, Ordering::SeqCst);
            let old = d.words[w].fetch_and(!m, Ordering::SeqCst);
            if old & m != 0 {
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.write_words(&mut st, disk, exts).map(|_| ())
    }

    /// Writes every bit and the durable mark and fdatasyncs (clean
    /// shutdown).
    pub fn persist(&self) -> io::Result<()> {
        self.sync_mark()?;
        let _s = lock(&self.sync_lock);
        let target = {
            let mut st = lock(&self.io);
            for (i, d) in self.disks.iter().enumerate() {
                let all: Vec<u64> = (0..d.words.len() as u64).map(|w| w * 64).collect();
                self.write_words(&mut st, i as u32, &all)?;
            }
            st.gen
        };
        self.file.sync_data()?;
        self.synced.store(target, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitset_basics() {
        let mut b = Bitset::new(130);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(64));
        assert!(b.set(129));
        assert!(!b.set(130));
        assert_eq!(b.count(), 3);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert!(b.clear(64));
        assert!(!b.get(64));
        assert_eq!(b.count(), 2);
    }

    #[test]
    fn set_clear_persist_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dirty.log");
        let geo = [100u64, 3];
        {
            let (log, opened) = DirtyLog::open(&p, &geo).unwrap();
            assert_eq!(opened, Opened::Created);
            log.set_and_sync(0, &[0, 5, 99]).unwrap();
            log.set_and_sync(1, &[2]).unwrap();
            assert!(log.is_durably_set(0, 5));
            assert!(!log.is_set(0, 6));
            assert_eq!(log.count(), 4);
            log.clear(0, &[5]).unwrap();
            assert_eq!(log.count(), 3);
            // "Crash": no persist, just drop. Set bits were synced; the clear
            // was written to the page cache (visible to a re-open).
        }
        {
            let (log, opened) = DirtyLog::open(&p, &geo).unwrap();
            assert_eq!(opened, Opened::Loaded);
            assert_eq!(log.set_extents(0), vec![0, 99]);
            assert_eq!(log.set_extents(1), vec![2]);
            assert_eq!(log.count(), 3);
            log.clear(0, &[0, 99]).unwrap();
            log.clear(1, &[2]).unwrap();
            log.persist().unwrap();
        }
        let (log, _) = DirtyLog::open(&p, &geo).unwrap();
        assert_eq!(log.count(), 0);
        // Another geometry: replaced by a clean log, and the caller is told.
        drop(log);
        let (log, opened) = DirtyLog::open(&p, &[100, 4]).unwrap();
        assert!(matches!(opened, Opened::GeometryChanged(_)));
        assert_eq!(log.count(), 0);
    }

    #[test]
    fn durable_marks_follow_the_sync_and_drop_on_clear() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dirty.log");
        let (log, _) = DirtyLog::open(&p, &[128]).unwrap();
        assert!(!log.is_durably_set(0, 3));
        log.set_and_sync(0, &[3, 4]).unwrap();
        assert!(log.is_durably_set(0, 3) && log.is_durably_set(0, 4));
        // Clearing a neighbour in the same word keeps 4 durable; clearing 3
        // drops its mark with the bit.
        log.clear(0, &[3]).unwrap();
        assert!(!log.is_durably_set(0, 3) && !log.is_set(0, 3));
        // 4's word was rewritten by the clear (unsynced), with 4 still set:
        // its mark was given before and stays valid.
        assert!(log.is_durably_set(0, 4));
        // A word rewritten after the last sync does not get new marks.
        {
            let mut st = lock(&log.io);
            log.disks[0].words[0].fetch_or(1 << 5, Ordering::SeqCst);
            log.write_words(&mut st, 0, &[5]).unwrap();
        }
        log.mark_durable(0, &[5]);
        assert!(!log.is_durably_set(0, 5));
        log.set_and_sync(0, &[5]).unwrap();
        assert!(log.is_durably_set(0, 5));
        // Bits read back at open are on disk.
        drop(log);
        let (log, _) = DirtyLog::open(&p, &[128]).unwrap();
        assert!(log.is_durably_set(0, 4) && log.is_durably_set(0, 5));
        assert!(!log.is_durably_set(0, 3));
    }

    #[test]
    fn the_durable_mark_is_synced_before_a_clear_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dirty.log");
        let geo = [100u64, 3];
        {
            let (log, _) = DirtyLog::open(&p, &geo).unwrap();
            assert_eq!(log.durable_mark(), 0);
            log.set_and_sync(0, &[1, 2]).unwrap();
            log.note_durable(40);
            log.note_durable(30); // never goes back
            assert_eq!(log.durable_mark(), 0, "noted, not synced yet");
            log.clear(0, &[1]).unwrap();
            assert_eq!(log.durable_mark(), 40);
            log.note_durable(55);
            // "Crash" without a clear or persist: 55 was never relied on.
        }
        {
            let (log, opened) = DirtyLog::open(&p, &geo).unwrap();
            assert_eq!(opened, Opened::Loaded);
            assert_eq!(log.durable_mark(), 40);
            assert_eq!(log.set_extents(0), vec![2]);
            log.note_durable(70);
            log.persist().unwrap();
        }
        let (log, _) = DirtyLog::open(&p, &geo).unwrap();
        assert_eq!(log.durable_mark(), 70);
        drop(log);
        // A log of other disks starts over: no mark.
        let (log, opened) = DirtyLog::open(&p, &[100]).unwrap();
        assert!(matches!(opened, Opened::GeometryChanged(_)));
        assert_eq!(log.durable_mark(), 0);
    }

    #[test]
    fn concurrent_setters_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dirty.log");
        let (log, _) = DirtyLog::open(&p, &[4096]).unwrap();
        let log = std::sync::Arc::new(log);
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..100u64 {
                        log.set_and_sync(0, &[t * 1000 + i]).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(log.count(), 400);
        drop(log);
        let (log, _) = DirtyLog::open(&p, &[4096]).unwrap();
        assert_eq!(log.count(), 400);
    }
}
