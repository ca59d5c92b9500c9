//! The agent's control commands against a real capture (no PS, no CS).

use super::*;
use crate::capture::tests::{drain, make_capture, start};
use crate::config::{Config, DiskConfig, HooksConfig};
use rebound_common::frame::Record;
use std::time::Instant;

/// A runtime over one 4 MiB disk, streaming from seq 10 (no PS, no CS).
pub(crate) struct Fixture {
    _dir: tempfile::TempDir,
    pub(crate) rt: Arc<Runtime>,
}

pub(crate) fn fixture(hooks: HooksConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cap = make_capture(dir.path(), &[4 << 20], 64 << 20);
    start(&cap, 10);
    let cfg = Config {
        machine_id: "m1".into(),
        site: "a".into(),
        state_dir: dir.path().join("state"),
        disks: vec![DiskConfig {
            name: "disk0".into(),
            path: dir.path().join("d0.img"),
            ..Default::default()
        }],
        hooks,
        hook_timeout_secs: 5,
        ..Config::default()
    };
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    let settings = Arc::new(cfg.validate().unwrap());
    let rt = Runtime::new(cap, Arc::new(Link::default()), settings);
    Fixture { _dir: dir, rt }
}

fn cmd(c: Cmd) -> Command {
    Command {
        id: "x".into(),
        timeout_ms: 0,
        cmd: Some(c),
    }
}

fn tags(cap: &Capture) -> Vec<(u64, rebound_common::frame::Tag)> {
    drain(cap)
        .into_iter()
        .filter_map(|(s, r)| match r {
            Record::Tag(t) => Some((s, t)),
            _ => None,
        })
        .collect()
}

fn tag_cut(r: &CommandResult) -> TagCut {
    assert!(r.ok, "{r:?}");
    match &r.detail {
        Some(Detail::TagCut(t)) => t.clone(),
        other => panic!("expected TagCut, got {other:?}"),
    }
}

/// Sends the fence command for `tag_id` to the fixture's runtime.
async fn fence(f: &Fixture, tag_id: &str, run_shutdown_hook: bool) -> CommandResult {
    f.rt.handle_cmd(cmd(Cmd::Fence(pb::Fence {
        tag_id: tag_id.into(),
        run_shutdown_hook,
    })))
    .await
}

#[tokio::test]
async fn fence_gives_eperm_and_cuts_a_shutdown_tag_unfence_releases() {
    let f = fixture(HooksConfig::default());
    let cap = f.rt.capture.clone();
    cap.write(0, 0, &[1u8; 4096], false).unwrap();
    let r = fence(&f, "shutdown-job1", false).await;
    assert!(r.ok && r.warning.is_empty(), "{r:?}");
    let e = cap.write(0, 0, &[2u8; 4096], false).unwrap_err();
    assert_eq!(e.errno, 1, "EPERM");
    assert!(!f.rt.hello().writable);
    assert!(f.rt.status().fenced);
    let t = tags(&cap);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].1.id, "shutdown-job1");
    assert_eq!(t[0].1.kind, TagKind::Shutdown);
    // The fence is idempotent: no second tag.
    let again = fence(&f, "shutdown-job1", false).await;
    assert!(again.ok);
    assert!(tags(&cap).is_empty());
    assert!(f.rt.handle_cmd(cmd(Cmd::Unfence(pb::Unfence {}))).await.ok);
    cap.write(0, 0, &[3u8; 4096], false).unwrap();
    assert!(f.rt.hello().writable);
}

#[tokio::test]
async fn drain_without_ps_times_out_with_a_clear_error() {
    let f = fixture(HooksConfig::default());
    f.rt.capture.write(0, 0, &[1u8; 4096], false).unwrap();
    let r =
        f.rt.handle_cmd(cmd(Cmd::Drain(pb::Drain { timeout_ms: 200 })))
            .await;
    assert!(!r.ok);
    assert!(r.error.contains("not drained"), "{}", r.error);
}

#[tokio::test]
async fn drain_when_everything_is_durable_runs_the_shutdown_hook() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("hook-ran");
    let f = fixture(HooksConfig {
        shutdown: format!("echo $REBOUND_MACHINE > {}", marker.display()),
        ..Default::default()
    });
    let r = fence(&f, "s1", true).await;
    assert!(r.ok);
    // Pretend the PS acknowledged everything.
    let s = f.rt.capture.snapshot();
    let _ = drain(&f.rt.capture);
    f.rt.capture.stream().on_durable(s.seq, u64::MAX);
    let r =
        f.rt.handle_cmd(cmd(Cmd::Drain(pb::Drain { timeout_ms: 2000 })))
            .await;
    assert!(r.ok, "{r:?}");
    match r.detail {
        Some(Detail::Drained(d)) => {
            assert_eq!(d.shutdown_tag_seq, s.seq);
            assert_eq!(d.durable_seq, s.seq);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "m1");
}

#[tokio::test]
async fn group_hold_blocks_writes_until_commit_and_tags_with_the_group() {
    let f = fixture(HooksConfig::default());
    let cap = f.rt.capture.clone();
    let r = group_prepare(&f, "grp-1", "", 5000).await;
    assert!(r.ok, "{r:?}");
    // A write during the hold waits at the ordering point.
    let c2 = cap.clone();
    let writer = std::thread::spawn(move || {
        c2.write(0, 4096, &[7u8; 4096], false).unwrap();
        Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!writer.is_finished(), "a held write must wait");
    let released_at = Instant::now();
    let t = tag_cut(&group_commit(&f, "grp-1", "crash").await);
    assert_eq!(t.id, "grp-1");
    let done = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    assert!(done >= released_at);
    // The tag comes before the held write in the stream.
    let recs = drain(&cap);
    let tag_pos = recs
        .iter()
        .position(|(_, r)| matches!(r, Record::Tag(t) if t.id == "grp-1" && t.group == "grp-1"))
        .expect("group tag in the stream");
    assert!(recs[tag_pos + 1..]
        .iter()
        .any(|(_, r)| matches!(r, Record::Write { .. })));
}

#[tokio::test]
async fn group_hold_expires_on_its_own_and_late_commit_fails() {
    let f = fixture(HooksConfig::default());
    let cap = f.rt.capture.clone();
    let t0 = Instant::now();
    // hold_ms 0: the default 100 ms.
    assert!(group_prepare(&f, "grp-2", "", 0).await.ok);
    let c2 = cap.clone();
    tokio::task::spawn_blocking(move || c2.write(0, 0, &[1u8; 512], false).unwrap())
        .await
        .unwrap();
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(80) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert!(cap.hold().held_by().is_none());
    let r = group_commit(&f, "grp-2", "crash").await;
    assert!(!r.ok && r.error.contains("not in force"), "{r:?}");
    assert!(tags(&cap).is_empty());
}

#[tokio::test]
async fn group_abort_releases_at_once() {
    let f = fixture(HooksConfig::default());
    let cap = f.rt.capture.clone();
    assert!(group_prepare(&f, "grp-3", "", 10_000).await.ok);
    assert_eq!(cap.hold().held_by().as_deref(), Some("grp-3"));
    assert!(group_abort(&f, "grp-3").await.ok);
    let t0 = Instant::now();
    let c2 = cap.clone();
    tokio::task::spawn_blocking(move || c2.write(0, 0, &[1u8; 512], false).unwrap())
        .await
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(tags(&cap).is_empty());
}

#[tokio::test]
async fn app_tag_runs_freeze_and_thaw() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let f = fixture(HooksConfig {
        freeze: format!("echo freeze >> {}", log.display()),
        thaw: format!("echo thaw >> {}", log.display()),
        ..Default::default()
    });
    f.rt.capture.write(0, 0, &[1u8; 512], false).unwrap();
    let t = tag_cut(
        &f.rt
            .handle_cmd(cmd(Cmd::Tag(pb::Tag {
                id: "app-a".into(),
                kind: "app".into(),
                group: String::new(),
            })))
            .await,
    );
    assert_eq!((t.id.as_str(), t.kind.as_str()), ("app-a", "app"));
    assert!(t.warning.is_empty());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "freeze\nthaw\n");
    let tg = tags(&f.rt.capture);
    assert_eq!(tg[0].1.kind, TagKind::App);
}

#[tokio::test]
async fn app_tag_with_failing_freeze_cuts_a_crash_point_and_warns() {
    let f = fixture(HooksConfig {
        freeze: "echo db busy >&2; exit 3".into(),
        ..Default::default()
    });
    let (tx, _stop) = watch::channel(false);
    let r =
        f.rt.handle_cmd(cmd(Cmd::Tag(pb::Tag {
            id: "app-b".into(),
            kind: "app".into(),
            group: String::new(),
        })))
        .await;
    let t = tag_cut(&r);
    assert_eq!(t.kind, "crash");
    assert!(t.warning.contains("freeze failed"), "{t:?}");
    assert!(t.warning.contains("db busy"), "{t:?}");
    assert_eq!(r.warning, t.warning);
    let tg = tags(&f.rt.capture);
    assert_eq!(tg.len(), 1);
    assert_eq!(tg[0].1.kind, TagKind::Crash);
    assert_eq!(tg[0].1.id, "app-b");
    drop(tx);
}

#[tokio::test]
async fn app_tag_freeze_timeout_is_a_failed_freeze() {
    let f = fixture(HooksConfig {
        freeze: "sleep 30".into(),
        ..Default::default()
    });
    f.rt.hook_timeout_ms.store(200, Ordering::Relaxed);
    let t0 = Instant::now();
    let t = f.rt.app_tag("", "").await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(t.kind, "crash");
    assert!(t.warning.contains("did not finish"), "{t:?}");
}

#[tokio::test]
async fn set_policy_and_status_and_hello() {
    let f = fixture(HooksConfig::default());
    let r =
        f.rt.handle_cmd(cmd(Cmd::SetPolicy(pb::SetPolicy {
            policy: Some(pb::Policy {
                crash_interval_ms: 250,
                app_interval_secs: 0,
                freeze_timeout_ms: 1500,
                ..pb::Policy::default()
            }),
        })))
        .await;
    assert!(r.ok);
    assert_eq!(f.rt.crash_interval_ms.load(Ordering::Relaxed), 250);
    assert_eq!(f.rt.app_interval_secs.load(Ordering::Relaxed), 0);
    assert_eq!(f.rt.hook_timeout_ms.load(Ordering::Relaxed), 1500);
    let h = f.rt.hello();
    assert_eq!(
        (h.role.as_str(), h.id.as_str(), h.site.as_str()),
        ("agent", "m1", "a")
    );
    assert_eq!(h.disks.len(), 1);
    assert!(h.writable);
    assert_eq!(h.instance.len(), 16);
    let s = f.rt.status();
    assert_eq!(s.mode, "data");
    assert_eq!(s.seq, 10);
    let bad =
        f.rt.handle_cmd(cmd(Cmd::Rollback(pb::Rollback::default())))
            .await;
    assert!(!bad.ok);
}

/// StartReplication of `replication_id` to a PS address nothing listens
/// at (the sender keeps retrying).
fn start_cmd(replication_id: &str, resync: bool) -> Command {
    cmd(Cmd::StartReplication(pb::StartReplication {
        replication_id: replication_id.into(),
        ps_address: "127.0.0.1:1".into(),
        ps_server_name: "localhost".into(),
        resync,
        policy: None,
        moving: false,
    }))
}

/// StopReplication of `replication_id`, keeping the source copy.
async fn stop_replication(f: &Fixture, replication_id: &str, keep_running: bool) -> CommandResult {
    f.rt.handle_cmd(cmd(Cmd::StopReplication(pb::StopReplication {
        replication_id: replication_id.into(),
        remove_source_copy: false,
        keep_running,
    })))
    .await
}

#[tokio::test]
async fn start_replication_switches_the_stream_and_resyncs() {
    let f = fixture(HooksConfig::default());
    let cap = f.rt.capture.clone();
    cap.write(0, 0, &[1u8; 512], false).unwrap();
    // Nothing listens at the PS address: the sender keeps retrying.
    let start = || start_cmd("r2", true);
    let r = f.rt.handle_cmd(start()).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(cap.replication_id(), "r2");
    assert_eq!(f.rt.replication_id(), "r2");
    assert_eq!(f.rt.hello().replication_id, "r2");
    // The stream restarts from what the new PS says, with a full resync.
    let s = cap.snapshot();
    assert_eq!(s.buffer_bytes, 0);
    assert!(s.resync_pending_extents > 0);
    let saved = Runtime::load_assignment(&f.rt.settings).unwrap();
    assert_eq!(saved.replication_id, "r2");
    // A repeat is a no-op.
    assert!(f.rt.handle_cmd(start()).await.ok);
    let r = stop_replication(&f, "r2", false).await;
    assert!(r.ok);
    assert_eq!(f.rt.replication_id(), "");
    assert!(cap.is_fenced());
    assert!(Runtime::load_assignment(&f.rt.settings).is_none());
}

/// Sends SetPolicy with only the crash interval set.
async fn set_crash_interval(f: &Fixture, ms: u32) {
    let r =
        f.rt.handle_cmd(cmd(Cmd::SetPolicy(pb::SetPolicy {
            policy: Some(pb::Policy {
                crash_interval_ms: ms,
                ..pb::Policy::default()
            }),
        })))
        .await;
    assert!(r.ok, "{r:?}");
}

/// A running crash-point timer follows a changed interval at its next
/// tick: it does not sleep out the old (long) one first.
#[tokio::test]
async fn set_policy_wakes_a_running_crash_timer() {
    let f = fixture(HooksConfig::default());
    let cap = f.rt.capture.clone();
    drain(&cap);
    set_crash_interval(&f, 3_600_000).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let timer = tokio::spawn(crash_tag_loop(f.rt.clone(), stop_rx));
    cap.write(0, 0, &[1u8; 4096], false).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tags(&cap).is_empty(),
        "no tag within the hour-long interval"
    );
    let changed = Instant::now();
    set_crash_interval(&f, 100).await;
    let mut cut = Vec::new();
    while cut.is_empty() && changed.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        cut = tags(&cap);
    }
    assert_eq!(cut.len(), 1, "a crash tag at the new interval");
    assert_eq!(cut[0].1.kind, TagKind::Crash);
    assert!(changed.elapsed() < Duration::from_secs(2));
    stop_tx.send_replace(true);
    tokio::time::timeout(Duration::from_secs(2), timer)
        .await
        .expect("the timer stops")
        .unwrap();
}

/// Unprotect's StopReplication (keep_running) stops streaming but leaves
/// the machine's disks writable and served; commit's fences them.
#[tokio::test]
async fn stop_replication_keep_running_leaves_the_disks_writable() {
    let f = fixture(HooksConfig::default());
    let cap = f.rt.capture.clone();
    let r = f.rt.handle_cmd(start_cmd("r1", false)).await;
    assert!(r.ok, "{r:?}");
    let r = stop_replication(&f, "r1", true).await;
    assert!(r.ok && r.warning.is_empty(), "{r:?}");
    assert_eq!(f.rt.replication_id(), "");
    assert!(Runtime::load_assignment(&f.rt.settings).is_none());
    assert!(!cap.is_fenced());
    assert!(f.rt.hello().writable);
    // The export's writes still go through (a fenced copy gives EPERM).
    cap.write(0, 8192, &[7u8; 4096], false).unwrap();
    cap.write(0, 0, &[8u8; 512], true).unwrap();
}

/// GroupPrepare of kind `kind` for `tag_id`, holding up to `hold_ms` (0 =
/// the default).
async fn group_prepare(f: &Fixture, tag_id: &str, kind: &str, hold_ms: u32) -> CommandResult {
    f.rt.handle_cmd(cmd(Cmd::GroupPrepare(pb::GroupPrepare {
        group: "g".into(),
        tag_id: tag_id.into(),
        hold_ms,
        kind: kind.into(),
    })))
    .await
}

/// GroupCommit of kind `kind` for `tag_id`.
async fn group_commit(f: &Fixture, tag_id: &str, kind: &str) -> CommandResult {
    f.rt.handle_cmd(cmd(Cmd::GroupCommit(pb::GroupCommit {
        group: "g".into(),
        tag_id: tag_id.into(),
        kind: kind.into(),
    })))
    .await
}

/// GroupAbort for `tag_id`.
async fn group_abort(f: &Fixture, tag_id: &str) -> CommandResult {
    f.rt.handle_cmd(cmd(Cmd::GroupAbort(pb::GroupAbort {
        group: "g".into(),
        tag_id: tag_id.into(),
    })))
    .await
}

/// A fixture whose freeze and thaw hooks append their name to `log`
/// (freeze runs `freeze` instead when given).
fn logging_hooks(log: &std::path::Path, freeze: Option<&str>) -> Fixture {
    fixture(HooksConfig {
        freeze: freeze
            .map(String::from)
            .unwrap_or_else(|| format!("echo freeze >> {}", log.display())),
        thaw: format!("echo thaw >> {}", log.display()),
        ..Default::default()
    })
}

#[tokio::test]
async fn an_app_group_point_freezes_before_the_hold_and_thaws_after_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let f = logging_hooks(&log, None);
    let r = group_prepare(&f, "grp-app", "app", 5000).await;
    assert!(r.ok && r.warning.is_empty(), "{r:?}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "freeze\n");
    assert_eq!(f.rt.capture.hold().held_by().as_deref(), Some("grp-app"));
    let t = tag_cut(&group_commit(&f, "grp-app", "app").await);
    assert_eq!((t.id.as_str(), t.kind.as_str()), ("grp-app", "app"));
    assert!(t.warning.is_empty(), "{t:?}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "freeze\nthaw\n");
    assert!(f.rt.capture.hold().held_by().is_none());
    let tg = tags(&f.rt.capture);
    assert_eq!(tg.len(), 1);
    assert_eq!(tg[0].1.kind, TagKind::App);
    assert_eq!(tg[0].1.group, "grp-app");
}

#[tokio::test]
async fn an_app_group_point_thaws_on_abort_and_on_expiry_and_crash_groups_never_freeze() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let f = logging_hooks(&log, None);
    assert!(group_prepare(&f, "grp-crash", "crash", 5000).await.ok);
    assert!(!log.exists(), "a crash group point runs no freeze");
    assert!(group_abort(&f, "grp-crash").await.ok);
    assert!(group_prepare(&f, "grp-a", "app", 5000).await.ok);
    let r = group_abort(&f, "grp-a").await;
    assert!(r.ok && r.warning.is_empty(), "{r:?}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "freeze\nthaw\n");
    // Expiry: the hold is released and the machine thawed on its own.
    let r = group_prepare(&f, "grp-b", "app", 50).await;
    assert!(r.ok, "{r:?}");
    let t0 = Instant::now();
    while std::fs::read_to_string(&log).unwrap() != "freeze\nthaw\nfreeze\nthaw\n" {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no thaw after the hold expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(f.rt.capture.hold().held_by().is_none());
    assert!(tags(&f.rt.capture).is_empty());
    let r = group_prepare(&f, "grp-c", "snapshot", 5000).await;
    assert!(!r.ok && r.error.contains("unknown kind"), "{r:?}");
}

#[tokio::test]
async fn an_app_group_point_whose_freeze_fails_is_crash_consistent_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let f = logging_hooks(&log, Some("echo db busy >&2; exit 3"));
    let r = group_prepare(&f, "grp-f", "app", 5000).await;
    assert!(r.ok, "{r:?}");
    assert!(
        r.warning.contains("freeze failed") && r.warning.contains("db busy"),
        "{r:?}"
    );
    // The half-done freeze was undone at once.
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "thaw\n");
    let t = tag_cut(&group_commit(&f, "grp-f", "app").await);
    assert_eq!(t.kind, "crash");
    assert!(t.warning.contains("crash-consistent"), "{t:?}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "thaw\n");
    assert_eq!(tags(&f.rt.capture)[0].1.kind, TagKind::Crash);
}

/// StartReplication moving replication `rid` to the PS at `ps`.
fn move_cmd(rid: &str, ps: &str) -> Command {
    cmd(Cmd::StartReplication(pb::StartReplication {
        replication_id: rid.into(),
        ps_address: ps.into(),
        ps_server_name: "localhost".into(),
        resync: false,
        policy: None,
        moving: true,
    }))
}

#[tokio::test]
async fn a_move_to_another_ps_keeps_the_buffer_and_resyncs_nothing() {
    let f = fixture(HooksConfig::default());
    let cap = f.rt.capture.clone();
    let rid = cap.replication_id();
    f.rt.start_pipeline(Assignment {
        replication_id: rid.clone(),
        ps_addr: "127.0.0.1:1".into(),
        ps_server_name: "localhost".into(),
    })
    .await;
    let before = cap.snapshot().resync_pending_extents;
    cap.write(0, 0, &[1u8; 4096], false).unwrap();
    let buffered = cap.snapshot().buffer_bytes;
    assert!(buffered > 0);
    let r = f.rt.handle_cmd(move_cmd(&rid, "127.0.0.1:2")).await;
    assert!(r.ok, "{r:?}");
    let s = cap.snapshot();
    assert_eq!(s.buffer_bytes, buffered, "the change buffer is kept");
    assert_eq!(s.resync_pending_extents, before, "no resync queued");
    assert_eq!(cap.replication_id(), rid);
    let saved = Runtime::load_assignment(&f.rt.settings).unwrap();
    assert_eq!(saved.ps_addr, "127.0.0.1:2");
}

#[tokio::test]
async fn a_move_survives_a_restart_of_the_agent() {
    let f = fixture(HooksConfig::default());
    let cap = f.rt.capture.clone();
    let rid = cap.replication_id();
    let at = |ps: &str| Assignment {
        replication_id: rid.clone(),
        ps_addr: ps.into(),
        ps_server_name: "localhost".into(),
    };
    f.rt.start_pipeline(at("127.0.0.1:1")).await;
    assert_eq!(f.rt.moving_until_ms().await, None);
    let r = f.rt.handle_cmd(move_cmd(&rid, "127.0.0.1:2")).await;
    assert!(r.ok, "{r:?}");
    // The new PS is unreachable, so the move is still under way.
    let until = Runtime::recorded_move(&f.rt.settings).expect("the move is recorded");
    assert!(until > rebound_common::time::now_ms());
    assert_eq!(f.rt.moving_until_ms().await, Some(until));
    f.rt.stop_pipeline().await;

    // A restarted agent (a new runtime over the same state) still waits.
    let settings = f.rt.settings.clone();
    let again = Runtime::new(cap.clone(), Arc::new(Link::default()), settings.clone());
    let a = Runtime::load_assignment(&settings).unwrap();
    assert_eq!(a, at("127.0.0.1:2"));
    again.start_pipeline(a).await;
    assert_eq!(again.moving_until_ms().await, Some(until));
    again.stop_pipeline().await;

    // A move whose wait has run out is over: a plain stream.
    let expired = serde_json::json!({
        "replication_id": rid, "ps_addr": "127.0.0.1:2",
        "ps_server_name": "localhost", "moving_until_ms": 1,
    });
    std::fs::write(settings.assigned_path(), expired.to_string()).unwrap();
    let later = Runtime::new(cap, Arc::new(Link::default()), settings.clone());
    later.start_pipeline(at("127.0.0.1:2")).await;
    assert_eq!(later.moving_until_ms().await, None);
    // Another assignment than the recorded one is not moving either.
    later.start_pipeline(at("127.0.0.1:3")).await;
    assert_eq!(later.moving_until_ms().await, None);
    later.stop_pipeline().await;
}
