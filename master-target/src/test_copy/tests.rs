//! Test failover at the MT: the test copy reads as the pinned point, takes
//! writes (partial blocks too) without touching the replica, survives a
//! restart, holds its point against retention, and leaves nothing behind.

use super::{open_overlays, TEST_POINT};
use crate::config::{HooksConfig, RetentionConfig};
use crate::replication::Replication;
use crate::tests::{applied_history, apply_range, check_all, check_latest, open_store, SIZES};
use crate::view::Views;
use rebound_common::nbd::{BlockDevice, ExportRegistry};
use rebound_proto::control::point_choice::Choice;
use std::sync::Arc;

fn start(r: &Replication, point: &str) -> super::TestCopyReport {
    r.start_test_failover(
        &Choice::Id(point.into()),
        false,
        &HooksConfig::default(),
        "",
    )
    .expect("start test failover")
}

fn export(disk: u32) -> String {
    format!("m1/disk{disk}@{TEST_POINT}")
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read(0, &mut buf).expect("read the test copy");
    buf
}

/// Writes `data` at `offset` through `dev` and into `model`.
fn write(dev: &dyn BlockDevice, model: &mut [u8], offset: usize, data: &[u8]) {
    dev.write(offset as u64, data, false)
        .expect("write the test copy");
    model[offset..offset + data.len()].copy_from_slice(data);
}

/// Forgets the overlays open in this process, as a restart does.
fn forget_open(r: &Replication) {
    let dir = r.test_dir();
    open_overlays()
        .lock()
        .unwrap()
        .retain(|p, _| !p.starts_with(&dir));
}

#[test]
fn overlay_reads_the_point_and_takes_partial_block_writes() {
    let (mut g, _dir, s, r) = applied_history(41, 10);
    let rep = start(&r, "p2");
    assert_eq!(rep.exports, vec![export(0), export(1)]);
    let views = Views::new(s.clone());
    assert!(views.list().contains(&export(1)));
    let dev = views.open(&export(0)).unwrap();
    assert!(!dev.read_only());
    let mut model = g.snap("p2")[0].clone();
    assert!(read_all(dev.as_ref()) == model, "the copy reads as p2");
    // Inside one block, across blocks unaligned, whole blocks, the short
    // last block of the disk.
    write(dev.as_ref(), &mut model, 100, &[7u8; 300]);
    write(dev.as_ref(), &mut model, 4000, &[8u8; 9000]);
    write(dev.as_ref(), &mut model, 64 << 10, &[9u8; 16 << 10]);
    let end = SIZES[0] as usize;
    write(dev.as_ref(), &mut model, end - 1000, &[10u8; 1000]);
    dev.write_zeroes(200 << 10, 10_000, true).unwrap();
    model[200 << 10..(200 << 10) + 10_000].fill(0);
    assert!(read_all(dev.as_ref()) == model, "the copy reads its writes");
    let mut part = vec![0u8; 5000];
    dev.read(3000, &mut part).unwrap();
    assert_eq!(part, model[3000..8000]);
    assert!(dev.write(end as u64 - 10, &[0u8; 20], false).is_err());
    // A second connection sees the same copy; the other disk is untouched.
    assert!(read_all(views.open(&export(0)).unwrap().as_ref()) == model);
    assert!(read_all(views.open(&export(1)).unwrap().as_ref()) == g.snap("p2")[1]);
    // Replication goes on: the replica and every point stay exact.
    check_all(&r, &g);
    let from = g.seq() + 1;
    g.random_ops(40);
    g.tag("p5");
    apply_range(&r, &g, from, g.seq(), 7);
    check_all(&r, &g);
    assert!(
        read_all(dev.as_ref()) == model,
        "later points do not move the copy"
    );
}

#[test]
fn the_pin_holds_its_point_against_retention_until_cleanup() {
    let (g, _dir, s, r) = applied_history(42, 10);
    start(&r, "p1");
    let drop_all = RetentionConfig {
        window_secs: 1,
        max_bytes: 1,
        check_secs: 1,
    };
    let out = r.enforce_retention(&drop_all, u64::MAX / 2).unwrap();
    assert_eq!(out.dropped, 1, "only p0 goes");
    assert_eq!(out.oldest.as_deref(), Some("p1"));
    check_all(&r, &g);
    let dev = Views::new(s.clone()).open(&export(1)).unwrap();
    assert!(read_all(dev.as_ref()) == g.snap("p1")[1]);
    // A pass that finds the same pin drops nothing more.
    assert_eq!(
        r.enforce_retention(&drop_all, u64::MAX / 2)
            .unwrap()
            .dropped,
        0
    );
    r.end_test_failover(&HooksConfig::default(), "").unwrap();
    let out = r.enforce_retention(&drop_all, u64::MAX / 2).unwrap();
    assert_eq!(out.dropped, 3, "unpinned, p1 goes with the rest");
    assert_eq!(r.points().len(), 1);
    check_latest(&r, &g.disks);
}

#[test]
fn a_restart_keeps_the_running_copy_and_its_flushed_writes() {
    let (g, dir, s, r) = applied_history(43, 10);
    start(&r, "p3");
    let views = Views::new(s.clone());
    let dev = views.open(&export(0)).unwrap();
    let mut model = g.snap("p3")[0].clone();
    write(dev.as_ref(), &mut model, 12_345, &[5u8; 7000]);
    dev.flush().unwrap();
    drop((dev, views));
    forget_open(&r);
    drop((s, r));
    let (s, r) = open_store(dir.path());
    assert_eq!(r.test_failover().expect("still running").point.id, "p3");
    let dev = Views::new(s.clone()).open(&export(0)).unwrap();
    assert!(read_all(dev.as_ref()) == model);
    check_all(&r, &g);
}

#[test]
fn cleanup_leaves_nothing_and_a_second_start_names_the_running_copy() {
    let (g, _dir, s, r) = applied_history(44, 10);
    start(&r, "p2");
    // The same start again (a re-sent command) answers with the copy.
    assert_eq!(start(&r, "p2").point.id, "p2");
    let e = r
        .start_test_failover(&Choice::Id("p4".into()), false, &HooksConfig::default(), "")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("p2") && e.contains("test-failover-cleanup"),
        "{e}"
    );
    let views = Views::new(s.clone());
    let dev = views.open(&export(0)).unwrap();
    dev.write(0, &[1u8; 4096], true).unwrap();
    assert!(r.test_dir().join("disk0.overlay").exists());
    r.end_test_failover(&HooksConfig::default(), "").unwrap();
    assert!(!r.test_dir().exists(), "the test dir is gone");
    assert!(r.test_failover().is_none(), "unpinned");
    assert!(
        dev.read(0, &mut [0u8; 512]).is_err(),
        "open connections get errors"
    );
    assert!(views.open(&export(0)).is_err(), "new opens are refused");
    assert!(!views.list().contains(&export(0)));
    r.end_test_failover(&HooksConfig::default(), "").unwrap();
    check_all(&r, &g);
    // A restart finds nothing either.
    let root = r.root().to_path_buf();
    drop((views, s, r));
    let (_s, r) = open_store(root.parent().unwrap());
    assert!(r.test_failover().is_none() && !r.test_dir().exists());
}

#[test]
fn hooks_get_the_exports_and_the_status_shows_the_copy() {
    let (_g, dir, s, r) = applied_history(45, 10);
    let out = dir.path().join("hook.env");
    let hooks = HooksConfig {
        test_power_on: format!("env | grep ^REBOUND_ | sort > {}", out.display()),
        test_power_off: format!("echo off >> {}", out.display()),
        ..Default::default()
    };
    let rep = r
        .start_test_failover(
            &Choice::Latest(Default::default()),
            true,
            &hooks,
            "127.0.0.1:10810",
        )
        .unwrap();
    assert!(
        rep.test_power_on.as_ref().is_some_and(|o| o.success),
        "{rep:?}"
    );
    assert_eq!(rep.point.id, "p4");
    let env = std::fs::read_to_string(&out).unwrap();
    for want in [
        "REBOUND_MACHINE=m1",
        "REBOUND_POINT=p4",
        "REBOUND_NBD_ADDRESS=127.0.0.1:10810",
        "REBOUND_TEST_EXPORTS=m1/disk0@test m1/disk1@test",
        "REBOUND_TEST_EXPORT_DISK1=m1/disk1@test",
    ] {
        assert!(env.lines().any(|l| l == want), "{want} in\n{env}");
    }
    let st = crate::control::mt_status(&s, &RetentionConfig::default());
    assert_eq!(st.replications[0].test_point, "p4");
    assert_eq!(st.replications[0].test_exports, vec![export(0), export(1)]);
    let off = r.end_test_failover(&hooks, "").unwrap();
    assert!(off.is_some_and(|o| o.success));
    assert!(std::fs::read_to_string(&out).unwrap().ends_with("off\n"));
    let st = crate::control::mt_status(&s, &RetentionConfig::default());
    assert!(st.replications[0].test_point.is_empty());
    assert!(st.replications[0].test_exports.is_empty());
    let _: Arc<Replication> = r;
}
