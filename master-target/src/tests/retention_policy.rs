//! A replication's own retention (SetRetention): kept before the
//! replication exists and applied when it is created, saved with its state
//! across restarts, reported in the status, and used by the retention pass
//! instead of the MT's defaults. And what EndReplication leaves on disk.

use super::lifecycle::control;
use super::{applied_history, check_all, info, open_store, RID};
use crate::config::{HooksConfig, RetentionConfig};
use crate::control::mt_status;
use crate::replication::Store;
use crate::retention_policy::PENDING_FILE;
use crate::state::RetentionPolicy;
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use std::path::Path;
use std::sync::Arc;

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
    let (g, _dir, s, r) = applied_history(22, 10);
    let times: Vec<u64> = r.points().iter().map(|p| p.time_ms).collect();
    let now = times[3] + 500;
    // The default keeps a year: nothing to drop.
    let defaults = RetentionConfig {
        window_secs: 365 * 86400,
        max_bytes: 0,
        check_secs: 1,
    };
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
