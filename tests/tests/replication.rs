//! Writes from real NBD clients (qemu-io, nbdcopy, fio) through the agent
//! reach the replica, and every recovery point read back from the master
//! target equals the source content captured at that tag.

use rebound_lab::*;
use std::time::Duration;

const APPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Cuts a tag and records the blake3 of every source disk at it. Writes are
/// paused while this runs, so the files are exactly the content at the tag.
fn tag_and_capture(lab: &Lab, kind: &str) -> (String, u64, Vec<String>) {
    let (id, seq) = lab.tag(kind).expect("tag");
    let hashes = (0..lab.opts.disks.len())
        .map(|i| lab.source_hash(i).expect("hash source"))
        .collect();
    (id, seq, hashes)
}

fn assert_points_exact(lab: &Lab, captured: &[(String, u64, Vec<String>)]) {
    let last_seq = captured.iter().map(|c| c.1).max().unwrap_or(0);
    lab.wait_applied(last_seq, APPLY_TIMEOUT).expect("applied");
    let (points, _) = lab.points().expect("points");
    for (id, seq, hashes) in captured {
        let p = points
            .iter()
            .find(|p| &p.id == id)
            .unwrap_or_else(|| panic!("point {id} missing at the MT: {points:?}"));
        assert_eq!(p.seq, *seq, "point {id} seq");
        for (i, (disk, _)) in lab.opts.disks.iter().enumerate() {
            let got = lab.point_hash(disk, id).expect("view hash");
            assert_eq!(
                &got, &hashes[i],
                "content of {disk}@{id} differs from the source at that tag"
            );
        }
    }
}

fn two_disk_lab() -> Lab {
    Lab::new(LabOptions {
        disks: vec![("disk0".into(), 64 << 20), ("disk1".into(), 32 << 20)],
        ..Default::default()
    })
    .expect("lab")
}

#[test]
fn qemu_io_writes_make_exact_points_on_two_disks() {
    let mut lab = two_disk_lab();
    lab.start_all().unwrap();
    let mut rng = Rng::new(7);
    let mut captured = Vec::new();
    for round in 0..6 {
        for (name, size) in lab.opts.disks.clone() {
            let cmds = random_writes(&mut rng, size, 40);
            qemu_io(&lab.agent_uri(&name), &cmds).unwrap();
        }
        if round == 3 {
            // A zeroed range and a trim travel as Zero records.
            qemu_io(
                &lab.agent_uri("disk0"),
                &[
                    "write -z 1048576 262144".into(),
                    "discard 4194304 65536".into(),
                ],
            )
            .unwrap();
        }
        captured.push(tag_and_capture(&lab, "crash"));
    }
    assert_points_exact(&lab, &captured);
    // `@latest` equals the source now.
    for (i, (disk, _)) in lab.opts.disks.iter().enumerate() {
        assert_eq!(
            lab.point_hash(disk, "latest").unwrap(),
            lab.source_hash(i).unwrap()
        );
    }
    // And the agent reads back what was written.
    qemu_io(
        &lab.agent_uri("disk0"),
        &[
            "write -P 0x5a 0 65536".into(),
            "read -P 0x5a 0 65536".into(),
        ],
    )
    .unwrap();
}

#[test]
fn nbdcopy_writes_make_exact_points() {
    let lab = Lab::started(LabOptions::default()).unwrap();
    let mut captured = Vec::new();
    let mut rng = Rng::new(99);
    for round in 0..5u64 {
        let size = lab.opts.disks[0].1;
        let mut data = vec![0u8; size as usize];
        // Mostly the previous content, with random 1 MiB stretches replaced.
        let prev = std::fs::read(lab.source_disk(0)).unwrap();
        data.copy_from_slice(&prev);
        for _ in 0..8 {
            let at = rng.below(size / (1 << 20)) * (1 << 20);
            for b in &mut data[at as usize..at as usize + (1 << 20)] {
                *b = (rng.next_u64() as u8) | 1;
            }
        }
        let src = lab.path(&format!("nbdcopy-src-{round}.img"));
        std::fs::write(&src, &data).unwrap();
        run_tool(
            "nbdcopy",
            &[&src.to_string_lossy(), &lab.agent_uri("disk0")],
        )
        .unwrap();
        std::fs::remove_file(&src).unwrap();
        captured.push(tag_and_capture(&lab, "crash"));
    }
    assert_points_exact(&lab, &captured);
}

#[test]
fn fio_random_writes_on_two_disks_make_exact_points() {
    let mut lab = two_disk_lab();
    lab.start_all().unwrap();
    let mut captured = Vec::new();
    for round in 0..5 {
        let mut args: Vec<String> = vec![
            "--ioengine=nbd".into(),
            "--rw=randwrite".into(),
            "--bssplit=4k/50:16k/20:64k/20:256k/10".into(),
            "--iodepth=16".into(),
            "--io_size=8M".into(),
            "--size=24M".into(),
            format!("--randseed={}", 1000 + round),
            "--group_reporting".into(),
        ];
        for (i, (disk, _)) in lab.opts.disks.iter().enumerate() {
            args.push(format!("--name=d{i}"));
            args.push(format!("--uri={}", lab.agent_uri(disk)));
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        run_tool("fio", &argv).unwrap();
        captured.push(tag_and_capture(&lab, "crash"));
    }
    assert_points_exact(&lab, &captured);
}
