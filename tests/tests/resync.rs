//! Initial replication is a differential resync: an empty replica gets a
//! full copy (zero chunks as `Zero`), a replica that differs in 1% of its
//! chunks gets only about 1% of the disk.

use crate::support::resync_bytes_to_converge;
use rebound_lab::*;
use std::time::Duration;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

#[test]
fn initial_sync_of_1gib_full_then_one_percent_differential() {
    let mut lab = Lab::new(LabOptions {
        disks: vec![("disk0".into(), GIB)],
        ..Default::default()
    })
    .unwrap();
    // Source: 3/4 random data, 1/4 zero (sparse), written before protection.
    let mut rng = Rng::new(77);
    let mut chunk = vec![0u8; MIB as usize];
    for c in 0..(GIB / MIB) {
        if c % 4 == 3 {
            continue;
        }
        for w in chunk.chunks_mut(8) {
            w.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        write_at(&lab.source_disk(0), c * MIB, &chunk).unwrap();
    }
    lab.start_all().unwrap();
    let full = resync_bytes_to_converge(
        &lab,
        Duration::from_secs(300),
        "full initial sync is not exact",
    );
    assert!(
        (GIB * 3 / 4..=GIB).contains(&full),
        "initial sync sent {full} bytes for 768 MiB of data"
    );

    // Change 1% of the chunks while the agent is stopped, then protect again
    // with a fresh agent install: only the differing chunks travel.
    lab.stop(Component::Agent).unwrap();
    std::fs::remove_dir_all(lab.agent_state_dir()).unwrap();
    let changed = GIB / MIB / 100; // 10 chunks
    for i in 0..changed {
        for w in chunk.chunks_mut(8) {
            w.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        write_at(&lab.source_disk(0), (i * 97 + 5) * MIB, &chunk).unwrap();
    }
    lab.start(Component::Agent).unwrap();
    let diff = resync_bytes_to_converge(
        &lab,
        Duration::from_secs(300),
        "differential sync is not exact",
    );
    eprintln!("full sync sent {full} bytes; 1% differential sync sent {diff} bytes");
    assert!(
        (changed * MIB..=changed * MIB + MIB).contains(&diff),
        "differential sync sent {diff} bytes for {changed} changed chunks of 1 MiB"
    );
}
