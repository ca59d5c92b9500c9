//! The `rebound_mt_*` metrics follow what the MT does: applied bytes and
//! points as frames are applied, the size cap's shortening of the window,
//! fdatasync latencies, and the status fields the CS alerts on.

use super::{applied, applied_history, apply_range, history, open_store, Gen};
use crate::config::RetentionConfig;
use crate::replication::Store;
use prometheus_client::encoding::text::encode;
use rebound_common::frame::Record;
use rebound_common::metrics::Registry;
use rebound_common::time::now_ms;

/// What a scrape of `store`'s metrics shows now.
fn scrape(store: &Store) -> String {
    let mut registry = Registry::default();
    store.metrics().register(&mut registry);
    store.metrics().refresh(store);
    let mut out = String::new();
    encode(&mut out, &registry).unwrap();
    out
}

/// The value of series `name` whose labels include every `labels` pair.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, v) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        let matches = n == name
            && labels
                .iter()
                .all(|(k, want)| rest.contains(&format!("{k}=\"{want}\"")));
        matches.then(|| v.parse().ok()).flatten()
    })
}

const M1: [(&str, &str); 2] = [("replication", super::RID), ("machine", "m1")];

/// Bytes written and zeroed by records `..n` of `g`.
fn data_bytes(g: &Gen, n: u64) -> f64 {
    g.records[..n as usize]
        .iter()
        .map(|r| match r {
            Record::Write { data, .. } => data.len() as u64,
            Record::Zero { len, .. } => *len,
            _ => 0,
        })
        .sum::<u64>() as f64
}

fn points(text: &str, kind: &str) -> Option<f64> {
    value(text, "rebound_mt_points", &[M1[0], M1[1], ("kind", kind)])
}

#[test]
fn applied_bytes_points_and_fsyncs_follow_the_frames() {
    let dir = tempfile::tempdir().unwrap();
    let g = history(31);
    let (s, r) = open_store(dir.path());
    let before = scrape(&s);
    assert_eq!(
        value(&before, "rebound_mt_applied_bytes_total", &M1),
        Some(0.0)
    );
    assert_eq!(points(&before, "crash"), Some(0.0), "{before}");
    // Up to just past the third point, then the rest.
    let third = (1..=g.seq())
        .filter(|&i| matches!(g.records[i as usize - 1], Record::Tag(_)))
        .nth(2)
        .unwrap();
    apply_range(&r, &g, 1, third, 7);
    let mid = scrape(&s);
    assert_eq!(
        value(&mid, "rebound_mt_applied_bytes_total", &M1),
        Some(data_bytes(&g, third))
    );
    let kind = r.points()[0].kind.clone();
    assert_eq!(points(&mid, &kind), Some(3.0), "{mid}");
    assert_eq!(
        value(&mid, "rebound_mt_applied_seq", &M1),
        Some(third as f64)
    );
    apply_range(&r, &g, third + 1, g.seq(), 7);
    // Frames applied again are not counted again.
    apply_range(&r, &g, 1, g.seq(), 50);
    let after = scrape(&s);
    assert_eq!(
        value(&after, "rebound_mt_applied_bytes_total", &M1),
        Some(data_bytes(&g, g.seq()))
    );
    assert_eq!(points(&after, &kind), Some(5.0));
    assert_eq!(
        value(&after, "rebound_mt_retention_bytes", &M1),
        Some(r.status().journal_bytes as f64)
    );
    let fsyncs = value(&after, "rebound_mt_fsync_seconds_count", &[]).unwrap();
    assert!(fsyncs >= 5.0, "{after}");
    assert!(value(&after, "rebound_mt_fsync_seconds_sum", &[]).unwrap() > 0.0);
    no_rollback_running(&after);
}

/// The rollback progress of a scrape where none runs.
fn no_rollback_running(text: &str) {
    for name in [
        "rebound_mt_rollback_done_bytes",
        "rebound_mt_rollback_total_bytes",
    ] {
        assert_eq!(value(text, name, &M1), Some(0.0), "{name}: {text}");
    }
}

#[test]
fn rollback_progress_is_zero_once_it_ends() {
    let (_g, _dir, s, r) = applied_history(32, 11);
    r.rollback("p1").unwrap();
    no_rollback_running(&scrape(&s));
}

#[test]
fn retention_capped_while_the_cap_keeps_the_window_short() {
    let (g, _dir, s, r) = applied_history(33, 10);
    let defaults = RetentionConfig {
        window_secs: 365 * 86400,
        max_bytes: r.status().journal_bytes * 6 / 10,
        check_secs: 1,
    };
    assert!(!r.retention_capped());
    let out = r.enforce_retention(&defaults, now_ms()).unwrap();
    assert!(out.size_capped && out.dropped > 0, "{out:?}");
    assert!(r.retention_capped());
    assert_eq!(
        value(&scrape(&s), "rebound_mt_retention_capped", &M1),
        Some(1.0)
    );
    let status = crate::control::mt_status(&s, &defaults);
    assert!(status.replications[0].retention_capped);
    // A pass that drops nothing more: the window is still short.
    assert_eq!(r.enforce_retention(&defaults, now_ms()).unwrap().dropped, 0);
    assert!(r.retention_capped());
    // The oldest point held reaches the window's age: whole again.
    let whole = RetentionConfig {
        window_secs: 10,
        ..defaults.clone()
    };
    r.enforce_retention(&whole, now_ms() + 11_000).unwrap();
    assert!(!r.retention_capped());
    assert_eq!(
        value(&scrape(&s), "rebound_mt_retention_capped", &M1),
        Some(0.0)
    );
    // Capped again, then the cap is lifted.
    let (_g2, _dir2, s2, r2) = applied_history(34, 10);
    r2.enforce_retention(&defaults, now_ms()).unwrap();
    assert!(r2.retention_capped());
    let lifted = RetentionConfig {
        max_bytes: 0,
        ..defaults.clone()
    };
    r2.enforce_retention(&lifted, now_ms()).unwrap();
    assert!(!r2.retention_capped());
    assert!(!crate::control::mt_status(&s2, &lifted).replications[0].retention_capped);
    drop(g);
}

#[test]
fn oldest_point_age_is_measured_from_when_the_mt_cut_it() {
    let (_g, _dir, s, r) = applied_history(35, 10);
    let now = now_ms();
    let age = r.oldest_point_age_secs(now + 90_000);
    assert!((90..=100).contains(&age), "{age}");
    let status = crate::control::mt_status(&s, &RetentionConfig::default());
    assert!(status.replications[0].oldest_point_age_secs < 60);
    let text = scrape(&s);
    let gauge = value(&text, "rebound_mt_oldest_point_age_seconds", &M1).unwrap();
    assert!((0.0..60.0).contains(&gauge), "{text}");
    // The newest point was applied: the lag is set (agent clock to now).
    assert!(value(&text, "rebound_mt_apply_lag_seconds", &M1).is_some());
}

/// The apply lag is the MT's clock when the last point was applied minus
/// that point's time.
#[test]
fn apply_lag_is_the_last_points_write_to_apply_latency() {
    let mut g = history(37);
    // The last point was taken 7 s before it is applied (`tag` adds 1 s).
    g.time_ms = now_ms() - 8_000;
    g.tag("late");
    let (_dir, s, _r) = applied(&g, 10);
    let text = scrape(&s);
    let lag = value(&text, "rebound_mt_apply_lag_seconds", &M1).unwrap();
    assert!((7.0..17.0).contains(&lag), "{lag}: {text}");
}

#[test]
fn an_ended_replication_leaves_the_scrape() {
    let (_g, _dir, s, _r) = applied_history(36, 10);
    assert!(scrape(&s).contains("m1-ab"));
    s.end_replication(super::RID, false).unwrap();
    let text = scrape(&s);
    assert!(!text.contains("m1-ab"), "{text}");
}
