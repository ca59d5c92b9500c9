//! The operator CLI's surface: complete help for every subcommand, and the
//! master-target-direct `points --mt` form still working beside the CS form.

use rebound_lab::*;

fn rebound(args: &[&str]) -> (bool, String) {
    let r = cli::rebound(args).unwrap();
    (r.ok, r.text())
}

#[test]
fn every_subcommand_has_help() {
    let (ok, top) = rebound(&["--help"]);
    assert!(ok, "{top}");
    let subs: &[&[&str]] = &[
        &["status"],
        &["machines"],
        &["points"],
        &["protect"],
        &["failover"],
        &["change-point"],
        &["commit"],
        &["reprotect"],
        &["jobs"],
        &["plan"],
        &["plan", "create"],
        &["plan", "show"],
        &["plan", "delete"],
        &["group"],
        &["group", "create"],
        &["group", "delete"],
        &["group", "list"],
        &["demo"],
        &["certs"],
        &["rollback"],
        &["restore-pre-images"],
    ];
    for sub in subs {
        assert!(top.contains(sub[0]), "`rebound --help` lacks {}", sub[0]);
        let mut a = sub.to_vec();
        a.push("--help");
        let (ok, text) = rebound(&a);
        assert!(ok, "rebound {a:?}: {text}");
        assert!(text.contains("Usage: rebound"), "rebound {a:?}: {text}");
    }
    for sub in ["status", "machines", "jobs"] {
        let (_, text) = rebound(&[sub, "--help"]);
        assert!(text.contains("--output"), "{sub} has no --output: {text}");
        assert!(
            text.contains("--cs") && text.contains("REBOUND_CS"),
            "{text}"
        );
    }
    let (_, text) = rebound(&["failover", "--help"]);
    for w in [
        "latest-processed",
        "latest-app",
        "latest-multi",
        "--unplanned",
        "--plan",
        "LOST",
    ] {
        assert!(text.contains(w), "failover --help lacks {w}: {text}");
    }
    let (_, text) = rebound(&["reprotect", "--help"]);
    assert!(text.contains("--wait-agent"), "{text}");
}

#[test]
fn bad_arguments_say_what_is_wrong() {
    let (ok, text) = rebound(&["reprotect", "m1", "--ps", "p", "--wait-agent", "soon"]);
    assert!(!ok);
    assert!(text.contains("90s") || text.contains("duration"), "{text}");
    let (ok, text) = rebound(&["failover", "--from", "a", "--to", "b"]);
    assert!(!ok, "failover without machines or plan was accepted");
    assert!(
        text.contains("--plan") || text.contains("MACHINES"),
        "{text}"
    );
}

#[test]
fn points_with_mt_goes_straight_to_the_master_target() {
    let mut lab = Lab::new(LabOptions::default()).expect("lab");
    lab.start_all().expect("start");
    qemu_io(&lab.agent_uri("disk0"), &["write -P 0x5a 0 1M".to_string()]).expect("write");
    let (id, seq) = lab.tag("crash").expect("tag");
    lab.wait_applied(seq, std::time::Duration::from_secs(60))
        .expect("applied");
    let mt = lab.mt_addr.to_string();
    let certs = lab.certs.to_string_lossy().to_string();
    let (ok, text) = rebound(&[
        "points", "m1", "--mt", &mt, "--certs", &certs, "--output", "json",
    ]);
    assert!(ok, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let pts = v["points"].as_array().expect("points");
    assert!(pts.iter().any(|p| p["id"] == id.as_str()), "{v}");
}
