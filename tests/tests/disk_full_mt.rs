//! ENOSPC at the master target's journal or replica: an event, backpressure,
//! nothing acknowledged lost, and apply resumes by itself when space returns.
//!
//! The MT's data directory is a 24 MiB tmpfs (the test needs root to mount
//! it). Once two points are cut (so apply saves undo records), a ballast
//! file fills it and the agent writes more than the space left. The MT must
//! then say so once (`disk-full`, naming the replication, the path and the
//! bytes needed), keep the PS's stream open without acknowledging (no
//! refusal, so no reconnect-and-resend loop), and apply everything by
//! itself once the ballast is deleted: every point exact by blake3.

use crate::support::{fill_leaving, lines_with, Tmpfs};
use rebound_lab::*;
use std::time::Duration;

/// Random writes through the agent, then a tag: (id, seq, source hash).
fn round(lab: &Lab, rng: &mut Rng) -> (String, u64, String) {
    let size = lab.opts.disks[0].1;
    qemu_io(&lab.agent_uri("disk0"), &random_writes(rng, size, 32))
        .expect("writes through the agent");
    lab.tag_hash("crash").expect("tag")
}

#[test]
fn mt_enospc_waits_without_acknowledging_then_resumes_exact() {
    let mut lab = Lab::new(LabOptions::default()).unwrap();
    let data = lab.path("mt-data");
    let _tmpfs = Tmpfs::mount(&data, "24m", "a small MT data disk to fill");
    lab.start_all().unwrap();
    let mut rng = Rng::new(41);
    let mut points = Vec::new();
    for _ in 0..2 {
        let p = round(&lab, &mut rng);
        lab.wait_applied(p.1, Duration::from_secs(60)).unwrap();
        points.push(p);
    }

    let ballast = data.join("ballast");
    fill_leaving(&ballast, 64 << 10);
    let mt_log = || lab.log(Component::Mt);
    let streams_before = lines_with(&mt_log(), "apply stream opened");
    let full = round(&lab, &mut rng);
    wait_until(
        "the MT reports its full disk",
        Duration::from_secs(30),
        || mt_log().contains("disk-full"),
    )
    .unwrap_or_else(|e| panic!("{e}; MT log tail:\n{}", lab.log_tail(Component::Mt, 30)));
    let log = mt_log();
    let line = log
        .lines()
        .find(|l| l.contains("disk-full"))
        .expect("a disk-full line");
    for part in [lab.opts.machine.as_str(), "mt-data", "bytes"] {
        assert!(
            line.contains(part),
            "the disk-full line does not name {part:?}: {line}"
        );
    }
    // While the disk stays full: nothing more applied or acknowledged, the
    // PS's stream kept open (not refused and reopened), few retries.
    let (_, applied_full) = lab.points().unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let (_, applied_later) = lab.points().unwrap();
    assert!(
        applied_later < full.1,
        "the MT applied seq {applied_later} (the tag at {}) on a full disk",
        full.1
    );
    assert_eq!(
        applied_later, applied_full,
        "apply went on while the disk was full"
    );
    let log = mt_log();
    assert_eq!(
        lines_with(&log, "apply stream opened"),
        streams_before,
        "the PS's apply stream was refused and reopened on the full disk; MT log tail:\n{}",
        lab.log_tail(Component::Mt, 30)
    );
    let failed = lines_with(&log, "applying frames failed");
    assert!(
        failed <= 3,
        "the MT retried the full disk {failed} times in about 10 s; MT log tail:\n{}",
        lab.log_tail(Component::Mt, 30)
    );
    assert_eq!(
        lines_with(&log, "disk-full"),
        1,
        "disk-full said more than once"
    );

    std::fs::remove_file(&ballast).unwrap();
    lab.wait_applied(full.1, Duration::from_secs(120)).unwrap();
    assert!(
        mt_log().contains("disk-space-returned"),
        "the MT did not say apply resumed; MT log tail:\n{}",
        lab.log_tail(Component::Mt, 30)
    );
    points.push(full);
    points.push(round(&lab, &mut rng));
    let last = points.last().expect("points").1;
    lab.wait_applied(last, Duration::from_secs(60)).unwrap();
    for (id, _, hash) in &points {
        assert_eq!(
            &lab.point_hash("disk0", id).unwrap(),
            hash,
            "point {id} is not exact"
        );
    }
    assert_eq!(
        lab.point_hash("disk0", "latest").unwrap(),
        lab.source_hash(0).unwrap()
    );
}
