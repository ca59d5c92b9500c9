//! Block hashing for resync (DESIGN.md §5 "Resync source").
//!
//! Both sides of a resync hash the same fixed chunks with blake3, so only
//! chunks whose hashes differ travel. The sizes here are the contract between
//! the agent and the master target.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

mod hashes;
pub use hashes::{chunk_hash, chunk_hashes, zero_hash};

/// Granularity of the retention journal's undo records.
pub const BLOCK_SIZE: u64 = 4096;
/// First-level resync chunk.
pub const CHUNK_SIZE: u64 = 1 << 20;
/// Second-level resync chunk, for chunks that differ.
pub const SUB_CHUNK_SIZE: u64 = 64 << 10;
/// Granularity of the agent's dirty-extent log.
pub const EXTENT_SIZE: u64 = 1 << 20;

/// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the
/// file read as zeroes (a sparse replica may be shorter than its disk).
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// True when every byte is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    // OR-ing fixed 16-byte words lets the compiler test a word at a time.
    let mut words = buf.chunks_exact(16);
    words.all(|w| w.iter().fold(0, |acc, &b| acc | b) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4097];
        assert!(is_zero(&v));
        v[4096] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }
}
