//! The change-frame codec (DESIGN.md §4).
//!
//! Records of one replication's change stream travel in frames of about
//! 1–4 MiB. The agent builds a frame and hashes its uncompressed body; the
//! process server may compress the body and stores and forwards the frame as
//! it is; the master target decompresses, checks the hash and refuses a frame
//! that does not match. The format is a small versioned binary layout carried
//! inside a protobuf `bytes` field, so nobody in between re-encodes it.
//!
//! Layout (little endian):
//! ```text
//! magic "RBF1" | version u8 | flags u8 | rid_len u16 | replication id
//! | first_seq u64 | last_seq u64 | uncompressed_len u32 | body_len u32
//! | blake3(uncompressed body) [32] | body
//! ```
//! The body is a sequence of records; record `i` has seq `first_seq + i`.
//!
//! The process server and the master target parse frames in place
//! ([`FrameRef`]), and the records' data share the frame's buffer, so a
//! frame body is not copied on its way to the replica.

use prost::bytes::Bytes;
use thiserror::Error;

pub const MAGIC: [u8; 4] = *b"RBF1";
pub const VERSION: u8 = 1;
/// Flag bit: the body is zstd-compressed.
pub const FLAG_COMPRESSED: u8 = 1;
/// Largest uncompressed body a decoder accepts (guards allocations).
pub const MAX_BODY: usize = 64 << 20;

const REC_WRITE: u8 = 1;
const REC_ZERO: u8 = 2;
const REC_TAG: u8 = 3;
const REC_RESYNC_BEGIN: u8 = 4;
const REC_RESYNC_END: u8 = 5;

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("frame truncated: needed {needed} bytes at offset {at}, have {have}")]
    Truncated {
        at: usize,
        needed: usize,
        have: usize,
    },
    #[error("not a Rebound frame (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("frame version {0} is not supported (this build reads version {VERSION})")]
    BadVersion(u8),
    #[error("frame {first}..={last} of replication {replication}: body hash mismatch (expected {expected}, got {actual}); the frame is corrupt and was refused")]
    HashMismatch {
        replication: String,
        first: u64,
        last: u64,
        expected: String,
        actual: String,
    },
    #[error("frame body of {0} bytes exceeds the limit of {MAX_BODY}")]
    TooLarge(usize),
    #[error("frame decompression failed: {0}")]
    Decompress(String),
    #[error("unknown record type {kind} at body offset {at}")]
    UnknownRecord { kind: u8, at: usize },
    #[error(
        "frame says seq {first}..={last} ({expected} records) but its body holds {actual} records"
    )]
    CountMismatch {
        first: u64,
        last: u64,
        expected: u64,
        actual: u64,
    },
    #[error("invalid record at body offset {at}: {what}")]
    Invalid { at: usize, what: String },
    #[error(
        "frame of replication {replication} has the impossible seq range {first}..={last}: {why}"
    )]
    BadSeqRange {
        replication: String,
        first: u64,
        last: u64,
        why: &'static str,
    },
}

/// Kind of a recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TagKind {
    Crash,
    App,
    Shutdown,
}

impl TagKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TagKind::Crash => "crash",
            TagKind::App => "app",
            TagKind::Shutdown => "shutdown",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "crash" => Some(TagKind::Crash),
            "app" => Some(TagKind::App),
            "shutdown" => Some(TagKind::Shutdown),
            _ => None,
        }
    }
    fn code(self) -> u8 {
        match self {
            TagKind::Crash => 0,
            TagKind::App => 1,
            TagKind::Shutdown => 2,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(TagKind::Crash),
            1 => Some(TagKind::App),
            2 => Some(TagKind::Shutdown),
            _ => None,
        }
    }
}

/// A recovery-point tag in the change stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    pub id: String,
    pub kind: TagKind,
    pub time_ms: u64,
    /// Consistency-group tag id, empty when not a group point.
    pub group: String,
}

/// One record of the change stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Write {
        disk: u32,
        offset: u64,
        /// Shares the buffer it was decoded from (see [`decode_shared`]).
        data: Bytes,
    },
    Zero {
        disk: u32,
        offset: u64,
        len: u64,
    },
    Tag(Tag),
    ResyncBegin {
        disks: Vec<u32>,
        reason: String,
    },
    ResyncEnd,
}

impl Record {
    /// Bytes this record takes in a frame body.
    pub fn encoded_len(&self) -> usize {
        match self {
            Record::Write { data, .. } => 1 + 4 + 8 + 4 + data.len(),
            Record::Zero { .. } => 1 + 4 + 8 + 8,
            Record::Tag(t) => 1 + 1 + 8 + 2 + t.id.len() + 2 + t.group.len(),
            Record::ResyncBegin { disks, reason } => 1 + 4 + 4 * disks.len() + 2 + reason.len(),
            Record::ResyncEnd => 1,
        }
    }
}

/// Appends records to a frame body; `finish` seals it with the hash.
#[derive(Debug)]
pub struct FrameBuilder {
    replication_id: String,
    first_seq: u64,
    count: u64,
    body: Vec<u8>,
}

impl FrameBuilder {
    pub fn new(replication_id: &str, first_seq: u64) -> Self {
        Self::with_body(replication_id, first_seq, Vec::with_capacity(1 << 20))
    }

    /// A builder that writes into `body` (cleared first), so a caller can
    /// reuse the allocation of a frame it no longer needs.
    pub fn with_body(replication_id: &str, first_seq: u64, mut body: Vec<u8>) -> Self {
        body.clear();
        FrameBuilder {
            replication_id: replication_id.to_string(),
            first_seq,
            count: 0,
            body,
        }
    }

    pub fn len(&self) -> usize {
        self.body.len()
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn count(&self) -> u64 {
        self.count
    }
    /// Seq the next pushed record gets.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.count
    }

    pub fn push(&mut self, rec: &Record) {
        encode_record(&mut self.body, rec);
        self.count += 1;
    }

    /// Pushes a write record from borrowed data (no intermediate copy).
    pub fn push_write(&mut self, disk: u32, offset: u64, data: &[u8]) {
        let b = &mut self.body;
        b.push(REC_WRITE);
        b.extend_from_slice(&disk.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(data);
        self.count += 1;
    }

    /// Seals the frame. Panics on an empty builder (a caller bug).
    pub fn finish(self) -> Frame {
        assert!(self.count > 0, "empty frame");
        let hash = *blake3::hash(&self.body).as_bytes();
        Frame {
            header: FrameHeader {
                replication_id: self.replication_id,
                first_seq: self.first_seq,
                last_seq: self.first_seq + self.count - 1,
                flags: 0,
                uncompressed_len: self.body.len() as u32,
                hash,
            },
            body: self.body,
        }
    }
}

fn encode_record(b: &mut Vec<u8>, rec: &Record) {
    match rec {
        Record::Write { disk, offset, data } => {
            b.push(REC_WRITE);
            b.extend_from_slice(&disk.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&(data.len() as u32).to_le_bytes());
            b.extend_from_slice(data);
        }
        Record::Zero { disk, offset, len } => {
            b.push(REC_ZERO);
            b.extend_from_slice(&disk.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
        }
        Record::Tag(t) => {
            b.push(REC_TAG);
            b.push(t.kind.code());
            b.extend_from_slice(&t.time_ms.to_le_bytes());
            put_str(b, &t.id);
            put_str(b, &t.group);
        }
        Record::ResyncBegin { disks, reason } => {
            b.push(REC_RESYNC_BEGIN);
            b.extend_from_slice(&(disks.len() as u32).to_le_bytes());
            for d in disks {
                b.extend_from_slice(&d.to_le_bytes());
            }
            put_str(b, reason);
        }
        Record::ResyncEnd => b.push(REC_RESYNC_END),
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    b.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    b.extend_from_slice(bytes);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHeader {
    pub replication_id: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub flags: u8,
    pub uncompressed_len: u32,
    pub hash: [u8; 32],
}

impl FrameHeader {
    /// The number of records the seq range says the body holds (exact for
    /// a parsed header, whose range is valid: see [`seq_range_flaw`]).
    pub fn record_count(&self) -> u64 {
        self.last_seq
            .saturating_sub(self.first_seq)
            .saturating_add(1)
    }
}

/// Why `first..=last` cannot be a frame's seq range, if it cannot: seqs
/// start at 1 (0 means "nothing yet" in resume and durable seqs), a range
/// is not reversed, and `u64::MAX` is never a seq, so `last + 1` (the next
/// seq every reader computes) cannot overflow.
pub fn seq_range_flaw(first: u64, last: u64) -> Option<&'static str> {
    if first == 0 {
        Some("seqs start at 1")
    } else if last < first {
        Some("the range is reversed")
    } else if last == u64::MAX {
        Some("u64::MAX is not a seq")
    } else {
        None
    }
}

/// A frame as it travels and is stored: header plus (maybe compressed) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: FrameHeader,
    pub body: Vec<u8>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() - self.pos < n {
            return Err(FrameError::Truncated {
                at: self.pos,
                needed: n,
                have: self.buf.len() - self.pos,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self) -> Result<String, FrameError> {
        let at = self.pos;
        let n = self.u16()? as usize;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| FrameError::Invalid {
            at,
            what: "string is not UTF-8".into(),
        })
    }
}

impl Frame {
    /// Encodes the frame to its wire/storage bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.write_to(&mut out);
        out
    }

    /// The first bytes of [`Frame::to_bytes`]: everything before the body,
    /// for a caller that writes the body from where it is.
    pub fn head_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.header.replication_id.len());
        encode_head(&self.header, self.body.len(), &mut out);
        out
    }

    /// Length of [`Frame::to_bytes`].
    pub fn encoded_len(&self) -> usize {
        64 + self.header.replication_id.len() + self.body.len()
    }

    /// Appends the wire/storage bytes to `out` (a buffer the caller reuses).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        encode(&self.header, &self.body, out);
    }

    /// Parses the header and takes the body as stored (a copy; see
    /// [`FrameRef::parse`] to borrow it). Does not verify the hash (see
    /// [`Frame::records`]).
    pub fn parse(bytes: &[u8]) -> Result<Frame, FrameError> {
        FrameRef::parse(bytes).map(|f| f.to_owned())
    }

    pub fn is_compressed(&self) -> bool {
        self.header.flags & FLAG_COMPRESSED != 0
    }

    /// Decompresses, verifies the hash and decodes every record, in seq
    /// order (record `i` has seq `first_seq + i`).
    pub fn records(&self) -> Result<Vec<Record>, FrameError> {
        records(&self.header, &self.body, Bytes::copy_from_slice)
    }
}

/// A frame parsed in place: its header, and its body still in the buffer it
/// arrived in. The process server and the master target take frames this
/// way, so the (1-4 MiB) body is not copied just to be checked or stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRef<'a> {
    pub header: FrameHeader,
    pub body: &'a [u8],
}

impl<'a> FrameRef<'a> {
    /// Parses the header in place; the body stays in `bytes`. Does not
    /// verify the hash (see [`FrameRef::records`]).
    pub fn parse(bytes: &'a [u8]) -> Result<FrameRef<'a>, FrameError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        let magic: [u8; 4] = r.take(4)?.try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(FrameError::BadVersion(version));
        }
        let flags = r.u8()?;
        let replication_id = r.string()?;
        let first_seq = r.u64()?;
        let last_seq = r.u64()?;
        let uncompressed_len = r.u32()?;
        let body_len = r.u32()? as usize;
        let hash: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
        if uncompressed_len as usize > MAX_BODY || body_len > MAX_BODY {
            return Err(FrameError::TooLarge(
                body_len.max(uncompressed_len as usize),
            ));
        }
        if let Some(why) = seq_range_flaw(first_seq, last_seq) {
            return Err(FrameError::BadSeqRange {
                replication: replication_id,
                first: first_seq,
                last: last_seq,
                why,
            });
        }
        let body = r.take(body_len)?;
        if r.pos != bytes.len() {
            return Err(FrameError::Invalid {
                at: r.pos,
                what: format!("{} trailing bytes after the body", bytes.len() - r.pos),
            });
        }
        Ok(FrameRef {
            header: FrameHeader {
                replication_id,
                first_seq,
                last_seq,
                flags,
                uncompressed_len,
                hash,
            },
            body,
        })
    }

    pub fn is_compressed(&self) -> bool {
        self.header.flags & FLAG_COMPRESSED != 0
    }

    /// The frame with its own copy of the body.
    pub fn to_owned(&self) -> Frame {
        Frame {
            header: self.header.clone(),
            body: self.body.to_vec(),
        }
    }

    /// The encoded bytes of this frame with its body compressed at `level`,
    /// or `None` when it is compressed already or would not shrink.
    pub fn compressed(&self, level: i32) -> Option<Vec<u8>> {
        if self.is_compressed() {
            return None;
        }
        let body = compressed_body(self.body, level)?;
        let header = FrameHeader {
            flags: self.header.flags | FLAG_COMPRESSED,
            ..self.header.clone()
        };
        let mut out = Vec::with_capacity(64 + header.replication_id.len() + body.len());
        encode(&header, &body, &mut out);
        Some(out)
    }

    /// The uncompressed body, checked against the header's hash.
    pub fn verified_body(&self) -> Result<std::borrow::Cow<'a, [u8]>, FrameError> {
        verified_body(&self.header, self.body)
    }

    /// Decompresses, verifies the hash and decodes every record, in seq
    /// order (record `i` has seq `first_seq + i`).
    pub fn records(&self) -> Result<Vec<Record>, FrameError> {
        records(&self.header, self.body, Bytes::copy_from_slice)
    }

    /// As [`FrameRef::records`], for a frame parsed from `owner`: the
    /// records' data are slices of `owner` (or of the decompressed body),
    /// so no record data is copied.
    ///
    /// # Panics
    /// If this frame was not parsed from `owner`.
    pub fn shared_records(&self, owner: &Bytes) -> Result<Vec<Record>, FrameError> {
        records(&self.header, self.body, |raw| owner.slice_ref(raw))
    }
}

/// Appends the wire/storage bytes of a frame to `out`.
fn encode(h: &FrameHeader, body: &[u8], out: &mut Vec<u8>) {
    encode_head(h, body.len(), out);
    out.extend_from_slice(body);
}

/// Appends the bytes of a frame that come before its body.
fn encode_head(h: &FrameHeader, body_len: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(h.flags);
    put_str(out, &h.replication_id);
    out.extend_from_slice(&h.first_seq.to_le_bytes());
    out.extend_from_slice(&h.last_seq.to_le_bytes());
    out.extend_from_slice(&h.uncompressed_len.to_le_bytes());
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&h.hash);
}

thread_local! {
    /// One zstd compression context per thread and level: `zstd::bulk::compress`
    /// creates, sizes and frees a context (and its tables) for every frame.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    /// One zstd decompression context per thread, for the same reason.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `body` compressed with zstd at `level`, when that makes it smaller.
fn compressed_body(body: &[u8], level: i32) -> Option<Vec<u8>> {
    let packed = COMPRESSOR.with_borrow_mut(|slot| {
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, c) = slot.as_mut()?;
        c.compress(body).ok()
    });
    packed.filter(|c| c.len() + 64 < body.len())
}

/// `body` decompressed into a buffer of exactly `len` bytes.
fn decompressed_body(body: &[u8], len: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with_borrow_mut(|slot| {
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        slot.as_mut().expect("just set").decompress(body, len)
    })
}

/// The uncompressed body of a frame, checked against its header's hash.
fn verified_body<'b>(
    header: &FrameHeader,
    body: &'b [u8],
) -> Result<std::borrow::Cow<'b, [u8]>, FrameError> {
    let body: std::borrow::Cow<'b, [u8]> = if header.flags & FLAG_COMPRESSED != 0 {
        let raw = decompressed_body(body, header.uncompressed_len as usize)
            .map_err(|e| FrameError::Decompress(e.to_string()))?;
        raw.into()
    } else {
        body.into()
    };
    let actual = blake3::hash(&body);
    if actual.as_bytes() != &header.hash || body.len() != header.uncompressed_len as usize {
        return Err(FrameError::HashMismatch {
            replication: header.replication_id.clone(),
            first: header.first_seq,
            last: header.last_seq,
            expected: hex(&header.hash),
            actual: actual.to_hex().to_string(),
        });
    }
    Ok(body)
}

/// Decompresses, verifies the hash and decodes every record of a frame.
/// `share` turns a raw (uncompressed) body into the buffer the records'
/// data slice; a decompressed body is shared as it is.
fn records(
    header: &FrameHeader,
    body: &[u8],
    share: impl FnOnce(&[u8]) -> Bytes,
) -> Result<Vec<Record>, FrameError> {
    // An owned frame's header may have been built by hand.
    if let Some(why) = seq_range_flaw(header.first_seq, header.last_seq) {
        return Err(FrameError::BadSeqRange {
            replication: header.replication_id.clone(),
            first: header.first_seq,
            last: header.last_seq,
            why,
        });
    }
    let shared = match verified_body(header, body)? {
        std::borrow::Cow::Borrowed(raw) => share(raw),
        std::borrow::Cow::Owned(decompressed) => Bytes::from(decompressed),
    };
    let recs = decode_shared(&shared)?;
    let expected = header.record_count();
    if recs.len() as u64 != expected {
        return Err(FrameError::CountMismatch {
            first: header.first_seq,
            last: header.last_seq,
            expected,
            actual: recs.len() as u64,
        });
    }
    Ok(recs)
}

/// Decodes a body into records whose data are slices of it, not copies.
pub fn decode_shared(shared: &Bytes) -> Result<Vec<Record>, FrameError> {
    let body: &[u8] = shared;
    let mut r = Reader { buf: body, pos: 0 };
    let mut out = Vec::new();
    while r.pos < body.len() {
        let at = r.pos;
        let kind = r.u8()?;
        let rec = match kind {
            REC_WRITE => {
                let disk = r.u32()?;
                let offset = r.u64()?;
                let len = r.u32()? as usize;
                let data = shared.slice_ref(r.take(len)?);
                Record::Write { disk, offset, data }
            }
            REC_ZERO => Record::Zero {
                disk: r.u32()?,
                offset: r.u64()?,
                len: r.u64()?,
            },
            REC_TAG => {
                let code = r.u8()?;
                let kind = TagKind::from_code(code).ok_or(FrameError::Invalid {
                    at,
                    what: format!("unknown tag kind {code}"),
                })?;
                let time_ms = r.u64()?;
                let id = r.string()?;
                let group = r.string()?;
                Record::Tag(Tag {
                    id,
                    kind,
                    time_ms,
                    group,
                })
            }
            REC_RESYNC_BEGIN => {
                let n = r.u32()? as usize;
                if n > 4096 {
                    return Err(FrameError::Invalid {
                        at,
                        what: format!("resync of {n} disks"),
                    });
                }
                let mut disks = Vec::with_capacity(n);
                for _ in 0..n {
                    disks.push(r.u32()?);
                }
                Record::ResyncBegin {
                    disks,
                    reason: r.string()?,
                }
            }
            REC_RESYNC_END => Record::ResyncEnd,
            other => return Err(FrameError::UnknownRecord { kind: other, at }),
        };
        out.push(rec);
    }
    Ok(out)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests;
