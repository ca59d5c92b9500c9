//! What the process-server tests share: a throw-away PKI and config, a
//! tiny fake master target (accepting Apply, checking every frame and
//! acking), agent clients, and a process server run in-process.

use crate::{run, Config, MtConfig};
use rebound_common::frame::{Frame, FrameBuilder, Record};
use rebound_common::pki::write_dev_bundle;
use rebound_common::pki::Role;
use rebound_common::tls::{self, TlsFiles};
use rebound_proto::master_target_server::{MasterTarget, MasterTargetServer};
use rebound_proto::process_server_client::ProcessServerClient;
use rebound_proto::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

const MSG: usize = 80 << 20;

// ------------------------------------------------------------------ fake MT

#[derive(Default)]
pub(crate) struct MtState {
    pub(crate) applied: HashMap<String, u64>,
    /// Every applied record, by seq.
    pub(crate) records: HashMap<String, Vec<Record>>,
    pub(crate) hellos: u64,
}

#[derive(Clone)]
pub(crate) struct FakeMt {
    pub(crate) state: Arc<Mutex<MtState>>,
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
    pub(crate) fn applied(&self, rid: &str) -> u64 {
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
pub(crate) struct MtRun {
    down: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl MtRun {
    pub(crate) async fn stop(self) {
        self.down.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("fake MT stops")
            .unwrap();
    }
}

/// A fake MT started on a free port of 127.0.0.1.
pub(crate) async fn spawn_mt(tls: &TlsFiles) -> (FakeMt, SocketAddr, MtRun) {
    let mt = FakeMt::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let run = start_mt(mt.clone(), tls, listener).await;
    (mt, addr, run)
}

/// Starts `mt` (again) at `addr`, an address reserved for it or where it
/// ran before.
pub(crate) async fn start_mt_at(mt: &FakeMt, tls: &TlsFiles, addr: SocketAddr) -> MtRun {
    start_mt(mt.clone(), tls, TcpListener::bind(addr).await.unwrap()).await
}

pub(crate) async fn start_mt(mut mt: FakeMt, tls: &TlsFiles, listener: TcpListener) -> MtRun {
    let acceptor = tls
        .acceptor(tls::ClientAuth::Required, &tls::Revocations::new())
        .unwrap();
    let (down, rx) = watch::channel(false);
    mt.down = rx.clone();
    let mut rx2 = rx;
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(
                MasterTargetServer::new(mt)
                    .max_decoding_message_size(MSG)
                    .max_encoding_message_size(MSG),
            )
            .serve_with_incoming_shutdown(acceptor.incoming(listener), async move {
                let _ = rx2.wait_for(|d| *d).await;
            })
            .await
            .unwrap();
    });
    MtRun { down, task }
}

// ------------------------------------------------------------- PKI, config

/// A temporary directory with a PKI (`ca`, `ps` for ps1, `mt` for mt1,
/// `agent-m1`, `agent-m2`) under `certs/`.
pub(crate) struct Lab {
    pub(crate) dir: tempfile::TempDir,
    certs: PathBuf,
}

impl Lab {
    pub(crate) fn new() -> Lab {
        if std::env::var_os("PS_TEST_LOG").is_some() {
            rebound_common::telemetry::init(rebound_common::telemetry::LogFormat::Text);
        }
        tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        write_dev_bundle(&certs, &["m1".to_string(), "m2".to_string()]).unwrap();
        Lab { dir, certs }
    }

    /// The TLS files of `name` (`ps`, `mt`, `agent-m1`, ...).
    pub(crate) fn tls(&self, name: &str) -> TlsFiles {
        TlsFiles::in_dir(&self.certs, name)
    }

    /// A PS config caching in `<dir>/cache` and forwarding to `mt` by default.
    pub(crate) fn ps_config(
        &self,
        mt: SocketAddr,
        cache_max_bytes: u64,
        compression_level: i32,
    ) -> Config {
        Config {
            listen: "unused".into(),
            // Parallel tests would collide on the default port.
            metrics_listen: String::new(),
            cache_dir: self.dir.path().join("cache"),
            cache_max_bytes,
            compression_level,
            tls: self.tls("ps"),
            mt: MtConfig {
                addr: mt.to_string(),
                server_name: "localhost".into(),
            },
            ..Config::default()
        }
    }
}

// -------------------------------------------------------------------- agent

pub(crate) fn info(rid: &str, machine: &str) -> ReplicationInfo {
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
pub(crate) fn frame(rid: &str, first: u64, n: u64) -> Vec<u8> {
    let mut b = FrameBuilder::new(rid, first);
    for s in first..first + n {
        let data: Vec<u8> = (0..65536u32)
            .map(|i| ((i / 512) as u64 + s) as u8)
            .collect();
        b.push_write(0, (s % 1000) * 65536, &data);
    }
    b.finish().to_bytes()
}

pub(crate) async fn client(tls: &TlsFiles, addr: SocketAddr) -> ProcessServerClient<Channel> {
    let ch = tls
        .connect(&addr.to_string(), "localhost", Role::Ps)
        .await
        .unwrap();
    ProcessServerClient::new(ch)
        .max_decoding_message_size(MSG)
        .max_encoding_message_size(MSG)
}

pub(crate) struct AgentStream {
    tx: mpsc::Sender<IngestRequest>,
    pub(crate) rx: Streaming<IngestResponse>,
    pub(crate) resume: u64,
}

pub(crate) async fn open_stream(
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
    pub(crate) async fn send(&self, bytes: Vec<u8>) {
        self.tx
            .send(IngestRequest {
                msg: Some(ingest_request::Msg::Frame(bytes.into())),
            })
            .await
            .unwrap();
    }
    /// Sends a frame the PS may already have ended the stream before.
    pub(crate) async fn offer(&self, bytes: Vec<u8>) {
        let _ = self
            .tx
            .send(IngestRequest {
                msg: Some(ingest_request::Msg::Frame(bytes.into())),
            })
            .await;
    }
    /// Reads acks until `seq` is durable; acks never go back.
    pub(crate) async fn wait_durable(&mut self, seq: u64) -> Result<(), Status> {
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
    pub(crate) async fn error(&mut self) -> Status {
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

/// Checks a refusal's code and that its message says each of `parts`.
pub(crate) fn assert_status(e: &Status, code: tonic::Code, parts: &[&str]) {
    assert_eq!(e.code(), code, "{e:?}");
    for part in parts {
        assert!(e.message().contains(part), "{part:?} missing: {e:?}");
    }
}

/// Sends `n` records (one frame) after the stream's resume seq and waits
/// until they are durable and `mt` applied them.
pub(crate) async fn send_until_applied(s: &mut AgentStream, mt: &FakeMt, rid: &str, n: u64) {
    let last = s.resume + n;
    s.send(frame(rid, s.resume + 1, n)).await;
    s.wait_durable(last).await.unwrap();
    wait_for(&format!("MT applied {last}"), || mt.applied(rid) == last).await;
}

/// The MT (`mt`, down) starts again at `mt_addr`; an agent stream of r1
/// (machine m1) must resume after `resume` and its next record reach the
/// MT; then the PS and the MT stop.
pub(crate) async fn mt_returns_and_r1_resumes_after(
    lab: &Lab,
    ps: Ps,
    mt: &FakeMt,
    mt_addr: SocketAddr,
    resume: u64,
) {
    let mt_run = start_mt_at(mt, &lab.tls("mt"), mt_addr).await;
    let mut s = ps.stream(&lab.tls("agent-m1"), "r1", "m1").await;
    assert_eq!(
        s.resume, resume,
        "resumed elsewhere than after the MT's applied seq"
    );
    send_until_applied(&mut s, mt, "r1", 1).await;
    drop(s);
    ps.stop().await;
    mt_run.stop().await;
}

pub(crate) async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) struct Ps {
    pub(crate) addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), crate::PsError>>,
}

pub(crate) async fn start_ps(config: Config) -> Ps {
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
    pub(crate) async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("PS stops in time")
            .unwrap()
            .unwrap();
    }
    /// An agent stream of replication `rid` of `machine`, accepted.
    pub(crate) async fn stream(&self, tls: &TlsFiles, rid: &str, machine: &str) -> AgentStream {
        open_stream(tls, self.addr, info(rid, machine))
            .await
            .unwrap()
    }
    pub(crate) async fn status(&self, tls: &TlsFiles) -> PsStatusResponse {
        client(tls, self.addr)
            .await
            .status(PsStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }
}

/// The status sampler run by hand over a cache and its forwarders (no PS
/// around them); [`Sampler::stop`] stops all three.
pub(crate) struct Sampler {
    pub(crate) cache: Arc<crate::cache::Cache>,
    pub(crate) forwarders: Arc<crate::forward::Forwarders>,
    pub(crate) cell: Arc<crate::status::StatusCell>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Sampler {
    pub(crate) fn start(
        cache: Arc<crate::cache::Cache>,
        forwarders: Arc<crate::forward::Forwarders>,
        cell: Arc<crate::status::StatusCell>,
    ) -> Sampler {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(crate::status::status_task(
            cache.clone(),
            forwarders.clone(),
            cell.clone(),
            rx,
        ));
        Sampler {
            cache,
            forwarders,
            cell,
            stop,
            task,
        }
    }

    pub(crate) async fn stop(self) {
        self.stop.send_replace(true);
        self.task.await.unwrap();
        self.forwarders.shutdown();
        let cache = self.cache;
        tokio::task::spawn_blocking(move || cache.shutdown())
            .await
            .unwrap();
    }
}
