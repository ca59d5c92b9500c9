//! The chunk hashes the MT already knows of its replicas, so that a
//! differential resync does not read and hash the whole replica again
//! (DESIGN.md §5 "Resync source", §7 "Chunk hashes").
//!
//! A differential resync compares every 1 MiB chunk of a disk: the agent
//! hashes its disk, the MT its replica, each a full read and blake3 pass.
//! The MT can know most of its answer before it is asked: apply writes every
//! chunk that an initial resync sends whole and hashes it on the way (one
//! blake3 pass over bytes it holds in memory anyway), and a chunk hashed for
//! one resync answers the next one if nothing wrote it since.
//!
//! The cache is kept correct by construction, not by checking:
//! - it lives in the replication's `Inner`, behind the lock every write to
//!   the replica takes: apply forgets a chunk before it writes into it and
//!   records the new hash only after the write succeeded, and only when the
//!   write covered the whole chunk (a partial write just forgets);
//! - hashes read from the replica are stored while the read lock is held,
//!   so no apply comes between the read and the store;
//! - a rollback, a restore of pre-images, a hand-over (the replica then
//!   belongs to the machine booted from it) and the end of the replication
//!   forget everything, and the cache is not used in those states;
//! - a verify (hashes at a recovery point) forgets the chunks it asked: it
//!   looks for a replica changed by other than apply, which the cache
//!   cannot know of, and a repair's resync must compare with the replica;
//! - it is memory only: a restarted MT, and a reload after an IO error,
//!   start with it empty, so nothing stale survives a crash.
//!
//! Cost: 32 bytes and a bit per 1 MiB chunk, allocated when a disk's first
//! hash is stored; only the first [`MAX_CHUNKS`] chunks of a disk are kept
//! (8 MiB of cache for a disk of 256 GiB or more), the rest are hashed from
//! the replica every time, as without the cache.

use rebound_common::chunk::{chunk_hash, zero_hash, CHUNK_SIZE};

/// Chunks cached per disk: its first 256 GiB.
pub const MAX_CHUNKS: u64 = 1 << 18;

/// Known chunk hashes of every disk of one replication, by disk position.
#[derive(Debug)]
pub(crate) struct HashCache {
    disks: Vec<DiskHashes>,
}

#[derive(Debug)]
struct DiskHashes {
    size: u64,
    /// Allocated on the first store.
    hashes: Vec<[u8; 32]>,
    /// One bit per chunk: `hashes[i]` holds chunk i's hash.
    known: Vec<u64>,
}

impl DiskHashes {
    fn cached_chunks(&self) -> u64 {
        self.size.div_ceil(CHUNK_SIZE).min(MAX_CHUNKS)
    }

    /// Length of chunk `c` (the last one is short at the end of the disk).
    fn chunk_len(&self, c: u64) -> u64 {
        CHUNK_SIZE.min(self.size.saturating_sub(c * CHUNK_SIZE))
    }

    fn get(&self, c: u64) -> Option<[u8; 32]> {
        let i = usize::try_from(c).ok()?;
        let word = *self.known.get(i / 64)?;
        (word >> (i % 64) & 1 == 1).then(|| self.hashes[i])
    }

    fn set(&mut self, c: u64, hash: [u8; 32]) {
        if c >= self.cached_chunks() {
            return;
        }
        if self.hashes.is_empty() {
            let n = self.cached_chunks() as usize;
            self.hashes = vec![[0; 32]; n];
            self.known = vec![0; n.div_ceil(64)];
        }
        let i = c as usize;
        self.hashes[i] = hash;
        self.known[i / 64] |= 1 << (i % 64);
    }

    fn forget(&mut self, c: u64) {
        let i = c as usize;
        if let Some(w) = self.known.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
    }

    /// The chunks `offset..offset+len` touches, clipped to the cached ones.
    fn touched(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / CHUNK_SIZE;
        let last = (offset + len - 1) / CHUNK_SIZE;
        first.min(self.cached_chunks())..(last + 1).min(self.cached_chunks())
    }

    /// Whether `offset..offset+len` covers all of chunk `c`.
    fn covers(&self, c: u64, offset: u64, len: u64) -> bool {
        let start = c * CHUNK_SIZE;
        offset <= start && start + self.chunk_len(c) <= offset + len
    }
}

impl HashCache {
    /// An empty cache for disks of these sizes, in disk position order.
    pub fn new(sizes: impl IntoIterator<Item = u64>) -> HashCache {
        HashCache {
            disks: sizes
                .into_iter()
                .map(|size| DiskHashes {
                    size,
                    hashes: Vec::new(),
                    known: Vec::new(),
                })
                .collect(),
        }
    }

    /// Chunk `chunk`'s hash of the disk at `pos`, when known.
    pub fn get(&self, pos: usize, chunk: u64) -> Option<[u8; 32]> {
        self.disks.get(pos)?.get(chunk)
    }

    /// Records chunk `chunk`'s hash of the disk at `pos`, read from the
    /// replica while no write could happen (chunks past the end of the disk
    /// or the cap are not kept).
    pub fn set(&mut self, pos: usize, chunk: u64, hash: [u8; 32]) {
        if let Some(d) = self.disks.get_mut(pos) {
            d.set(chunk, hash);
        }
    }

    /// Before a write of `offset..offset+len`: forgets every chunk it
    /// touches.
    pub fn forget_range(&mut self, pos: usize, offset: u64, len: u64) {
        let Some(d) = self.disks.get_mut(pos) else {
            return;
        };
        if d.known.is_empty() {
            return;
        }
        for c in d.touched(offset, len) {
            d.forget(c);
        }
    }

    /// After `data` was written at `offset`: records the hash of every
    /// chunk it covers whole (the others were forgotten before the write).
    pub fn wrote(&mut self, pos: usize, offset: u64, data: &[u8]) {
        let Some(d) = self.disks.get_mut(pos) else {
            return;
        };
        for c in d.touched(offset, data.len() as u64) {
            if d.covers(c, offset, data.len() as u64) {
                let s = (c * CHUNK_SIZE - offset) as usize;
                let hash = chunk_hash(&data[s..s + d.chunk_len(c) as usize]);
                d.set(c, hash);
            }
        }
    }

    /// After `offset..offset+len` was zeroed: records the zero hash of every
    /// chunk it covers whole.
    pub fn zeroed(&mut self, pos: usize, offset: u64, len: u64) {
        let Some(d) = self.disks.get_mut(pos) else {
            return;
        };
        for c in d.touched(offset, len) {
            if d.covers(c, offset, len) {
                let hash = zero_hash(d.chunk_len(c));
                d.set(c, hash);
            }
        }
    }

    /// Forgets every hash (the replica was changed by other than apply).
    pub fn clear(&mut self) {
        for d in &mut self.disks {
            d.hashes = Vec::new();
            d.known = Vec::new();
        }
    }

    /// How many chunk hashes are known.
    #[cfg(test)]
    pub fn known(&self) -> u64 {
        self.disks
            .iter()
            .flat_map(|d| d.known.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn data(len: u64, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn whole_chunks_are_recorded_partial_ones_forgotten() {
        // 3.5 chunks: the last one is short.
        let mut c = HashCache::new([3 * MIB + MIB / 2]);
        let d = data(2 * MIB, 7);
        c.wrote(0, MIB, &d);
        assert_eq!(c.get(0, 0), None);
        assert_eq!(c.get(0, 1), Some(chunk_hash(&d[..MIB as usize])));
        assert_eq!(c.get(0, 2), Some(chunk_hash(&d[MIB as usize..])));
        // A write that starts inside chunk 1 and ends inside chunk 2.
        c.forget_range(0, MIB + 4096, MIB);
        c.wrote(0, MIB + 4096, &d[..MIB as usize]);
        assert_eq!(c.get(0, 1), None);
        assert_eq!(c.get(0, 2), None);
        // The short last chunk is covered by a write to the end of the disk.
        let tail = data(MIB / 2, 9);
        c.wrote(0, 3 * MIB, &tail);
        assert_eq!(c.get(0, 3), Some(chunk_hash(&tail)));
        c.zeroed(0, 0, 2 * MIB);
        assert_eq!(c.get(0, 0), Some(zero_hash(MIB)));
        assert_eq!(c.known(), 3);
        c.clear();
        assert_eq!(c.known(), 0);
        assert_eq!(c.get(0, 0), None);
    }

    #[test]
    fn stored_hashes_and_the_cap() {
        let mut c = HashCache::new([(MAX_CHUNKS + 2) * MIB, MIB]);
        c.set(0, MAX_CHUNKS - 1, [1; 32]);
        c.set(0, MAX_CHUNKS, [2; 32]);
        c.set(1, 0, [3; 32]);
        c.set(2, 0, [4; 32]);
        assert_eq!(c.get(0, MAX_CHUNKS - 1), Some([1; 32]));
        assert_eq!(c.get(0, MAX_CHUNKS), None, "past the cap nothing is kept");
        assert_eq!(c.get(1, 0), Some([3; 32]));
        assert_eq!(c.get(2, 0), None, "no such disk");
        c.forget_range(0, (MAX_CHUNKS - 1) * MIB, 3 * MIB);
        assert_eq!(c.get(0, MAX_CHUNKS - 1), None);
    }
}
