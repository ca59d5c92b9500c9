//! The fleet pieces on their own: certificate expiry read from a real
//! certificate, the version check, the policy
//! merge, and `rebound remove`'s refusals against a real store and bus.

use super::components::{self, cert_expiry_ms, cert_expiry_ms_pem, version_mismatch, CS_VERSION};
use crate::bus::{CommandBus, ComponentKey};
use crate::convert::policy_merge;
use crate::store::{Component, Machine, Policy, ReplState, Replication, SqliteStore, Store};
use rebound_common::pki::Role;
use rebound_proto::control as pb;
use std::sync::Arc;

#[test]
fn certificate_expiry_is_the_not_after_in_ms() {
    let mut params = rcgen::CertificateParams::new(vec!["ps.example".to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(2031, 6, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    // 2031-06-01T00:00:00Z
    assert_eq!(cert_expiry_ms(cert.der()), Some(1_938_038_400_000));
    assert_eq!(cert_expiry_ms(b"not a certificate"), None);
    assert_eq!(cert_expiry_ms_pem(&cert.pem()), Some(1_938_038_400_000));
    assert_eq!(cert_expiry_ms_pem("-----BEGIN NOTHING-----"), None);
}

#[test]
fn a_version_other_than_the_cs_names_both_and_the_upgrade_order() {
    let key = ComponentKey::ps("ps-onprem");
    assert_eq!(version_mismatch(&key, CS_VERSION), None);
    assert_eq!(version_mismatch(&key, ""), None);
    let m = version_mismatch(&key, "0.0.1-old").unwrap();
    assert!(
        m.starts_with("ps:ps-onprem runs 0.0.1-old, the CS runs "),
        "{m}"
    );
    assert!(
        m.contains(CS_VERSION) && m.contains("docs/DEPLOY.md"),
        "{m}"
    );
}

#[test]
fn policy_set_changes_only_the_fields_it_names() {
    let base = Policy {
        retention_window_secs: 3600,
        ..Policy::default()
    };
    let p = policy_merge(
        base,
        &pb::Policy {
            crash_interval_ms: 300,
            retention_max_bytes: 10 << 30,
            ..Default::default()
        },
    );
    assert_eq!(p.crash_interval_ms, 300);
    assert_eq!(p.retention_max_bytes, 10 << 30);
    assert_eq!(
        p.retention_window_secs, 3600,
        "unnamed fields keep their value"
    );
    assert_eq!(p.app_interval_secs, base.app_interval_secs);
    assert_eq!(p.rpo_alert_ms, 0);
}

async fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("cs.db")).await.unwrap();
    (dir, Arc::new(s))
}

#[tokio::test]
async fn remove_refuses_online_and_used_components_and_forgets_the_rest() {
    let (_dir, store) = store().await;
    let bus = CommandBus::new();
    for (role, id) in [(Role::Ps, "ps1"), (Role::Ps, "ps-old"), (Role::Mt, "mt1")] {
        store
            .put_component(&Component::new(role, id))
            .await
            .unwrap();
    }
    store
        .put_machine(&Machine::test_at("m1", "onprem"))
        .await
        .unwrap();
    let mut r = Replication::test_protected("m1", 1);
    store.put_replication(&r).await.unwrap();

    let bus = &bus;
    let store = store.as_ref();
    let refused = |role: &'static str, id: &'static str| async move {
        let e = components::remove(store, bus, role, id).await.unwrap_err();
        e.to_string()
    };
    let e = refused("ps", "ps1").await;
    assert!(
        e.contains("replication m1") && e.contains("rebound unprotect m1"),
        "{e}"
    );
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let _conn = bus.attach(&ComponentKey::ps("ps-old"), "i", "onprem", true, tx);
    let e = refused("ps", "ps-old").await;
    assert!(
        e.contains("online") && e.contains("systemctl stop rebound-ps"),
        "{e}"
    );
    let e = refused("ps", "nope").await;
    assert!(e.contains("no component ps:nope"), "{e}");
    let e = refused("admin", "x").await;
    assert!(e.contains("agent, ps or mt"), "{e}");

    // Once the machine is unprotected its PS and MT can go.
    r.state = ReplState::Unprotected;
    store.put_replication(&r).await.unwrap();
    components::remove(store, bus, "mt", "mt1").await.unwrap();
    assert!(store
        .get_component(Role::Mt, "mt1")
        .await
        .unwrap()
        .is_none());
    let listed = components::list(store, bus).await.unwrap();
    let ids: Vec<_> = listed
        .iter()
        .map(|c| (c.id.as_str(), c.health.as_str()))
        .collect();
    assert_eq!(ids, vec![("ps-old", "online"), ("ps1", "enrolled")]);
}

#[tokio::test]
async fn rpo_alert_set_then_reset_reads_the_cs_default_and_off_has_no_threshold() {
    use super::policy::set_policy_resetting;
    use crate::alerts::readings::Rules;
    use crate::metrics::rpo_threshold_secs;
    use crate::store::{RESET_RPO_ALERT, RPO_ALERT_OFF};
    use std::time::Duration;

    let (_dir, store) = store().await;
    let bus = CommandBus::new();
    store
        .put_machine(&Machine::test_at("m1", "onprem"))
        .await
        .unwrap();
    let rules = Rules {
        rpo_default: Duration::from_secs(60),
        offline_grace: Duration::from_secs(10),
        started_ms: 0,
    };
    let t = Duration::from_millis(100);
    let set = |rpo_alert_ms: u64, reset: Vec<String>| {
        let (store, bus) = (store.clone(), &bus);
        async move {
            let changes = pb::Policy {
                rpo_alert_ms,
                ..Default::default()
            };
            set_policy_resetting(store.as_ref(), bus, t, "m1", &changes, &reset).await
        }
    };
    let threshold = |p: Policy| rpo_threshold_secs(&rules, &p);
    let a = set(30_000, Vec::new()).await.unwrap();
    assert_eq!(a.policy.rpo_alert_ms, 30_000);
    assert_eq!(threshold(a.policy), Some(30.0));
    let a = set(0, vec![RESET_RPO_ALERT.to_string()]).await.unwrap();
    assert_eq!(a.policy.rpo_alert_ms, 0, "back to the CS default");
    let stored = store.get_machine("m1").await.unwrap().unwrap();
    assert_eq!(stored.policy.rpo_alert_ms, 0);
    assert_eq!(threshold(stored.policy), Some(60.0));
    assert_eq!(rules.rpo_threshold_ms(stored.policy.rpo_alert_ms), 60_000);

    let a = set(RPO_ALERT_OFF, Vec::new()).await.unwrap();
    assert_eq!(threshold(a.policy), None, "off: no threshold gauge");

    let e = set(0, vec!["crash".to_string()]).await.unwrap_err();
    assert!(e.to_string().contains("\"rpo_alert\""), "{e}");
    let stored = store.get_machine("m1").await.unwrap().unwrap();
    assert_eq!(
        stored.policy.rpo_alert_ms, RPO_ALERT_OFF,
        "refused: unchanged"
    );
}

/// A protect job on `machines` in `state`, created at `time_ms`.
fn job_on(
    id: &str,
    machines: &[&str],
    state: crate::store::JobState,
    time_ms: u64,
) -> crate::store::Job {
    crate::store::Job::test_of(id, "protect", machines, state, time_ms)
}

/// A component of `role` whose last status is `status`.
fn reporting(role: Role, id: &str, status: pb::status::Status) -> Component {
    let mut c = Component::new(role, id);
    c.status = prost::Message::encode_to_vec(&pb::Status {
        status: Some(status),
    });
    c
}

#[tokio::test]
async fn machines_list_each_machine_from_fleet_wide_reads() {
    use crate::store::{JobState, PointSummary};
    let (_dir, store) = store().await;
    let bus = CommandBus::new();
    for id in ["m1", "m2", "m3"] {
        store
            .put_machine(&Machine::test_at(id, "onprem"))
            .await
            .unwrap();
    }
    // m1: protected, its agent reporting, its MT reporting a test failover.
    store
        .put_replication(&Replication::test_protected("r1", 10))
        .await
        .unwrap();
    let summary = PointSummary {
        count: 7,
        ..PointSummary::default()
    };
    store.put_point_summary("r1", &summary).await.unwrap();
    let agent = pb::AgentStatus {
        mode: "data".into(),
        rpo_ms: 1234,
        buffer_limit: 256 << 20,
        ..Default::default()
    };
    store
        .put_component(&reporting(
            Role::Agent,
            "m1",
            pb::status::Status::Agent(agent),
        ))
        .await
        .unwrap();
    let mt_status = |test_point: &str| {
        pb::status::Status::Mt(pb::MtStatus {
            replications: vec![pb::MtReplicationStatus {
                replication_id: "r1".into(),
                test_point: test_point.into(),
                ..Default::default()
            }],
            ..Default::default()
        })
    };
    store
        .put_component(&reporting(Role::Mt, "mt1", mt_status("p9")))
        .await
        .unwrap();
    // Another MT reporting the same replication id is not m1's MT.
    store
        .put_component(&reporting(Role::Mt, "mt-other", mt_status("wrong")))
        .await
        .unwrap();
    // m2: its replication ended (unprotected), an agent that never reported.
    let mut ended = Replication::test_protected("r2", 20);
    ended.machine = "m2".into();
    ended.state = ReplState::Unprotected;
    store.put_replication(&ended).await.unwrap();
    store
        .put_component(&Component::new(Role::Agent, "m2"))
        .await
        .unwrap();
    // Jobs: on m1 an older and a newer active one and a newest finished
    // one; m3 none.
    for j in [
        job_on("j-old", &["m1"], JobState::Running, 1),
        job_on("j-new", &["m1", "m2"], JobState::Pending, 2),
        job_on("j-done", &["m1"], JobState::Succeeded, 3),
    ] {
        store.put_job(&j).await.unwrap();
    }

    let list = super::machines::list(store.as_ref(), &bus).await.unwrap();
    let ids: Vec<&str> = list.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m1", "m2", "m3"]);
    let (m1, m2, m3) = (&list[0], &list[1], &list[2]);
    assert_eq!(
        (
            m1.state.as_str(),
            m1.replication_id.as_str(),
            m1.mt.as_str()
        ),
        ("Protected", "r1", "mt1")
    );
    assert_eq!((m1.agent_mode.as_str(), m1.rpo_ms), ("data", 1234));
    assert_eq!(m1.agent_health, "offline", "known but not connected");
    assert_eq!(m1.point_count, 7);
    assert_eq!(m1.test_point, "p9", "from the replication's own MT");
    assert_eq!(m1.job_id, "j-new", "the newest active job");
    assert_eq!(
        (
            m2.state.as_str(),
            m2.replication_id.as_str(),
            m2.point_count
        ),
        ("Unprotected", "", 0)
    );
    assert_eq!(m2.job_id, "j-new");
    assert_eq!(m2.agent_health, "offline");
    assert_eq!(m3.agent_health, "unknown");
    assert_eq!((m3.job_id.as_str(), m3.agent_mode.as_str()), ("", ""));
}

#[test]
fn protected_count_counts_machines_whose_current_replication_is_protected() {
    let machines = [
        Machine::test_at("m1", "onprem"),
        Machine::test_at("m2", "onprem"),
        Machine::test_at("m3", "onprem"),
    ];
    let mut failed_over = Replication::test_protected("r2", 1);
    failed_over.machine = "m2".into();
    failed_over.state = ReplState::FailedOver;
    // A replication of a machine the CS no longer lists does not count.
    let mut gone = Replication::test_protected("r9", 1);
    gone.machine = "m9".into();
    let current = [Replication::test_protected("r1", 1), failed_over, gone];
    assert_eq!(super::machines::protected_count(&machines, &current), 1);
    assert_eq!(super::machines::protected_count(&machines, &[]), 0);
}
