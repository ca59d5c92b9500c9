//! The failed-over machine writes (DESIGN.md §7 "Hand-over"): its agent at
//! the new site journals the pre-image of every block it changes, so
//! change-point stops it, undoes its writes and brings it up exactly at
//! another point; commit makes what it wrote the base.

use crate::lifecycle::{
    a, b, fail_over_at_latest, failed_over_at_the_second_of_two_points, protect, replica_hash,
    reprotect, succeeded, TwoPoints, JOB, MIB,
};
use rebound_lab::*;

/// The machine, running at B, writes through its agent there (as its
/// filesystem would), and the replica it runs on shows it.
fn machine_writes_at_b(s: &mut Sites, r1: &str, offset: u64, len: u64, byte: u8) -> String {
    s.wait_powered_on("m1", b(), JOB).expect("m1 runs at B");
    let before = replica_hash(s, b(), r1);
    s.write("m1", b(), "disk0", offset, len, byte)
        .expect("write at B");
    let after = replica_hash(s, b(), r1);
    assert_ne!(
        before, after,
        "the write at B did not reach the replica it runs on"
    );
    after
}

#[test]
fn change_point_undoes_what_the_failed_over_machine_wrote() {
    let mut s = Sites::start(SitesOptions::default()).expect("sites");
    let m = "m1";
    protect(&s, m, a(), b());
    let TwoPoints { p1, h1, h2, r1, .. } = failed_over_at_the_second_of_two_points(&mut s, m);
    // The machine runs at B and writes over what the point holds and
    // beyond it.
    machine_writes_at_b(&mut s, &r1, MIB / 2, 2 * MIB, 0x51);

    // Change-point to the older point: the machine is stopped, its writes
    // undone, the replica rolled back and handed over again.
    succeeded(&s.job(&["change-point", m, "--point", &p1]).unwrap());
    assert_eq!(replica_hash(&s, b(), &r1), h1, "change-point to {p1}");
    assert_eq!(s.machine(m).unwrap()["failover_point"]["id"], p1.as_str());

    // It runs again at p1, writes, and goes back to latest.
    machine_writes_at_b(&mut s, &r1, 3 * MIB, MIB, 0x52);
    // Its agent dies (kill -9) and is started again over the same config:
    // it reopens the open journal (each block still saved once) and the
    // machine writes more, over the same blocks and beyond.
    s.kill_agent(m, b()).expect("kill -9 the agent at B");
    s.start_agent(m, b()).expect("the agent at B starts again");
    s.write(m, b(), "disk0", 3 * MIB + MIB / 2, MIB, 0x55)
        .expect("write at B after the restart");
    // The lab, not the power_on hook, started it: stop it as power_off would.
    s.stop_agent(m, b()).expect("stop the restarted agent at B");
    succeeded(&s.job(&["change-point", m, "--point", "latest"]).unwrap());
    assert_eq!(
        replica_hash(&s, b(), &r1),
        h2,
        "change-point back to latest"
    );

    // What it writes from now on is kept by commit.
    let hb = machine_writes_at_b(&mut s, &r1, 5 * MIB, MIB, 0x53);
    s.stop_agent(m, a()).expect("stop the agent at A");
    succeeded(&s.job(&["commit", m]).unwrap());
    s.wait_state(m, "Committed", JOB).unwrap();
    assert_eq!(
        replica_hash(&s, b(), &r1),
        hb,
        "commit changed the machine's disk"
    );

    // Reprotect B→A, fail back: A gets exactly what the machine holds.
    s.wait_online("agent", m, JOB).expect("agent at B online");
    succeeded(&reprotect(&s, m, b(), a(), "2m", true));
    s.wait_state(m, "Protected", JOB).expect("protected B→A");
    let h = machine_writes_at_b(&mut s, &r1, 7 * MIB, MIB, 0x54);
    fail_over_at_latest(&mut s, m, b(), a(), &h);
}
