//! Trust model: authorisation on every RPC of the process server and the
//! master target, in a managed deployment (real binaries, a CS, two PSs at
//! the source site). An enrolled certificate gets only what its role and
//! id may: an agent only its own machine's replication, at the protocol's
//! chunk sizes, and never a replication id the CS did not assign; a PS
//! only the replications the CS assigned to it; the PS's status only an
//! operator.

use crate::lifecycle::protect;
use rebound_common::pki::Role;
use rebound_common::tls::TlsFiles;
use rebound_lab::*;
use rebound_proto::master_target_client::MasterTargetClient;
use rebound_proto::process_server_client::ProcessServerClient;
use rebound_proto::{
    apply_request, ingest_request, ApplyRequest, ChunkHashesRequest, DiskInfo, IngestRequest,
    PsStatusRequest, ReplicationInfo,
};
use std::net::SocketAddr;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A gRPC channel to `addr` with `tls`, checking the server's role.
async fn channel(tls: &TlsFiles, addr: SocketAddr, role: Role) -> Channel {
    rebound_common::tls::install_crypto_provider();
    let host = addr.ip().to_string();
    tls.connect(&addr.to_string(), &host, role)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {role:?} at {addr}: {e}"))
}

/// Asserts a refusal's code and that its message names every one of `words`.
fn refused(r: Result<impl std::fmt::Debug, Status>, code: Code, words: &[&str]) {
    let e = r.expect_err("refused");
    assert_eq!(e.code(), code, "{e:?}");
    for w in words {
        assert!(e.message().contains(w), "{w:?} not in {:?}", e.message());
    }
}

/// The hello an agent (or a PS on the apply stream) sends for `rid`: the
/// lab's disks, as every machine of it has.
fn info(rid: &str, machine: &str) -> ReplicationInfo {
    let disks = SitesOptions::default().disks.into_iter().enumerate();
    ReplicationInfo {
        replication_id: rid.into(),
        machine_id: machine.into(),
        disks: disks
            .map(|(i, (name, size))| DiskInfo {
                index: i as u32,
                name,
                size,
            })
            .collect(),
    }
}

/// The first answer of an ingest stream opened with `hello`.
async fn ingest(
    ps: &mut ProcessServerClient<Channel>,
    hello: ReplicationInfo,
) -> Result<(), Status> {
    let first = IngestRequest {
        msg: Some(ingest_request::Msg::Hello(hello)),
    };
    let mut rx = ps
        .ingest(tokio_stream::iter(vec![first]).chain(tokio_stream::pending()))
        .await?
        .into_inner();
    rx.message().await.map(|_| ())
}

/// The first answer of an apply stream opened with `hello`.
async fn apply(mt: &mut MasterTargetClient<Channel>, hello: ReplicationInfo) -> Result<(), Status> {
    let first = ApplyRequest {
        msg: Some(apply_request::Msg::Hello(hello)),
    };
    let mut rx = mt
        .apply(tokio_stream::iter(vec![first]).chain(tokio_stream::pending()))
        .await?
        .into_inner();
    rx.message().await.map(|_| ())
}

#[test]
fn every_ps_and_mt_rpc_checks_who_may_use_which_replication() {
    let s = Sites::start(SitesOptions {
        ps_per_site: 2,
        machines: vec!["m1".into(), "m2".into()],
        ..SitesOptions::default()
    })
    .expect("sites");
    protect(&s, "m1", "onprem", "azure");
    let rid = s.machine("m1").unwrap()["replication_id"]
        .as_str()
        .unwrap()
        .to_string();
    let ps_addr = s.sites["onprem"].ps[0].1;
    let mt_addr = s.sites["azure"].mt;
    let agent = |m: &str| TlsFiles::in_dir(&s.agent_certs(m), "agent");
    let other_ps = TlsFiles::in_dir(
        &s.path(&format!("onprem/{}-2/certs", ps_id("onprem"))),
        "ps",
    );
    let own_ps = TlsFiles::in_dir(&s.path(&format!("onprem/{}/certs", ps_id("onprem"))), "ps");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut m2 = ProcessServerClient::new(channel(&agent("m2"), ps_addr, Role::Ps).await);
        let mut m1 = ProcessServerClient::new(channel(&agent("m1"), ps_addr, Role::Ps).await);
        let hashes = |rid: &str, machine: &str, chunk_size: u32| ChunkHashesRequest {
            replication_id: rid.into(),
            disk: 0,
            offset: 0,
            chunk_size,
            count: 1,
            min_applied_seq: 0,
            info: Some(info(rid, machine)),
            point_id: String::new(),
        };

        // ChunkHashes for another machine's replication, with the caller's
        // own info or none: refused at the PS.
        let who = "agent:m2";
        refused(
            m2.chunk_hashes(hashes(&rid, "m2", 1 << 20)).await,
            Code::PermissionDenied,
            &[who, &rid, "belongs to machine \"m1\""],
        );
        refused(
            m2.chunk_hashes(ChunkHashesRequest {
                info: None,
                ..hashes(&rid, "m2", 1 << 20)
            })
            .await,
            Code::PermissionDenied,
            &[who, "belongs to machine \"m1\""],
        );
        // ... and at the MT, even from the replication's own PS.
        let mut mt_own = MasterTargetClient::new(channel(&own_ps, mt_addr, Role::Mt).await);
        refused(
            mt_own.chunk_hashes(hashes(&rid, "m2", 1 << 20)).await,
            Code::PermissionDenied,
            &[
                "belongs to machine m1",
                "only to the replication's own machine",
            ],
        );

        // A 1-byte chunk (one byte of the replica per hash), at both.
        let one_byte = [&rid, "chunk size of 1 bytes", "1048576 and 65536"];
        let r = m1.chunk_hashes(hashes(&rid, "m1", 1)).await;
        refused(r, Code::InvalidArgument, &one_byte);
        let r = mt_own.chunk_hashes(hashes(&rid, "m1", 1)).await;
        refused(r, Code::InvalidArgument, &one_byte);
        // The protocol's sizes still work for the machine's own agent.
        let ok = m1.chunk_hashes(hashes(&rid, "m1", 64 << 10)).await;
        assert_eq!(ok.expect("own chunk hashes").into_inner().hashes.len(), 32);

        // An agent cannot create a replication id: the CS assigns them.
        refused(
            ingest(&mut m2, info("m2-squatted", "m2")).await,
            Code::PermissionDenied,
            &[who, "m2-squatted", "did not assign", "rebound protect m2"],
        );
        // Nor use the id the CS assigned to another machine.
        refused(
            ingest(&mut m2, info(&rid, "m2")).await,
            Code::PermissionDenied,
            &[who, "belongs to machine \"m1\""],
        );

        // The PS's status is the operator's.
        refused(
            m1.status(PsStatusRequest {}).await,
            Code::PermissionDenied,
            &["agent:m1", "only admin/cs certificates may"],
        );

        // Apply at the MT from a PS the replication is not assigned to.
        let mut mt_other = MasterTargetClient::new(channel(&other_ps, mt_addr, Role::Mt).await);
        let other = format!("ps:{}-2", ps_id("onprem"));
        refused(
            apply(&mut mt_other, info(&rid, "m1")).await,
            Code::PermissionDenied,
            &[
                &other,
                &rid,
                &format!("assigned to process server {}", ps_id("onprem")),
            ],
        );
        // Nor may it create one the CS did not prepare.
        refused(
            apply(&mut mt_other, info("m9-made-up", "m9")).await,
            Code::PermissionDenied,
            &[&other, "m9-made-up", "did not prepare it"],
        );
    });
    // The refusals did not disturb the replication.
    let (_, seq) = s.tag("m1", "onprem", "app").expect("tag");
    s.wait_state("m1", "Protected", std::time::Duration::from_secs(30))
        .expect("still protected");
    assert!(seq > 0);
}
