//! The fleet side of the lifecycle against the fake bus: unprotect (the
//! commands it sends, the replica kept or deleted, the states it refuses),
//! retention sent to the MT before the agent streams at protect and
//! reprotect, and `policy set` reaching the agent and the MT or listing
//! them as pending.

use super::*;
use crate::fleet::policy::set_policy;

/// The `keep_replica` of every EndReplication the fake bus answered.
fn ended(w: &World) -> Vec<bool> {
    let cmds = w.bus.cmds.lock().unwrap();
    cmds.iter()
        .filter_map(|c| match c {
            Cmd::EndReplication(e) => Some(e.keep_replica),
            _ => None,
        })
        .collect()
}

/// The (window, max bytes) of every SetRetention answered.
fn retentions(w: &World) -> Vec<(String, u64, u64)> {
    let cmds = w.bus.cmds.lock().unwrap();
    cmds.iter()
        .filter_map(|c| match c {
            Cmd::SetRetention(r) => Some((r.replication_id.clone(), r.window_secs, r.max_bytes)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn unprotect_stops_the_agent_drops_the_cache_and_keeps_or_deletes_the_replica() {
    let w = world().await;
    protected(&w, "m1", "").await;
    w.bus.clear();
    let j = ok(&w, w.lc.unprotect("m1", false).await).await;
    assert_eq!(j.kind, "unprotect");
    assert_eq!(
        w.bus.sent(),
        vec![
            "stop-replication>agent:m1",
            "remove-replication>ps:ps1",
            "end-replication>mt:mt1"
        ]
    );
    assert_eq!(ended(&w), vec![true]);
    assert_eq!(state(&w, "m1").await.0, ReplState::Unprotected);
    let stopped = w.bus.cmds.lock().unwrap().iter().any(|c| {
        matches!(c, Cmd::StopReplication(s)
            if s.replication_id == "m1" && !s.remove_source_copy && s.keep_running)
    });
    assert!(stopped, "the agent keeps the machine's disks");

    // Unprotected: nothing to end; protect works again, with a new replication.
    let e = w.lc.unprotect("m1", false).await.unwrap_err().to_string();
    assert!(e.contains("not protected"), "{e}");
    protected(&w, "m1", "").await;
    let (st, r) = state(&w, "m1").await;
    assert_eq!((st, r.id.as_str()), (ReplState::Protected, "m1-2"));

    ok(&w, w.lc.unprotect("m1", true).await).await;
    assert_eq!(ended(&w), vec![true, false], "--delete-replica deletes it");
}

#[tokio::test]
async fn unprotect_is_refused_during_and_after_a_failover_and_warns_for_an_absent_agent() {
    let w = world().await;
    protected(&w, "m1", "").await;
    failed_over(&w, &one("m1"), PointSpec::Latest, false).await;
    let e = w.lc.unprotect("m1", false).await.unwrap_err();
    assert!(matches!(e, CsError::FailedPrecondition(_)), "{e}");
    assert!(e.to_string().contains("rebound commit m1"), "{e}");
    ok(&w, w.lc.commit(&one("m1"), None).await).await;
    let e = w.lc.unprotect("m1", false).await.unwrap_err().to_string();
    assert!(e.contains("rebound reprotect m1"), "{e}");

    // A machine whose agent is gone is unprotected all the same, with a warning.
    machine(&w, "m2").await;
    protected(&w, "m2", "").await;
    w.bus.disconnect(&ComponentKey::agent("m2"));
    let j = ok(&w, w.lc.unprotect("m2", false).await).await;
    warned(&j, "agent on m2 is not connected");
    assert_eq!(state(&w, "m2").await.0, ReplState::Unprotected);
}

#[tokio::test]
async fn retention_reaches_the_mt_before_the_agent_streams_and_reprotect_keeps_it() {
    let w = world().await;
    let policy = Policy {
        retention_window_secs: 20,
        retention_max_bytes: 1 << 30,
        ..Policy::default()
    };
    ok(
        &w,
        w.lc.protect("m1", "azure", "ps1", "mt1", "", policy).await,
    )
    .await;
    assert_eq!(
        w.bus.sent(),
        vec![
            "add-replication>ps:ps1",
            "prepare-replication>mt:mt1",
            "set-retention>mt:mt1",
            "start-replication>agent:m1"
        ]
    );
    assert_eq!(retentions(&w), vec![("m1".into(), 20, 1 << 30)]);

    // Reprotect without a policy keeps the reversed replication's.
    failed_over(&w, &one("m1"), PointSpec::Latest, false).await;
    ok(&w, w.lc.commit(&one("m1"), None).await).await;
    w.bus.connect(ComponentKey::agent("m1"), "azure");
    ok(&w, w.lc.reprotect(&one("m1"), "ps2", "", None, None).await).await;
    let (_, r) = state(&w, "m1").await;
    assert_eq!(r.policy, policy);
    assert_eq!(retentions(&w).last(), Some(&("m1-2".into(), 20, 1 << 30)));

    // With a policy, the new replication runs with the fields it gives and
    // keeps the others.
    failed_over_back(&w).await;
    w.bus.connect(ComponentKey::agent("m1"), "onprem");
    let changes = Policy {
        crash_interval_ms: 0,
        app_interval_secs: 0,
        freeze_timeout_ms: 0,
        retention_window_secs: 90,
        retention_max_bytes: 0,
        rpo_alert_ms: 0,
        verify_interval_secs: 0,
    };
    let m1 = one("m1");
    let reprotect = w.lc.reprotect(&m1, "ps1", "mt1", None, Some(changes));
    ok(&w, reprotect.await).await;
    let (_, r) = state(&w, "m1").await;
    let new = Policy {
        retention_window_secs: 90,
        ..policy
    };
    assert_eq!((r.id.as_str(), r.policy), ("m1-3", new));
    assert_eq!(retentions(&w).last(), Some(&("m1-3".into(), 90, 1 << 30)));
    let m = w.store.get_machine("m1").await.unwrap().unwrap();
    assert_eq!(m.policy, new, "the machine's policy follows");
}

/// Fails m1 back azure -> onprem at latest and commits.
async fn failed_over_back(w: &World) {
    let back =
        w.lc.failover(&one("m1"), "azure", "onprem", PointSpec::Latest, false)
            .await;
    ok(w, back).await;
    ok(w, w.lc.commit(&one("m1"), None).await).await;
}

#[tokio::test]
async fn policy_set_merges_pushes_to_agent_and_mt_and_lists_the_offline_as_pending() {
    let w = world().await;
    protected(&w, "m1", "").await;
    w.bus.clear();
    let t = Duration::from_millis(300);
    let changes = pb::Policy {
        crash_interval_ms: 300,
        ..Default::default()
    };
    let a = set_policy(w.store.as_ref(), w.bus.as_ref(), t, "m1", &changes)
        .await
        .unwrap();
    assert_eq!(a.policy.crash_interval_ms, 300);
    assert!(a.pending.is_empty(), "{:?}", a.pending);
    // No retention set: the MT keeps its default and is not told.
    assert_eq!(w.bus.sent(), vec!["set-policy>agent:m1"]);
    let pushed = w.bus.cmds.lock().unwrap().iter().any(|c| {
        matches!(c, Cmd::SetPolicy(p) if p.policy.as_ref().is_some_and(|p| p.crash_interval_ms == 300))
    });
    assert!(pushed);

    w.bus.clear();
    w.bus.disconnect(&ComponentKey::agent("m1"));
    let changes = pb::Policy {
        retention_window_secs: 20,
        rpo_alert_ms: 5000,
        ..Default::default()
    };
    let a = set_policy(w.store.as_ref(), w.bus.as_ref(), t, "m1", &changes)
        .await
        .unwrap();
    assert_eq!(a.pending, vec!["agent:m1 (offline)"]);
    assert_eq!(w.bus.sent(), vec!["set-retention>mt:mt1"]);
    assert_eq!(
        (
            a.policy.crash_interval_ms,
            a.policy.retention_window_secs,
            a.policy.rpo_alert_ms
        ),
        (300, 20, 5000),
        "fields not named keep their value"
    );
    let (_, r) = state(&w, "m1").await;
    assert_eq!(r.policy, a.policy, "the running replication carries it");
    let m = w.store.get_machine("m1").await.unwrap().unwrap();
    assert_eq!(m.policy, a.policy);

    let e = set_policy(w.store.as_ref(), w.bus.as_ref(), t, "nope", &changes)
        .await
        .unwrap_err();
    assert!(matches!(e, CsError::NotFound(_)), "{e}");
}
