//! The shared cache cap is shared fairly: a replication whose master target
//! is unreachable stops at its share of the cap, so the other replications
//! on the process server go on.

use super::support::*;
use crate::cache::Cache;
use crate::control::add_replication;
use crate::forward::{Forwarders, MtLink};
use rebound_proto::control::AddReplication;
use rebound_proto::{ingest_response, IngestResponse};
use std::sync::Arc;
use std::time::Duration;

/// 16 frames of ~256 KiB (four 64 KiB writes, stored raw).
const CAP: u64 = 4 << 20;

/// Routes replication `rid` of `machine` to the MT at `mt` as the CS's
/// AddReplication does, before the PS starts.
async fn route(lab: &Lab, rid: &str, machine: &str, mt: &str, default_mt: &str) {
    let cache_dir = lab.dir.path().join("cache");
    let fw = Forwarders::new(Arc::new(MtLink::new(
        lab.tls("ps"),
        default_mt.to_string(),
        "localhost".into(),
    )));
    let add = AddReplication {
        replication_id: rid.into(),
        machine_id: machine.into(),
        mt_address: mt.into(),
        mt_server_name: "localhost".into(),
    };
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _rt = handle.enter();
        let cache = Cache::open(&cache_dir, CAP).unwrap();
        add_replication(&cache, &fw, &add).unwrap();
        fw.shutdown();
        cache.shutdown();
    })
    .await
    .unwrap();
}

/// The highest durable seq acknowledged on `s` until it is quiet for 1 s.
async fn acked_until_quiet(s: &mut AgentStream, mut max: u64) -> u64 {
    while let Ok(m) = tokio::time::timeout(Duration::from_secs(1), s.rx.message()).await {
        if let Some(IngestResponse {
            msg: Some(ingest_response::Msg::DurableSeq(d)),
        }) = m.unwrap()
        {
            max = max.max(d);
        }
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_replication_cannot_pause_the_others() {
    let lab = Lab::new();
    let admin = lab.tls("admin");
    let (mt, mt_addr, mt_run) = spawn_mt(&lab.tls("mt")).await;
    // r1 has a master target of its own, which goes down once r1's agent
    // has connected (the PS learnt its applied seq).
    let (_, r1_mt_addr, r1_mt_run) = spawn_mt(&lab.tls("mt")).await;
    route(
        &lab,
        "r1",
        "m1",
        &r1_mt_addr.to_string(),
        &mt_addr.to_string(),
    )
    .await;
    let ps = start_ps(lab.ps_config(mt_addr, CAP, 0)).await;
    let mut s1 = ps.stream(&lab.tls("agent-m1"), "r1", "m1").await;
    let mut s2 = ps.stream(&lab.tls("agent-m2"), "r2", "m2").await;
    r1_mt_run.stop().await;

    // r1 offers more than the whole cap; nothing of it can be applied.
    for i in 0..20 {
        s1.send(frame("r1", 1 + i * 4, 4)).await;
    }
    let stuck = acked_until_quiet(&mut s1, 0).await;
    assert!(stuck >= 4, "r1 got nothing acknowledged");
    let st = ps.status(&admin).await;
    let r1 = st
        .replications
        .iter()
        .find(|r| r.replication_id == "r1")
        .unwrap();
    assert!(
        r1.cache_bytes <= CAP / 2 + (300 << 10),
        "the stuck replication holds {} of the {} bytes cap, more than its share: {st:?}",
        r1.cache_bytes,
        CAP
    );

    // r2 streams twice the cap and gets every frame acknowledged and applied.
    for i in 0..32 {
        s2.send(frame("r2", 1 + i * 4, 4)).await;
        s2.wait_durable(4 * (i + 1)).await.unwrap();
    }
    wait_for("MT applied r2", || mt.applied("r2") == 128).await;
    // r1 is still held at its share.
    assert_eq!(acked_until_quiet(&mut s1, stuck).await, stuck);
    drop((s1, s2));
    ps.stop().await;
    mt_run.stop().await;
}
