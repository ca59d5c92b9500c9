//! The gRPC service end to end over mutual TLS: `run` on port 0, a PS
//! client streaming frames, an admin client rolling back, and the role
//! checks.

use super::{check_latest, history, info, Gen, RID, SIZES};
use crate::config::Config;
use crate::error::MtError;
use crate::replication::Store;
use rebound_common::frame::Record;
use rebound_common::pki::write_dev_bundle;
use rebound_common::tls::{install_crypto_provider, TlsFiles};
use rebound_proto::master_target_client::MasterTargetClient;
use rebound_proto::{
    apply_request, apply_response, ApplyRequest, ChunkHashesRequest, ListPointsRequest,
    ReplicationInfo, ReplicationsRequest, RestorePreImagesRequest, RollbackRequest,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

/// An MT started with `run` on loopback port 0, data and PKI under `dir`.
struct Server {
    pki: PathBuf,
    addr: String,
    nbd_addr: ViewsAt,
    stop_tx: oneshot::Sender<()>,
    server: JoinHandle<Result<(), MtError>>,
}

async fn start(dir: &Path) -> Server {
    // Port 0: parallel tests would collide on the default port.
    start_with(dir, "127.0.0.1:0").await
}

/// [`start`] with `/metrics` and `/healthz` on `metrics_listen`.
async fn start_with(dir: &Path, metrics_listen: &str) -> Server {
    install_crypto_provider();
    let pki = dir.join("pki");
    write_dev_bundle(&pki, &["m1".to_string()]).unwrap();
    let cfg = Config {
        data_dir: dir.join("data"),
        tls: TlsFiles::in_dir(&pki, "mt"),
        metrics_listen: metrics_listen.into(),
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let nbd = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nbd_addr = ViewsAt {
        addr: nbd.local_addr().unwrap(),
        certs: admin_nbd_dir(&pki),
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(crate::run(cfg, listener, nbd, async move {
        let _ = stop_rx.await;
    }));
    Server {
        pki,
        addr,
        nbd_addr,
        stop_tx,
        server,
    }
}

/// Asks the MT to stop and waits for `run` to end cleanly, within 8 s.
async fn shutdown(stop_tx: oneshot::Sender<()>, server: JoinHandle<Result<(), MtError>>) {
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(8), server)
        .await
        .expect("shutdown within 8 s")
        .unwrap()
        .unwrap();
}

/// The MT's views: their address, and the admin certificate as NBD
/// clients read it (views are served over TLS only).
#[derive(Clone)]
struct ViewsAt {
    addr: std::net::SocketAddr,
    certs: std::path::PathBuf,
}

/// `ca-cert.pem`, `client-cert.pem`, `client-key.pem` of the admin, as
/// libnbd's `tls-certificates=DIR` wants them.
fn admin_nbd_dir(pki: &Path) -> std::path::PathBuf {
    let dir = pki.join("nbd-admin");
    rebound_common::nbd::tls::write_client_dir(&TlsFiles::in_dir(pki, "admin"), &dir).unwrap();
    dir
}

/// Reads an export of the MT's NBD server with `nbdcopy` over TLS and
/// compares it with `want`.
fn nbd_check(views: &ViewsAt, export: &str, want: &[u8]) {
    let uri = format!(
        "nbds://{}/{export}?tls-certificates={}",
        views.addr,
        views.certs.display()
    );
    let out = std::process::Command::new("nbdcopy")
        .args([uri.as_str(), "-"])
        .output()
        .expect("nbdcopy is needed for this test: apt-get install libnbd-bin");
    assert!(
        out.status.success(),
        "{uri}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == want, "{uri}: content differs from the model");
}

/// The recovery points of replication [`RID`] and its applied seq.
async fn list_points(c: &mut MasterTargetClient<Channel>) -> rebound_proto::ListPointsResponse {
    c.list_points(ListPointsRequest {
        replication_id: RID.into(),
    })
    .await
    .expect("list points")
    .into_inner()
}

/// Rolls replication [`RID`] back to `point` over gRPC.
async fn rollback(
    c: &mut MasterTargetClient<Channel>,
    point: &str,
) -> Result<rebound_proto::RollbackResponse, tonic::Status> {
    c.rollback(RollbackRequest {
        replication_id: RID.into(),
        point: point.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// The first message of an apply stream: the replication's hello.
fn hello() -> ApplyRequest {
    ApplyRequest {
        msg: Some(apply_request::Msg::Hello(info())),
    }
}

/// An apply stream message carrying one encoded frame.
fn frame(bytes: Vec<u8>) -> ApplyRequest {
    ApplyRequest {
        msg: Some(apply_request::Msg::Frame(bytes.into())),
    }
}

async fn client(pki: &std::path::Path, name: &str, addr: &str) -> MasterTargetClient<Channel> {
    let ch = TlsFiles::in_dir(pki, name)
        .connect(addr, "localhost", rebound_common::pki::Role::Mt)
        .await
        .expect("connect");
    MasterTargetClient::new(ch)
        .max_decoding_message_size(80 << 20)
        .max_encoding_message_size(80 << 20)
}

async fn stream_frames(c: &mut MasterTargetClient<Channel>, g: &Gen, from: u64, to: u64) -> u64 {
    let (tx, rx) = mpsc::channel(4);
    tx.send(hello()).await.unwrap();
    let mut resp = c
        .apply(ReceiverStream::new(rx))
        .await
        .expect("apply")
        .into_inner();
    let first = resp.message().await.unwrap().unwrap();
    let Some(apply_response::Msg::ResumeSeq(resume)) = first.msg else {
        panic!("expected resume_seq, got {first:?}");
    };
    assert_eq!(resume, from - 1);
    let mut s = from;
    while s <= to {
        let e = (s + 9).min(to);
        tx.send(frame(g.frame_bytes(s, e))).await.unwrap();
        let m = resp.message().await.unwrap().unwrap();
        assert_eq!(m.msg, Some(apply_response::Msg::AppliedSeq(e)));
        s = e + 1;
    }
    to
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_apply_points_rollback_and_roles() {
    let dir = tempfile::tempdir().unwrap();
    let Server {
        pki,
        addr,
        nbd_addr,
        stop_tx,
        server,
    } = start(dir.path()).await;

    let g = history(21);
    let mut ps = client(&pki, "ps", &addr).await;
    let n = g.seq();
    stream_frames(&mut ps, &g, 1, n / 2).await;
    // A reconnecting PS resumes where the MT is.
    stream_frames(&mut ps, &g, n / 2 + 1, n).await;

    let pts = list_points(&mut ps).await;
    assert_eq!(pts.points.len(), 5);
    assert_eq!(pts.applied_seq, n);
    assert_eq!(pts.points[2].id, "p2");
    assert_eq!(pts.points[2].kind, "crash");

    // Views through a real NBD client.
    let (p1, latest) = (g.snap("p1")[0].clone(), g.disks[1].clone());
    tokio::task::spawn_blocking(move || {
        nbd_check(&nbd_addr, "m1/disk0@p1", &p1);
        nbd_check(&nbd_addr, "m1/disk1@latest", &latest);
    })
    .await
    .unwrap();

    // Roles: a PS may not roll back; an admin may not apply.
    let e = rollback(&mut ps, "p2").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut admin = client(&pki, "admin", &addr).await;
    let (_tx, rx) = mpsc::channel(1);
    let e = admin.apply(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Chunk hashes over the replica now.
    let hs = ps
        .chunk_hashes(ChunkHashesRequest {
            replication_id: RID.into(),
            disk: 1,
            offset: 0,
            chunk_size: 1 << 20,
            count: 1,
            min_applied_seq: n,
            info: None,
            point_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hs.hashes, blake3::hash(&g.disks[1]).as_bytes().to_vec());
    assert_eq!(hs.applied_seq, n);
    // Unknown replication with info: created.
    let mut other = info();
    other.replication_id = "m1-ba".into();
    let hs = ps
        .chunk_hashes(ChunkHashesRequest {
            replication_id: "m1-ba".into(),
            disk: 0,
            offset: 0,
            chunk_size: 64 << 10,
            count: 2,
            min_applied_seq: 0,
            info: Some(other),
            point_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&hs.hashes[..32], blake3::hash(&[0u8; 64 << 10]).as_bytes());
    // Only the protocol's chunk sizes, and only the replication's machine.
    let mut req = ChunkHashesRequest {
        replication_id: RID.into(),
        disk: 0,
        offset: 0,
        chunk_size: 1,
        count: 1,
        min_applied_seq: 0,
        info: None,
        point_id: String::new(),
    };
    let e = ps.chunk_hashes(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("chunk size of 1 bytes"), "{e:?}");
    req.chunk_size = 1 << 20;
    req.info = Some(ReplicationInfo {
        machine_id: "m2".into(),
        ..info()
    });
    let e = ps.chunk_hashes(req).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("belongs to machine m1"), "{e:?}");
    let reps = admin
        .replications(ReplicationsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reps.replications.len(), 2);

    // Rollback as admin; apply refused; restore.
    let rb = rollback(&mut admin, "p2").await.unwrap();
    assert_eq!(rb.point.unwrap().id, "p2");
    assert!(rb.blocks_restored > 0);
    let pts = list_points(&mut ps).await;
    assert_eq!(pts.rolled_back_to, "p2");
    let e = rollback(&mut admin, "nope").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let mut g2 = history(21);
    g2.random_ops(3);
    let (tx, rx) = mpsc::channel(4);
    tx.send(hello()).await.unwrap();
    tx.send(frame(g2.frame_bytes(n + 1, g2.seq())))
        .await
        .unwrap();
    let mut resp = ps
        .apply(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.message().await.unwrap().is_some()); // resume_seq
    let e = resp.message().await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message()
            .contains("rolled back to p2; restore pre-images first"),
        "{}",
        e.message()
    );
    drop(tx);

    let r = admin
        .restore_pre_images(RestorePreImagesRequest {
            replication_id: RID.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.blocks_restored, rb.blocks_restored);

    // An open apply stream does not hold up shutdown.
    let (_keep, rx) = mpsc::channel(4);
    _keep.send(hello()).await.unwrap();
    let mut resp = ps
        .apply(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.message().await.unwrap().is_some());
    shutdown(stop_tx, server).await;
}

/// The disks of `g` after its records up to `seq`.
fn disks_at(g: &Gen, seq: u64) -> Vec<Vec<u8>> {
    let mut disks: Vec<Vec<u8>> = SIZES.iter().map(|&s| vec![0u8; s as usize]).collect();
    for r in &g.records[..seq as usize] {
        match r {
            Record::Write { disk, offset, data } => {
                let o = *offset as usize;
                disks[*disk as usize][o..o + data.len()].copy_from_slice(data);
            }
            Record::Zero { disk, offset, len } => {
                disks[*disk as usize][*offset as usize..(*offset + *len) as usize].fill(0)
            }
            _ => {}
        }
    }
    disks
}

/// Sends the hello and then `frames` without waiting for any answer (the
/// MT reads, prepares and applies them in overlapping stages), then reads
/// answers until the stream ends. Returns the resume seq, the highest
/// applied seq acknowledged, and the error that ended the stream.
async fn pipelined(
    c: &mut MasterTargetClient<Channel>,
    frames: Vec<Vec<u8>>,
) -> (u64, u64, Option<tonic::Status>) {
    let (tx, rx) = mpsc::channel(frames.len() + 1);
    tx.send(hello()).await.unwrap();
    for f in frames {
        tx.send(frame(f)).await.unwrap();
    }
    drop(tx);
    let mut resp = c
        .apply(ReceiverStream::new(rx))
        .await
        .expect("apply")
        .into_inner();
    let (mut resume, mut acked) = (None, 0);
    loop {
        match resp.message().await {
            Ok(Some(m)) => match m.msg {
                Some(apply_response::Msg::ResumeSeq(s)) => resume = Some(s),
                Some(apply_response::Msg::AppliedSeq(s)) => {
                    assert!(
                        s >= acked,
                        "acknowledgements go backwards: {s} after {acked}"
                    );
                    acked = s;
                }
                other => panic!("unexpected answer {other:?}"),
            },
            Ok(None) => return (resume.expect("resume_seq"), acked, None),
            Err(e) => return (resume.expect("resume_seq"), acked, Some(e)),
        }
    }
}

/// Frames sent back to back, one of them damaged: every frame before it is
/// applied and acknowledged, nothing of it or after it is (by the replica's
/// content), and a new stream resumes right before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_frames_stop_at_a_damaged_one() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let mut ps = client(&srv.pki, "ps", &srv.addr).await;
    let g = history(23);
    let n = g.seq();
    let ranges: Vec<(u64, u64)> = (1..=n).step_by(3).map(|s| (s, (s + 2).min(n))).collect();
    let bad = ranges.len() * 2 / 3;
    let good_to = ranges[bad].0 - 1;
    let frames = ranges
        .iter()
        .enumerate()
        .map(|(i, &(s, e))| {
            let mut f = g.frame_bytes(s, e);
            if i == bad {
                *f.last_mut().unwrap() ^= 0x40; // the body no longer matches its hash
            }
            f
        })
        .collect();
    let (resume, acked, err) = pipelined(&mut ps, frames).await;
    assert_eq!(resume, 0);
    assert_eq!(
        acked, good_to,
        "acknowledged up to the frame before the damaged one"
    );
    let err = err.expect("the damaged frame ends the stream");
    assert_eq!(err.code(), Code::DataLoss, "{}", err.message());
    assert!(
        err.message()
            .contains(&format!("seq {}..={}", ranges[bad].0, ranges[bad].1)),
        "the error names the frame: {}",
        err.message()
    );

    // The replica holds exactly the frames before the damaged one.
    let want = disks_at(&g, good_to);
    let nbd_addr = srv.nbd_addr.clone();
    tokio::task::spawn_blocking(move || {
        nbd_check(&nbd_addr, "m1/disk0@latest", &want[0]);
        nbd_check(&nbd_addr, "m1/disk1@latest", &want[1]);
    })
    .await
    .unwrap();

    // The PS resends from the MT's word, back to back again.
    let rest = ranges[bad..]
        .iter()
        .map(|&(s, e)| g.frame_bytes(s, e))
        .collect();
    let (resume, acked, err) = pipelined(&mut ps, rest).await;
    assert_eq!(resume, good_to);
    assert_eq!(acked, n);
    assert!(err.is_none(), "{err:?}");

    shutdown(srv.stop_tx, srv.server).await;
    let store = Store::open(&dir.path().join("data")).unwrap();
    let r = store.get(RID).expect("replication");
    check_latest(&r, &disks_at(&g, n));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_serves_once_started_and_metrics_show_the_apply() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let dir = tempfile::tempdir().unwrap();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mt = start_with(dir.path(), &metrics.to_string()).await;
    let ch = TlsFiles::in_dir(&mt.pki, "ps")
        .connect(&mt.addr, "localhost", rebound_common::pki::Role::Mt)
        .await
        .expect("connect");
    let mut health = HealthClient::new(ch);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status();
        if status == ServingStatus::Serving {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the MT reports {status:?} 10 s after start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The HTTP side agrees, and a scrape shows the replication applied.
    let healthz = http_get(metrics, "/healthz").await;
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    let g = history(23);
    let mut ps = client(&mt.pki, "ps", &mt.addr).await;
    stream_frames(&mut ps, &g, 1, g.seq()).await;
    let scrape = http_get(metrics, "/metrics").await;
    let applied = format!(
        "rebound_mt_applied_seq{{replication=\"{RID}\",machine=\"m1\"}} {}",
        g.seq()
    );
    assert!(scrape.contains(&applied), "{scrape}");
    assert!(
        scrape.contains("rebound_mt_fsync_seconds_count"),
        "{scrape}"
    );
    shutdown(mt.stop_tx, mt.server).await;
}

/// The answer (status line, headers, body) to a plain HTTP GET of `path`.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: mt\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn a_metrics_address_in_use_stops_the_start_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    let cfg = Config {
        data_dir: dir.path().join("data"),
        metrics_listen: taken.clone(),
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nbd = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let e = crate::run(cfg, listener, nbd, std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(e, MtError::Metrics(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&taken) && msg.contains("metrics_listen"),
        "{msg}"
    );
}
