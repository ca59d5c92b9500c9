//! Test failover (DESIGN.md §7 views, §9): a writable copy-on-write view of
//! a pinned point at the MT, served over NBD, while replication and
//! retention go on; cleanup discards it and unpins.

use crate::lifecycle::{a, b, protect, source_hash, succeeded, JOB, MIB};
use rebound_common::nbd::client::NbdClient;
use rebound_common::tls::TlsFiles;
use rebound_lab::clients::{nbd_tls_dir, qemu_tls_args, run_tool};
use rebound_lab::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const EXPORT: &str = "m1/disk0@test";

/// Polls `done` every 300 ms until it holds; fails naming `what`.
fn eventually(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    wait_for(what, within, Duration::from_millis(300), || Ok(done()))
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Writes `len` bytes of `pattern` at `offset` into the test copy through
/// qemu-io over TLS with the admin certificate.
fn write_test_copy(s: &Sites, offset: u64, len: u64, pattern: u8) {
    let certs = nbd_tls_dir(
        &TlsFiles::in_dir(&s.cs_dir, "admin"),
        &s.path("nbd-admin-io"),
    )
    .unwrap();
    let mut args: Vec<String> = qemu_tls_args(s.sites[b()].mt_nbd, EXPORT, &certs).to_vec();
    args.extend(["-c".into(), format!("write -P {pattern} {offset} {len}")]);
    args.extend(["-c".into(), "flush".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_tool("qemu-io", &args).expect("qemu-io write to the test copy");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "qemu-io: {text}");
}

/// The ids of m1's recovery points as `rebound points` lists them.
fn point_ids(s: &Sites) -> Vec<String> {
    let pts = s.points("m1").expect("points");
    pts["points"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_str().map(String::from))
        .collect()
}

/// Cuts a crash point at the source now; its id and the source's blake3.
fn cut(s: &Sites) -> (String, String) {
    let (id, _) = s.tag("m1", a(), "crash").expect("tag");
    (id, source_hash(s, "m1"))
}

fn machine(s: &Sites) -> Value {
    s.machine("m1").expect("machine")
}

#[test]
fn a_test_copy_of_a_pinned_point_while_replication_and_retention_go_on() {
    let s = Sites::start(SitesOptions::default()).expect("sites");
    protect(&s, "m1", a(), b());
    s.write("m1", a(), "disk0", 0, MIB, 0x11).expect("write");
    let (p, hp) = cut(&s);
    s.wait_view_hash(b(), "m1", "disk0", &p, &hp, JOB)
        .expect("point p at the MT");
    // The point's content, to model the test copy's writes on.
    let model = s.path("model.img");
    std::fs::copy(s.source_disk("m1", "disk0"), &model).unwrap();

    let j = s
        .job(&["test-failover", "m1", "--point", &p])
        .expect("test-failover");
    succeeded(&j);
    let env = s
        .wait_test_hook_env("m1", b(), "test_power_on", JOB)
        .expect("test_power_on ran");
    assert_eq!(env.get("REBOUND_POINT"), Some(&p), "{env:?}");
    assert_eq!(env.get("REBOUND_MACHINE").map(String::as_str), Some("m1"));
    assert_eq!(
        env.get("REBOUND_TEST_EXPORTS").map(String::as_str),
        Some(EXPORT)
    );
    assert_eq!(
        env.get("REBOUND_TEST_EXPORT_DISK0").map(String::as_str),
        Some(EXPORT)
    );
    assert_eq!(
        env.get("REBOUND_NBD_ADDRESS"),
        Some(&s.sites[b()].mt_nbd.to_string()),
        "{env:?}"
    );
    assert_eq!(
        s.view_hash(b(), "m1", "disk0", "test").unwrap(),
        hp,
        "the copy reads as p"
    );
    eventually("rebound machines to show the test copy", JOB, || {
        let m = machine(&s);
        m["test_point"] == p.as_str() && m["test_exports"] == serde_json::json!([EXPORT])
    });

    // A short window: without the pin, retention would drop p soon.
    s.cli_ok(&["policy", "set", "m1", "--retention-window", "2s"])
        .expect("policy set");
    // Writes go on at the source and into the test copy.
    s.write("m1", a(), "disk0", 512, 3 * MIB, 0x22)
        .expect("write");
    write_test_copy(&s, 4096 + 512, 10_000, 0x77);
    write_test_copy(&s, 8 * MIB, MIB, 0x78);
    write_at(&model, 4096 + 512, &[0x77; 10_000]).unwrap();
    write_at(&model, 8 * MIB, &vec![0x78; MIB as usize]).unwrap();
    s.write("m1", a(), "disk0", 6 * MIB, MIB, 0x33)
        .expect("write");
    let (q, hq) = cut(&s);
    // Later points are exact: the test copy's writes never reach the replica.
    s.wait_view_hash(b(), "m1", "disk0", &q, &hq, JOB)
        .expect("point q at the MT");
    assert_eq!(
        s.view_hash(b(), "m1", "disk0", "test").unwrap(),
        blake3_file(&model).unwrap(),
        "the test copy reads as p plus its own writes"
    );

    // Retention drops everything older than p, and keeps p for the pin.
    eventually("retention to drop the points before p", JOB, || {
        point_ids(&s).first() == Some(&p)
    });
    // A pass that held p, then a further pass that still held it.
    let pinned = format!("a test failover pins point {p}");
    let still = format!("retention pass: the test failover's pin still holds point {p}");
    eventually("a retention pass after the one that pinned p", JOB, || {
        let log = s.log_tail(&mt_id(b()), 400);
        log.find(&pinned)
            .is_some_and(|at| log[at..].contains(&still))
    });
    assert!(
        point_ids(&s).contains(&p),
        "the pinned point {p} was dropped"
    );
    assert_eq!(
        s.view_hash(b(), "m1", "disk0", &p).unwrap(),
        hp,
        "the pinned point stays exact"
    );

    // Cleanup leaves nothing behind; a connection open across it gets errors.
    let mut open = NbdClient::connect_uri(&s.view_uri(b(), "m1", "disk0", "test").unwrap())
        .expect("connect to the test copy");
    assert!(!open.read_only(), "the test copy is writable");
    open.read_at(0, &mut [0u8; 4096])
        .expect("read the test copy");
    let j = s
        .job(&["test-failover-cleanup", "m1"])
        .expect("test-failover-cleanup");
    succeeded(&j);
    s.wait_test_hook_env("m1", b(), "test_power_off", JOB)
        .expect("test_power_off ran");
    let repl = machine(&s)["replication_id"].as_str().unwrap().to_string();
    let data = s.replica_path(b(), &repl, "disk0");
    let test_dir = data.parent().and_then(Path::parent).unwrap().join("test");
    assert!(!test_dir.exists(), "{} is left", test_dir.display());
    assert!(
        open.read_at(0, &mut [0u8; 4096]).is_err(),
        "a connection to the test copy still reads after cleanup"
    );
    assert!(
        s.view_hash(b(), "m1", "disk0", "test").is_err(),
        "the test export is still served"
    );
    eventually("rebound machines to drop the test copy", JOB, || {
        let m = machine(&s);
        m["test_point"].as_str().unwrap_or("").is_empty()
            && m["test_exports"].as_array().is_none_or(Vec::is_empty)
    });
    eventually("retention to drop the unpinned point", JOB, || {
        !point_ids(&s).contains(&p)
    });
    let (r, hr) = cut(&s);
    s.wait_view_hash(b(), "m1", "disk0", &r, &hr, JOB)
        .expect("points stay exact after cleanup");
}
