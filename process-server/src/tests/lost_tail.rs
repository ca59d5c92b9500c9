//! A cache that lost records the master target already applied (a torn or
//! lost segment tail) must not resume an agent below the MT's applied seq,
//! even while the MT is silent; and a stream that did resume below it ends
//! when the cache learns the MT's seq and skips ahead, instead of having
//! the agent's frames acknowledged as duplicates.

use super::support::*;
use std::path::{Path, PathBuf};
use tonic::Code;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn segments(lab: &Lab) -> PathBuf {
    lab.dir.path().join("cache").join("r1").join("segments")
}

/// Cache durable 5 (records 1..=5) while the MT applied 10: returns the
/// lab, the MT (down) and its address.
async fn cache_behind_mt() -> (Lab, FakeMt, std::net::SocketAddr) {
    let lab = Lab::new();
    let agent1 = lab.tls("agent-m1");
    let mt_tls = lab.tls("mt");
    let (mt, mt_addr, mt_run) = spawn_mt(&mt_tls).await;
    let ps = start_ps(lab.ps_config(mt_addr, 1 << 30, 1)).await;
    let mut s = ps.stream(&agent1, "r1", "m1").await;
    assert_eq!(s.resume, 0);
    // The MT goes down, so 1..=5 stay in the cache.
    mt_run.stop().await;
    for seq in 1..=5 {
        s.send(frame("r1", seq, 1)).await;
    }
    s.wait_durable(5).await.unwrap();
    drop(s);
    ps.stop().await;
    let snapshot = lab.dir.path().join("snapshot");
    copy_dir(&segments(&lab), &snapshot);

    // The MT comes back and applies 1..=10.
    let mt_run = start_mt_at(&mt, &mt_tls, mt_addr).await;
    let ps = start_ps(lab.ps_config(mt_addr, 1 << 30, 1)).await;
    let mut s = ps.stream(&agent1, "r1", "m1").await;
    assert_eq!(s.resume, 5);
    for seq in 6..=10 {
        s.send(frame("r1", seq, 1)).await;
    }
    s.wait_durable(10).await.unwrap();
    wait_for("MT applied 10", || mt.applied("r1") == 10).await;
    // Applied segments trimmed: the applied seq was stored first.
    wait_for("segments 1..=10 trimmed", || {
        std::fs::read_dir(segments(&lab)).unwrap().count() == 1
    })
    .await;
    drop(s);
    ps.stop().await;
    mt_run.stop().await;

    // The cache loses its tail: back to durable 5.
    std::fs::remove_dir_all(segments(&lab)).unwrap();
    copy_dir(&snapshot, &segments(&lab));
    (lab, mt, mt_addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_behind_the_mt_is_refused_while_the_mt_is_silent() {
    let (lab, mt, mt_addr) = cache_behind_mt().await;
    let agent1 = lab.tls("agent-m1");
    let ps = start_ps(lab.ps_config(mt_addr, 1 << 30, 1)).await;
    let e = open_stream(&agent1, ps.addr, info("r1", "m1"))
        .await
        .err()
        .expect("a cache below the MT's applied seq must not answer while the MT is silent");
    assert_status(
        &e,
        Code::Unavailable,
        &["r1", "durable seq 5", "applied seq 10", "retries"],
    );
    // The MT returns: the agent resumes after its seq, and new records
    // reach it.
    mt_returns_and_r1_resumes_after(&lab, ps, &mt, mt_addr, 10).await;
}

/// Without the stored applied seq (a crash before it was written), the
/// hello answers the cache's seq; when the MT then reports more, the
/// stream ends instead of acknowledging the agent's frames as duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumed_below_the_mt_ends_when_the_cache_skips_ahead() {
    let (lab, mt, mt_addr) = cache_behind_mt().await;
    std::fs::remove_file(lab.dir.path().join("cache").join("r1").join("applied.seq")).unwrap();
    let agent1 = lab.tls("agent-m1");
    let ps = start_ps(lab.ps_config(mt_addr, 1 << 30, 1)).await;
    let mut s = ps.stream(&agent1, "r1", "m1").await;
    assert_eq!(s.resume, 5);
    let hellos = mt.state.lock().unwrap().hellos;
    let mt_run = start_mt_at(&mt, &lab.tls("mt"), mt_addr).await;
    wait_for("the forwarder's hello at the MT", || {
        mt.state.lock().unwrap().hellos > hellos
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Seqs 6..=10 of this agent are not the ones the MT applied: they must
    // not be acknowledged (the stream may have ended already).
    s.offer(frame("r1", 6, 5)).await;
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), s.rx.message())
        .await
        .expect("an answer in time");
    let e = match answer {
        Ok(Some(m)) => panic!("the stream must end, not answer {m:?}"),
        Ok(None) => panic!("the stream ended without an error"),
        Err(e) => e,
    };
    assert_status(
        &e,
        Code::Unavailable,
        &["r1", "applied up to seq 10", "seq 5", "reconnects"],
    );
    let s = ps.stream(&agent1, "r1", "m1").await;
    assert_eq!(s.resume, 10);
    drop(s);
    ps.stop().await;
    mt_run.stop().await;
}
