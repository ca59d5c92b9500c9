//! The records of a hand-over journal on disk: reading one, and walking
//! the valid ones while telling a torn last batch from damage before it
//! (see the format in the parent module).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{io_err, JournalError, BLOCK_SIZE, HEADER_LEN, MAX_RECORD_LEN, RECORD_HEADER_LEN};

pub(super) fn record_hash(offset: u64, len: u32, batch: u64, data: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(&offset.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(&batch.to_le_bytes());
    h.update(data);
    h.finalize()
}

/// The disk size rounded up to whole blocks: where records may end.
fn block_end(disk_size: u64) -> u64 {
    disk_size.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

/// One saved run of blocks: `data` is the pre-image of `data.len()` bytes
/// (whole blocks) at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub data: Vec<u8>,
}

impl Record {
    /// Blocks this record saves.
    pub fn blocks(&self) -> u64 {
        self.data.len() as u64 / BLOCK_SIZE
    }
}

/// A record header's fields when they are plausible at `pos`: (offset,
/// len, batch).
fn sane_header(h: &[u8], pos: u64, file_len: u64, disk_size: u64) -> Option<(u64, u32, u64)> {
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let offset = u64_at(0);
    let mut b4 = [0u8; 4];
    b4.copy_from_slice(&h[8..12]);
    let len = u32::from_le_bytes(b4);
    let batch = u64_at(12);
    let sane = len > 0
        && len <= MAX_RECORD_LEN
        && u64::from(len) % BLOCK_SIZE == 0
        && offset % BLOCK_SIZE == 0
        && offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= block_end(disk_size))
        && (HEADER_LEN..=pos).contains(&batch)
        && pos + RECORD_HEADER_LEN + u64::from(len) <= file_len;
    sane.then_some((offset, len, batch))
}

/// Reads the record at `pos`; `None` when it is torn or bad. Also returns
/// the record's batch.
pub(super) fn read_record(
    file: &File,
    pos: u64,
    file_len: u64,
    disk_size: u64,
) -> io::Result<Option<(Record, u64)>> {
    if pos + RECORD_HEADER_LEN > file_len {
        return Ok(None);
    }
    let mut h = [0u8; RECORD_HEADER_LEN as usize];
    file.read_exact_at(&mut h, pos)?;
    let Some((offset, len, batch)) = sane_header(&h, pos, file_len, disk_size) else {
        return Ok(None);
    };
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, pos + RECORD_HEADER_LEN)?;
    if record_hash(offset, len, batch, &data).as_bytes()[..] != h[20..] {
        return Ok(None);
    }
    Ok(Some((Record { offset, data }, batch)))
}

/// How far the scan for damage reads at once.
const SCAN_WINDOW: u64 = 4 << 20;

/// Checks that the bad record at `bad` (the valid journal ends there) is a
/// torn tail: no valid record of a batch that began after `bad` follows
/// anywhere. Looks at every byte offset after `bad`, hashing only where a
/// plausible record header is found, so a torn tail (one batch) costs
/// little; error [`JournalError::Damaged`] naming the journal and `bad`.
fn check_tail(
    file: &File,
    path: &Path,
    bad: u64,
    file_len: u64,
    disk_size: u64,
) -> Result<(), JournalError> {
    let mut window = Vec::new();
    let mut start = bad + 1;
    while start + RECORD_HEADER_LEN <= file_len {
        let n = (file_len - start).min(SCAN_WINDOW + RECORD_HEADER_LEN);
        window.resize(n as usize, 0);
        file.read_exact_at(&mut window, start)
            .map_err(io_err("read", path))?;
        let last = (n - RECORD_HEADER_LEN).min(SCAN_WINDOW);
        for i in 0..=last {
            let pos = start + i;
            let h = &window[i as usize..(i + RECORD_HEADER_LEN) as usize];
            let Some((_, _, batch)) = sane_header(h, pos, file_len, disk_size) else {
                continue;
            };
            if batch > bad
                && read_record(file, pos, file_len, disk_size)
                    .map_err(io_err("read", path))?
                    .is_some()
            {
                return Err(JournalError::Damaged {
                    path: path.to_path_buf(),
                    offset: bad,
                });
            }
        }
        start += last + 1;
    }
    Ok(())
}

/// Walks the valid records from the header on, giving each to `each`;
/// returns where the valid journal ends (a torn tail begins), after
/// checking that what follows is only a torn tail.
pub(super) fn scan(
    file: &File,
    path: &Path,
    file_len: u64,
    disk_size: u64,
    mut each: impl FnMut(&Record),
) -> Result<u64, JournalError> {
    let mut end = HEADER_LEN;
    while let Some((r, _)) =
        read_record(file, end, file_len, disk_size).map_err(io_err("read", path))?
    {
        each(&r);
        end += RECORD_HEADER_LEN + r.data.len() as u64;
    }
    if end < file_len {
        check_tail(file, path, end, file_len, disk_size)?;
    }
    Ok(end)
}
