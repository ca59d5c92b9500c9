//! Undo-journal records (master-target/src/journal.rs) as the MT scans a
//! journal file on restart and reads a saved block for a view.
//!
//! The first byte chooses: even, the bytes are a journal file as found;
//! odd, the file is built from valid records (`journal::encode`) that the
//! input describes, then damaged where the input says, so the checksum
//! checks and the torn-tail rules are reached.

use std::fs::File;

use rebound_mt::journal::{self, BLOCK, HEADER_LEN};

use crate::input::Input;
use crate::scratch::Scratch;
use crate::tail::check_valid_prefix;

/// Disks the scanned replication has; records for others are garbage.
const DISKS: u32 = 2;

pub fn undo_journal(data: &[u8]) {
    let mut input = Input::new(data);
    let (file, records) = if input.u8() & 1 == 0 {
        (input.rest().to_vec(), None)
    } else {
        built(&mut input)
    };
    let scratch = Scratch::with("journal", &file);
    let f = File::open(scratch.path()).expect("scratch journal opens");
    let scan = journal::scan(&f, 0, |d| d < DISKS).expect("scan of a readable file");

    check_valid_prefix(&file, scan.file_len, scan.valid_len, scan.problem.as_ref());
    // Records are contiguous from the start, each checks out on its own and
    // through read_block, and they end where the valid data ends.
    let mut end = 0u64;
    let mut block = vec![0u8; BLOCK];
    for &(key, offset) in &scan.entries {
        assert_eq!(offset, end, "records are not contiguous");
        let rec = &file[offset as usize..];
        let saved = journal::check_record(rec, offset, key).expect("a scanned record checks out");
        journal::read_block(&f, offset, key, &mut block).expect("a scanned record reads back");
        match saved {
            Some(d) => assert_eq!(d, &block[..]),
            None => assert!(block.iter().all(|&b| b == 0)),
        }
        end = offset + (HEADER_LEN + saved.map_or(0, <[u8]>::len)) as u64;
    }
    assert_eq!(end, scan.valid_len);

    // Cutting the tail off, as the MT does, leaves a clean journal with the
    // same records; scanning from any record's offset finds the rest.
    scratch.write(&file[..scan.valid_len as usize]);
    let cut = File::open(scratch.path()).expect("scratch journal opens");
    let again = journal::scan(&cut, 0, |d| d < DISKS).expect("scan of a readable file");
    assert!(again.problem.is_none(), "a cut journal still has a problem");
    assert_eq!(again.entries, scan.entries);
    if let Some(&(_, mid)) = scan.entries.get(scan.entries.len() / 2) {
        let tail = journal::scan(&cut, mid, |d| d < DISKS).expect("scan of a readable file");
        let from = scan
            .entries
            .iter()
            .position(|&(_, o)| o == mid)
            .expect("mid is an entry");
        assert_eq!(tail.entries, scan.entries[from..]);
    }

    // Undamaged records all come back with their data.
    if let Some(records) = records {
        assert_eq!(scan.entries.len(), records.len());
        for (&(key, offset), (want_key, data)) in scan.entries.iter().zip(&records) {
            assert_eq!(key, *want_key);
            let saved = journal::check_record(&file[offset as usize..], offset, key)
                .expect("a scanned record checks out");
            assert_eq!(saved.unwrap_or(&[0u8; BLOCK][..]), &data[..]);
        }
    }
}

/// A record's key and the block it saved.
type Saved = (u64, Vec<u8>);

/// A journal of valid records from the input; with damage (a flipped byte
/// or a cut tail) the records are not returned, only the file.
fn built(input: &mut Input<'_>) -> (Vec<u8>, Option<Vec<Saved>>) {
    let mut file = Vec::new();
    let mut records = Vec::new();
    let mut damaged = false;
    while !input.is_empty() && records.len() < 64 {
        let op = input.u8();
        match op % 8 {
            0 => {
                if !file.is_empty() {
                    let at = usize::from(input.u16()) % file.len();
                    file[at] ^= input.u8() | 1;
                    damaged = true;
                }
            }
            1 => {
                let keep = file
                    .len()
                    .saturating_sub(usize::from(input.u16() % 4096) + 1);
                file.truncate(keep);
                damaged = true;
            }
            _ => {
                let disk = u32::from(input.u8()) % (DISKS + 1);
                let block_no = input.u64() & ((1 << 48) - 1);
                let fill = input.u8();
                let mut data = vec![0u8; BLOCK];
                if fill != 0 {
                    let head = input.take(64);
                    data.fill(fill);
                    data[..head.len()].copy_from_slice(head);
                }
                journal::encode(&mut file, disk, block_no, &data);
                if disk >= DISKS {
                    damaged = true;
                }
                records.push((journal::key(disk, block_no), data));
            }
        }
    }
    (file, (!damaged).then_some(records))
}
