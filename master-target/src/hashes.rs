//! Chunk hashes over a replica as it is now, for the agent's differential
//! resync (DESIGN.md §5 "Resync source", §7 "Chunk hashes"), or over the
//! view of a recovery point, for `rebound verify` (§7 "Views").
//!
//! The hashes must reflect every record the agent already handed over, so
//! the request names a seq and the MT waits (bounded) until it has applied
//! that far.
//!
//! The hashes are those of [`rebound_common::chunk::chunk_hashes`], the
//! same code the agent runs over its disk (the contract between them). The
//! replication's read lock is held throughout, so no apply writes the
//! replica meanwhile. First-level (1 MiB) chunks come from the replication's
//! hash cache where it knows them (`hash_cache`); the others are hashed from
//! the replica and kept there for the next resync.
//!
//! At a point, each chunk is read through the view (the retention journal
//! where it holds the block, else the replica) and hashed; the cache is not
//! used, and the cached hashes of the chunks asked are forgotten: a verify
//! looks for a replica changed by other than apply, which the cache cannot
//! know of, and the resync of a repair must compare with what the replica
//! really holds.

use crate::error::{io_err, MtError, Result};
use crate::replication::{Disk, Replication};
use rebound_common::chunk::{chunk_hash, chunk_hashes, CHUNK_SIZE};
use std::time::Duration;

/// How long ChunkHashes waits for the applied seq.
pub const WAIT_APPLIED: Duration = Duration::from_secs(60);
/// Largest chunk accepted.
pub const MAX_CHUNK: u32 = 64 << 20;
/// Most chunks per request (the answer is 32 bytes per chunk).
pub const MAX_COUNT: u32 = 1 << 16;

impl Replication {
    /// blake3 of `count` chunks of `chunk_size` bytes of disk `disk` from
    /// `offset` (the last chunk short at the end of the disk).
    pub fn chunk_hashes(
        &self,
        disk: u32,
        offset: u64,
        chunk_size: u32,
        count: u32,
    ) -> Result<Vec<u8>> {
        let inner = self.read_inner()?;
        let d = self.hashable(disk, offset, chunk_size, count)?;
        let hash = |offset: u64, count: u32| {
            chunk_hashes(d.file(), d.size(), offset, chunk_size, count).map_err(io_err(|| {
                format!(
                    "cannot hash replica {} of replication {} at offset {offset}",
                    d.path().display(),
                    self.id()
                )
            }))
        };
        let pos = self.replica_disks().iter().position(|x| x.index() == disk);
        let cached = u64::from(chunk_size) == CHUNK_SIZE
            && offset.is_multiple_of(CHUNK_SIZE)
            && inner.hashes_cacheable();
        let (Some(pos), true) = (pos, cached) else {
            return hash(offset, count);
        };
        // The cache's lock is not held while hashing, so the requests of a
        // pipelined resync hash side by side; the read lock keeps apply out.
        let cache = || inner.cached_hashes();
        let first = offset / CHUNK_SIZE;
        let known: Vec<Option<[u8; 32]>> = {
            let c = cache();
            (0..u64::from(count))
                .map(|i| c.get(pos, first + i))
                .collect()
        };
        let mut out = Vec::with_capacity(count as usize * 32);
        let mut i = 0;
        while i < known.len() {
            if let Some(h) = known[i] {
                out.extend_from_slice(&h);
                i += 1;
                continue;
            }
            // A run of unknown chunks, hashed from the replica and kept.
            let j = (i..known.len())
                .find(|&j| known[j].is_some())
                .unwrap_or(known.len());
            let hashed = hash(offset + i as u64 * CHUNK_SIZE, (j - i) as u32)?;
            let mut c = cache();
            for (k, h) in hashed.chunks_exact(32).enumerate() {
                c.set(
                    pos,
                    first + (i + k) as u64,
                    h.try_into().expect("32-byte hash"),
                );
            }
            drop(c);
            out.extend_from_slice(&hashed);
            i = j;
        }
        Ok(out)
    }

    /// The disk a hash request names, once its range is usable.
    fn hashable(&self, disk: u32, offset: u64, chunk_size: u32, count: u32) -> Result<&Disk> {
        let d = self.disk(disk)?;
        if chunk_size == 0 || chunk_size > MAX_CHUNK {
            return Err(MtError::InvalidArgument(format!(
                "chunk size {chunk_size} is not usable (1 byte to {MAX_CHUNK})"
            )));
        }
        if count > MAX_COUNT {
            return Err(MtError::InvalidArgument(format!(
                "{count} chunks in one request is too many (at most {MAX_COUNT}); split the request"
            )));
        }
        if offset > d.size() {
            return Err(MtError::InvalidArgument(format!(
                "offset {offset} is past the end of disk {} ({}) of replication {}, which has {} bytes",
                d.index(), d.name(), self.id(), d.size()
            )));
        }
        Ok(d)
    }

    /// blake3 of `count` chunks of disk `disk` from `offset` as they were at
    /// recovery point `point_id` (the newest point of that id), read through
    /// its view. A point whose journals are damaged is refused (DATA_LOSS).
    pub fn chunk_hashes_at_point(
        &self,
        point_id: &str,
        disk: u32,
        offset: u64,
        chunk_size: u32,
        count: u32,
    ) -> Result<Vec<u8>> {
        let inner = self.read_inner()?;
        let d = self.hashable(disk, offset, chunk_size, count)?;
        let p = inner.points().by_id(point_id).cloned().ok_or_else(|| {
            MtError::NotFound(format!(
                "replication {} (machine {}) has no recovery point {point_id:?}: it was never cut or has expired from retention; verify again (a new point)",
                self.id(),
                self.machine_id()
            ))
        })?;
        inner.journal().check_point(p.interval)?;
        let size = d.size();
        let mut buf = vec![0u8; chunk_size as usize];
        let mut out = Vec::with_capacity(count as usize * 32);
        for i in 0..u64::from(count) {
            let off = offset + i * u64::from(chunk_size);
            if off >= size {
                break;
            }
            let len = u64::from(chunk_size).min(size - off) as usize;
            self.read_at_interval(&inner, d, off, &mut buf[..len], p.interval, &p.id)?;
            out.extend_from_slice(&chunk_hash(&buf[..len]));
        }
        // What the replica holds may not be what apply wrote there (that is
        // what a verify looks for): its next resync reads it again.
        if let Some(pos) = self.replica_disks().iter().position(|x| x.index() == disk) {
            let len = (u64::from(count) * u64::from(chunk_size)).min(size - offset);
            inner.cached_hashes().forget_range(pos, offset, len);
        }
        Ok(out)
    }

    /// Waits until recovery point `point_id` exists, cut at `min_seq` or
    /// later; UNAVAILABLE after `timeout`.
    pub async fn wait_point(&self, point_id: &str, min_seq: u64, timeout: Duration) -> Result<()> {
        let mut rx = self.subscribe_applied();
        let has = || {
            self.read_summary()
                .points()
                .by_id(point_id)
                .is_some_and(|p| p.seq >= min_seq)
        };
        let waited = tokio::time::timeout(timeout, async {
            while !has() {
                if rx.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await;
        match waited {
            Ok(true) => Ok(()),
            Ok(false) => Err(MtError::ShuttingDown {
                replication: self.id().to_string(),
            }),
            Err(_) => Err(MtError::Unavailable(format!(
                "replication {} (machine {}) has no recovery point {point_id:?} at seq {min_seq} or later after {} s (applied up to seq {}): the process server has not forwarded the point yet, check its stream to the MT and verify again",
                self.id(),
                self.machine_id(),
                timeout.as_secs(),
                self.applied_seq()
            ))),
        }
    }

    /// How many first-level chunk hashes the cache knows.
    #[cfg(test)]
    pub(crate) fn cached_chunk_hashes(&self) -> u64 {
        self.read_summary().cached_hashes().known()
    }

    /// Waits until the applied seq reaches `min`; UNAVAILABLE after `timeout`.
    pub async fn wait_applied(&self, min: u64, timeout: Duration) -> Result<u64> {
        let mut rx = self.subscribe_applied();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|&s| s >= min)).await;
        match waited {
            Ok(Ok(s)) => Ok(*s),
            Ok(Err(_)) => Err(MtError::ShuttingDown {
                replication: self.id().to_string(),
            }),
            Err(_) => Err(MtError::Unavailable(format!(
                "replication {}: the MT has applied up to seq {} but the hashes were asked for seq {min}; waited {} s: the process server has not forwarded everything yet, check its stream to the MT and retry",
                self.id(),
                self.applied_seq(),
                timeout.as_secs()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::error::MtError;
    use crate::tests::{applied, applied_history, Gen, SIZES};
    use rebound_common::chunk::chunk_hash;
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    const SUB: u32 = 64 << 10;

    /// The hashes a view of `disk` content gives, in chunks of `chunk`.
    fn hashes_of(disk: &[u8], chunk: u32) -> Vec<u8> {
        disk.chunks(chunk as usize).flat_map(chunk_hash).collect()
    }

    fn chunks(size: u64, chunk: u32) -> u32 {
        size.div_ceil(u64::from(chunk)) as u32
    }

    #[test]
    fn hashes_at_a_point_are_those_of_its_view() {
        let (g, _dir, _s, r) = applied_history(21, 40);
        for p in r.points() {
            for (d, want) in g.snap(&p.id).iter().enumerate() {
                let n = chunks(SIZES[d], SUB);
                let got = r.chunk_hashes_at_point(&p.id, d as u32, 0, SUB, n).unwrap();
                assert_eq!(got, hashes_of(want, SUB), "disk {d} at point {}", p.id);
                // A range from the middle, and one chunk of 1 MiB.
                let got = r
                    .chunk_hashes_at_point(&p.id, d as u32, u64::from(SUB), SUB, 2)
                    .unwrap();
                assert_eq!(got, hashes_of(&want[SUB as usize..3 * SUB as usize], SUB));
                let got = r
                    .chunk_hashes_at_point(&p.id, d as u32, 0, 1 << 20, 1)
                    .unwrap();
                assert_eq!(got, chunk_hash(&want[..want.len().min(1 << 20)]));
            }
        }
        let e = r.chunk_hashes_at_point("nope", 0, 0, SUB, 1).unwrap_err();
        assert!(
            matches!(&e, MtError::NotFound(m) if m.contains("\"nope\"")),
            "{e}"
        );
    }

    #[test]
    fn a_replica_changed_under_the_mt_shows_at_the_point_and_in_the_next_resync() {
        let mut g = Gen::new(5);
        g.write(0, 0, SIZES[0], false);
        g.tag("a");
        let (_dir, _s, r) = applied(&g, 10);
        let n = chunks(SIZES[0], SUB);
        let good = hashes_of(&g.snap("a")[0], SUB);
        // The initial copy wrote whole chunks: the cache knows them.
        assert_eq!(r.chunk_hashes(0, 0, 1 << 20, 1).unwrap(), good_mib(&g));
        let path = r.disks()[0].3.clone();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0x5a; 3], 3 * u64::from(SUB) + 10).unwrap();
        // The cache still says what apply wrote; the view reads the replica.
        assert_eq!(r.chunk_hashes(0, 0, 1 << 20, 1).unwrap(), good_mib(&g));
        let at = r.chunk_hashes_at_point("a", 0, 0, SUB, n).unwrap();
        let differ: Vec<usize> = (0..n as usize)
            .filter(|&i| at[i * 32..i * 32 + 32] != good[i * 32..i * 32 + 32])
            .collect();
        assert_eq!(differ, vec![3]);
        // The verify made the MT forget its cached hashes of those chunks:
        // a repair's resync compares with what the replica holds.
        r.chunk_hashes_at_point("a", 0, 0, 1 << 20, 1).unwrap();
        assert_ne!(r.chunk_hashes(0, 0, 1 << 20, 1).unwrap(), good_mib(&g));
    }

    fn good_mib(g: &Gen) -> Vec<u8> {
        chunk_hash(&g.snap("a")[0][..1 << 20]).to_vec()
    }

    #[test]
    fn a_point_needing_a_damaged_journal_is_refused() {
        let (g, dir, s, r) = applied_history(23, 10);
        let points = r.points();
        // p2 closes interval n: its journal is needed by p0 and p1 only.
        let n = points[2].interval;
        let path = r.root().join(format!("retention/interval-{n}.undo"));
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x20;
        drop((r, s));
        std::fs::write(&path, bytes).unwrap();
        let (_s, r) = crate::tests::open_store(dir.path());
        let e = r
            .chunk_hashes_at_point(&points[1].id, 0, 0, SUB, 1)
            .unwrap_err();
        assert!(matches!(e, MtError::Journal(_)), "{e}");
        assert!(e.to_string().contains("cannot be rebuilt exactly"), "{e}");
        let p = &points[3].id;
        let got = r.chunk_hashes_at_point(p, 0, 0, SUB, 2).unwrap();
        assert_eq!(got, hashes_of(&g.snap(p)[0][..2 * SUB as usize], SUB));
    }

    #[test]
    fn waiting_for_a_point_is_bounded() {
        let (g, _dir, _s, r) = applied_history(22, 40);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let p = r.points().last().cloned().unwrap();
        rt.block_on(r.wait_point(&p.id, p.seq, Duration::from_secs(1)))
            .unwrap();
        let e = rt
            .block_on(r.wait_point(&p.id, g.seq() + 1, Duration::from_millis(200)))
            .unwrap_err();
        assert!(
            matches!(&e, MtError::Unavailable(m) if m.contains(&p.id)),
            "{e}"
        );
        let e = rt
            .block_on(r.wait_point("later", 0, Duration::from_millis(200)))
            .unwrap_err();
        assert!(matches!(e, MtError::Unavailable(_)), "{e}");
    }
}
