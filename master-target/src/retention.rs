//! Retention: dropping the oldest recovery points (DESIGN.md §7 "Retention").
//!
//! A point closing interval k needs the journals of the intervals after k.
//! Dropping the oldest point P therefore frees the journals up to and
//! including the interval the next point closes; the remaining points never
//! need those. Points older than the window are dropped; when the journals
//! of a replication exceed the size cap, the oldest points go too and the
//! window shrinks. The newest point is always kept, so a replication that
//! had a point keeps one. A point's age is measured from when the MT cut it,
//! by the MT's own clock (see `catalog`): the agent's clock, in the tag, may
//! be a day off without dropping points early or keeping them forever.
//! The window and the cap are the replication's own
//! (its policy) where set, else the MT's `[retention]` defaults, read at
//! every pass. Rolled-back replications are left alone: their
//! journals may still be needed to choose another point. A point a test
//! failover pins (see `test_copy`) is never dropped, nor are the journals
//! it needs, whatever the window or the cap say; the log says when the pin
//! held points retention would otherwise have dropped.
//!
//! A replication is *capped* (`retention_capped` in the status the CS
//! alerts on, and in the metrics) from the pass where the cap drops points
//! the window would have kept until its oldest point is as old as the
//! window again (the window is whole) or the cap is off. It is kept in
//! memory: after a restart the next pass the cap bites says so again.
//!
//! Each pass also raises a `journal-damaged` event, once per start, for a
//! damaged retention journal (see `retention_journal`).
//!
//! Order on disk: the catalog is rewritten first (atomically), then the
//! freed journals are deleted; journals a crash left behind are deleted on
//! the next open. Only the catalog rewrite holds the replication's lock:
//! the deletion runs after it, so apply does not wait for it.

use crate::config::RetentionConfig;
use crate::error::Result;
use crate::metrics::oldest_point_age_ms;
use crate::replication::{Inner, Replication, Store};
use rebound_common::time::now_ms;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// What one retention pass did to a replication.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    pub dropped: usize,
    pub oldest: Option<String>,
    /// The size cap (not the window) forced some of the drops.
    pub size_capped: bool,
    pub journal_bytes: u64,
}

/// "1d2h3m4s"-style rendering of a duration in milliseconds.
pub fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    let mut out = String::new();
    if d > 0 {
        out.push_str(&format!("{d}d"));
    }
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

impl Replication {
    /// One retention pass at time `now_ms`, with the replication's own
    /// policy over the MT's `defaults` (see `retention_policy`).
    pub fn enforce_retention(
        &self,
        defaults: &RetentionConfig,
        now_ms: u64,
    ) -> Result<RetentionOutcome> {
        let mut inner = self.write_inner()?;
        // Raised here, not when the journal is opened: the event sink is
        // connected only after the store has opened its replications.
        for (n, damage, path) in inner.journal_mut().unreported_damage() {
            let message = damage.message(self.id(), n, &path);
            self.events().error("journal-damaged", self.id(), message);
        }
        let cfg = &inner.state().retention.resolve(defaults);
        let mut out = RetentionOutcome {
            journal_bytes: inner.journal_bytes(),
            oldest: inner.points().first().map(|p| p.id.clone()),
            ..Default::default()
        };
        let window_ms = cfg.window_secs.saturating_mul(1000);
        // Whether the cap's shortening lasts after a pass that dropped
        // nothing for it.
        let still_capped = |inner: &Inner| {
            self.retention_capped()
                && cfg.max_bytes > 0
                && oldest_point_age_ms(inner, now_ms) < window_ms
        };
        if inner.rollback_point().is_some() {
            return Ok(out);
        }
        if inner.points().len() <= 1 {
            self.observed().set_retention_capped(still_capped(&inner));
            return Ok(out);
        }
        let points = inner.points().as_slice();
        let n = points.len();
        let age = |i: usize| now_ms.saturating_sub(inner.points().retention_ms(i));
        let mut d = 0;
        while d < n - 1 && age(d) > window_ms {
            d += 1;
        }
        let by_window = d;
        if cfg.max_bytes > 0 {
            let lens = inner.journal().interval_bytes();
            let mut it = 0;
            let mut total: u64 = lens.iter().map(|&(_, l)| l).sum();
            let advance = |d: usize, it: &mut usize, total: &mut u64| {
                while *it < lens.len() && lens[*it].0 <= points[d].interval {
                    *total -= lens[*it].1;
                    *it += 1;
                }
            };
            advance(d, &mut it, &mut total);
            while d < n - 1 && total > cfg.max_bytes {
                d += 1;
                advance(d, &mut it, &mut total);
            }
            if total > cfg.max_bytes && d > 0 {
                warn!(replication = %self.id(), journal_bytes = total, max_bytes = cfg.max_bytes,
                    "retention size cap is smaller than the journal the newest point needs; keeping the newest point");
            }
        }
        let wanted = d;
        if let Some(pin) = inner.pinned_index().filter(|&i| i < d) {
            d = pin;
            let point = points[pin].id.clone();
            if inner.pin_news() {
                info!(replication = %self.id(), pinned_point = %point, held = wanted - pin,
                    "retention kept recovery points it would have dropped: a test failover pins point {point} (and the journals it needs) until test-failover-cleanup");
            } else {
                // Short, one per pass: the journal a long test failover
                // keeps keeps growing, and the operator sees why.
                info!(replication = %self.id(), pinned_point = %point, held = wanted - pin,
                    "retention pass: the test failover's pin still holds point {point}");
            }
        }
        if d == 0 {
            self.observed().set_retention_capped(still_capped(&inner));
            return Ok(out);
        }
        // The freed journals are only forgotten here; they are deleted once
        // the lock is released, because unlinking a journal of a few
        // hundred MB takes hundreds of ms that apply would otherwise wait.
        let (oldest, dropped) = inner.drop_oldest_points(d)?;
        out.dropped = d;
        out.size_capped = d > by_window;
        out.oldest = Some(oldest.id.clone());
        out.journal_bytes = inner.journal_bytes();
        // Points the window itself dropped: the window is whole again.
        let capped = out.size_capped || (by_window == 0 && still_capped(&inner));
        self.observed().set_retention_capped(capped);
        // Logged under the lock: a reader that sees the points gone finds
        // the log line too.
        if out.size_capped {
            info!(
                replication = %self.id(),
                max_bytes = cfg.max_bytes,
                journal_bytes = out.journal_bytes,
                "retention size cap reached: window shrank to {}, oldest point now {}",
                human_duration(now_ms.saturating_sub(inner.points().retention_ms(0))),
                oldest.id
            );
        }
        info!(
            replication = %self.id(),
            dropped = d,
            by_window,
            held_by_test_failover_pin = wanted - d,
            oldest_point = %oldest.id,
            points = inner.points().len(),
            journal_bytes = out.journal_bytes,
            "retention dropped the oldest recovery points"
        );
        drop(inner);
        dropped.delete(self.id());
        Ok(out)
    }
}

/// Runs retention over every replication every `check_secs` until `stop`.
pub async fn run_task(store: Arc<Store>, cfg: RetentionConfig, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_secs(cfg.check_secs.max(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let store = store.clone();
        let cfg = cfg.clone();
        let pass = tokio::task::spawn_blocking(move || {
            let now = now_ms();
            for r in store.list() {
                if let Err(e) = r.enforce_retention(&cfg, now) {
                    warn!(replication = %r.id(), error = %e, "retention pass failed; retrying later");
                }
            }
        });
        if let Err(e) = pass.await {
            warn!(error = %e, "retention task failed");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(super::human_duration(0), "0s");
        assert_eq!(super::human_duration(61_000), "1m1s");
        assert_eq!(super::human_duration(90_061_000), "1d1h1m1s");
        assert_eq!(super::human_duration(3_600_000), "1h");
    }
}
