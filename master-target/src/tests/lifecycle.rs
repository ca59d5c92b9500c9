//! The lifecycle commands: hand-over (apply refused, hook environment and
//! exit status, idempotent re-run, undo by RestorePreImages), Rollback by
//! every PointChoice, EndReplication, and PrepareReplication adopting the
//! replica files of an ended replication or seeding them from a kept copy.

use super::{applied, apply_range, check_latest, info, open_store, Gen, RID, SIZES};
use crate::config::{HooksConfig, RetentionConfig};
use crate::control::{resolve_point, Identity, MtControl};
use crate::error::MtError;
use crate::replication::Store;
use rebound_common::frame::TagKind;
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use rebound_proto::control::command_result::Detail;
use rebound_proto::control::point_choice::Choice;
use std::sync::Arc;

pub(super) fn control(store: Arc<Store>, hooks: HooksConfig) -> MtControl {
    MtControl {
        store,
        hooks,
        retention: RetentionConfig::default(),
        reprotect: Default::default(),
        identity: Identity {
            id: "mt1".into(),
            site: "b".into(),
            addresses: vec!["127.0.0.1:9444".into()],
            instance: "x".into(),
        },
        status: std::sync::Mutex::new(None),
        revocations: Default::default(),
        revoked_path: std::env::temp_dir().join("rebound-mt-test-revoked-unused"),
    }
}

/// The control protocol's form of one of the test replication's disks.
fn pb_disk(d: rebound_proto::DiskInfo) -> pb::Disk {
    let rebound_proto::DiskInfo { index, name, size } = d;
    pb::Disk {
        index,
        name,
        size,
        path: String::new(),
    }
}

/// A history with every kind of point: crash, app, group, and writes after
/// the newest point.
fn mixed() -> Gen {
    let mut g = Gen::new(42);
    g.write(0, 0, SIZES[0], false);
    g.random_ops(10);
    g.tag("c0");
    g.random_ops(10);
    g.tag_with("a1", TagKind::App, "");
    g.random_ops(10);
    g.tag_with("g1", TagKind::Crash, "g1");
    g.random_ops(10);
    g.tag("c3");
    g.random_ops(10);
    g.tag_with("a4", TagKind::App, "");
    g.random_ops(10);
    g.tag("c5");
    g.random_ops(10);
    g
}

fn hooks(cmd: &str, timeout: u64) -> HooksConfig {
    HooksConfig {
        power_on: cmd.into(),
        hook_timeout_secs: timeout,
        ..HooksConfig::default()
    }
}

#[test]
fn hand_over_refuses_apply_runs_the_hook_once_and_restore_undoes_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hook");
    std::fs::create_dir(&out).unwrap();
    let mut g = mixed();
    let (s, r) = open_store(&dir.path().join("mt"));
    apply_range(&r, &g, 1, g.seq(), 7);
    r.rollback("c3").unwrap();
    let cmd = format!(
        "env | grep ^REBOUND_ | LC_ALL=C sort > {o}/env; echo run >> {o}/runs; echo powered on",
        o = out.display()
    );
    let h = hooks(&cmd, 30);
    let rep = r.hand_over(true, &h).unwrap();
    assert_eq!(rep.point, "c3");
    assert!(rep.hook_ran);
    let o = rep.power_on.clone().unwrap();
    assert!(o.success, "{o:?}");
    assert_eq!(o.status, "exit status 0");
    assert_eq!(o.output_tail, "powered on");
    let d0 = r.root().join("replica/disk0.img");
    let d1 = r.root().join("replica/disk1.img");
    let (j0, j1) = (
        r.root().join("handover/disk0.journal"),
        r.root().join("handover/disk1.journal"),
    );
    let env = std::fs::read_to_string(out.join("env")).unwrap();
    assert_eq!(
        env,
        format!(
            "REBOUND_DISKS={d0} {d1}\nREBOUND_DISK_DISK0={d0}\nREBOUND_DISK_DISK1={d1}\n\
             REBOUND_JOURNALS={j0} {j1}\nREBOUND_JOURNAL_DISK0={j0}\nREBOUND_JOURNAL_DISK1={j1}\n\
             REBOUND_MACHINE=m1\nREBOUND_POINT=c3\nREBOUND_REPLICATION={RID}\n",
            d0 = d0.display(),
            d1 = d1.display(),
            j0 = j0.display(),
            j1 = j1.display()
        )
    );
    // Apply is refused, durably.
    let n = g.seq();
    g.random_ops(3);
    let msg =
        format!("replication {RID} was handed over at point c3; it no longer accepts changes");
    let e = r.apply_frame(&g.frame_bytes(n + 1, g.seq())).unwrap_err();
    assert!(matches!(e, MtError::FailedPrecondition(_)));
    assert_eq!(e.to_string(), msg);
    drop(r);
    drop(s);
    let (s, r) = open_store(&dir.path().join("mt"));
    assert_eq!(r.state_name(), "handed-over");
    let e = r.apply_frame(&g.frame_bytes(n + 1, g.seq())).unwrap_err();
    assert_eq!(e.to_string(), msg);
    check_latest(&r, g.snap("c3"));
    // A re-run (the same command id again): same answer, no second boot.
    let again = r.hand_over(true, &h).unwrap();
    assert_eq!(again.point, "c3");
    assert!(!again.hook_ran);
    assert!(again.power_on.unwrap().success);
    assert_eq!(std::fs::read_to_string(out.join("runs")).unwrap(), "run\n");
    // A rollback elsewhere is refused while handed over; the same one is fine.
    assert!(matches!(
        r.rollback("a1"),
        Err(MtError::FailedPrecondition(_))
    ));
    assert_eq!(r.rollback("c3").unwrap().blocks_restored, 0);
    // Change point: RestorePreImages undoes the hand-over, then another point.
    let ctl = control(s.clone(), h.clone());
    let res = ctl
        .run(Cmd::RestorePreImages(pb::RestorePreImages {
            replication_id: RID.into(),
        }))
        .unwrap();
    assert!(res.ok);
    assert_eq!(r.state_name(), "applying");
    assert!(r.handed_over().is_none());
    r.rollback("a1").unwrap();
    check_latest(&r, g.snap("a1"));
    let res = ctl
        .run(Cmd::HandOver(pb::HandOver {
            replication_id: RID.into(),
            run_power_on: true,
        }))
        .unwrap();
    assert!(res.ok, "{res:?}");
    assert_eq!(r.handed_over().unwrap().point, "a1");
    assert_eq!(
        std::fs::read_to_string(out.join("runs")).unwrap(),
        "run\nrun\n"
    );
    // Status reports it.
    let st = crate::control::mt_status(&s, &RetentionConfig::default());
    assert_eq!(st.replications[0].state, "handed-over");
    assert_eq!(
        st.replications[0].points.as_ref().unwrap().rolled_back_to,
        "a1"
    );
}

#[test]
fn hand_over_reports_a_failing_or_hanging_hook_and_retries_it() {
    let g = mixed();
    let (_dir, s, r) = applied(&g, 50);
    // At latest (no rollback): the newest point names it.
    let ctl = control(
        s.clone(),
        hooks("echo starting vm; echo boom >&2; exit 3", 30),
    );
    let res = ctl
        .run(Cmd::HandOver(pb::HandOver {
            replication_id: RID.into(),
            run_power_on: true,
        }))
        .unwrap();
    assert!(!res.ok);
    assert!(res.error.contains("exit status 3"), "{}", res.error);
    assert!(res.error.contains("boom"), "{}", res.error);
    assert!(res.error.contains("at point c5"), "{}", res.error);
    // Still handed over; a re-run runs the failed hook again.
    let o = r.hand_over(true, &hooks("exit 0", 30)).unwrap();
    assert!(o.hook_ran && o.power_on.unwrap().success);
    // Without the hook asked for, or none configured: no run.
    assert!(!r.hand_over(false, &hooks("exit 1", 30)).unwrap().hook_ran);
    // A hook over its time is killed.
    let dir2 = tempfile::tempdir().unwrap();
    let (_s2, r2) = open_store(dir2.path());
    apply_range(&r2, &g, 1, g.seq(), 50);
    let t = std::time::Instant::now();
    let o = r2.hand_over(true, &hooks("sleep 20", 1)).unwrap();
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    let o = o.power_on.unwrap();
    assert!(!o.success);
    assert!(o.status.contains("timed out"), "{}", o.status);
}

#[test]
fn rollback_by_every_point_choice() {
    let g = mixed();
    let (_dir, s, r) = applied(&g, 9);
    let points = r.points();
    let time = |id: &str| points.iter().find(|p| p.id == id).unwrap().time_ms;
    let cases: Vec<(Choice, &str)> = vec![
        (Choice::Latest(pb::Empty {}), "c5"),
        (Choice::LatestProcessed(pb::Empty {}), "c5"),
        (Choice::LatestApp(pb::Empty {}), "a4"),
        (Choice::LatestMulti(pb::Empty {}), "g1"),
        (Choice::Id("a1".into()), "a1"),
        (Choice::AtOrBeforeMs(time("c3") + 500), "c3"),
        (Choice::AtOrBeforeMs(time("c3")), "c3"),
        (Choice::GroupTag("g1".into()), "g1"),
    ];
    let ctl = control(s.clone(), HooksConfig::default());
    for (choice, want) in cases {
        assert_eq!(resolve_point(&points, &choice).unwrap().id, want);
        let res = ctl
            .run(Cmd::Rollback(pb::Rollback {
                replication_id: RID.into(),
                point: Some(pb::PointChoice {
                    choice: Some(choice.clone()),
                }),
            }))
            .unwrap();
        let Some(Detail::RolledBack(rb)) = res.detail else {
            panic!("{res:?}")
        };
        assert_eq!(rb.point.unwrap().id, want, "{choice:?}");
        check_latest(&r, g.snap(want));
        assert_eq!(r.state_name(), "rolled-back");
        r.restore_pre_images().unwrap();
        check_latest(&r, &g.disks);
    }
    // Nothing matches: a clear error naming the machine.
    for choice in [
        Choice::Id("nope".into()),
        Choice::AtOrBeforeMs(1),
        Choice::GroupTag("g9".into()),
        Choice::LatestMultiApp(pb::Empty {}),
    ] {
        let e = r.rollback_to(&choice).unwrap_err();
        assert!(matches!(e, MtError::NotFound(_)), "{e}");
        assert!(e.to_string().contains("machine m1"), "{e}");
    }
    // ListPoints.
    let res = ctl
        .run(Cmd::ListPoints(pb::ListPoints {
            replication_id: RID.into(),
        }))
        .unwrap();
    let Some(Detail::PointList(pl)) = res.detail else {
        panic!()
    };
    assert_eq!(pl.points.len(), 6);
    assert_eq!(pl.applied_seq, g.seq());
    // The summary.
    let sum = r.point_summary();
    assert_eq!(sum.count, 6);
    assert_eq!(sum.oldest.unwrap().id, "c0");
    assert_eq!(sum.latest.unwrap().id, "c5");
    assert_eq!(sum.latest_app.unwrap().id, "a4");
    assert_eq!(sum.group_points.len(), 1);
    assert_eq!(sum.group_points[0].group, "g1");
    assert_eq!(sum.applied_seq, g.seq());
}

#[test]
fn end_replication_keeps_or_deletes_and_prepare_adopts_the_kept_replica() {
    let mut g = mixed();
    let (dir, s, r) = applied(&g, 20);
    let ctl = control(s.clone(), HooksConfig::default());
    let end = |keep| {
        ctl.run(Cmd::EndReplication(pb::EndReplication {
            replication_id: RID.into(),
            keep_replica: keep,
        }))
        .unwrap()
    };
    assert!(end(true).ok);
    assert!(end(true).ok, "idempotent");
    assert!(r.points().is_empty());
    assert!(!r.root().join("points.log").exists());
    assert_eq!(
        std::fs::read_dir(r.root().join("retention"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(r.state_name(), "ended");
    let n = g.seq();
    g.random_ops(2);
    let e = r.apply_frame(&g.frame_bytes(n + 1, g.seq())).unwrap_err();
    assert!(e.to_string().contains("has ended"), "{e}");
    let latest: Vec<Vec<u8>> = (0..2)
        .map(|d| std::fs::read(r.root().join(format!("replica/disk{d}.img"))).unwrap())
        .collect();
    drop(r);
    drop(s);
    // Still ended after a restart; the replica files are kept.
    let s = Arc::new(Store::open(dir.path()).unwrap());
    let r = s.get(RID).unwrap();
    assert!(r.ended());
    check_latest(&r, &latest);
    drop(r);

    // Reprotect the other way: a new replication adopts the kept files.
    // The machine's kept source copy is in the MT's seed directory.
    let kept_dir = tempfile::tempdir().unwrap();
    let mut ctl = control(s.clone(), HooksConfig::default());
    ctl.reprotect.seed_dirs = vec![kept_dir.path().to_path_buf()];
    let prep = |id: &str, adopt: &str| {
        ctl.run(Cmd::PrepareReplication(pb::PrepareReplication {
            replication_id: id.into(),
            machine_id: "m1".into(),
            disks: info().disks.into_iter().map(pb_disk).collect(),
            adopt_from: adopt.into(),
            ps_id: "ps1".into(),
            seed_paths: Vec::new(),
        }))
        .unwrap_or_else(|e| rebound_common::control::err_result(e.to_string()))
    };
    let res = prep("m1-ba", RID);
    assert!(res.ok && res.warning.is_empty(), "{res:?}");
    let n = s.get("m1-ba").unwrap();
    check_latest(&n, &latest);
    assert_eq!(n.applied_seq(), 0);
    assert_eq!(
        n.assigned_ps().as_deref(),
        Some("ps1"),
        "PrepareReplication assigns the PS"
    );
    assert!(s.get(RID).is_none(), "the ended source is gone");
    assert!(!dir.path().join(RID).exists());
    // Idempotent.
    assert!(prep("m1-ba", RID).ok);
    check_latest(&n, &latest);
    // Nothing left to adopt: empty replicas and a warning.
    let res = prep("m1-ba-3", "m1-old");
    assert!(res.ok);
    assert!(res.warning.contains("whole disks"), "{}", res.warning);
    check_latest(
        &s.get("m1-ba-3").unwrap(),
        &[vec![0; SIZES[0] as usize], vec![0; SIZES[1] as usize]],
    );
    // Nothing to adopt at this MT but a kept source copy: it seeds the
    // replica.
    let seed_paths = (latest.iter().enumerate())
        .map(|(i, d)| {
            let p = kept_dir.path().join(format!("kept{i}.img"));
            std::fs::write(&p, d).unwrap();
            p.display().to_string()
        })
        .collect();
    let res = ctl
        .run(Cmd::PrepareReplication(pb::PrepareReplication {
            replication_id: "m1-ba-5".into(),
            machine_id: "m1".into(),
            disks: info().disks.into_iter().map(pb_disk).collect(),
            adopt_from: "m1-old".into(),
            ps_id: "ps1".into(),
            seed_paths,
        }))
        .unwrap();
    assert!(res.ok && res.warning.is_empty(), "{res:?}");
    check_latest(&s.get("m1-ba-5").unwrap(), &latest);
    // A live replication is not adopted.
    let res = prep("m1-ba-4", "m1-ba");
    assert!(!res.ok);
    assert!(res.error.contains("has not ended"), "{}", res.error);

    // Without keep_replica the whole replication goes.
    let res = ctl
        .run(Cmd::EndReplication(pb::EndReplication {
            replication_id: "m1-ba".into(),
            keep_replica: false,
        }))
        .unwrap();
    assert!(res.ok);
    assert!(s.get("m1-ba").is_none());
    assert!(!dir.path().join("m1-ba").exists());
    drop(n);
    let s = Store::open(dir.path()).unwrap();
    assert!(s.get("m1-ba").is_none());
}

#[test]
fn prepare_adopts_an_ended_replica_of_the_same_machine_by_default() {
    let g = mixed();
    let (_dir, s, r) = applied(&g, 20);
    s.end_replication(RID, true).unwrap();
    drop(r);
    let mut i = info();
    i.replication_id = "m1-3".into();
    // `adopt_from` names a replication this MT never had (it was at the
    // other site): the ended replica of the same machine is adopted.
    let (n, from) = s.prepare(&i, "m1-2").unwrap();
    assert_eq!(from.as_deref(), Some(RID));
    check_latest(&n, &g.disks);
    // Another machine's is never adopted.
    let mut other = info();
    other.replication_id = "m2".into();
    other.machine_id = "m2".into();
    let (_, from) = s.prepare(&other, "").unwrap();
    assert!(from.is_none());
}

#[test]
fn hello_id_comes_from_the_certificate_and_status_lists_replications() {
    use rebound_common::control::ControlHandler;
    use rebound_common::pki::{write_cert, Ca, Role};
    use rebound_common::tls::TlsFiles;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("t").unwrap();
    let names = vec!["localhost".to_string()];
    write_cert(
        dir.path(),
        "mt",
        &ca.issue(Role::Mt, "mt-b", &names).unwrap(),
    )
    .unwrap();
    write_cert(
        dir.path(),
        "ps",
        &ca.issue(Role::Ps, "ps-a", &names).unwrap(),
    )
    .unwrap();
    let tls = |n| TlsFiles {
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join(format!("{n}.pem")),
        key: dir.path().join(format!("{n}.key")),
        renewed: None,
    };
    assert_eq!(crate::own_id(&tls("mt"), Role::Mt).unwrap(), "mt-b");
    let e = crate::own_id(&tls("ps"), Role::Mt).unwrap_err();
    assert!(e.to_string().contains("mt certificate"), "{e}");

    let g = mixed();
    let (s, r) = open_store(&dir.path().join("data"));
    apply_range(&r, &g, 1, g.seq(), 50);
    let h = crate::control::Handler(Arc::new(control(s.clone(), HooksConfig::default())));
    let hello = h.hello();
    assert_eq!((hello.role.as_str(), hello.id.as_str()), ("mt", "mt1"));
    assert!(h.status().is_none(), "no status before the first sample");
    *h.0.status.lock().unwrap() = Some(crate::control::mt_status(&s, &RetentionConfig::default()));
    let Some(pb::status::Status::Mt(st)) = h.status().unwrap().status else {
        panic!()
    };
    assert_eq!(st.replications.len(), 1);
    assert_eq!(st.replications[0].state, "applying");
    assert_eq!(st.replications[0].machine_id, "m1");
    assert_eq!(st.replications[0].points.as_ref().unwrap().count, 6);
}
