//! Block hashing for resync (DESIGN.md §5 "Resync source").
//!
//! Both sides of a resync hash the same fixed chunks with blake3, so only
//! chunks whose hashes differ travel. The sizes here are the contract between
//! the agent and the master target.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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

/// blake3 of `count` chunks of `chunk_size` starting at `offset`, each
/// clipped at `disk_size`; `count * 32` bytes. A chunk entirely past the end
/// of the disk hashes the empty string.
pub fn chunk_hashes(
    file: &File,
    disk_size: u64,
    offset: u64,
    chunk_size: u32,
    count: u32,
) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(count as usize * 32);
    let mut buf = vec![0u8; chunk_size as usize];
    for i in 0..count as u64 {
        let start = offset + i * chunk_size as u64;
        let len = disk_size.saturating_sub(start).min(chunk_size as u64) as usize;
        read_full_at(file, &mut buf[..len], start)?;
        out.extend_from_slice(blake3::hash(&buf[..len]).as_bytes());
    }
    Ok(out)
}

/// True when every byte is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let (pre, mid, post) = unsafe { buf.align_to::<u128>() };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn hashes_clip_at_disk_end() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![1u8; 3000]).unwrap();
        let h = chunk_hashes(&f, 3000, 0, 2048, 3).unwrap();
        assert_eq!(h.len(), 96);
        assert_eq!(&h[..32], blake3::hash(&[1u8; 2048]).as_bytes());
        assert_eq!(&h[32..64], blake3::hash(&[1u8; 952]).as_bytes());
        assert_eq!(&h[64..], blake3::hash(b"").as_bytes());
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4097];
        assert!(is_zero(&v));
        v[4096] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }
}
