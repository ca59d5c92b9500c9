use super::*;
use crate::store::{now_ms, Machine, Policy, Replication, SqliteStore};

fn ev(
    time_ms: u64,
    component: &str,
    severity: &str,
    kind: &str,
    message: &str,
    rep: &str,
) -> Event {
    Event {
        time_ms,
        component: component.into(),
        severity: severity.into(),
        kind: kind.into(),
        message: message.into(),
        replication: rep.into(),
    }
}

fn m1() -> Relevant {
    Relevant {
        components: ["agent:m1", "ps:ps1", "mt:mt1"].map(String::from).into(),
        replications: ["m1".to_string()].into(),
    }
}

#[test]
fn the_newest_error_of_the_machines_components_is_the_cause() {
    // Newest first, as the store lists them.
    let events = vec![
        ev(50, "agent:m2", "error", "link-refused", "m2's problem", ""),
        ev(
            40,
            "mt:mt1",
            "error",
            "replication-poisoned",
            "other's",
            "m7",
        ),
        ev(30, "agent:m1", "info", "bitmap-mode", "fine", "m1"),
        ev(
            20,
            "agent:m1",
            "error",
            "link-tls-name",
            "cannot reach ps at 10.0.0.3:7000: TLS ...",
            "m1",
        ),
        ev(10, "ps:ps1", "error", "link-refused", "older", ""),
    ];
    assert_eq!(
        newest_cause(&events, &m1(), 0).as_deref(),
        Some("agent m1: cannot reach ps at 10.0.0.3:7000: TLS ...")
    );
    // Only what was reported since the job started.
    assert_eq!(newest_cause(&events, &m1(), 25), None);
}

#[test]
fn a_restored_link_is_no_longer_the_cause() {
    let events = vec![
        ev(30, "agent:m1", "info", RESTORED_KIND, "works again", "m1"),
        ev(20, "agent:m1", "error", "link-tls-name", "name", "m1"),
        ev(10, "ps:ps1", "error", "link-unreachable", "mt down", ""),
    ];
    assert_eq!(
        newest_cause(&events, &m1(), 0).as_deref(),
        Some("ps ps1: mt down")
    );
}

#[tokio::test]
async fn the_watch_finds_the_cause_in_the_store_and_explains_a_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("cs.db")).await.unwrap();
    let m1 = Machine {
        id: "m1".into(),
        site: "onprem".into(),
        disks: Vec::new(),
        policy: Policy::default(),
        group: String::new(),
        created_ms: now_ms(),
    };
    store.put_machine(&m1).await.unwrap();
    let start = now_ms();
    store
        .put_replication(&Replication::test_protected("m1", start))
        .await
        .unwrap();
    let machines = vec!["m1".to_string()];
    let mut w = StallWatch::default();
    assert_eq!(w.cause(&store, &machines, start).await.unwrap(), None);
    store
        .add_event(&ev(
            now_ms(),
            "ps:ps1",
            "error",
            "link-tls-name",
            "cannot reach mt",
            "",
        ))
        .await
        .unwrap();
    // Not looked at again before LOOK_EVERY: cheap polling.
    assert_eq!(w.cause(&store, &machines, start).await.unwrap(), None);
    tokio::time::sleep(LOOK_EVERY).await;
    assert_eq!(
        w.cause(&store, &machines, start).await.unwrap(),
        Some("ps ps1: cannot reach mt")
    );
    assert_eq!(
        w.explain("no point after 24h".into()),
        "no point after 24h (last cause reported: ps ps1: cannot reach mt)"
    );
}
