use super::*;
use std::os::unix::fs::FileExt;

const MIB: u64 = 1 << 20;

/// A disk file of `size` bytes with a pattern that differs per block, and
/// an empty journal for it at `<dir>/j/disk0.journal`.
struct Fixture {
    dir: tempfile::TempDir,
    disk_path: PathBuf,
    disk: File,
    journal: PathBuf,
    size: u64,
}

impl Fixture {
    fn new(size: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let disk_path = dir.path().join("disk.img");
        let data: Vec<u8> = (0..size)
            .map(|i| (i / 7 % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        std::fs::write(&disk_path, data).unwrap();
        let disk = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk_path)
            .unwrap();
        let journal = dir.path().join("j/disk0.journal");
        create(&journal, size).unwrap();
        Fixture {
            dir,
            disk_path,
            disk,
            journal,
            size,
        }
    }

    fn writer(&self) -> JournalWriter {
        JournalWriter::open(&self.journal, self.size).unwrap()
    }

    fn records(&self) -> Vec<Record> {
        JournalReader::open(&self.journal)
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    fn disk_hash(&self) -> blake3::Hash {
        blake3::hash(&std::fs::read(&self.disk_path).unwrap())
    }
}

#[test]
fn block_set_merges_and_reports_the_missing_runs() {
    let mut s = BlockSet::default();
    s.insert(10, 20);
    s.insert(30, 40);
    assert_eq!(s.missing(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
    assert_eq!(s.missing(12, 18), vec![]);
    assert_eq!(s.missing(15, 35), vec![(20, 30)]);
    s.insert(20, 30);
    assert_eq!(s.runs.len(), 1);
    assert_eq!(s.len(), 30);
    s.insert(5, 12);
    s.insert(40, 41);
    assert_eq!(s.missing(0, 50), vec![(0, 5), (41, 50)]);
}

#[test]
fn round_trip_saves_the_pre_images() {
    let f = Fixture::new(4 * MIB);
    assert!(!has_records(&f.journal).unwrap());
    let mut w = f.writer();
    // Unaligned: blocks 0 and 1, then a run longer than one record.
    assert_eq!(w.save_before_write(&f.disk, 100, 5000).unwrap(), 2);
    assert_eq!(
        w.save_before_write(&f.disk, MIB, 2 * MIB + 4096).unwrap(),
        513
    );
    assert_eq!(w.saved_blocks(), 515);
    let recs = f.records();
    assert_eq!(recs.len(), 4, "1 MiB at most per record");
    for r in &recs {
        let mut want = vec![0u8; r.data.len()];
        f.disk.read_exact_at(&mut want, r.offset).unwrap();
        assert_eq!(r.data, want, "record at {}", r.offset);
    }
    assert!(has_records(&f.journal).unwrap());
}

#[test]
fn a_torn_tail_is_cut_at_open() {
    let f = Fixture::new(MIB);
    let mut w = f.writer();
    w.save_before_write(&f.disk, 0, 8192).unwrap();
    w.save_before_write(&f.disk, 65536, 4096).unwrap();
    drop(w);
    let good = std::fs::metadata(&f.journal).unwrap().len();
    // A torn record: header and part of the data of a third one.
    let jf = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f.journal)
        .unwrap();
    let mut torn = Vec::new();
    torn.extend_from_slice(&(8192u64).to_le_bytes());
    torn.extend_from_slice(&(4096u32).to_le_bytes());
    torn.extend_from_slice(&[7u8; 32]);
    torn.extend_from_slice(&[1u8; 1000]);
    jf.write_all_at(&torn, good).unwrap();
    assert_eq!(f.records().len(), 2, "readers stop at the torn tail");
    let mut w = f.writer();
    assert_eq!(std::fs::metadata(&f.journal).unwrap().len(), good, "cut");
    assert_eq!(w.saved_blocks(), 3);
    assert_eq!(w.save_before_write(&f.disk, 8192, 4096).unwrap(), 1);
    assert_eq!(f.records().len(), 3);

    // A record whose hash does not match is cut the same way.
    drop(w);
    let len = std::fs::metadata(&f.journal).unwrap().len();
    let mut b = [0u8; 1];
    jf.read_exact_at(&mut b, len - 1).unwrap();
    jf.write_all_at(&[b[0] ^ 1], len - 1).unwrap();
    let w = f.writer();
    assert_eq!(w.saved_blocks(), 3, "the damaged record is cut");
    assert_eq!(f.records().len(), 2);
}

#[test]
fn each_block_is_saved_once_across_reopen() {
    let f = Fixture::new(MIB);
    let mut w = f.writer();
    assert_eq!(w.save_before_write(&f.disk, 0, 16384).unwrap(), 4);
    assert_eq!(w.save_before_write(&f.disk, 4096, 4096).unwrap(), 0);
    drop(w);
    let mut w = f.writer();
    assert_eq!(w.saved_blocks(), 4);
    assert_eq!(w.save_before_write(&f.disk, 8192, 16384).unwrap(), 2);
    let blocks: u64 = f.records().iter().map(Record::blocks).sum();
    assert_eq!(blocks, 6);
}

#[test]
fn restore_gives_the_old_content_exactly() {
    // Not a whole number of blocks: the last one is partial.
    let size = 3 * MIB + 1000;
    let f = Fixture::new(size);
    let before = f.disk_hash();
    let mut w = f.writer();
    let writes: [(u64, u64); 6] = [
        (0, 4096),
        (10, 70_000),
        (MIB - 3, 2 * MIB),
        (5000, 100),
        (size - 500, 500),
        (size - 9000, 9000),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        w.save_before_write(&f.disk, off, len).unwrap();
        f.disk
            .write_all_at(&vec![i as u8 + 1; len as usize], off)
            .unwrap();
    }
    w.save_before_zero(&f.disk, 2 * MIB, 4096 * 3).unwrap();
    f.disk.write_all_at(&[0u8; 4096 * 3], 2 * MIB).unwrap();
    assert_ne!(f.disk_hash(), before);
    drop(w);
    let _fence = fence(&f.journal, Duration::from_secs(1)).unwrap();
    assert!(restore_into(&f.journal, &f.disk).unwrap() > 0);
    assert_eq!(std::fs::metadata(&f.disk_path).unwrap().len(), size);
    assert_eq!(f.disk_hash(), before);
}

#[test]
fn zeroing_does_not_save_blocks_that_are_zero_already() {
    let f = Fixture::new(MIB);
    f.disk.set_len(0).unwrap();
    f.disk.set_len(MIB).unwrap();
    f.disk.write_all_at(&[9u8; 4096], 8192).unwrap();
    let mut w = f.writer();
    assert_eq!(w.save_before_zero(&f.disk, 0, MIB).unwrap(), 1);
    assert_eq!(w.save_before_write(&f.disk, 0, 16384).unwrap(), 3);
}

#[test]
fn out_of_range_and_foreign_files_are_refused() {
    let f = Fixture::new(MIB);
    let e = JournalWriter::open(&f.journal, 2 * MIB).unwrap_err();
    assert!(matches!(e, JournalError::SizeMismatch { .. }), "{e}");
    let mut w = f.writer();
    let e = w.save_before_write(&f.disk, MIB - 10, 20).unwrap_err();
    assert!(matches!(e, JournalError::OutOfRange { .. }), "{e}");
    let other = f.dir.path().join("other");
    std::fs::write(&other, [0u8; 64]).unwrap();
    let e = JournalReader::open(&other).unwrap_err();
    assert!(matches!(e, JournalError::NotAJournal { .. }), "{e}");
    let none = f.dir.path().join("none");
    let e = JournalWriter::open(&none, MIB).unwrap_err();
    assert!(matches!(e, JournalError::Missing { .. }), "{e}");
    assert!(!has_records(&none).unwrap());
}

#[test]
fn a_second_writer_is_refused_naming_the_path() {
    let f = Fixture::new(MIB);
    let _w = f.writer();
    let e = JournalWriter::open(&f.journal, MIB).unwrap_err();
    assert!(matches!(e, JournalError::Locked { .. }), "{e}");
    assert!(
        e.to_string().contains(&f.journal.display().to_string()),
        "{e}"
    );
}

#[test]
fn fence_waits_while_held_and_succeeds_after_release() {
    let f = Fixture::new(MIB);
    let w = f.writer();
    let e = fence(&f.journal, Duration::from_millis(200)).unwrap_err();
    assert!(matches!(e, JournalError::StillHeld { .. }), "{e}");
    assert!(
        e.to_string().contains(&f.journal.display().to_string()),
        "{e}"
    );
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        drop(w);
    });
    let held = fence(&f.journal, Duration::from_secs(30)).unwrap();
    assert_eq!(held.path(), f.journal);
    release.join().unwrap();
    let e = JournalWriter::open(&f.journal, MIB).unwrap_err();
    assert!(
        matches!(e, JournalError::Locked { .. }),
        "the fence holds it: {e}"
    );
    drop(held);
    let e = fence(&f.dir.path().join("none"), Duration::from_millis(10)).unwrap_err();
    assert!(matches!(e, JournalError::Missing { .. }), "{e}");
}

#[test]
fn the_writer_notices_its_journal_was_removed_or_replaced() {
    let f = Fixture::new(MIB);
    let w = f.writer();
    assert!(w.is_at_path().unwrap());
    create(&f.journal, MIB).unwrap();
    assert!(!w.is_at_path().unwrap(), "replaced");
    remove(&f.journal).unwrap();
    assert!(!w.is_at_path().unwrap(), "removed");
    remove(&f.journal).unwrap();
}

#[test]
fn the_state_is_in_the_header_and_only_an_open_journal_is_written() {
    let f = Fixture::new(MIB);
    assert_eq!(read_state(&f.journal).unwrap(), (JournalState::Open, MIB));
    let mut w = f.writer();
    w.save_before_write(&f.disk, 0, 4096).unwrap();
    drop(w);
    for state in [JournalState::Fenced, JournalState::Committed] {
        replace(&f.journal, MIB, state).unwrap();
        assert_eq!(read_state(&f.journal).unwrap(), (state, MIB));
        assert!(!has_records(&f.journal).unwrap(), "{state}");
        let e = JournalWriter::open(&f.journal, MIB).unwrap_err();
        assert!(
            matches!(e, JournalError::NotOpen { state: s, .. } if s == state),
            "{e}"
        );
        assert!(
            e.to_string().contains(&f.journal.display().to_string()),
            "{e}"
        );
        let before = f.disk_hash();
        assert_eq!(restore_into(&f.journal, &f.disk).unwrap(), 0);
        assert_eq!(f.disk_hash(), before);
    }
    let e = read_state(&f.dir.path().join("none")).unwrap_err();
    assert!(matches!(e, JournalError::Missing { .. }), "{e}");
    // A header with an unknown state is not a journal.
    let mut h = std::fs::read(&f.journal).unwrap();
    h[24] = 9;
    std::fs::write(&f.journal, &h).unwrap();
    let e = read_state(&f.journal).unwrap_err();
    assert!(matches!(e, JournalError::NotAJournal { .. }), "{e}");
}

/// Flips one byte of the journal at `at`.
fn flip(path: &Path, at: u64) {
    let jf = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    jf.read_exact_at(&mut b, at).unwrap();
    jf.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

#[test]
fn damage_before_a_later_batch_is_refused_not_cut() {
    let f = Fixture::new(4 * MIB);
    let mut w = f.writer();
    w.save_before_write(&f.disk, 0, 4096).unwrap();
    w.save_before_write(&f.disk, MIB, 4096).unwrap();
    w.save_before_write(&f.disk, 2 * MIB, 4096).unwrap();
    drop(w);
    let len = std::fs::metadata(&f.journal).unwrap().len();
    // A bit flip in the data of the first record (first batch).
    flip(&f.journal, HEADER_LEN + RECORD_HEADER_LEN + 100);
    let e = JournalWriter::open(&f.journal, 4 * MIB).unwrap_err();
    assert!(
        matches!(e, JournalError::Damaged { offset, .. } if offset == HEADER_LEN),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains(&f.journal.display().to_string()), "{msg}");
    assert!(msg.contains(&format!("offset {HEADER_LEN}")), "{msg}");
    assert_eq!(std::fs::metadata(&f.journal).unwrap().len(), len, "not cut");
    assert!(matches!(
        restore_into(&f.journal, &f.disk).unwrap_err(),
        JournalError::Damaged { .. }
    ));
    assert!(JournalReader::open(&f.journal).is_err());
    assert!(has_records(&f.journal).is_err());
}

#[test]
fn a_bad_record_inside_the_last_batch_is_a_torn_tail() {
    let f = Fixture::new(4 * MIB);
    let mut w = f.writer();
    w.save_before_write(&f.disk, 3 * MIB, 4096).unwrap();
    // One batch of three records (1 MiB each at most).
    w.save_before_write(&f.disk, 0, 3 * MIB).unwrap();
    drop(w);
    assert_eq!(f.records().len(), 4);
    // Its first record did not reach the disk, the later ones did (a
    // crash may persist a batch's pages in any order).
    let first_of_batch = HEADER_LEN + RECORD_HEADER_LEN + 4096;
    flip(&f.journal, first_of_batch + RECORD_HEADER_LEN + 7);
    assert_eq!(f.records().len(), 1, "readers stop at the torn batch");
    let w = f.writer();
    assert_eq!(w.saved_blocks(), 1, "the torn batch is cut");
    assert_eq!(std::fs::metadata(&f.journal).unwrap().len(), first_of_batch);
}

#[test]
fn zeroing_skips_the_holes_of_the_disk_file_and_restores_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    let size = 64 * MIB;
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    disk.set_len(size).unwrap();
    disk.write_all_at(&[9u8; 8192], 40 * MIB).unwrap();
    disk.write_all_at(&[8u8; 4096], size - 4096).unwrap();
    let before = blake3::hash(&std::fs::read(&path).unwrap());
    let journal = dir.path().join("j");
    create(&journal, size).unwrap();
    let mut w = JournalWriter::open(&journal, size).unwrap();
    assert_eq!(w.save_before_zero(&disk, 0, size).unwrap(), 3);
    drop(w);
    disk.write_all_at(&vec![0u8; 8192], 40 * MIB).unwrap();
    disk.write_all_at(&[0u8; 4096], size - 4096).unwrap();
    assert_eq!(restore_into(&journal, &disk).unwrap(), 3);
    assert_eq!(blake3::hash(&std::fs::read(&path).unwrap()), before);
}
