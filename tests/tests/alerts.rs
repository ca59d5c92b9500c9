//! Alerts an operator is paged by: m1 is protected with a 2 s RPO alert
//! and written to through its agent's NBD export while the MT of the
//! target site is paused (SIGSTOP), so what the PS holds for it ages past
//! the threshold. The CS raises `rpo-exceeded` for m1 (and
//! `component-offline` for the MT), `rebound alerts` lists them, and the
//! webhook receiver the test runs on loopback gets them, the first post
//! refused so the CS's retry is exercised. Once the MT continues, both
//! clear (in the CLI and at the receiver); a paused PS is then offline
//! until it continues; and the replica at a point cut afterwards is the
//! source, by blake3.

use crate::lifecycle::{a, b, protect, source_hash};
use crate::support::Paused;
use rebound_lab::webhook::WebhookReceiver;
use rebound_lab::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);
const DISK: u64 = 16 << 20;

/// The default sites, their CS posting its alerts to `url`.
fn sites_posting_to(url: &str) -> Sites {
    let mut s = Sites::cs_only(SitesOptions::default()).expect("cs");
    let path = s.cs_dir.join("config.toml");
    let mut cfg: Value = config::read_toml(&path).expect("read the CS config");
    let alerts = cfg
        .as_object_mut()
        .expect("the CS config is a table")
        .entry("alerts")
        .or_insert_with(|| json!({}));
    alerts["webhooks"] = json!([url]);
    alerts["webhook_retry_for"] = json!("5m");
    config::write_toml(&path, &cfg).expect("write the CS config");
    s.restart_cs().expect("the CS with webhooks");
    for site in s.opts.sites.clone() {
        s.start_site(&site).expect("site");
    }
    for m in s.opts.machines.clone() {
        s.add_machine(&m).expect("machine");
    }
    s
}

/// Random writes through m1's NBD export at the source until stopped.
fn writer(s: &Sites, stop: &Arc<AtomicBool>) -> JoinHandle<u32> {
    let uri = nbd_uri(s.agent_addr("m1", a()).expect("agent address"), "disk0");
    let stop = stop.clone();
    std::thread::spawn(move || {
        let mut rng = Rng::new(22);
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            qemu_io(&uri, &random_writes(&mut rng, DISK, 4)).expect("write to m1");
            n += 1;
            std::thread::sleep(Duration::from_millis(150));
        }
        n
    })
}

/// The alerts `rebound alerts [--all] -o json` lists.
fn alerts(s: &Sites, all: bool) -> Vec<Value> {
    let args: &[&str] = if all {
        &["alerts", "--all"]
    } else {
        &["alerts"]
    };
    let v = s.cli_json(args).expect("rebound alerts");
    v["alerts"]
        .as_array()
        .unwrap_or_else(|| panic!("no alerts list in {v}"))
        .clone()
}

/// Waits until `rebound alerts [--all]` lists an alert `pred` accepts;
/// that alert. `what` names it in the failure.
fn wait_alert(s: &Sites, what: &str, all: bool, pred: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    wait_for(what, WAIT, Duration::from_millis(300), || {
        found = alerts(s, all).into_iter().find(|a| pred(a));
        Ok(found.is_some())
    })
    .unwrap_or_else(|e| panic!("{e:#}; alerts: {:#?}", alerts(s, true)));
    found.expect("found")
}

/// Waits until `rebound alerts` lists an open `kind` alert for `subject`;
/// that alert.
fn wait_open(s: &Sites, kind: &str, subject: &str) -> Value {
    let what = format!("an open {kind} alert for {subject}");
    wait_alert(s, &what, false, |a| {
        a["kind"] == kind && a["subject"] == subject
    })
}

/// Waits until `rebound alerts --all` lists the alert `id` as cleared
/// (and `rebound alerts` no longer lists it).
fn wait_cleared(s: &Sites, id: &Value) -> Value {
    let cleared = wait_alert(s, &format!("alert {id} to clear"), true, |a| {
        &a["id"] == id && a["cleared_ms"].as_u64().unwrap_or(0) > 0
    });
    let open = alerts(s, false);
    assert!(
        !open.iter().any(|a| &a["id"] == id),
        "{id} cleared but still open: {open:#?}"
    );
    cleared
}

/// The receiver's post of `state` for the alert `id`.
fn wait_post(r: &WebhookReceiver, state: &str, id: &Value) -> Value {
    r.wait_for(|v| v["state"] == state && &v["alert"]["id"] == id, WAIT)
        .unwrap_or_else(|e| panic!("webhook {state} of {id}: {e:#}"))
}

#[test]
fn a_paused_mt_or_ps_raises_alerts_at_the_cs_and_the_webhook_that_clear_when_it_returns() {
    let receiver = WebhookReceiver::start(Host::next().0).expect("webhook receiver");
    let s = sites_posting_to(&receiver.url());
    protect(&s, "m1", a(), b());
    s.cli_ok(&["policy", "set", "m1", "--rpo-alert", "2s"])
        .expect("policy set");
    receiver.fail_first(1);

    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(&s, &stop);
    let mt = mt_id(b());
    let mt_subject = format!("mt:{mt}");
    let paused = Paused::new(s.pid(&mt).expect("MT pid"));

    let rpo = wait_open(&s, "rpo-exceeded", "m1");
    assert_eq!(rpo["threshold"], 2.0, "{rpo:#}");
    assert!(rpo["value"].as_f64().unwrap_or(0.0) > 2.0, "{rpo:#}");
    assert_eq!(rpo["site"], a(), "{rpo:#}");
    assert_eq!(rpo["cleared_ms"], 0, "{rpo:#}");
    let offline = wait_open(&s, "component-offline", &mt_subject);
    let table = s.cli_ok(&["alerts"]).expect("rebound alerts");
    assert!(
        table.contains("rpo-exceeded") && table.contains("m1") && table.contains(&mt_subject),
        "{table}"
    );

    // The webhook got the raise, after a refused post (the retry).
    let raised = wait_post(&receiver, "raised", &rpo["id"]);
    assert_eq!(raised["alert"]["kind"], "rpo-exceeded", "{raised:#}");
    assert_eq!(raised["alert"]["subject"], "m1", "{raised:#}");
    assert_eq!(raised["alert"]["raised_ms"], rpo["raised_ms"], "{raised:#}");
    let keys = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
    assert_eq!(
        keys(&raised["alert"]),
        keys(&rpo),
        "the webhook posts the fields of `rebound alerts -o json`"
    );
    assert!(
        receiver.posts() > receiver.received().len() as u64,
        "the refused post was not retried: {} posts, {} accepted",
        receiver.posts(),
        receiver.received().len()
    );

    // The MT returns while the writes go on: both alerts clear.
    drop(paused);
    let cleared = wait_cleared(&s, &rpo["id"]);
    assert!(
        cleared["cleared_ms"].as_u64() >= rpo["raised_ms"].as_u64(),
        "{cleared:#}"
    );
    wait_cleared(&s, &offline["id"]);
    wait_post(&receiver, "cleared", &rpo["id"]);
    wait_post(&receiver, "cleared", &offline["id"]);
    let order: Vec<String> = receiver
        .received()
        .iter()
        .filter(|v| v["alert"]["id"] == rpo["id"])
        .map(|v| v["state"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(order, ["raised", "cleared"], "{:#?}", receiver.received());

    // A paused PS is offline at the CS until it continues.
    let ps_subject = format!("ps:{}", ps_id(a()));
    let paused = Paused::new(s.pid(&ps_id(a())).expect("PS pid"));
    let offline = wait_open(&s, "component-offline", &ps_subject);
    wait_post(&receiver, "raised", &offline["id"]);
    drop(paused);
    wait_cleared(&s, &offline["id"]);
    wait_post(&receiver, "cleared", &offline["id"]);

    // The replica at a point cut after the MT and the PS returned is the
    // source.
    stop.store(true, Ordering::Relaxed);
    let writes = w.join().expect("writer");
    assert!(writes > 0, "no write ran");
    let (tag, _) = s.tag("m1", a(), "crash").expect("tag");
    s.wait_view_hash(b(), "m1", "disk0", &tag, &source_hash(&s, "m1"), WAIT)
        .unwrap_or_else(|e| panic!("m1 at {tag} after the MT returned: {e:#}"));
}
