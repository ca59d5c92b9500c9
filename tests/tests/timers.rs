//! The periodic recovery points: the agent's crash and app timers and the
//! CS's group-interval scheduler, with app-kind group points that freeze.
//! Nothing here cuts a point by hand: every point comes from a timer.

use crate::lifecycle::{a, b, source_hash, succeeded, JOB, MIB};
use rebound_lab::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Gives the machine's agent at the first site freeze and thaw hooks that
/// append "<hook> <machine>" to `marker`, and restarts it.
fn with_freeze_hooks(s: &mut Sites, m: &str, marker: &Path) {
    let path = s.path(&format!("agents/{m}@{}/agent.toml", a()));
    let mut cfg: AgentConfig = config::read_toml(&path).unwrap();
    let line = format!("echo \"$REBOUND_HOOK $REBOUND_MACHINE\" >> {marker:?}");
    cfg.hooks.freeze = line.clone();
    cfg.hooks.thaw = line;
    config::write_toml(&path, &cfg).unwrap();
    s.stop_agent(m, a()).unwrap();
    s.start_agent(m, a()).unwrap();
    s.wait_online("agent", m, JOB).unwrap();
}

/// Protects the machine A→B with timers that cut nothing during a test
/// (1 h), in group `group` when given.
fn protect_quiet(s: &Sites, m: &str, group: Option<&str>) {
    let (ps, mt) = (ps_id(a()), mt_id(b()));
    let mut args = vec![
        "protect",
        m,
        "--to",
        b(),
        "--ps",
        &ps,
        "--mt",
        &mt,
        "--crash-interval",
        "1h",
        "--app-interval",
        "1h",
    ];
    if let Some(g) = group {
        args.extend(["--group", g]);
    }
    succeeded(&s.job(&args).expect("protect"));
    s.wait_state(m, "Protected", JOB).expect("protected");
}

/// The machine's points (`rebound points M`).
fn points(s: &Sites, m: &str) -> Vec<Value> {
    s.points(m).unwrap()["points"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until `enough` holds for the machine's points; the points then.
fn wait_points(s: &Sites, m: &str, what: &str, enough: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut last = Vec::new();
    let r = wait_until(&format!("{m}: {what}"), Duration::from_secs(60), || {
        last = points(s, m);
        enough(&last)
    });
    r.unwrap_or_else(|e| panic!("{e:#}; points: {last:#?}"));
    last
}

/// Points of `kind` (and of a group, when `group`) newer than seq `after`.
fn count(ps: &[Value], kind: &str, group: bool, after: u64) -> usize {
    ps.iter()
        .filter(|p| p["kind"] == kind && p["seq"].as_u64().unwrap_or(0) > after)
        .filter(|p| !group || p["group"].as_str().is_some_and(|g| !g.is_empty()))
        .count()
}

fn newest_seq(ps: &[Value]) -> u64 {
    ps.iter()
        .filter_map(|p| p["seq"].as_u64())
        .max()
        .unwrap_or(0)
}

fn marker_lines(marker: &PathBuf, line: &str) -> usize {
    crate::support::lines_with(&std::fs::read_to_string(marker).unwrap_or_default(), line)
}

#[test]
fn the_agent_timers_cut_crash_and_app_points_and_app_points_freeze() {
    let mut s = Sites::start(SitesOptions::default()).expect("sites");
    let m = "m1";
    let marker = s.path("freeze.log");
    with_freeze_hooks(&mut s, m, &marker);
    protect_quiet(&s, m, None);
    let before = newest_seq(&points(&s, m));
    assert_eq!(
        marker_lines(&marker, "freeze m1"),
        0,
        "froze before any app point"
    );

    s.cli_ok(&["policy", "set", m, "--crash-interval", "300ms"])
        .unwrap();
    // The crash timer cuts a point only when something was written since
    // the last one: each write is followed by a point of its own.
    let mut after = before;
    for k in 0..3u64 {
        s.write(m, a(), "disk0", k * 2 * MIB, MIB, 0x71 + k as u8)
            .unwrap();
        let ps = wait_points(&s, m, "a crash point after a write", |ps| {
            count(ps, "crash", false, after) >= 1
        });
        after = newest_seq(&ps);
    }
    let want = source_hash(&s, m);
    assert_eq!(marker_lines(&marker, "freeze m1"), 0, "a crash point froze");
    s.cli_ok(&["policy", "set", m, "--app-interval", "1s"])
        .unwrap();
    let ps = wait_points(&s, m, "2 app points", |ps| {
        count(ps, "app", false, after) >= 2
    });
    // Each app point ran the freeze hook (and thaw after it).
    let apps = count(&ps, "app", false, before);
    assert!(
        marker_lines(&marker, "freeze m1") >= apps,
        "{apps} app points but the freeze hook ran {} times",
        marker_lines(&marker, "freeze m1")
    );
    assert!(marker_lines(&marker, "thaw m1") >= 1, "thaw never ran");
    // The timers' points are exact: nothing was written after `want`.
    for kind in ["crash", "app"] {
        let p = ps
            .iter()
            .filter(|p| p["kind"] == kind && p["seq"].as_u64().unwrap_or(0) > before)
            .max_by_key(|p| p["seq"].as_u64())
            .unwrap();
        let id = p["id"].as_str().unwrap();
        s.wait_view_hash(b(), m, "disk0", id, &want, JOB)
            .unwrap_or_else(|e| panic!("{kind} point {id}: {e:#}"));
    }
}

/// Creates (or replaces) consistency group g1 of m1 and m2 with `extra`
/// flags (`--interval`, `--app`).
fn group_g1(s: &Sites, extra: &[&str]) {
    let mut args = vec!["group", "create", "g1", "--machines", "m1,m2"];
    args.extend_from_slice(extra);
    s.cli_ok(&args).unwrap();
}

#[test]
fn the_group_scheduler_cuts_group_points_and_app_group_points_freeze_every_member() {
    let ms = ["m1", "m2"];
    let mut s = Sites::start(SitesOptions {
        machines: ms.iter().map(|m| m.to_string()).collect(),
        ..Default::default()
    })
    .expect("sites");
    let marker = s.path("freeze.log");
    group_g1(&s, &[]);
    for m in ms {
        with_freeze_hooks(&mut s, m, &marker);
        protect_quiet(&s, m, Some("g1"));
        s.write(m, a(), "disk0", MIB, MIB, 0x72).unwrap();
    }
    let before: Vec<u64> = ms.iter().map(|m| newest_seq(&points(&s, m))).collect();

    // Crash-kind group points every second, by the CS alone.
    group_g1(&s, &["--interval", "1s"]);
    let mut tags = Vec::new();
    for (m, after) in ms.iter().zip(&before) {
        let ps = wait_points(&s, m, "2 crash group points", |ps| {
            count(ps, "crash", true, *after) >= 2
        });
        tags.push(
            ps.iter()
                .filter(|p| p["seq"].as_u64().unwrap_or(0) > *after)
                .filter_map(|p| p["group"].as_str().filter(|g| !g.is_empty()))
                .map(str::to_string)
                .collect::<std::collections::BTreeSet<_>>(),
        );
    }
    assert!(
        tags[0].intersection(&tags[1]).next().is_some(),
        "no group point common to both members: {tags:?}"
    );
    assert_eq!(
        marker_lines(&marker, "freeze"),
        0,
        "a crash group point froze"
    );

    // App-kind group points: every member runs its freeze hook.
    group_g1(&s, &["--interval", "1s", "--app"]);
    let groups = s.cli_json(&["group", "list"]).unwrap();
    assert_eq!(groups["groups"][0]["app"], true, "{groups}");
    let after: Vec<u64> = ms.iter().map(|m| newest_seq(&points(&s, m))).collect();
    for (m, after) in ms.iter().zip(&after) {
        wait_points(&s, m, "an app group point", |ps| {
            count(ps, "app", true, *after) >= 1
        });
        assert!(
            marker_lines(&marker, &format!("freeze {m}")) >= 1,
            "{m}: an app group point without its freeze hook: {:?}",
            std::fs::read_to_string(&marker).unwrap_or_default()
        );
    }
    // Stop the scheduler so the lab shuts down quietly.
    group_g1(&s, &[]);
}
