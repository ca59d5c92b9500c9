//! The configuration server manages its fleet: `rebound components`,
//! `rebound policy set` reaching a running agent and MT, the retention set
//! at reprotect, `rebound unprotect` and `rebound remove`.

use crate::lifecycle::{a, b, fail_over_at_latest, protect, source_hash, succeeded};
use rebound_lab::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

const JOB: Duration = Duration::from_secs(180);
const MIB: u64 = 1 << 20;

fn now_ms() -> u64 {
    rebound_common::time::now_ms()
}

/// One component of `rebound components --output json`.
fn component(list: &Value, role: &str, id: &str) -> Value {
    list["components"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["role"] == role && c["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("{role}:{id} not in `rebound components`: {list:#}"))
}

/// Polls `done` until it holds; fails naming `what` after `within`.
fn eventually(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls until `path` no longer exists.
fn wait_gone(path: &Path, within: Duration) {
    eventually(&format!("{} to be gone", path.display()), within, || {
        !path.exists()
    });
}

/// `rebound <verb> m1 --ps <PS at from> --mt <MT at to> <extra…>` as a job
/// that must succeed.
fn run_job(s: &Sites, verb: &str, from: &str, to: &str, extra: &[&str]) {
    let (ps, mt) = (ps_id(from), mt_id(to));
    let mut args = vec![verb, "m1", "--ps", &ps, "--mt", &mt];
    args.extend_from_slice(extra);
    let j = s.job(&args).unwrap_or_else(|e| panic!("{args:?}: {e:#}"));
    succeeded(&j);
}

#[test]
fn components_lists_version_certificate_expiry_and_health_and_remove_forgets_a_stopped_one() {
    let mut s = Sites::start(SitesOptions::default()).expect("sites");
    let list = s.cli_json(&["components"]).expect("components");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(list["cs_version"], version, "{list:#}");
    let now = now_ms();
    for (role, id) in [
        ("agent", "m1".to_string()),
        ("ps", ps_id(a())),
        ("mt", mt_id(b())),
    ] {
        let c = component(&list, role, &id);
        assert_eq!(c["version"], version, "{c:#}");
        assert_eq!(c["version_mismatch"], "", "{c:#}");
        assert_eq!(c["health"], "online", "{c:#}");
        let expiry = c["cert_expiry_ms"].as_u64().unwrap_or(0);
        assert!(
            expiry > now + 86_400_000,
            "{role}:{id} expiry not in the future: {c:#}"
        );
        assert!(c["last_heartbeat_ms"].as_u64().unwrap_or(0) > 0, "{c:#}");
        assert!(
            !c["addresses"].as_array().unwrap().is_empty() || role == "agent",
            "{c:#}"
        );
    }
    let table = s.cli_ok(&["components"]).expect("components table");
    for w in [
        "CERTIFICATE EXPIRES",
        "days left",
        "ps-onprem",
        "mt-azure",
        version,
        "online",
    ] {
        assert!(
            table.contains(w),
            "`rebound components` lacks {w:?}:\n{table}"
        );
    }

    // An online component is not forgotten; a stopped one is.
    let ps = ps_id(b());
    let r = s.cli(&["remove", &format!("ps:{ps}")]).expect("remove");
    assert!(!r.ok, "removing an online PS was accepted: {}", r.text());
    assert!(r.text().contains("online"), "{}", r.text());
    s.stop(&ps).expect("stop ps");
    eventually(&format!("{ps} offline"), Duration::from_secs(30), || {
        component(&s.cli_json(&["components"]).unwrap(), "ps", &ps)["health"] == "offline"
    });
    let out = s.cli_ok(&["remove", "ps", &ps]).expect("remove stopped ps");
    assert!(out.contains("forgotten"), "{out}");
    let list = s.cli_json(&["components"]).expect("components");
    let ids: Vec<&str> = list["components"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert!(!ids.contains(&ps.as_str()), "{ps} still listed: {ids:?}");
}

/// Crash points of m1 whose time falls in `[from, to)` ms.
fn crash_points_between(s: &Sites, from: u64, to: u64) -> usize {
    let pts = s.points("m1").expect("points");
    pts["points"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter(|p| p["kind"] == "crash")
                .filter(|p| p["time_ms"].as_u64().is_some_and(|t| t >= from && t < to))
                .count()
        })
        .unwrap_or(0)
}

/// Writes to m1 at the first site for `d`, a few times a second, so every
/// interval has something to cut a crash point on.
fn keep_writing(s: &Sites, d: Duration) {
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < d {
        s.write(
            "m1",
            a(),
            "disk0",
            (i % 8) * MIB,
            64 << 10,
            (i % 200) as u8 + 1,
        )
        .expect("write");
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn policy_set_changes_the_crash_interval_of_the_running_agent() {
    let s = Sites::start(SitesOptions::default()).expect("sites");
    run_job(
        &s,
        "protect",
        a(),
        b(),
        &["--to", b(), "--crash-interval", "5s"],
    );
    s.wait_state("m1", "Protected", JOB).expect("protected");

    let window = Duration::from_secs(4);
    let t0 = now_ms();
    keep_writing(&s, window);
    let t1 = now_ms();

    let out = s
        .cli_ok(&["policy", "set", "m1", "--crash-interval", "300ms"])
        .expect("policy set");
    assert!(out.contains("300ms"), "{out}");
    let set = s
        .cli_json(&["policy", "set", "m1", "--rpo-alert", "10m"])
        .expect("policy set json");
    assert_eq!(set["policy"]["crash_interval_ms"], 300, "{set:#}");
    assert_eq!(set["policy"]["rpo_alert_ms"], 600_000, "{set:#}");
    assert_eq!(set["pending"], serde_json::json!([]), "{set:#}");
    let m = s.machine("m1").expect("machine");
    assert_eq!(m["policy"]["crash_interval_ms"], 300, "{m:#}");
    let table = s.cli_ok(&["machines"]).expect("machines");
    assert!(table.contains("m1 policy: crash 300ms"), "{table}");

    let t2 = now_ms() + 300;
    keep_writing(&s, window);
    let t3 = now_ms();
    // Every point of both windows reaches the MT (the agent keeps cutting,
    // so a later point means the earlier ones are applied).
    let start = Instant::now();
    let after = loop {
        let n = crash_points_between(&s, t2, t3);
        if n >= 5 || start.elapsed() > Duration::from_secs(60) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let before = crash_points_between(&s, t0, t1);
    eprintln!(
        "crash points: {before} in {} ms at 5s, {after} in {} ms at 300ms",
        t1 - t0,
        t3 - t2
    );
    assert!(
        before <= 2,
        "{before} crash points in 4 s at a 5 s interval"
    );
    assert!(
        after >= 5,
        "only {after} crash points in ~4 s at a 300 ms interval"
    );
}

#[test]
fn reprotect_with_a_retention_window_is_what_the_mt_applies() {
    let mut s = Sites::start(SitesOptions::default()).expect("sites");
    protect(&s, "m1", a(), b());
    s.write("m1", a(), "disk0", 0, MIB, 0x31).expect("write");
    let h = source_hash(&s, "m1");
    fail_over_at_latest(&mut s, "m1", a(), b(), &h);
    s.stop_agent("m1", a()).expect("stop agent at A");
    succeeded(&s.job(&["commit", "m1"]).expect("commit"));
    s.wait_online("agent", "m1", JOB)
        .expect("agent at B online");

    run_job(&s, "reprotect", b(), a(), &["--retention-window", "3s"]);
    let m = s.wait_state("m1", "Protected", JOB).expect("protected B→A");
    let repl = m["replication_id"].as_str().unwrap().to_string();

    // The MT at A reports the new replication with the 3 s window.
    let what = format!(
        "MT {} to report retention_window_secs = 3 for {repl}",
        mt_id(a())
    );
    eventually(&what, Duration::from_secs(30), || {
        let list = s.cli_json(&["components"]).expect("components");
        let mt = component(&list, "mt", &mt_id(a()));
        mt["status"]["mt"]["replications"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["replication_id"] == repl.as_str()))
            .is_some_and(|r| r["retention_window_secs"] == 3)
    });

    // And it prunes by it: with a point cut every 500 ms, the replication's
    // first points fall out of the 3 s window (the MT's default keeps 24 h).
    let oldest = |s: &Sites| -> u64 {
        let pts = s.points("m1").expect("points");
        (pts["points"].as_array().into_iter().flatten())
            .filter_map(|p| p["time_ms"].as_u64())
            .min()
            .unwrap_or(0)
    };
    let first = oldest(&s);
    assert!(first > 0, "no point of {repl} yet");
    let mut n = 0u8;
    eventually(
        "the first points to fall out of the 3 s window",
        Duration::from_secs(60),
        || {
            n = n.wrapping_add(1);
            s.write("m1", b(), "disk0", 0, 4096, n).expect("write at B");
            s.tag("m1", b(), "crash").expect("tag at B");
            std::thread::sleep(Duration::from_millis(500));
            oldest(&s) > first
        },
    );
}

#[test]
fn unprotect_drops_the_ps_cache_and_keeps_or_deletes_the_replica() {
    let s = Sites::start(SitesOptions::default()).expect("sites");
    protect(&s, "m1", a(), b());
    s.write("m1", a(), "disk0", 0, MIB, 0x41).expect("write");
    let cache = s.path(&format!("{}/{}/cache/m1", a(), ps_id(a())));
    assert!(cache.exists(), "no PS cache at {}", cache.display());

    // The MT is in use: it cannot be forgotten.
    let r = s
        .cli(&["remove", &format!("mt:{}", mt_id(b()))])
        .expect("remove");
    assert!(!r.ok, "removing a used MT was accepted");

    let j = s.job(&["unprotect", "m1"]).expect("unprotect");
    succeeded(&j);
    assert_eq!(j["kind"], "unprotect");
    let m = s.wait_state("m1", "Unprotected", JOB).expect("unprotected");
    assert_eq!(m["replication_id"], "", "{m:#}");
    wait_gone(&cache, Duration::from_secs(30));
    let replica = s.replica_path(b(), "m1", "disk0");
    assert!(
        replica.exists(),
        "the replica was deleted without --delete-replica"
    );
    // The machine keeps running on its disks.
    s.write("m1", a(), "disk0", MIB, MIB, 0x42)
        .expect("write after unprotect");

    // Protect again (a new replication, which adopts the kept replica at the
    // MT for a differential resync), then unprotect deleting the replica.
    protect(&s, "m1", a(), b());
    let repl = s.machine("m1").unwrap()["replication_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(repl, "m1");
    let replica = s.replica_path(b(), &repl, "disk0");
    assert!(replica.exists(), "no replica at {}", replica.display());
    succeeded(
        &s.job(&["unprotect", "m1", "--delete-replica"])
            .expect("unprotect"),
    );
    s.wait_state("m1", "Unprotected", JOB).expect("unprotected");
    wait_gone(&replica, Duration::from_secs(30));
}

#[test]
fn fleet_subcommands_have_help() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["components"], &["--output", "certificate"]),
        (
            &["policy", "set"],
            &[
                "--crash-interval",
                "--retention-window",
                "--retention-size",
                "--rpo-alert",
            ],
        ),
        (&["unprotect"], &["--delete-replica", "--wait"]),
        (&["remove"], &["ps:ps-onprem"]),
        (&["protect"], &["--retention-window", "--rpo-alert"]),
        (&["reprotect"], &["--retention-size"]),
    ];
    for (sub, words) in cases {
        let mut args = sub.to_vec();
        args.push("--help");
        let r = cli::rebound(&args).expect("rebound");
        assert!(r.ok, "rebound {args:?}: {}", r.text());
        for w in *words {
            assert!(
                r.text().contains(w),
                "rebound {args:?} lacks {w}: {}",
                r.text()
            );
        }
    }
}
