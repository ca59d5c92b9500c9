//! `rebound components` (certificate expiry, version mismatch) and the RPO
//! alert of a served CS, and `rebound alerts` on an unreadable alert log.

use super::*;

#[tokio::test]
async fn components_show_certificate_expiry_version_mismatch_and_the_rpo_alert() {
    let cs = Cs::start().await;
    let ps = cs.enrolled(Role::Ps, "ps1").await;
    let mt = cs.enrolled(Role::Mt, "mt1").await;
    let agent = cs.enrolled(Role::Agent, "m1").await;
    // ps1 runs another version; mt1 the CS's own.
    let (_ps_tx, _ps_down) = connect(cs.channel(&ps).await, hello("ps", "ps1", "onprem", "a"))
        .await
        .unwrap();
    let mut h = hello("mt", "mt1", "azure", "a");
    h.version = env!("CARGO_PKG_VERSION").into();
    let (_mt_tx, _mt_down) = connect(cs.channel(&mt).await, h).await.unwrap();

    let mut a = cs.admin().await;
    let r = a
        .components(pb::ComponentsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.cs_version, env!("CARGO_PKG_VERSION"));
    let find = |id: &str| r.components.iter().find(|c| c.id == id).cloned().unwrap();
    let (p, m) = (find("ps1"), find("mt1"));
    // Enrolled for the default lifetime, 90 days.
    let day = 86_400_000;
    for c in [&p, &m] {
        assert_eq!(c.health, "online");
        let left = c.cert_expiry_ms.saturating_sub(now_ms());
        assert!((89 * day..=90 * day).contains(&left), "{c:?}");
    }
    assert!(
        p.version_mismatch
            .starts_with("ps:ps1 runs test, the CS runs"),
        "{}",
        p.version_mismatch
    );
    assert_eq!(m.version_mismatch, "");
    let s = a.status(pb::StatusRequest {}).await.unwrap().into_inner();
    let mismatches: Vec<_> = s
        .events
        .iter()
        .filter(|e| e.kind == "version-mismatch")
        .map(|e| e.component.as_str())
        .collect();
    assert_eq!(mismatches, vec!["ps:ps1"], "once per connect, only ps1");

    // An agent whose RPO passes its machine's threshold raises one alert,
    // listed by `rebound alerts` and filed as an event, and clears it.
    let (tx, _down) = connect(
        cs.channel(&agent).await,
        hello("agent", "m1", "onprem", "a"),
    )
    .await
    .unwrap();
    let store = cs.store().await;
    let mut machine = store.get_machine("m1").await.unwrap().unwrap();
    machine.policy.rpo_alert_ms = 1000;
    store.put_machine(&machine).await.unwrap();
    store
        .put_replication(&Replication::test_protected("r1", now_ms()))
        .await
        .unwrap();
    let rpo_status = |rpo_ms| {
        up(component_message::Msg::Status(pb::Status {
            status: Some(pb::status::Status::Agent(pb::AgentStatus {
                rpo_ms,
                replication_id: "r1".into(),
                ..Default::default()
            })),
        }))
    };
    let events_of = |a: &AdminClient<Channel>| {
        let mut a = a.clone();
        async move {
            let s = a.status(pb::StatusRequest {}).await.unwrap().into_inner();
            s.events
                .into_iter()
                .filter(|e| e.kind == "rpo-exceeded" || e.kind == "alert-cleared")
                .map(|e| (e.kind, e.severity))
                .collect::<Vec<_>>()
        }
    };
    let hb = heartbeats(tx.clone());
    tx.send(rpo_status(500)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(events_of(&a).await.is_empty(), "under the threshold");
    tx.send(rpo_status(4000)).await.unwrap();
    eventually("rpo-exceeded raised", || {
        let a = a.clone();
        async move { !events_of(&a).await.is_empty() }
    })
    .await;
    let open = a
        .alerts(pb::AlertsRequest { all: false })
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(
        (open[0].kind.as_str(), open[0].subject.as_str()),
        ("rpo-exceeded", "m1")
    );
    assert_eq!((open[0].value, open[0].threshold), (4.0, 1.0));
    assert!(open[0].message.contains("m1"), "{}", open[0].message);
    // Still over: no second raise.
    tx.send(rpo_status(5000)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tx.send(rpo_status(200)).await.unwrap();
    eventually("rpo alert cleared", || {
        let a = a.clone();
        async move { events_of(&a).await.len() == 2 }
    })
    .await;
    // Newest first.
    assert_eq!(
        events_of(&a).await,
        vec![
            ("alert-cleared".to_string(), "info".to_string()),
            ("rpo-exceeded".to_string(), "warning".to_string())
        ]
    );
    let listed = |all| {
        let mut a = a.clone();
        async move {
            a.alerts(pb::AlertsRequest { all })
                .await
                .unwrap()
                .into_inner()
                .alerts
        }
    };
    assert!(listed(false).await.is_empty());
    let all = listed(true).await;
    assert_eq!(all.len(), 1);
    assert!(all[0].cleared_ms >= all[0].raised_ms && all[0].cleared_ms > 0);
    hb.abort();
    drop(tx);
    cs.stop_with(store).await;
}

#[tokio::test]
async fn an_unreadable_alert_log_answers_what_the_cs_does_about_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("cs.db")).await.unwrap();
    let empty = crate::service::alerts_listed(&store, true).await.unwrap();
    assert!(empty.alerts.is_empty());
    store
        .put_setting(crate::alerts::log::KEY, b"not json")
        .await
        .unwrap();
    let e = crate::service::alerts_listed(&store, true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss);
    assert!(
        e.message().contains("cannot read its alert log") && e.message().contains("rebound status"),
        "{e}"
    );
    store.close().await;
}
