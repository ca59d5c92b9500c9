//! The chunk hashes both sides of a resync compute: the agent over its
//! disk, the MT over the replica. One implementation, so the two compare
//! byte for byte (the contract of DESIGN.md §5 "Resync source").
//!
//! A range inside a regular file is hashed through a read-only mapping (no
//! copy out of the page cache: the copy cost 40% of the hashing); otherwise
//! (a block device, a range past the end of the file) small chunks are read
//! several per `pread`, up to [`READ_SPAN`]. An all-zero chunk (a disk never
//! written there, a new sparse replica) is answered with the zero hash of
//! its length, computed once: checking for zeroes is several times cheaper
//! than blake3. A span of a file that is a hole (`SEEK_DATA` finds no data
//! in it: a new sparse replica) is answered the same way without being
//! read at all: mapping a hole makes the kernel clear a page-cache page per
//! 4 KiB, which cost the MT a fifth of its CPU during an initial sync.
//!
//! A mapping is read while the file may be written, exactly as a `pread`
//! would be: a torn chunk hashes to a value the other side does not hold
//! (the chunk is then compared by sub-chunk and sent). The agent's writes
//! are in the stream after the resync's records anyway; the MT holds its
//! replication's read lock while it hashes. A file truncated under a
//! mapping would raise SIGBUS: neither side truncates a disk it serves.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::sync::OnceLock;

use super::{is_zero, read_full_at, CHUNK_SIZE, SUB_CHUNK_SIZE};
use crate::sys::{page_size, seek_data, Mapping};

/// Most bytes read per `pread` (at least one chunk).
const READ_SPAN: u64 = 1 << 20;
/// Most bytes mapped at once.
const MAP_SPAN: u64 = 4 << 20;

/// blake3 of `len` zero bytes; those of a whole chunk and sub-chunk are
/// computed once.
pub fn zero_hash(len: u64) -> [u8; 32] {
    static CHUNK: OnceLock<[u8; 32]> = OnceLock::new();
    static SUB: OnceLock<[u8; 32]> = OnceLock::new();
    match len {
        CHUNK_SIZE => *CHUNK.get_or_init(|| compute_zero_hash(CHUNK_SIZE)),
        SUB_CHUNK_SIZE => *SUB.get_or_init(|| compute_zero_hash(SUB_CHUNK_SIZE)),
        _ => compute_zero_hash(len),
    }
}

fn compute_zero_hash(len: u64) -> [u8; 32] {
    static ZEROS: [u8; SUB_CHUNK_SIZE as usize] = [0; SUB_CHUNK_SIZE as usize];
    let mut h = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(SUB_CHUNK_SIZE) as usize;
        h.update(&ZEROS[..n]);
        left -= n as u64;
    }
    *h.finalize().as_bytes()
}

/// blake3 of `count` chunks of `chunk_size` bytes of `file` from `offset`,
/// each clipped at `disk_size` (a chunk wholly past the end hashes the empty
/// string); `count * 32` bytes.
pub fn chunk_hashes(
    file: &File,
    disk_size: u64,
    offset: u64,
    chunk_size: u32,
    count: u32,
) -> io::Result<Vec<u8>> {
    let chunks = Chunks::new(disk_size, offset, chunk_size, count);
    let chunk = chunks.chunk;
    let end = disk_size.min(offset.saturating_add(u64::from(count) * chunk));
    if offset < end && offset.is_multiple_of(page_size()) && chunk.is_multiple_of(page_size()) {
        let meta = file.metadata()?;
        let regular = !meta.file_type().is_block_device() && meta.file_type().is_file();
        if regular && end <= meta.len() {
            return mapped_hashes(file, chunks);
        }
    }
    read_hashes(file, chunks)
}

/// The hash of one chunk's bytes, as [`chunk_hashes`] gives it (an all-zero
/// chunk is answered from [`zero_hash`] without hashing).
pub fn chunk_hash(data: &[u8]) -> [u8; 32] {
    if !data.is_empty() && is_zero(data) {
        zero_hash(data.len() as u64)
    } else {
        *blake3::hash(data).as_bytes()
    }
}

/// The chunks one [`chunk_hashes`] call hashes: `count` of `chunk` bytes
/// from `offset`, each clipped at `disk_size`.
#[derive(Clone, Copy)]
struct Chunks {
    disk_size: u64,
    offset: u64,
    chunk: u64,
    count: u32,
}

impl Chunks {
    fn new(disk_size: u64, offset: u64, chunk_size: u32, count: u32) -> Chunks {
        Chunks {
            disk_size,
            offset,
            chunk: u64::from(chunk_size.max(1)),
            count,
        }
    }

    /// Walks the chunks in spans of whole chunks, at most `span` bytes (at
    /// least one chunk) each, calling `hash` with a span's start, its length
    /// clipped at `disk_size`, its chunk count and the hashes so far, which
    /// it extends; returns them all.
    fn hash_spans(
        self,
        span: u64,
        mut hash: impl FnMut(u64, usize, u64, &mut Vec<u8>) -> io::Result<()>,
    ) -> io::Result<Vec<u8>> {
        let per_span = (span / self.chunk).max(1);
        let mut out = Vec::with_capacity(self.count as usize * 32);
        let mut i = 0u64;
        while i < u64::from(self.count) {
            let n = per_span.min(u64::from(self.count) - i);
            let start = self.offset + i * self.chunk;
            let len = self.disk_size.saturating_sub(start).min(n * self.chunk) as usize;
            hash(start, len, n, &mut out)?;
            i += n;
        }
        Ok(out)
    }
}

/// [`chunk_hashes`] through mappings of at most [`MAP_SPAN`]; the caller
/// checked that every byte below `disk_size` of the range is in the file.
fn mapped_hashes(file: &File, chunks: Chunks) -> io::Result<Vec<u8>> {
    let chunk = chunks.chunk;
    chunks.hash_spans(MAP_SPAN, |start, len, n, out| {
        if len == 0 {
            // Wholly past the end of the disk: the empty string each.
            hash_span(&[], chunk, n, out);
        } else if is_hole(file, start, len as u64) {
            zero_span(len as u64, chunk, n, out);
        } else {
            let map = Mapping::new(file, start, len)?;
            hash_span(map.bytes(), chunk, n, out);
        }
        Ok(())
    })
}

/// [`chunk_hashes`] by `pread`, bytes past the end of the file as zeroes.
fn read_hashes(file: &File, chunks: Chunks) -> io::Result<Vec<u8>> {
    let chunk = chunks.chunk;
    let mut buf = vec![0u8; ((READ_SPAN / chunk).max(1) * chunk) as usize];
    chunks.hash_spans(READ_SPAN, |start, len, n, out| {
        read_full_at(file, &mut buf[..len], start)?;
        hash_span(&buf[..len], chunk, n, out);
        Ok(())
    })
}

/// Whether `len` bytes of `file` from `start` are all a hole (read as
/// zeroes). Moves the file offset, which nobody uses: disks and replicas are
/// read and written at explicit offsets. `false` when unsure (a file system
/// without `SEEK_DATA`, which then reports everything as data).
fn is_hole(file: &File, start: u64, len: u64) -> bool {
    match seek_data(file, start) {
        Ok(next_data) => next_data >= start.saturating_add(len),
        // ENXIO: no data at or after `start`.
        Err(e) => e.raw_os_error() == Some(libc::ENXIO),
    }
}

/// Appends the hashes of `n` chunks of `chunk` bytes of zeroes, the span
/// holding `len` bytes, each chunk clipped at its end, as [`hash_span`]
/// would give them for `len` zero bytes.
fn zero_span(len: u64, chunk: u64, n: u64, out: &mut Vec<u8>) {
    for j in 0..n {
        let l = ((j + 1) * chunk)
            .min(len)
            .saturating_sub((j * chunk).min(len));
        out.extend_from_slice(&chunk_hash_of_zeros(l));
    }
}

/// [`chunk_hash`] of `len` zero bytes.
fn chunk_hash_of_zeros(len: u64) -> [u8; 32] {
    if len == 0 {
        chunk_hash(&[])
    } else {
        zero_hash(len)
    }
}

/// Appends the hashes of `n` chunks of `chunk` bytes laid out from the
/// start of `buf`, each clipped at its end (a chunk wholly past it hashes
/// the empty string).
fn hash_span(buf: &[u8], chunk: u64, n: u64, out: &mut Vec<u8>) {
    for j in 0..n {
        let s = ((j * chunk) as usize).min(buf.len());
        let e = (((j + 1) * chunk) as usize).min(buf.len());
        out.extend_from_slice(&chunk_hash(&buf[s..e]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// The definition: each chunk read whole (clipped at the disk's end,
    /// bytes past the file's end as zeroes) and hashed.
    fn reference(file: &File, disk_size: u64, offset: u64, chunk: u32, count: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk as usize];
        for i in 0..u64::from(count) {
            let start = offset + i * u64::from(chunk);
            let len = disk_size.saturating_sub(start).min(u64::from(chunk)) as usize;
            read_full_at(file, &mut buf[..len], start).unwrap();
            out.extend_from_slice(blake3::hash(&buf[..len]).as_bytes());
        }
        out
    }

    /// Every path (mapped, pread) gives the definition's bytes, for every
    /// chunk size and clipping case: data, zeroes, a short last chunk,
    /// chunks past the end, a file shorter than its disk.
    #[test]
    fn every_path_matches_the_definition() {
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
                let want = reference(&f, size, offset, chunk, count);
                let got = chunk_hashes(&f, size, offset, chunk, count).unwrap();
                assert_eq!(got, want, "chunk {chunk} count {count} offset {offset}");
                let read = read_hashes(&f, Chunks::new(size, offset, chunk, count)).unwrap();
                assert_eq!(
                    read, want,
                    "pread: chunk {chunk} count {count} offset {offset}"
                );
                let end = size.min(offset + u64::from(count) * u64::from(chunk));
                if offset < end
                    && offset.is_multiple_of(page_size())
                    && u64::from(chunk).is_multiple_of(page_size())
                {
                    let m = mapped_hashes(&f, Chunks::new(size, offset, chunk, count)).unwrap();
                    assert_eq!(
                        m, want,
                        "mapped: chunk {chunk} count {count} offset {offset}"
                    );
                }
            }
        }
        // Whole mapped spans that are holes, around one that has data.
        let sparse = tempfile::tempfile().unwrap();
        let sparse_size = (24 << 20) + 5000;
        sparse.set_len(sparse_size).unwrap();
        sparse.write_all_at(&data, 9 << 20).unwrap();
        assert!(
            is_hole(&sparse, 0, 8 << 20),
            "SEEK_DATA finds no hole in a new sparse file: the hole path is not tested"
        );
        assert!(!is_hole(&sparse, 8 << 20, 2 << 20));
        for (chunk, count) in [(CHUNK_SIZE as u32, 30), (SUB_CHUNK_SIZE as u32, 400)] {
            for offset in [0, 8 << 20, 20 << 20] {
                let want = reference(&sparse, sparse_size, offset, chunk, count);
                let chunks = Chunks::new(sparse_size, offset, chunk, count);
                let m = mapped_hashes(&sparse, chunks).unwrap();
                assert_eq!(
                    m, want,
                    "sparse: chunk {chunk} count {count} offset {offset}"
                );
            }
        }

        let short = size - 8192;
        f.set_len(short).unwrap();
        for offset in [0, 2 << 20, 3 << 20] {
            let want = reference(&f, size, offset, 1 << 20, 3);
            assert_eq!(chunk_hashes(&f, size, offset, 1 << 20, 3).unwrap(), want);
        }
        assert_eq!(zero_hash(3), *blake3::hash(&[0, 0, 0]).as_bytes());
        assert_eq!(
            zero_hash(CHUNK_SIZE),
            *blake3::hash(&vec![0u8; 1 << 20]).as_bytes()
        );
        assert_eq!(
            zero_hash(SUB_CHUNK_SIZE),
            *blake3::hash(&vec![0u8; 64 << 10]).as_bytes()
        );
    }
}
