//! Seeding: a kept copy is copied in (holes stay holes), an unusable one is
//! named in the warning, a path outside the MT's seed directories is never
//! read, and a replica already receiving data is left alone.

use super::{not_seeded_warning, open_seed, seek_size};
use crate::tests::{open_store, SIZES};
use std::os::unix::fs::symlink;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `dir` as the only seed directory.
fn only(dir: &Path) -> Vec<PathBuf> {
    vec![dir.to_path_buf()]
}

/// A temporary directory with an empty seed directory `disks` in it.
fn seed_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("disks");
    std::fs::create_dir(&allowed).unwrap();
    (dir, allowed)
}

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
    let unusable = r.seed(&paths, &only(dir.path())).unwrap();
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
    assert!(r.seed(&paths, &only(dir.path())).unwrap().is_empty());
    assert_eq!(std::fs::read(&replica0).unwrap(), want);
    // A missing copy is named, and nothing is kept = nothing to say.
    let dir2 = tempfile::tempdir().unwrap();
    let (_s2, r2) = open_store(dir2.path());
    let dirs2 = only(dir2.path());
    assert!(r2
        .seed(&[String::new(), String::new()], &dirs2)
        .unwrap()
        .is_empty());
    let gone = dir2.path().join("gone.img").display().to_string();
    let why = r2.seed(std::slice::from_ref(&gone), &dirs2).unwrap();
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
    assert!(r
        .seed(&[copy.display().to_string()], &only(dir.path()))
        .unwrap()
        .is_empty());
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

#[test]
fn a_copy_outside_the_seed_dirs_is_not_read_even_through_dots_or_a_symlink() {
    let (dir, allowed) = seed_dir();
    let (_s, r) = open_store(&dir.path().join("mt"));
    // Copies of the right size, with data, outside the seed directory.
    let outside0 = dir.path().join("secret0.img");
    std::fs::write(&outside0, vec![0x5a; SIZES[0] as usize]).unwrap();
    let outside1 = dir.path().join("secret1.img");
    std::fs::write(&outside1, vec![0x5b; SIZES[1] as usize]).unwrap();
    // Disk 0 climbs out with "..", disk 1 through a symlink inside the dir.
    let dots = allowed.join("../secret0.img");
    let link = allowed.join("disk1.img");
    symlink(&outside1, &link).unwrap();
    let paths = vec![dots.display().to_string(), link.display().to_string()];
    let why = r.seed(&paths, &only(&allowed)).unwrap();
    assert_eq!(why.len(), 2, "{why:?}");
    for (w, (p, real)) in why.iter().zip([(&dots, &outside0), (&link, &outside1)]) {
        assert!(
            w.contains(&format!(
                "{} is not read (really {})",
                p.display(),
                real.canonicalize().unwrap().display()
            )),
            "{w}"
        );
        assert!(w.contains("[reprotect] seed_dirs"), "{w}");
        assert!(w.contains(&allowed.display().to_string()), "{w}");
    }
    for disk in ["disk0", "disk1"] {
        let replica = std::fs::read(r.root().join(format!("replica/{disk}.img"))).unwrap();
        assert!(replica.iter().all(|&b| b == 0), "{disk} was seeded");
    }
    // With no seed directory nothing is read, not even a path that exists.
    let why = open_seed(&outside0, SIZES[0], &[]).unwrap_err();
    assert!(
        why.contains("outside the directories this MT seeds from ([])"),
        "{why}"
    );
}

#[test]
fn a_copy_whose_real_location_is_in_a_seed_dir_is_read() {
    let (dir, allowed) = seed_dir();
    let kept = allowed.join("m1-disk0.img");
    std::fs::File::create(&kept)
        .unwrap()
        .set_len(SIZES[0])
        .unwrap();
    // Reached through a link from elsewhere: where it really is counts.
    let link = dir.path().join("by-id-disk0");
    symlink(&kept, &link).unwrap();
    for p in [&kept, &link] {
        let f = open_seed(p, SIZES[0], &only(&allowed)).unwrap();
        assert_eq!(seek_size(&f).unwrap(), SIZES[0]);
    }
    // The seed directory may be named through a symlink too.
    let dir_link = dir.path().join("disks-link");
    symlink(&allowed, &dir_link).unwrap();
    assert!(open_seed(&kept, SIZES[0], &only(&dir_link)).is_ok());
    // A directory is not a disk.
    let sub = allowed.join("sub");
    std::fs::create_dir(&sub).unwrap();
    assert_eq!(
        open_seed(&sub, SIZES[0], &only(&allowed)).unwrap_err(),
        "is neither a file nor a block device"
    );
}

#[test]
fn the_size_of_a_copy_is_its_end_offset() {
    // A block device's metadata says 0 bytes; the seek to its end, which
    // open_seed uses, gives the size of a file and of a device alike.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sparse.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(3 << 30).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    assert_eq!(seek_size(&f).unwrap(), 3 << 30);
    // The position does not matter to the copy (it reads at offsets).
    assert_eq!(seek_size(&f).unwrap(), 3 << 30);
}
