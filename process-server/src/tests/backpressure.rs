//! The cache cap seen from an agent: past the cap nothing is read or
//! acknowledged until the master target applies and the cache trims.

use super::support::*;
use rebound_proto::{ingest_response, IngestResponse};
use std::time::Duration;
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_stops_acks_until_trimmed() {
    let lab = Lab::new();
    let agent1 = lab.tls("agent-m1");
    let admin = lab.tls("admin");
    let mt_tls = lab.tls("mt");
    // Reserve an MT address; the MT runs only for the hello, then later.
    let mt_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mt_addr = mt_listener.local_addr().unwrap();
    drop(mt_listener);
    let config = lab.ps_config(mt_addr, 1 << 20, 0);
    let ps = start_ps(config).await;
    // An empty cache resumes an agent only after the MT's applied seq:
    // the MT answers the hello, then goes away before any frame.
    let mt = FakeMt::default();
    let mt_task = start_mt_at(&mt, &mt_tls, mt_addr).await;
    let mut s = ps.stream(&agent1, "r1", "m1").await;
    mt_task.stop().await;
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
    let st = ps.status(&admin).await;
    assert!(st.cache_bytes >= st.cache_limit, "{st:?}");
    assert_eq!(st.replications[0].durable_seq, 16);

    // The MT is back: applied segments are trimmed and the stream resumes.
    let mt_task = start_mt_at(&mt, &mt_tls, mt_addr).await;
    s.wait_durable(48).await.unwrap();
    wait_for("MT applied 48", || mt.applied("r1") == 48).await;
    drop(s);
    ps.stop().await;
    mt_task.stop().await;
}
