//! The configuration server in-process over real TLS: `init`, then [`run`]
//! on port 0, then enrollment, the control channel and operator RPCs as the
//! components and the CLI use them.

mod fleet;
mod metrics;
mod revocation;

use crate::store::{now_ms, Health, Machine, ReplState, Replication, SqliteStore, Store};
use crate::{enroll, init, run, Config};
use rebound_common::pki::{peer_identity, Role};
use rebound_common::tls::TlsFiles;
use rebound_proto::control as pb;
use rebound_proto::control::admin_client::AdminClient;
use rebound_proto::control::control_client::ControlClient;
use rebound_proto::control::{component_message, server_message, ComponentMessage, ServerMessage};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

pub(crate) struct Cs {
    _tmp: tempfile::TempDir,
    pub(crate) dir: PathBuf,
    pub(crate) addr: String,
    passphrase: String,
    db: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), crate::CsError>>,
}

impl Cs {
    pub(crate) async fn start() -> Cs {
        Cs::start_with(|_| {}).await
    }

    /// A CS whose config `change` adjusts first.
    pub(crate) async fn start_with(change: impl FnOnce(&mut Config)) -> Cs {
        rebound_common::tls::install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cs");
        let out = init::init(&dir, &[], None).await.unwrap();
        let mut cfg: Config = rebound_common::config::load(Some(&out.config_file)).unwrap();
        cfg.heartbeat_secs = 0.1;
        cfg.metrics_listen = "127.0.0.1:0".into();
        change(&mut cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let db = cfg.db.clone();
        let task = tokio::spawn(run(cfg, listener, async move {
            let _ = stopped.await;
        }));
        Cs {
            _tmp: tmp,
            dir,
            addr,
            passphrase: out.passphrase,
            db,
            stop: Some(stop),
            task,
        }
    }

    /// Stops the CS; the returned dir keeps its files alive.
    async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let r = tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("CS stopped in time");
        r.unwrap().unwrap();
        self._tmp
    }

    /// Closes the test's own handle on the CS database, then stops the CS.
    pub(crate) async fn stop_with(self, store: SqliteStore) -> tempfile::TempDir {
        store.close().await;
        self.stop().await
    }

    /// A second handle on the CS database (WAL allows it).
    pub(crate) async fn store(&self) -> SqliteStore {
        SqliteStore::open(&self.db).await.unwrap()
    }

    async fn channel(&self, files: &TlsFiles) -> Channel {
        files
            .connect(&self.addr, "localhost", Role::Cs)
            .await
            .unwrap()
    }

    async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel(&TlsFiles::in_dir(&self.dir, "admin")).await)
    }

    /// Enrolls `role:id` into `<tmp>/<role>-<id>` and returns its TLS files:
    /// an agent with the passphrase, anything else with a token the admin
    /// creates.
    pub(crate) async fn enrolled(&self, role: Role, id: &str) -> TlsFiles {
        let out = self.dir.parent().unwrap().join(format!("{role}-{id}"));
        if role == Role::Agent {
            enroll(&self.addr, &self.passphrase, role, id, &out)
                .await
                .unwrap();
        } else {
            let token = self.token(role, id, 0).await;
            rebound_common::enrollment::enroll_token(&self.addr, &token, role, id, &out)
                .await
                .unwrap();
        }
        TlsFiles::in_dir(&out, role.as_str())
    }

    /// A token for `role:id` lasting `ttl_secs` (0: the default), as the
    /// admin creates it.
    pub(crate) async fn token(&self, role: Role, id: &str, ttl_secs: u64) -> String {
        let req = pb::CreateTokenRequest {
            role: role.as_str().into(),
            id: id.into(),
            ttl_secs,
        };
        self.admin()
            .await
            .create_token(req)
            .await
            .unwrap()
            .into_inner()
            .token
    }
}

fn hello(role: &str, id: &str, site: &str, instance: &str) -> pb::Hello {
    pb::Hello {
        role: role.into(),
        id: id.into(),
        version: "test".into(),
        site: site.into(),
        addresses: vec![],
        disks: vec![pb::Disk {
            index: 0,
            name: "disk0".into(),
            size: 1 << 20,
            path: String::new(),
        }],
        writable: true,
        replication_id: String::new(),
        instance: instance.into(),
    }
}

fn up(msg: component_message::Msg) -> ComponentMessage {
    ComponentMessage { msg: Some(msg) }
}

/// Opens a control stream and reads the welcome.
/// Sends a heartbeat every 30 ms on `tx` until the stream closes, so the
/// CS (heartbeat 0.1 s in these tests) keeps the component online.
fn heartbeats(tx: mpsc::Sender<ComponentMessage>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let m = up(component_message::Msg::Heartbeat(pb::Heartbeat {
                time_ms: now_ms(),
            }));
            if tx.send(m).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    })
}

async fn connect(
    ch: Channel,
    h: pb::Hello,
) -> Result<(mpsc::Sender<ComponentMessage>, Streaming<ServerMessage>), tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(up(component_message::Msg::Hello(h))).await.unwrap();
    let mut down = ControlClient::new(ch)
        .channel(ReceiverStream::new(rx))
        .await?
        .into_inner();
    match down.message().await? {
        Some(ServerMessage {
            msg: Some(server_message::Msg::Welcome(w)),
        }) => assert_eq!(w.heartbeat_ms, 100),
        other => panic!("expected a welcome, got {other:?}"),
    }
    Ok((tx, down))
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f().await {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects as `files` with `h` and expects a refusal with `code` whose
/// message says `want`.
async fn refused(cs: &Cs, files: &TlsFiles, h: pb::Hello, code: Code, want: &str) {
    let e = connect(cs.channel(files).await, h).await.unwrap_err();
    assert_eq!(e.code(), code, "{e}");
    assert!(e.message().contains(want), "{e}");
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test]
async fn enrollment_over_tls_with_right_and_wrong_passphrase() {
    let cs = Cs::start().await;
    let out = cs.dir.parent().unwrap().join("agent-m1");
    let e = enroll(&cs.addr, &cs.passphrase, Role::Agent, "m1", &out)
        .await
        .unwrap();
    let ca = std::fs::read_to_string(&e.ca).unwrap();
    assert_eq!(ca, std::fs::read_to_string(cs.dir.join("ca.pem")).unwrap());
    let pem = std::fs::read_to_string(&e.cert).unwrap();
    let der = crate::enrollment::first_cert_der(&pem).unwrap();
    let who = peer_identity(&der).unwrap();
    assert_eq!((who.role, who.id.as_str()), (Role::Agent, "m1"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&e.key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let store = cs.store().await;
    let c = store
        .get_component(Role::Agent, "m1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.health, Health::Enrolled);
    assert!(c.cert_expiry_ms > now_ms(), "enrollment records the expiry");
    assert_eq!(
        c.cert_fingerprint,
        crate::enrollment::hex(blake3::hash(&der).as_bytes())
    );
    // The enrolled certificate works for mutual TLS right away.
    let files = TlsFiles {
        ca: e.ca.clone(),
        cert: e.cert.clone(),
        key: e.key.clone(),
        renewed: None,
    };
    connect(
        cs.channel(&files).await,
        hello("agent", "m1", "onprem", "a"),
    )
    .await
    .unwrap();

    // Wrong passphrase: a clear refusal, nothing stored, nothing written.
    let bad = cs.dir.parent().unwrap().join("agent-m9");
    let err = enroll(&cs.addr, "0000-1111-2222-3333", Role::Agent, "m9", &bad)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, crate::EnrollError::Refused { .. }), "{msg}");
    assert!(
        msg.contains("passphrase is wrong") && msg.contains("agent:m9"),
        "{msg}"
    );
    assert!(store
        .get_component(Role::Agent, "m9")
        .await
        .unwrap()
        .is_none());
    assert_eq!(files_in(&bad), 0);
    // Roles that must not enroll with the passphrase, and bad ids, are
    // refused by the client.
    let refused = [
        (Role::Admin, "x", "rebound token create --role admin --id x"),
        (Role::Cs, "x", "only agent, ps, mt and admin"),
        (Role::Agent, "a:b", "contains ':'"),
    ];
    for (role, id, want) in refused {
        let e = enroll(&cs.addr, &cs.passphrase, role, id, &bad)
            .await
            .unwrap_err();
        assert!(e.to_string().contains(want), "{role:?} {id}: {e}");
    }
    cs.stop_with(store).await;
}

#[tokio::test]
async fn operator_rpcs_need_an_admin_certificate() {
    let cs = Cs::start().await;
    let agent = cs.enrolled(Role::Agent, "m1").await;
    let mut as_agent = AdminClient::new(cs.channel(&agent).await);
    let e = as_agent.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains("agent:m1") && e.message().contains("admin"),
        "{e}"
    );
    let e = as_agent
        .failover(pb::FailoverRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Components may not call the control channel as admin, and vice versa.
    let admin = TlsFiles::in_dir(&cs.dir, "admin");
    let e = connect(cs.channel(&admin).await, hello("admin", "admin", "x", "a"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut a = cs.admin().await;
    let s = a.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.machines, 0);
    let e = a
        .protect(pb::ProtectRequest {
            machine: "m7".into(),
            to_site: "azure".into(),
            ps: "ps1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("machine m7 is unknown"), "{e}");
    cs.stop().await;
}

#[tokio::test]
async fn split_brain_guard_and_identity_checks() {
    let cs = Cs::start().await;
    let m1 = cs.enrolled(Role::Agent, "m1").await;
    // An agent registers only its own machine.
    let m2 = hello("agent", "m2", "onprem", "a");
    refused(
        &cs,
        &m1,
        m2,
        Code::PermissionDenied,
        "may not register as agent:m2",
    )
    .await;

    let (tx_a, mut down_a) = connect(cs.channel(&m1).await, hello("agent", "m1", "onprem", "a"))
        .await
        .unwrap();
    let hb = heartbeats(tx_a);
    // A second agent for the same machine is refused while the first lives.
    let second = hello("agent", "m1", "onprem", "b");
    let want = "already has an agent connected";
    refused(&cs, &m1, second, Code::FailedPrecondition, want).await;
    // A hello may not announce more disks than a machine can have.
    let mut many = hello("agent", "m1", "onprem", "a");
    many.disks = (0..=rebound_common::limits::MAX_DISKS as u32)
        .map(|index| pb::Disk {
            index,
            name: format!("disk{index}"),
            size: 1 << 20,
            path: String::new(),
        })
        .collect();
    let want = "announces 65 disks; at most 64 are allowed";
    refused(&cs, &m1, many, Code::InvalidArgument, want).await;
    // An agent at another site is refused while the machine is protected there.
    let store = cs.store().await;
    let now = now_ms();
    let mut r = Replication::test_protected("m1", now);
    store.put_replication(&r).await.unwrap();
    let elsewhere = hello("agent", "m1", "azure", "c");
    let want = "only after a failover to azure";
    refused(&cs, &m1, elsewhere, Code::FailedPrecondition, want).await;
    // After the failover moved it, the agent at azure is admitted and the
    // one at onprem is fenced and dropped.
    r.state = ReplState::FailedOver;
    store.put_replication(&r).await.unwrap();
    let mut m: Machine = store.get_machine("m1").await.unwrap().unwrap();
    m.site = "azure".into();
    store.put_machine(&m).await.unwrap();
    let (_tx_c, _down_c) = connect(cs.channel(&m1).await, hello("agent", "m1", "azure", "c"))
        .await
        .unwrap();
    let fenced = tokio::time::timeout(Duration::from_secs(5), down_a.message())
        .await
        .expect("old agent told");
    match fenced {
        Ok(Some(ServerMessage {
            msg: Some(server_message::Msg::Command(c)),
        })) => assert!(matches!(c.cmd, Some(pb::command::Cmd::Fence(_)))),
        other => panic!("old agent should get a fence, got {other:?}"),
    }
    let end = tokio::time::timeout(Duration::from_secs(5), down_a.message())
        .await
        .expect("old stream ends");
    assert!(
        !matches!(end, Ok(Some(_))),
        "old stream should end: {end:?}"
    );
    hb.abort();
    // The old side may not come back.
    let e = connect(cs.channel(&m1).await, hello("agent", "m1", "onprem", "d"))
        .await
        .unwrap_err();
    assert!(e.message().contains("has moved to site azure"), "{e}");
    // ... unless a `commit --remove-source-copy` waits for it: then it is let
    // in, told to remove its disks, and the machine stays at azure.
    let pending = crate::store::records::PendingRemoval {
        replication_id: "m1".into(),
        site: "onprem".into(),
        job_id: "j1".into(),
    };
    let rec = crate::store::records::Record::PendingRemoval;
    crate::store::records::put(&store, rec, "m1", &pending)
        .await
        .unwrap();
    let (tx_e, mut down_e) = connect(cs.channel(&m1).await, hello("agent", "m1", "onprem", "e"))
        .await
        .unwrap();
    let cmd = loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), down_e.message())
            .await
            .expect("the returning agent is told")
            .unwrap()
            .unwrap();
        if let Some(server_message::Msg::Command(c)) = msg.msg {
            if let Some(pb::command::Cmd::StopReplication(stop)) = &c.cmd {
                assert!(stop.remove_source_copy && stop.replication_id == "m1");
                break c;
            }
        }
    };
    tx_e.send(up(component_message::Msg::Result(pb::CommandResult {
        id: cmd.id.clone(),
        ok: true,
        ..Default::default()
    })))
    .await
    .unwrap();
    eventually("the pending removal cleared", || {
        let store = store.clone();
        async move {
            let p: Option<crate::store::records::PendingRemoval> =
                crate::store::records::get(&store, rec, "m1").await.unwrap();
            p.is_none()
        }
    })
    .await;
    let m = store.get_machine("m1").await.unwrap().unwrap();
    assert_eq!((m.site.as_str(), m.disks.len()), ("azure", 1));
    cs.stop_with(store).await;
}

#[tokio::test]
async fn missed_heartbeats_make_a_component_offline() {
    let cs = Cs::start().await;
    let ps = cs.enrolled(Role::Ps, "ps1").await;
    let mut h = hello("ps", "ps1", "onprem", "a");
    h.addresses = vec!["127.0.0.1:9443".into()];
    let (tx, mut down) = connect(cs.channel(&ps).await, h).await.unwrap();
    let store = cs.store().await;
    let c = store.get_component(Role::Ps, "ps1").await.unwrap().unwrap();
    assert_eq!(c.health, Health::Online);
    assert_eq!(c.addresses, vec!["127.0.0.1:9443"]);
    // Silence (the stream stays open): offline after 3 × 100 ms.
    let t0 = Instant::now();
    eventually("ps1 offline", || async {
        store
            .get_component(Role::Ps, "ps1")
            .await
            .unwrap()
            .unwrap()
            .health
            == Health::Offline
    })
    .await;
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    let end = tokio::time::timeout(Duration::from_secs(5), down.message())
        .await
        .expect("stream ends");
    assert!(!matches!(end, Ok(Some(_))));
    let mut a = cs.admin().await;
    let s = a.status(pb::StatusRequest {}).await.unwrap().into_inner();
    let info = s.components.iter().find(|c| c.id == "ps1").unwrap();
    assert_eq!(info.health, "offline");
    // The offline event is recorded right after the health change; under
    // load it may land a moment later than the state the status showed.
    eventually("offline event for ps:ps1", || {
        let mut a = a.clone();
        async move {
            let s = a.status(pb::StatusRequest {}).await.unwrap().into_inner();
            s.events
                .iter()
                .any(|e| e.kind == "offline" && e.component == "ps:ps1")
        }
    })
    .await;
    drop(tx);
    cs.stop_with(store).await;
}

#[tokio::test]
async fn mt_status_and_a_command_round_trip() {
    let cs = Cs::start().await;
    let mt = cs.enrolled(Role::Mt, "mt1").await;
    let store = cs.store().await;
    let now = now_ms();
    store
        .put_machine(&Machine::test_at("m1", "onprem"))
        .await
        .unwrap();
    store
        .put_replication(&Replication::test_protected("m1", now))
        .await
        .unwrap();
    let (tx, mut down) = connect(cs.channel(&mt).await, hello("mt", "mt1", "azure", "a"))
        .await
        .unwrap();
    let p = |id: &str, seq| pb::Point {
        id: id.into(),
        kind: "crash".into(),
        time_ms: seq,
        seq,
        group: String::new(),
        damaged: String::new(),
    };
    tx.send(up(component_message::Msg::Status(pb::Status {
        status: Some(pb::status::Status::Mt(pb::MtStatus {
            replications: vec![pb::MtReplicationStatus {
                replication_id: "m1".into(),
                machine_id: "m1".into(),
                points: Some(pb::PointSummary {
                    applied_seq: 12,
                    count: 2,
                    latest: Some(p("t2", 12)),
                    ..Default::default()
                }),
                state: "applying".into(),
                test_point: "t1".into(),
                test_exports: vec!["m1/disk0@test".into()],
                ..Default::default()
            }],
            retention_bytes: 0,
        })),
    })))
    .await
    .unwrap();
    let verified = crate::store::records::VerifyRecord {
        time_ms: now,
        point_id: "v1".into(),
        chunk_size: 1 << 20,
        chunks_compared: 8,
        differing: 1,
        differing_chunks: vec![crate::store::records::ChunkAt {
            disk: 0,
            offset: 1 << 20,
        }],
        ..Default::default()
    };
    let rec = crate::store::records::Record::LastVerify;
    crate::store::records::put(&store, rec, "m1", &verified)
        .await
        .unwrap();
    eventually("summary stored", || async {
        store
            .get_point_summary("m1")
            .await
            .unwrap()
            .is_some_and(|s| s.count == 2)
    })
    .await;
    // `rebound points m1`: the CS asks the MT over its control stream.
    let mut a = cs.admin().await;
    let ask = tokio::spawn(async move {
        a.points(pb::PointsRequest {
            machine: "m1".into(),
        })
        .await
    });
    let cmd = match tokio::time::timeout(Duration::from_secs(5), down.message()).await {
        Ok(Ok(Some(ServerMessage {
            msg: Some(server_message::Msg::Command(c)),
        }))) => c,
        other => panic!("expected a command, got {other:?}"),
    };
    assert!(matches!(&cmd.cmd, Some(pb::command::Cmd::ListPoints(l)) if l.replication_id == "m1"));
    tx.send(up(component_message::Msg::Result(pb::CommandResult {
        id: cmd.id.clone(),
        ok: true,
        detail: Some(pb::command_result::Detail::PointList(pb::PointList {
            points: vec![p("t1", 5), p("t2", 12)],
            applied_seq: 12,
            rolled_back_to: String::new(),
        })),
        ..Default::default()
    })))
    .await
    .unwrap();
    let pts = ask.await.unwrap().unwrap().into_inner();
    assert_eq!(pts.points.len(), 2);
    assert_eq!(pts.applied_seq, 12);
    // `rebound machines` shows state and last point.
    let mut a = cs.admin().await;
    let ms = a
        .machines(pb::MachinesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ms.machines[0].state, "Protected");
    assert_eq!(ms.machines[0].last_point.as_ref().unwrap().id, "t2");
    // ... the running test copy the MT reports, and the last verify.
    assert_eq!(ms.machines[0].test_point, "t1");
    assert_eq!(ms.machines[0].test_exports, ["m1/disk0@test"]);
    let v = ms.machines[0].last_verify.as_ref().unwrap();
    assert_eq!(
        (v.point_id.as_str(), v.differing, v.chunk_size),
        ("v1", 1, 1 << 20)
    );
    assert_eq!(v.differing_chunks[0].offset, 1 << 20);
    cs.stop_with(store).await;
}

#[tokio::test]
async fn restart_keeps_everything() {
    let cs = Cs::start().await;
    cs.enrolled(Role::Agent, "m1").await;
    let mut a = cs.admin().await;
    a.create_group(pb::CreateGroupRequest {
        group: Some(pb::Group {
            name: "g".into(),
            machines: vec![],
            hold_ms: 0,
            interval_secs: 0,
            app: false,
        }),
    })
    .await
    .unwrap();
    let dir = cs.dir.clone();
    let db = cs.db.clone();
    let _files = cs.stop().await;
    let store = SqliteStore::open(&db).await.unwrap();
    assert!(store
        .get_component(Role::Agent, "m1")
        .await
        .unwrap()
        .is_some());
    assert_eq!(store.get_group("g").await.unwrap().unwrap().hold_ms, 100);
    assert!(dir.join("passphrase").exists());
}
