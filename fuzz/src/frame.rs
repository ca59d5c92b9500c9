//! Change frames (common/src/frame.rs) as the PS and the MT take them off
//! the wire.
//!
//! Random bytes almost never carry a valid blake3 of their body, so most
//! inputs are sealed first: the fuzzer's bytes pick the header fields and
//! the body, and the hash (and, when asked, zstd compression) is made
//! valid, so record decoding and the seq-range checks are reached. The
//! first byte chooses: `% 3 == 0` the bytes are a frame as they arrive,
//! otherwise they are sealed (`% 3 == 2` also compressed).

use prost::bytes::Bytes;
use rebound_common::frame::{decode_shared, Frame, FrameBuilder, FrameHeader, FrameRef, Record};

use crate::input::Input;

pub fn frame(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let compress = match mode % 3 {
        0 => {
            check_frame(input.rest());
            return;
        }
        1 => false,
        _ => true,
    };
    let sealed = seal(&mut input, mode & 0x80 != 0);
    if compress {
        // A header the decoder refuses (a seq range out of bounds) has
        // nothing to compress.
        let packed = FrameRef::parse(&sealed).ok().and_then(|f| f.compressed(1));
        if let Some(packed) = packed {
            check_frame(&packed);
            return;
        }
    }
    check_frame(&sealed);
}

/// A frame from the input with a valid hash. Its seq range spans the
/// records the body decodes to, unless `arbitrary_last` (or the body does
/// not decode): then the input gives `last_seq` as it likes.
fn seal(input: &mut Input<'_>, arbitrary_last: bool) -> Vec<u8> {
    let rid_len = usize::from(input.u8() % 24);
    let replication_id = String::from_utf8_lossy(input.take(rid_len)).into_owned();
    let first_seq = if mode_any_first(input) {
        input.u64()
    } else {
        1 + u64::from(input.u16())
    };
    let last_seq = if arbitrary_last {
        input.u64()
    } else {
        first_seq
    };
    let body = input.rest().to_vec();
    let last_seq = match decode_shared(&Bytes::copy_from_slice(&body)) {
        Ok(recs) if !arbitrary_last && !recs.is_empty() => {
            first_seq.saturating_add(recs.len() as u64 - 1)
        }
        _ => last_seq,
    };
    let frame = Frame {
        header: FrameHeader {
            replication_id,
            first_seq,
            last_seq,
            flags: 0,
            uncompressed_len: body.len() as u32,
            hash: *blake3::hash(&body).as_bytes(),
        },
        body,
    };
    frame.to_bytes()
}

/// Whether the input picks any first seq (most take a small valid one, so
/// the records behind the seq-range checks are reached).
fn mode_any_first(input: &mut Input<'_>) -> bool {
    input.u8() & 1 == 1
}

/// What a frame the decoder accepts must satisfy.
fn check_frame(bytes: &[u8]) {
    let Ok(parsed) = FrameRef::parse(bytes) else {
        return;
    };
    let h = &parsed.header;
    assert!(h.first_seq <= h.last_seq, "accepted a reversed seq range");
    // The header round trips byte for byte.
    assert_eq!(
        parsed.to_owned().to_bytes(),
        bytes,
        "frame re-encodes differently"
    );

    let owner = Bytes::copy_from_slice(bytes);
    let shared = FrameRef::parse(&owner).expect("the same bytes parse again");
    let copied = parsed.records();
    let sliced = shared.shared_records(&owner);
    let recs = match (copied, sliced) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "records() and shared_records() disagree");
            a
        }
        (Err(_), Err(_)) => return,
        (a, b) => panic!(
            "records() and shared_records() disagree: {:?} vs {:?}",
            a.map(|r| r.len()),
            b.map(|r| r.len())
        ),
    };
    let span = h
        .last_seq
        .checked_sub(h.first_seq)
        .and_then(|d| d.checked_add(1));
    assert_eq!(
        span,
        Some(recs.len() as u64),
        "frame {}..={} accepted with {} records",
        h.first_seq,
        h.last_seq,
        recs.len()
    );
    let body = parsed
        .verified_body()
        .expect("records decoded, so the body verifies");
    assert_eq!(reencode(&h.replication_id, h.first_seq, &recs), *body);
}

/// The body a builder makes of `recs`, and its header checked against the
/// seq range the records span.
fn reencode(rid: &str, first_seq: u64, recs: &[Record]) -> Vec<u8> {
    let mut b = FrameBuilder::new(rid, first_seq);
    for r in recs {
        b.push(r);
    }
    let sealed = b.finish();
    assert_eq!(sealed.header.first_seq, first_seq);
    assert_eq!(
        sealed.header.last_seq - sealed.header.first_seq + 1,
        recs.len() as u64
    );
    sealed.body
}
