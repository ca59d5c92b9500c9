//! Failures an operator can see: a broken link (agent to PS, PS to MT)
//! reaches the configuration server as an event naming the cause and the
//! fix, and the job waiting on that link shows it.

use crate::lifecycle::JOB;
use rebound_lab::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// How soon the operator must see the cause.
const SEEN_WITHIN: Duration = Duration::from_secs(30);

/// The newest event of `kind` from `component` in `rebound status`.
fn event(s: &Sites, component: &str, kind: &str) -> Option<Value> {
    let st = s.cli_json(&["status"]).ok()?;
    st["events"]
        .as_array()?
        .iter()
        .find(|e| e["component"] == component && e["kind"] == kind)
        .cloned()
}

#[test]
fn a_ps_certificate_without_its_address_shows_at_the_cs_and_on_the_protect_job() {
    let mut s = Sites::start(SitesOptions::default()).expect("sites");
    let (m, from, to) = ("m1", "onprem", "azure");
    let ps = ps_id(from);
    let ps_host = s.sites[from].ps[0].1.ip().to_string();
    s.write(m, from, "disk0", 0, 2 << 20, 0x5c).expect("write");
    let source = blake3_file(&s.source_disk(m, "disk0")).expect("hash source");

    // The PS restarts with a certificate for another name.
    s.reissue_ps_cert(from, &ps, &["wrong.invalid"])
        .expect("PS with a wrong certificate");
    let started = Instant::now();
    let job = s
        .cli_json(&["protect", m, "--to", to, "--ps", &ps, "--mt", &mt_id(to)])
        .expect("protect");
    let id = job["id"].as_str().expect("job id").to_string();

    // An error event at the CS naming the TLS problem and the fix.
    let mut seen = None;
    while started.elapsed() < SEEN_WITHIN && seen.is_none() {
        seen = event(&s, &format!("agent:{m}"), "link-tls-name");
        std::thread::sleep(Duration::from_millis(300));
    }
    let ev = seen.unwrap_or_else(|| {
        panic!(
            "no link-tls-name event from agent:{m} within {SEEN_WITHIN:?}: {}\n--- agent log ---\n{}",
            s.cli_ok(&["status"]).unwrap_or_default(),
            s.log_tail(&format!("agent-{m}@{from}"), 20)
        )
    });
    let msg = ev["message"].as_str().unwrap_or_default();
    eprintln!("after {:?}: event {msg}", started.elapsed());
    assert_eq!(ev["severity"], "error", "{ev}");
    assert!(
        msg.contains(&format!("TLS certificate not valid for name {ps_host}"))
            && msg.contains("wrong.invalid")
            && msg.contains(&format!("rebound-ps enroll --name {ps_host}"))
            && msg.contains("restart"),
        "the event does not name the TLS error and the fix: {msg}"
    );

    // The protect job shows the cause while it waits.
    let remaining = SEEN_WITHIN.saturating_sub(started.elapsed()) + Duration::from_secs(2);
    let j = s
        .wait_job_status(&id, "not valid for name", remaining)
        .expect("the job's status names the cause");
    assert!(
        j["status"]
            .as_str()
            .unwrap_or_default()
            .contains("enroll --name"),
        "{j}"
    );
    eprintln!("job status: {}", j["status"]);
    let list = s.cli_ok(&["jobs"]).expect("rebound jobs");
    let flat: String = list.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains(&id) && flat.contains("not valid for name"),
        "`rebound jobs` does not show the cause: {list}"
    );
    let detail = s.cli_ok(&["jobs", &id]).expect("rebound jobs ID");
    assert!(detail.contains("not valid for name"), "{detail}");

    // Put right: the certificate names the address; the job completes and
    // the first point is the source.
    s.reissue_ps_cert(from, &ps, &[&ps_host, "localhost"])
        .expect("PS with the right certificate");
    let j = wait_job_end(&s, &id);
    assert_eq!(j["state"], "succeeded", "{j:#}");
    let ok = event(&s, &format!("agent:{m}"), "link-restored");
    assert!(ok.is_some(), "no link-restored event from agent:{m}");
    let points = s.points(m).expect("points");
    let first = points["points"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no point: {points}"))
        .to_string();
    s.wait_view_hash(to, m, "disk0", &first, &source, JOB)
        .expect("the first point is the source");
}

/// Waits until job `id` ends; the job as `rebound jobs ID` shows it.
fn wait_job_end(s: &Sites, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let j = s.get_job(id).expect("rebound jobs ID");
        if j["state"] == "succeeded" || j["state"] == "failed" {
            return j;
        }
        assert!(start.elapsed() < JOB, "job {id} did not end: {j:#}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_stopped_mt_shows_as_a_refused_link_of_the_ps_until_it_is_back() {
    let mut s = Sites::start(SitesOptions::default()).expect("sites");
    let (m, from, to) = ("m1", "onprem", "azure");
    crate::lifecycle::protect(&s, m, from, to);
    let ps = format!("ps:{}", ps_id(from));

    s.stop(&mt_id(to)).expect("stop the MT");
    s.write(m, from, "disk0", 0, 1 << 20, 0x11).expect("write");
    let started = Instant::now();
    let mut seen = None;
    while started.elapsed() < SEEN_WITHIN && seen.is_none() {
        seen = event(&s, &ps, "link-refused");
        std::thread::sleep(Duration::from_millis(300));
    }
    let ev = seen.unwrap_or_else(|| {
        panic!(
            "no link-refused event from {ps} within {SEEN_WITHIN:?}: {}",
            s.cli_ok(&["status"]).unwrap_or_default()
        )
    });
    let msg = ev["message"].as_str().unwrap_or_default();
    assert_eq!(ev["replication_id"], m, "{ev}");
    assert!(
        msg.contains("cannot reach mt at") && msg.contains("check that rebound-mt runs on"),
        "{msg}"
    );

    // The MT is back: the PS says so.
    s.set_power_on(true).expect("start the MT again");
    let back = Instant::now();
    while event(&s, &ps, "link-restored").is_none() {
        assert!(
            back.elapsed() < SEEN_WITHIN,
            "no link-restored event from {ps}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
