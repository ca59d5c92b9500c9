//! Trust model: enrollment binds identity. Against the real `rebound-cs`,
//! component binaries and `rebound` CLI: the passphrase enrolls only an
//! agent for a machine id no live certificate holds; a PS, an MT and a
//! re-enrolling agent need a one-time token for exactly their role and id,
//! which is used up, expires, and pins the CA. Each refusal names the
//! role:id and the command that fixes it, writes nothing, and the CS raises
//! an `enrollment-refused` event.

use rebound_lab::*;
use std::path::Path;
use std::process::Output;

fn text(r: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    )
}

/// The enrollment failed, said every `want`, and wrote no certificate.
fn refused(r: Output, out: &Path, want: &[&str]) {
    let t = text(&r);
    assert!(!r.status.success(), "enrollment succeeded: {t}");
    for w in want {
        assert!(t.contains(w), "{w:?} missing from the refusal: {t}");
    }
    let written: Vec<_> = std::fs::read_dir(out)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        written.iter().all(|n| n == "token"),
        "a refused enrollment wrote {written:?}"
    );
}

/// Runs `enroll` into the lab directory `name` and checks it was refused
/// (see [`refused`]).
fn refused_into<E: std::fmt::Debug>(
    s: &Sites,
    name: &str,
    want: &[&str],
    enroll: impl FnOnce(&Path) -> Result<Output, E>,
) {
    let out = s.path(name);
    refused(enroll(&out).expect("run enroll"), &out, want);
}

fn ok(r: Output) {
    assert!(r.status.success(), "enrollment failed: {}", text(&r));
}

#[test]
fn the_passphrase_enrolls_neither_a_ps_nor_an_mt_nor_a_held_machine_id() {
    let s = Sites::cs_only(SitesOptions::default()).expect("cs");
    let pass = s.passphrase_file();
    for (bin, role, id) in [("rebound-ps", "ps", "ps1"), ("rebound-mt", "mt", "mt1")] {
        let out = s.path(&format!("{role}-pass"));
        let r = s.enroll_with(bin, id, &out, &pass).expect("run enroll");
        let hint = format!("rebound token create --role {role} --id {id}");
        refused(r, &out, &[&format!("{role}:{id}"), "token", &hint]);
    }
    // The first enrollment of machine m1 with the passphrase works; a second
    // one (someone with the passphrase taking over m1) is refused.
    s.enroll("rebound-agent", "m1", &s.path("m1-first"))
        .expect("first enrollment of m1");
    refused_into(
        &s,
        "m1-again",
        &[
            "agent:m1",
            "already has a live certificate",
            "rebound token create --role agent --id m1",
        ],
        |out| s.enroll_with("rebound-agent", "m1", out, &pass),
    );
    // With a token the operator created, m1 re-enrolls.
    let token = s.token("agent", "m1").expect("token");
    ok(
        s.enroll_token("rebound-agent", "m1", &s.path("m1-token"), &token)
            .expect("run enroll"),
    );
    // The CS recorded each refusal as an event.
    let st = s.cli_json(&["status"]).expect("status");
    let events = st["events"].as_array().cloned().unwrap_or_default();
    let refusals = events
        .iter()
        .filter(|e| e["kind"] == "enrollment-refused")
        .count();
    assert!(refusals >= 1, "no enrollment-refused event: {st}");
}

#[test]
fn a_token_enrolls_once_before_it_expires_and_only_its_own_identity() {
    let s = Sites::cs_only(SitesOptions::default()).expect("cs");
    // Used once, then refused.
    let token = s.token("ps", "ps1").expect("token");
    ok(s.enroll_token("rebound-ps", "ps1", &s.path("ps1"), &token)
        .expect("run enroll"));
    assert!(s.path("ps1/ps.pem").exists());
    refused_into(
        &s,
        "ps1-again",
        &[
            "ps:ps1",
            "already used",
            "rebound token create --role ps --id ps1",
        ],
        |out| s.enroll_token("rebound-ps", "ps1", out, &token),
    );

    // Expired.
    let token = s
        .cli_ok(&[
            "token", "create", "--role", "mt", "--id", "mt1", "--ttl", "1s", "--quiet",
        ])
        .expect("token create")
        .trim()
        .to_string();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    refused_into(
        &s,
        "mt1-late",
        &[
            "mt:mt1",
            "expired",
            "rebound token create --role mt --id mt1",
        ],
        |out| s.enroll_token("rebound-mt", "mt1", out, &token),
    );

    // A token for another role or id; it stays good for its own.
    let token = s.token("mt", "mt2").expect("token");
    for (bin, role, id) in [("rebound-ps", "ps", "mt2"), ("rebound-mt", "mt", "mt3")] {
        let out = s.path(&format!("{role}-{id}-other"));
        let r = s.enroll_token(bin, id, &out, &token).expect("run enroll");
        let hint = format!("rebound token create --role {role} --id {id}");
        refused(
            r,
            &out,
            &[&format!("{role}:{id}"), "created for mt:mt2", &hint],
        );
    }
    ok(s.enroll_token("rebound-mt", "mt2", &s.path("mt2"), &token)
        .expect("run enroll"));

    // Not a token at all: refused by the component before it connects.
    let out = s.path("junk");
    let r = s
        .enroll_token("rebound-ps", "ps9", &out, "not-a-token")
        .expect("run enroll");
    refused(r, &out, &["malformed", "rebound token create"]);
}

#[test]
fn an_operator_enrolls_its_own_admin_certificate_with_a_token() {
    let s = Sites::cs_only(SitesOptions::default()).expect("cs");
    let token = s
        .cli_ok(&[
            "token", "create", "--role", "admin", "--id", "alice", "--quiet",
        ])
        .expect("token create")
        .trim()
        .to_string();
    let out = s.path("alice");
    let r = s
        .cli(
            &[
                "enroll", "--cs", &s.cs_addr, "--id", "alice", "--token", &token, "--out",
            ]
            .into_iter()
            .chain([out.to_str().unwrap()])
            .collect::<Vec<_>>(),
        )
        .expect("run rebound enroll");
    assert!(r.ok, "rebound enroll failed: {}", r.text());
    assert!(r.stdout.contains("admin:alice"), "{}", r.stdout);
    // The new certificate is an operator's: the CLI works with it.
    let st = s.cli_with_certs(&["status"], &out).expect("status");
    assert!(st.ok, "status with alice's certificate: {}", st.text());
    // The token is used up.
    let again = s.path("alice-again");
    let r = s
        .cli(&[
            "enroll",
            "--id",
            "alice",
            "--token",
            &token,
            "--out",
            again.to_str().unwrap(),
        ])
        .expect("run rebound enroll");
    assert!(!r.ok && r.text().contains("already used"), "{}", r.text());
    assert!(!again.join("admin.pem").exists());
}
