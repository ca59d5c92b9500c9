//! A corrupt record in a closed interval's retention journal: the rest is set
//! aside and reported, the points it affects are marked, nothing else is lost.
//!
//! Real processes: points are cut under load, the MT is stopped, one byte
//! of a closed interval's journal is flipped, and the MT restarted. The
//! journal keeps its length, the damaged bytes are copied aside, the MT log
//! names replication, interval, offset and what to do; the points cut
//! before that interval are listed marked damaged (with the reason) and
//! their views refused when opened, with the MT's reason; every other point
//! is listed unmarked and exact by blake3, and replication goes on.

use rebound_lab::*;
use std::path::PathBuf;
use std::time::Duration;

/// (point id, interval it closes) from the MT's catalog.
fn catalog(lab: &Lab) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(lab.path("mt-data/m1/points.log")).unwrap();
    text.lines()
        .map(|line| {
            let json = line.split_once(' ').expect("a checksummed catalog line").1;
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            (
                v["id"].as_str().unwrap().to_string(),
                v["interval"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn journal(lab: &Lab, n: u64) -> PathBuf {
    lab.path(&format!("mt-data/m1/retention/interval-{n}.undo"))
}

#[test]
fn a_flipped_byte_in_a_closed_journal_refuses_the_points_that_need_it_and_keeps_the_rest_exact() {
    let mut lab = Lab::new(LabOptions::default()).unwrap();
    lab.start_all().unwrap();
    let uri = lab.agent_uri("disk0");
    let mut rng = Rng::new(61);
    let mut cut = Vec::new();
    for _ in 0..5 {
        qemu_io(&uri, &random_writes(&mut rng, 64 << 20, 16)).unwrap();
        let (id, seq, hash) = lab.tag_hash("crash").unwrap();
        lab.wait_applied(seq, Duration::from_secs(60)).unwrap();
        cut.push((id, hash));
    }
    lab.stop(Component::Mt).unwrap();

    // The journal of the interval the third point closes is needed by the
    // two points before it only.
    let intervals = catalog(&lab);
    let interval_of = |id: &str| intervals.iter().find(|(p, _)| p == id).unwrap().1;
    let n = interval_of(&cut[2].0);
    let path = journal(&lab, n);
    let mut bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("journal of interval {n} ({}): {e}", path.display()));
    let len = bytes.len();
    assert!(len > 8192, "interval {n} saved blocks ({len} bytes)");
    bytes[len / 2] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();

    lab.start(Component::Mt).unwrap();
    let (id, seq, after) = lab.tag_hash("crash").unwrap();
    lab.wait_applied(seq, Duration::from_secs(60)).unwrap();
    cut.push((id, after));

    assert_eq!(
        std::fs::metadata(&path).unwrap().len() as usize,
        len,
        "the damaged journal must not be cut"
    );
    let aside: Vec<String> = std::fs::read_dir(lab.path("mt-data/m1/retention"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with(&format!("interval-{n}.undo.damaged-")))
        .collect();
    assert_eq!(aside.len(), 1, "one aside file for interval {n}: {aside:?}");
    let log = lab.log(Component::Mt);
    let line = log
        .lines()
        .find(|l| l.contains("is damaged from offset"))
        .unwrap_or_else(|| {
            panic!(
                "no error about the damage:\n{}",
                lab.log_tail(Component::Mt, 30)
            )
        });
    for want in [
        "ERROR".to_string(),
        "replication=m1".to_string(),
        format!("interval={n}"),
        "offset=".to_string(),
        aside[0].clone(),
        "choose a point cut after".to_string(),
    ] {
        assert!(line.contains(&want), "the error names {want}: {line}");
    }

    // The catalog again, with the point cut after the restart.
    let intervals = catalog(&lab);
    let interval_of = |id: &str| intervals.iter().find(|(p, _)| p == id).unwrap().1;
    let (points, _) = lab.points().unwrap();
    let why = format!("choose a point cut after interval {n}");
    for (id, _) in &cut {
        let p = points
            .iter()
            .find(|p| &p.id == id)
            .unwrap_or_else(|| panic!("point {id} is still listed"));
        if interval_of(id) < n {
            assert!(
                p.damaged.contains("cannot be rebuilt exactly") && p.damaged.contains(&why),
                "point {id} is listed as damaged: {p:?}"
            );
        } else {
            assert_eq!(p.damaged, "", "point {id} is exact: {p:?}");
        }
    }
    for (id, hash) in &cut {
        let view = lab.point_hash("disk0", id);
        if interval_of(id) < n {
            let err = match view {
                Ok(_) => panic!("point {id} needs damaged interval {n} but was served"),
                Err(e) => format!("{e:#}"),
            };
            // The MT refuses that very export, and says why.
            let export = format!("@{id}");
            let refusal = lab
                .log(Component::Mt)
                .lines()
                .find(|l| l.contains("view refused") && l.contains(&export))
                .map(str::to_string)
                .unwrap_or_else(|| {
                    panic!(
                        "no refusal of the view of {id} (client: {err}):\n{}",
                        lab.log_tail(Component::Mt, 20)
                    )
                });
            assert!(
                refusal.contains("cannot be rebuilt exactly") && refusal.contains(&why),
                "the refusal of {id} says why: {refusal}"
            );
            assert!(
                err.contains("handshake") && !err.contains("no export named"),
                "the client is refused when it opens the export (not mid-read, not as unknown): {err}"
            );
        } else {
            assert_eq!(&view.unwrap(), hash, "point {id}");
        }
    }
}
