//! Who may use which replication at a managed PS (a CS configured): only
//! replications the CS routed here (AddReplication), only by their
//! machine's agent, with a bounded hello and the protocol's chunk sizes.

use super::support::*;
use rebound_proto::{ChunkHashesRequest, DiskInfo};
use std::sync::Arc;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_ps_takes_only_replications_the_cs_assigned_to_their_machine() {
    use crate::cache::Cache;
    use crate::control::add_replication;
    use crate::forward::{Forwarders, MtLink};

    let lab = Lab::new();
    let (mt, mt_addr, mt_task) = spawn_mt(&lab.tls("mt")).await;
    let cache_dir = lab.dir.path().join("cache");
    // The CS routed r1 (machine m1) here before the PS (re)started.
    {
        let cache = Cache::open(&cache_dir, 1 << 30).unwrap();
        let fw = Forwarders::new(Arc::new(MtLink::new(
            lab.tls("ps"),
            mt_addr.to_string(),
            "localhost".into(),
        )));
        let add = rebound_proto::control::AddReplication {
            replication_id: "r1".into(),
            machine_id: "m1".into(),
            mt_address: mt_addr.to_string(),
            mt_server_name: "localhost".into(),
        };
        add_replication(&cache, &fw, &add).unwrap();
        fw.shutdown();
        tokio::task::spawn_blocking(move || cache.shutdown())
            .await
            .unwrap();
    }
    let mut config = lab.ps_config(mt_addr, 1 << 30, 1);
    // A CS nobody answers at: the PS is managed all the same.
    config.cs.addr = "127.0.0.1:1".into();
    let ps = start_ps(config).await;
    let (agent1, agent2) = (lab.tls("agent-m1"), lab.tls("agent-m2"));

    // An id the CS did not assign: an agent cannot create a replication.
    let e = open_stream(&agent2, ps.addr, info("r9", "m2"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("agent:m2")
            && e.message().contains("did not assign")
            && e.message().contains("rebound protect m2"),
        "{e:?}"
    );
    // The assigned id is bound to its machine.
    let e = open_stream(&agent2, ps.addr, info("r1", "m2"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("belongs to machine \"m1\""), "{e:?}");
    // A hello with more disks than the cap.
    let mut many = info("r1", "m1");
    many.disks = (0..65)
        .map(|i| DiskInfo {
            index: i,
            name: format!("d{i}"),
            size: 1 << 20,
        })
        .collect();
    let e = open_stream(&agent1, ps.addr, many).await.err().unwrap();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("65 disks; at most 64"), "{e:?}");

    // Chunk hashes: not of an unassigned id, even with the agent's own info.
    let req = ChunkHashesRequest {
        replication_id: "r9".into(),
        disk: 0,
        offset: 0,
        chunk_size: 1 << 20,
        count: 1,
        min_applied_seq: 0,
        info: Some(info("r9", "m2")),
        point_id: String::new(),
    };
    let e = client(&agent2, ps.addr)
        .await
        .chunk_hashes(req)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("did not assign"), "{e:?}");

    // The machine's own agent streams as before.
    let mut s = ps.stream(&agent1, "r1", "m1").await;
    send_until_applied(&mut s, &mt, "r1", 4).await;
    drop(s);
    ps.stop().await;
    mt_task.stop().await;
}
