//! Chunk hashes over a replica as it is now, for the agent's differential
//! resync (DESIGN.md §5 "Resync source", §7 "Chunk hashes").
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

use crate::error::{io_err, MtError, Result};
use crate::replication::Replication;
use rebound_common::chunk::{chunk_hashes, CHUNK_SIZE};
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
