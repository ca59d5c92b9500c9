//! Two configuration servers on one PostgreSQL: kill -9 of the active one in
//! the middle of a failover job, the standby takes over and the job ends
//! exact.
//!
//! The lab runs the CS as `cs` (which takes the store lease first) and a
//! standby `cs2` on a host of its own; components know both addresses
//! (`[cs] addr` and `standby`), the CLI dials `A,A2`. The takeover bound is
//! the issue's: the standby serves within 10 s of the kill.
//!
//! The kill lands in the middle of the job by construction, not by timing:
//! the source agent is stopped (SIGSTOP) before the failover starts, so the
//! job waits in "fence m1 at the source" for the agent's answer (the bus
//! queues the command and waits up to the CS's `command_timeout_secs`, 30 s
//! in the lab). The test kills the active CS once `rebound jobs` shows that
//! step running, waits for the standby to serve, then continues the agent
//! (SIGCONT): it reconnects to the standby, which runs the fence again
//! (same shutdown tag, so the agent answers it idempotently) and the rest of
//! the job.

use crate::lifecycle::{
    a, b, handed_over, protect, replica_hash, source_hash, succeeded, wait_point_seq, JOB, MIB,
};
use crate::support::Paused;
use rebound_lab::sites::{CS, CS_STANDBY};
use rebound_lab::*;
use serde_json::Value;
use std::time::Duration;

/// The longest a takeover may take, from the kill to the standby serving.
const TAKEOVER: Duration = Duration::from_secs(10);

/// How long the lab waits for the standby at most (past the bound, so a slow
/// takeover is measured and reported rather than cut off).
const TAKEOVER_WAIT: Duration = Duration::from_secs(60);

/// Sites on PostgreSQL with a standby CS; `machines` at onprem.
fn pair(machines: &[&str]) -> Sites {
    Sites::start(SitesOptions {
        postgres: true,
        standby_cs: true,
        machines: machines.iter().map(|m| m.to_string()).collect(),
        disks: vec![("disk0".into(), 64 * MIB)],
        ..Default::default()
    })
    .expect("sites with a standby CS on PostgreSQL (PG_SCRATCH_URL)")
}

/// `rebound_cs_active` of the lab's CS `name`.
fn active_gauge(s: &Sites, name: &str) -> Option<f64> {
    let addr = s.metrics_addr(name).ok()?;
    rebound_lab::metrics::scrape(addr)
        .ok()?
        .value("rebound_cs_active", &[])
}

/// The job as the CLI shows it, or None while no CS answers.
fn job_now(s: &Sites, id: &str) -> Option<Value> {
    let r = s.cli(&["jobs", id, "--output", "json"]).ok()?;
    if !r.ok {
        return None;
    }
    serde_json::from_str(&r.stdout).ok()
}

fn steps(j: &Value) -> Vec<Value> {
    j["steps"].as_array().cloned().unwrap_or_default()
}

fn done_steps(j: &Value) -> usize {
    steps(j).iter().filter(|st| st["state"] == "done").count()
}

/// The step the job waits in while the source agent is stopped.
fn held_step(machine: &str) -> String {
    format!("fence {machine} at the source")
}

/// Polls the job until step `name` runs: the moment to kill its CS. The
/// job as seen then.
fn job_in_step(s: &Sites, id: &str, name: &str) -> Value {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(j) = job_now(s, id) {
            assert!(
                j["state"] != "succeeded" && j["state"] != "failed",
                "the job ended while its source agent was stopped: {j:#}"
            );
            if steps(&j)
                .iter()
                .any(|st| st["name"] == name && st["state"] == "running")
            {
                return j;
            }
        }
        assert!(t0.elapsed() < JOB, "job {id} did not reach step '{name}'");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the job ended (through whichever CS serves); the job.
fn job_end(s: &Sites, id: &str) -> Value {
    let t0 = std::time::Instant::now();
    let mut last = Value::Null;
    loop {
        if let Some(j) = job_now(s, id) {
            if j["state"] == "succeeded" || j["state"] == "failed" {
                return j;
            }
            last = j;
        }
        assert!(t0.elapsed() < JOB, "job {id} did not end: {last:#}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn kill_9_of_the_active_cs_mid_failover_the_standby_finishes_the_job_exact() {
    let mut s = pair(&["m1"]);
    let m = "m1";
    assert_eq!(s.active_cs().expect("active CS"), CS);
    assert!(
        !s.cs_serves(CS_STANDBY).expect("ask the standby"),
        "the standby serves while the first CS holds the lease"
    );
    protect(&s, m, a(), b());

    s.write(m, a(), "disk0", 0, 4 * MIB, 0x5a).unwrap();
    let (p, seq) = s.tag(m, a(), "crash").expect("crash point");
    let h = source_hash(&s, m);
    wait_point_seq(&s, m, seq);
    // Writes after the point: the drain and the rollback have work to do
    // on the standby.
    s.write(m, a(), "disk0", 8 * MIB, 32 * MIB, 0xa5).unwrap();
    assert_ne!(source_hash(&s, m), h);

    // Stopped until the standby serves: the job cannot pass the fence.
    let agent = format!("agent-{m}@{}", a());
    let paused = Paused::new(s.pid(&agent).expect("the source agent runs"));
    let started = s
        .cli_json(&["failover", m, "--from", a(), "--to", b(), "--point", &p])
        .expect("start the failover");
    let id = started["id"].as_str().expect("job id").to_string();
    let before = job_in_step(&s, &id, &held_step(m));
    let killed = s.kill_cs_active().expect("kill -9 the active CS");
    let kill_ms = rebound_common::time::now_ms();
    assert_eq!(killed.name, CS, "the first CS held the lease");

    let took = s
        .wait_cs_serves(CS_STANDBY, killed.at, TAKEOVER_WAIT)
        .expect("the standby takes over");
    eprintln!(
        "standby takeover: {} ms from kill -9 of {} to {} serving `rebound machines` \
         (job {id} was in step '{}' with its source agent stopped, {} of {} steps done)",
        took.as_millis(),
        killed.addr,
        s.cs_listen(CS_STANDBY).unwrap(),
        held_step(m),
        done_steps(&before),
        steps(&before).len()
    );
    assert!(
        took <= TAKEOVER,
        "the standby took {took:?} to serve, over {TAKEOVER:?}"
    );
    assert!(
        s.cs_is_dead(&killed).unwrap(),
        "the killed CS still runs or listens"
    );
    assert_eq!(s.active_cs().expect("active CS"), CS_STANDBY);
    assert!(!s.cs_serves(CS).unwrap(), "the killed CS answered");
    drop(paused);

    let end = job_end(&s, &id);
    succeeded(&end);
    // Resumed, not restarted: what was done before the kill kept its times,
    // and the rest ran on the standby.
    assert_eq!(end["started_ms"], before["started_ms"], "{end:#}");
    let (old, new) = (steps(&before), steps(&end));
    for (o, n) in old.iter().zip(&new) {
        if o["state"] == "done" {
            assert_eq!(
                (&n["started_ms"], &n["ended_ms"]),
                (&o["started_ms"], &o["ended_ms"]),
                "step {} ran again after the takeover: {end:#}",
                o["name"]
            );
        }
    }
    let after_kill = (new.iter())
        .filter(|st| st["ended_ms"].as_u64().unwrap_or(0) >= kill_ms)
        .count();
    assert!(
        after_kill > 0,
        "no step of the job ended after the kill: it was not mid-job: {end:#}"
    );
    let held = new.iter().find(|st| st["name"] == held_step(m).as_str());
    assert!(
        held.is_some_and(|st| st["ended_ms"].as_u64().unwrap_or(0) >= kill_ms),
        "the step held by the stopped agent did not end on the standby: {end:#}"
    );
    let log = std::fs::read_to_string(s.path("cs2.log")).unwrap_or_default();
    assert!(
        log.contains("resuming job"),
        "the standby did not say it resumed the job: {}",
        s.log_tail(CS_STANDBY, 30)
    );
    eprintln!(
        "job {id}: {} of {} steps done before the kill, {after_kill} ended on the standby",
        done_steps(&before),
        new.len()
    );

    let (mm, repl) = handed_over(&mut s, m, b());
    assert_eq!(mm["state"], "FailedOver", "{mm}");
    assert_eq!(mm["failover_point"]["id"], p.as_str(), "{mm}");
    assert_eq!(
        replica_hash(&s, b(), &repl),
        h,
        "the failed-over replica is not the source at {p}"
    );
}

#[test]
fn the_cli_dials_both_cs_addresses_before_and_after_the_switch() {
    let mut s = Sites::cs_only(SitesOptions {
        postgres: true,
        standby_cs: true,
        ..Default::default()
    })
    .expect("a CS pair on PostgreSQL (PG_SCRATCH_URL)");
    assert!(s.cs_dial.contains(','), "{}", s.cs_dial);
    s.cli_ok(&["machines"]).expect("machines before the switch");
    assert_eq!(active_gauge(&s, CS), Some(1.0));
    assert_eq!(active_gauge(&s, CS_STANDBY), Some(0.0));
    let health = rebound_lab::metrics::healthz(s.metrics_addr(CS_STANDBY).unwrap()).unwrap();
    assert_eq!(health.0, 503, "a waiting standby is not ready: {health:?}");

    let killed = s.kill_cs_active().expect("kill -9 the active CS");
    let took = s
        .wait_cs_serves(CS_STANDBY, killed.at, TAKEOVER_WAIT)
        .expect("the standby takes over");
    eprintln!("standby takeover (no load): {} ms", took.as_millis());
    assert!(took <= TAKEOVER, "the standby took {took:?}");

    // The same `--cs A,A2` now reaches the standby.
    s.cli_ok(&["machines"]).expect("machines after the switch");
    s.cli_ok(&["status"]).expect("status after the switch");
    assert_eq!(active_gauge(&s, CS_STANDBY), Some(1.0));
    // It signs with the deployment's CA, shared through the store.
    let certs = s.path("late-agent");
    s.enroll("rebound-agent", "late", &certs)
        .expect("enroll at the standby");
    let ca = std::fs::read(s.cs_dir.join("ca.pem")).unwrap();
    assert_eq!(std::fs::read(certs.join("ca.pem")).unwrap(), ca);
}
