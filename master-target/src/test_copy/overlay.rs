//! The overlay of one disk of a test copy: what the test machine wrote,
//! kept apart from the replica and the retention journal so replication
//! goes on untouched (DESIGN.md §7 views).
//!
//! `<disk>.overlay` is a sparse file at the disk's offsets holding every
//! 4 KiB block written since the copy started; it grows with what is
//! written and has no size cap. `<disk>.overlay.map` is the written-block
//! bitmap (one bit per block, bit `b % 8` of byte `b / 8`). A block whose
//! bit is clear reads as the pinned point. Writes are whole blocks in the
//! overlay: a partial block is first filled from the overlay or the point
//! (read-modify-write). On flush or FUA the overlay is fdatasynced before
//! the changed part of the map is written and fdatasynced, so a bit that
//! survives a crash always names data that survived it too.

use crate::error::{MtError, Result};
use crate::journal::BLOCK;
use rebound_common::chunk::read_full_at;
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

const BS: u64 = BLOCK as u64;
/// The map is written back in pages of this many bytes (32768 blocks).
const MAP_PAGE: usize = 4096;
/// Largest zero buffer a write_zeroes request is split into.
const ZERO_CHUNK: u64 = 1 << 20;

/// The overlay file and map file of disk `disk` in the test dir `dir`.
pub(crate) fn paths(dir: &Path, disk: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{disk}.overlay")),
        dir.join(format!("{disk}.overlay.map")),
    )
}

/// The written-block bitmap in memory, with the map pages changed since
/// the last flush.
struct Map {
    bits: Vec<u8>,
    dirty: BTreeSet<usize>,
}

impl Map {
    fn get(&self, block: u64) -> bool {
        self.bits
            .get((block / 8) as usize)
            .is_some_and(|b| b & (1 << (block % 8)) != 0)
    }

    fn set(&mut self, block: u64) {
        let i = (block / 8) as usize;
        if let Some(b) = self.bits.get_mut(i) {
            if *b & (1 << (block % 8)) == 0 {
                *b |= 1 << (block % 8);
                self.dirty.insert(i / MAP_PAGE);
            }
        }
    }
}

/// One disk's overlay, shared by every NBD connection to its export.
pub(crate) struct Overlay {
    /// The export name, for errors.
    name: String,
    size: u64,
    data: File,
    data_path: PathBuf,
    map_file: File,
    map_path: PathBuf,
    /// Writers hold it for the whole read-modify-write.
    map: Mutex<Map>,
    /// The copy was cleaned up: every request fails from now on.
    closed: AtomicBool,
}

impl Overlay {
    /// Creates the empty overlay and map files of `disk` in `dir`
    /// (replacing any left from an earlier copy).
    pub fn create(dir: &Path, disk: &str) -> Result<()> {
        let (data, map) = paths(dir, disk);
        for p in [data, map] {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| MtError::io(format!("cannot create {}", p.display()), e))?;
        }
        Ok(())
    }

    /// Opens the overlay of `disk` in `dir` for a disk of `size` bytes,
    /// loading its map (a map shorter than the disk needs reads as
    /// "nothing written" past its end).
    pub fn open(dir: &Path, disk: &str, size: u64, name: &str) -> Result<Overlay> {
        let (data_path, map_path) = paths(dir, disk);
        let open = |p: &Path| {
            OpenOptions::new().read(true).write(true).open(p).map_err(|e| {
                MtError::io(
                    format!(
                        "cannot open {} of test copy {name}; end the test failover (test-failover-cleanup) and start it again",
                        p.display()
                    ),
                    e,
                )
            })
        };
        let data = open(&data_path)?;
        let map_file = open(&map_path)?;
        let blocks = size.div_ceil(BS);
        let mut bits = std::fs::read(&map_path)
            .map_err(|e| MtError::io(format!("cannot read {}", map_path.display()), e))?;
        bits.resize(blocks.div_ceil(8) as usize, 0);
        Ok(Overlay {
            name: name.to_string(),
            size,
            data,
            data_path,
            map_file,
            map_path,
            map: Mutex::new(Map {
                bits,
                dirty: BTreeSet::new(),
            }),
            closed: AtomicBool::new(false),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// From now on every request fails: the test copy was cleaned up.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    fn lock(&self) -> Result<MutexGuard<'_, Map>> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(MtError::NotFound(format!(
                "test copy {} was cleaned up (test-failover-cleanup); start a new test failover to get one",
                self.name
            )));
        }
        Ok(self.map.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(MtError::InvalidArgument(format!(
                "{len} bytes at offset {offset} are outside test copy {}, which has {} bytes",
                self.name, self.size
            ))),
        }
    }

    /// Reads `buf` at `offset`: written blocks from the overlay, the rest
    /// from `base` (the pinned point), in runs.
    pub fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        base: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / BS, (end - 1) / BS);
        let written: Vec<bool> = {
            let map = self.lock()?;
            (first..=last).map(|b| map.get(b)).collect()
        };
        let mut i = 0;
        while i < written.len() {
            let mut j = i;
            while j + 1 < written.len() && written[j + 1] == written[i] {
                j += 1;
            }
            let from = ((first + i as u64) * BS).max(offset);
            let to = ((first + j as u64 + 1) * BS).min(end);
            let part = &mut buf[(from - offset) as usize..(to - offset) as usize];
            if written[i] {
                read_full_at(&self.data, part, from).map_err(|e| self.io("read", from, e))?;
            } else {
                base(from, part)?;
            }
            i = j + 1;
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the overlay; a partial block is
    /// completed from what the block holds now. With `fua`, durable (data
    /// and map) before it returns.
    pub fn write(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
        base: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let mut map = self.lock()?;
        if !data.is_empty() {
            let end = offset + data.len() as u64;
            let (first, last) = (offset / BS, (end - 1) / BS);
            let mut block = vec![0u8; BLOCK];
            for b in [first, last] {
                let (bs, be) = (b * BS, ((b + 1) * BS).min(self.size));
                if offset <= bs && end >= be {
                    continue; // wholly covered
                }
                let whole = &mut block[..(be - bs) as usize];
                if map.get(b) {
                    read_full_at(&self.data, whole, bs).map_err(|e| self.io("read", bs, e))?;
                } else {
                    base(bs, whole)?;
                }
                let (from, to) = (offset.max(bs), end.min(be));
                whole[(from - bs) as usize..(to - bs) as usize]
                    .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
                self.data
                    .write_all_at(whole, bs)
                    .map_err(|e| self.io("write", bs, e))?;
                if first == last {
                    break;
                }
            }
            // The blocks wholly covered, in one write.
            let from = if offset.is_multiple_of(BS) {
                offset
            } else {
                (first + 1) * BS
            };
            let to = if end.is_multiple_of(BS) || end == self.size {
                end
            } else {
                last * BS
            };
            if from < to {
                let part = &data[(from - offset) as usize..(to - offset) as usize];
                self.data
                    .write_all_at(part, from)
                    .map_err(|e| self.io("write", from, e))?;
            }
            for b in first..=last {
                map.set(b);
            }
        }
        if fua {
            self.sync(&mut map)?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        base: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(ZERO_CHUNK);
            self.write(at, &zeroes[..n as usize], false, base)?;
            at += n;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes every write so far durable: the overlay, then the map.
    pub fn flush(&self) -> Result<()> {
        let mut map = self.lock()?;
        self.sync(&mut map)
    }

    fn sync(&self, map: &mut Map) -> Result<()> {
        self.data.sync_data().map_err(|e| {
            MtError::io(format!("cannot fdatasync {}", self.data_path.display()), e)
        })?;
        if map.dirty.is_empty() {
            return Ok(());
        }
        for &page in &map.dirty {
            let from = page * MAP_PAGE;
            let to = (from + MAP_PAGE).min(map.bits.len());
            self.map_file
                .write_all_at(&map.bits[from..to], from as u64)
                .map_err(|e| MtError::io(format!("cannot write {}", self.map_path.display()), e))?;
        }
        self.map_file
            .sync_data()
            .map_err(|e| MtError::io(format!("cannot fdatasync {}", self.map_path.display()), e))?;
        map.dirty.clear();
        Ok(())
    }

    fn io(&self, what: &str, offset: u64, e: std::io::Error) -> MtError {
        MtError::io(
            format!(
                "cannot {what} the overlay {} of test copy {} at offset {offset}",
                self.data_path.display(),
                self.name
            ),
            e,
        )
    }
}
