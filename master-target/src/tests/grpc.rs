//! The gRPC service end to end over mutual TLS: `run` on port 0, a PS
//! client streaming frames, an admin client rolling back, and the role
//! checks.

use super::{history, info, Gen, RID};
use crate::config::Config;
use rebound_common::pki::write_dev_bundle;
use rebound_common::tls::{install_crypto_provider, TlsFiles};
use rebound_proto::master_target_client::MasterTargetClient;
use rebound_proto::{
    apply_request, apply_response, ApplyRequest, ChunkHashesRequest, ListPointsRequest,
    ReplicationsRequest, RestorePreImagesRequest, RollbackRequest,
};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

async fn client(pki: &std::path::Path, name: &str, addr: &str) -> MasterTargetClient<Channel> {
    let ch = TlsFiles::in_dir(pki, name)
        .connect(addr, "localhost")
        .await
        .expect("connect");
    MasterTargetClient::new(ch)
        .max_decoding_message_size(80 << 20)
        .max_encoding_message_size(80 << 20)
}

async fn stream_frames(c: &mut MasterTargetClient<Channel>, g: &Gen, from: u64, to: u64) -> u64 {
    let (tx, rx) = mpsc::channel(4);
    tx.send(ApplyRequest {
        msg: Some(apply_request::Msg::Hello(info())),
    })
    .await
    .unwrap();
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
        tx.send(ApplyRequest {
            msg: Some(apply_request::Msg::Frame(g.frame_bytes(s, e).into())),
        })
        .await
        .unwrap();
        let m = resp.message().await.unwrap().unwrap();
        assert_eq!(m.msg, Some(apply_response::Msg::AppliedSeq(e)));
        s = e + 1;
    }
    to
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_apply_points_rollback_and_roles() {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    write_dev_bundle(&pki, &["m1".to_string()]).unwrap();
    let cfg = Config {
        data_dir: dir.path().join("data"),
        tls: TlsFiles::in_dir(&pki, "mt"),
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let nbd = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nbd_addr = nbd.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(crate::run(cfg, listener, nbd, async move {
        let _ = stop_rx.await;
    }));

    let g = history(21);
    let mut ps = client(&pki, "ps", &addr).await;
    let n = g.seq();
    stream_frames(&mut ps, &g, 1, n / 2).await;
    // A reconnecting PS resumes where the MT is.
    stream_frames(&mut ps, &g, n / 2 + 1, n).await;

    let pts = ps
        .list_points(ListPointsRequest {
            replication_id: RID.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pts.points.len(), 5);
    assert_eq!(pts.applied_seq, n);
    assert_eq!(pts.points[2].id, "p2");
    assert_eq!(pts.points[2].kind, "crash");

    // Views through a real NBD client.
    let nbd_check = move |export: &str, want: Vec<u8>| {
        let uri = format!("nbd://{nbd_addr}/{export}");
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
    };
    let (p1, latest) = (g.snap("p1")[0].clone(), g.disks[1].clone());
    tokio::task::spawn_blocking(move || {
        nbd_check("m1/disk0@p1", p1);
        nbd_check("m1/disk1@latest", latest);
    })
    .await
    .unwrap();

    // Roles: a PS may not roll back; an admin may not apply.
    let e = ps
        .rollback(RollbackRequest {
            replication_id: RID.into(),
            point: "p2".into(),
        })
        .await
        .unwrap_err();
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
            chunk_size: 4096,
            count: 2,
            min_applied_seq: 0,
            info: Some(other),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&hs.hashes[..32], blake3::hash(&[0u8; 4096]).as_bytes());
    let reps = admin
        .replications(ReplicationsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reps.replications.len(), 2);

    // Rollback as admin; apply refused; restore.
    let rb = admin
        .rollback(RollbackRequest {
            replication_id: RID.into(),
            point: "p2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rb.point.unwrap().id, "p2");
    assert!(rb.blocks_restored > 0);
    let pts = ps
        .list_points(ListPointsRequest {
            replication_id: RID.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pts.rolled_back_to, "p2");
    let e = admin
        .rollback(RollbackRequest {
            replication_id: RID.into(),
            point: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let mut g2 = history(21);
    g2.random_ops(3);
    let (tx, rx) = mpsc::channel(4);
    tx.send(ApplyRequest {
        msg: Some(apply_request::Msg::Hello(info())),
    })
    .await
    .unwrap();
    tx.send(ApplyRequest {
        msg: Some(apply_request::Msg::Frame(
            g2.frame_bytes(n + 1, g2.seq()).into(),
        )),
    })
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
    _keep
        .send(ApplyRequest {
            msg: Some(apply_request::Msg::Hello(info())),
        })
        .await
        .unwrap();
    let mut resp = ps
        .apply(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.message().await.unwrap().is_some());
    stop_tx.send(()).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(8), server)
        .await
        .expect("shutdown within 8 s")
        .unwrap();
    res.unwrap();
}
