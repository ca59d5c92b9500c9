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
//! replica meanwhile.

use crate::error::{io_err, MtError, Result};
use crate::replication::Replication;
use rebound_common::chunk::chunk_hashes;
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
        let _inner = self.read_inner();
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
        if offset > d.size {
            return Err(MtError::InvalidArgument(format!(
                "offset {offset} is past the end of disk {} ({}) of replication {}, which has {} bytes",
                d.index, d.name, self.id, d.size
            )));
        }
        chunk_hashes(&d.file, d.size, offset, chunk_size, count).map_err(io_err(|| {
            format!(
                "cannot hash replica {} of replication {} at offset {offset}",
                d.path.display(),
                self.id
            )
        }))
    }

    /// Waits until the applied seq reaches `min`; UNAVAILABLE after `timeout`.
    pub async fn wait_applied(&self, min: u64, timeout: Duration) -> Result<u64> {
        let mut rx = self.subscribe_applied();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|&s| s >= min)).await;
        match waited {
            Ok(Ok(s)) => Ok(*s),
            Ok(Err(_)) => Err(MtError::Internal(format!(
                "replication {} is shutting down",
                self.id
            ))),
            Err(_) => Err(MtError::Unavailable(format!(
                "replication {}: the MT has applied up to seq {} but the hashes were asked for seq {min}; waited {} s: the process server has not forwarded everything yet, check its stream to the MT and retry",
                self.id,
                self.applied_seq(),
                timeout.as_secs()
            ))),
        }
    }
}
