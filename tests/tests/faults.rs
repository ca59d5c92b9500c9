//! kill -9 of the process server, the master target and the agent under
//! write load: nothing acknowledged is lost, every point stays exact, and
//! replication resumes by itself.

use crate::support::resync_bytes_to_converge;
use rebound_lab::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Captured = Arc<Mutex<Vec<(String, u64, String)>>>;

/// Background load: rounds of random writes through the agent, each ended by
/// a tag whose source hash is recorded. Stops when `stop` is set.
fn load(
    lab: &Lab,
    rng_seed: u64,
    stop: Arc<AtomicBool>,
    captured: Captured,
) -> std::thread::JoinHandle<()> {
    let uri = lab.agent_uri("disk0");
    let size = lab.opts.disks[0].1;
    let sock = lab.agent_state_dir().join("admin.sock");
    let src = lab.source_disk(0);
    std::thread::spawn(move || {
        let mut rng = Rng::new(rng_seed);
        while !stop.load(Ordering::SeqCst) {
            qemu_io(&uri, &random_writes(&mut rng, size, 60)).expect("writes through the agent");
            let (id, seq) = AgentAdmin::connect(&sock)
                .and_then(|mut a| a.tag("crash"))
                .expect("tag on the agent");
            let h = blake3_file(&src).unwrap();
            captured.lock().unwrap().push((id, seq, h));
        }
    })
}

fn check_all(lab: &Lab, captured: &Captured) {
    let caps = captured.lock().unwrap().clone();
    assert!(caps.len() >= 3, "load cut only {} points", caps.len());
    let last = caps.iter().map(|c| c.1).max().unwrap();
    lab.wait_applied(last, Duration::from_secs(180)).unwrap();
    let (points, _) = lab.points().unwrap();
    for (id, seq, h) in &caps {
        let p = points
            .iter()
            .find(|p| &p.id == id)
            .unwrap_or_else(|| panic!("point {id} lost"));
        assert_eq!(p.seq, *seq);
        assert_eq!(
            &lab.point_hash("disk0", id).unwrap(),
            h,
            "point {id} is not exact"
        );
    }
    assert_eq!(
        lab.point_hash("disk0", "latest").unwrap(),
        lab.source_hash(0).unwrap()
    );
}

#[test]
fn kill9_ps_and_mt_under_load() {
    let mut lab = Lab::started(LabOptions::default()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let captured: Captured = Arc::default();
    let t = load(&lab, 11, stop.clone(), captured.clone());
    for (i, delay) in [300u64, 900, 50, 1500].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(delay));
        let victim = if i % 2 == 0 {
            Component::Ps
        } else {
            Component::Mt
        };
        lab.kill9(victim).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        lab.start(victim).unwrap();
    }
    // Both at once.
    lab.kill9(Component::Ps).unwrap();
    lab.kill9(Component::Mt).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    lab.start(Component::Mt).unwrap();
    lab.start(Component::Ps).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::SeqCst);
    t.join().unwrap();
    check_all(&lab, &captured);
}

#[test]
fn kill9_agent_resyncs_only_dirty_extents() {
    let disk_size = 256u64 << 20;
    let mut lab = Lab::started(LabOptions::disk_size(disk_size)).unwrap();
    // Settle the initial replication first.
    let (_, s) = lab.tag("crash").unwrap();
    lab.wait_applied(s, Duration::from_secs(120)).unwrap();

    // Load confined to the first 16 MiB, killed in the middle.
    let uri = lab.agent_uri("disk0");
    let loader = std::thread::spawn(move || {
        let mut rng = Rng::new(5);
        for _ in 0..20 {
            if qemu_io(&uri, &random_writes(&mut rng, 16 << 20, 50)).is_err() {
                break; // the agent went away under us
            }
        }
    });
    std::thread::sleep(Duration::from_millis(700));
    lab.kill9(Component::Agent).unwrap();
    loader.join().unwrap();
    lab.start(Component::Agent).unwrap();

    let resent = resync_bytes_to_converge(
        &lab,
        Duration::from_secs(120),
        "replica did not converge after the agent crash",
    );
    // The counter starts at zero with the new process, so it holds only the
    // crash-recovery resync: bounded by the 16 extents the load could dirty
    // (16 MiB), far below the 256 MiB disk.
    assert!(
        resent <= 16 << 20,
        "agent resent {resent} bytes after the crash; the dirty extents hold at most 16 MiB"
    );
    eprintln!("after kill -9: resync sent {resent} bytes (disk {disk_size})");
}

#[test]
fn ps_outage_overflows_buffer_into_bitmap_mode_and_catches_up() {
    let mut lab = Lab::new(LabOptions {
        disks: vec![("disk0".into(), 64 << 20)],
        agent_buffer_bytes: 8 << 20,
        ..Default::default()
    })
    .unwrap();
    lab.start_all().unwrap();
    let (_, s) = lab.tag("crash").unwrap();
    lab.wait_applied(s, Duration::from_secs(60)).unwrap();
    lab.kill9(Component::Ps).unwrap();
    let uri = lab.agent_uri("disk0");
    let mut rng = Rng::new(21);
    // ~40 MiB of writes against an 8 MiB buffer.
    for _ in 0..10 {
        qemu_io(&uri, &random_writes(&mut rng, 64 << 20, 32)).unwrap();
    }
    let st = lab.agent_status().unwrap();
    assert_eq!(st["mode"], "bitmap", "agent should be in bitmap mode: {st}");
    lab.start(Component::Ps).unwrap();
    wait_until("agent back in data mode", Duration::from_secs(120), || {
        lab.agent_status()
            .map(|s| s["mode"] == "data")
            .unwrap_or(false)
    })
    .unwrap();
    let (id, seq, h) = lab.tag_hash("crash").unwrap();
    lab.wait_applied(seq, Duration::from_secs(120)).unwrap();
    assert_eq!(lab.point_hash("disk0", &id).unwrap(), h);
}
