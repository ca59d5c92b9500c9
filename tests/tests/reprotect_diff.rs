//! The first reprotect after a failover seeds the returning replica from the
//! disks the machine left at its old site (kept at commit), so only the
//! chunks that changed cross the network.

use crate::lifecycle::{
    a, b, fail_over_at_latest, protect, replica_hash, reprotect, source_hash, succeeded,
    wait_point_seq, JOB, MIB,
};
use rebound_lab::*;

/// The disk: 256 chunks of 1 MiB (the resync's chunk).
const DISK: u64 = 256 * MIB;

/// The resync bytes the agent of m1 at `site` sent since it started.
fn resync_bytes(s: &Sites, site: &str) -> u64 {
    let st = s
        .agent_admin("m1", site, serde_json::json!({"cmd": "status"}))
        .expect("agent status");
    st["resync_bytes_sent"].as_u64().expect("resync_bytes_sent")
}

/// Which process the agent of m1 at `site` is (the MT's power_on hook
/// started it): its pid and its start time, so a restart between two reads
/// of its counters shows even if the pid were reused.
fn agent_process(s: &Sites, site: &str) -> (u32, String) {
    let pid_file = s.path(&format!("agents/m1@{site}.pid"));
    let pid: u32 = (std::fs::read_to_string(&pid_file).ok())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no agent pid in {}", pid_file.display()));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("the agent of m1 at {site} (pid {pid}) is not running: {e}"));
    // Field 22, after the command name in parentheses.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let start = after_name.split_whitespace().nth(19).unwrap_or_default();
    (pid, start.to_string())
}

#[test]
fn the_first_reprotect_sends_only_the_chunks_the_machine_changed() {
    let mut s = Sites::start(SitesOptions {
        disks: vec![("disk0".into(), DISK)],
        ..SitesOptions::default()
    })
    .expect("sites");
    let m = "m1";
    protect(&s, m, a(), b());
    // Data the reprotect must not send again: 32 MiB.
    s.write(m, a(), "disk0", 0, 32 * MIB, 0x61).unwrap();
    let (_, seq) = s.tag(m, a(), "crash").unwrap();
    wait_point_seq(&s, m, seq);
    let h = source_hash(&s, m);
    let r1 = fail_over_at_latest(&mut s, m, a(), b(), &h);

    // The machine changes 1% of the chunks at B: 3 of 256, one inside the
    // data, two in what was empty.
    let changed = [8 * MIB, 100 * MIB, 200 * MIB];
    for (i, off) in changed.iter().enumerate() {
        s.write(m, b(), "disk0", *off, MIB, 0x70 + i as u8).unwrap();
    }
    s.stop_agent(m, a()).expect("stop the agent at A");
    succeeded(&s.job(&["commit", m]).unwrap());
    s.wait_state(m, "Committed", JOB).unwrap();
    assert!(
        s.source_disk(m, "disk0").exists(),
        "commit removed the source copy"
    );
    s.wait_online("agent", m, JOB).expect("agent at B online");
    let agent = agent_process(&s, b());
    let before = resync_bytes(&s, b());

    let job = reprotect(&s, m, b(), a(), "2m", true);
    succeeded(&job);
    s.wait_state(m, "Protected", JOB).expect("protected B→A");
    let after = resync_bytes(&s, b());
    // The counter is the process's own: it only measures the reprotect if
    // the same agent ran throughout.
    assert_eq!(
        agent_process(&s, b()),
        agent,
        "the agent of m1 at B restarted during the reprotect: its resync counter started over"
    );
    let sent = after - before;
    let bound = changed.len() as u64 * MIB + MIB;
    eprintln!("reprotect resync sent {sent} bytes (bound {bound})");
    assert!(
        sent <= bound,
        "the first reprotect sent {sent} bytes, more than the {} changed chunks + 1 MiB ({bound}): \
         not seeded from the kept copy? job {job:#}",
        changed.len()
    );

    // The point after reprotect is exact.
    let hb = replica_hash(&s, b(), &r1);
    let (tag, seq) = s.tag(m, b(), "crash").unwrap();
    wait_point_seq(&s, m, seq);
    s.wait_view_hash(a(), m, "disk0", &tag, &hb, JOB)
        .unwrap_or_else(|e| panic!("point {tag} at A differs from m1 at B: {e:#}"));
}
