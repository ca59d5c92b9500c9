//! The DR lifecycle against the real CS, PSs,
//! MTs, agents and the `rebound` CLI on loopback (`rebound_lab::Sites`), every
//! step checked by blake3 (the full protect → failover → commit → reprotect
//! → failback loop is `multi_host`'s): failover at latest-app, change-point before commit,
//! unplanned failover with the source agent killed, a plan of three machines
//! in one consistency group at latest-multi with cross-machine dependent
//! writes, and the lifecycle errors (no point yet, wrong direction, a second
//! agent, a reprotect whose agent never comes).

use rebound_lab::*;
use serde_json::Value;
use std::time::Duration;

pub(crate) const JOB: Duration = Duration::from_secs(180);
pub(crate) const MIB: u64 = 1 << 20;

pub(crate) fn a() -> &'static str {
    "onprem"
}
pub(crate) fn b() -> &'static str {
    "azure"
}

pub(crate) fn succeeded(j: &Value) {
    assert_eq!(j["state"], "succeeded", "job failed: {j:#}");
    let took = j["ended_ms"].as_u64().unwrap_or(0) - j["started_ms"].as_u64().unwrap_or(0);
    eprintln!(
        "job {} {} {}: {took} ms",
        j["id"].as_str().unwrap_or(""),
        j["kind"].as_str().unwrap_or(""),
        j["machines"]
    );
}

pub(crate) fn protect(s: &Sites, m: &str, from: &str, to: &str) {
    let j = s
        .job(&[
            "protect",
            m,
            "--to",
            to,
            "--ps",
            &ps_id(from),
            "--mt",
            &mt_id(to),
        ])
        .expect("protect");
    succeeded(&j);
    s.wait_state(m, "Protected", JOB).expect("protected");
}

/// Runs `rebound failover <m> --from <from> --to <to> <extra…>` as a job and
/// asserts that it succeeded.
pub(crate) fn failover(s: &Sites, m: &str, from: &str, to: &str, extra: &[&str]) {
    let mut args = vec!["failover", m, "--from", from, "--to", to];
    args.extend_from_slice(extra);
    let j = s
        .job(&args)
        .unwrap_or_else(|e| panic!("failover of {m} {from}→{to}: {e:#}"));
    succeeded(&j);
}

/// Runs `rebound reprotect <m>` with the PS at `from` and the MT at `to`,
/// the job waiting up to `wait_agent` for the agent; `to_end` waits for the
/// job to end, else the started job is returned at once.
pub(crate) fn reprotect(
    s: &Sites,
    m: &str,
    from: &str,
    to: &str,
    wait_agent: &str,
    to_end: bool,
) -> Value {
    let (ps, mt) = (ps_id(from), mt_id(to));
    let args = [
        "reprotect",
        m,
        "--ps",
        &ps,
        "--mt",
        &mt,
        "--wait-agent",
        wait_agent,
    ];
    let j = if to_end {
        s.job(&args)
    } else {
        s.cli_json(&args)
    };
    j.unwrap_or_else(|e| panic!("reprotect of {m} {from}→{to}: {e:#}"))
}

/// The blake3 of the machine's disk0 at its source now.
pub(crate) fn source_hash(s: &Sites, m: &str) -> String {
    blake3_file(&s.source_disk(m, "disk0")).expect("hash source disk")
}

/// The default sites with machine m1 protected from A to B.
fn m1_protected() -> Sites {
    let s = Sites::start(SitesOptions::default()).expect("sites");
    protect(&s, "m1", a(), b());
    s
}

/// The file the machine's disk lives in while it runs at `site` from the
/// replica of `replication` (after a hand-over).
pub(crate) fn replica_hash(s: &Sites, site: &str, replication: &str) -> String {
    blake3_file(&s.replica_path(site, replication, "disk0")).expect("hash replica")
}

/// Waits until the machine is failed over and powered on at `site`; the
/// machine as the CLI lists it and its new replication id.
pub(crate) fn handed_over(s: &mut Sites, m: &str, site: &str) -> (Value, String) {
    let mm = s.wait_state(m, "FailedOver", JOB).expect("failed over");
    let repl = mm["replication_id"].as_str().unwrap().to_string();
    s.wait_powered_on(m, site, JOB)
        .unwrap_or_else(|e| panic!("{m} not powered on at {site}: {e:#}"));
    (mm, repl)
}

/// A planned failover at latest from `from` to `to`: the machine runs at
/// `to` from a replica equal to `want` (nothing lost). Returns the new
/// replication id.
pub(crate) fn fail_over_at_latest(
    s: &mut Sites,
    m: &str,
    from: &str,
    to: &str,
    want: &str,
) -> String {
    failover(s, m, from, to, &["--point", "latest"]);
    let (_, repl) = handed_over(s, m, to);
    assert_eq!(
        replica_hash(s, to, &repl),
        want,
        "failover {from}→{to} at latest lost writes"
    );
    repl
}

/// Waits until the machine's last point at the CS has at least `seq`.
pub(crate) fn wait_point_seq(s: &Sites, m: &str, seq: u64) {
    let start = std::time::Instant::now();
    loop {
        let mm = s.machine(m).expect("machine");
        if mm["last_point"]["seq"].as_u64().unwrap_or(0) >= seq {
            return;
        }
        assert!(start.elapsed() < JOB, "{m}: no point at seq {seq}: {mm}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn failover_at_latest_app_drops_later_writes_and_warns() {
    let mut s = m1_protected();
    let m = "m1";
    s.write(m, a(), "disk0", 0, 2 * MIB, 0x11).unwrap();
    let (app, seq) = s.tag(m, a(), "app").expect("app tag");
    let h_app = source_hash(&s, m);
    s.write(m, a(), "disk0", 4 * MIB, 2 * MIB, 0x22).unwrap();
    let h_after = source_hash(&s, m);
    assert_ne!(h_app, h_after);
    wait_point_seq(&s, m, seq);
    let r = s
        .cli(&[
            "failover",
            m,
            "--from",
            a(),
            "--to",
            b(),
            "--point",
            "latest-app",
            "--wait",
        ])
        .expect("failover");
    assert!(r.ok, "{}", r.text());
    assert!(
        r.stderr.contains("lost"),
        "no warning that later writes are lost: {}",
        r.text()
    );
    let (mm, r1) = handed_over(&mut s, m, b());
    assert_eq!(mm["failover_point"]["id"], app.as_str(), "{mm}");
    assert_eq!(replica_hash(&s, b(), &r1), h_app, "not the app point");
}

/// Two crash points of a protected machine and where it runs after a
/// failover at the second.
pub(crate) struct TwoPoints {
    /// The first point (1 MiB written at 0) and the source's hash at it.
    pub p1: String,
    pub h1: String,
    /// The second (the next MiB written too) and its hash.
    pub p2: String,
    pub h2: String,
    /// The replication the machine runs from at B.
    pub r1: String,
}

/// Cuts two points on `m` at A and fails it over to B at the second; the
/// replica it runs from at B equals the source at that point.
pub(crate) fn failed_over_at_the_second_of_two_points(s: &mut Sites, m: &str) -> TwoPoints {
    s.write(m, a(), "disk0", 0, MIB, 0x31).unwrap();
    let (p1, _) = s.tag(m, a(), "crash").unwrap();
    let h1 = source_hash(s, m);
    s.write(m, a(), "disk0", MIB, MIB, 0x32).unwrap();
    let (p2, seq2) = s.tag(m, a(), "crash").unwrap();
    let h2 = source_hash(s, m);
    wait_point_seq(s, m, seq2);
    failover(s, m, a(), b(), &["--point", &p2]);
    let (_, r1) = handed_over(s, m, b());
    assert_eq!(replica_hash(s, b(), &r1), h2);
    TwoPoints { p1, h1, p2, h2, r1 }
}

#[test]
fn change_point_before_commit_moves_and_back() {
    let mut s = m1_protected();
    let m = "m1";
    let TwoPoints { p1, h1, p2, h2, r1 } = failed_over_at_the_second_of_two_points(&mut s, m);
    s.stop_agent(m, b()).unwrap();
    succeeded(&s.job(&["change-point", m, "--point", &p1]).unwrap());
    assert_eq!(replica_hash(&s, b(), &r1), h1, "change-point to {p1}");
    assert_eq!(s.machine(m).unwrap()["failover_point"]["id"], p1.as_str());
    succeeded(&s.job(&["change-point", m, "--point", &p2]).unwrap());
    assert_eq!(replica_hash(&s, b(), &r1), h2, "change-point back to {p2}");
    succeeded(&s.job(&["commit", m]).unwrap());
    s.wait_state(m, "Committed", JOB).unwrap();
}

/// Writes 2 MiB of `byte` at the source of `m`, cuts a crash point, kills
/// the source agent and fails over unplanned at `latest-processed`: the
/// machine runs at b() from a replica equal to the source at that point.
/// The point's id, the machine as the CLI lists it, the replication and the
/// source's hash at the point.
pub(crate) fn unplanned_failover_after_killing_the_source(
    s: &mut Sites,
    m: &str,
    byte: u8,
) -> (String, Value, String, String) {
    s.write(m, a(), "disk0", 0, 2 * MIB, byte).unwrap();
    let (p, seq) = s.tag(m, a(), "crash").unwrap();
    let h = source_hash(s, m);
    wait_point_seq(s, m, seq);
    s.kill_agent(m, a()).unwrap();
    // A planned failover cannot drain a dead source; unplanned proceeds.
    failover(
        s,
        m,
        a(),
        b(),
        &["--point", "latest-processed", "--unplanned"],
    );
    let (mm, repl) = handed_over(s, m, b());
    assert_eq!(replica_hash(s, b(), &repl), h);
    (p, mm, repl, h)
}

#[test]
fn unplanned_failover_with_the_source_agent_killed() {
    let mut s = m1_protected();
    let m = "m1";
    let (p, mm, _, _) = unplanned_failover_after_killing_the_source(&mut s, m, 0x41);
    assert_eq!(mm["failover_point"]["id"], p.as_str(), "{mm}");
}

#[test]
fn plan_of_three_in_a_group_fails_over_at_one_group_point_respecting_dependencies() {
    let ms = ["m1", "m2", "m3"];
    let mut s = Sites::start(SitesOptions {
        machines: ms.iter().map(|m| m.to_string()).collect(),
        ..Default::default()
    })
    .expect("sites");
    s.cli_ok(&["group", "create", "g1", "--machines", "m1,m2,m3"])
        .unwrap();
    s.cli_ok(&[
        "plan",
        "create",
        "p1",
        "--group",
        "m1,m2,m3",
        "--consistency-group",
        "g1",
    ])
    .unwrap();
    for m in ms {
        let j = s
            .job(&[
                "protect",
                m,
                "--to",
                b(),
                "--ps",
                &ps_id(a()),
                "--mt",
                &mt_id(b()),
                "--group",
                "g1",
            ])
            .unwrap();
        succeeded(&j);
    }
    // Dependent writes: block k on m2 is written only after block k on m1
    // completed, while group points are cut concurrently.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cutter = {
        let stop = stop.clone();
        let cs = s.cs_addr.clone();
        let certs = s.cs_dir.clone();
        std::thread::spawn(move || {
            let mut tags = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = std::process::Command::new(binary("rebound").unwrap())
                    .args(["group", "cut", "g1", "--output", "json"])
                    .env("REBOUND_CS", &cs)
                    .env("REBOUND_CERTS", &certs)
                    .output()
                    .unwrap();
                if out.status.success() {
                    tags.push(String::from_utf8_lossy(&out.stdout).to_string());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            tags
        })
    };
    // m3 is written concurrently, independently.
    let m3_addr = s.agent_addr("m3", a()).unwrap();
    let m3_writer = std::thread::spawn(move || {
        for k in 0..24u64 {
            qemu_io(
                &nbd_uri(m3_addr, "disk0"),
                &[format!("write -P 119 {} 4096", k * 65536)],
            )
            .unwrap();
        }
    });
    // Group points are cut only while the first 16 pairs are written, so
    // the newest group point falls in the middle of the dependent writes.
    for k in 0..24u64 {
        if k == 16 {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        s.write("m1", a(), "disk0", k * 65536, 65536, (k + 1) as u8)
            .unwrap();
        s.write("m2", a(), "disk0", k * 65536, 65536, (k + 1) as u8)
            .unwrap();
    }
    m3_writer.join().unwrap();
    let tags = cutter.join().unwrap();
    assert!(!tags.is_empty(), "no group point was cut");
    std::thread::sleep(Duration::from_secs(3));
    succeeded(
        &s.job(&[
            "failover",
            "--plan",
            "p1",
            "--from",
            a(),
            "--to",
            b(),
            "--point",
            "latest-multi",
        ])
        .unwrap(),
    );
    let mut group_tags = Vec::new();
    let mut repls = Vec::new();
    for m in ms {
        let mm = s.wait_state(m, "FailedOver", JOB).unwrap();
        group_tags.push(mm["failover_point"]["group"].as_str().unwrap().to_string());
        repls.push(mm["replication_id"].as_str().unwrap().to_string());
        s.wait_powered_on(m, b(), JOB).unwrap();
    }
    assert!(!group_tags[0].is_empty(), "not a group point");
    assert!(
        group_tags.iter().all(|t| t == &group_tags[0]),
        "members at different group points: {group_tags:?}"
    );
    // No dependent write on m2 without its cause on m1.
    let read = |site: &str, r: &str| std::fs::read(s.replica_path(site, r, "disk0")).unwrap();
    let d1 = read(b(), &repls[0]);
    let d2 = read(b(), &repls[1]);
    let (mut n1, mut n2) = (0, 0);
    for k in 0..24usize {
        let on2 = d2[k * 65536] == (k + 1) as u8;
        let on1 = d1[k * 65536] == (k + 1) as u8;
        n1 += on1 as usize;
        n2 += on2 as usize;
        assert!(
            !on2 || on1,
            "m2 has write {k} but m1 does not have its cause"
        );
    }
    eprintln!(
        "group point {}: m1 has {n1}/24 writes, m2 {n2}/24; {} points cut",
        group_tags[0],
        tags.len()
    );
    assert!(
        n1 > 0 && n1 < 24,
        "the group point is not in the middle of the writes ({n1}/24 on m1)"
    );
}

#[test]
fn lifecycle_errors_with_a_protected_machine() {
    let mut s = Sites::start(SitesOptions {
        machines: vec!["m1".into(), "m2".into()],
        ..Default::default()
    })
    .expect("sites");
    // No recovery point yet: the error names the machine.
    let r = s
        .cli(&["failover", "m2", "--from", a(), "--to", b()])
        .unwrap();
    assert!(!r.ok);
    assert!(r.text().contains("m2"), "{}", r.text());
    protect(&s, "m1", a(), b());
    // Wrong direction.
    let r = s
        .cli(&["failover", "m1", "--from", b(), "--to", a()])
        .unwrap();
    assert!(!r.ok, "a failover in the wrong direction started");
    assert!(
        r.text().contains(a()) && r.text().contains(b()),
        "{}",
        r.text()
    );
    // A second writable agent for the same machine is refused (the lab's
    // second agent: same id and certificate, another state dir and port).
    let mut second_cfg: AgentConfig =
        config::read_toml(&s.path("agents/m1@onprem/agent.toml")).unwrap();
    second_cfg.state_dir = s.path("second-agent-state");
    let second_host = Host::next().addr();
    second_cfg.nbd_listen = second_host.to_string();
    // Its own metrics port too: the first agent holds the copied one.
    second_cfg.metrics_listen = config::metrics_listen(second_host.ip(), true);
    config::write_toml(&s.path("second-agent.toml"), &second_cfg).unwrap();
    let log = std::fs::File::create(s.path("second-agent.log")).unwrap();
    let mut second = std::process::Command::new(binary("rebound-agent").unwrap())
        .args(["run", "--config"])
        .arg(s.path("second-agent.toml"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until("second agent refused", Duration::from_secs(30), || {
        std::fs::read_to_string(s.path("second-agent.log"))
            .unwrap_or_default()
            .contains("already has an agent connected")
    })
    .expect("the CS refuses a second agent for m1");
    let _ = second.kill();
    let _ = second.wait();
    // Reprotect whose agent never comes: times out with the actionable message.
    failover(&s, "m1", a(), b(), &[]);
    s.wait_powered_on("m1", b(), JOB).unwrap();
    succeeded(&s.job(&["commit", "m1"]).unwrap());
    s.stop_agent("m1", b()).unwrap();
    s.stop_agent("m1", a()).unwrap();
    let r = s
        .cli(&[
            "reprotect",
            "m1",
            "--ps",
            &ps_id(b()),
            "--wait-agent",
            "3s",
            "--wait",
        ])
        .unwrap();
    assert!(!r.ok, "reprotect without an agent succeeded");
    // Not a terminal: the job's progress came as plain lines.
    assert!(
        r.stdout.contains("waiting for agent on m1 to register"),
        "no plain progress line: {}",
        r.text()
    );
    let t = r.text();
    eprintln!("rebound reprotect --wait printed:\n{t}");
    assert!(
        t.contains("did not register") && t.contains("rebound-agent") && t.contains("site"),
        "the timeout does not say what to check: {t}"
    );
}
