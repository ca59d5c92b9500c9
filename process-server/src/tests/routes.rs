//! Per-replication routes from the configuration server: AddReplication
//! and RemoveReplication, and a restarted PS that keeps the routes.

use super::support::*;
use std::sync::Arc;

/// The CS's AddReplication of r1 (machine m1) to the MT at `mt`.
fn add_r1(mt: &str) -> rebound_proto::control::AddReplication {
    rebound_proto::control::AddReplication {
        replication_id: "r1".into(),
        machine_id: "m1".into(),
        mt_address: mt.into(),
        mt_server_name: "localhost".into(),
    }
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

    let lab = Lab::new();
    let mt_tls = lab.tls("mt");
    let ps_tls = lab.tls("ps");
    let (mt1, a1, run1) = spawn_mt(&mt_tls).await;
    let (mt2, a2, run2) = spawn_mt(&mt_tls).await;
    let cache_dir = lab.dir.path().join("cache");

    // The CS adds r1 with MT 2 (while the PS's default is MT 1).
    {
        let cache = Cache::open(&cache_dir, 1 << 30).unwrap();
        let fw = Forwarders::new(Arc::new(MtLink::new(
            ps_tls.clone(),
            a1.to_string(),
            "localhost".into(),
        )));
        let add = add_r1(&a2.to_string());
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
    let config = lab.ps_config(a1, 1 << 30, 1);
    let ps = start_ps(config).await;
    let agent1 = lab.tls("agent-m1");
    let agent2 = lab.tls("agent-m2");
    let mut s1 = ps.stream(&agent1, "r1", "m1").await;
    let mut s2 = ps.stream(&agent2, "r2", "m2").await;
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
        add_replication(&cache, &fw, &add_r1(&a2s)).unwrap();
        assert_eq!(fw.link_for("r1").addr(), a2s);
        remove_replication(&cache, &fw, "r1").unwrap();
        remove_replication(&cache, &fw, "r1").unwrap();
        assert!(cache.get("r1").is_none());
        assert!(!cache_dir.join("r1").exists());
        // Its route is forgotten too.
        assert_eq!(fw.link_for("r1").addr(), a1.to_string());
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
        assert!(e.to_string().contains("m2"), "{e}");
        fw.shutdown();
        cache.shutdown();
    })
    .await
    .unwrap();
    run1.stop().await;
    run2.stop().await;
}
