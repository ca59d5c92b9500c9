//! `rebound-cs backup` and `restore` of the SQLite deployment, with the real
//! binaries: a backup taken while the CS serves, state changed after it, a
//! restore refused while the CS runs, then done with it stopped; the CS
//! started again shows the state as of the backup.

use rebound_lab::*;
use std::path::Path;
use std::process::Command;

/// `rebound-cs ARGS --config CONFIG`: (success, stdout and stderr).
fn cs_cmd(s: &Sites, args: &[&str], config: &Path) -> (bool, String) {
    let out = Command::new(s.bins.path("rebound-cs").unwrap())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run rebound-cs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The names of the plans `rebound plan list` shows.
fn plans(s: &Sites) -> Vec<String> {
    let v = s.cli_json(&["plan", "list"]).expect("plan list");
    let mut names: Vec<String> = (v["plans"].as_array().cloned().unwrap_or_default())
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

#[test]
fn backup_while_serving_then_restore_brings_back_the_state_of_the_backup() {
    let mut s = Sites::start(SitesOptions {
        machines: vec!["m1".into(), "m2".into()],
        ..Default::default()
    })
    .expect("sites");
    let config = s.cs_dir.join("config.toml");
    s.cli_ok(&["plan", "create", "before", "--group", "m1"])
        .unwrap();

    let backup = s.path("cs-backup.db");
    let (ok, out) = cs_cmd(&s, &["backup", "--to", backup.to_str().unwrap()], &config);
    assert!(ok, "backup while the CS serves: {out}");
    assert!(
        out.contains("2 machines") && out.contains("integrity check ok"),
        "{out}"
    );
    let (ok, out) = cs_cmd(&s, &["backup", "--to", backup.to_str().unwrap()], &config);
    assert!(!ok && out.contains("never overwrites"), "{out}");

    s.cli_ok(&["plan", "create", "after", "--group", "m2"])
        .unwrap();
    assert_eq!(plans(&s), ["after", "before"]);

    let from = backup.to_str().unwrap();
    let (ok, out) = cs_cmd(&s, &["restore", "--from", from], &config);
    assert!(!ok && out.contains("stop it before restoring"), "{out}");

    s.stop("cs").expect("stop the CS");
    let (ok, out) = cs_cmd(&s, &["restore", "--from", from], &config);
    assert!(ok, "restore with the CS stopped: {out}");
    assert!(out.contains("before-restore-"), "{out}");

    let bin = s.bins.path("rebound-cs").unwrap();
    let mut cs = Proc::run("cs-restored", &bin, &config, &s.path("cs-restored.log")).unwrap();
    cs.wait_listening(s.cs_addr.parse().unwrap())
        .expect("the CS starts on the restored database");
    assert_eq!(plans(&s), ["before"], "the state as of the backup");
    let machines = s.cli_json(&["machines"]).expect("machines");
    assert_eq!(
        machines["machines"].as_array().map(Vec::len),
        Some(2),
        "{machines}"
    );
    cs.stop().expect("stop the restored CS");
}
