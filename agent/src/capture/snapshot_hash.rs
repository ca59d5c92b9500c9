//! The source's chunk hashes as they were at a tag, taken while writes go
//! on (`rebound verify`, DESIGN.md §7 "Views").
//!
//! The agent keeps no history of its disks, so the only way to know what a
//! chunk held at a tag is to hash it before anything changes it. A verify
//! cuts its tag and installs a [`SnapshotHash`] in the same critical section
//! of the ordering point ([`Capture::start_snapshot_hash`]); from then on
//! the write path hashes every chunk a write touches *before* the write
//! reaches the disk, unless it is hashed already, and a background pass
//! hashes the rest ([`SnapshotHash::hash_rest`]). Both hash under the
//! snapshot's own lock, and a write passes the snapshot before its IO, so no
//! write changes a chunk between the tag and its hash: every hash is the
//! chunk's content at the tag. Writes are delayed by at most a chunk's hash,
//! never stopped.
//!
//! Chunks are the resync's first-level chunks (1 MiB, blake3 through
//! [`rebound_common::chunk::chunk_hashes`]), the ones the MT hashes over its
//! view of the point, so the two compare byte for byte.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rebound_common::chunk::{chunk_hashes, CHUNK_SIZE};
use rebound_common::frame::TagKind;
use thiserror::Error;
use tracing::info;

use super::{Capture, TagError};
use crate::disk::Disk;

/// How often the background pass logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("no verify point can be cut ({0}); verify again once the agent streams in data mode (`rebound machines` shows its mode)")]
    Tag(#[from] TagError),
    #[error("a verify is running already (point {0}); wait for it to end and retry")]
    Busy(String),
    #[error("hashing disk {disk} at offset {offset} for verify point {point}: {message}; check the disk and run the verify again")]
    Read {
        point: String,
        disk: String,
        offset: u64,
        message: String,
    },
    #[error("the hash pass of verify point {0} was stopped before it ended (the replication stopped or switched); run the verify again")]
    Stopped(String),
}

/// What the snapshot's lock covers.
struct Hashed {
    /// By disk, by chunk.
    hashes: Vec<Vec<[u8; 32]>>,
    /// The first chunk that could not be read.
    error: Option<SnapshotError>,
    chunks_done: u64,
}

/// The hashes of every chunk of every disk as it was at one tag.
pub struct SnapshotHash {
    point: String,
    seq: u64,
    disks: Vec<Arc<Disk>>,
    /// By disk, one bit per chunk: hashed already. Set only under the lock,
    /// read without it so a write to hashed chunks costs no lock.
    done: Vec<Vec<AtomicU64>>,
    total_chunks: u64,
    stopped: AtomicBool,
    hashed: Mutex<Hashed>,
}

fn chunks_of(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

impl SnapshotHash {
    fn new(point: String, seq: u64, disks: Vec<Arc<Disk>>) -> SnapshotHash {
        let counts: Vec<usize> = disks.iter().map(|d| chunks_of(d.size()) as usize).collect();
        SnapshotHash {
            point,
            seq,
            done: counts
                .iter()
                .map(|&n| (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            total_chunks: counts.iter().map(|&n| n as u64).sum(),
            disks,
            stopped: AtomicBool::new(false),
            hashed: Mutex::new(Hashed {
                hashes: counts.iter().map(|&n| vec![[0; 32]; n]).collect(),
                error: None,
                chunks_done: 0,
            }),
        }
    }

    /// The tag the hashes belong to.
    pub fn point(&self) -> &str {
        &self.point
    }

    /// The tag's seq.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn lock(&self) -> MutexGuard<'_, Hashed> {
        self.hashed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_done(&self, disk: usize, c: u64) -> bool {
        self.done[disk][(c / 64) as usize].load(Ordering::Acquire) >> (c % 64) & 1 == 1
    }

    /// Hashes chunk `c` of `disk` unless it is hashed already; the caller
    /// holds the snapshot's lock (`h`), so no write changes the chunk
    /// meanwhile.
    fn hash_chunk(&self, h: &mut Hashed, disk: usize, c: u64) {
        if self.is_done(disk, c) {
            return;
        }
        let d = &self.disks[disk];
        let offset = c * CHUNK_SIZE;
        match chunk_hashes(d.file(), d.size(), offset, CHUNK_SIZE as u32, 1) {
            Ok(v) if v.len() == 32 => h.hashes[disk][c as usize].copy_from_slice(&v),
            r => {
                let message = match r {
                    Err(e) => e.to_string(),
                    Ok(v) => format!("{} bytes of hash for one chunk", v.len()),
                };
                h.error.get_or_insert(SnapshotError::Read {
                    point: self.point.clone(),
                    disk: d.name.clone(),
                    offset,
                    message,
                });
            }
        }
        self.done[disk][(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::Release);
        h.chunks_done += 1;
    }

    /// Before a write of `len` bytes at `offset` of `disk` reaches the disk:
    /// hashes every chunk it touches that is not hashed yet.
    pub(super) fn before_write(&self, disk: u32, offset: u64, len: u64) {
        let disk = disk as usize;
        let Some(size) = self.disks.get(disk).map(|d| d.size()) else {
            return;
        };
        if len == 0 || offset >= size {
            return;
        }
        let first = offset / CHUNK_SIZE;
        let last = (offset + len - 1).min(size - 1) / CHUNK_SIZE;
        if (first..=last).all(|c| self.is_done(disk, c)) {
            return;
        }
        let mut h = self.lock();
        for c in first..=last {
            self.hash_chunk(&mut h, disk, c);
        }
    }

    /// The background pass: hashes every chunk no write has hashed yet, one
    /// at a time under the lock (a write waits for one chunk at most), and
    /// logs progress. Blocking: run it on the blocking pool.
    pub fn hash_rest(&self) -> Result<(), SnapshotError> {
        let started = Instant::now();
        let mut last_log = Instant::now();
        for disk in 0..self.disks.len() {
            for c in 0..chunks_of(self.disks[disk].size()) {
                if self.stopped.load(Ordering::Relaxed) {
                    return Err(SnapshotError::Stopped(self.point.clone()));
                }
                if self.is_done(disk, c) {
                    continue;
                }
                let mut h = self.lock();
                self.hash_chunk(&mut h, disk, c);
                if let Some(e) = &h.error {
                    return Err(e.clone());
                }
                let done = h.chunks_done;
                drop(h);
                if last_log.elapsed() >= PROGRESS_EVERY {
                    last_log = Instant::now();
                    info!(
                        point = %self.point,
                        hashed_mib = done * (CHUNK_SIZE >> 20),
                        total_mib = self.total_chunks * (CHUNK_SIZE >> 20),
                        "verify: {done} of {} chunks of the source hashed as they were at the point",
                        self.total_chunks
                    );
                }
            }
        }
        info!(
            point = %self.point,
            chunks = self.total_chunks,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "verify: every chunk of the source hashed as it was at the point"
        );
        Ok(())
    }

    /// The hashes of `disk` at the tag, once [`SnapshotHash::hash_rest`]
    /// returned Ok: `32 * chunks` bytes, chunk order.
    pub fn hashes(&self, disk: u32) -> Result<Vec<u8>, SnapshotError> {
        let h = self.lock();
        if let Some(e) = &h.error {
            return Err(e.clone());
        }
        let d = disk as usize;
        let n = self
            .done
            .get(d)
            .map_or(0, |_| chunks_of(self.disks[d].size()));
        if (0..n).any(|c| !self.is_done(d, c)) {
            return Err(SnapshotError::Stopped(self.point.clone()));
        }
        Ok(h.hashes.get(d).map_or_else(Vec::new, |v| v.concat()))
    }

    /// Ends the background pass early (the verify gave up).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}

impl Capture {
    /// Cuts crash tag `id` (generated when empty) and, in the same critical
    /// section, starts hashing every disk as it is at that tag: from here on
    /// a write hashes the chunks it changes first. End it with
    /// [`Capture::end_snapshot_hash`].
    pub fn start_snapshot_hash(&self, id: &str) -> Result<Arc<SnapshotHash>, SnapshotError> {
        let mut st = self.lock();
        if let Some(s) = &st.snapshot {
            return Err(SnapshotError::Busy(s.point.clone()));
        }
        Self::check_taggable(&st, TagKind::Crash)?;
        let (point, seq) = self.append_tag(&mut st, TagKind::Crash, id, "");
        let snap = Arc::new(SnapshotHash::new(point, seq, self.disks.clone()));
        st.snapshot = Some(snap.clone());
        Ok(snap)
    }

    /// Writes stop hashing for `snap` (its hashes stay readable).
    pub fn end_snapshot_hash(&self, snap: &Arc<SnapshotHash>) {
        snap.stop();
        let mut st = self.lock();
        if st.snapshot.as_ref().is_some_and(|s| Arc::ptr_eq(s, snap)) {
            st.snapshot = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::tests::{make_capture, start};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) | 1)
            .collect()
    }

    fn file_hashes(d: &Disk) -> Vec<u8> {
        chunk_hashes(
            d.file(),
            d.size(),
            0,
            CHUNK_SIZE as u32,
            chunks_of(d.size()) as u32,
        )
        .unwrap()
    }

    #[test]
    fn hashes_are_those_at_the_tag_while_writes_go_on() {
        let dir = tempfile::tempdir().unwrap();
        // Two disks, the second with a short last chunk.
        let cap = make_capture(dir.path(), &[4 << 20, (2 << 20) + 8192], 64 << 20);
        start(&cap, 10);
        cap.write(0, 0, &pattern(3 << 20, 1), false).unwrap();
        cap.write(1, 4096, &pattern(2 << 20, 2), false).unwrap();
        let at_tag: Vec<Vec<u8>> = cap.disks().iter().map(|d| file_hashes(d)).collect();

        let before = cap.snapshot().seq;
        let snap = cap.start_snapshot_hash("verify-1").unwrap();
        assert_eq!(snap.point(), "verify-1");
        assert_eq!(snap.seq(), before + 1);
        assert_eq!(cap.snapshot().last_tag, "verify-1");
        assert_eq!(
            cap.start_snapshot_hash("verify-2").err(),
            Some(SnapshotError::Busy("verify-1".into()))
        );
        // Writes after the tag, some across chunk boundaries, one a zero.
        cap.write(0, (1 << 20) - 100, &pattern(300, 3), false)
            .unwrap();
        cap.zero(1, 0, 3 << 20, false).unwrap();
        cap.write(0, 3 << 20, &pattern(4096, 4), true).unwrap();
        // The background pass, with a write landing in the middle of it.
        let bg = {
            let s = snap.clone();
            std::thread::spawn(move || s.hash_rest())
        };
        cap.write(0, 2 << 20, &pattern(8192, 5), false).unwrap();
        bg.join().unwrap().unwrap();
        cap.end_snapshot_hash(&snap);

        for (i, want) in at_tag.iter().enumerate() {
            assert_eq!(&snap.hashes(i as u32).unwrap(), want, "disk {i}");
        }
        let now: Vec<Vec<u8>> = cap.disks().iter().map(|d| file_hashes(d)).collect();
        assert_ne!(now, at_tag, "the writes after the tag reached the disks");
        // The snapshot is over: a new verify may start, writes go on.
        cap.write(0, 0, &[9u8; 512], false).unwrap();
        let next = cap.start_snapshot_hash("").unwrap();
        assert!(!next.point().is_empty(), "an id is generated");
        cap.end_snapshot_hash(&next);
        assert_eq!(
            next.hashes(0).err(),
            Some(SnapshotError::Stopped(next.point().to_string()))
        );
    }

    #[test]
    fn no_verify_point_before_the_stream_position_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let cap = make_capture(dir.path(), &[1 << 20], 64 << 20);
        assert_eq!(
            cap.start_snapshot_hash("v").err(),
            Some(SnapshotError::Tag(TagError::NotConnected))
        );
    }
}
