//! Chunk hashes over a replica as it is now, for the agent's differential
//! resync (DESIGN.md §5 "Resync source", §7 "Chunk hashes").
//!
//! The hashes must reflect every record the agent already handed over, so
//! the request names a seq and the MT waits (bounded) until it has applied
//! that far.
//!
//! The hashes are those of [`rebound_common::chunk::chunk_hashes`] (the
//! contract with the agent). A range inside the replica file is hashed
//! through a read-only mapping (no copy out of the page cache, which cost
//! 40% of the hashing); otherwise small chunks are read several per
//! `pread`. All-zero chunks (a new, sparse replica) are answered with the
//! zero hash of their length, computed once: checking for zeroes is several
//! times cheaper than blake3. The replication's read lock is held
//! throughout, so no apply writes the replica meanwhile.

use crate::error::{io_err, MtError, Result};
use crate::replication::Replication;
use rebound_common::chunk::{is_zero, read_full_at, CHUNK_SIZE, SUB_CHUNK_SIZE};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
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
        hash_chunks(&d.file, d.size, offset, chunk_size, count).map_err(io_err(|| {
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

/// Most bytes read per `pread` (at least one chunk): cache-sized, so each
/// chunk is hashed while it is still in cache.
const READ_SPAN: u64 = 1 << 20;
/// Most bytes mapped at once.
const MAP_SPAN: u64 = 4 << 20;

/// blake3 of `len` zero bytes; those of a whole chunk and sub-chunk are
/// computed once.
fn zero_hash(len: u64) -> [u8; 32] {
    static CHUNK: OnceLock<[u8; 32]> = OnceLock::new();
    static SUB: OnceLock<[u8; 32]> = OnceLock::new();
    let compute = |len: u64| {
        let zeros = [0u8; 4096];
        let mut h = blake3::Hasher::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            h.update(&zeros[..n]);
            left -= n as u64;
        }
        *h.finalize().as_bytes()
    };
    match len {
        CHUNK_SIZE => *CHUNK.get_or_init(|| compute(CHUNK_SIZE)),
        SUB_CHUNK_SIZE => *SUB.get_or_init(|| compute(SUB_CHUNK_SIZE)),
        _ => compute(len),
    }
}

/// Same result as [`rebound_common::chunk::chunk_hashes`]: blake3 of `count`
/// chunks of `chunk_size` from `offset`, each clipped at `disk_size`.
fn hash_chunks(
    file: &File,
    disk_size: u64,
    offset: u64,
    chunk_size: u32,
    count: u32,
) -> io::Result<Vec<u8>> {
    let chunk = u64::from(chunk_size.max(1));
    let end = disk_size.min(offset.saturating_add(u64::from(count) * chunk));
    if offset < end && offset.is_multiple_of(page_size()) && chunk.is_multiple_of(page_size()) {
        let meta = file.metadata()?;
        if meta.is_file() && end <= meta.len() {
            return mapped_hashes(file, disk_size, offset, chunk, count);
        }
    }
    read_hashes(file, disk_size, offset, chunk, count)
}

/// Mapping offsets must be multiples of this.
fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 {
            p as u64
        } else {
            4096
        }
    })
}

/// The hash of one chunk's bytes (zero fast path).
fn hash_one(data: &[u8]) -> [u8; 32] {
    if !data.is_empty() && is_zero(data) {
        zero_hash(data.len() as u64)
    } else {
        *blake3::hash(data).as_bytes()
    }
}

/// A read-only shared mapping of part of a file, unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    /// Maps `len` (> 0) bytes of `file` from the page-aligned `offset`, all
    /// inside the file, with the pages populated up front.
    fn new(file: &File, offset: u64, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh read-only mapping of an open fd; the kernel checks
        // the arguments and the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes until drop.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, once.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// [`hash_chunks`] through mappings of at most [`MAP_SPAN`]; the caller
/// checked that every byte below `disk_size` of the range is in the file.
fn mapped_hashes(
    file: &File,
    disk_size: u64,
    offset: u64,
    chunk: u64,
    count: u32,
) -> io::Result<Vec<u8>> {
    let per_map = (MAP_SPAN / chunk).max(1);
    let mut out = Vec::with_capacity(count as usize * 32);
    let mut i = 0u64;
    while i < u64::from(count) {
        let n = per_map.min(u64::from(count) - i);
        let start = offset + i * chunk;
        let len = disk_size.saturating_sub(start).min(n * chunk) as usize;
        if len == 0 {
            // Wholly past the end of the disk: the empty string.
            for _ in 0..n {
                out.extend_from_slice(blake3::hash(b"").as_bytes());
            }
        } else {
            let map = Mapping::new(file, start, len)?;
            let buf = map.bytes();
            for j in 0..n {
                let s = ((j * chunk) as usize).min(len);
                let e = (((j + 1) * chunk) as usize).min(len);
                out.extend_from_slice(&hash_one(&buf[s..e]));
            }
        }
        i += n;
    }
    Ok(out)
}

/// [`hash_chunks`] by `pread`, bytes past the end of the file as zeroes.
fn read_hashes(
    file: &File,
    disk_size: u64,
    offset: u64,
    chunk: u64,
    count: u32,
) -> io::Result<Vec<u8>> {
    let per_read = (READ_SPAN / chunk).max(1);
    let mut out = Vec::with_capacity(count as usize * 32);
    let mut buf = vec![0u8; (per_read * chunk) as usize];
    let mut i = 0u64;
    while i < u64::from(count) {
        let n = per_read.min(u64::from(count) - i);
        let start = offset + i * chunk;
        let len = disk_size.saturating_sub(start).min(n * chunk) as usize;
        read_full_at(file, &mut buf[..len], start)?;
        for j in 0..n {
            let s = ((j * chunk) as usize).min(len);
            let e = (((j + 1) * chunk) as usize).min(len);
            out.extend_from_slice(&hash_one(&buf[s..e]));
        }
        i += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Byte for byte the agent's contract, for every chunk size and clipping
    /// case: data, zeroes, a short last chunk, chunks past the end.
    #[test]
    fn same_hashes_as_the_contract() {
        let f = tempfile::tempfile().unwrap();
        let size = (3 << 20) + 5000;
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&data, 1 << 20).unwrap();
        f.write_all_at(&[7u8; 100], 3 << 20).unwrap();
        f.set_len(size).unwrap();
        for (chunk, count) in [
            (CHUNK_SIZE as u32, 6),
            (SUB_CHUNK_SIZE as u32, 70),
            (4096, 1000),
            (3000, 7),
        ] {
            for offset in [0, 1 << 20, (3 << 20) - 4096, size, size + 10] {
                let want =
                    rebound_common::chunk::chunk_hashes(&f, size, offset, chunk, count).unwrap();
                let got = hash_chunks(&f, size, offset, chunk, count).unwrap();
                assert_eq!(got, want, "chunk {chunk} count {count} offset {offset}");
                let read = read_hashes(&f, size, offset, u64::from(chunk), count).unwrap();
                assert_eq!(
                    read, want,
                    "pread: chunk {chunk} count {count} offset {offset}"
                );
                let end = size.min(offset + u64::from(count) * u64::from(chunk));
                if offset < end
                    && offset.is_multiple_of(page_size())
                    && u64::from(chunk).is_multiple_of(page_size())
                {
                    let m = mapped_hashes(&f, size, offset, u64::from(chunk), count).unwrap();
                    assert_eq!(
                        m, want,
                        "mapped: chunk {chunk} count {count} offset {offset}"
                    );
                }
            }
        }
        // A replica file shorter than its disk: the rest reads as zeroes.
        f.set_len(size - 8192).unwrap();
        for offset in [0, 2 << 20, 3 << 20] {
            let want = rebound_common::chunk::chunk_hashes(&f, size, offset, 1 << 20, 3).unwrap();
            assert_eq!(hash_chunks(&f, size, offset, 1 << 20, 3).unwrap(), want);
        }
    }
}
