//! A replication's own retention (SetRetention): kept before the
//! replication exists and applied when it is created, saved with its state
//! across restarts, reported in the status, and used by the retention pass
//! instead of the MT's defaults. Retention ages points by the MT's clock
//! when it cut them, not by the agent's clock in the tag. And what
//! EndReplication leaves on disk.

use super::lifecycle::control;
use super::{applied, applied_history, check_all, history, info, open_store, Gen, RID};
use crate::catalog::{self, Cataloged, PointEntry};
use crate::config::{HooksConfig, RetentionConfig};
use crate::control::mt_status;
use crate::replication::Store;
use crate::retention_policy::PENDING_FILE;
use crate::state::RetentionPolicy;
use rebound_common::time::now_ms;
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use std::path::Path;
use std::sync::Arc;

const DAY_MS: u64 = 86_400_000;

/// A retention of `window_secs` without a size cap, checked every second.
pub(crate) fn window_secs(window_secs: u64) -> RetentionConfig {
    RetentionConfig {
        window_secs,
        max_bytes: 0,
        check_secs: 1,
    }
}

/// Rewrites the catalog of [`RID`] in `dir` as if the MT had cut each point
/// at `cut(point)` (`None`: a line from before the MT stamped its cuts),
/// with the store closed, and opens it again.
pub(crate) fn restamp(
    dir: &Path,
    held: (Arc<Store>, Arc<crate::replication::Replication>),
    cut: impl Fn(&PointEntry) -> Option<u64>,
) -> (Arc<Store>, Arc<crate::replication::Replication>) {
    let path = held.1.root().join("points.log");
    drop(held);
    let lines: Vec<Cataloged> = catalog::load(&path, false)
        .unwrap()
        .into_iter()
        .map(|point| Cataloged {
            cut_ms: cut(&point),
            point,
        })
        .collect();
    catalog::rewrite(&path, &lines).unwrap();
    open_store(dir)
}

/// The standard history with the agent's clock `skew_ms` ahead of (or,
/// negative, behind) the MT's, applied now.
fn history_with_agent_clock(seed: u64, skew_ms: i64) -> Gen {
    let mut g = history(seed);
    let base = now_ms().saturating_add_signed(skew_ms);
    // Re-time the tags as that agent would have stamped them.
    for r in g.records.iter_mut() {
        if let rebound_common::frame::Record::Tag(t) = r {
            t.time_ms = t.time_ms - 1_000_000 + base;
        }
    }
    g
}

#[test]
fn an_agent_clock_a_day_behind_drops_nothing_inside_the_window() {
    let g = history_with_agent_clock(31, -(DAY_MS as i64));
    let (_dir, _s, r) = applied(&g, 10);
    assert!(
        r.points()[0].time_ms < now_ms() - DAY_MS / 2,
        "the tags carry the agent's time"
    );
    let hour = window_secs(3600);
    let out = r.enforce_retention(&hour, now_ms()).unwrap();
    assert_eq!(
        out.dropped, 0,
        "points cut just now are inside a 1 h window: {out:?}"
    );
    assert_eq!(r.points().len(), 5);
    check_all(&r, &g);
}

#[test]
fn an_agent_clock_a_day_ahead_does_not_keep_points_forever() {
    let g = history_with_agent_clock(32, DAY_MS as i64);
    let (_dir, _s, r) = applied(&g, 10);
    assert!(
        r.points()[0].time_ms > now_ms() + DAY_MS / 2,
        "the tags carry the agent's time"
    );
    let hour = window_secs(3600);
    assert_eq!(r.enforce_retention(&hour, now_ms()).unwrap().dropped, 0);
    // Two hours later by the MT's clock every point but the newest is out
    // of the window, whatever the agent's clock said.
    let out = r
        .enforce_retention(&hour, now_ms() + 2 * 3600 * 1000)
        .unwrap();
    assert_eq!(out.dropped, 4, "{out:?}");
    assert_eq!(out.oldest.as_deref(), Some("p4"));
    check_all(&r, &g);
}

#[test]
fn the_window_is_measured_from_when_the_mt_cut_each_point() {
    // The agent's clock is a day ahead; the MT cut the points an hour
    // apart, p4 just now.
    let g = history_with_agent_clock(33, DAY_MS as i64);
    let (dir, s, r) = applied(&g, 10);
    let now = now_ms();
    let (_s, r) = restamp(dir.path(), (s, r), |p| {
        let i: u64 = p.id[1..].parse().unwrap();
        Some(now - (4 - i) * 3600 * 1000)
    });
    let window = |hours: u64| window_secs(hours * 3600);
    // Half an hour later p0 and p1 are 4.5 h and 3.5 h old by the MT's
    // clock: out of a 3 h window; p2 (2.5 h) stays.
    let out = r.enforce_retention(&window(3), now + 1800 * 1000).unwrap();
    assert_eq!(out.dropped, 2, "{out:?}");
    assert_eq!(out.oldest.as_deref(), Some("p2"));
    check_all(&r, &g);
    // The stamps survive a restart (and the rewrite retention did).
    drop(r);
    drop(_s);
    let (_s, r) = open_store(dir.path());
    assert_eq!(
        r.enforce_retention(&window(3), now + 1800 * 1000)
            .unwrap()
            .dropped,
        0
    );
    // Three hours on, p2 and p3 are out too; p4 (exactly 3 h) stays.
    let out = r
        .enforce_retention(&window(3), now + 3 * 3600 * 1000)
        .unwrap();
    assert_eq!(out.dropped, 2, "{out:?}");
    check_all(&r, &g);
}

#[test]
fn a_catalog_from_before_the_mt_stamped_its_cuts_ages_points_by_the_agents_time() {
    let (g, dir, s, r) = applied_history(34, 10);
    let (_s, r) = restamp(dir.path(), (s, r), |_| None);
    let times: Vec<u64> = r.points().iter().map(|p| p.time_ms).collect();
    let second = window_secs(1);
    let out = r.enforce_retention(&second, times[3] + 500).unwrap();
    assert_eq!(out.dropped, 3, "{out:?}");
    check_all(&r, &g);
}

/// Sends SetRetention for `id` through the control handler.
fn set(s: &Arc<Store>, id: &str, window_secs: u64, max_bytes: u64) -> pb::CommandResult {
    control(s.clone(), HooksConfig::default())
        .run(Cmd::SetRetention(pb::SetRetention {
            replication_id: id.into(),
            window_secs,
            max_bytes,
        }))
        .unwrap_or_else(|e| rebound_common::control::err_result(e.to_string()))
}

/// The (window, max bytes) the status reports for [`RID`].
fn reported(s: &Store, defaults: &RetentionConfig) -> (u64, u64) {
    let st = mt_status(s, defaults);
    let r = st
        .replications
        .iter()
        .find(|r| r.replication_id == RID)
        .expect("replication in the status");
    (r.retention_window_secs, r.retention_max_bytes)
}

fn pending(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(PENDING_FILE)).unwrap_or_default()
}

#[test]
fn set_retention_before_the_replication_exists_applies_at_creation_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(Store::open(dir.path()).unwrap());
    let res = set(&s, RID, 600, 1 << 20);
    assert!(res.ok, "{res:?}");
    assert!(pending(dir.path()).contains(RID));
    assert!(s.get(RID).is_none(), "SetRetention does not create it");
    // The MT restarts before the first frame: the policy is still kept.
    drop(s);
    let (s, r) = open_store(dir.path());
    let want = RetentionPolicy {
        window_secs: 600,
        max_bytes: 1 << 20,
    };
    assert_eq!(r.retention_policy(), want);
    assert!(
        !pending(dir.path()).contains(RID),
        "{}",
        pending(dir.path())
    );
    assert_eq!(reported(&s, &RetentionConfig::default()), (600, 1 << 20));
    // Kept in the replication's state.json from then on.
    let state = std::fs::read_to_string(r.root().join("state.json")).unwrap();
    assert!(state.contains("\"window_secs\": 600"), "{state}");
    drop((r, s));
    let (_s, r) = open_store(dir.path());
    assert_eq!(r.retention_policy(), want);
}

#[test]
fn set_retention_on_a_live_replication_survives_a_restart_and_zero_means_the_default() {
    let (_g, dir, s, r) = applied_history(21, 20);
    let defaults = RetentionConfig {
        window_secs: 3600,
        max_bytes: 5 << 20,
        check_secs: 1,
    };
    assert_eq!(reported(&s, &defaults), (3600, 5 << 20));
    assert!(set(&s, RID, 120, 0).ok);
    assert!(set(&s, RID, 120, 0).ok, "idempotent");
    assert_eq!(reported(&s, &defaults), (120, 5 << 20));
    assert!(
        pending(dir.path()).is_empty(),
        "nothing pending for a live one"
    );
    drop((r, s));
    let (s, r) = open_store(dir.path());
    assert_eq!(reported(&s, &defaults), (120, 5 << 20));
    // Back to the defaults.
    assert!(set(&s, RID, 0, 0).ok);
    assert_eq!(r.retention_policy(), RetentionPolicy::default());
    assert_eq!(reported(&s, &defaults), (3600, 5 << 20));
    // An unusable id is refused.
    let res = set(&s, "../x", 1, 1);
    assert!(!res.ok && res.error.contains("unusable"), "{res:?}");
}

#[test]
fn the_retention_pass_prunes_by_the_replications_window_not_the_default() {
    let (g, dir, s, r) = applied_history(22, 10);
    // The MT cut each point at the agent's time (the clocks agree).
    let (s, r) = restamp(dir.path(), (s, r), |p| Some(p.time_ms));
    let times: Vec<u64> = r.points().iter().map(|p| p.time_ms).collect();
    let now = times[3] + 500;
    // The default keeps a year: nothing to drop.
    let defaults = window_secs(365 * 86400);
    assert_eq!(r.enforce_retention(&defaults, now).unwrap().dropped, 0);
    assert_eq!(r.points().len(), 5);
    // The replication's own window of 1 s drops p0..p2.
    assert!(set(&s, RID, 1, 0).ok);
    let out = r.enforce_retention(&defaults, now).unwrap();
    assert_eq!(out.dropped, 3, "{out:?}");
    assert_eq!(out.oldest.as_deref(), Some("p3"));
    check_all(&r, &g);
}

#[test]
fn the_retention_pass_caps_by_the_replications_size() {
    let (g, _dir, s, r) = applied_history(23, 10);
    let total = r.status().journal_bytes;
    assert!(set(&s, RID, 0, total * 6 / 10).ok);
    let out = r
        .enforce_retention(&RetentionConfig::default(), g.time_ms)
        .unwrap();
    assert!(out.size_capped && out.dropped > 0, "{out:?}");
    assert!(out.journal_bytes <= total * 6 / 10, "{out:?}");
    check_all(&r, &g);
}

/// Files of `dir`, recursively, relative to it.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                todo.push(e.path());
            } else {
                let p = e.path();
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn end(s: &Arc<Store>, id: &str, keep_replica: bool) -> pb::CommandResult {
    control(s.clone(), HooksConfig::default())
        .run(Cmd::EndReplication(pb::EndReplication {
            replication_id: id.into(),
            keep_replica,
        }))
        .unwrap()
}

#[test]
fn end_replication_keeps_the_replica_files_or_deletes_them_with_the_journal() {
    // Kept: the replica files stay, the journal and catalog go (commit).
    let (_g, dir, s, r) = applied_history(24, 20);
    let root = r.root().to_path_buf();
    let before = files(&root);
    assert!(
        before.iter().any(|f| f.starts_with("retention/")),
        "{before:?}"
    );
    assert!(end(&s, RID, true).ok);
    let after = files(&root);
    assert!(
        after.contains(&"replica/disk0.img".to_string()),
        "{after:?}"
    );
    assert!(
        after.contains(&"replica/disk1.img".to_string()),
        "{after:?}"
    );
    assert!(
        !after.iter().any(|f| f.starts_with("retention/")),
        "{after:?}"
    );
    assert!(!after.contains(&"points.log".to_string()), "{after:?}");
    drop((r, s));

    // Deleted: nothing of the replication is left, also after a restart.
    let (_g, dir2, s, r) = applied_history(25, 20);
    let root = r.root().to_path_buf();
    drop(r);
    assert!(end(&s, RID, false).ok);
    assert!(!root.exists(), "{:?}", files(&root));
    assert!(files(dir2.path()).is_empty(), "{:?}", files(dir2.path()));
    drop(s);
    let s = Store::open(dir2.path()).unwrap();
    assert!(s.get(RID).is_none());
    drop(dir);
}

#[test]
fn end_replication_before_creation_forgets_the_pending_policy() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(Store::open(dir.path()).unwrap());
    assert!(set(&s, RID, 60, 0).ok);
    assert!(end(&s, RID, false).ok);
    assert!(!pending(dir.path()).contains(RID));
    let r = s.get_or_create(&info()).unwrap();
    assert_eq!(r.retention_policy(), RetentionPolicy::default());
}
