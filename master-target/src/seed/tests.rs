//! Seeding: a kept copy is copied in (holes stay holes), an unusable one is
//! named in the warning, and a replica already receiving data is left alone.

use super::not_seeded_warning;
use crate::tests::{open_store, SIZES};
use std::os::unix::fs::MetadataExt;

#[test]
fn a_kept_copy_seeds_the_replica_sparsely_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, r) = open_store(&dir.path().join("mt"));
    // Disk 0: data in its first MiB only (the short tail run is zero).
    let mut want = vec![0u8; SIZES[0] as usize];
    for (i, b) in want[..1 << 20].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    let copy0 = dir.path().join("kept0.img");
    std::fs::write(&copy0, &want).unwrap();
    // Disk 1: a file of the wrong size.
    let copy1 = dir.path().join("kept1.img");
    std::fs::write(&copy1, vec![7u8; 4096]).unwrap();
    let paths = vec![copy0.display().to_string(), copy1.display().to_string()];
    let unusable = r.seed(&paths).unwrap();
    assert_eq!(
        unusable,
        vec![format!(
            "disk disk1: {} has 4096 bytes but the disk has {}",
            copy1.display(),
            SIZES[1]
        )]
    );
    let replica0 = r.root().join("replica/disk0.img");
    assert_eq!(std::fs::read(&replica0).unwrap(), want);
    // The zero tail stayed a hole: about 1 MiB allocated, not 1 MiB + the tail.
    let blocks = std::fs::metadata(&replica0).unwrap().blocks() * 512;
    assert!(blocks <= (1 << 20) + 4096, "{blocks} bytes allocated");
    let replica1 = std::fs::read(r.root().join("replica/disk1.img")).unwrap();
    assert!(replica1.iter().all(|&b| b == 0));
    // A re-sent PrepareReplication does not copy again.
    std::fs::write(&copy0, vec![9u8; SIZES[0] as usize]).unwrap();
    assert!(r.seed(&paths).unwrap().is_empty());
    assert_eq!(std::fs::read(&replica0).unwrap(), want);
    // A missing copy is named, and nothing is kept = nothing to say.
    let dir2 = tempfile::tempdir().unwrap();
    let (_s2, r2) = open_store(dir2.path());
    assert!(r2.seed(&[String::new(), String::new()]).unwrap().is_empty());
    let gone = dir2.path().join("gone.img").display().to_string();
    let why = r2.seed(std::slice::from_ref(&gone)).unwrap();
    assert_eq!(why.len(), 2, "{why:?}");
    assert!(
        why[0].starts_with(&format!("disk disk0: {gone} cannot be read")),
        "{why:?}"
    );
    assert_eq!(why[1], "disk disk1: no copy was kept");
}

#[test]
fn a_replica_already_applied_to_is_not_seeded() {
    let g = crate::tests::history(3);
    let (dir, _s, r) = crate::tests::applied(&g, 50);
    let copy = dir.path().join("kept.img");
    std::fs::write(&copy, vec![5u8; SIZES[0] as usize]).unwrap();
    assert!(r.seed(&[copy.display().to_string()]).unwrap().is_empty());
    crate::tests::check_latest(&r, &g.disks);
}

#[test]
fn the_warning_names_the_machine_site_and_each_disk() {
    assert_eq!(not_seeded_warning("m1", "onprem", &[]), "");
    assert_eq!(
        not_seeded_warning("m1", "onprem", &["disk disk0: no copy was kept".into()]),
        "no usable source copy of m1 kept at onprem (disk disk0: no copy was kept): \
         the first resync copies the whole disk"
    );
    let two = not_seeded_warning("m1", "onprem", &["a".into(), "b".into()]);
    assert!(
        two.ends_with("(a; b): the first resync copies the whole disks"),
        "{two}"
    );
}
