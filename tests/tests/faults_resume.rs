//! A process server that lost its cache, and an agent that lost its dirty log
//! or restarted after the PS lost acknowledged records: the stream never skips
//! records and the next point is exact.

use rebound_lab::*;
use serde_json::json;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const APPLY_WAIT: Duration = Duration::from_secs(180);

/// Rounds of random writes through the agent, each ended by a tag; returns
/// the last tag's seq.
fn write_rounds(lab: &Lab, rng: &mut Rng, rounds: usize) -> u64 {
    let uri = lab.agent_uri("disk0");
    let size = lab.opts.disks[0].1;
    let mut seq = 0;
    for _ in 0..rounds {
        qemu_io(&uri, &random_writes(rng, size, 60)).expect("writes through the agent");
        seq = lab.tag("crash").expect("tag on the agent").1;
    }
    seq
}

/// A started lab whose MT has applied `rounds` rounds of writes (each
/// ended by a tag); the rng for more, and the last tag's seq.
fn replicated_lab(seed: u64, rounds: usize) -> (Lab, Rng, u64) {
    let lab = Lab::started(LabOptions::default()).unwrap();
    let mut rng = Rng::new(seed);
    let applied = write_rounds(&lab, &mut rng, rounds);
    lab.wait_applied(applied, APPLY_WAIT).unwrap();
    (lab, rng, applied)
}

/// Waits until the PS holds (has acknowledged) every record the agent cut.
fn wait_ps_holds_everything(lab: &Lab) {
    let r = lab
        .agent_admin(json!({"cmd": "wait_durable", "timeout_ms": 60_000}))
        .expect("wait_durable on the agent");
    assert!(
        r.get("durable_seq").is_some(),
        "the PS did not acknowledge every record: {r}"
    );
}

/// Tags a point and checks that, once applied, the MT's view of it equals
/// the source at the tag (by blake3); `what` names the scenario.
fn assert_next_point_exact(lab: &Lab, what: &str) {
    let (id, seq, h) = lab.tag_hash("crash").expect("tag after the fault");
    lab.wait_applied(seq, APPLY_WAIT)
        .unwrap_or_else(|e| panic!("{what}: point {id} (seq {seq}) not applied: {e:#}"));
    let got = lab
        .point_hash("disk0", &id)
        .unwrap_or_else(|e| panic!("{what}: no view of point {id} (seq {seq}): {e:#}"));
    assert_eq!(
        got, h,
        "{what}: point {id} (seq {seq}) differs from the source at the tag"
    );
}

/// Asserts that `c`'s log has a line saying `text`; `why` says what the
/// line is for.
fn assert_logged(lab: &Lab, c: Component, text: &str, why: &str) {
    assert!(
        lab.log(c).lines().any(|l| l.contains(text)),
        "{why}: no line of the {} log says {text:?}; its tail:\n{}",
        c.name(),
        lab.log_tail(c, 30)
    );
}

/// The PS's segment files (`*.seg`) under its cache dir, oldest first.
fn segments(lab: &Lab) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "seg") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&lab.path("ps-cache"), &mut out);
    out.sort();
    out
}

/// The first seq a segment file holds (its name).
fn segment_first_seq(p: &Path) -> u64 {
    p.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{} is not named after a seq", p.display()))
}

/// Scenario: the PS's cache directory is wiped while the MT is down for
/// longer than the PS waits for it, and the PS and the agent restart before
/// the MT. The PS must not resume the agent at seq 1 (the MT, whose applied
/// seq is far beyond, would skip the new records as already applied).
#[test]
fn wiped_ps_cache_while_mt_down_resumes_after_the_mt() {
    // History, so the MT's applied seq is far beyond what a restarted
    // stream (and its resync) would reach.
    let (mut lab, mut rng, _) = replicated_lab(101, 12);

    lab.kill9(Component::Mt).unwrap();
    // Acknowledged by the PS only.
    write_rounds(&lab, &mut rng, 3);
    wait_ps_holds_everything(&lab);
    lab.stop(Component::Agent).unwrap();
    lab.kill9(Component::Ps).unwrap();
    std::fs::remove_dir_all(lab.path("ps-cache")).unwrap();

    lab.start(Component::Ps).unwrap();
    lab.start(Component::Agent).unwrap();
    // Writes while the MT is still down (no tag: no point can be cut
    // before the agent's resync, which needs the MT); the PS waits 5 s for
    // the MT at the agent's hello: let that pass.
    qemu_io(
        &lab.agent_uri("disk0"),
        &random_writes(&mut rng, lab.opts.disks[0].1, 60),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    lab.start(Component::Mt).unwrap();

    assert_next_point_exact(&lab, "PS cache wiped while the MT was down");
    assert_logged(
        &lab,
        Component::Ps,
        "applied seq for it is not known yet",
        "the PS should have refused the agent until the MT answered",
    );
    assert_eq!(
        lab.point_hash("disk0", "latest").unwrap(),
        lab.source_hash(0).unwrap()
    );
}

/// Scenario: the PS loses records it had acknowledged (its newest segment
/// torn) while the MT is down and had not applied them, and the agent
/// restarts: the agent must notice from the resume seq that the PS lost
/// what it acknowledged and resync, though the dirty bits of those records
/// were already cleared.
#[test]
fn ps_losing_acknowledged_records_makes_a_restarted_agent_resync() {
    let (mut lab, mut rng, applied) = replicated_lab(202, 4);
    // The PS trims what the MT applied: wait until only segments after it
    // are left, so what the test tears below was never applied.
    wait_until(
        "the PS to trim the applied segments",
        Duration::from_secs(60),
        || {
            segments(&lab)
                .iter()
                .all(|s| segment_first_seq(s) > applied)
        },
    )
    .unwrap();

    lab.kill9(Component::Mt).unwrap();
    let acked = write_rounds(&lab, &mut rng, 6);
    wait_ps_holds_everything(&lab);
    // A clean stop clears the dirty bits of every acknowledged record.
    lab.stop(Component::Agent).unwrap();
    lab.kill9(Component::Ps).unwrap();
    let segs = segments(&lab);
    let newest = segs.last().expect("the PS holds a segment");
    let len = std::fs::metadata(newest).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(newest)
        .and_then(|f| f.set_len(len / 3))
        .unwrap();

    lab.start(Component::Ps).unwrap();
    lab.start(Component::Agent).unwrap();
    wait_until(
        "the agent to connect to the PS",
        Duration::from_secs(60),
        || {
            lab.log(Component::Agent)
                .contains("connected to the process server")
        },
    )
    .unwrap();
    let log = lab.log(Component::Ps);
    let resumed = log
        .lines()
        .rfind(|l| l.contains("agent stream connected"))
        .unwrap_or_default()
        .to_string();
    eprintln!("acknowledged up to {acked}; the torn PS: {resumed}");
    lab.start(Component::Mt).unwrap();

    assert_next_point_exact(&lab, "PS lost acknowledged records");
    assert_logged(
        &lab,
        Component::Agent,
        "it lost acknowledged records",
        "the agent should say why it resyncs every disk",
    );
}

/// Scenario: an initialised agent's dirty log is removed while it is
/// stopped and the source is written behind its back: it must start with a
/// full resync (it cannot know what changed).
#[test]
fn missing_dirty_log_of_an_initialised_agent_means_a_full_resync() {
    let (mut lab, _, _) = replicated_lab(303, 2);
    lab.stop(Component::Agent).unwrap();
    let dlog = lab.agent_state_dir().join("dirty.log");
    assert!(dlog.exists(), "{} should exist", dlog.display());
    std::fs::remove_file(&dlog).unwrap();
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(lab.source_disk(0))
            .unwrap();
        f.write_all_at(&[0xa5u8; 3 * 4096], 17 << 20).unwrap();
        f.write_all_at(&[0x5au8; 512], (40 << 20) + 512).unwrap();
        f.sync_all().unwrap();
    }
    lab.start(Component::Agent).unwrap();
    assert_next_point_exact(
        &lab,
        "dirty log removed, source written behind the agent's back",
    );
    assert_logged(
        &lab,
        Component::Agent,
        "the dirty-extent log is missing",
        "the agent should say why it resyncs every disk",
    );
}
