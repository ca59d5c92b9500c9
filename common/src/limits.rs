//! What a peer may announce (DESIGN.md §3, §5): the caps a process server
//! and a master target check before they store or compute anything a hello
//! or a request names. A number a client chooses freely is a way in: a
//! hello with a million disks makes the servers allocate for each, and a
//! chunk-hash request with 1-byte chunks turns each 32-byte hash into one
//! byte of the replica. Both sides refuse with the same words.

use crate::chunk::{CHUNK_SIZE, SUB_CHUNK_SIZE};
use thiserror::Error;

/// Most disks one replication (one machine) may have.
pub const MAX_DISKS: usize = 64;

/// The chunk sizes of the resync protocol: the first-level chunk and the
/// sub-chunk of a chunk that differs. Nothing else is ever asked.
pub const RESYNC_CHUNK_SIZES: [u64; 2] = [CHUNK_SIZE, SUB_CHUNK_SIZE];

/// An announcement outside the caps.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("the hello of replication {replication:?} (machine {machine:?}) names {disks} disks; at most {MAX_DISKS} are allowed: protect the machine with fewer disks")]
    TooManyDisks {
        replication: String,
        machine: String,
        disks: usize,
    },
    #[error("chunk hashes of replication {replication:?} asked with a chunk size of {chunk_size} bytes; the resync protocol uses only {CHUNK_SIZE} and {SUB_CHUNK_SIZE}: upgrade the agent")]
    ChunkSize {
        replication: String,
        chunk_size: u32,
    },
}

/// Refuses a hello that names more than [`MAX_DISKS`] disks.
pub fn check_disks(replication: &str, machine: &str, disks: usize) -> Result<(), LimitError> {
    if disks > MAX_DISKS {
        return Err(LimitError::TooManyDisks {
            replication: replication.to_string(),
            machine: machine.to_string(),
            disks,
        });
    }
    Ok(())
}

/// Refuses a chunk size the resync protocol does not use.
pub fn check_chunk_size(replication: &str, chunk_size: u32) -> Result<(), LimitError> {
    if !RESYNC_CHUNK_SIZES.contains(&u64::from(chunk_size)) {
        return Err(LimitError::ChunkSize {
            replication: replication.to_string(),
            chunk_size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_protocols_chunk_sizes_and_a_bounded_disk_count_pass() {
        assert!(check_chunk_size("r", 1 << 20).is_ok());
        assert!(check_chunk_size("r", 64 << 10).is_ok());
        for bad in [0, 1, 4096, 2 << 20] {
            let e = check_chunk_size("r", bad).unwrap_err();
            assert!(e.to_string().contains("uses only 1048576 and 65536"), "{e}");
        }
        assert!(check_disks("r", "m", MAX_DISKS).is_ok());
        let e = check_disks("r", "m", MAX_DISKS + 1).unwrap_err();
        assert!(e.to_string().contains("65 disks; at most 64"), "{e}");
    }
}
