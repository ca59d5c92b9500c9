//! The alert rules against a real store: components with the statuses
//! they reported, a protected machine, and what is raised and cleared.

use super::evaluate::{evaluate, Open};
use super::readings::{readings, Rules};
use super::view::View;
use crate::store::{Component, Health, Machine, Replication, SqliteStore, Store};
use prost::Message;
use rebound_common::pki::Role;
use rebound_proto::control as pb;
use std::time::Duration;

const NOW: u64 = 1_000_000;

fn rules() -> Rules {
    Rules {
        rpo_default: Duration::from_secs(60),
        offline_grace: Duration::from_secs(10),
        started_ms: 0,
    }
}

async fn component(store: &SqliteStore, role: Role, id: &str, health: Health) {
    let mut c = Component::new(role, id);
    c.site = "onprem".into();
    c.health = health;
    c.last_heartbeat_ms = NOW - 1000;
    store.put_component(&c).await.unwrap();
}

async fn status(store: &SqliteStore, role: Role, id: &str, s: pb::status::Status) {
    let bytes = pb::Status { status: Some(s) }.encode_to_vec();
    store.set_status(role, id, &bytes, NOW).await.unwrap();
}

fn agent(rpo_ms: u64, link_error: &str) -> pb::status::Status {
    pb::status::Status::Agent(pb::AgentStatus {
        rpo_ms,
        replication_id: "r1".into(),
        link_error: link_error.into(),
        ..Default::default()
    })
}

fn ps(lag_ms: u64, cache_bytes: u64) -> pb::status::Status {
    pb::status::Status::Ps(pb::PsStatus {
        cache_bytes,
        cache_limit: 100,
        replications: vec![pb::PsReplicationLag {
            replication_id: "r1".into(),
            lag_ms,
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn mt(capped: bool) -> pb::status::Status {
    pb::status::Status::Mt(pb::MtStatus {
        replications: vec![pb::MtReplicationStatus {
            replication_id: "r1".into(),
            machine_id: "m1".into(),
            retention_capped: capped,
            ..Default::default()
        }],
        ..Default::default()
    })
}

async fn round(store: &SqliteStore, open: &mut Open, now: u64) -> Vec<(bool, String, String)> {
    let view = View::load(store).await.unwrap();
    evaluate(open, &readings(&view, &rules(), now), now)
        .into_iter()
        .map(|c| (c.raised, c.alert.kind, c.alert.subject))
        .collect()
}

fn raised(kind: &str, subject: &str) -> (bool, String, String) {
    (true, kind.into(), subject.into())
}

fn cleared(kind: &str, subject: &str) -> (bool, String, String) {
    (false, kind.into(), subject.into())
}

#[tokio::test]
async fn each_kind_is_raised_from_what_components_report_and_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("cs.db")).await.unwrap();
    store
        .put_machine(&Machine::test_at("m1", "onprem"))
        .await
        .unwrap();
    store
        .put_replication(&Replication::test_protected("r1", 1))
        .await
        .unwrap();
    component(&store, Role::Agent, "m1", Health::Online).await;
    component(&store, Role::Ps, "ps1", Health::Online).await;
    component(&store, Role::Mt, "mt1", Health::Online).await;
    // Enrolled, never connected: no alert.
    component(&store, Role::Ps, "ps2", Health::Enrolled).await;
    status(&store, Role::Agent, "m1", agent(1_000, "")).await;
    status(&store, Role::Ps, "ps1", ps(2_000, 50)).await;
    status(&store, Role::Mt, "mt1", mt(false)).await;
    let mut open = Open::new();
    assert!(round(&store, &mut open, NOW).await.is_empty());

    // The PS's lag counts: the agent's own RPO is small while the MT is
    // stopped, the PS's backlog ages. The cache passes 80 %, the MT's cap
    // shrinks the window, the agent loses its PS.
    status(
        &store,
        Role::Agent,
        "m1",
        agent(1_000, "ps1 refused: connection reset"),
    )
    .await;
    status(&store, Role::Ps, "ps1", ps(61_000, 81)).await;
    status(&store, Role::Mt, "mt1", mt(true)).await;
    let mut got = round(&store, &mut open, NOW).await;
    got.sort();
    assert_eq!(
        got,
        vec![
            raised("link-error", "agent:m1"),
            raised("ps-cache-full", "ps:ps1"),
            raised("retention-shrunk", "m1"),
            raised("rpo-exceeded", "m1"),
        ]
    );
    let rpo = &open[&("rpo-exceeded".to_string(), "m1".to_string())];
    assert_eq!(
        (rpo.value, rpo.threshold, rpo.site.as_str()),
        (61.0, 60.0, "onprem")
    );
    assert!(
        rpo.message.contains("ps1") && rpo.message.contains("--rpo-alert"),
        "{}",
        rpo.message
    );
    let link = &open[&("link-error".to_string(), "agent:m1".to_string())];
    assert!(
        link.message.contains("connection reset"),
        "{}",
        link.message
    );

    // Between the levels (RPO 50 s > 48 s, cache 75 % > 70 %): still open.
    status(&store, Role::Ps, "ps1", ps(50_000, 75)).await;
    assert!(round(&store, &mut open, NOW).await.is_empty());
    status(&store, Role::Ps, "ps1", ps(48_000, 70)).await;
    status(&store, Role::Mt, "mt1", mt(false)).await;
    status(&store, Role::Agent, "m1", agent(1_000, "")).await;
    let mut got = round(&store, &mut open, NOW).await;
    got.sort();
    assert_eq!(
        got,
        vec![
            cleared("link-error", "agent:m1"),
            cleared("ps-cache-full", "ps:ps1"),
            cleared("retention-shrunk", "m1"),
            cleared("rpo-exceeded", "m1"),
        ]
    );

    // A policy threshold replaces the default.
    let mut m = Machine::test_at("m1", "onprem");
    m.policy.rpo_alert_ms = 2_000;
    store.put_machine(&m).await.unwrap();
    status(&store, Role::Agent, "m1", agent(2_500, "")).await;
    assert_eq!(
        round(&store, &mut open, NOW).await,
        vec![raised("rpo-exceeded", "m1")]
    );

    // An MT offline: its reports are stale, the RPO alert stays open (the
    // agent is online), and after the grace it is offline itself.
    store
        .set_health(Role::Mt, "mt1", Health::Offline)
        .await
        .unwrap();
    assert!(round(&store, &mut open, NOW + 5_000).await.is_empty());
    assert_eq!(
        round(&store, &mut open, NOW + 12_000).await,
        vec![raised("component-offline", "mt:mt1")]
    );
    let off = &open[&("component-offline".to_string(), "mt:mt1".to_string())];
    assert_eq!(off.severity, "error");
    store
        .set_health(Role::Mt, "mt1", Health::Online)
        .await
        .unwrap();
    assert_eq!(
        round(&store, &mut open, NOW + 13_000).await,
        vec![cleared("component-offline", "mt:mt1")]
    );
    store.close().await;
}
