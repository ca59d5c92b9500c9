//! Malformed frames (seq ranges that do not match their records, u64::MAX,
//! empty bodies) are refused with a clear error at the PS and the MT, and
//! replication goes on.

use rebound_common::frame::{Frame, FrameBuilder, Record};
use rebound_common::tls::TlsFiles;
use rebound_lab::*;
use rebound_proto::process_server_client::ProcessServerClient;
use rebound_proto::{ingest_request, ingest_response, IngestRequest, IngestResponse};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

// ------------------------------------------------------------------ PS

/// A client of the lab's PS with the lab agent's certificate.
pub(crate) fn ps_as_agent(lab: &Lab) -> ProcessServerClient<Channel> {
    let tls = TlsFiles::in_dir(&lab.certs, &format!("agent-{}", lab.opts.machine));
    let ch = lab
        .block_on(tls.connect(
            &lab.ps_addr.to_string(),
            "localhost",
            rebound_common::pki::Role::Ps,
        ))
        .expect("TLS connection to the PS with the agent's certificate");
    ProcessServerClient::new(ch)
}

/// What the PS answered on one hand-made Ingest stream.
#[derive(Debug)]
struct Answered {
    resume: u64,
    /// Durable seqs acknowledged, in order.
    acks: Vec<u64>,
    /// How the stream ended: the refusal, or None when it stayed open.
    refused: Option<tonic::Status>,
}

/// Opens an Ingest stream as the lab agent, sends `frames`, and collects
/// the answers until the stream ends or stays quiet for a few seconds.
fn ingest(lab: &Lab, frames: Vec<Vec<u8>>) -> Answered {
    let mut ps = ps_as_agent(lab);
    let hello = crate::bad_input::info(lab);
    lab.block_on(async move {
        let (tx, rx) = mpsc::channel(16);
        tx.send(IngestRequest {
            msg: Some(ingest_request::Msg::Hello(hello)),
        })
        .await
        .unwrap();
        let mut answers = ps
            .ingest(ReceiverStream::new(rx))
            .await
            .expect("the PS takes the stream")
            .into_inner();
        let resume = match answers.message().await.expect("resume seq") {
            Some(IngestResponse {
                msg: Some(ingest_response::Msg::ResumeSeq(r)),
            }) => r,
            other => panic!("expected resume_seq first, got {other:?}"),
        };
        for f in frames {
            tx.send(IngestRequest {
                msg: Some(ingest_request::Msg::Frame(f.into())),
            })
            .await
            .unwrap();
        }
        let mut acks = Vec::new();
        let refused = loop {
            match tokio::time::timeout(Duration::from_secs(3), answers.message()).await {
                Err(_) => break None,
                Ok(Ok(Some(IngestResponse {
                    msg: Some(ingest_response::Msg::DurableSeq(d)),
                }))) => acks.push(d),
                Ok(Ok(_)) => break None,
                Ok(Err(s)) => break Some(s),
            }
        };
        drop(tx);
        Answered {
            resume,
            acks,
            refused,
        }
    })
}

/// A frame of `n` writes of 4 KiB starting at seq `first`, valid hash.
fn writes(rid: &str, first: u64, n: u64) -> Frame {
    let mut b = FrameBuilder::new(rid, first);
    for i in 0..n {
        b.push(&Record::Write {
            disk: 0,
            offset: (i % 64) * 4096,
            data: vec![0xc3u8; 4096].into(),
        });
    }
    b.finish()
}

/// Sends one bad frame on a fresh stream, checks that the PS refused it
/// with a message naming the replication and `says`, and that nothing of it
/// entered the cache (the next hello resumes at `durable`).
fn assert_refused(lab: &Lab, what: &str, frame: Frame, durable: u64, says: &[&str]) {
    let a = ingest(lab, vec![frame.to_bytes()]);
    assert_eq!(a.resume, durable, "{what}: the stream resumed elsewhere");
    let s = a.refused.unwrap_or_else(|| {
        panic!(
            "{what}: the PS did not refuse the frame (acks {:?})",
            a.acks
        )
    });
    assert!(
        a.acks.iter().all(|&d| d <= durable),
        "{what}: acknowledged beyond {durable}: {:?}",
        a.acks
    );
    let msg = s.message();
    assert!(
        msg.contains(&lab.opts.machine),
        "{what}: the refusal does not name the replication: {s:?}"
    );
    for w in says {
        assert!(
            msg.contains(w),
            "{what}: the refusal does not say {w:?}: {s:?}"
        );
    }
    let again = ingest(lab, Vec::new());
    assert_eq!(
        again.resume, durable,
        "{what}: the PS's durable seq moved after the refused frame"
    );
}

/// Scenario (PS): hand-made frames over a real TLS Ingest stream with the
/// agent's certificate — a seq range ending at u64::MAX, a range that does
/// not match the records, a gap, a first seq of 0 — are each refused with a
/// message and never enter the cache; the real agent then still
/// replicates and its points are exact.
#[test]
fn ps_refuses_frames_whose_seq_range_does_not_hold() {
    let mut lab = Lab::started(LabOptions::default()).unwrap();
    let (_, seq) = lab.tag("crash").unwrap();
    lab.wait_applied(seq, Duration::from_secs(120)).unwrap();
    // The test speaks for the agent now.
    lab.stop(Component::Agent).unwrap();
    let durable = ingest(&lab, Vec::new()).resume;
    assert!(durable >= seq, "resume {durable} below the tag's seq {seq}");
    let rid = lab.opts.machine.clone();
    let range = |mut f: Frame, first: u64, last: u64| {
        f.header.first_seq = first;
        f.header.last_seq = last;
        f
    };

    assert_refused(
        &lab,
        "a range up to u64::MAX",
        range(writes(&rid, durable + 1, 1), durable + 1, u64::MAX),
        durable,
        &["corrupt header", "u64::MAX is not a seq"],
    );
    assert_refused(
        &lab,
        "three seqs holding one record",
        range(writes(&rid, durable + 1, 1), durable + 1, durable + 3),
        durable,
        &["record"],
    );
    assert_refused(
        &lab,
        "two records in a one-seq range",
        range(writes(&rid, durable + 1, 2), durable + 1, durable + 1),
        durable,
        &["record"],
    );
    assert_refused(
        &lab,
        "a gap after the durable seq",
        writes(&rid, durable + 5, 2),
        durable,
        &["resend from seq"],
    );
    assert_refused(
        &lab,
        "a first seq of 0",
        range(writes(&rid, 1, 1), 0, 0),
        durable,
        &["corrupt header", "seqs start at 1"],
    );

    // The real agent goes on from where the PS is.
    lab.start(Component::Agent).unwrap();
    let uri = lab.agent_uri("disk0");
    let mut rng = Rng::new(31);
    for _ in 0..3 {
        qemu_io(&uri, &random_writes(&mut rng, lab.opts.disks[0].1, 40)).unwrap();
        let (id, seq, h) = lab.tag_hash("crash").unwrap();
        assert_eq!(
            lab.applied_point_hash(&id, seq, Duration::from_secs(120))
                .unwrap(),
            h,
            "point {id} (seq {seq}) after the refused frames differs from the source"
        );
    }
}

// ------------------------------------------------------------------ MT

/// `frame` re-encoded with the seq range `first..=last` (its body and
/// hash unchanged, so only the range is wrong).
fn mt_with_range(mut frame: Frame, first: u64, last: u64) -> Vec<u8> {
    frame.header.first_seq = first;
    frame.header.last_seq = last;
    frame.to_bytes()
}

/// A frame of the lab's replication with an empty body (valid hash).
fn mt_empty_body(lab: &Lab) -> Frame {
    let mut f = writes(&lab.opts.machine, 1, 1);
    f.body.clear();
    f.header.uncompressed_len = 0;
    f.header.hash = *blake3::hash(&[]).as_bytes();
    f
}

/// Opens an Apply stream to the lab's MT with the PS's certificate, says
/// hello for the lab's replication and sends `frame`: the resume seq, and
/// the MT's answer (the seq acknowledged, or the refusal).
fn mt_apply_as_ps(lab: &Lab, frame: Vec<u8>) -> (u64, Result<u64, tonic::Status>) {
    use rebound_proto::{apply_request, apply_response, ApplyRequest, ApplyResponse};
    let mut mt = lab
        .mt_client_as(&TlsFiles::in_dir(&lab.certs, "ps"))
        .expect("a connection to the MT with the PS's certificate");
    let hello = rebound_proto::ReplicationInfo {
        replication_id: lab.opts.machine.clone(),
        machine_id: lab.opts.machine.clone(),
        disks: Vec::new(),
    };
    lab.block_on(async move {
        let (tx, rx) = mpsc::channel(4);
        let msg = |m| ApplyRequest { msg: Some(m) };
        tx.send(msg(apply_request::Msg::Hello(hello)))
            .await
            .unwrap();
        let mut answers = mt
            .apply(ReceiverStream::new(rx))
            .await
            .expect("the MT accepts an Apply stream from the PS")
            .into_inner();
        let resume = match answers.message().await {
            Ok(Some(ApplyResponse {
                msg: Some(apply_response::Msg::ResumeSeq(n)),
            })) => n,
            other => panic!("the MT answered the hello with {other:?}"),
        };
        tx.send(msg(apply_request::Msg::Frame(frame.into())))
            .await
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(20), answers.message())
            .await
            .expect("the MT answers a frame within 20 s");
        let out = match answer {
            Ok(Some(ApplyResponse {
                msg: Some(apply_response::Msg::AppliedSeq(n)),
            })) => Ok(n),
            Ok(other) => panic!("the MT answered a frame with {other:?}"),
            Err(s) => Err(s),
        };
        drop(tx);
        (resume, out)
    })
}

/// At the MT, through a real Apply stream with the PS's certificate:
/// frames whose seq range does not fit their records (first seq 0, empty
/// bodies, counts that do not match, ranges reaching u64::MAX) are refused
/// with INVALID_ARGUMENT naming the replication and the range, never a
/// panic and never acknowledged; the MT stays up and replication goes on
/// with every point exact.
#[test]
fn mt_refuses_frames_whose_seq_range_does_not_hold() {
    let mut lab = Lab::started(LabOptions::default()).unwrap();
    let mut rng = Rng::new(17);
    let size = lab.opts.disks[0].1;
    qemu_io(&lab.agent_uri("disk0"), &random_writes(&mut rng, size, 16)).unwrap();
    let (p1, s1, h1) = lab.tag_hash("crash").unwrap();
    lab.wait_applied(s1, Duration::from_secs(60)).unwrap();
    // The test is the MT's only PS meanwhile.
    lab.stop(Component::Ps).unwrap();
    let (_, n) = lab.points().unwrap();
    let rid = lab.opts.machine.clone();
    let cases: Vec<(&str, u64, u64, Frame)> = vec![
        (
            "first seq 0, empty body, to u64::MAX",
            0,
            u64::MAX,
            mt_empty_body(&lab),
        ),
        (
            "first seq 0 up to the next seq",
            0,
            n + 1,
            writes(&rid, 1, n + 2),
        ),
        ("empty body", n + 1, n + 1, mt_empty_body(&lab)),
        (
            "more records than the range",
            n + 1,
            n + 1,
            writes(&rid, 1, 2),
        ),
        ("range up to u64::MAX", n + 1, u64::MAX, writes(&rid, 1, 1)),
    ];
    for (what, first, last, frame) in cases {
        let (resume, answer) = mt_apply_as_ps(&lab, mt_with_range(frame, first, last));
        assert_eq!(resume, n, "{what}");
        let s = answer.expect_err(what);
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{what}: {s:?}");
        let range = format!("{first}..={last}");
        assert!(
            s.message().contains(&lab.opts.machine) && s.message().contains(&range),
            "{what}: the refusal names neither the replication nor {range}: {}",
            s.message()
        );
        lab.check_alive(Component::Mt)
            .expect("the MT is still running");
        assert_eq!(lab.points().unwrap().1, n, "{what}: applied seq moved");
    }
    assert!(
        !lab.log(Component::Mt).contains("panicked"),
        "the MT panicked; log tail:\n{}",
        lab.log_tail(Component::Mt, 30)
    );
    lab.start(Component::Ps).unwrap();
    qemu_io(&lab.agent_uri("disk0"), &random_writes(&mut rng, size, 16)).unwrap();
    let (p2, s2, h2) = lab.tag_hash("crash").unwrap();
    lab.wait_applied(s2, Duration::from_secs(120)).unwrap();
    assert_eq!(lab.point_hash("disk0", &p1).unwrap(), h1, "point {p1}");
    assert_eq!(lab.point_hash("disk0", &p2).unwrap(), h2, "point {p2}");
}
