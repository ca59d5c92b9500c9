//! The recovery-point timers: crash tags every `crash_interval_ms`, app
//! points every `app_interval_secs`. Both read the interval from the
//! [`Runtime`] and wake when `SetPolicy` changes it, so a new interval
//! applies from the running timer's next tick: a shorter one at once
//! (counted from the last tick), not after the old interval ran out.

use super::Runtime;
use rebound_common::frame::TagKind;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info};

/// Waits until `interval()` has passed since `since`, re-reading it on
/// every policy change (`None`: the timer is off until the policy turns it
/// on). Returns false when `stop` turned true.
async fn wait_interval(
    rt: &Runtime,
    since: Instant,
    interval: impl Fn() -> Option<Duration>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        if *stop.borrow() {
            return false;
        }
        // Registered before the interval is read, so a change between the
        // two still wakes this wait.
        let changed = rt.policy_changed.notified();
        let due = interval().map(|i| since + i);
        let timer = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = timer => return !*stop.borrow(),
            _ = changed => {}
            // A dropped sender can never say stop: the owner is gone.
            r = stop.changed() => if r.is_err() { return false; },
        }
    }
}

/// Cuts crash tags every `crash_interval_ms` (see the module doc) until
/// `stop`.
pub async fn crash_tag_loop(rt: Arc<Runtime>, mut stop: watch::Receiver<bool>) {
    let interval = || {
        let ms = rt.crash_interval_ms.load(Ordering::Relaxed).max(10);
        Some(Duration::from_millis(ms))
    };
    loop {
        if !wait_interval(&rt, Instant::now(), interval, &mut stop).await {
            return;
        }
        match rt.capture.cut_tag(TagKind::Crash, false) {
            Ok(Some((id, seq))) => debug!(tag = %id, seq, "crash tag"),
            Ok(None) => {}
            Err(e) => debug!("crash tag skipped: {e}"),
        }
    }
}

/// Cuts app-consistent points every `app_interval_secs` (0 = off) until
/// `stop`.
pub async fn app_tag_loop(rt: Arc<Runtime>, mut stop: watch::Receiver<bool>) {
    let interval = || {
        let secs = rt.app_interval_secs.load(Ordering::Relaxed);
        (secs > 0).then(|| Duration::from_secs(secs))
    };
    loop {
        if !wait_interval(&rt, Instant::now(), interval, &mut stop).await {
            return;
        }
        if !rt.capture.is_consistent() || rt.capture.is_fenced() {
            continue;
        }
        match rt.app_tag("", "").await {
            Ok(t) => {
                info!(tag = %t.id, seq = t.seq, kind = %t.kind, "scheduled app-consistent point")
            }
            Err(e) => debug!("app-consistent point skipped: {e}"),
        }
    }
}
