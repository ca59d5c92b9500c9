//! Retention decided by the master target's clock, not the agent's: an agent
//! clock a day behind or ahead changes no retention decision.
//!
//! The tests play the process server on a real Apply stream (with the lab's
//! PS certificate) and feed the MT writes and tags stamped by an agent
//! whose clock is a day off, then check which points the MT keeps and that
//! each kept point is exact by blake3.

use rebound_common::frame::{FrameBuilder, Record, Tag, TagKind};
use rebound_common::time::now_ms;
use rebound_common::tls::TlsFiles;
use rebound_lab::*;
use rebound_proto::{apply_request, apply_response, ApplyRequest, DiskInfo, ReplicationInfo};
use std::time::Duration;

const DISK_SIZE: u64 = 64 << 20;
const DAY_MS: i64 = 86_400_000;

/// An agent whose clock is `skew_ms` off the MT's, as the MT sees it
/// through the process server: a change stream and a model of its disk.
struct SkewedAgent {
    skew_ms: i64,
    rng: Rng,
    disk: Vec<u8>,
    seq: u64,
    /// (point id, blake3 of the disk at it)
    points: Vec<(String, String)>,
}

impl SkewedAgent {
    fn new(skew_ms: i64, seed: u64) -> SkewedAgent {
        SkewedAgent {
            skew_ms,
            rng: Rng::new(seed),
            disk: vec![0u8; DISK_SIZE as usize],
            seq: 0,
            points: Vec::new(),
        }
    }

    /// Some random 64 KiB writes, then a tag `id` stamped by this agent's
    /// clock, sent to the MT in one frame; returns once applied.
    fn interval(&mut self, lab: &Lab, id: &str) {
        let first = self.seq + 1;
        let mut b = FrameBuilder::new(&lab.opts.machine, first);
        for _ in 0..8 {
            let offset = self.rng.below(DISK_SIZE / 65536) * 65536;
            let mut data = vec![0u8; 65536];
            self.rng.fill(&mut data);
            self.disk[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            b.push(&Record::Write {
                disk: 0,
                offset,
                data: data.into(),
            });
            self.seq += 1;
        }
        b.push(&Record::Tag(Tag {
            id: id.into(),
            kind: TagKind::Crash,
            time_ms: now_ms().saturating_add_signed(self.skew_ms),
            group: String::new(),
        }));
        self.seq += 1;
        send(lab, b.finish().to_bytes(), self.seq);
        self.points.push((
            id.to_string(),
            blake3::hash(&self.disk).to_hex().to_string(),
        ));
    }
}

/// Sends one frame on an Apply stream as the process server and waits for
/// the MT to acknowledge `last`.
fn send(lab: &Lab, frame: Vec<u8>, last: u64) {
    let mut mt = lab
        .mt_client_as(&TlsFiles::in_dir(&lab.certs, "ps"))
        .expect("connect to the MT as the PS");
    let hello = ReplicationInfo {
        replication_id: lab.opts.machine.clone(),
        machine_id: lab.opts.machine.clone(),
        disks: vec![DiskInfo {
            index: 0,
            name: "disk0".into(),
            size: DISK_SIZE,
        }],
    };
    let reqs = vec![
        ApplyRequest {
            msg: Some(apply_request::Msg::Hello(hello)),
        },
        ApplyRequest {
            msg: Some(apply_request::Msg::Frame(frame.into())),
        },
    ];
    let acked = lab.block_on(async {
        let mut stream = mt.apply(tokio_stream::iter(reqs)).await?.into_inner();
        while let Some(m) = stream.message().await? {
            if let Some(apply_response::Msg::AppliedSeq(s)) = m.msg {
                if s >= last {
                    return Ok::<_, tonic::Status>(true);
                }
            }
        }
        Ok(false)
    });
    match acked {
        Ok(true) => {}
        other => panic!(
            "the MT did not acknowledge seq {last}: {other:?}\n{}",
            lab.log_tail(Component::Mt, 20)
        ),
    }
}

fn point_ids(lab: &Lab) -> Vec<String> {
    lab.points()
        .expect("ListPoints")
        .0
        .into_iter()
        .map(|p| p.id)
        .collect()
}

/// Every point the MT keeps is one the agent cut, exact by blake3.
fn check_kept_points(lab: &Lab, agent: &SkewedAgent) {
    for id in point_ids(lab) {
        let (_, want) = agent
            .points
            .iter()
            .find(|(p, _)| *p == id)
            .unwrap_or_else(|| panic!("the MT keeps point {id} nobody cut"));
        assert_eq!(&lab.point_hash("disk0", &id).unwrap(), want, "point {id}");
    }
}

fn mt_lab(window_secs: u64) -> Lab {
    let mut lab = Lab::new(LabOptions {
        disks: vec![("disk0".into(), DISK_SIZE)],
        retention: RetentionConfig {
            window_secs,
            max_bytes: 0,
            check_secs: 1,
        },
        ..Default::default()
    })
    .unwrap();
    lab.start(Component::Mt).unwrap();
    lab
}

#[test]
fn an_agent_clock_a_day_behind_drops_no_point_inside_the_window() {
    let lab = mt_lab(3600);
    let mut agent = SkewedAgent::new(-DAY_MS, 41);
    for i in 0..4 {
        agent.interval(&lab, &format!("behind-{i}"));
    }
    // Several retention passes (one a second).
    std::thread::sleep(Duration::from_secs(4));
    let kept = point_ids(&lab);
    assert_eq!(
        kept,
        ["behind-0", "behind-1", "behind-2", "behind-3"],
        "points cut seconds ago are inside a 1 h window, whatever the agent's clock says\n{}",
        lab.log_tail(Component::Mt, 20)
    );
    check_kept_points(&lab, &agent);
}

#[test]
fn an_agent_clock_a_day_ahead_does_not_keep_points_forever() {
    let window_secs = 3;
    let lab = mt_lab(window_secs);
    let mut agent = SkewedAgent::new(DAY_MS, 42);
    agent.interval(&lab, "ahead-0");
    agent.interval(&lab, "ahead-1");
    std::thread::sleep(Duration::from_secs(window_secs + 1));
    agent.interval(&lab, "ahead-2");
    // The first two are older than the window by the MT's clock.
    wait_until(
        "retention to drop the points older than the window by the MT's clock",
        Duration::from_secs(30),
        || point_ids(&lab) == ["ahead-2"],
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: kept {:?}\n{}",
            point_ids(&lab),
            lab.log_tail(Component::Mt, 20)
        )
    });
    check_kept_points(&lab, &agent);
}
