//! In-process test of [`crate::run`] over real mutual TLS: a tiny fake
//! master target (accepting Apply, checking every frame and acking) and
//! agent clients made from a throw-away CA.

use crate::{run, Config, MtConfig};
use rebound_common::frame::{Frame, FrameBuilder, Record};
use rebound_common::pki::{write_cert, Ca, CertKeyPem, Role};
use rebound_common::tls::{self, TlsFiles};
use rebound_proto::master_target_server::{MasterTarget, MasterTargetServer};
use rebound_proto::process_server_client::ProcessServerClient;
use rebound_proto::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

const MSG: usize = 80 << 20;

// ------------------------------------------------------------------ fake MT

#[derive(Default)]
struct MtState {
    applied: HashMap<String, u64>,
    /// Every applied record, by seq.
    records: HashMap<String, Vec<Record>>,
    hellos: u64,
}

#[derive(Clone)]
struct FakeMt {
    state: Arc<Mutex<MtState>>,
    /// Turns true to take the MT down (its streams end, it stops serving).
    down: watch::Receiver<bool>,
}

impl Default for FakeMt {
    fn default() -> Self {
        FakeMt {
            state: Arc::default(),
            down: watch::channel(false).1,
        }
    }
}

impl FakeMt {
    fn applied(&self, rid: &str) -> u64 {
        self.state
            .lock()
            .unwrap()
            .applied
            .get(rid)
            .copied()
            .unwrap_or(0)
    }
}

#[tonic::async_trait]
impl MasterTarget for FakeMt {
    type ApplyStream = ReceiverStream<Result<ApplyResponse, Status>>;

    async fn apply(
        &self,
        req: Request<Streaming<ApplyRequest>>,
    ) -> Result<Response<Self::ApplyStream>, Status> {
        tls::require_role(&req, &[Role::Ps])?;
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(ApplyRequest {
                msg: Some(apply_request::Msg::Hello(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("hello first")),
        };
        let rid = hello.replication_id.clone();
        let resume = {
            let mut s = self.state.lock().unwrap();
            s.hellos += 1;
            s.applied.get(&rid).copied().unwrap_or(0)
        };
        let (tx, rx) = mpsc::channel(64);
        tx.send(Ok(ApplyResponse {
            msg: Some(apply_response::Msg::ResumeSeq(resume)),
        }))
        .await
        .unwrap();
        let state = self.state.clone();
        let mut down = self.down.clone();
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = down.wait_for(|d| *d) => break,
                    m = inbound.message() => match m {
                        Ok(Some(m)) => m,
                        _ => break,
                    },
                };
                let Some(apply_request::Msg::Frame(b)) = m.msg else {
                    continue;
                };
                let answer = (|| {
                    let f =
                        Frame::parse(&b).map_err(|e| Status::invalid_argument(e.to_string()))?;
                    let recs = f.records().map_err(|e| Status::data_loss(e.to_string()))?;
                    let mut s = state.lock().unwrap();
                    let applied = s.applied.get(&rid).copied().unwrap_or(0);
                    if f.header.first_seq > applied + 1 {
                        return Err(Status::failed_precondition(format!(
                            "gap: frame {} after applied {applied}",
                            f.header.first_seq
                        )));
                    }
                    let list = s.records.entry(rid.clone()).or_default();
                    for (i, r) in recs.into_iter().enumerate() {
                        let seq = f.header.first_seq + i as u64;
                        if seq > applied {
                            assert_eq!(list.len() as u64 + 1, seq);
                            list.push(r);
                        }
                    }
                    let applied = applied.max(f.header.last_seq);
                    s.applied.insert(rid.clone(), applied);
                    Ok(applied)
                })();
                let stop = answer.is_err();
                let _ = tx
                    .send(answer.map(|a| ApplyResponse {
                        msg: Some(apply_response::Msg::AppliedSeq(a)),
                    }))
                    .await;
                if stop {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn chunk_hashes(
        &self,
        req: Request<ChunkHashesRequest>,
    ) -> Result<Response<ChunkHashesResponse>, Status> {
        tls::require_role(&req, &[Role::Ps])?;
        let r = req.into_inner();
        Ok(Response::new(ChunkHashesResponse {
            hashes: vec![7u8; r.count as usize * 32],
            applied_seq: self.applied(&r.replication_id),
        }))
    }
    async fn list_points(
        &self,
        _: Request<ListPointsRequest>,
    ) -> Result<Response<ListPointsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn replications(
        &self,
        _: Request<ReplicationsRequest>,
    ) -> Result<Response<ReplicationsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn rollback(
        &self,
        _: Request<RollbackRequest>,
    ) -> Result<Response<RollbackResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn restore_pre_images(
        &self,
        _: Request<RestorePreImagesRequest>,
    ) -> Result<Response<RestorePreImagesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// A running fake MT; `down` takes it down.
struct MtRun {
    down: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl MtRun {
    async fn stop(self) {
        self.down.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("fake MT stops")
            .unwrap();
    }
}

async fn start_mt(mut mt: FakeMt, tls: &TlsFiles, listener: TcpListener) -> MtRun {
    let cfg = tls.server_config().unwrap();
    let (down, rx) = watch::channel(false);
    mt.down = rx.clone();
    let mut rx2 = rx;
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .tls_config(cfg)
            .unwrap()
            .add_service(
                MasterTargetServer::new(mt)
                    .max_decoding_message_size(MSG)
                    .max_encoding_message_size(MSG),
            )
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = rx2.wait_for(|d| *d).await;
            })
            .await
            .unwrap();
    });
    MtRun { down, task }
}

// --------------------------------------------------------------------- PKI

fn pki(dir: &Path) {
    let ca = Ca::generate("test").unwrap();
    let servers = vec!["localhost".to_string()];
    write_cert(
        dir,
        "ca",
        &CertKeyPem {
            cert_pem: ca.cert_pem().into(),
            key_pem: ca.key_pem().into(),
        },
    )
    .unwrap();
    write_cert(dir, "ps", &ca.issue(Role::Ps, "ps1", &servers).unwrap()).unwrap();
    write_cert(dir, "mt", &ca.issue(Role::Mt, "mt1", &servers).unwrap()).unwrap();
    write_cert(dir, "agent-m1", &ca.issue(Role::Agent, "m1", &[]).unwrap()).unwrap();
    write_cert(dir, "agent-m2", &ca.issue(Role::Agent, "m2", &[]).unwrap()).unwrap();
}

// -------------------------------------------------------------------- agent

fn info(rid: &str, machine: &str) -> ReplicationInfo {
    ReplicationInfo {
        replication_id: rid.into(),
        machine_id: machine.into(),
        disks: vec![DiskInfo {
            index: 0,
            name: "disk0".into(),
            size: 64 << 20,
        }],
    }
}

/// Compressible frame of `n` 64 KiB writes from seq `first`.
fn frame(rid: &str, first: u64, n: u64) -> Vec<u8> {
    let mut b = FrameBuilder::new(rid, first);
    for s in first..first + n {
        let data: Vec<u8> = (0..65536u32)
            .map(|i| ((i / 512) as u64 + s) as u8)
            .collect();
        b.push_write(0, (s % 1000) * 65536, &data);
    }
    b.finish().to_bytes()
}

async fn client(tls: &TlsFiles, addr: SocketAddr) -> ProcessServerClient<Channel> {
    let ch = tls.connect(&addr.to_string(), "localhost").await.unwrap();
    ProcessServerClient::new(ch)
        .max_decoding_message_size(MSG)
        .max_encoding_message_size(MSG)
}

struct AgentStream {
    tx: mpsc::Sender<IngestRequest>,
    rx: Streaming<IngestResponse>,
    resume: u64,
}

async fn open_stream(
    tls: &TlsFiles,
    addr: SocketAddr,
    hello: ReplicationInfo,
) -> Result<AgentStream, Status> {
    let mut c = client(tls, addr).await;
    let (tx, rx) = mpsc::channel(16);
    tx.send(IngestRequest {
        msg: Some(ingest_request::Msg::Hello(hello)),
    })
    .await
    .unwrap();
    let mut rx = c.ingest(ReceiverStream::new(rx)).await?.into_inner();
    let resume = match rx.message().await? {
        Some(IngestResponse {
            msg: Some(ingest_response::Msg::ResumeSeq(n)),
        }) => n,
        other => panic!("expected resume_seq, got {other:?}"),
    };
    Ok(AgentStream { tx, rx, resume })
}

impl AgentStream {
    async fn send(&self, bytes: Vec<u8>) {
        self.tx
            .send(IngestRequest {
                msg: Some(ingest_request::Msg::Frame(bytes.into())),
            })
            .await
            .unwrap();
    }
    /// Reads acks until `seq` is durable; acks never go back.
    async fn wait_durable(&mut self, seq: u64) -> Result<(), Status> {
        let mut last = 0;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.rx.message())
                .await
                .expect("ack in time")?;
            match m {
                Some(IngestResponse {
                    msg: Some(ingest_response::Msg::DurableSeq(d)),
                }) => {
                    assert!(d >= last, "durable went back from {last} to {d}");
                    last = d;
                    if d >= seq {
                        return Ok(());
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    /// The status the stream ends with.
    async fn error(&mut self) -> Status {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.rx.message())
                .await
                .expect("answer in time")
            {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without an error"),
                Err(s) => return s,
            }
        }
    }
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Ps {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), crate::PsError>>,
}

async fn start_ps(config: Config) -> Ps {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(run(config, listener, async move {
        let _ = rx.await;
    }));
    Ps {
        addr,
        stop: Some(stop),
        task,
    }
}

impl Ps {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("PS stops in time")
            .unwrap()
            .unwrap();
    }
    async fn status(&self, tls: &TlsFiles) -> PsStatusResponse {
        client(tls, self.addr)
            .await
            .status(PsStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_forward_restart_over_mtls() {
    if std::env::var_os("PS_TEST_LOG").is_some() {
        rebound_common::telemetry::init(rebound_common::telemetry::LogFormat::Text);
    }
    tls::install_crypto_provider();
    let d = tempfile::tempdir().unwrap();
    let certs = d.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    pki(&certs);
    let agent1 = TlsFiles::in_dir(&certs, "agent-m1");
    let agent2 = TlsFiles::in_dir(&certs, "agent-m2");
    let mt_tls = TlsFiles::in_dir(&certs, "mt");

    let mt = FakeMt::default();
    let mt_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mt_addr = mt_listener.local_addr().unwrap();
    let mt_task = start_mt(mt.clone(), &mt_tls, mt_listener).await;

    let config = Config {
        listen: "unused".into(),
        cache_dir: d.path().join("cache"),
        cache_max_bytes: 1 << 30,
        compression_level: 1,
        tls: TlsFiles::in_dir(&certs, "ps"),
        mt: MtConfig {
            addr: mt_addr.to_string(),
            server_name: "localhost".into(),
        },
        ..Config::default()
    };
    let ps = start_ps(config.clone()).await;

    // An agent may stream only for its own machine.
    let e = open_stream(&agent2, ps.addr, info("r1", "m1"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("m1") && e.message().contains("m2"),
        "{e:?}"
    );
    // Other roles may not stream at all.
    let e = open_stream(&TlsFiles::in_dir(&certs, "mt"), ps.addr, info("r1", "m1"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Stream 40 records in 10 frames; all are acked and applied in order.
    let mut s = open_stream(&agent1, ps.addr, info("r1", "m1"))
        .await
        .unwrap();
    assert_eq!(s.resume, 0);
    for i in 0..10 {
        s.send(frame("r1", 1 + i * 4, 4)).await;
    }
    s.wait_durable(40).await.unwrap();
    wait_for("MT applied 40", || mt.applied("r1") == 40).await;
    // A resent frame is dropped; an overlapping one is fine.
    s.send(frame("r1", 37, 4)).await;
    s.send(frame("r1", 39, 4)).await;
    s.wait_durable(42).await.unwrap();
    wait_for("MT applied 42", || mt.applied("r1") == 42).await;
    {
        let st = mt.state.lock().unwrap();
        let recs = &st.records["r1"];
        assert_eq!(recs.len(), 42);
        let expected = Frame::parse(&frame("r1", 41, 2))
            .unwrap()
            .records()
            .unwrap();
        assert_eq!(&recs[40..], &expected[..]);
    }
    // A gap is refused.
    s.send(frame("r1", 50, 1)).await;
    let e = s.error().await;
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // A corrupt header is refused, naming the replication.
    let s = open_stream(&agent1, ps.addr, info("r1", "m1"))
        .await
        .unwrap();
    assert_eq!(s.resume, 42);
    let mut bad = frame("r1", 43, 1);
    bad[0] = b'X';
    s.send(bad).await;
    let mut s = s;
    let e = s.error().await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("r1"), "{e:?}");
    // So is a frame whose body does not match its hash.
    let s = open_stream(&agent1, ps.addr, info("r1", "m1"))
        .await
        .unwrap();
    let mut bad = frame("r1", 43, 1);
    let n = bad.len();
    bad[n - 100] ^= 1;
    s.send(bad).await;
    let mut s = s;
    assert_eq!(s.error().await.code(), Code::InvalidArgument);

    // Status.
    let st = ps.status(&agent1).await;
    assert_eq!(st.cache_limit, 1 << 30);
    assert_eq!(st.replications.len(), 1);
    assert_eq!(st.replications[0].durable_seq, 42);
    assert_eq!(st.replications[0].applied_seq, 42);

    // ChunkHashes is proxied, for the agent's own machine only.
    let req = ChunkHashesRequest {
        replication_id: "r1".into(),
        disk: 0,
        offset: 0,
        chunk_size: 1 << 20,
        count: 3,
        min_applied_seq: 42,
        info: None,
    };
    let r = client(&agent1, ps.addr)
        .await
        .chunk_hashes(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.hashes.len(), r.applied_seq), (96, 42));
    let e = client(&agent2, ps.addr)
        .await
        .chunk_hashes(req.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // The MT goes away: frames are still cached and acked, then forwarded
    // once it is back.
    mt_task.stop().await;
    let mut s = open_stream(&agent1, ps.addr, info("r1", "m1"))
        .await
        .unwrap();
    for i in 0..5 {
        s.send(frame("r1", 43 + i * 2, 2)).await;
    }
    s.wait_durable(52).await.unwrap();
    let st = ps.status(&agent1).await;
    assert_eq!(st.replications[0].durable_seq, 52);
    let raw: usize = (0..5).map(|i| frame("r1", 43 + i * 2, 2).len()).sum();
    assert!(
        st.cache_bytes > 0 && (st.cache_bytes as usize) < raw / 2,
        "cached {} bytes for {raw} raw: not compressed?",
        st.cache_bytes
    );
    drop(s);

    // The PS restarts with frames the MT has not seen; nothing is lost.
    ps.stop().await;
    let ps = start_ps(config.clone()).await;
    let s = open_stream(&agent1, ps.addr, info("r1", "m1"))
        .await
        .unwrap();
    assert_eq!(s.resume, 52);
    drop(s);
    let mt_listener = TcpListener::bind(mt_addr).await.unwrap();
    let mt_task = start_mt(mt.clone(), &mt_tls, mt_listener).await;
    wait_for("MT applied 52 after coming back", || mt.applied("r1") == 52).await;
    assert_eq!(mt.state.lock().unwrap().records["r1"].len(), 52);
    // Applied segments are trimmed.
    let t0 = Instant::now();
    loop {
        let st = ps.status(&agent1).await;
        if st.cache_bytes == 0 {
            assert_eq!(st.replications[0].applied_seq, 52);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "cache not trimmed: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Frames sent back to back are checked and compressed two at a time,
    // yet stored in order: a damaged one in the middle is refused after
    // the frames before it are durable and acked, and nothing after it is
    // stored.
    let mut s = open_stream(&agent1, ps.addr, info("r1", "m1"))
        .await
        .unwrap();
    assert_eq!(s.resume, 52);
    let mut bad = frame("r1", 61, 4);
    let n = bad.len();
    bad[n - 100] ^= 1;
    for f in [
        frame("r1", 53, 4),
        frame("r1", 57, 4),
        bad,
        frame("r1", 65, 4),
    ] {
        s.send(f).await;
    }
    s.wait_durable(60).await.unwrap();
    let e = s.error().await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("seq 61..=64"), "{e:?}");
    assert_eq!(ps.status(&agent1).await.replications[0].durable_seq, 60);
    wait_for("MT applied 60", || mt.applied("r1") == 60).await;
    {
        let st = mt.state.lock().unwrap();
        let recs = &st.records["r1"];
        assert_eq!(recs.len(), 60);
        let mut want = Frame::parse(&frame("r1", 53, 4))
            .unwrap()
            .records()
            .unwrap();
        want.extend(
            Frame::parse(&frame("r1", 57, 4))
                .unwrap()
                .records()
                .unwrap(),
        );
        assert_eq!(&recs[52..], &want[..]);
    }
    let s = open_stream(&agent1, ps.addr, info("r1", "m1"))
        .await
        .unwrap();
    assert_eq!(s.resume, 60);
    drop(s);
    ps.stop().await;
    mt_task.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_stops_acks_until_trimmed() {
    if std::env::var_os("PS_TEST_LOG").is_some() {
        rebound_common::telemetry::init(rebound_common::telemetry::LogFormat::Text);
    }
    tls::install_crypto_provider();
    let d = tempfile::tempdir().unwrap();
    let certs = d.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    pki(&certs);
    let agent1 = TlsFiles::in_dir(&certs, "agent-m1");
    let mt_tls = TlsFiles::in_dir(&certs, "mt");
    // Reserve an MT address but start the MT later.
    let mt_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mt_addr = mt_listener.local_addr().unwrap();
    drop(mt_listener);

    let config = Config {
        listen: "unused".into(),
        cache_dir: d.path().join("cache"),
        cache_max_bytes: 1 << 20,
        compression_level: 0,
        tls: TlsFiles::in_dir(&certs, "ps"),
        mt: MtConfig {
            addr: mt_addr.to_string(),
            server_name: "localhost".into(),
        },
        ..Config::default()
    };
    let ps = start_ps(config).await;
    let mut s = open_stream(&agent1, ps.addr, info("r1", "m1"))
        .await
        .unwrap();
    // Each frame is ~256 KiB raw: the cap is hit after four.
    for i in 0..12 {
        s.send(frame("r1", 1 + i * 4, 4)).await;
    }
    s.wait_durable(16).await.unwrap();
    // Nothing past the cap is read, so nothing more is acked.
    let mut max = 16;
    while let Ok(m) = tokio::time::timeout(Duration::from_millis(500), s.rx.message()).await {
        if let Some(IngestResponse {
            msg: Some(ingest_response::Msg::DurableSeq(d)),
        }) = m.unwrap()
        {
            max = max.max(d);
        }
    }
    assert_eq!(max, 16, "acked past the cap");
    let st = ps.status(&agent1).await;
    assert!(st.cache_bytes >= st.cache_limit, "{st:?}");
    assert_eq!(st.replications[0].durable_seq, 16);

    // The MT appears: applied segments are trimmed and the stream resumes.
    let mt = FakeMt::default();
    let mt_task = start_mt(
        mt.clone(),
        &mt_tls,
        TcpListener::bind(mt_addr).await.unwrap(),
    )
    .await;
    s.wait_durable(48).await.unwrap();
    wait_for("MT applied 48", || mt.applied("r1") == 48).await;
    drop(s);
    ps.stop().await;
    mt_task.stop().await;
}

/// AddReplication names each replication's MT; the route is persisted in the
/// cache dir, so a restarted PS forwards there (not to the default `[mt]`);
/// RemoveReplication stops forwarding and drops the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_replication_mt_route_survives_restart_and_remove_drops_it() {
    use crate::cache::Cache;
    use crate::control::{add_replication, remove_replication};
    use crate::forward::{Forwarders, MtLink};
    use rebound_proto::control::AddReplication;

    tls::install_crypto_provider();
    let d = tempfile::tempdir().unwrap();
    let certs = d.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    pki(&certs);
    let mt_tls = TlsFiles::in_dir(&certs, "mt");
    let ps_tls = TlsFiles::in_dir(&certs, "ps");
    let (mt1, mt2) = (FakeMt::default(), FakeMt::default());
    let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a1, a2) = (l1.local_addr().unwrap(), l2.local_addr().unwrap());
    let run1 = start_mt(mt1.clone(), &mt_tls, l1).await;
    let run2 = start_mt(mt2.clone(), &mt_tls, l2).await;
    let cache_dir = d.path().join("cache");

    // The CS adds r1 with MT 2 (while the PS's default is MT 1).
    {
        let cache = Cache::open(&cache_dir, 1 << 30).unwrap();
        let fw = Forwarders::new(Arc::new(MtLink::new(
            ps_tls.clone(),
            a1.to_string(),
            "localhost".into(),
        )));
        let add = AddReplication {
            replication_id: "r1".into(),
            machine_id: "m1".into(),
            mt_address: a2.to_string(),
            mt_server_name: "localhost".into(),
        };
        add_replication(&cache, &fw, &add).unwrap();
        add_replication(&cache, &fw, &add).unwrap(); // idempotent
        assert_eq!(fw.link_for("r1").addr(), a2.to_string());
        assert_eq!(fw.link_for("r2").addr(), a1.to_string());
        assert!(cache_dir.join("r1/route.json").exists());
        fw.shutdown();
        tokio::task::spawn_blocking(move || cache.shutdown())
            .await
            .unwrap();
    }

    // A restarted PS forwards r1 to MT 2 and r2 (no route) to MT 1.
    let config = Config {
        listen: "unused".into(),
        cache_dir: cache_dir.clone(),
        cache_max_bytes: 1 << 30,
        compression_level: 1,
        tls: ps_tls.clone(),
        mt: MtConfig {
            addr: a1.to_string(),
            server_name: "localhost".into(),
        },
        ..Config::default()
    };
    let ps = start_ps(config).await;
    let agent1 = TlsFiles::in_dir(&certs, "agent-m1");
    let agent2 = TlsFiles::in_dir(&certs, "agent-m2");
    let mut s1 = open_stream(&agent1, ps.addr, info("r1", "m1"))
        .await
        .unwrap();
    let mut s2 = open_stream(&agent2, ps.addr, info("r2", "m2"))
        .await
        .unwrap();
    s1.send(frame("r1", 1, 4)).await;
    s2.send(frame("r2", 1, 3)).await;
    s1.wait_durable(4).await.unwrap();
    s2.wait_durable(3).await.unwrap();
    wait_for("MT 2 applied r1", || mt2.applied("r1") == 4).await;
    wait_for("MT 1 applied r2", || mt1.applied("r2") == 3).await;
    assert_eq!(mt1.applied("r1"), 0);
    assert_eq!(mt2.applied("r2"), 0);
    drop((s1, s2));
    ps.stop().await;

    // RemoveReplication: the cache and the route go; idempotent.
    let fw = Forwarders::new(Arc::new(MtLink::new(
        ps_tls.clone(),
        a1.to_string(),
        "localhost".into(),
    )));
    let a2s = a2.to_string();
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _rt = handle.enter();
        let cache = Cache::open(&cache_dir, 1 << 30).unwrap();
        assert!(cache.get("r1").is_some());
        remove_replication(&cache, &fw, "r1").unwrap();
        remove_replication(&cache, &fw, "r1").unwrap();
        assert!(cache.get("r1").is_none());
        assert!(!cache_dir.join("r1").exists());
        assert!(cache.get("r2").is_some());
        // Another machine's replication id is refused.
        let e = add_replication(
            &cache,
            &fw,
            &AddReplication {
                replication_id: "r2".into(),
                machine_id: "m1".into(),
                mt_address: a2s,
                mt_server_name: String::new(),
            },
        )
        .unwrap_err();
        assert!(e.contains("m2"), "{e}");
        fw.shutdown();
        cache.shutdown();
    })
    .await
    .unwrap();
    run1.stop().await;
    run2.stop().await;
}

/// The hello carries the certificate's id; the status is sampled from the
/// cache (durable/applied seqs, lag, cache use and cap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_hello_and_status() {
    use crate::cache::Cache;
    use crate::control::{status_task, Handler, Identity, PsControl};
    use crate::forward::{Forwarders, MtLink};
    use rebound_common::control::ControlHandler;
    use rebound_proto::control::status::Status as St;

    let d = tempfile::tempdir().unwrap();
    let certs = d.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    pki(&certs);
    let ps_tls = TlsFiles::in_dir(&certs, "ps");
    assert_eq!(crate::own_id(&ps_tls).unwrap(), "ps1");
    let e = crate::own_id(&TlsFiles::in_dir(&certs, "mt")).unwrap_err();
    assert!(e.to_string().contains("ps certificate"), "{e}");

    let cache = Arc::new(Cache::open(&d.path().join("cache"), 1 << 30).unwrap());
    cache.ensure("r1").unwrap();
    let fw = Arc::new(Forwarders::new(Arc::new(MtLink::new(
        ps_tls,
        "127.0.0.1:1".into(),
        "localhost".into(),
    ))));
    let ctl = Arc::new(PsControl {
        cache: cache.clone(),
        forwarders: fw.clone(),
        identity: Identity {
            id: "ps1".into(),
            site: "onprem".into(),
            addresses: vec!["127.0.0.1:9443".into()],
            instance: crate::instance_id(),
        },
        status: Mutex::new(None),
    });
    let h = Handler(ctl.clone());
    let hello = h.hello();
    assert_eq!(
        (hello.role.as_str(), hello.id.as_str(), hello.site.as_str()),
        ("ps", "ps1", "onprem")
    );
    assert_eq!(hello.addresses, vec!["127.0.0.1:9443".to_string()]);
    assert_eq!(hello.instance.len(), 16);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(status_task(ctl.clone(), stop_rx));
    wait_for("first status", || h.status().is_some()).await;
    let Some(St::Ps(st)) = h.status().unwrap().status else {
        panic!("not a PS status")
    };
    assert_eq!(st.cache_limit, 1 << 30);
    assert_eq!(st.replications.len(), 1);
    assert_eq!(st.replications[0].replication_id, "r1");
    assert_eq!(st.replications[0].lag_ms, 0);
    stop_tx.send_replace(true);
    task.await.unwrap();
    fw.shutdown();
    tokio::task::spawn_blocking(move || cache.shutdown())
        .await
        .unwrap();
}
