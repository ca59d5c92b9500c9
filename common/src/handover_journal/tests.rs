use super::*;
use std::os::unix::fs::FileExt;

const MIB: u64 = 1 << 20;

/// A disk file of `size` bytes filled with a pattern that differs per block.
fn disk(dir: &Path, size: u64) -> (PathBuf, File) {
    let p = dir.join("disk.img");
    let data: Vec<u8> = (0..size)
        .map(|i| (i / 7 % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    std::fs::write(&p, data).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    (p, f)
}

fn hash_file(p: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(p).unwrap())
}

fn records(p: &Path) -> Vec<Record> {
    JournalReader::open(p)
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
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
    let dir = tempfile::tempdir().unwrap();
    let (_, d) = disk(dir.path(), 4 * MIB);
    let j = dir.path().join("j/disk0.journal");
    create(&j, 4 * MIB).unwrap();
    assert!(!has_records(&j).unwrap());
    let mut w = JournalWriter::open(&j, 4 * MIB).unwrap();
    // Unaligned: blocks 0 and 1, then a run longer than one record.
    assert_eq!(w.save_before_write(&d, 100, 5000).unwrap(), 2);
    assert_eq!(w.save_before_write(&d, MIB, 2 * MIB + 4096).unwrap(), 513);
    assert_eq!(w.saved_blocks(), 515);
    let recs = records(&j);
    assert_eq!(recs.len(), 4, "1 MiB at most per record");
    for r in &recs {
        let mut want = vec![0u8; r.data.len()];
        d.read_exact_at(&mut want, r.offset).unwrap();
        assert_eq!(r.data, want, "record at {}", r.offset);
    }
    assert!(has_records(&j).unwrap());
}

#[test]
fn a_torn_tail_is_cut_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (_, d) = disk(dir.path(), MIB);
    let j = dir.path().join("disk0.journal");
    create(&j, MIB).unwrap();
    let mut w = JournalWriter::open(&j, MIB).unwrap();
    w.save_before_write(&d, 0, 8192).unwrap();
    w.save_before_write(&d, 65536, 4096).unwrap();
    drop(w);
    let good = std::fs::metadata(&j).unwrap().len();
    // A torn record: header and part of the data of a third one.
    let f = OpenOptions::new().read(true).write(true).open(&j).unwrap();
    let mut torn = Vec::new();
    torn.extend_from_slice(&(8192u64).to_le_bytes());
    torn.extend_from_slice(&(4096u32).to_le_bytes());
    torn.extend_from_slice(&[7u8; 32]);
    torn.extend_from_slice(&[1u8; 1000]);
    f.write_all_at(&torn, good).unwrap();
    assert_eq!(records(&j).len(), 2, "readers stop at the torn tail");
    let mut w = JournalWriter::open(&j, MIB).unwrap();
    assert_eq!(std::fs::metadata(&j).unwrap().len(), good, "cut");
    assert_eq!(w.saved_blocks(), 3);
    assert_eq!(w.save_before_write(&d, 8192, 4096).unwrap(), 1);
    assert_eq!(records(&j).len(), 3);

    // A record whose hash does not match is cut the same way.
    drop(w);
    let len = std::fs::metadata(&j).unwrap().len();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, len - 1).unwrap();
    f.write_all_at(&[b[0] ^ 1], len - 1).unwrap();
    let w = JournalWriter::open(&j, MIB).unwrap();
    assert_eq!(w.saved_blocks(), 3, "the damaged record is cut");
    assert_eq!(records(&j).len(), 2);
}

#[test]
fn each_block_is_saved_once_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (_, d) = disk(dir.path(), MIB);
    let j = dir.path().join("disk0.journal");
    create(&j, MIB).unwrap();
    let mut w = JournalWriter::open(&j, MIB).unwrap();
    assert_eq!(w.save_before_write(&d, 0, 16384).unwrap(), 4);
    assert_eq!(w.save_before_write(&d, 4096, 4096).unwrap(), 0);
    drop(w);
    let mut w = JournalWriter::open(&j, MIB).unwrap();
    assert_eq!(w.saved_blocks(), 4);
    assert_eq!(w.save_before_write(&d, 8192, 16384).unwrap(), 2);
    let blocks: u64 = records(&j).iter().map(Record::blocks).sum();
    assert_eq!(blocks, 6);
}

#[test]
fn restore_gives_the_old_content_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // Not a whole number of blocks: the last one is partial.
    let size = 3 * MIB + 1000;
    let (p, d) = disk(dir.path(), size);
    let before = hash_file(&p);
    let j = dir.path().join("disk0.journal");
    create(&j, size).unwrap();
    let mut w = JournalWriter::open(&j, size).unwrap();
    let writes: [(u64, u64); 6] = [
        (0, 4096),
        (10, 70_000),
        (MIB - 3, 2 * MIB),
        (5000, 100),
        (size - 500, 500),
        (size - 9000, 9000),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        w.save_before_write(&d, off, len).unwrap();
        d.write_all_at(&vec![i as u8 + 1; len as usize], off)
            .unwrap();
    }
    w.save_before_zero(&d, 2 * MIB, 4096 * 3).unwrap();
    d.write_all_at(&[0u8; 4096 * 3], 2 * MIB).unwrap();
    assert_ne!(hash_file(&p), before);
    drop(w);
    let _fence = fence(&j, Duration::from_secs(1)).unwrap();
    let n = restore_into(&j, &d).unwrap();
    assert!(n > 0);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), size);
    assert_eq!(hash_file(&p), before);
}

#[test]
fn zeroing_does_not_save_blocks_that_are_zero_already() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sparse.img");
    let d = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    d.set_len(MIB).unwrap();
    d.write_all_at(&[9u8; 4096], 8192).unwrap();
    let j = dir.path().join("disk0.journal");
    create(&j, MIB).unwrap();
    let mut w = JournalWriter::open(&j, MIB).unwrap();
    assert_eq!(w.save_before_zero(&d, 0, MIB).unwrap(), 1);
    assert_eq!(w.save_before_write(&d, 0, 16384).unwrap(), 3);
}

#[test]
fn out_of_range_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, d) = disk(dir.path(), MIB);
    let j = dir.path().join("disk0.journal");
    create(&j, MIB).unwrap();
    let e = JournalWriter::open(&j, 2 * MIB).unwrap_err();
    assert!(matches!(e, JournalError::SizeMismatch { .. }), "{e}");
    let mut w = JournalWriter::open(&j, MIB).unwrap();
    let e = w.save_before_write(&d, MIB - 10, 20).unwrap_err();
    assert!(matches!(e, JournalError::OutOfRange { .. }), "{e}");
    let other = dir.path().join("other");
    std::fs::write(&other, [0u8; 64]).unwrap();
    let e = JournalReader::open(&other).unwrap_err();
    assert!(matches!(e, JournalError::NotAJournal { .. }), "{e}");
    let e = JournalWriter::open(&dir.path().join("none"), MIB).unwrap_err();
    assert!(matches!(e, JournalError::Missing { .. }), "{e}");
    assert!(!has_records(&dir.path().join("none")).unwrap());
}

#[test]
fn a_second_writer_is_refused_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("disk0.journal");
    create(&j, MIB).unwrap();
    let _w = JournalWriter::open(&j, MIB).unwrap();
    let e = JournalWriter::open(&j, MIB).unwrap_err();
    assert!(matches!(e, JournalError::Locked { .. }), "{e}");
    assert!(e.to_string().contains(&j.display().to_string()), "{e}");
}

#[test]
fn fence_waits_while_held_and_succeeds_after_release() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("disk0.journal");
    create(&j, MIB).unwrap();
    let w = JournalWriter::open(&j, MIB).unwrap();
    let e = fence(&j, Duration::from_millis(200)).unwrap_err();
    assert!(matches!(e, JournalError::StillHeld { .. }), "{e}");
    assert!(e.to_string().contains(&j.display().to_string()), "{e}");
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        drop(w);
    });
    let f = fence(&j, Duration::from_secs(30)).unwrap();
    assert_eq!(f.path(), j);
    release.join().unwrap();
    let e = JournalWriter::open(&j, MIB).unwrap_err();
    assert!(
        matches!(e, JournalError::Locked { .. }),
        "the fence holds it: {e}"
    );
    drop(f);
    let e = fence(&dir.path().join("none"), Duration::from_millis(10)).unwrap_err();
    assert!(matches!(e, JournalError::Missing { .. }), "{e}");
}

#[test]
fn the_writer_notices_its_journal_was_removed_or_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("disk0.journal");
    create(&j, MIB).unwrap();
    let w = JournalWriter::open(&j, MIB).unwrap();
    assert!(w.is_at_path().unwrap());
    create(&j, MIB).unwrap();
    assert!(!w.is_at_path().unwrap(), "replaced");
    remove(&j).unwrap();
    assert!(!w.is_at_path().unwrap(), "removed");
    remove(&j).unwrap();
}
