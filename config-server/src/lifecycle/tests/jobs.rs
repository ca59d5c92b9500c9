//! Test failover, verify (and its schedule), move, the power-off of
//! change-point's neighbours, the source copy a commit keeps or removes,
//! and app-kind group points, against the fake bus: the commands each job
//! sends in order, what it records, and what it refuses.

use super::*;
use crate::store::records::{self, PendingRemoval, Record, SiteDisks, VerifyRecord};

/// The commands of kind `f` the fake bus answered.
fn cmds<T>(w: &World, f: impl Fn(&Cmd) -> Option<T>) -> Vec<T> {
    w.bus.cmds.lock().unwrap().iter().filter_map(f).collect()
}

/// The error text of a refused request.
fn refused(r: Result<Job, CsError>) -> String {
    r.expect_err("request refused").to_string()
}

/// Stores MT `mt`'s status with one replication's test failover.
async fn mt_test_status(w: &World, mt: &str, rid: &str, point: &str) {
    put_status(
        w,
        Role::Mt,
        mt,
        pb::status::Status::Mt(pb::MtStatus {
            replications: vec![pb::MtReplicationStatus {
                replication_id: rid.into(),
                test_point: point.into(),
                test_exports: vec![format!("{rid}/disk0@test")],
                ..Default::default()
            }],
            retention_bytes: 0,
        }),
    )
    .await;
}

#[tokio::test]
async fn test_failover_starts_test_copies_at_each_point_and_cleanup_ends_them() {
    let w = world().await;
    let e = refused(w.lc.test_failover(&one("m1"), PointSpec::Latest).await);
    assert!(e.contains("m1") && e.contains("Unprotected"), "{e}");
    let e = refused(w.lc.test_failover(&one("nope"), PointSpec::Latest).await);
    assert!(e.contains("nope is unknown"), "{e}");
    two_in_group(&w).await;
    let p = plan(
        &w,
        vec![crate::store::PlanGroup {
            machines: vec!["m1".into(), "m2".into()],
            ..Default::default()
        }],
    )
    .await;

    // `latest` on a plan: each machine its own newest point.
    w.bus.clear();
    let j = ok(&w, w.lc.test_failover(&p, PointSpec::Latest).await).await;
    assert_eq!(j.kind, "test-failover");
    assert_eq!(
        w.bus.sent(),
        vec!["start-test-failover>mt:mt1", "start-test-failover>mt:mt1"]
    );
    let starts = cmds(&w, |c| match c {
        Cmd::StartTestFailover(s) => Some(s.clone()),
        _ => None,
    });
    for s in &starts {
        assert!(s.run_test_power_on);
        assert!(matches!(
            s.point.as_ref().and_then(|p| p.choice.clone()),
            Some(Choice::Latest(_))
        ));
    }
    let detail = &j.steps.last().unwrap().detail;
    assert!(
        detail.contains("m2/disk0@test") && detail.contains("p10"),
        "{detail}"
    );
    for m in ["m1", "m2"] {
        assert_eq!(state(&w, m).await.0, ReplState::Protected, "{m}");
    }

    // `latest-multi`: the group point both share.
    ok(&w, w.lc.test_failover(&p, PointSpec::LatestMulti).await).await;
    let starts = cmds(&w, |c| match c {
        Cmd::StartTestFailover(s) => s.point.as_ref().and_then(|p| p.choice.clone()),
        _ => None,
    });
    assert_eq!(
        starts[2..],
        [
            Choice::GroupTag("g@8".into()),
            Choice::GroupTag("g@8".into())
        ]
    );

    // A running test failover (the MT's status says so) is refused.
    mt_test_status(&w, "mt1", "m1", "p10").await;
    let e = refused(w.lc.test_failover(&one("m1"), PointSpec::Latest).await);
    assert!(
        e.contains("already running") && e.contains("test-failover-cleanup m1"),
        "{e}"
    );

    w.bus.clear();
    let j = ok(&w, w.lc.test_failover_cleanup(&p).await).await;
    assert_eq!(j.kind, "test-failover-cleanup");
    assert_eq!(
        w.bus.sent(),
        vec!["end-test-failover>mt:mt1", "end-test-failover>mt:mt1"]
    );
}

#[tokio::test]
async fn verify_sends_the_tag_and_keeps_the_result() {
    let w = world().await;
    let e = refused(w.lc.verify("m1", "", false).await);
    assert!(
        e.contains("cannot verify m1") && e.contains("Unprotected"),
        "{e}"
    );
    protected(&w, "m1", "").await;
    w.bus.clear();
    let j = ok(&w, w.lc.verify("m1", "", false).await).await;
    assert_eq!(j.kind, "verify");
    assert_eq!(w.bus.sent(), vec!["verify>agent:m1"]);
    let v = cmds(&w, |c| match c {
        Cmd::Verify(v) => Some(v.clone()),
        _ => None,
    });
    assert!(v[0].tag_id.starts_with("verify-") && !v[0].repair, "{v:?}");
    assert_eq!(v[0].replication_id, "m1");
    let detail = &j.steps.last().unwrap().detail;
    assert_eq!(
        detail,
        &format!(
            "compared 4 chunks at point {}: 2 differ (disk0@0, disk0@3145728)",
            v[0].tag_id
        )
    );
    warned(&j, "--repair");
    let rec: VerifyRecord = records::get(w.store.as_ref(), Record::LastVerify, "m1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (rec.differing, rec.chunk_size, rec.point_seq),
        (2, 1 << 20, 11)
    );
    assert_eq!(rec.differing_chunks[1].offset, 3 << 20);
    assert_eq!(rec.job_id, j.id);
    let shown = crate::lifecycle::verify::verify_to_proto(&rec);
    assert_eq!(shown.differing_chunks.len(), 2);

    let j = ok(&w, w.lc.verify("m1", "mytag", true).await).await;
    assert!(j.warnings.is_empty(), "{:?}", j.warnings);
    let rec: VerifyRecord = records::get(w.store.as_ref(), Record::LastVerify, "m1")
        .await
        .unwrap()
        .unwrap();
    assert!(rec.repaired && rec.point_id == "mytag");
    let e = refused(w.lc.verify("m1", "two words", false).await);
    assert!(e.contains("without spaces"), "{e}");
    w.bus.disconnect(&ComponentKey::agent("m1"));
    let e = refused(w.lc.verify("m1", "", false).await);
    assert!(e.contains("not connected"), "{e}");
}

#[tokio::test]
async fn the_verify_schedule_runs_verify_at_the_policy_interval() {
    let w = world().await;
    protected(&w, "m1", "").await;
    let mut m = w.store.get_machine("m1").await.unwrap().unwrap();
    m.policy.verify_interval_secs = 1;
    w.store.put_machine(&m).await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(crate::lifecycle::verify::scheduler(
        w.lc.clone(),
        Duration::from_millis(20),
        stop_rx,
    ));
    let verifies = || cmds(&w, |c| matches!(c, Cmd::Verify(_)).then_some(())).len();
    let t0 = Instant::now();
    while verifies() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} verifies",
            verifies()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not before the interval, and not more often than it.
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    let _ = stop_tx.send(true);
    task.await.unwrap();
    let rec: Option<VerifyRecord> = records::get(w.store.as_ref(), Record::LastVerify, "m1")
        .await
        .unwrap();
    assert!(rec.is_some());
}

/// Reports PS statuses as after a switch: `new` carries `rid`, `old` holds
/// up to seq 10 (which the fake MT has applied).
async fn ps_statuses(w: &World, old: &str, new: &str, rid: &str) {
    for (ps, durable) in [(old, 10), (new, 12)] {
        put_status(
            w,
            Role::Ps,
            ps,
            pb::status::Status::Ps(pb::PsStatus {
                replications: vec![pb::PsReplicationLag {
                    replication_id: rid.into(),
                    durable_seq: durable,
                    ..Default::default()
                }],
                ..Default::default()
            }),
        )
        .await;
    }
}

/// The test world with a third PS, ps3, connected at m1's site.
async fn world_with_ps3() -> World {
    let w = world().await;
    component(
        w.store.as_ref(),
        Role::Ps,
        "ps3",
        "onprem",
        "127.0.0.1:29443",
    )
    .await;
    w.bus.connect(ComponentKey::ps("ps3"), "onprem");
    w
}

/// Reports PS1 drained and PS3 carrying m1 until the move job `id` ends;
/// the ended job.
async fn drained_move(w: &World, id: &str) -> crate::store::Job {
    let t0 = Instant::now();
    loop {
        ps_statuses(w, "ps1", "ps3", "m1").await;
        let j = w.store.get_job(id).await.unwrap().unwrap();
        if j.state.finished() {
            return j;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", j.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn move_switches_the_stream_to_the_new_ps_and_drops_the_old_one() {
    let w = world_with_ps3().await;
    let e = refused(w.lc.move_machine("m1", "ps3").await);
    assert!(
        e.contains("cannot move m1") && e.contains("Unprotected"),
        "{e}"
    );
    protected(&w, "m1", "").await;
    let e = refused(w.lc.move_machine("m1", "ps1").await);
    assert!(e.contains("already replicates through PS ps1"), "{e}");
    let e = refused(w.lc.move_machine("m1", "ps2").await);
    assert!(e.contains("stays within") && e.contains("onprem"), "{e}");
    let e = refused(w.lc.move_machine("m1", "ps9").await);
    assert!(e.contains("ps9"), "{e}");

    w.bus.clear();
    let job = w.lc.move_machine("m1", "ps3").await.unwrap();
    assert_eq!(job.kind, "move");
    // An old PS that is away (paused) is waited for: it may hold records.
    w.bus.disconnect(&ComponentKey::ps("ps1"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let j = w.store.get_job(&job.id).await.unwrap().unwrap();
    assert!(!j.state.finished(), "{}", j.status);
    assert!(j.status.contains("what PS ps1 held"), "{}", j.status);
    w.bus.connect(ComponentKey::ps("ps1"), "onprem");
    // The PSs report after the switch while the job waits.
    let j = drained_move(&w, &job.id).await;
    assert_eq!(j.state, JobState::Succeeded, "{}", j.error);
    assert_eq!(
        w.bus.sent(),
        vec![
            "set-replication-ps>mt:mt1",
            "add-replication>ps:ps3",
            "start-replication>agent:m1",
            "remove-replication>ps:ps1",
            "set-replication-ps>mt:mt1",
        ]
    );
    let sets = cmds(&w, |c| match c {
        Cmd::SetReplicationPs(s) => Some((s.ps_id.clone(), s.move_done)),
        _ => None,
    });
    assert_eq!(sets, [("ps3".into(), false), ("ps3".into(), true)]);
    let starts = cmds(&w, |c| match c {
        Cmd::StartReplication(s) => Some((s.moving, s.resync, s.ps_address.clone())),
        _ => None,
    });
    assert_eq!(
        starts.last().unwrap(),
        &(true, false, "127.0.0.1:29443".into())
    );
    let (st, r) = state(&w, "m1").await;
    assert_eq!((st, r.ps.as_str()), (ReplState::Protected, "ps3"));
}

#[tokio::test]
async fn move_waits_while_the_old_ps_does_not_list_the_replication() {
    let w = world_with_ps3().await;
    protected(&w, "m1", "").await;
    let job = w.lc.move_machine("m1", "ps3").await.unwrap();
    // PS3 carries the stream, PS1 reports but without m1: unknown, not drained.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(500) {
        ps_statuses(&w, "ps3", "ps3", "m1").await;
        put_status(
            &w,
            Role::Ps,
            "ps1",
            pb::status::Status::Ps(pb::PsStatus::default()),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let j = w.store.get_job(&job.id).await.unwrap().unwrap();
    assert!(!j.state.finished(), "{}", j.status);
    assert!(
        !w.bus
            .sent()
            .iter()
            .any(|s| s == "remove-replication>ps:ps1"),
        "{:?}",
        w.bus.sent()
    );
    // Once PS1 lists what it holds and the MT applied it, the move ends.
    let j = drained_move(&w, &job.id).await;
    assert_eq!(j.state, JobState::Succeeded, "{}", j.error);
}

#[test]
fn a_move_waits_at_least_as_long_as_the_agent() {
    use crate::lifecycle::movement::{move_wait, AGENT_MOVE_WAIT};
    assert!(move_wait(Duration::from_secs(2)) > AGENT_MOVE_WAIT);
    assert_eq!(
        move_wait(Duration::from_secs(3600)),
        Duration::from_secs(3600)
    );
}

/// Gives m1's disk a path at its current site.
async fn disk_path(w: &World, path: &str) {
    let mut m = w.store.get_machine("m1").await.unwrap().unwrap();
    m.disks[0].path = path.into();
    w.store.put_machine(&m).await.unwrap();
}

#[tokio::test]
async fn a_kept_source_copy_seeds_the_first_reprotect_back_and_change_point_powers_off() {
    let w = world().await;
    disk_path(&w, "/data/m1-disk0.img").await;
    protected(&w, "m1", "").await;
    failed_over(&w, &one("m1"), PointSpec::Latest, false).await;
    // The new site's agent reports its own paths; the kept copy stays the
    // old site's.
    disk_path(&w, "/replica/m1/disk0").await;
    let j = ok(
        &w,
        w.lc.change_point("m1", PointSpec::Id("p3".into())).await,
    )
    .await;
    let off = j
        .steps
        .iter()
        .find(|s| s.name.contains("power m1 off"))
        .unwrap();
    assert!(off.detail.contains("7 blocks"), "{}", off.detail);
    w.bus.disconnect(&ComponentKey::agent("m1"));
    ok(&w, w.lc.commit(&one("m1"), None).await).await;
    let kept: SiteDisks = records::get(w.store.as_ref(), Record::KeptCopy, "m1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.site, "onprem");
    assert_eq!(kept.paths, ["/data/m1-disk0.img"]);

    w.bus.connect(ComponentKey::agent("m1"), "azure");
    ok(&w, w.lc.reprotect(&one("m1"), "ps2", "", None, None).await).await;
    let prepares = cmds(&w, |c| match c {
        Cmd::PrepareReplication(p) => Some(p.clone()),
        _ => None,
    });
    let back = prepares.last().unwrap();
    assert_eq!(back.adopt_from, "m1");
    assert_eq!(back.seed_paths, ["/data/m1-disk0.img"]);
    assert!(prepares[0].seed_paths.is_empty(), "protect seeds nothing");
}

#[tokio::test]
async fn remove_source_copy_while_its_agent_is_offline_waits_for_the_agent() {
    let w = world().await;
    disk_path(&w, "/data/m1-disk0.img").await;
    protected(&w, "m1", "").await;
    failed_over(&w, &one("m1"), PointSpec::Latest, false).await;
    w.bus.disconnect(&ComponentKey::agent("m1"));
    let j = ok(&w, w.lc.commit(&one("m1"), Some(false)).await).await;
    warned(&j, "pending");
    let none: Option<SiteDisks> = records::get(w.store.as_ref(), Record::KeptCopy, "m1")
        .await
        .unwrap();
    assert!(none.is_none(), "a removed copy is not kept");
    let p: PendingRemoval = records::get(w.store.as_ref(), Record::PendingRemoval, "m1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (p.site.as_str(), p.replication_id.as_str()),
        ("onprem", "m1")
    );
    assert!(
        crate::lifecycle::source_copy::removal_pending(w.store.as_ref(), "m1", "onprem")
            .await
            .unwrap()
    );

    // An agent at another site changes nothing; the old site's gets it.
    w.bus.clear();
    let hello = |site: &'static str| {
        let (store, bus) = (w.store.clone(), w.bus.clone());
        async move {
            crate::lifecycle::source_copy::remove_on_hello(
                store.as_ref(),
                bus.as_ref(),
                "m1",
                site,
                Duration::from_secs(1),
            )
            .await
        }
    };
    hello("azure").await.unwrap();
    assert!(w.bus.sent().is_empty());
    w.bus.connect(ComponentKey::agent("m1"), "onprem");
    hello("onprem").await.unwrap();
    assert_eq!(w.bus.sent(), vec!["stop-replication>agent:m1"]);
    let stop = cmds(&w, |c| match c {
        Cmd::StopReplication(s) => Some(s.clone()),
        _ => None,
    });
    assert!(stop.last().unwrap().remove_source_copy);
    assert!(
        !crate::lifecycle::source_copy::removal_pending(w.store.as_ref(), "m1", "onprem")
            .await
            .unwrap()
    );
    let events = w.store.recent_events(10).await.unwrap();
    assert!(
        events.iter().any(|e| e.kind == "source-copy-removed"),
        "{events:?}"
    );

    // The reprotect back has nothing to seed from, and says so.
    w.bus.connect(ComponentKey::agent("m1"), "azure");
    let j = ok(&w, w.lc.reprotect(&one("m1"), "ps2", "", None, None).await).await;
    warned(&j, "copies the whole disk");
}

#[tokio::test]
async fn app_group_points_prepare_with_kind_app() {
    let w = world().await;
    for app in [false, true] {
        let g = Group {
            name: "g".into(),
            machines: vec!["m1".into()],
            hold_ms: 100,
            interval_secs: 0,
            app,
        };
        crate::lifecycle::group::cut_group_point(w.bus.as_ref(), &g, Duration::from_secs(1))
            .await
            .unwrap();
    }
    let kinds = cmds(&w, |c| match c {
        Cmd::GroupPrepare(p) => Some(p.kind.clone()),
        _ => None,
    });
    assert_eq!(kinds, ["crash", "app"]);
}
