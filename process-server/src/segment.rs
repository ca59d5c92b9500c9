//! Segment files: the on-disk entry format of the frame cache, and the
//! scan that finds where the valid data of a segment ends (DESIGN.md §6).
//!
//! A replication's cache is a run of append-only segment files
//! `segments/<first_seq:020>.seg`, where `first_seq` is the first seq the
//! segment was created to hold (durable seq + 1 at creation), so even an
//! empty newest segment still records how far the stream got. Each entry is
//!
//! ```text
//! [len u32 LE][crc32c(frame bytes) u32 LE]["CRCC"][frame bytes (len)]
//! ```
//!
//! and the frame bytes are the frame exactly as it is forwarded. The
//! checksum only has to find a torn or damaged entry: the frame carries its
//! own blake3, which the MT checks end to end. CRC32C runs at about four
//! times blake3's speed here (hardware instruction), and the PS checks every
//! byte twice (written, read back to forward). Entries written before it
//! carry the first 8 bytes of blake3(frame bytes) instead of the CRC and
//! its tag; they are still read, so an upgraded PS keeps its cache. A crash can
//! leave a torn tail (an entry cut short, or never fully written); the scan
//! stops at the first entry that is short, fails its checksum, does not parse
//! as a frame or does not continue the seq run, and the cache cuts the file
//! there.

use rebound_common::frame::{self, FrameRef};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use thiserror::Error;

/// Bytes before the frame in every entry.
pub const ENTRY_HEADER: usize = 12;
/// Largest frame an entry may hold (a frame's body limit plus header room).
pub const MAX_ENTRY: usize = frame::MAX_BODY + (64 << 10);
/// Suffix of segment files.
pub const SEGMENT_SUFFIX: &str = ".seg";

/// File name of the segment created to hold seqs from `first_seq` on.
pub fn file_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

/// The `first_seq` of a segment file name, or `None` for other files.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Marks a checksum field as CRC32C (the older format's blake3 prefix
/// matches it only by a 2^-32 chance, and then its CRC does not).
const CRC_TAG: [u8; 4] = *b"CRCC";

/// The 8-byte checksum stored in front of an entry's frame bytes.
pub fn checksum(frame_bytes: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&crc32c::crc32c(frame_bytes).to_le_bytes());
    out[4..].copy_from_slice(&CRC_TAG);
    out
}

/// Whether `stored` is the checksum of `frame_bytes`, in this format or in
/// the blake3-prefix format of entries written by earlier versions.
pub fn checksum_matches(stored: &[u8], frame_bytes: &[u8]) -> bool {
    if stored[4..] == CRC_TAG && stored == checksum(frame_bytes) {
        return true;
    }
    stored == &blake3::hash(frame_bytes).as_bytes()[..8]
}

/// The header of the entry holding `frame_bytes`.
pub fn entry_header(frame_bytes: &[u8]) -> [u8; ENTRY_HEADER] {
    let mut h = [0u8; ENTRY_HEADER];
    h[..4].copy_from_slice(&(frame_bytes.len() as u32).to_le_bytes());
    h[4..].copy_from_slice(&checksum(frame_bytes));
    h
}

/// Bytes an entry holding `frame_len` frame bytes takes in a segment.
pub fn entry_len(frame_len: usize) -> u64 {
    (ENTRY_HEADER + frame_len) as u64
}

/// Where one entry sits and which seqs its frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    /// Offset of the entry header in the segment.
    pub offset: u64,
    /// Length of the frame bytes.
    pub frame_len: u32,
    pub first_seq: u64,
    pub last_seq: u64,
}

impl EntryMeta {
    /// Offset just past this entry.
    pub fn end(&self) -> u64 {
        self.offset + entry_len(self.frame_len as usize)
    }
}

/// Why the data of a segment ends before its file does.
#[derive(Debug, Error)]
pub enum EntryError {
    #[error("I/O error at offset {offset}: {source}")]
    Io { offset: u64, source: io::Error },
    #[error("entry at offset {offset} is torn: it needs {needed} bytes, {have} remain")]
    Torn { offset: u64, needed: u64, have: u64 },
    #[error("entry at offset {offset} claims an impossible length {len}")]
    BadLength { offset: u64, len: u32 },
    #[error("entry at offset {offset} fails its checksum")]
    Checksum { offset: u64 },
    #[error("entry at offset {offset} does not hold a valid frame: {source}")]
    BadFrame {
        offset: u64,
        source: frame::FrameError,
    },
}

/// Reads the entry at `offset`, where the valid data of the file ends at
/// `end`. `Ok(None)` at `end`. The checksum is verified.
pub fn read_entry(
    file: &File,
    offset: u64,
    end: u64,
) -> Result<Option<(EntryMeta, Vec<u8>)>, EntryError> {
    if offset >= end {
        return Ok(None);
    }
    let have = end - offset;
    if have < ENTRY_HEADER as u64 {
        return Err(EntryError::Torn {
            offset,
            needed: ENTRY_HEADER as u64,
            have,
        });
    }
    let mut header = [0u8; ENTRY_HEADER];
    file.read_exact_at(&mut header, offset)
        .map_err(|source| EntryError::Io { offset, source })?;
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(&header[..4]);
    let len = u32::from_le_bytes(len_bytes);
    if len == 0 || len as usize > MAX_ENTRY {
        return Err(EntryError::BadLength { offset, len });
    }
    let needed = entry_len(len as usize);
    if have < needed {
        return Err(EntryError::Torn {
            offset,
            needed,
            have,
        });
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, offset + ENTRY_HEADER as u64)
        .map_err(|source| EntryError::Io { offset, source })?;
    if !checksum_matches(&header[4..], &bytes) {
        return Err(EntryError::Checksum { offset });
    }
    let (first_seq, last_seq) =
        frame_seqs(&bytes).map_err(|source| EntryError::BadFrame { offset, source })?;
    Ok(Some((
        EntryMeta {
            offset,
            frame_len: len,
            first_seq,
            last_seq,
        },
        bytes,
    )))
}

/// The seq range of encoded frame bytes (header checked, body not hashed).
pub fn frame_seqs(bytes: &[u8]) -> Result<(u64, u64), frame::FrameError> {
    let f = FrameRef::parse(bytes)?;
    Ok((f.header.first_seq, f.header.last_seq))
}

/// What a scan found in one segment file.
#[derive(Debug)]
pub struct Scan {
    /// Length of the file on disk.
    pub file_len: u64,
    /// Where the valid entries end.
    pub valid_len: u64,
    /// Number of valid entries.
    pub entries: u64,
    /// The last seq held once this segment's entries are applied in order
    /// (the seq before the segment when it has none).
    pub last_seq: u64,
    /// Why the data ends before the file does (torn or corrupt tail).
    pub cut: Option<Cut>,
}

/// Why a scan stopped before the end of the file.
#[derive(Debug, Error)]
pub enum Cut {
    /// The entry there is short, damaged or not a frame.
    #[error(transparent)]
    Entry(EntryError),
    #[error("entry at offset {offset} holds seq {first_seq}..={last_seq} which does not continue seq {held}")]
    Discontinuous {
        offset: u64,
        first_seq: u64,
        last_seq: u64,
        held: u64,
    },
}

/// Scans a segment whose run of seqs continues `prev_seq` (the last seq held
/// before it). An entry must overlap or continue the run and advance it:
/// `first_seq <= held + 1` and `last_seq > held`.
pub fn scan(path: &Path, prev_seq: u64) -> io::Result<Scan> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut offset = 0u64;
    let mut held = prev_seq;
    let mut entries = 0u64;
    let mut cut = None;
    loop {
        match read_entry(&file, offset, file_len) {
            Ok(None) => break,
            Ok(Some((meta, _))) => {
                if meta.first_seq > held.saturating_add(1) || meta.last_seq <= held {
                    cut = Some(Cut::Discontinuous {
                        offset,
                        first_seq: meta.first_seq,
                        last_seq: meta.last_seq,
                        held,
                    });
                    break;
                }
                held = meta.last_seq;
                offset = meta.end();
                entries += 1;
            }
            Err(EntryError::Io { source, .. }) => return Err(source),
            Err(e) => {
                cut = Some(Cut::Entry(e));
                break;
            }
        }
    }
    Ok(Scan {
        file_len,
        valid_len: offset,
        entries,
        last_seq: held,
        cut,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rebound_common::frame::FrameBuilder;
    use std::io::Write;

    /// Encoded frame holding seqs `first..=last` of replication `rid`.
    pub fn frame_bytes(rid: &str, first: u64, last: u64) -> Vec<u8> {
        let mut b = FrameBuilder::new(rid, first);
        for s in first..=last {
            b.push_write(0, s * 4096, &[(s % 251) as u8; 4096]);
        }
        b.finish().to_bytes()
    }

    /// Why the scan stopped, as logged (empty when it did not).
    fn cut_text(s: &Scan) -> String {
        s.cut.as_ref().map(|c| c.to_string()).unwrap_or_default()
    }

    /// A segment of frames 1..=2 and 3..=5 in a temporary directory.
    fn two_frame_segment() -> (tempfile::TempDir, std::path::PathBuf, Vec<Vec<u8>>) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(file_name(1));
        let frames = vec![frame_bytes("r", 1, 2), frame_bytes("r", 3, 5)];
        write_segment(&p, &frames);
        (d, p, frames)
    }

    fn write_segment(path: &Path, frames: &[Vec<u8>]) {
        let mut f = File::create(path).unwrap();
        for fr in frames {
            f.write_all(&entry_header(fr)).unwrap();
            f.write_all(fr).unwrap();
        }
    }

    #[test]
    fn names_roundtrip() {
        assert_eq!(file_name(42), "00000000000000000042.seg");
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert_eq!(parse_file_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_file_name("42.seg"), None);
        assert_eq!(parse_file_name(".00000000000000000042.seg.tmp"), None);
        assert_eq!(parse_file_name("0000000000000000004x.seg"), None);
    }

    #[test]
    fn write_and_scan_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(file_name(1));
        let frames = vec![
            frame_bytes("r", 1, 3),
            frame_bytes("r", 4, 4),
            frame_bytes("r", 3, 9),
        ];
        write_segment(&p, &frames);
        let s = scan(&p, 0).unwrap();
        assert!(s.cut.is_none(), "{:?}", s.cut);
        assert_eq!(s.entries, 3);
        assert_eq!(s.last_seq, 9);
        assert_eq!(s.valid_len, s.file_len);

        let f = File::open(&p).unwrap();
        let mut off = 0;
        let mut got = Vec::new();
        while let Some((meta, bytes)) = read_entry(&f, off, s.valid_len).unwrap() {
            got.push(bytes);
            off = meta.end();
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn empty_segment_keeps_previous_seq() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(file_name(8));
        write_segment(&p, &[]);
        let s = scan(&p, 7).unwrap();
        assert_eq!(
            (s.entries, s.last_seq, s.valid_len, s.cut.is_none()),
            (0, 7, 0, true)
        );
    }

    #[test]
    fn torn_tail_is_found_at_every_cut() {
        let (_d, p, frames) = two_frame_segment();
        let full = std::fs::read(&p).unwrap();
        let first_end = entry_len(frames[0].len());
        for cut in [
            first_end + 1,
            first_end + 11,
            first_end + 12,
            full.len() as u64 - 1,
        ] {
            std::fs::write(&p, &full[..cut as usize]).unwrap();
            let s = scan(&p, 0).unwrap();
            assert_eq!(s.valid_len, first_end, "cut at {cut}");
            assert_eq!(s.last_seq, 2);
            assert!(cut_text(&s).contains("torn"), "{:?}", s.cut);
        }
    }

    #[test]
    fn flipped_byte_and_gap_are_found() {
        let (_d, p, frames) = two_frame_segment();
        let mut full = std::fs::read(&p).unwrap();
        let first_end = entry_len(frames[0].len()) as usize;
        full[first_end + 40] ^= 0x55;
        std::fs::write(&p, &full).unwrap();
        let s = scan(&p, 0).unwrap();
        assert_eq!((s.valid_len, s.last_seq), (first_end as u64, 2));
        assert!(cut_text(&s).contains("checksum"));

        // A checksummed entry that skips seqs is not part of the run either.
        write_segment(&p, &[frame_bytes("r", 1, 2), frame_bytes("r", 4, 5)]);
        let s = scan(&p, 0).unwrap();
        assert_eq!((s.entries, s.last_seq), (1, 2));
        assert!(cut_text(&s).contains("does not continue"));

        // A huge length is refused before anything is allocated.
        let mut bad = entry_header(&frames[0]).to_vec();
        bad[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&p, &bad).unwrap();
        let s = scan(&p, 0).unwrap();
        assert_eq!(s.valid_len, 0);
        assert!(cut_text(&s).contains("impossible length"));
    }

    #[test]
    fn entries_of_the_blake3_format_are_still_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(file_name(1));
        let frames = [frame_bytes("r", 1, 2), frame_bytes("r", 3, 5)];
        let old_header = |fr: &[u8]| {
            let mut h = [0u8; ENTRY_HEADER];
            h[..4].copy_from_slice(&(fr.len() as u32).to_le_bytes());
            h[4..].copy_from_slice(&blake3::hash(fr).as_bytes()[..8]);
            h
        };
        // An entry of the old format, then one of the new.
        let mut bytes = old_header(&frames[0]).to_vec();
        bytes.extend_from_slice(&frames[0]);
        bytes.extend_from_slice(&entry_header(&frames[1]));
        bytes.extend_from_slice(&frames[1]);
        std::fs::write(&p, &bytes).unwrap();
        let s = scan(&p, 0).unwrap();
        assert!(s.cut.is_none(), "{:?}", s.cut);
        assert_eq!((s.entries, s.last_seq), (2, 5));

        // A damaged old-format entry still fails its checksum.
        bytes[ENTRY_HEADER + 40] ^= 0x55;
        std::fs::write(&p, &bytes).unwrap();
        let s = scan(&p, 0).unwrap();
        assert_eq!(s.valid_len, 0);
        assert!(cut_text(&s).contains("checksum"));
    }
}
