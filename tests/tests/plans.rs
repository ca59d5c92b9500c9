//! Recovery plans by their effect: hooks run in order with their
//! environment, a failing pre-hook stops the job, `--point latest` gives
//! each machine its own point, and commit and reprotect work on a plan.

use crate::lifecycle::{a, b, protect, replica_hash, source_hash, succeeded, wait_point_seq, JOB};
use rebound_lab::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Installs hook `name` in the CS's hook directory: it appends one line to
/// `log` with its name, the environment the CS gave it and the machines
/// the lab's power_on hook has booted so far (their pid files), then runs
/// `then` (a shell line).
fn install_hook(s: &Sites, log: &Path, name: &str, then: &str) {
    let dir = s.cs_dir.join("hooks");
    std::fs::create_dir_all(&dir).unwrap();
    let agents = s.path("agents");
    let body = format!(
        "#!/bin/sh\nup=$(cd {agents:?} && ls *.pid 2>/dev/null | tr '\\n' ' ')\n\
         echo \"{name} job=$REBOUND_JOB kind=$REBOUND_JOB_KIND plan=$REBOUND_PLAN \
         machines=$REBOUND_MACHINES up=$up\" >> {log:?}\n{then}\n"
    );
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The lines of the hooks' log.
fn hook_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The newest recovery point of the machine's replication.
fn newest_point(s: &Sites, m: &str) -> Value {
    let p = s.points(m).unwrap();
    let points = p["points"].as_array().cloned().unwrap_or_default();
    points
        .into_iter()
        .max_by_key(|p| p["seq"].as_u64().unwrap_or(0))
        .unwrap_or_else(|| panic!("{m} has no points: {p}"))
}

fn pid_file(s: &Sites, m: &str, site: &str) -> PathBuf {
    s.path(&format!("agents/{m}@{site}.pid"))
}

#[test]
fn plan_hooks_order_env_latest_per_machine_commit_reprotect_and_a_failing_pre_hook() {
    let ms = ["m1", "m2"];
    let mut s = Sites::start(SitesOptions {
        machines: ms.iter().map(|m| m.to_string()).collect(),
        ..Default::default()
    })
    .expect("sites");
    let log = s.path("hooks.log");
    for h in ["pre1", "post1", "pre2", "post2"] {
        install_hook(&s, &log, h, "exit 0");
    }
    install_hook(
        &s,
        &log,
        "refuse",
        "echo 'database not ready for failover' >&2; exit 3",
    );
    s.cli_ok(&[
        "plan",
        "create",
        "p",
        "--group",
        "m1",
        "--group",
        "m2",
        "--pre-hook",
        "pre1",
        "--pre-hook",
        "pre2",
        "--post-hook",
        "post1",
        "--post-hook",
        "post2",
    ])
    .unwrap();
    for m in ms {
        protect(&s, m, a(), b());
    }

    // Each machine gets points of its own: different writes, tags at
    // different times, and no consistency group.
    s.write("m1", a(), "disk0", 0, 1 << 20, 0x51).unwrap();
    let (_, seq1) = s.tag("m1", a(), "crash").unwrap();
    s.write("m2", a(), "disk0", 2 << 20, 3 << 20, 0x52).unwrap();
    s.write("m1", a(), "disk0", 6 << 20, 1 << 20, 0x53).unwrap();
    let (_, seq2) = s.tag("m2", a(), "crash").unwrap();
    wait_point_seq(&s, "m1", seq1);
    wait_point_seq(&s, "m2", seq2);
    let want: Vec<String> = ms.iter().map(|m| source_hash(&s, m)).collect();

    let j = s
        .job(&[
            "failover",
            "--plan",
            "p",
            "--from",
            a(),
            "--to",
            b(),
            "--point",
            "latest",
        ])
        .expect("failover --plan p");
    succeeded(&j);
    let job = j["id"].as_str().unwrap().to_string();

    // --point latest on a plan without a group: each machine at its own
    // newest point, equal to its own source.
    let mut repls = Vec::new();
    let mut fps = Vec::new();
    for (m, want) in ms.iter().zip(&want) {
        let mm = s.wait_state(m, "FailedOver", JOB).unwrap();
        s.wait_powered_on(m, b(), JOB).unwrap();
        let repl = mm["replication_id"].as_str().unwrap().to_string();
        let newest = newest_point(&s, m);
        assert_eq!(
            mm["failover_point"]["id"], newest["id"],
            "{m} does not run from its own newest point: {mm}"
        );
        assert_eq!(
            mm["failover_point"]["group"], "",
            "{m}: a group point without a group"
        );
        assert_eq!(
            &replica_hash(&s, b(), &repl),
            want,
            "{m}: replica differs from its source at its own last point"
        );
        fps.push(mm["failover_point"]["id"].as_str().unwrap().to_string());
        repls.push(repl);
    }
    eprintln!("failover points: {fps:?}");

    // The hooks ran in step order around each step's hand-over, each with
    // the job's environment.
    let lines = hook_lines(&log);
    let names: Vec<&str> = lines.iter().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(names, ["pre1", "post1", "pre2", "post2"], "{lines:#?}");
    let ups = [
        "",
        "m1@azure.pid",
        "m1@azure.pid",
        "m1@azure.pid m2@azure.pid",
    ];
    for (l, up) in lines.iter().zip(ups) {
        let env = format!("job={job} kind=failover plan=p machines=m1 m2 up={up}");
        assert!(
            l.trim_end().ends_with(&env),
            "hook line {l:?}: want {env:?}"
        );
    }

    // commit --plan and reprotect --plan act on every machine of the plan.
    for m in ms {
        s.stop_agent(m, a()).unwrap();
    }
    succeeded(&s.job(&["commit", "--plan", "p"]).expect("commit --plan"));
    for m in ms {
        s.wait_state(m, "Committed", JOB).unwrap();
    }
    let j = s
        .job(&[
            "reprotect",
            "--plan",
            "p",
            "--ps",
            &ps_id(b()),
            "--mt",
            &mt_id(a()),
            "--wait-agent",
            "2m",
        ])
        .expect("reprotect --plan");
    succeeded(&j);
    for (m, repl) in ms.iter().zip(&repls) {
        let mm = s.wait_state(m, "Protected", JOB).unwrap();
        assert_eq!(
            (mm["from_site"].as_str(), mm["to_site"].as_str()),
            (Some(b()), Some(a()))
        );
        s.write(m, b(), "disk0", 8 << 20, 1 << 20, 0x61).unwrap();
        let (tag, seq) = s.tag(m, b(), "crash").unwrap();
        wait_point_seq(&s, m, seq);
        let h = replica_hash(&s, b(), repl);
        s.wait_view_hash(a(), m, "disk0", &tag, &h, JOB)
            .unwrap_or_else(|e| panic!("{m} after reprotect --plan: {e:#}"));
    }

    // A failing pre-hook stops the failover with its error; nothing is
    // handed over.
    s.cli_ok(&[
        "plan",
        "create",
        "back",
        "--group",
        "m1,m2",
        "--pre-hook",
        "refuse",
    ])
    .unwrap();
    let r = s
        .cli(&[
            "failover",
            "--plan",
            "back",
            "--from",
            b(),
            "--to",
            a(),
            "--wait",
        ])
        .unwrap();
    assert!(
        !r.ok,
        "failover with a failing pre-hook succeeded: {}",
        r.text()
    );
    let t = r.text();
    assert!(
        t.contains("pre-hook of plan group 1") && t.contains("database not ready"),
        "the error does not name the hook and what it said: {t}"
    );
    let last = hook_lines(&log);
    assert!(
        last.last().is_some_and(|l| l.starts_with("refuse ")),
        "{last:#?}"
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    for m in ms {
        assert!(
            !pid_file(&s, m, a()).exists(),
            "{m} was powered on at {} after the pre-hook failed",
            a()
        );
        let mm = s.machine(m).unwrap();
        assert_ne!(mm["state"], "FailedOver", "{mm}");
        assert_eq!(mm["site"], b(), "{mm}");
    }
}
