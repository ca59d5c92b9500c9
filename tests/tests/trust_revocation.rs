//! Trust model: revocation. `rebound revoke ROLE:ID` at the CS cuts the
//! component's streams that are already open within seconds (an agent's
//! ingest at its PS, a PS's apply at the MT, the control channel at the CS)
//! and every reconnect is refused with a message saying the certificate is
//! revoked; the CS pushed the list to every PS and MT, which persist it.
//! Plan hooks are names of executables in the CS's hook directory: a plan
//! that carries a command line, or a name outside the directory, is refused.

use crate::lifecycle::{a, b, protect};
use rebound_lab::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// How soon a revocation must be enforced on open streams.
const WITHIN: Duration = Duration::from_secs(10);
/// How long the stream must then stay cut.
const QUIET: Duration = Duration::from_secs(6);

/// `rebound revoke ROLE:ID`: the revoked serials, after checking the CLI
/// said what it did and that every PS and MT took the list.
fn revoke(s: &Sites, component: &str) -> Vec<String> {
    let out = s.cli_ok(&["revoke", component]).expect("rebound revoke");
    assert!(out.contains(&format!("{component} revoked")), "{out}");
    assert!(
        out.contains("rebound token create"),
        "says how to let it back: {out}"
    );
    assert!(
        !out.contains("not told yet"),
        "every connected PS and MT took the list: {out}"
    );
    let serials: Vec<String> = out
        .lines()
        .find_map(|l| l.split_once("certificate(s) "))
        .map(|(_, list)| list.split(", ").map(|x| x.trim().to_string()).collect())
        .unwrap_or_default();
    assert!(!serials.is_empty(), "no serial revoked: {out}");
    serials
}

/// The component as `rebound components --output json` lists it.
fn component(s: &Sites, role: &str, id: &str) -> Value {
    let list = s.cli_json(&["components"]).expect("components");
    list["components"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["role"] == role && c["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("{role}:{id} not in `rebound components`: {list:#}"))
}

/// Revokes `role:id` and waits until each server in `servers` (lab log
/// names) has cut its open connection and refused a reconnect, each with
/// its message, and the CS no longer has it online; the revoked serials.
fn revoke_and_wait_refused(s: &Sites, role: &str, id: &str, servers: &[&str]) -> Vec<String> {
    let t0 = Instant::now();
    let serials = revoke(s, &format!("{role}:{id}"));
    let who = format!("{role}:{id}");
    for server in servers {
        for said in [
            format!("closed the connection of certificate {who} from"),
            format!("refused certificate {who} (serial"),
        ] {
            wait_until(&format!("{server} to log {said:?}"), WITHIN, || {
                let log = s.log_tail(server, 2000);
                log.lines()
                    .any(|l| l.contains(&said) && l.contains("revoked"))
            })
            .unwrap_or_else(|e| panic!("{e:#}\n--- {server} ---\n{}", s.log_tail(server, 40)));
        }
    }
    wait_until(&format!("{who} offline at the CS"), WITHIN, || {
        component(s, role, id)["health"] != "online"
    })
    .unwrap_or_else(|e| panic!("{e:#}\n--- cs ---\n{}", s.log_tail("cs", 40)));
    eprintln!(
        "{who} cut and refused by {servers:?} {} ms after the revocation",
        t0.elapsed().as_millis()
    );
    serials
}

/// The default sites with m1 protected from A to B and its points flowing.
fn m1_flowing() -> Sites {
    let s = Sites::start(SitesOptions::default()).expect("sites");
    protect(&s, "m1", a(), b());
    let seq = flows(&s, "m1", 0, 1);
    flows(&s, "m1", seq, 2);
    s
}

/// The newest point the MT reported for the machine (its seq).
fn last_seq(s: &Sites, m: &str) -> u64 {
    s.machine(m).expect("machine")["last_point"]["seq"]
        .as_u64()
        .unwrap_or(0)
}

/// Writes to the machine's source disk and waits until a point past
/// `after` reaches the MT: the replication flows.
fn flows(s: &Sites, m: &str, after: u64, pattern: u8) -> u64 {
    s.write(m, a(), "disk0", u64::from(pattern) << 16, 4096, pattern)
        .expect("write");
    let mut seq = 0;
    wait_until(
        &format!("{m}: a point past seq {after}"),
        WITHIN * 6,
        || {
            seq = last_seq(s, m);
            seq > after
        },
    )
    .expect("replication flows");
    seq
}

/// Writes go on at the source, but no new point reaches the MT for `QUIET`:
/// the stream that carried them stays cut.
fn stays_cut(s: &Sites, m: &str, what: &str) {
    // What was in flight when the stream was cut may still land.
    std::thread::sleep(Duration::from_secs(2));
    let before = last_seq(s, m);
    for p in 0..3u8 {
        // The agent may be refusing its own control channel, but its export
        // keeps taking writes.
        let _ = s.write(m, a(), "disk0", u64::from(p) << 20, 4096, 0xa0 + p);
    }
    std::thread::sleep(QUIET);
    let after = last_seq(s, m);
    assert_eq!(
        after, before,
        "{what}: points still reach the MT after the revocation (seq {before} → {after})"
    );
}

/// Every file named `revoked` under `dir` (the PS's and MT's persisted
/// revocation lists).
fn revocation_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(revocation_files(&p));
        } else if p.file_name().is_some_and(|n| n == "revoked") {
            out.push(std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    out
}

/// The PS and MT of both sites (but the revoked one, `except`) persisted a
/// list holding every serial.
fn persisted_everywhere(s: &Sites, serials: &[String], except: &str) {
    for site in [a(), b()] {
        for id in [ps_id(site), "mt".to_string()] {
            if id == except {
                continue;
            }
            let dir = s.dir.join(site).join(&id);
            let files = revocation_files(&dir);
            assert!(
                files
                    .iter()
                    .any(|f| serials.iter().all(|x| f.lines().any(|l| l.trim() == x))),
                "{}: no persisted revocation list with {serials:?}: {files:?}",
                dir.display()
            );
        }
    }
}

#[test]
fn a_revoked_agent_is_cut_at_its_ps_and_the_cs_and_refused_on_reconnect() {
    let s = m1_flowing();
    let serials = revoke_and_wait_refused(&s, "agent", "m1", &["cs", &ps_id(a())]);
    stays_cut(&s, "m1", "agent ingest at the PS");
    persisted_everywhere(&s, &serials, "");
    assert_eq!(component(&s, "agent", "m1")["health"], "revoked");
    // The agent saw both of its streams end.
    let log = s.log_tail("agent-m1@onprem", 400);
    assert!(
        log.contains("lost the process server") && log.contains("control stream broke"),
        "{log}"
    );

    // Revoking an unknown component says so.
    let r = s.cli(&["revoke", "ps:nope"]).expect("cli");
    assert!(!r.ok);
    assert!(
        r.text().contains("no certificate was issued to ps:nope"),
        "{}",
        r.text()
    );
}

#[test]
fn a_revoked_ps_is_cut_at_the_mt_and_a_revoked_mt_at_the_cs() {
    let s = m1_flowing();
    let ps = ps_id(a());
    let serials = revoke_and_wait_refused(&s, "ps", &ps, &["cs", &mt_id(b())]);
    stays_cut(&s, "m1", "PS apply at the MT");
    persisted_everywhere(&s, &serials, &ps);

    let mt = mt_id(b());
    revoke_and_wait_refused(&s, "mt", &mt, &["cs"]);
    assert_eq!(component(&s, "mt", &mt)["health"], "revoked");
}

#[test]
fn a_plan_hook_is_a_name_in_the_cs_hook_directory_never_a_command() {
    let s = Sites::cs_only(SitesOptions::default()).expect("cs");
    let hooks = s.cs_dir.join("hooks");
    std::fs::create_dir_all(&hooks).expect("hook dir");
    let hook = hooks.join("start-app");
    std::fs::write(&hook, "#!/bin/sh\nexit 0\n").expect("hook");
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let outside = s.cs_dir.join("outside.sh");
    std::fs::write(&outside, "#!/bin/sh\nexit 0\n").expect("outside");
    std::fs::set_permissions(
        &outside,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");

    let create = |hook: &str| {
        s.cli(&["plan", "create", "p", "--group", "m1", "--pre-hook", hook])
            .expect("cli")
    };
    for bad in [
        "echo start",
        "../outside.sh",
        &outside.display().to_string(),
    ] {
        let r = create(bad);
        assert!(!r.ok, "{bad}: {}", r.text());
        let text = r.text();
        assert!(
            text.contains("is not a hook name")
                && text.contains("never a command line")
                && text.contains(&hooks.display().to_string()),
            "{bad}: {text}"
        );
    }
    let r = create("missing");
    assert!(!r.ok);
    assert!(
        r.text().contains("is not installed") && r.text().contains("hook_dir"),
        "{}",
        r.text()
    );
}
