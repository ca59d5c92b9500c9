//! One agent's stream end to end over mutual TLS: who may stream, acks,
//! deduplication, refusals, status, the chunk-hash proxy, an MT outage, a
//! PS restart, trimming, and ordered storage of frames prepared in parallel.

use super::support::*;
use rebound_common::frame::Frame;
use rebound_proto::ChunkHashesRequest;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_forward_restart_over_mtls() {
    let lab = Lab::new();
    let agent1 = lab.tls("agent-m1");
    let admin = lab.tls("admin");
    let agent2 = lab.tls("agent-m2");
    let mt_tls = lab.tls("mt");
    let (mt, mt_addr, mt_task) = spawn_mt(&mt_tls).await;
    let config = lab.ps_config(mt_addr, 1 << 30, 1);
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
    let e = open_stream(&mt_tls, ps.addr, info("r1", "m1"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Stream 40 records in 10 frames; all are acked and applied in order.
    let mut s = ps.stream(&agent1, "r1", "m1").await;
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
    let s = ps.stream(&agent1, "r1", "m1").await;
    assert_eq!(s.resume, 42);
    let mut bad = frame("r1", 43, 1);
    bad[0] = b'X';
    s.send(bad).await;
    let mut s = s;
    let e = s.error().await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("r1"), "{e:?}");
    // So is a frame whose body does not match its hash.
    let s = ps.stream(&agent1, "r1", "m1").await;
    let mut bad = frame("r1", 43, 1);
    let n = bad.len();
    bad[n - 100] ^= 1;
    s.send(bad).await;
    let mut s = s;
    assert_eq!(s.error().await.code(), Code::InvalidArgument);

    // Status: for an operator, not for an agent.
    let e = client(&agent1, ps.addr)
        .await
        .status(rebound_proto::PsStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let st = ps.status(&admin).await;
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
        point_id: String::new(),
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
    assert!(e.message().contains("belongs to machine \"m1\""), "{e:?}");
    // Only the protocol's chunk sizes: a 1-byte chunk would give away a
    // byte of the replica per hash.
    let e = client(&agent1, ps.addr)
        .await
        .chunk_hashes(ChunkHashesRequest {
            chunk_size: 1,
            ..req.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("chunk size of 1 bytes"), "{e:?}");

    // The MT goes away: frames are still cached and acked, then forwarded
    // once it is back.
    mt_task.stop().await;
    let mut s = ps.stream(&agent1, "r1", "m1").await;
    for i in 0..5 {
        s.send(frame("r1", 43 + i * 2, 2)).await;
    }
    s.wait_durable(52).await.unwrap();
    let st = ps.status(&admin).await;
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
    let s = ps.stream(&agent1, "r1", "m1").await;
    assert_eq!(s.resume, 52);
    drop(s);
    let mt_task = start_mt_at(&mt, &mt_tls, mt_addr).await;
    wait_for("MT applied 52 after coming back", || mt.applied("r1") == 52).await;
    assert_eq!(mt.state.lock().unwrap().records["r1"].len(), 52);
    // Applied segments are trimmed.
    let t0 = Instant::now();
    loop {
        let st = ps.status(&admin).await;
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
    let mut s = ps.stream(&agent1, "r1", "m1").await;
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
    assert_eq!(ps.status(&admin).await.replications[0].durable_seq, 60);
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
    let s = ps.stream(&agent1, "r1", "m1").await;
    assert_eq!(s.resume, 60);
    drop(s);
    ps.stop().await;
    mt_task.stop().await;
}

/// An empty cache (a new PS, or one whose cache was lost) never resumes an
/// agent below the MT's applied seq: while the MT cannot be asked, the
/// hello is refused and the agent retries; once it answers, the stream
/// resumes after its applied seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_cache_resumes_after_the_mt_applied_seq_only() {
    let lab = Lab::new();
    let agent1 = lab.tls("agent-m1");
    let mt = FakeMt::default();
    {
        let mut st = mt.state.lock().unwrap();
        st.applied.insert("r1".into(), 100);
        st.records.insert(
            "r1".into(),
            vec![rebound_common::frame::Record::ResyncEnd; 100],
        );
    }
    // The MT's address, with nothing listening yet.
    let mt_addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let ps = start_ps(lab.ps_config(mt_addr, 1 << 30, 1)).await;

    let e = open_stream(&agent1, ps.addr, info("r1", "m1"))
        .await
        .err()
        .expect("an empty cache must not answer without the MT");
    assert_status(&e, Code::Unavailable, &["r1", "applied seq", "retries"]);
    mt_returns_and_r1_resumes_after(&lab, ps, &mt, mt_addr, 100).await;
}

/// Frames whose seq range cannot hold are refused at the PS before they
/// enter the cache, each with a message naming the replication, the stream
/// position and the seqs; the durable seq does not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_with_impossible_seq_ranges_never_enter_the_cache() {
    let lab = Lab::new();
    let agent1 = lab.tls("agent-m1");
    let mt_tls = lab.tls("mt");
    let (_mt, mt_addr, mt_task) = spawn_mt(&mt_tls).await;
    let ps = start_ps(lab.ps_config(mt_addr, 1 << 30, 1)).await;
    let mut s = ps.stream(&agent1, "r1", "m1").await;
    s.send(frame("r1", 1, 4)).await;
    s.wait_durable(4).await.unwrap();
    drop(s);

    let ranged = |first: u64, n: u64, from: u64, to: u64| {
        let mut f = Frame::parse(&frame("r1", first, n)).unwrap();
        f.header.first_seq = from;
        f.header.last_seq = to;
        f.to_bytes()
    };
    let cases: Vec<(&str, Vec<u8>, Code, &str)> = vec![
        (
            "up to u64::MAX",
            ranged(5, 1, 5, u64::MAX),
            Code::InvalidArgument,
            "u64::MAX",
        ),
        (
            "three seqs, one record",
            ranged(5, 1, 5, 7),
            Code::InvalidArgument,
            "holds 1 records",
        ),
        (
            "one seq, two records",
            ranged(5, 2, 5, 5),
            Code::InvalidArgument,
            "holds 2 records",
        ),
        (
            "seq 0",
            ranged(1, 1, 0, 0),
            Code::InvalidArgument,
            "seqs start at 1",
        ),
        (
            "a gap",
            frame("r1", 9, 1),
            Code::FailedPrecondition,
            "resend from seq 5",
        ),
    ];
    for (what, bytes, code, says) in cases {
        let mut s = ps.stream(&agent1, "r1", "m1").await;
        assert_eq!(s.resume, 4, "{what}");
        s.send(bytes).await;
        let e = s.error().await;
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(
            e.message().contains("r1")
                && e.message().contains("stream position 1")
                && e.message().contains(says),
            "{what}: {e:?}"
        );
    }
    // Nothing moved, and the stream goes on from where it was.
    let mut s = ps.stream(&agent1, "r1", "m1").await;
    assert_eq!(s.resume, 4);
    s.send(frame("r1", 5, 2)).await;
    s.wait_durable(6).await.unwrap();
    drop(s);
    ps.stop().await;
    mt_task.stop().await;
}
