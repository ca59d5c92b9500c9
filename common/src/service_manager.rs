//! The daemons under a service manager (systemd `Type=notify`, see
//! packaging/systemd/): `READY=1` once a daemon's listeners are bound and
//! its state recovered, so units ordered after it start against a component
//! that answers; `STOPPING=1` when a shutdown signal starts the clean stop;
//! and `WATCHDOG=1` from the async runtime, so a wedged runtime gets the
//! daemon restarted.
//!
//! Everything here is a no-op when `NOTIFY_SOCKET` is unset (run by hand, or
//! by the tests), and a failed notification is logged, never fatal: the
//! service manager is an observer, not a dependency.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// Tells the service manager the daemon is ready, with `status` as the
/// one-line status `systemctl status` shows, and starts the watchdog when
/// the unit asked for one. Call it from inside the tokio runtime.
pub fn ready(status: &str) {
    send(
        &[NotifyState::Ready, NotifyState::Status(status)],
        "READY=1",
    );
    if let Some(period) = watchdog_period() {
        debug!(
            period_ms = period.as_millis() as u64,
            "feeding the service manager's watchdog"
        );
        tokio::spawn(watchdog(period));
    }
}

/// Tells the service manager the daemon is stopping (it then waits for the
/// exit instead of reporting a failure).
pub fn stopping() {
    send(
        &[NotifyState::Stopping, NotifyState::Status("stopping")],
        "STOPPING=1",
    );
}

/// Half the interval the service manager asked for (`WATCHDOG_USEC`), or
/// `None` when it did not ask for this process.
fn watchdog_period() -> Option<Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0)
        .then(|| Duration::from_micros(usec / 2))
}

/// Sends `WATCHDOG=1` every `period` for as long as the runtime runs it: a
/// runtime too stuck to run this task is what the watchdog is for.
async fn watchdog(period: Duration) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        send(&[NotifyState::Watchdog], "WATCHDOG=1");
    }
}

fn send(state: &[NotifyState], what: &str) {
    if let Err(e) = sd_notify::notify(false, state) {
        let socket = std::env::var("NOTIFY_SOCKET").unwrap_or_default();
        warn!("cannot send {what} to the service manager at NOTIFY_SOCKET={socket:?}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_watchdog_unless_asked_for_this_process() {
        // The test runner is not started with WATCHDOG_PID = our pid.
        assert_eq!(watchdog_period(), None);
    }
}
