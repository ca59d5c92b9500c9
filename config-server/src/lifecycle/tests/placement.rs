//! Protect and reprotect without a PS: the least-loaded online PS of the
//! machine's site carries the replication, and a site with none online is
//! refused by name.

use super::*;
use crate::lifecycle::placement::{least_loaded, reserved, Reserved};

fn repl_on(ps: &str) -> Replication {
    repl_of("m", ps, ReplState::Protected)
}

fn repl_of(machine: &str, ps: &str, state: ReplState) -> Replication {
    Replication {
        id: format!("r-{machine}-{ps}"),
        machine: machine.into(),
        from_site: "onprem".into(),
        to_site: "azure".into(),
        ps: ps.into(),
        mt: "mt1".into(),
        policy: Policy::default(),
        state,
        previous: String::new(),
        failover_point: None,
        created_ms: 0,
        updated_ms: 0,
    }
}

fn ids(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn least(online: &[&str], current: &[Replication], held: &[Reserved]) -> Option<String> {
    least_loaded(&ids(online), current, held).map(|(ps, _)| ps)
}

/// Adds `m` and protects it without naming a PS; the job succeeds.
async fn protected_anywhere(w: &World, m: &str) -> Job {
    machine(w, m).await;
    let protect = w.lc.protect(m, "azure", "", "mt1", "", Policy::default());
    ok(w, protect.await).await
}

/// A second PS at onprem, online, that sorts after ps1.
async fn ps3_online(w: &World) {
    component(
        w.store.as_ref(),
        Role::Ps,
        "ps3",
        "onprem",
        "127.0.0.1:9446",
    )
    .await;
    w.bus.connect(ComponentKey::ps("ps3"), "onprem");
}

#[test]
fn least_loaded_counts_replications_and_breaks_ties_by_id() {
    assert_eq!(least(&[], &[], &[]), None);
    assert_eq!(least(&["b", "a"], &[], &[]).as_deref(), Some("a"));
    let current = [repl_on("a"), repl_on("a"), repl_on("b"), repl_on("gone")];
    assert_eq!(least(&["a", "b", "c"], &current, &[]).as_deref(), Some("c"));
    assert_eq!(least(&["a", "b"], &current, &[]).as_deref(), Some("b"));
    assert_eq!(
        least_loaded(&ids(&["a", "b"]), &current, &[]),
        Some(("b".to_string(), 1))
    );
}

#[test]
fn only_replications_streaming_through_a_ps_count_as_its_load() {
    let ended = [
        ReplState::Unprotected,
        ReplState::FailedOver,
        ReplState::Committed,
        ReplState::WaitingForAgent,
    ];
    let mut current: Vec<Replication> = (ended.iter().enumerate())
        .map(|(i, st)| repl_of(&format!("e{i}"), "a", *st))
        .collect();
    current.push(repl_of("s1", "b", ReplState::InitialSync));
    assert_eq!(
        least_loaded(&ids(&["a", "b"]), &current, &[]),
        Some(("a".to_string(), 0)),
        "ended, failed-over and committed replications carry no traffic"
    );
    for st in [
        ReplState::InitialSync,
        ReplState::Protected,
        ReplState::FailingOver,
    ] {
        let mut c = current.clone();
        c.push(repl_of("s2", "a", st));
        c.push(repl_of("s3", "a", st));
        assert_eq!(least(&["a", "b"], &c, &[]).as_deref(), Some("b"), "{st}");
    }
}

#[test]
fn a_pending_job_reserves_its_ps_once_per_machine() {
    let held = |m: &str, ps: &str| Reserved {
        machine: m.into(),
        ps: ps.into(),
    };
    // Two machines reserved on a, one carried on b: b.
    let current = [repl_of("x", "b", ReplState::Protected)];
    let r = [held("p1", "a"), held("p2", "a")];
    assert_eq!(least(&["a", "b"], &current, &r).as_deref(), Some("b"));
    // A job whose replication exists already counts once, not twice.
    let current = [
        repl_of("p1", "a", ReplState::InitialSync),
        repl_of("x", "b", ReplState::Protected),
    ];
    let r = [held("p1", "a")];
    assert_eq!(
        least_loaded(&ids(&["a", "b"]), &current, &r),
        Some(("a".to_string(), 1))
    );

    // Protect and reprotect requests reserve; other jobs do not.
    let job_of = |spec: JobSpec| {
        let machines = spec.machines();
        let machines: Vec<&str> = machines.iter().map(String::as_str).collect();
        Job {
            spec: serde_json::to_string(&spec).unwrap(),
            ..Job::test_of(
                &format!("j-{}", spec.kind()),
                spec.kind(),
                &machines,
                JobState::Running,
                0,
            )
        }
    };
    let mut unreadable = job_of(JobSpec::Move {
        machine: "m9".into(),
        ps: "a".into(),
    });
    unreadable.spec = "{".into();
    let active = [
        job_of(JobSpec::Protect {
            machine: "m1".into(),
            to_site: "azure".into(),
            ps: "a".into(),
            mt: "mt1".into(),
            group: String::new(),
            policy: Policy::default(),
        }),
        job_of(JobSpec::Reprotect {
            machines: ids(&["m2", "m3"]),
            plan: String::new(),
            ps: "b".into(),
            mt: "mt1".into(),
            wait_agent_secs: 1,
            policy: None,
        }),
        job_of(JobSpec::Move {
            machine: "m4".into(),
            ps: "a".into(),
        }),
        unreadable,
    ];
    assert_eq!(
        reserved(&active),
        [held("m1", "a"), held("m2", "b"), held("m3", "b")]
    );
}

#[tokio::test]
async fn protect_without_a_ps_picks_the_least_loaded_online_ps_of_the_site() {
    let w = world().await;
    let s = w.store.as_ref();
    // ps0 sorts first and carries nothing, but it is not connected.
    component(s, Role::Ps, "ps0", "onprem", "127.0.0.1:9445").await;
    ps3_online(&w).await;
    protected(&w, "m1", "").await;
    assert_eq!(state(&w, "m1").await.1.ps, "ps1");

    let j = protected_anywhere(&w, "m2").await;
    assert_eq!(state(&w, "m2").await.1.ps, "ps3", "ps1 carries m1");
    let spec: JobSpec = serde_json::from_str(&j.spec).unwrap();
    assert!(
        matches!(spec, JobSpec::Protect { ref ps, .. } if ps == "ps3"),
        "{spec:?}"
    );

    // Equal loads: the smaller id.
    protected_anywhere(&w, "m3").await;
    assert_eq!(state(&w, "m3").await.1.ps, "ps1");
}

#[tokio::test]
async fn protect_without_a_ps_is_refused_when_none_of_the_site_is_online() {
    let w = world().await;
    w.bus.disconnect(&ComponentKey::ps("ps1"));
    let e =
        w.lc.protect("m1", "azure", "", "mt1", "", Policy::default())
            .await
            .unwrap_err()
            .to_string();
    assert!(e.contains("no process server at site onprem"), "{e}");
    assert!(e.contains("ps1 not connected") && e.contains("--ps"), "{e}");
    // ps2 is online but at the other site: never chosen.
    assert!(!e.contains("ps2"), "{e}");
}

#[tokio::test]
async fn protects_started_together_spread_over_the_online_pss() {
    let w = world().await;
    ps3_online(&w).await;
    let ms = ["m2", "m3", "m4", "m5"];
    for m in ms {
        machine(&w, m).await;
    }
    let protect = |m: &'static str| w.lc.protect(m, "azure", "", "mt1", "", Policy::default());
    let (a, b, c, d) = tokio::join!(
        protect(ms[0]),
        protect(ms[1]),
        protect(ms[2]),
        protect(ms[3])
    );
    let mut chosen = Vec::new();
    for j in [a, b, c, d] {
        let j = ok(&w, j).await;
        let JobSpec::Protect { machine, ps, .. } = serde_json::from_str(&j.spec).unwrap() else {
            panic!("not a protect: {}", j.spec);
        };
        assert_eq!(state(&w, &machine).await.1.ps, ps);
        chosen.push(ps);
    }
    chosen.sort();
    assert_eq!(
        chosen,
        ["ps1", "ps1", "ps3", "ps3"],
        "two each, not all on one"
    );
}

#[tokio::test]
async fn an_unprotected_machine_no_longer_loads_its_ps() {
    let w = world().await;
    protected(&w, "m1", "").await;
    assert_eq!(state(&w, "m1").await.1.ps, "ps1");
    ok(&w, w.lc.unprotect("m1", false).await).await;
    assert_eq!(state(&w, "m1").await.0, ReplState::Unprotected);
    ps3_online(&w).await;
    protected_anywhere(&w, "m2").await;
    assert_eq!(
        state(&w, "m2").await.1.ps,
        "ps1",
        "equal loads: the smaller id"
    );
}
