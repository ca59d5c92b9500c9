//! The frame codec's tests: round trips, borrowed views, refused
//! corruption, impossible seq ranges and counts, and garbage.

use super::*;

fn sample() -> Frame {
    let mut b = FrameBuilder::new("m1-ab", 7);
    b.push_write(0, 4096, &[7u8; 8192]);
    b.push(&Record::Zero {
        disk: 1,
        offset: 0,
        len: 1 << 20,
    });
    b.push(&Record::ResyncBegin {
        disks: vec![0, 1],
        reason: "dirty".into(),
    });
    b.push(&Record::ResyncEnd);
    b.push(&Record::Tag(Tag {
        id: "p1".into(),
        kind: TagKind::App,
        time_ms: 42,
        group: "g".into(),
    }));
    b.finish()
}

#[test]
fn roundtrip_raw_and_compressed() {
    let f = sample();
    assert_eq!(f.header.first_seq, 7);
    assert_eq!(f.header.last_seq, 11);
    let g = Frame::parse(&f.to_bytes()).unwrap();
    assert_eq!(g, f);
    let packed = FrameRef::parse(&g.to_bytes())
        .unwrap()
        .compressed(1)
        .unwrap();
    let h = Frame::parse(&packed).unwrap();
    assert!(h.is_compressed());
    let recs = h.records().unwrap();
    assert_eq!(recs.len(), 5);
    assert_eq!(
        recs[0],
        Record::Write {
            disk: 0,
            offset: 4096,
            data: vec![7u8; 8192].into()
        }
    );
    for r in &recs {
        let mut v = Vec::new();
        encode_record(&mut v, r);
        assert_eq!(v.len(), r.encoded_len());
    }
}

#[test]
fn a_view_borrows_the_body_and_compresses_like_the_owned_frame() {
    let f = sample();
    let bytes = f.to_bytes();
    let v = FrameRef::parse(&bytes).unwrap();
    assert_eq!(
        v.body.as_ptr(),
        bytes[bytes.len() - f.body.len()..].as_ptr()
    );
    assert_eq!(v.to_owned(), f);
    assert_eq!(v.records().unwrap(), f.records().unwrap());
    // Shared records point into the buffer the frame came in.
    let owner = Bytes::from(bytes.clone());
    let recs = FrameRef::parse(&owner)
        .unwrap()
        .shared_records(&owner)
        .unwrap();
    assert_eq!(recs, f.records().unwrap());
    let Record::Write { data, .. } = &recs[0] else {
        panic!("first record is a write")
    };
    let within = owner.as_ptr_range();
    assert!(within.contains(&data.as_ptr()));
    let packed = v.compressed(1).unwrap();
    assert!(packed.len() < bytes.len());
    let w = FrameRef::parse(&packed).unwrap();
    assert_eq!(w.header.hash, f.header.hash);
    assert!(w.is_compressed());
    assert_eq!(w.compressed(1), None);
    assert_eq!(w.records().unwrap(), f.records().unwrap());
}

#[test]
fn corrupt_body_is_refused() {
    let f = sample();
    let mut bytes = f.to_bytes();
    let n = bytes.len();
    bytes[n - 20] ^= 0xff;
    let g = Frame::parse(&bytes).unwrap();
    assert!(matches!(g.records(), Err(FrameError::HashMismatch { .. })));
    let v = FrameRef::parse(&bytes).unwrap();
    assert!(matches!(v.records(), Err(FrameError::HashMismatch { .. })));
}

/// `sample()` re-encoded with the seq range `first..=last` (the body
/// and its hash unchanged).
fn with_range(first: u64, last: u64) -> Vec<u8> {
    let mut f = sample();
    f.header.first_seq = first;
    f.header.last_seq = last;
    f.to_bytes()
}

#[test]
fn impossible_seq_ranges_are_refused_at_parse() {
    for (first, last, why) in [
        (0, 4, "seqs start at 1"),
        (0, u64::MAX, "seqs start at 1"),
        (9, 8, "reversed"),
        (u64::MAX - 4, u64::MAX, "u64::MAX"),
    ] {
        let e = FrameRef::parse(&with_range(first, last)).unwrap_err();
        assert!(
            matches!(&e, FrameError::BadSeqRange { first: f, last: l, .. } if *f == first && *l == last),
            "{first}..={last}: {e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("m1-ab") && msg.contains(why), "{msg}");
        // A hand-built owned frame is refused the same way, no overflow.
        let mut f = sample();
        f.header.first_seq = first;
        f.header.last_seq = last;
        assert!(matches!(f.records(), Err(FrameError::BadSeqRange { .. })));
    }
    assert!(FrameRef::parse(&with_range(1, u64::MAX - 1)).is_ok());
}

#[test]
fn records_must_fill_the_seq_range_exactly() {
    // sample() holds 5 records.
    for (first, last) in [(7, 9), (7, 12), (1, 1), (100, 1_000_000)] {
        let bytes = with_range(first, last);
        let e = FrameRef::parse(&bytes).unwrap().records().unwrap_err();
        assert!(
            matches!(e, FrameError::CountMismatch { expected, actual: 5, .. } if expected == last - first + 1),
            "{first}..={last}: {e:?}"
        );
    }
    assert_eq!(
        FrameRef::parse(&with_range(3, 7))
            .unwrap()
            .records()
            .unwrap()
            .len(),
        5
    );
    // An empty body holds no record: never a frame.
    let empty = Frame {
        header: FrameHeader {
            replication_id: "m1".into(),
            first_seq: 1,
            last_seq: 1,
            flags: 0,
            uncompressed_len: 0,
            hash: *blake3::hash(&[]).as_bytes(),
        },
        body: Vec::new(),
    };
    let e = Frame::parse(&empty.to_bytes())
        .unwrap()
        .records()
        .unwrap_err();
    assert!(
        matches!(e, FrameError::CountMismatch { actual: 0, .. }),
        "{e:?}"
    );
}

#[test]
fn garbage_never_panics() {
    let f = sample().to_bytes();
    for cut in 0..f.len() {
        let _ = Frame::parse(&f[..cut]).map(|g| g.records());
    }
    let mut x = 12345u64;
    for _ in 0..2000 {
        let mut b = f.clone();
        for _ in 0..4 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let i = (x >> 33) as usize % b.len();
            b[i] = (x >> 20) as u8;
        }
        let _ = Frame::parse(&b).map(|g| g.records());
        let _ = decode_shared(&b.into());
    }
}
