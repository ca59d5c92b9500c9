//! Leaving the page cache of a protected disk as a resync scan found it.
//!
//! A resync hashes the whole disk. The pages that scan brings into the cache
//! (large folios, from the mapping and read-ahead) made the machine's later
//! 4 KiB writes much dearer: fio 4k QD32 through the agent did 8-10k IOPS
//! after an initial sync and 15-19k once those pages were dropped
//! (docs/BENCHMARKS.md). Pages that were cached before the
//! scan are the workload's own and stay. So before a batch is hashed the
//! agent notes which of its pages are cached ([`Residency::take`], `mincore`
//! over a mapping made without reading anything), and once the batch is
//! hashed and what differs is read into the buffer, it lets the kernel drop
//! the others ([`Residency::restore`], `posix_fadvise(DONTNEED)`).
//!
//! Only advice to the kernel: DONTNEED drops clean pages and starts
//! writeback of dirty ones, so nothing written is lost, and a failure of
//! either call only leaves the cache as it is.

use std::fs::File;

use crate::sys;

const PAGE: u64 = 4096;

/// Which pages of a range of a file were in the page cache.
#[derive(Debug)]
pub struct Residency {
    offset: u64,
    /// One entry per page; bit 0 set = cached.
    cached: Vec<u8>,
}

impl Residency {
    /// Which pages of `len` bytes from the page-aligned `offset` are cached
    /// now. `None` when it cannot be told (the range is not page-aligned,
    /// or the mapping fails): then [`Residency::restore`] is never called.
    pub fn take(file: &File, offset: u64, len: u64) -> Option<Residency> {
        if len == 0 || !offset.is_multiple_of(PAGE) || page_size() != PAGE {
            return None;
        }
        let len = len.div_ceil(PAGE) * PAGE;
        let cached = sys::resident_pages(file, offset, len, PAGE)?;
        Some(Residency { offset, cached })
    }

    /// Drops from the cache each run of pages that was not cached when
    /// [`Residency::take`] looked.
    pub fn restore(&self, file: &File) {
        let mut i = 0;
        while i < self.cached.len() {
            if self.cached[i] & 1 == 1 {
                i += 1;
                continue;
            }
            let start = i;
            while i < self.cached.len() && self.cached[i] & 1 == 0 {
                i += 1;
            }
            let off = self.offset + start as u64 * PAGE;
            let len = (i - start) as u64 * PAGE;
            sys::fadvise(file, off, len, libc::POSIX_FADV_DONTNEED);
        }
    }

    /// Pages of the range that were cached.
    pub fn cached_pages(&self) -> usize {
        self.cached.iter().filter(|&&b| b & 1 == 1).count()
    }
}

fn page_size() -> u64 {
    sys::page_size().unwrap_or(PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A scan of a range whose first MiB was cached leaves exactly that MiB
    /// cached, and the data reads back unchanged.
    #[test]
    fn restore_drops_only_what_the_scan_brought_in() {
        let f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&data, 0).unwrap();
        f.sync_data().unwrap();
        // No read-ahead: a read caches exactly the pages it reads.
        sys::fadvise(&f, 0, 0, libc::POSIX_FADV_RANDOM);
        // Start from nothing cached, then cache the first MiB.
        Residency {
            offset: 0,
            cached: vec![0; 2048],
        }
        .restore(&f);
        let none = Residency::take(&f, 0, 8 << 20).unwrap();
        assert_eq!(
            none.cached_pages(),
            0,
            "DONTNEED on clean pages left them cached: this filesystem ignores it"
        );
        let mut buf = vec![0u8; 1 << 20];
        f.read_exact_at(&mut buf, 0).unwrap();
        let before = Residency::take(&f, 0, 8 << 20).unwrap();
        assert_eq!(before.cached_pages(), 256);

        // The scan reads everything, then restores.
        let mut back = vec![0u8; 8 << 20];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(
            Residency::take(&f, 0, 8 << 20).unwrap().cached_pages(),
            2048
        );
        before.restore(&f);
        let after = Residency::take(&f, 0, 8 << 20).unwrap();
        assert_eq!(after.cached_pages(), 256);
        assert!(after.cached[..256].iter().all(|b| b & 1 == 1));
        assert_eq!(back, data);

        assert!(Residency::take(&f, 100, 4096).is_none());
        assert!(Residency::take(&f, 0, 0).is_none());
    }
}
