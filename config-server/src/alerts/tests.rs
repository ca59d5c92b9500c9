//! The alert rules against a real store and bus: components with the
//! statuses they reported and their control streams, a protected machine,
//! what is raised and cleared, and the webhook bodies a restart keeps.

use super::evaluate::{evaluate, Open, Pending};
use super::readings::{readings, Rules};
use super::view::View;
use crate::bus::{Bus, CommandBus, ComponentKey};
use crate::store::{Component, Health, Machine, Replication, SqliteStore, Store};
use prost::Message;
use rebound_common::pki::Role;
use rebound_proto::control as pb;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NOW: u64 = 1_000_000;

fn rules() -> Rules {
    Rules {
        rpo_default: Duration::from_secs(60),
        offline_grace: Duration::from_secs(10),
        started_ms: 0,
    }
}

/// A component as the store has it; Online ones also hold a control
/// stream to `bus`.
async fn component(store: &SqliteStore, bus: &CommandBus, role: Role, id: &str, health: Health) {
    let mut c = Component::new(role, id);
    c.site = "onprem".into();
    c.health = health;
    c.last_heartbeat_ms = NOW - 1000;
    store.put_component(&c).await.unwrap();
    if health == Health::Online {
        connect(bus, role, id);
    }
}

fn key(role: Role, id: &str) -> ComponentKey {
    ComponentKey {
        role,
        id: id.into(),
    }
}

/// Opens a control stream of `id` on `bus`; returns its connection id.
fn connect(bus: &CommandBus, role: Role, id: &str) -> u64 {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    bus.attach(&key(role, id), "i1", "onprem", true, tx).0
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

async fn round(
    store: &SqliteStore,
    bus: &CommandBus,
    open: &mut Open,
    pending: &mut Pending,
    now: u64,
) -> Vec<(bool, String, String)> {
    let view = View::load(store, bus).await.unwrap();
    evaluate(open, pending, &readings(&view, &rules(), now), now)
        .into_iter()
        .map(|c| (c.raised, c.alert.kind, c.alert.subject))
        .collect()
}

/// A store in a temporary directory (kept alive by the returned guard)
/// holding `machine` and its protected replication r1.
async fn store_with(machine: Machine) -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("cs.db")).await.unwrap();
    store.put_machine(&machine).await.unwrap();
    store
        .put_replication(&Replication::test_protected("r1", 1))
        .await
        .unwrap();
    (dir, store)
}

fn raised(kind: &str, subject: &str) -> (bool, String, String) {
    (true, kind.into(), subject.into())
}

fn cleared(kind: &str, subject: &str) -> (bool, String, String) {
    (false, kind.into(), subject.into())
}

#[tokio::test]
async fn each_kind_is_raised_from_what_components_report_and_cleared() {
    let (_dir, store) = store_with(Machine::test_at("m1", "onprem")).await;
    let bus = CommandBus::new();
    component(&store, &bus, Role::Agent, "m1", Health::Online).await;
    component(&store, &bus, Role::Ps, "ps1", Health::Online).await;
    component(&store, &bus, Role::Mt, "mt1", Health::Online).await;
    // Enrolled, never connected: no alert.
    component(&store, &bus, Role::Ps, "ps2", Health::Enrolled).await;
    status(&store, Role::Agent, "m1", agent(1_000, "")).await;
    status(&store, Role::Ps, "ps1", ps(2_000, 50)).await;
    status(&store, Role::Mt, "mt1", mt(false)).await;
    let mut open = Open::new();
    let mut pending = Pending::new();
    assert!(round(&store, &bus, &mut open, &mut pending, NOW)
        .await
        .is_empty());

    // The PS's lag counts: the agent's own RPO is small while the MT is
    // stopped, the PS's backlog ages. The cache passes 80 %, the MT's cap
    // shrinks the window, the agent loses its PS. The link error and the
    // shrunk retention are raised once they have lasted the grace (10 s).
    status(
        &store,
        Role::Agent,
        "m1",
        agent(1_000, "ps1 refused: connection reset"),
    )
    .await;
    status(&store, Role::Ps, "ps1", ps(61_000, 81)).await;
    status(&store, Role::Mt, "mt1", mt(true)).await;
    let mut got = round(&store, &bus, &mut open, &mut pending, NOW).await;
    got.sort();
    assert_eq!(
        got,
        vec![
            raised("ps-cache-full", "ps:ps1"),
            raised("rpo-exceeded", "m1"),
        ]
    );
    assert!(round(&store, &bus, &mut open, &mut pending, NOW + 9_999)
        .await
        .is_empty());
    let mut got = round(&store, &bus, &mut open, &mut pending, NOW + 10_000).await;
    got.sort();
    assert_eq!(
        got,
        vec![
            raised("link-error", "agent:m1"),
            raised("retention-shrunk", "m1"),
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
    assert!(round(&store, &bus, &mut open, &mut pending, NOW)
        .await
        .is_empty());
    status(&store, Role::Ps, "ps1", ps(48_000, 70)).await;
    status(&store, Role::Mt, "mt1", mt(false)).await;
    status(&store, Role::Agent, "m1", agent(1_000, "")).await;
    let mut got = round(&store, &bus, &mut open, &mut pending, NOW).await;
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
        round(&store, &bus, &mut open, &mut pending, NOW).await,
        vec![raised("rpo-exceeded", "m1")]
    );

    // An MT offline: its reports are stale, the RPO alert stays open (the
    // agent is online), and after the grace it is offline itself.
    let mt_conn = bus.connection(&key(Role::Mt, "mt1")).unwrap().conn_id;
    assert!(bus.detach(&key(Role::Mt, "mt1"), mt_conn));
    assert!(round(&store, &bus, &mut open, &mut pending, NOW + 5_000)
        .await
        .is_empty());
    assert_eq!(
        round(&store, &bus, &mut open, &mut pending, NOW + 12_000).await,
        vec![raised("component-offline", "mt:mt1")]
    );
    let off = &open[&("component-offline".to_string(), "mt:mt1".to_string())];
    assert_eq!(off.severity, "error");
    connect(&bus, Role::Mt, "mt1");
    assert_eq!(
        round(&store, &bus, &mut open, &mut pending, NOW + 13_000).await,
        vec![cleared("component-offline", "mt:mt1")]
    );
    store.close().await;
}

/// After a CS crash the store still says online: a component that never
/// reconnects reads offline (its last status is not taken as live) and is
/// raised after the grace, counted from the CS's start.
#[tokio::test]
async fn a_component_stored_online_without_a_stream_is_offline() {
    let (_dir, store) = store_with(Machine::test_at("m1", "onprem")).await;
    let bus = CommandBus::new();
    // Stored online, with a status, but no control stream to this CS.
    component(&store, &bus, Role::Ps, "ps1", Health::Online).await;
    let conn = bus.connection(&key(Role::Ps, "ps1")).unwrap().conn_id;
    bus.detach(&key(Role::Ps, "ps1"), conn);
    status(&store, Role::Ps, "ps1", ps(1_000, 99)).await;
    let view = View::load(&store, &bus).await.unwrap();
    assert_eq!(view.components[0].health, Health::Offline);
    assert!(view.ps("ps1").is_none(), "a stale status is read as live");
    let mut open = Open::new();
    let mut pending = Pending::new();
    let started = Rules {
        started_ms: NOW,
        ..rules()
    };
    let mut at = |now: u64| {
        let r = readings(&view, &started, now);
        evaluate(&mut open, &mut pending, &r, now)
            .into_iter()
            .map(|c| (c.raised, c.alert.kind, c.alert.subject))
            .collect::<Vec<_>>()
    };
    // No cache alert from the stale 99 %; offline only after the grace.
    assert!(at(NOW + 10_000).is_empty());
    assert_eq!(
        at(NOW + 10_001),
        vec![raised("component-offline", "ps:ps1")]
    );
    // Its stream back: online, its status read again.
    connect(&bus, Role::Ps, "ps1");
    let view = View::load(&store, &bus).await.unwrap();
    assert_eq!(view.components[0].health, Health::Online);
    assert!(view.ps("ps1").is_some());
    store.close().await;
}

/// A webhook receiver that refuses every body until `accept` turns true,
/// and keeps those it took.
async fn receiver(accept: Arc<Mutex<bool>>) -> (String, Arc<Mutex<Vec<String>>>, Arc<Mutex<u32>>) {
    use axum::http::StatusCode;
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let refused: Arc<Mutex<u32>> = Arc::default();
    let app = {
        let (got, refused) = (got.clone(), refused.clone());
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: String| {
                let (got, refused, accept) = (got.clone(), refused.clone(), accept.clone());
                async move {
                    if !*accept.lock().unwrap() {
                        *refused.lock().unwrap() += 1;
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    got.lock().unwrap().push(body);
                    StatusCode::OK
                }
            }),
        )
    };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, got, refused)
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raise the receiver refused is still posted after the CS restarts, once
/// the receiver accepts, and only once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raise_not_delivered_is_posted_once_after_a_restart() {
    let mut m = Machine::test_at("m1", "onprem");
    m.policy.rpo_alert_ms = 1_000;
    let (_dir, sqlite) = store_with(m).await;
    let store: Arc<dyn Store> = Arc::new(sqlite.clone());
    let bus = Arc::new(CommandBus::new());
    let now = rebound_common::time::now_ms();
    component(&sqlite, &bus, Role::Agent, "m1", Health::Online).await;
    let bytes = pb::Status {
        status: Some(agent(5_000, "")),
    }
    .encode_to_vec();
    sqlite
        .set_status(Role::Agent, "m1", &bytes, now)
        .await
        .unwrap();
    let accept = Arc::new(Mutex::new(false));
    let (url, got, refused) = receiver(accept.clone()).await;
    let cfg = crate::config::AlertsConfig {
        webhooks: vec![url],
        webhook_retry_for: Duration::from_secs(600),
        ..Default::default()
    };
    let start = || {
        super::Alerts::new(
            store.clone(),
            bus.clone(),
            &cfg,
            Duration::from_secs(1),
            crate::metrics::CsMetrics::new().0,
        )
    };
    let mut alerts = start().await.unwrap();
    let changes = alerts.round().await.unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(changes[0].raised);
    wait_for("a refused attempt", || *refused.lock().unwrap() >= 1).await;
    assert_eq!(alerts.log().outbox.len(), 1);
    drop(alerts);

    // The next CS process finds the body in the store and posts it.
    let saved = super::log::AlertLog::load(store.as_ref()).await.unwrap();
    assert_eq!(saved.outbox.len(), 1);
    *accept.lock().unwrap() = true;
    let mut alerts = start().await.unwrap();
    wait_for("the delivery", || !got.lock().unwrap().is_empty()).await;
    // Still open, not raised again; the delivered body leaves the outbox.
    let mut rounds = 0;
    while !alerts.log().outbox.is_empty() {
        assert!(alerts.round().await.unwrap().is_empty());
        rounds += 1;
        assert!(rounds < 100, "the outbox is not emptied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let saved = super::log::AlertLog::load(store.as_ref()).await.unwrap();
    assert!(saved.outbox.is_empty());
    assert_eq!(saved.open.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    let body: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
    assert_eq!(body["state"], "raised");
    assert_eq!(body["alert"]["kind"], "rpo-exceeded");
    drop(alerts);
    sqlite.close().await;
}
