//! The store test suite, run on both engines: every case is an async fn
//! taking a [`Db`] (an empty database it may open as often as it likes, as
//! CS restarts do), and [`on_both_engines!`] makes a `sqlite::case` and a
//! `postgres::case` test of each. The PostgreSQL one needs
//! `PG_SCRATCH_URL` and fails without it (`store::scratch`).

use super::*;
use futures::StreamExt;
use std::path::PathBuf;
use std::sync::Arc;

/// Which engine a case runs on.
pub(crate) enum Engine {
    Sqlite,
    Postgres,
}

/// An empty database of one engine, gone when dropped.
pub(crate) enum Db {
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    Postgres(scratch::ScratchDb),
}

impl Db {
    pub(crate) async fn new(engine: Engine) -> Db {
        match engine {
            Engine::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("cs.db");
                Db::Sqlite { _dir: dir, path }
            }
            Engine::Postgres => Db::Postgres(scratch::ScratchDb::create().await.unwrap()),
        }
    }

    /// Opens the store on it (migrating it), as a CS does at start.
    pub(crate) async fn open(&self) -> Arc<dyn Store> {
        match self {
            Db::Sqlite { path, .. } => Arc::new(SqliteStore::open(path).await.unwrap()),
            Db::Postgres(db) => Arc::new(PgStore::open(&db.url).await.unwrap()),
        }
    }
}

/// `#[tokio::test]`s `sqlite::case` and `postgres::case` of each case.
macro_rules! on_both_engines {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::Db::new(super::Engine::Sqlite).await).await
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::Db::new(super::Engine::Postgres).await).await
            })*
        }
    };
}

on_both_engines!(
    roundtrips_and_survive_reopen,
    certificate_expiry_and_policy_round_trip_and_components_can_be_forgotten,
    issued_certificates_are_revoked_by_identity_and_stay_revoked,
    a_token_is_redeemed_once_and_survives_a_reopen,
    the_per_second_reads_list_current_replications_and_jobs_without_steps,
    a_thousand_machines_list_with_their_own_disks,
    jobs_list_with_their_own_steps,
    u64_extremes_round_trip,
    of_concurrent_redeemers_exactly_one_gets_the_token,
    names_list_in_byte_order_whatever_their_case_and_punctuation,
);

fn component(role: Role, id: &str) -> Component {
    let mut c = Component::new(role, id);
    c.site = "onprem".into();
    c.addresses = vec!["127.0.0.1:9443".into()];
    c.cert_serial = "0a0b".into();
    c.cert_fingerprint = "ff".into();
    c.enrolled_ms = 5;
    c
}

fn machine(id: &str) -> Machine {
    Machine {
        id: id.into(),
        site: "onprem".into(),
        disks: vec![
            Disk {
                index: 0,
                name: "disk0".into(),
                size: 1 << 30,
                path: "/var/lib/rebound/m1-disk0.img".into(),
            },
            Disk {
                index: 1,
                name: "log".into(),
                size: u64::MAX - 1,
                path: String::new(),
            },
        ],
        policy: Policy::default(),
        group: "g1".into(),
        created_ms: 7,
    }
}

fn replication(id: &str, machine: &str) -> Replication {
    Replication {
        id: id.into(),
        machine: machine.into(),
        from_site: "onprem".into(),
        to_site: "azure".into(),
        ps: "ps1".into(),
        mt: "mt1".into(),
        policy: Policy::default(),
        state: ReplState::InitialSync,
        previous: String::new(),
        failover_point: None,
        created_ms: 1,
        updated_ms: 1,
    }
}

fn job(id: &str) -> Job {
    Job {
        id: id.into(),
        kind: "failover".into(),
        machines: vec!["m1".into(), "m2".into()],
        plan: String::new(),
        spec: "{}".into(),
        data: "{}".into(),
        state: JobState::Running,
        progress: 50,
        status: "rolling back m1".into(),
        error: String::new(),
        warnings: vec!["freeze failed".into()],
        created_ms: 1,
        started_ms: 2,
        ended_ms: 0,
        steps: vec![
            JobStep {
                index: 0,
                name: "check".into(),
                action: "\"Check\"".into(),
                state: StepState::Done,
                detail: String::new(),
                error: String::new(),
                started_ms: 2,
                ended_ms: 3,
            },
            JobStep {
                index: 1,
                name: "rollback m1".into(),
                action: "{}".into(),
                state: StepState::Running,
                detail: "x".into(),
                error: String::new(),
                started_ms: 3,
                ended_ms: 0,
            },
        ],
    }
}

fn issued(serial: &str, role: Role, id: &str, issued_ms: u64, expiry_ms: u64) -> IssuedCert {
    IssuedCert {
        serial: serial.into(),
        role,
        id: id.into(),
        issued_ms,
        expiry_ms,
        revoked_ms: None,
    }
}

async fn roundtrips_and_survive_reopen(db: Db) {
    {
        let s = db.open().await;
        s.put_setting("salt", b"abc").await.unwrap();
        s.add_site("onprem").await.unwrap();
        s.add_site("azure").await.unwrap();
        s.add_site("azure").await.unwrap();
        s.put_component(&component(Role::Agent, "m1"))
            .await
            .unwrap();
        s.put_component(&component(Role::Ps, "ps1")).await.unwrap();
        s.set_heartbeat(Role::Agent, "m1", 99).await.unwrap();
        s.set_health(Role::Agent, "m1", Health::Online)
            .await
            .unwrap();
        s.set_status(Role::Ps, "ps1", &[1, 2, 3], 100)
            .await
            .unwrap();
        s.put_machine(&machine("m1")).await.unwrap();
        s.put_replication(&replication("r1", "m1")).await.unwrap();
        let mut r2 = replication("r2", "m1");
        r2.state = ReplState::WaitingForAgent;
        r2.previous = "r1".into();
        r2.failover_point = Some(Point {
            id: "p1".into(),
            kind: "app".into(),
            time_ms: 3,
            seq: u64::MAX,
            group: String::new(),
        });
        s.put_replication(&r2).await.unwrap();
        s.put_group(&Group {
            name: "g1".into(),
            machines: vec!["m1".into()],
            hold_ms: 100,
            interval_secs: 60,
            app: false,
        })
        .await
        .unwrap();
        s.put_plan(&Plan {
            name: "p".into(),
            groups: vec![PlanGroup {
                machines: vec!["m1".into()],
                pre_hook: "true".into(),
                post_hook: String::new(),
            }],
            consistency_group: "g1".into(),
        })
        .await
        .unwrap();
        s.put_job(&job("j1")).await.unwrap();
        let mut j2 = job("j2");
        j2.machines = vec!["m3".into()];
        j2.state = JobState::Succeeded;
        s.put_job(&j2).await.unwrap();
        s.put_point_summary(
            "r1",
            &PointSummary {
                applied_seq: 10,
                count: 2,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        s.add_event(&Event {
            time_ms: 1,
            component: "agent:m1".into(),
            severity: "warning".into(),
            kind: "freeze-failed".into(),
            message: "freeze timed out".into(),
            replication: "r1".into(),
        })
        .await
        .unwrap();
        s.close().await;
    }
    // A restart: everything is still there.
    let s = db.open().await;
    assert_eq!(s.get_setting("salt").await.unwrap().unwrap(), b"abc");
    assert_eq!(s.get_setting("nope").await.unwrap(), None);
    assert_eq!(s.list_sites().await.unwrap(), vec!["azure", "onprem"]);
    let a = s.get_component(Role::Agent, "m1").await.unwrap().unwrap();
    assert_eq!(a.last_heartbeat_ms, 99);
    assert_eq!(a.health, Health::Online);
    assert_eq!(a.addresses, vec!["127.0.0.1:9443"]);
    let p = s.get_component(Role::Ps, "ps1").await.unwrap().unwrap();
    assert_eq!(p.status, vec![1, 2, 3]);
    assert_eq!(p.status_ms, 100);
    assert_eq!(s.list_components().await.unwrap().len(), 2);
    assert_eq!(s.get_machine("m1").await.unwrap().unwrap(), machine("m1"));
    assert_eq!(s.list_machines().await.unwrap().len(), 1);
    let cur = s.current_replication("m1").await.unwrap().unwrap();
    assert_eq!(cur.id, "r2");
    assert_eq!(cur.state, ReplState::WaitingForAgent);
    assert_eq!(cur.failover_point.unwrap().seq, u64::MAX);
    assert_eq!(s.list_replications(Some("m1")).await.unwrap().len(), 2);
    assert_eq!(
        s.get_replication("r1").await.unwrap().unwrap(),
        replication("r1", "m1")
    );
    assert_eq!(s.list_groups().await.unwrap()[0].hold_ms, 100);
    assert_eq!(
        s.get_plan("p").await.unwrap().unwrap().machines(),
        vec!["m1"]
    );
    assert_eq!(s.get_job("j1").await.unwrap().unwrap(), job("j1"));
    let active = s
        .list_jobs(&JobFilter {
            active_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(active.len(), 1);
    let all = s.list_jobs(&JobFilter::default()).await.unwrap();
    assert_eq!(all[0].id, "j2", "newest first");
    let m3 = s
        .list_jobs(&JobFilter {
            machine: Some("m3".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(m3.len(), 1);
    assert_eq!(s.get_point_summary("r1").await.unwrap().unwrap().count, 2);
    assert_eq!(s.recent_events(10).await.unwrap()[0].kind, "freeze-failed");
    assert!(s.delete_plan("p").await.unwrap());
    assert!(!s.delete_plan("p").await.unwrap());
    assert!(s.delete_group("g1").await.unwrap());
}

async fn certificate_expiry_and_policy_round_trip_and_components_can_be_forgotten(db: Db) {
    let s = db.open().await;
    let mut c = component(Role::Mt, "mt1");
    c.cert_expiry_ms = 1_900_000_000_000;
    s.put_component(&c).await.unwrap();
    let got = s.get_component(Role::Mt, "mt1").await.unwrap().unwrap();
    assert_eq!(got.cert_expiry_ms, 1_900_000_000_000);

    let mut m = machine("m1");
    m.policy.retention_window_secs = 20;
    m.policy.retention_max_bytes = 10 << 30;
    m.policy.rpo_alert_ms = 30_000;
    s.put_machine(&m).await.unwrap();
    assert_eq!(s.get_machine("m1").await.unwrap().unwrap().policy, m.policy);

    assert!(s.delete_component(Role::Mt, "mt1").await.unwrap());
    assert!(!s.delete_component(Role::Mt, "mt1").await.unwrap());
    assert!(s.get_component(Role::Mt, "mt1").await.unwrap().is_none());
}

async fn issued_certificates_are_revoked_by_identity_and_stay_revoked(db: Db) {
    let s = db.open().await;
    s.put_issued_cert(&issued("0a", Role::Ps, "ps1", 10, 1_000))
        .await
        .unwrap();
    s.put_issued_cert(&issued("0b", Role::Ps, "ps1", 20, 2_000))
        .await
        .unwrap();
    // Expired at 1 500: neither live nor on the revocation list.
    s.put_issued_cert(&issued("0c", Role::Ps, "ps1", 5, 1_200))
        .await
        .unwrap();
    s.put_issued_cert(&issued("0d", Role::Mt, "ps1", 20, 2_000))
        .await
        .unwrap();

    assert_eq!(
        s.latest_cert(Role::Ps, "ps1")
            .await
            .unwrap()
            .unwrap()
            .serial,
        "0b"
    );
    let live = s.live_certs(Role::Ps, "ps1", 500).await.unwrap();
    assert_eq!(live.len(), 3);
    assert!(live.iter().all(|c| c.is_live(500)));

    let mut revoked = s.revoke_certs(Role::Ps, "ps1", 1_500).await.unwrap();
    revoked.sort();
    assert_eq!(revoked, vec!["0b".to_string()]);
    assert!(s
        .revoke_certs(Role::Ps, "ps1", 1_500)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.revoked_serials(1_500).await.unwrap(),
        vec!["0b".to_string()]
    );
    assert!(s
        .live_certs(Role::Ps, "ps1", 1_500)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s.live_certs(Role::Mt, "ps1", 1_500).await.unwrap().len(), 1);

    // Writing the serial again (a re-enrollment's record) keeps the revocation.
    s.put_issued_cert(&issued("0b", Role::Ps, "ps1", 20, 2_000))
        .await
        .unwrap();
    let got = s.get_issued_cert("0b").await.unwrap().unwrap();
    assert_eq!(got.revoked_ms, Some(1_500));
    // Past its expiry it drops off the list.
    assert!(s.revoked_serials(2_000).await.unwrap().is_empty());
}

async fn a_token_is_redeemed_once_and_survives_a_reopen(db: Db) {
    let s = db.open().await;
    let t = Token {
        token_id: "abc".into(),
        role: Role::Mt,
        id: "mt1".into(),
        verifier: vec![1, 2, 3],
        created_ms: 10,
        expires_ms: 1_900_000_000_000,
        used_ms: None,
    };
    s.put_token(&t).await.unwrap();
    assert_eq!(s.get_token("abc").await.unwrap().unwrap(), t);
    assert!(s.redeem_token("nope", 20).await.unwrap().is_none());
    let first = s.redeem_token("abc", 20).await.unwrap().unwrap();
    assert_eq!(first, t, "the first redeemer sees it unused");
    s.close().await;

    let s = db.open().await;
    let second = s.redeem_token("abc", 30).await.unwrap().unwrap();
    assert_eq!(second.used_ms, Some(20), "the second redeemer sees it used");
}

async fn the_per_second_reads_list_current_replications_and_jobs_without_steps(db: Db) {
    let s = db.open().await;
    for m in ["m1", "m2", "m3"] {
        s.put_machine(&machine(m)).await.unwrap();
    }
    for (id, m) in [("r1", "m1"), ("r2", "m2"), ("r3", "m1"), ("r4", "m1")] {
        s.put_replication(&replication(id, m)).await.unwrap();
    }
    let current: Vec<_> = s
        .current_replications()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.machine, r.id))
        .collect();
    assert_eq!(
        current,
        vec![("m2".into(), "r2".into()), ("m1".into(), "r4".into())],
        "the last of each machine; none for a machine never protected"
    );

    s.put_job(&job("j1")).await.unwrap();
    let mut done = job("j2");
    done.state = JobState::Succeeded;
    s.put_job(&done).await.unwrap();
    let heads = s.list_job_heads(&JobFilter::default()).await.unwrap();
    let full = s.list_jobs(&JobFilter::default()).await.unwrap();
    assert_eq!(heads.len(), 2);
    for (h, f) in heads.iter().zip(&full) {
        assert!(h.steps.is_empty() && !f.steps.is_empty());
        assert_eq!(
            Job {
                steps: f.steps.clone(),
                ..h.clone()
            },
            *f,
            "the same job but its steps"
        );
    }
    let active = s.list_job_heads(&JobFilter::all_active()).await.unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].id, "j1");
    s.close().await;
}

async fn a_thousand_machines_list_with_their_own_disks(db: Db) {
    let s = db.open().await;
    let machines: Vec<Machine> = (0..1000)
        .map(|i| {
            let mut m = machine(&format!("m{i:04}"));
            m.disks.truncate(i % 3);
            m
        })
        .collect();
    futures::stream::iter(&machines)
        .for_each_concurrent(8, |m| {
            let s = &s;
            async move { s.put_machine(m).await.unwrap() }
        })
        .await;
    // How fast it lists is the bench's figure (scale.control.machines_cli_ms),
    // never a timed assertion here.
    let listed = s.list_machines().await.unwrap();
    assert_eq!(listed, machines, "every machine with its own disks, by id");
    s.close().await;
}

async fn jobs_list_with_their_own_steps(db: Db) {
    let s = db.open().await;
    let mut jobs = Vec::new();
    for i in 0..50 {
        let mut j = job(&format!("j{i:02}"));
        j.steps.truncate(i % 3);
        j.machines = vec![format!("m{}", i % 5)];
        s.put_job(&j).await.unwrap();
        jobs.push(j);
    }
    // Rewriting a job replaces its steps.
    jobs[7].steps.truncate(1);
    jobs[7].steps[0].state = StepState::Failed;
    s.put_job(&jobs[7]).await.unwrap();
    jobs.reverse();
    let all = s
        .list_jobs(&JobFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all, jobs, "newest first, each with its own steps");
    let m2 = s
        .list_jobs(&JobFilter {
            machine: Some("m2".into()),
            limit: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    let want: Vec<_> = jobs
        .iter()
        .filter(|j| j.machines == ["m2"])
        .take(3)
        .cloned()
        .collect();
    assert_eq!(m2, want);
    assert_eq!(s.get_job("j07").await.unwrap().unwrap(), jobs[49 - 7]);
    assert!(s.get_job("nope").await.unwrap().is_none());
    s.close().await;
}

async fn u64_extremes_round_trip(db: Db) {
    let s = db.open().await;
    let mut m = machine("m1");
    m.policy.rpo_alert_ms = RPO_ALERT_OFF;
    m.policy.retention_max_bytes = u64::MAX - 1;
    m.created_ms = u64::MAX;
    s.put_machine(&m).await.unwrap();
    assert_eq!(s.get_machine("m1").await.unwrap().unwrap(), m);
    let mut r = replication("r1", "m1");
    r.policy = m.policy;
    r.updated_ms = u64::MAX;
    s.put_replication(&r).await.unwrap();
    assert_eq!(s.get_replication("r1").await.unwrap().unwrap(), r);
    let mut c = component(Role::Agent, "m1");
    c.cert_expiry_ms = u64::MAX;
    c.status = Vec::new();
    s.put_component(&c).await.unwrap();
    assert_eq!(
        s.get_component(Role::Agent, "m1").await.unwrap().unwrap(),
        c
    );
    s.put_setting("empty", &[]).await.unwrap();
    assert_eq!(
        s.get_setting("empty").await.unwrap().unwrap(),
        Vec::<u8>::new()
    );
    s.close().await;
}

async fn of_concurrent_redeemers_exactly_one_gets_the_token(db: Db) {
    let s = db.open().await;
    let t = Token::test_for("t");
    s.put_token(&t).await.unwrap();
    let got: Vec<Token> =
        futures::future::join_all((0..8u64).map(|i| s.redeem_token("t", 100 + i)))
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
    assert_eq!(got.iter().filter(|t| t.used_ms.is_none()).count(), 1);
    let used = s.get_token("t").await.unwrap().unwrap().used_ms.unwrap();
    assert!(got
        .iter()
        .all(|t| t.used_ms.is_none() || t.used_ms == Some(used)));
    s.close().await;
}

/// Names whose order differs between byte order and a linguistic collation
/// (which ignores case and punctuation): every list gives them by bytes, as
/// SQLite does, so `rebound machines` reads the same on both engines.
async fn names_list_in_byte_order_whatever_their_case_and_punctuation(db: Db) {
    let s = db.open().await;
    let names = ["m2", "m10", "M2", "m-10", "m_2", "m\u{e9}", "M-1", "m"];
    let mut by_bytes: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    by_bytes.sort();
    assert_eq!(
        by_bytes,
        ["M-1", "M2", "m", "m-10", "m10", "m2", "m_2", "m\u{e9}"]
    );
    for n in names {
        s.put_machine(&machine(n)).await.unwrap();
        s.put_component(&component(Role::Agent, n)).await.unwrap();
        s.add_site(n).await.unwrap();
        s.put_group(&Group {
            name: n.into(),
            machines: vec![n.into()],
            hold_ms: 1,
            interval_secs: 1,
            app: false,
        })
        .await
        .unwrap();
        s.put_plan(&Plan {
            name: n.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let machines = s.list_machines().await.unwrap();
    let machines: Vec<String> = machines.into_iter().map(|m| m.id).collect();
    assert_eq!(machines, by_bytes);
    let components = s.list_components().await.unwrap();
    let components: Vec<String> = components.into_iter().map(|c| c.id).collect();
    assert_eq!(components, by_bytes);
    assert_eq!(s.list_sites().await.unwrap(), by_bytes);
    let groups = s.list_groups().await.unwrap();
    let groups: Vec<String> = groups.into_iter().map(|g| g.name).collect();
    assert_eq!(groups, by_bytes);
    let plans = s.list_plans().await.unwrap();
    let plans: Vec<String> = plans.into_iter().map(|p| p.name).collect();
    assert_eq!(plans, by_bytes);
    s.close().await;
    if let Db::Postgres(pg) = &db {
        every_sorted_name_column_compares_by_bytes(&pg.url).await;
    }
}

/// The test cluster's own collation may already be byte order (C.UTF-8),
/// which would hide a column that sorts by the database's collation: check
/// the columns the lists sort by are declared `COLLATE "C"`.
async fn every_sorted_name_column_compares_by_bytes(url: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let sorted = [
        ("sites", "name"),
        ("components", "role"),
        ("components", "id"),
        ("machines", "id"),
        ("disks", "machine"),
        ("consistency_groups", "name"),
        ("plans", "name"),
        ("job_steps", "job"),
        ("issued_certs", "serial"),
    ];
    for (table, column) in sorted {
        let collation: Option<String> = sqlx::query_scalar(
            "SELECT collation_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2",
        )
        .bind(table)
        .bind(column)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(collation.as_deref(), Some("C"), "{table}.{column}");
    }
    conn.close().await.unwrap();
}
