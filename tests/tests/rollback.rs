//! Rollback at the master target: the replica becomes exactly a point's
//! content; restoring pre-images returns it to latest; a kill -9 in the
//! middle of a rollback followed by a re-run still gives the exact point.

use rebound_lab::*;
use rebound_proto::{RestorePreImagesRequest, RollbackRequest};
use std::time::Duration;

fn rollback(lab: &Lab, point: &str) -> anyhow::Result<()> {
    let mut c = lab.mt_client()?;
    lab.block_on(c.rollback(RollbackRequest {
        replication_id: lab.opts.machine.clone(),
        point: point.into(),
    }))?;
    Ok(())
}

fn restore(lab: &Lab) -> anyhow::Result<()> {
    let mut c = lab.mt_client()?;
    lab.block_on(c.restore_pre_images(RestorePreImagesRequest {
        replication_id: lab.opts.machine.clone(),
    }))?;
    Ok(())
}

/// The replica's disk0 holds exactly the content hashed as `want`.
fn assert_replica(lab: &Lab, want: &str, what: &str) {
    assert_eq!(lab.replica_hash("disk0").unwrap(), want, "{what}");
}

#[test]
fn rollback_restore_and_rerun_after_kill() {
    let mut lab = Lab::started(LabOptions::disk_size(96 << 20)).unwrap();
    let uri = lab.agent_uri("disk0");
    let mut rng = Rng::new(3);
    qemu_io(&uri, &random_writes(&mut rng, 96 << 20, 50)).unwrap();
    let (p1, _, h1) = lab.tag_hash("crash").unwrap();
    // Rewrite most of the disk so the rollback has a lot to do.
    let mut cmds = Vec::new();
    for i in 0..88u64 {
        cmds.push(format!("write -P {} {} 1048576", (i % 250) + 1, i << 20));
    }
    qemu_io(&uri, &cmds).unwrap();
    let (p2, _, h2) = lab.tag_hash("crash").unwrap();
    qemu_io(&uri, &random_writes(&mut rng, 96 << 20, 50)).unwrap();
    let (_p3, s3, h3) = lab.tag_hash("crash").unwrap();
    lab.wait_applied(s3, Duration::from_secs(120)).unwrap();
    // The failover flow stops the source before a rollback.
    lab.stop(Component::Agent).unwrap();

    rollback(&lab, &p2).unwrap();
    assert_replica(&lab, &h2, &format!("replica after rollback to {p2}"));
    restore(&lab).unwrap();
    assert_replica(&lab, &h3, "replica after restoring pre-images");

    // Kill the MT at varied moments of a rollback to p1, then re-run it.
    for delay_ms in [5u64, 40, 150] {
        let mut c = lab.mt_client().unwrap();
        let req = RollbackRequest {
            replication_id: lab.opts.machine.clone(),
            point: p1.clone(),
        };
        let _ = lab.block_on(async {
            tokio::time::timeout(Duration::from_millis(delay_ms), c.rollback(req)).await
        });
        lab.kill9(Component::Mt).unwrap();
        lab.start(Component::Mt).unwrap();
        rollback(&lab, &p1).unwrap();
        assert_replica(
            &lab,
            &h1,
            &format!("replica after re-run rollback to {p1} (killed after {delay_ms} ms)"),
        );
        // The view of p1 is still exact too.
        assert_eq!(lab.point_hash("disk0", &p1).unwrap(), h1);
        restore(&lab).unwrap();
        assert_replica(&lab, &h3, "replica after restoring pre-images again");
    }
    // Changing the point: roll to p2, then to p1 (restoring in between).
    rollback(&lab, &p2).unwrap();
    restore(&lab).unwrap();
    rollback(&lab, &p1).unwrap();
    assert_replica(
        &lab,
        &h1,
        &format!("replica after changing the point to {p1}"),
    );
}
