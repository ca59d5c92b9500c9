//! Protect and reprotect without a PS: the least-loaded online PS of the
//! machine's site carries the replication, and a site with none online is
//! refused by name.

use super::*;
use crate::lifecycle::placement::least_loaded;

fn repl_on(ps: &str) -> Replication {
    Replication {
        id: format!("r-{ps}"),
        machine: "m".into(),
        from_site: "onprem".into(),
        to_site: "azure".into(),
        ps: ps.into(),
        mt: "mt1".into(),
        policy: Policy::default(),
        state: ReplState::Protected,
        previous: String::new(),
        failover_point: None,
        created_ms: 0,
        updated_ms: 0,
    }
}

#[test]
fn least_loaded_counts_replications_and_breaks_ties_by_id() {
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(least_loaded(&ids(&[]), &[]), None);
    assert_eq!(least_loaded(&ids(&["b", "a"]), &[]).as_deref(), Some("a"));
    let current = [repl_on("a"), repl_on("a"), repl_on("b"), repl_on("gone")];
    assert_eq!(
        least_loaded(&ids(&["a", "b", "c"]), &current).as_deref(),
        Some("c")
    );
    assert_eq!(
        least_loaded(&ids(&["a", "b"]), &current).as_deref(),
        Some("b")
    );
}

#[tokio::test]
async fn protect_without_a_ps_picks_the_least_loaded_online_ps_of_the_site() {
    let w = world().await;
    let s = w.store.as_ref();
    // ps0 sorts first and carries nothing, but it is not connected.
    component(s, Role::Ps, "ps0", "onprem", "127.0.0.1:9445").await;
    component(s, Role::Ps, "ps3", "onprem", "127.0.0.1:9446").await;
    w.bus.connect(ComponentKey::ps("ps3"), "onprem");
    protected(&w, "m1", "").await;
    assert_eq!(state(&w, "m1").await.1.ps, "ps1");

    machine(&w, "m2").await;
    let j = ok(
        &w,
        w.lc.protect("m2", "azure", "", "mt1", "", Policy::default())
            .await,
    )
    .await;
    assert_eq!(state(&w, "m2").await.1.ps, "ps3", "ps1 carries m1");
    let spec: JobSpec = serde_json::from_str(&j.spec).unwrap();
    assert!(
        matches!(spec, JobSpec::Protect { ref ps, .. } if ps == "ps3"),
        "{spec:?}"
    );

    // Equal loads: the smaller id.
    machine(&w, "m3").await;
    ok(
        &w,
        w.lc.protect("m3", "azure", "", "mt1", "", Policy::default())
            .await,
    )
    .await;
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
