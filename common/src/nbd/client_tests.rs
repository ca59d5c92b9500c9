//! The NBD client against the project's own NBD server (real sockets, real
//! bytes), plus a scripted server for the replies a correct server never
//! sends (a wrong cookie, no NBD_OPT_GO).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use super::client::{ClientError, Endpoint, NbdClient};
use super::proto::*;
use super::testutil::{FailingDevice, MemDevice, Rng, TestServer};
use super::{serve_unix, BlockDevice, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE};

fn connect(server: &TestServer, export: &str) -> NbdClient {
    NbdClient::connect_uri(&server.uri(export))
        .unwrap_or_else(|e| panic!("connecting to {export}: {e}"))
}

#[test]
fn write_then_read_back_is_byte_exact() {
    let dev = MemDevice::new(16 << 20, false);
    let server = TestServer::start(vec![("disk0", dev.clone() as Arc<dyn BlockDevice>)]);
    let mut c = connect(&server, "disk0");
    assert_eq!(c.size(), 16 << 20);
    assert!(!c.read_only());
    let b = c.block_sizes();
    assert_eq!(
        (b.minimum, b.preferred, b.max_payload),
        (MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_BLOCK_SIZE)
    );

    let mut data = vec![0u8; 5 << 20];
    Rng(7).fill(&mut data);
    c.write_at(4096, &data, true).unwrap();
    assert!(dev.fua_writes.load(Ordering::SeqCst) >= 1);
    let mut back = vec![0u8; data.len()];
    c.read_at(4096, &mut back).unwrap();
    assert_eq!(blake3::hash(&back), blake3::hash(&data));
    assert_eq!(&dev.contents()[4096..4096 + data.len()], &data[..]);

    c.flush().unwrap();
    assert_eq!(dev.flushes.load(Ordering::SeqCst), 1);
    c.write_zeroes(4096, 1 << 20, false).unwrap();
    assert!(dev.contents()[4096..4096 + (1 << 20)]
        .iter()
        .all(|&x| x == 0));
    c.trim(8192, 4096).unwrap();
    assert_eq!(*dev.trims.lock().unwrap(), vec![(8192, 4096)]);
    c.disconnect().unwrap();
}

#[test]
fn the_whole_export_reads_in_chunks() {
    // Larger than the server's maximum payload, so one read_at is split.
    let size = MAX_BLOCK_SIZE as usize + (8 << 20);
    let dev = MemDevice::new(size, true);
    let mut pattern = vec![0u8; size];
    Rng(11).fill(&mut pattern);
    dev.fill(0, &pattern);
    let server = TestServer::start(vec![("view", dev.clone() as Arc<dyn BlockDevice>)]);
    let mut c = connect(&server, "view");
    assert!(c.read_only());

    let mut all = vec![0u8; size];
    c.read_at(0, &mut all).unwrap();
    assert_eq!(blake3::hash(&all), blake3::hash(&pattern));

    // And in the caller's own chunks, with a short last one.
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 3 << 20];
    let mut off = 0u64;
    while off < c.size() {
        let n = (c.size() - off).min(buf.len() as u64) as usize;
        c.read_at(off, &mut buf[..n]).unwrap();
        h.update(&buf[..n]);
        off += n as u64;
    }
    assert_eq!(h.finalize(), blake3::hash(&pattern));

    let e = c.write_at(0, &[1u8; 512], false).unwrap_err();
    assert!(matches!(e, ClientError::Unsupported { .. }), "{e}");
}

#[test]
fn out_of_range_and_misaligned_requests_name_the_offset() {
    let dev = MemDevice::new(1 << 20, false);
    let server = TestServer::start(vec![("disk0", dev as Arc<dyn BlockDevice>)]);
    let mut c = connect(&server, "disk0");
    let mut buf = vec![0u8; 4096];
    let e = c.read_at((1 << 20) - 512, &mut buf).unwrap_err();
    assert!(matches!(e, ClientError::OutOfRange { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("1048064") && msg.contains("disk0"), "{msg}");
    let e = c.read_at(u64::MAX - 10, &mut buf).unwrap_err();
    assert!(matches!(e, ClientError::OutOfRange { .. }), "{e}");

    let e = c.write_at(100, &buf, false).unwrap_err();
    assert!(matches!(e, ClientError::Misaligned { .. }), "{e}");
    assert!(e.to_string().contains("offset 100"), "{e}");

    // The connection is still good after refused requests.
    c.read_at(0, &mut buf).unwrap();
}

#[test]
fn a_server_error_names_the_request_and_keeps_the_connection() {
    let dev = Arc::new(FailingDevice { errno: EIO });
    let server = TestServer::start(vec![("bad", dev as Arc<dyn BlockDevice>)]);
    let mut c = connect(&server, "bad");
    let mut buf = vec![0u8; 4096];
    for _ in 0..2 {
        let e = c.read_at(8192, &mut buf).unwrap_err();
        match &e {
            ClientError::Server {
                export,
                offset,
                len,
                errno,
                ..
            } => assert_eq!(
                (export.as_str(), *offset, *len, *errno),
                ("bad", 8192, 4096, EIO)
            ),
            other => panic!("expected a server error, got {other}"),
        }
        assert!(e.to_string().contains("EIO"), "{e}");
    }
    let e = c.write_at(0, &buf, false).unwrap_err();
    assert!(matches!(e, ClientError::Server { errno: EIO, .. }), "{e}");
}

#[test]
fn an_unknown_export_is_refused_by_name() {
    let dev = MemDevice::new(1 << 20, false);
    let server = TestServer::start(vec![("disk0", dev as Arc<dyn BlockDevice>)]);
    let e = NbdClient::connect_uri(&server.uri("nope")).err().unwrap();
    assert!(matches!(e, ClientError::Refused { .. }), "{e}");
    assert!(e.to_string().contains("\"nope\""), "{e}");
    let e = NbdClient::connect_uri(&server.uri("forbidden"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("POLICY"), "{e}");
}

#[test]
fn connects_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let dev = MemDevice::new(1 << 20, false);
    let registry = Arc::new(super::testutil::MapRegistry {
        exports: vec![("m/d@7".to_string(), dev.clone() as Arc<dyn BlockDevice>)],
    });
    let shutdown = Arc::new(AtomicBool::new(false));
    let h = serve_unix(
        UnixListener::bind(&sock).unwrap(),
        registry,
        shutdown.clone(),
    );
    let uri = format!("nbd+unix:///m/d@7?socket={}", sock.display());
    let mut c = NbdClient::connect_uri(&uri).unwrap();
    c.write_at(512, &[9u8; 1024], false).unwrap();
    let mut back = [0u8; 1024];
    c.read_at(512, &mut back).unwrap();
    assert_eq!(back, [9u8; 1024]);
    drop(c);
    shutdown.store(true, Ordering::SeqCst);
    h.join().unwrap();
}

#[test]
fn uris_split_into_endpoint_and_export() {
    let p = |u| Endpoint::parse_uri(u).unwrap();
    assert_eq!(
        p("nbd://127.0.0.1:4000/m/d@p1"),
        (Endpoint::Tcp("127.0.0.1:4000".into()), "m/d@p1".into())
    );
    assert_eq!(
        p("nbd://host"),
        (Endpoint::Tcp("host:10809".into()), String::new())
    );
    assert_eq!(
        p("nbd://[::1]/x"),
        (Endpoint::Tcp("[::1]:10809".into()), "x".into())
    );
    assert_eq!(
        p("nbd+unix:///e?socket=/run/a.sock"),
        (Endpoint::Unix("/run/a.sock".into()), "e".into())
    );
    assert_eq!(
        p("nbds://127.0.0.1:4000/m/d@p1?tls-certificates=/etc/c"),
        (
            Endpoint::Tls {
                addr: "127.0.0.1:4000".into(),
                certificates: "/etc/c".into()
            },
            "m/d@p1".into()
        )
    );
    for bad in [
        "http://x/y",
        "nbd:///e",
        "nbd+unix:///e",
        "nbds://h/e",
        "nbds://h/e?tls-certificates=",
        "nbds:///e?tls-certificates=/c",
    ] {
        assert!(
            matches!(
                Endpoint::parse_uri(bad),
                Err(ClientError::InvalidUri { .. })
            ),
            "{bad}"
        );
    }
}

/// A scripted server: greets, answers GO (or refuses it as unsupported and
/// takes EXPORT_NAME), then answers one READ with the cookie plus `skew`.
fn scripted(go: bool, skew: u64) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut w = Vec::new();
        w.extend_from_slice(&NBDMAGIC.to_be_bytes());
        w.extend_from_slice(&IHAVEOPT.to_be_bytes());
        w.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&w).unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        let size = 1u64 << 20;
        let flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH;
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).unwrap();
            let reply = |kind: u32, d: &[u8]| {
                let mut r = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
                r.extend_from_slice(&opt.to_be_bytes());
                r.extend_from_slice(&kind.to_be_bytes());
                r.extend_from_slice(&(d.len() as u32).to_be_bytes());
                r.extend_from_slice(d);
                r
            };
            let mut export = INFO_EXPORT.to_be_bytes().to_vec();
            export.extend_from_slice(&size.to_be_bytes());
            export.extend_from_slice(&flags.to_be_bytes());
            match opt {
                OPT_GO if go => {
                    s.write_all(&reply(REP_INFO, &export)).unwrap();
                    s.write_all(&reply(REP_ACK, &[])).unwrap();
                    break;
                }
                OPT_EXPORT_NAME => {
                    s.write_all(&export[2..]).unwrap();
                    break;
                }
                _ => s.write_all(&reply(REP_ERR_UNSUP, &[])).unwrap(),
            }
        }
        let mut req = [0u8; REQUEST_LEN];
        s.read_exact(&mut req).unwrap();
        let r = Request::decode(&req);
        s.write_all(&simple_reply(0, r.cookie.wrapping_add(skew)))
            .unwrap();
        s.write_all(&vec![0x5a; r.length as usize]).unwrap();
        let _ = s.read(&mut [0u8; 64]);
    });
    format!("nbd://{addr}/x")
}

#[test]
fn a_reply_with_another_cookie_breaks_the_connection() {
    let mut c = NbdClient::connect_uri(&scripted(true, 1)).unwrap();
    let mut buf = [0u8; 512];
    let e = c.read_at(0, &mut buf).unwrap_err();
    assert!(e.to_string().contains("cookie"), "{e}");
    let e = c.read_at(0, &mut buf).unwrap_err();
    assert!(matches!(e, ClientError::Broken { .. }), "{e}");
}

#[test]
fn falls_back_to_export_name_without_go() {
    let mut c = NbdClient::connect_uri(&scripted(false, 0)).unwrap();
    assert_eq!(c.size(), 1 << 20);
    assert_eq!(c.block_sizes().minimum, 1);
    let mut buf = [0u8; 100];
    c.read_at(3, &mut buf).unwrap();
    assert_eq!(buf, [0x5a; 100]);
    let e = c.trim(0, 512).unwrap_err();
    assert!(matches!(e, ClientError::Unsupported { .. }), "{e}");
}
