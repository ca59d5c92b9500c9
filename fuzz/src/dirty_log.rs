//! The agent's dirty-extent log (agent/src/dirty_log.rs) as the agent opens
//! it on start: read back, or replaced when it does not fit the disks.
//!
//! The input gives the disks' geometry and the file's bytes. The first
//! byte chooses: even, the file is the input's bytes as found; odd, it is a
//! log the agent wrote for that geometry with its bit words overwritten by
//! the input, so the read-back path is reached. Then the input sets and
//! clears extents, and the log is reopened to check what persisted.

use rebound_agent::dirty_log::{DirtyLog, Opened};

use crate::input::Input;
use crate::scratch::Scratch;

pub fn dirty_log(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let extents: Vec<u64> = (0..input.u8() % 4)
        .map(|_| u64::from(input.u16() % 4096))
        .collect();
    let scratch = Scratch::new("dirty.log");
    if mode & 1 == 0 {
        let len = usize::from(input.u16());
        scratch.write(input.take(len));
    } else {
        drop(DirtyLog::open(scratch.path(), &extents).expect("a fresh log opens"));
        let mut file = scratch.read();
        let header = header_len(&file);
        let words = input.take(file.len() - header);
        file[header..header + words.len()].copy_from_slice(words);
        if input.u8() & 3 == 0 {
            file.truncate(file.len().saturating_sub(usize::from(input.u8()) + 1));
        }
        scratch.write(&file);
    }

    let (log, opened) = DirtyLog::open(scratch.path(), &extents).expect("the log opens");
    let bits = check_bits(&log, &extents);
    if opened != Opened::Loaded {
        assert_eq!(
            bits.iter().map(Vec::len).sum::<usize>(),
            0,
            "a replaced log has bits"
        );
    }

    // Set and clear what the input says; a reopened log holds the sets made
    // durable and, after persist, the clears.
    let mut want = bits;
    for _ in 0..16 {
        if input.is_empty() || extents.is_empty() {
            break;
        }
        let disk = usize::from(input.u8()) % extents.len();
        if extents[disk] == 0 {
            continue;
        }
        let ext = u64::from(input.u16()) % extents[disk];
        if input.u8() & 1 == 0 {
            log.set_and_sync(disk as u32, &[ext]).expect("set_and_sync");
            assert!(log.is_durably_set(disk as u32, ext));
            if let Err(i) = want[disk].binary_search(&ext) {
                want[disk].insert(i, ext);
            }
        } else {
            log.clear(disk as u32, &[ext]).expect("clear");
            want[disk].retain(|&e| e != ext);
        }
    }
    log.persist().expect("persist");
    assert_eq!(check_bits(&log, &extents), want);
    drop(log);
    let (again, opened) = DirtyLog::open(scratch.path(), &extents).expect("the log reopens");
    assert_eq!(
        opened,
        Opened::Loaded,
        "a log the agent wrote does not load back"
    );
    assert_eq!(
        check_bits(&again, &extents),
        want,
        "the bits did not persist"
    );
}

/// The set extents of every disk, checked against the log's own counts.
fn check_bits(log: &DirtyLog, extents: &[u64]) -> Vec<Vec<u64>> {
    assert_eq!(log.disks(), extents.len());
    let bits: Vec<Vec<u64>> = (0..extents.len() as u32)
        .map(|d| log.set_extents(d))
        .collect();
    for (d, set) in bits.iter().enumerate() {
        assert_eq!(log.extents(d as u32), extents[d]);
        assert!(
            set.windows(2).all(|w| w[0] < w[1]),
            "set extents not ascending"
        );
        assert!(
            set.iter().all(|&e| e < extents[d]),
            "a bit past the disk's last extent"
        );
        assert!(set.iter().all(|&e| log.is_set(d as u32, e)));
    }
    assert_eq!(
        log.count(),
        bits.iter().map(|s| s.len() as u64).sum::<u64>()
    );
    bits
}

/// Where the bit words start in a log the agent wrote: its header is
/// padded to a 4 KiB page, and one page holds the header of the (at most
/// three) disks fuzzed here.
fn header_len(file: &[u8]) -> usize {
    file.len().min(4096)
}
