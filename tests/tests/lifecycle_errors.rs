//! Control-plane errors an operator meets, against the real `rebound-cs`,
//! components and `rebound` CLI: a wrong
//! enrollment passphrase is refused and stores nothing; an operator RPC with
//! a component's certificate is refused with a message that says to use the
//! admin certificate; groups and failovers of unknown machines are refused
//! naming them.

use rebound_lab::*;
use std::path::Path;

fn copy_as_admin(from: &Path, role: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join("ca.pem"), to.join("ca.pem")).unwrap();
    std::fs::copy(from.join(format!("{role}.pem")), to.join("admin.pem")).unwrap();
    std::fs::copy(from.join(format!("{role}.key")), to.join("admin.key")).unwrap();
}

#[test]
fn wrong_passphrase_is_refused_and_stores_nothing() {
    let s = Sites::cs_only(SitesOptions::default()).expect("cs");
    let bad = s.path("bad-passphrase");
    std::fs::write(&bad, "not the passphrase\n").unwrap();
    let out_dir = s.path("ps-bad");
    let r = s
        .enroll_with("rebound-ps", "ps-bad", &out_dir, &bad)
        .expect("run enroll");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        !r.status.success(),
        "enroll with a wrong passphrase succeeded: {text}"
    );
    assert!(
        text.to_lowercase().contains("passphrase"),
        "the refusal does not say the passphrase is wrong: {text}"
    );
    assert!(
        !out_dir.join("ps.pem").exists() && !out_dir.join("ca.pem").exists(),
        "files were written on a refused enrollment"
    );
    // The CS stored nothing: no such component.
    let st = s.cli_json(&["status"]).expect("status");
    let comps = st["components"].as_array().cloned().unwrap_or_default();
    assert!(
        comps.iter().all(|c| c["id"] != "ps-bad"),
        "a refused enrollment left a component: {st}"
    );
    // The right passphrase works, and the component is listed as enrolled.
    s.enroll("rebound-ps", "ps-good", &s.path("ps-good"))
        .expect("enroll with the right passphrase");
    assert!(s.path("ps-good/ps.pem").exists());
    let st = s.cli_json(&["status"]).expect("status");
    let comps = st["components"].as_array().cloned().unwrap_or_default();
    assert!(
        comps
            .iter()
            .any(|c| c["id"] == "ps-good" && c["role"] == "ps"),
        "the enrolled PS is not listed: {st}"
    );
}

#[test]
fn operator_rpc_with_a_component_certificate_is_refused() {
    let s = Sites::cs_only(SitesOptions::default()).expect("cs");
    // An agent certificate, enrolled through the library every binary's
    // `enroll` calls.
    let agent_dir = s.path("agent-m9");
    rebound_common::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pass = std::fs::read_to_string(s.passphrase_file()).unwrap();
    rt.block_on(rebound_common::enrollment::enroll(
        &s.cs_addr,
        pass.trim(),
        rebound_common::pki::Role::Agent,
        "m9",
        &agent_dir,
    ))
    .expect("enroll agent m9");
    let as_admin = s.path("agent-as-admin");
    copy_as_admin(&agent_dir, "agent", &as_admin);
    for args in [
        vec!["machines"],
        vec!["status"],
        vec!["jobs"],
        vec!["failover", "m9", "--from", "onprem", "--to", "azure"],
    ] {
        let r = s.cli_with_certs(&args, &as_admin).expect("run rebound");
        assert!(
            !r.ok,
            "rebound {args:?} with an agent certificate succeeded"
        );
        let t = r.text();
        assert!(
            t.contains("admin certificate") && t.contains("--certs"),
            "rebound {args:?}: the refusal does not say to use the admin certificate: {t}"
        );
    }
    // The admin certificate works.
    s.cli_ok(&["machines"]).expect("machines as admin");
}

#[test]
fn missing_certificates_and_unreachable_cs_say_what_to_do() {
    let s = Sites::cs_only(SitesOptions::default()).expect("cs");
    let r = s
        .cli_with_certs(&["machines"], &s.path("nowhere"))
        .expect("run");
    assert!(!r.ok);
    assert!(
        r.text().contains("rebound-cs init") && r.text().contains("--certs"),
        "{}",
        r.text()
    );
    let r = s.cli(&["status", "--cs", "127.0.0.1:1"]).expect("run");
    assert!(!r.ok);
    assert!(
        r.text()
            .contains("cannot reach the configuration server at 127.0.0.1:1"),
        "{}",
        r.text()
    );
}

#[test]
fn groups_and_plans_of_unknown_machines_are_refused_naming_them() {
    let s = Sites::cs_only(SitesOptions::default()).expect("cs");
    let r = s
        .cli(&["group", "create", "g1", "--machines", "m1,m2"])
        .expect("run");
    assert!(!r.ok, "a group of unknown machines was created");
    assert!(
        r.text().contains("m1") && r.text().contains("m2") && r.text().contains("rebound machines"),
        "{}",
        r.text()
    );
    let r = s
        .cli(&["failover", "m7", "--from", "onprem", "--to", "azure"])
        .expect("run");
    assert!(!r.ok, "a failover of an unknown machine started");
    assert!(r.text().contains("m7"), "{}", r.text());
    let l = s.cli_json(&["group", "list"]).expect("group list");
    assert_eq!(l["groups"].as_array().map(|a| a.len()), Some(0), "{l}");
    let l = s.cli_json(&["jobs"]).expect("jobs");
    assert_eq!(l["jobs"].as_array().map(|a| a.len()), Some(0), "{l}");
}
