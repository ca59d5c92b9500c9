//! Bad input gets a clear error and loses nothing: malformed NBD requests
//! on the agent's export, a frame with a wrong hash at the master target,
//! and certificates from another CA or of the wrong role.

use rebound_common::frame::{FrameBuilder, Record};
use rebound_common::tls::TlsFiles;
use rebound_lab::*;
use rebound_proto::{
    apply_request, ingest_request, ApplyRequest, DiskInfo, IngestRequest, ReplicationInfo,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
const NBD_REPLY_MAGIC: u32 = 0x6744_6698;

fn nbd_connect(addr: SocketAddr, export: &str) -> (TcpStream, u64) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&1u32.to_be_bytes()); // EXPORT_NAME
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    s.write_all(&opt).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    (s, u64::from_be_bytes(info[..8].try_into().unwrap()))
}

fn nbd_request(
    s: &mut TcpStream,
    kind: u16,
    handle: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) -> (u32, Vec<u8>) {
    let mut req = Vec::new();
    req.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&kind.to_be_bytes());
    req.extend_from_slice(&handle.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    req.extend_from_slice(payload);
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_be_bytes(reply[..4].try_into().unwrap()),
        NBD_REPLY_MAGIC
    );
    let err = u32::from_be_bytes(reply[4..8].try_into().unwrap());
    assert_eq!(
        u64::from_be_bytes(reply[8..].try_into().unwrap()),
        handle,
        "reply handle"
    );
    let mut data = Vec::new();
    if kind == 0 && err == 0 {
        data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
    }
    (err, data)
}

#[test]
fn malformed_nbd_requests_get_errors_and_the_connection_keeps_working() {
    let lab = Lab::started(LabOptions::default()).unwrap();
    qemu_io(&lab.agent_uri("disk0"), &["write -P 0x42 0 4096".into()]).unwrap();
    let (mut s, size) = nbd_connect(lab.agent_nbd, "disk0");
    assert_eq!(size, 64 << 20);
    // Read past the end → EINVAL.
    assert_eq!(nbd_request(&mut s, 0, 1, size, 4096, &[]).0, 22);
    // Write past the end → ENOSPC (payload consumed, stream stays in sync).
    assert_eq!(
        nbd_request(&mut s, 1, 2, size - 512, 4096, &[7u8; 4096]).0,
        28
    );
    // Unknown command → EINVAL.
    assert_eq!(nbd_request(&mut s, 77, 3, 0, 0, &[]).0, 22);
    // A valid read on the same connection returns the data.
    let (err, data) = nbd_request(&mut s, 0, 4, 0, 4096, &[]);
    assert_eq!(err, 0);
    assert!(data.iter().all(|&b| b == 0x42));
    // Nothing of the refused write reached the disk.
    let (_, tail) = nbd_request(&mut s, 0, 5, size - 512, 512, &[]);
    assert!(tail.iter().all(|&b| b == 0));
}

/// The hello of the lab's agent (its replication, machine and disk).
pub(crate) fn info(lab: &Lab) -> ReplicationInfo {
    ReplicationInfo {
        replication_id: lab.opts.machine.clone(),
        machine_id: lab.opts.machine.clone(),
        disks: vec![DiskInfo {
            index: 0,
            name: "disk0".into(),
            size: 64 << 20,
        }],
    }
}

#[test]
fn frame_with_wrong_hash_is_refused_and_nothing_applied() {
    let mut lab = Lab::new(LabOptions::default()).unwrap();
    lab.start(Component::Mt).unwrap();
    let mut mt = lab
        .mt_client_as(&TlsFiles::in_dir(&lab.certs, "ps"))
        .unwrap();
    let mut b = FrameBuilder::new(&lab.opts.machine, 1);
    b.push(&Record::Write {
        disk: 0,
        offset: 0,
        data: vec![0xee; 65536].into(),
    });
    let mut bytes = b.finish().to_bytes();
    let n = bytes.len();
    bytes[n - 100] ^= 0x01; // corrupt the body
    let reqs = vec![
        ApplyRequest {
            msg: Some(apply_request::Msg::Hello(info(&lab))),
        },
        ApplyRequest {
            msg: Some(apply_request::Msg::Frame(bytes.into())),
        },
    ];
    let res = lab.block_on(async {
        let mut stream = mt.apply(tokio_stream::iter(reqs)).await?.into_inner();
        let mut answers = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(m)) => answers.push(m),
                Ok(None) => return Ok::<_, tonic::Status>(answers),
                Err(e) => return Err(e),
            }
        }
    });
    let err = res.expect_err("the MT must refuse a frame whose hash does not match");
    assert!(
        err.message().contains("hash"),
        "error should name the hash mismatch: {err:?}"
    );
    let (_, applied) = lab.points().unwrap();
    assert_eq!(applied, 0, "nothing of the corrupt frame may be applied");
    let replica = std::fs::read(lab.replica_path("disk0")).unwrap_or_default();
    assert!(
        replica.iter().all(|&b| b == 0),
        "replica was written by a refused frame"
    );
}

/// The first answer of a streaming call, or the error that ended it.
async fn first_answer<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>>,
) -> Result<Option<T>, tonic::Status> {
    call.await?.into_inner().message().await
}

#[test]
fn wrong_certificates_are_refused() {
    let mut lab = Lab::new(LabOptions::default()).unwrap();
    lab.start(Component::Mt).unwrap();
    lab.start(Component::Ps).unwrap();
    // A client certificate from another CA: refused at the handshake.
    let other = TlsFiles {
        ca: lab.certs.join("ca.pem"),
        ..TlsFiles::in_dir(&lab.path("other-ca"), "admin")
    };
    let refused = lab.mt_client_as(&other).and_then(|mut c| {
        lab.block_on(c.replications(rebound_proto::ReplicationsRequest {}))
            .map_err(anyhow::Error::from)
    });
    assert!(
        refused.is_err(),
        "a certificate from another CA must be refused"
    );

    // An agent certificate may not call the MT's apply stream.
    let mut as_agent = lab
        .mt_client_as(&TlsFiles::in_dir(
            &lab.certs,
            &format!("agent-{}", lab.opts.machine),
        ))
        .unwrap();
    let reqs = vec![ApplyRequest {
        msg: Some(apply_request::Msg::Hello(info(&lab))),
    }];
    let err = lab
        .block_on(first_answer(as_agent.apply(tokio_stream::iter(reqs))))
        .expect_err("agent certificate must not apply");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // An agent may stream only for its own machine.
    let mut ps = crate::bad_frames::ps_as_agent(&lab);
    let mut other_machine = info(&lab);
    other_machine.machine_id = "m2".into();
    other_machine.replication_id = "m2".into();
    let reqs = vec![IngestRequest {
        msg: Some(ingest_request::Msg::Hello(other_machine)),
    }];
    let err = lab
        .block_on(first_answer(ps.ingest(tokio_stream::iter(reqs))))
        .expect_err("agent of m1 must not stream for m2");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
}
