//! `rebound verify`: the source at a tag against the MT's view of the same
//! point, chunk by chunk, without stopping writes; `--repair` resends the
//! chunks that differ.
//!
//! Bytes are flipped in the replica files under the MT (what bit rot or a
//! stray writer would do, unseen by apply and by the MT's hash cache) in
//! three chosen chunks of two disks, one of them the short last chunk of a
//! disk and one where the source was never written. Writes go on at the
//! source while every verify runs, elsewhere on the disk.

use crate::lifecycle::{a, b, protect, MIB};
use rebound_lab::*;
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const DISK1: u64 = (8 << 20) + 3 * 4096;
const WAIT: Duration = Duration::from_secs(60);

fn options() -> SitesOptions {
    SitesOptions {
        disks: vec![("disk0".into(), 16 << 20), ("disk1".into(), DISK1)],
        ..SitesOptions::default()
    }
}

/// `rebound verify m1 <extra…> --wait --output json`: the machine's last
/// verify, which must have run.
fn verify(s: &Sites, extra: &[&str]) -> Value {
    let mut args = vec!["verify", "m1"];
    args.extend_from_slice(extra);
    let v = s
        .job(&args)
        .unwrap_or_else(|e| panic!("rebound {args:?}: {e:#}"));
    assert_eq!(v["error"], "", "{v:#}");
    assert_eq!(v["chunk_size"], MIB, "{v:#}");
    assert_eq!(v["chunks_compared"], 16 + 9, "{v:#}");
    v
}

/// The (disk, offset) pairs a verify names, in order.
fn differing(v: &Value) -> Vec<(u64, u64)> {
    let list = v["differing_chunks"].as_array().expect("differing_chunks");
    let got: Vec<(u64, u64)> = list
        .iter()
        .map(|c| {
            (
                c["disk"].as_u64().unwrap_or(0),
                c["offset"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(v["differing"], got.len(), "{v:#}");
    got
}

/// Writes through the agent's NBD export at the source, in chunks 10 and 11
/// of disk0, until stopped: a verify must not need the writes to stop.
fn writer(s: &Sites, stop: &Arc<AtomicBool>) -> JoinHandle<u32> {
    let uri = nbd_uri(s.agent_addr("m1", a()).expect("agent address"), "disk0");
    let stop = stop.clone();
    std::thread::spawn(move || {
        let mut n = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let offset = 10 * MIB + u64::from(n % 32) * 64 * 1024;
            let pattern = n % 200 + 1;
            qemu_io(&uri, &[format!("write -P {pattern} {offset} 65536")])
                .expect("write during verify");
            n += 1;
        }
        n
    })
}

fn flip(path: &std::path::Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut b = [0u8; 16];
    f.read_exact_at(&mut b, offset).expect("read replica");
    for x in &mut b {
        *x ^= 0xa5;
    }
    f.write_all_at(&b, offset).expect("flip replica bytes");
    f.sync_data().expect("sync replica");
}

fn source_hash(s: &Sites, disk: &str) -> String {
    blake3_file(&s.source_disk("m1", disk)).expect("hash source")
}

#[test]
fn verify_names_exactly_the_flipped_chunks_and_repair_makes_the_next_point_exact() {
    let s = Sites::start(options()).expect("sites");
    protect(&s, "m1", a(), b());
    s.write("m1", a(), "disk0", 0, 8 * MIB, 0x31)
        .expect("write");
    s.write("m1", a(), "disk1", MIB / 2, 4 * MIB, 0x32)
        .expect("write");
    s.write("m1", a(), "disk1", DISK1 - 8192, 8192, 0x33)
        .expect("write the tail");
    // The MT holds all of it before the replica is damaged.
    let (tag, _) = s.tag("m1", a(), "crash").expect("tag");
    for d in ["disk0", "disk1"] {
        s.wait_view_hash(b(), "m1", d, &tag, &source_hash(&s, d), WAIT)
            .expect("the point reaches the MT");
    }

    // Damage: chunk 3 of disk0 (data), chunk 13 of disk0 (never written at
    // the source) and the short last chunk of disk1.
    let (r0, r1) = (
        s.replica_path(b(), "m1", "disk0"),
        s.replica_path(b(), "m1", "disk1"),
    );
    flip(&r0, 3 * MIB + 4097);
    flip(&r0, 13 * MIB + 100);
    flip(&r1, DISK1 - 5000);
    let want = vec![(0, 3 * MIB), (0, 13 * MIB), (1, 8 * MIB)];

    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(&s, &stop);
    let v = verify(&s, &[]);
    assert_eq!(differing(&v), want, "{v:#}");
    assert_eq!(v["repaired"], false, "{v:#}");

    let v = verify(&s, &["--repair"]);
    assert_eq!(differing(&v), want, "{v:#}");
    assert_eq!(v["repaired"], true, "{v:#}");

    let v = verify(&s, &[]);
    assert_eq!(differing(&v), vec![], "a verify after the repair: {v:#}");
    stop.store(true, Ordering::Relaxed);
    let writes = w.join().expect("writer");
    assert!(writes > 0, "no write ran during the verifies");

    // The next point after the repair is the source, by blake3.
    let (tag, _) = s.tag("m1", a(), "crash").expect("tag");
    for d in ["disk0", "disk1"] {
        s.wait_view_hash(b(), "m1", d, &tag, &source_hash(&s, d), WAIT)
            .unwrap_or_else(|e| panic!("{d} at {tag} after the repair: {e:#}"));
    }
}

#[test]
fn verify_of_an_unprotected_machine_says_protect_it_first() {
    let s = Sites::start(SitesOptions::default()).expect("sites");
    let r = s.cli(&["verify", "m1", "--wait"]).expect("verify");
    assert!(!r.ok, "verify of an unprotected machine ran: {}", r.text());
    assert!(r.text().contains("protect"), "{}", r.text());
}
