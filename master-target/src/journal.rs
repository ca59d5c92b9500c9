//! The retention journal: undo records and their in-memory index
//! (DESIGN.md §7 "Apply").
//!
//! Before a 4 KiB block is overwritten for the first time in an interval, its
//! old content is appended to that interval's journal file as an undo record.
//! The same record format stores rollback pre-images. Records are
//! self-describing and checksummed, so on restart the journal itself tells
//! which blocks the interval already saved; a torn or corrupt tail (a crash
//! mid-append) is cut off, which is safe because the replica is written only
//! after the journal is synced.
//!
//! Record layout (little endian, 32-byte header):
//! ```text
//! magic "RBU2" | disk u32 | block u64 | kind u8 | reserved [7] | checksum u64 | data
//! ```
//! `kind` 1 = data (4096 bytes follow), 2 = zero (the old block was all
//! zeroes; no data). `checksum` is the CRC32C of the first 24 header bytes
//! and the data, in the low 4 bytes (the high 4 are zero).
//!
//! The checksum finds torn and corrupt records; it does not need to be
//! cryptographic, and a CRC32C (hardware-accelerated) costs a fraction of
//! a blake3 per saved block, on the apply path of every first write in an
//! interval. Records written before that change have the magic "RBU1" and
//! the first 8 bytes of blake3 as their checksum; they are still read, so
//! a journal that spans an upgrade stays whole.

use rebound_common::chunk::is_zero;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use thiserror::Error;

/// Size of a block, the unit of undo records.
pub const BLOCK: usize = 4096;
/// Size of a record header.
pub const HEADER_LEN: usize = 32;
/// Records with a CRC32C checksum: what `encode` writes.
const MAGIC: [u8; 4] = *b"RBU2";
/// Records with a blake3 checksum, written by versions before `MAGIC`.
const MAGIC_BLAKE3: [u8; 4] = *b"RBU1";
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;

/// A block's key in indexes: disk index in the top 16 bits, block number in
/// the low 48 (disks up to 1 EiB).
pub fn key(disk: u32, block: u64) -> u64 {
    ((disk as u64) << 48) | (block & ((1 << 48) - 1))
}

pub fn key_disk(key: u64) -> u32 {
    (key >> 48) as u32
}

pub fn key_block(key: u64) -> u64 {
    key & ((1 << 48) - 1)
}

/// The checksum `encode` writes: CRC32C of `head` (24 bytes) then `data`.
fn checksum(head: &[u8], data: &[u8]) -> u64 {
    u64::from(crc32c::crc32c_append(crc32c::crc32c(head), data))
}

/// The checksum of an "RBU1" record: blake3 of `head` then `data`, hashed
/// as one contiguous input (fed in two pieces, the 24-byte head would keep
/// most of the block off blake3's SIMD many-chunk path).
fn checksum_blake3(head: &[u8], data: &[u8]) -> u64 {
    let mut buf = [0u8; 24 + BLOCK];
    let n = head.len() + data.len();
    let out = if n <= buf.len() {
        buf[..head.len()].copy_from_slice(head);
        buf[head.len()..n].copy_from_slice(data);
        blake3::hash(&buf[..n])
    } else {
        let mut h = blake3::Hasher::new();
        h.update(head);
        h.update(data);
        h.finalize()
    };
    u64::from_le_bytes(out.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Appends one undo record for `data` (exactly one block) and returns the
/// record's length.
pub fn encode(out: &mut Vec<u8>, disk: u32, block: u64, data: &[u8]) -> usize {
    debug_assert_eq!(data.len(), BLOCK);
    let zero = is_zero(data);
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&disk.to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    out.push(if zero { KIND_ZERO } else { KIND_DATA });
    out.extend_from_slice(&[0u8; 7]);
    let payload: &[u8] = if zero { &[] } else { data };
    let sum = checksum(&out[start..start + 24], payload);
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(payload);
    out.len() - start
}

/// Why a record header does not decode.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HeaderError {
    #[error("bad record magic {0:02x?}")]
    Magic([u8; 4]),
    #[error("unknown record kind {0}")]
    Kind(u8),
}

/// Why an undo record (or pre-image record) cannot be used.
#[derive(Debug, Error)]
pub enum RecordError {
    #[error("cannot read undo record at offset {offset}: {source}")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("undo record at offset {offset}: {source}")]
    Header {
        offset: u64,
        #[source]
        source: HeaderError,
    },
    #[error("undo record at offset {offset} is for disk {disk} block {block}, expected disk {expect_disk} block {expect_block}")]
    WrongBlock {
        offset: u64,
        disk: u32,
        block: u64,
        expect_disk: u32,
        expect_block: u64,
    },
    #[error("undo record at offset {offset}: checksum mismatch")]
    Checksum { offset: u64 },
    #[error("undo record at offset {offset} is cut short")]
    Short { offset: u64 },
}

/// Checks that the header `hdr` at `offset` is the record of `expect_key`.
fn expect_block(hdr: &Header, offset: u64, expect_key: u64) -> Result<(), RecordError> {
    if key(hdr.disk, hdr.block) == expect_key {
        return Ok(());
    }
    Err(RecordError::WrongBlock {
        offset,
        disk: hdr.disk,
        block: hdr.block,
        expect_disk: key_disk(expect_key),
        expect_block: key_block(expect_key),
    })
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub disk: u32,
    pub block: u64,
    pub zero: bool,
    pub checksum: u64,
    /// An "RBU1" record, checksummed with blake3.
    pub blake3: bool,
}

impl Header {
    /// Bytes of data that follow the header.
    pub fn data_len(&self) -> usize {
        if self.zero {
            0
        } else {
            BLOCK
        }
    }
}

pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<Header, HeaderError> {
    let blake3 = match h[..4].try_into().expect("4 bytes") {
        MAGIC => false,
        MAGIC_BLAKE3 => true,
        m => return Err(HeaderError::Magic(m)),
    };
    let disk = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    let block = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let zero = match h[16] {
        KIND_DATA => false,
        KIND_ZERO => true,
        k => return Err(HeaderError::Kind(k)),
    };
    let checksum = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
    Ok(Header {
        disk,
        block,
        zero,
        checksum,
        blake3,
    })
}

fn verify(h: &[u8; HEADER_LEN], hdr: &Header, data: &[u8]) -> bool {
    let sum = if hdr.blake3 {
        checksum_blake3(&h[..24], data)
    } else {
        checksum(&h[..24], data)
    };
    sum == hdr.checksum
}

/// Reads the block saved by the record at `offset` into `out` (one block),
/// checking that it is the record of `expect_key` and that its checksum holds.
pub fn read_block(
    file: &File,
    offset: u64,
    expect_key: u64,
    out: &mut [u8],
) -> Result<(), RecordError> {
    debug_assert_eq!(out.len(), BLOCK);
    let read = |source| RecordError::Read { offset, source };
    let mut h = [0u8; HEADER_LEN];
    file.read_exact_at(&mut h, offset).map_err(read)?;
    let hdr = decode_header(&h).map_err(|source| RecordError::Header { offset, source })?;
    expect_block(&hdr, offset, expect_key)?;
    if hdr.zero {
        out.fill(0);
    } else {
        file.read_exact_at(out, offset + HEADER_LEN as u64)
            .map_err(read)?;
    }
    let data: &[u8] = if hdr.zero { &[] } else { out };
    if !verify(&h, &hdr, data) {
        return Err(RecordError::Checksum { offset });
    }
    Ok(())
}

/// Checks the record at the start of `rec` (which holds at least the whole
/// record; `offset` is its place in the file, for messages): it must be the
/// record of `expect_key` and its checksum must hold. Returns the saved
/// block's data, `None` when the block was all zeroes.
pub fn check_record(
    rec: &[u8],
    offset: u64,
    expect_key: u64,
) -> Result<Option<&[u8]>, RecordError> {
    let h: &[u8; HEADER_LEN] = rec
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(RecordError::Short { offset })?;
    let hdr = decode_header(h).map_err(|source| RecordError::Header { offset, source })?;
    expect_block(&hdr, offset, expect_key)?;
    let data = rec
        .get(HEADER_LEN..HEADER_LEN + hdr.data_len())
        .ok_or(RecordError::Short { offset })?;
    if !verify(h, &hdr, data) {
        return Err(RecordError::Checksum { offset });
    }
    Ok((!hdr.zero).then_some(data))
}

/// What a scan of a journal (or pre-image) file found.
#[derive(Debug, Default)]
pub struct Scan {
    /// (key, record offset) of every valid record, in file order.
    pub entries: Vec<(u64, u64)>,
    /// End of the last valid record; everything after it is a torn or
    /// corrupt tail.
    pub valid_len: u64,
    pub file_len: u64,
    /// Why the scan stopped before the end of the file, if it did.
    pub problem: Option<String>,
}

/// Scans records from `start` to the end of the file, verifying checksums,
/// and stops at the first invalid one. `disk_ok` rejects records for disks
/// the replication does not have (garbage that happens to parse).
pub fn scan(file: &File, start: u64, disk_ok: impl Fn(u32) -> bool) -> io::Result<Scan> {
    let file_len = file.metadata()?.len();
    let mut scan = Scan {
        valid_len: start,
        file_len,
        ..Scan::default()
    };
    let mut f = file;
    f.seek(SeekFrom::Start(start))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut pos = start;
    let mut h = [0u8; HEADER_LEN];
    let mut data = vec![0u8; BLOCK];
    while pos < file_len {
        if file_len - pos < HEADER_LEN as u64 {
            scan.problem = Some(format!("torn record header at offset {pos}"));
            break;
        }
        r.read_exact(&mut h)?;
        let hdr = match decode_header(&h) {
            Ok(hdr) => hdr,
            Err(e) => {
                scan.problem = Some(format!("offset {pos}: {e}"));
                break;
            }
        };
        if !disk_ok(hdr.disk) || hdr.block >= 1 << 48 {
            scan.problem = Some(format!(
                "offset {pos}: record for unknown disk {} block {}",
                hdr.disk, hdr.block
            ));
            break;
        }
        let n = hdr.data_len();
        if file_len - pos - (HEADER_LEN as u64) < n as u64 {
            scan.problem = Some(format!("torn record data at offset {pos}"));
            break;
        }
        r.read_exact(&mut data[..n])?;
        if !verify(&h, &hdr, &data[..n]) {
            scan.problem = Some(format!("checksum mismatch in record at offset {pos}"));
            break;
        }
        scan.entries.push((key(hdr.disk, hdr.block), pos));
        pos += (HEADER_LEN + n) as u64;
        scan.valid_len = pos;
    }
    Ok(scan)
}

/// What a salvage of a damaged journal found (see [`salvage`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Salvage {
    /// (key, record offset) of every valid record after the damage, in file
    /// order.
    pub entries: Vec<(u64, u64)>,
    /// Byte ranges `[start, end)` that hold no valid record.
    pub damaged: Vec<(u64, u64)>,
}

/// The key and length of a valid record at `pos`, if there is one.
fn record_at(
    file: &File,
    pos: u64,
    file_len: u64,
    disk_ok: &impl Fn(u32) -> bool,
) -> io::Result<Option<(u64, u64)>> {
    let Some(hdr_end) = pos
        .checked_add(HEADER_LEN as u64)
        .filter(|&e| e <= file_len)
    else {
        return Ok(None);
    };
    let mut h = [0u8; HEADER_LEN];
    file.read_exact_at(&mut h, pos)?;
    let Ok(hdr) = decode_header(&h) else {
        return Ok(None);
    };
    let n = hdr.data_len();
    if !disk_ok(hdr.disk) || hdr.block >= 1 << 48 || file_len - hdr_end < n as u64 {
        return Ok(None);
    }
    let mut data = vec![0u8; n];
    file.read_exact_at(&mut data, hdr_end)?;
    if !verify(&h, &hdr, &data) {
        return Ok(None);
    }
    Ok(Some((key(hdr.disk, hdr.block), (HEADER_LEN + n) as u64)))
}

/// Reads past a damaged record at `start` (where [`scan`] stopped): finds
/// every valid record after it, and the ranges that hold none. Records are
/// whole multiples of 32 bytes from the start of the file, so after damage
/// the next record is looked for at each 32-byte step. A damaged record
/// whose header still decodes is skipped whole when a valid record (or the
/// end of the file) follows it.
pub fn salvage(file: &File, start: u64, disk_ok: impl Fn(u32) -> bool) -> io::Result<Salvage> {
    let file_len = file.metadata()?.len();
    let mut out = Salvage::default();
    let mut bad_from: Option<u64> = None;
    let mut pos = start;
    while pos < file_len {
        if let Some((k, len)) = record_at(file, pos, file_len, &disk_ok)? {
            if let Some(from) = bad_from.take() {
                out.damaged.push((from, pos));
            }
            out.entries.push((k, pos));
            pos += len;
            continue;
        }
        bad_from.get_or_insert(pos);
        pos += damaged_record_len(file, pos, file_len, &disk_ok)?;
    }
    if let Some(from) = bad_from {
        out.damaged.push((from, file_len));
    }
    Ok(out)
}

/// Whether the invalid bytes `from..to` (the end of the file) are the torn
/// tail of an append that never completed: a record shorter than its header
/// says (or a header cut short), or zeroes only (the file grew but its data
/// never reached the disk). A full-length record whose checksum fails is
/// not torn: it was written whole and changed since.
pub fn torn_tail(file: &File, from: u64, to: u64) -> io::Result<bool> {
    if to - from < HEADER_LEN as u64 {
        return Ok(true);
    }
    let mut h = [0u8; HEADER_LEN];
    file.read_exact_at(&mut h, from)?;
    if let Ok(hdr) = decode_header(&h) {
        if to - from < (HEADER_LEN + hdr.data_len()) as u64 {
            return Ok(true);
        }
    }
    let mut buf = vec![0u8; 1 << 16];
    let mut pos = from;
    while pos < to {
        let n = buf.len().min((to - pos) as usize);
        file.read_exact_at(&mut buf[..n], pos)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        pos += n as u64;
    }
    Ok(true)
}

/// How far to step past the invalid record at `pos`: its whole length when
/// its header decodes and a valid record or the end of the file follows,
/// else one 32-byte step.
fn damaged_record_len(
    file: &File,
    pos: u64,
    file_len: u64,
    disk_ok: &impl Fn(u32) -> bool,
) -> io::Result<u64> {
    const STEP: u64 = HEADER_LEN as u64;
    if file_len - pos < STEP {
        return Ok(file_len - pos);
    }
    let mut h = [0u8; HEADER_LEN];
    file.read_exact_at(&mut h, pos)?;
    let Ok(hdr) = decode_header(&h) else {
        return Ok(STEP);
    };
    let next = pos + (HEADER_LEN + hdr.data_len()) as u64;
    if next == file_len || (next < file_len && record_at(file, next, file_len, disk_ok)?.is_some())
    {
        return Ok(next - pos);
    }
    Ok(STEP)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn records_roundtrip_and_torn_tail_is_found() {
        let mut buf = Vec::new();
        let a = vec![7u8; BLOCK];
        let z = vec![0u8; BLOCK];
        assert_eq!(encode(&mut buf, 0, 5, &a), HEADER_LEN + BLOCK);
        assert_eq!(encode(&mut buf, 1, 9, &z), HEADER_LEN);
        let good = buf.len() as u64;
        encode(&mut buf, 0, 6, &a);
        buf.truncate(buf.len() - 100); // torn
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&buf).unwrap();
        let s = scan(&f, 0, |d| d < 2).unwrap();
        assert_eq!(
            s.entries,
            vec![(key(0, 5), 0), (key(1, 9), (HEADER_LEN + BLOCK) as u64)]
        );
        assert_eq!(s.valid_len, good);
        assert!(s.problem.is_some());
        let mut out = vec![1u8; BLOCK];
        read_block(&f, 0, key(0, 5), &mut out).unwrap();
        assert_eq!(out, a);
        read_block(&f, s.entries[1].1, key(1, 9), &mut out).unwrap();
        assert_eq!(out, z);
        assert!(read_block(&f, 0, key(0, 6), &mut out).is_err());
        // Unknown disk stops the scan.
        let s = scan(&f, 0, |d| d < 1).unwrap();
        assert_eq!(s.entries.len(), 1);
    }

    #[test]
    fn corrupt_data_stops_scan() {
        let mut buf = Vec::new();
        encode(&mut buf, 0, 1, &[3u8; BLOCK]);
        encode(&mut buf, 0, 2, &[4u8; BLOCK]);
        let n = buf.len();
        buf[n - 10] ^= 1;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&buf).unwrap();
        let s = scan(&f, 0, |_| true).unwrap();
        assert_eq!(s.entries.len(), 1);
        assert!(s.problem.unwrap().contains("checksum"));
    }

    /// An "RBU1" record as versions before the CRC32C checksum wrote it.
    fn encode_blake3(out: &mut Vec<u8>, disk: u32, block: u64, data: &[u8]) {
        let start = out.len();
        encode(out, disk, block, data);
        out[start..start + 4].copy_from_slice(&MAGIC_BLAKE3);
        let payload = out[start + HEADER_LEN..].to_vec();
        let sum = checksum_blake3(&out[start..start + 24], &payload);
        out[start + 24..start + 32].copy_from_slice(&sum.to_le_bytes());
    }

    #[test]
    fn journal_spanning_the_checksum_change_reads_whole() {
        let mut buf = Vec::new();
        let (a, b) = (vec![5u8; BLOCK], vec![6u8; BLOCK]);
        encode_blake3(&mut buf, 0, 1, &a);
        encode_blake3(&mut buf, 0, 2, &[0u8; BLOCK]);
        let new_at = buf.len() as u64;
        encode(&mut buf, 0, 3, &b);
        assert_eq!(&buf[new_at as usize..new_at as usize + 4], b"RBU2");
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&buf).unwrap();
        let s = scan(&f, 0, |_| true).unwrap();
        assert_eq!(s.problem, None);
        assert_eq!(s.entries.len(), 3);
        assert_eq!(s.valid_len, buf.len() as u64);
        let mut out = vec![1u8; BLOCK];
        read_block(&f, 0, key(0, 1), &mut out).unwrap();
        assert_eq!(out, a);
        read_block(&f, new_at, key(0, 3), &mut out).unwrap();
        assert_eq!(out, b);
        // A bit flipped in an old record's data still stops the scan there.
        let mut bad = buf.clone();
        bad[HEADER_LEN + 7] ^= 1;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bad).unwrap();
        let s = scan(&f, 0, |_| true).unwrap();
        assert!(s.entries.is_empty());
        assert!(s.problem.unwrap().contains("checksum"));
        assert!(check_record(&bad, 0, key(0, 1)).is_err());
    }

    #[test]
    fn salvage_keeps_the_records_after_a_damaged_one() {
        let mut buf = Vec::new();
        for b in 0..6u64 {
            let fill = if b == 3 { 0 } else { b as u8 + 1 };
            encode(&mut buf, 0, b, &[fill; BLOCK]);
        }
        let rec = (HEADER_LEN + BLOCK) as u64;
        // A flipped data byte in record 1, a destroyed header in record 4
        // (behind the zero record 3, 32 bytes long).
        let mut bad = buf.clone();
        bad[rec as usize + HEADER_LEN + 100] ^= 0x40;
        let r4 = (3 * rec + HEADER_LEN as u64) as usize;
        bad[r4..r4 + 4].copy_from_slice(b"XXXX");
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bad).unwrap();
        let s = scan(&f, 0, |_| true).unwrap();
        assert_eq!((s.entries.len(), s.valid_len), (1, rec));
        let v = salvage(&f, s.valid_len, |_| true).unwrap();
        let z = 3 * rec + HEADER_LEN as u64; // end of the zero record
        assert_eq!(
            v.entries,
            vec![
                (key(0, 2), 2 * rec),
                (key(0, 3), 3 * rec),
                (key(0, 5), z + rec)
            ]
        );
        assert_eq!(v.damaged, vec![(rec, 2 * rec), (z, z + rec)]);
        // Damage up to the end of the file is one range.
        let mut torn = buf.clone();
        torn.truncate(buf.len() - 10);
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&torn).unwrap();
        let s = scan(&f, 0, |_| true).unwrap();
        let v = salvage(&f, s.valid_len, |_| true).unwrap();
        assert!(v.entries.is_empty());
        assert_eq!(v.damaged, vec![(s.valid_len, torn.len() as u64)]);
    }

    #[test]
    fn key_parts() {
        let k = key(3, 123456789);
        assert_eq!(key_disk(k), 3);
        assert_eq!(key_block(k), 123456789);
    }
}
