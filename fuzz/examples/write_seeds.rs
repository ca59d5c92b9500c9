//! Writes the hand-made seed inputs of every target into
//! `fuzz/corpus/<target>/seed-*`: valid handshakes, frames, journals,
//! segments, catalogs, dirty logs and messages built with the real
//! encoders, so the fuzzer starts past the magic numbers and checksums.
//! Run once when a format changes, then fuzz and minimise:
//! `cargo run -p rebound-fuzz --example write_seeds`.

use std::path::Path;

use prost::Message;
use rebound_common::frame::{FrameBuilder, Record, Tag, TagKind};
use rebound_proto::control as pb;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed file");
    // A seed must pass its own target.
    rebound_fuzz::TARGETS
        .iter()
        .find(|(t, _)| *t == target)
        .expect("known target")
        .1(bytes);
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    cat(&[
        &0x4948_4156_454f_5054u64.to_be_bytes(),
        &opt.to_be_bytes(),
        &(data.len() as u32).to_be_bytes(),
        data,
    ])
}

fn request(cmd: u16, flags: u16, offset: u64, len: u32) -> Vec<u8> {
    cat(&[
        &0x2560_9513u32.to_be_bytes(),
        &flags.to_be_bytes(),
        &cmd.to_be_bytes(),
        &7u64.to_be_bytes(),
        &offset.to_be_bytes(),
        &len.to_be_bytes(),
    ])
}

fn records() -> Vec<Record> {
    vec![
        Record::ResyncBegin {
            disks: vec![0, 1],
            reason: "start".into(),
        },
        Record::Write {
            disk: 0,
            offset: 4096,
            data: vec![0xab; 4096].into(),
        },
        Record::Zero {
            disk: 1,
            offset: 0,
            len: 1 << 20,
        },
        Record::ResyncEnd,
        Record::Tag(Tag {
            id: "t1".into(),
            kind: TagKind::Crash,
            time_ms: 1_700_000_000_000,
            group: "g".into(),
        }),
    ]
}

fn frame_bytes(first: u64, recs: &[Record]) -> Vec<u8> {
    let mut b = FrameBuilder::new("rep-1", first);
    for r in recs {
        b.push(r);
    }
    b.finish().to_bytes()
}

fn main() {
    // NBD: a whole session, and one option of each kind.
    let go = cat(&[
        &4u32.to_be_bytes(),
        b"disk",
        &1u16.to_be_bytes(),
        &3u16.to_be_bytes(),
    ]);
    let session = cat(&[
        &3u32.to_be_bytes(),
        &option(3, b""),
        &option(6, &go),
        &option(7, &go),
        &request(1, 1, 0, 512),
        &[0x5a; 512],
        &request(0, 0, 0, 4096),
        &request(3, 0, 0, 0),
        &request(4, 0, 512, 1024),
        &request(6, 2, 1024, 4096),
        &request(2, 0, 0, 0),
    ]);
    write("nbd_handshake", "session", &session);
    for opt in [1u32, 2, 5, 8, 9, 10, 11] {
        let data = if opt == 1 { b"ro".to_vec() } else { Vec::new() };
        write(
            "nbd_handshake",
            &format!("option-{opt}"),
            &cat(&[&1u32.to_be_bytes(), &option(opt, &data)]),
        );
    }
    let mut framed = vec![0u8, 1];
    for cmd in 0..9u8 {
        framed.extend_from_slice(&[cmd, 1, 0, 0, 8, 0, 0, 2]);
        if cmd == 1 {
            framed.extend_from_slice(&[0x11; 1024]);
        }
    }
    write("nbd_request", "framed", &framed);
    write(
        "nbd_request",
        "raw",
        &cat(&[
            &[0, 0],
            &request(0, 0, 0, 512),
            &request(1, 0, 0, 512),
            &[1; 512],
        ]),
    );
    write(
        "nbd_request",
        "read-only",
        &cat(&[&[1, 0], &request(1, 0, 0, 512), &[1; 512]]),
    );

    // Frames: as received, sealed, sealed and compressed.
    let recs = records();
    write("frame", "received", &cat(&[&[0], &frame_bytes(1, &recs)]));
    let mut body = Vec::new();
    let f = FrameBuilder::new("x", 1);
    let mut f = f;
    for r in &recs {
        f.push(r);
    }
    body.extend_from_slice(&f.finish().body);
    let sealed = |mode: u8| cat(&[&[mode, 5], b"rep-1", &9u64.to_le_bytes(), &body]);
    write("frame", "sealed", &sealed(1));
    write("frame", "compressed", &sealed(2));
    write(
        "frame",
        "any-last",
        &cat(&[
            &[0x81, 1],
            b"r",
            &1u64.to_le_bytes(),
            &u64::MAX.to_le_bytes(),
            &body,
        ]),
    );

    // Undo journal: real records, and the ops that build them.
    let mut journal = Vec::new();
    rebound_mt::journal::encode(&mut journal, 0, 5, &[7u8; 4096]);
    rebound_mt::journal::encode(&mut journal, 1, 9, &[0u8; 4096]);
    write("undo_journal", "file", &cat(&[&[0], &journal]));
    let mut ops = vec![1u8];
    for (disk, fill) in [(0u8, 7u8), (1, 0), (0, 9)] {
        ops.extend_from_slice(&[2, disk]);
        ops.extend_from_slice(&42u64.to_le_bytes());
        ops.push(fill);
        if fill != 0 {
            ops.extend_from_slice(&[fill ^ 0xff; 64]);
        }
    }
    write("undo_journal", "built", &ops);
    ops.extend_from_slice(&[0, 40, 0, 0x80]);
    write("undo_journal", "damaged", &ops);

    // PS segment: real entries, and the ops that build them.
    let mut seg = Vec::new();
    for (first, n) in [(1u64, 2usize), (3, 5)] {
        let bytes = frame_bytes(first, &recs[..n]);
        seg.extend_from_slice(&rebound_ps::segment::entry_header(&bytes));
        seg.extend_from_slice(&bytes);
    }
    write(
        "ps_segment",
        "file",
        &cat(&[&[0, 0], &1u64.to_le_bytes(), &seg]),
    );
    write(
        "ps_segment",
        "built",
        &cat(&[
            &[1, 1, 10, 0],
            &5u64.to_le_bytes(),
            &[3, 4, 2, 3, 4, 1, 3, 3, 0, 2, 9, 0, 2, 1, 1, 3],
        ]),
    );

    // Point catalog: lines as the MT writes them.
    let line = |id: &str, seq: u64| {
        let json = format!(
            r#"{{"id":"{id}","kind":"crash","time_ms":1700000000000,"seq":{seq},"group":"","interval":{seq}}}"#
        );
        let sum = blake3::hash(json.as_bytes()).to_hex();
        format!("{} {json}\n", &sum[..16])
    };
    let lines = format!("{}{}{}", line("a", 3), line("b", 9), line("c", 12));
    write("point_catalog", "file", &cat(&[&[0], lines.as_bytes()]));
    write(
        "point_catalog",
        "torn",
        &cat(&[&[0], &lines.as_bytes()[..lines.len() - 7]]),
    );
    write(
        "point_catalog",
        "summed",
        &cat(&[
            &[1],
            br#"{"id":"p","kind":"app","time_ms":1,"seq":2,"group":"","interval":1}"#,
            b"\nnot json",
        ]),
    );
    let mut fields = vec![2u8, 2, 1, b'p', 0];
    fields.extend_from_slice(&[1; 24]);
    fields.extend_from_slice(&[0x42, 1, b'q', 1]);
    fields.extend_from_slice(&[2; 32]);
    write("point_catalog", "fields", &fields);

    // Dirty log: the agent's own file for two disks, with bits.
    let mut dl = vec![1u8, 2, 100, 0, 200, 0];
    dl.extend_from_slice(&[0xff, 0x0f, 0, 0, 0, 0, 0, 0x80]);
    dl.extend_from_slice(&[0; 8]);
    dl.extend_from_slice(&[1; 24]);
    dl.extend_from_slice(&[0, 0, 5, 0, 0, 1, 7, 0, 1]);
    write("dirty_log", "loaded", &dl);
    write(
        "dirty_log",
        "raw",
        &[0, 1, 10, 0, 0, 16, b'R', b'B', b'D', b'L'],
    );

    // Enrollment: each message, a token, a certificate.
    let ca = rebound_common::pki::Ca::generate("fuzz").expect("CA");
    let cert = ca
        .issue(rebound_common::pki::Role::Agent, "m1", &[])
        .expect("certificate");
    let token = rebound_common::enrollment::TokenText::generate(b"ca der");
    write("enrollment", "token", token.to_string().as_bytes());
    write("enrollment", "presented", token.presented().as_bytes());
    write("enrollment", "cert", cert.cert_pem.as_bytes());
    let req = pb::EnrollRequest {
        role: "agent".into(),
        id: "m1".into(),
        csr_pem: cert.cert_pem.clone(),
        client_nonce: vec![1; 32],
        proof: vec![2; 64],
        token: token.presented(),
    };
    write("enrollment", "request", &req.encode_to_vec());
    let resp = pb::EnrollResponse {
        cert_pem: cert.cert_pem.clone(),
        ca_pem: ca.cert_pem().to_string(),
        server_proof: vec![3; 32],
    };
    write("enrollment", "response", &resp.encode_to_vec());
    let params = pb::EnrollParamsResponse {
        salt: vec![4; 16],
        kdf: "blake3-derive-key-v1".into(),
        ca_pem: ca.cert_pem().to_string(),
    };
    write("enrollment", "params", &params.encode_to_vec());

    // Control: each side's messages.
    use pb::{component_message::Msg as C, server_message::Msg as S};
    let hello = pb::Hello {
        role: "agent".into(),
        id: "m1".into(),
        version: "0.1.0".into(),
        site: "onprem".into(),
        addresses: vec!["127.0.0.1:1".into()],
        writable: true,
        replication_id: "rep-1".into(),
        instance: "i".into(),
        ..Default::default()
    };
    let cm = |m: C| pb::ComponentMessage { msg: Some(m) }.encode_to_vec();
    write("control", "hello", &cm(C::Hello(hello)));
    write(
        "control",
        "heartbeat",
        &cm(C::Heartbeat(pb::Heartbeat { time_ms: 5 })),
    );
    write(
        "control",
        "event",
        &cm(C::Event(pb::Event {
            severity: "error".into(),
            kind: "disk-full".into(),
            message: "m".into(),
            replication_id: "rep-1".into(),
            ..Default::default()
        })),
    );
    let sm = |m: S| pb::ServerMessage { msg: Some(m) }.encode_to_vec();
    write(
        "control",
        "welcome",
        &sm(S::Welcome(pb::Welcome {
            heartbeat_ms: 1000,
            cs_version: "0.1.0".into(),
        })),
    );
    write(
        "control",
        "command",
        &sm(S::Command(pb::Command {
            id: "c1".into(),
            timeout_ms: 1000,
            cmd: Some(pb::command::Cmd::Tag(pb::Tag {
                id: "t".into(),
                kind: "app".into(),
                group: String::new(),
            })),
        })),
    );
    write(
        "control",
        "renew",
        &pb::RenewResponse {
            cert_pem: cert.cert_pem.clone(),
            ca_pem: ca.cert_pem().to_string(),
        }
        .encode_to_vec(),
    );
}
