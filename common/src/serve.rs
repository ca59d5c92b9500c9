//! Bounded shutdown for a component's gRPC server. Every long-lived server
//! (CS, MT, PS) stops accepting when its stop flag turns true, then waits for
//! open streams to close; a peer that keeps a stream open must not hold the
//! process up forever, so the wait is capped by a grace period.

use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tracing::warn;

/// Resolves once `stop` reads true (or its sender is gone): the shutdown
/// signal to hand to tonic's `serve_with_incoming_shutdown`.
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Drives `server` until it ends, or until `grace` has passed since `stop`
/// turned true, whichever comes first. Running out of grace is not an error:
/// it is logged (naming `open`, what was still open) and returns `Ok(())`.
pub async fn until_stopped<E>(
    server: impl Future<Output = Result<(), E>>,
    stop: watch::Receiver<bool>,
    grace: Duration,
    open: &str,
) -> Result<(), E> {
    tokio::select! {
        r = server => r,
        _ = async {
            stopped(stop).await;
            tokio::time::sleep(grace).await;
        } => {
            warn!("{open} did not close within {} s of shutdown; exiting anyway", grace.as_secs());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_ends_gives_its_result() {
        let (_tx, rx) = watch::channel(false);
        let r = until_stopped(
            async { Err::<(), _>("boom") },
            rx,
            Duration::from_secs(5),
            "x",
        );
        assert_eq!(r.await, Err("boom"));
    }

    #[tokio::test]
    async fn a_server_that_hangs_is_cut_off_after_the_grace() {
        let (tx, rx) = watch::channel(false);
        tx.send_replace(true);
        let hang = std::future::pending::<Result<(), ()>>();
        let r = until_stopped(hang, rx, Duration::from_millis(10), "streams").await;
        assert_eq!(r, Ok(()));
    }
}
