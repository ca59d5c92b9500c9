//! PS segment entries (process-server/src/segment.rs) as the PS scans its
//! cache on start: where the valid entries of a segment end, and why.
//!
//! The first byte chooses: even, the bytes are a segment file as found;
//! odd, the file is built from entries the input describes — frames whose
//! seq ranges continue, overlap or skip the run, arbitrary bytes under a
//! valid checksum — then damaged where the input says, so the checks
//! behind the checksum (frame header, seq continuity) are reached.

use rebound_common::frame::{FrameBuilder, Record};
use rebound_ps::segment::{self, Cut};

use crate::input::Input;
use crate::scratch::Scratch;
use crate::tail::check_valid_prefix;

pub fn ps_segment(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let prev_seq = match input.u8() % 4 {
        0 => 0,
        1 => u64::from(input.u16()),
        2 => u64::MAX - u64::from(input.u8()),
        _ => input.u64(),
    };
    let name_seq = input.u64();
    assert_eq!(
        segment::parse_file_name(&segment::file_name(name_seq)),
        Some(name_seq)
    );
    let file = if mode & 1 == 0 {
        input.rest().to_vec()
    } else {
        built(&mut input, prev_seq)
    };
    check_scan(&file, prev_seq);
}

fn check_scan(file: &[u8], prev_seq: u64) {
    let scratch = Scratch::with("segment", file);
    let scan = segment::scan(scratch.path(), prev_seq).expect("scan of a readable file");
    check_valid_prefix(file, scan.file_len, scan.valid_len, scan.cut.as_ref());
    assert!(scan.last_seq >= prev_seq, "the run went backwards");
    if scan.entries == 0 {
        assert_eq!(scan.last_seq, prev_seq);
    }
    if let Some(Cut::Discontinuous {
        first_seq,
        last_seq,
        ..
    }) = &scan.cut
    {
        assert!(
            first_seq <= last_seq,
            "an entry with a reversed seq range was read"
        );
    }

    // Walking the valid entries one by one gives the same run.
    let f = std::fs::File::open(scratch.path()).expect("scratch segment opens");
    let (mut offset, mut held, mut entries) = (0u64, prev_seq, 0u64);
    while let Some((meta, bytes)) =
        segment::read_entry(&f, offset, scan.valid_len).expect("a valid entry reads")
    {
        assert_eq!(meta.offset, offset);
        assert_eq!(bytes.len(), meta.frame_len as usize);
        assert!(meta.first_seq <= held.saturating_add(1) && meta.last_seq > held);
        assert_eq!(
            segment::frame_seqs(&bytes).expect("a valid entry holds a frame"),
            (meta.first_seq, meta.last_seq)
        );
        held = meta.last_seq;
        offset = meta.end();
        entries += 1;
    }
    assert_eq!(
        (offset, held, entries),
        (scan.valid_len, scan.last_seq, scan.entries)
    );

    // Cutting the tail off, as the PS does, leaves a clean segment.
    scratch.write(&file[..scan.valid_len as usize]);
    let again = segment::scan(scratch.path(), prev_seq).expect("scan of a readable file");
    assert!(
        again.cut.is_none(),
        "a cut segment still has a cut: {:?}",
        again.cut
    );
    assert_eq!(
        (again.valid_len, again.entries, again.last_seq),
        (scan.valid_len, scan.entries, scan.last_seq)
    );
}

/// A segment of entries from the input.
fn built(input: &mut Input<'_>, prev_seq: u64) -> Vec<u8> {
    let mut file = Vec::new();
    let mut held = prev_seq;
    let mut n = 0;
    while !input.is_empty() && n < 64 {
        n += 1;
        match input.u8() % 8 {
            0 => {
                if !file.is_empty() {
                    let at = usize::from(input.u16()) % file.len();
                    file[at] ^= input.u8() | 1;
                }
            }
            1 => {
                let keep = file.len().saturating_sub(usize::from(input.u8()) + 1);
                file.truncate(keep);
            }
            2 => {
                let len = usize::from(input.u8());
                let bytes = input.take(len);
                file.extend_from_slice(&segment::entry_header(bytes));
                file.extend_from_slice(bytes);
            }
            _ => {
                let step = i64::from(input.u8() % 8) - 3;
                let first = held.saturating_add_signed(step).max(1);
                let count = 1 + u64::from(input.u8() % 4);
                let mut b = FrameBuilder::new("r", first);
                for i in 0..count {
                    if first.checked_add(i).is_none() {
                        break;
                    }
                    b.push(&Record::ResyncEnd);
                }
                if b.is_empty() || first.checked_add(b.count()).is_none() {
                    continue;
                }
                let held_by_frame = first + b.count() - 1;
                let bytes = b.finish().to_bytes();
                file.extend_from_slice(&segment::entry_header(&bytes));
                file.extend_from_slice(&bytes);
                held = held.max(held_by_frame);
            }
        }
    }
    file
}
