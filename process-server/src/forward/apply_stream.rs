//! One replication's apply stream to its master target (DESIGN.md §6:
//! "forwards to the MT over one stream per replication; on connect the MT
//! says its last applied seq").
//!
//! The task connects, says hello with the replication's info, learns the
//! MT's applied seq, and streams every cached frame after it in order, then
//! tails the cache as the writer makes new frames durable (woken by the
//! durable-seq watch, no polling). The MT's `applied_seq` answers let the
//! cache delete whole applied segments. At most [`MAX_INFLIGHT`] bytes are
//! sent and not yet applied. Any failure is logged once at warn, then the
//! task backs off (200 ms doubling to 5 s), reconnects and resumes from the
//! MT's word. A frame the MT refuses as corrupt is an error that no retry
//! fixes: it is logged at error and retried slowly.

use super::error::ForwardError;
use super::link::MtLink;
use crate::cache::{Cursor, Replication};
use crate::metrics::PsMetrics;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use prometheus_client::metrics::counter::Counter;
use rebound_proto::{apply_request, apply_response, ApplyRequest, ApplyResponse, ReplicationInfo};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tracing::{debug, error, info, warn};

/// Bytes sent to the MT and not yet applied, at most.
pub const MAX_INFLIGHT: u64 = 64 << 20;
/// Bytes read from the cache per step.
const READ_STEP: u64 = 8 << 20;
/// First reconnect delay; it doubles per failed session up to `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Retry delay after an error that retrying cannot fix (corrupt frame).
const BACKOFF_SEVERE: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// The reconnect delays: `BACKOFF_MIN` doubling to `BACKOFF_MAX`, for ever.
fn reconnect_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(BACKOFF_MIN)
        .with_max_delay(BACKOFF_MAX)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

struct Retry {
    backoff: ExponentialBackoff,
    /// The current run of failures was logged at warn already.
    warned: bool,
}

/// One replication's forwarding counters, taken from the families once.
pub(super) struct Counters {
    forwarded: Counter,
    errors: Counter,
}

impl Counters {
    pub(super) fn new(metrics: &PsMetrics, id: &str) -> Counters {
        Counters {
            forwarded: metrics.forwarded(id),
            errors: metrics.forward_errors(id),
        }
    }
}

/// Forwards one replication until its task is aborted: a session per
/// connection, with backoff between them.
pub(super) async fn forward_loop(rep: Arc<Replication>, link: Arc<MtLink>, counters: Counters) {
    let mut info_rx = rep.info_watch();
    let mut retry = Retry {
        backoff: reconnect_backoff(),
        warned: false,
    };
    loop {
        let info = match info_rx.wait_for(|i| i.is_some()).await {
            Ok(i) => i.clone(),
            Err(_) => return,
        };
        let Some(info) = info else { continue };
        let started = Instant::now();
        let err = match session(&rep, &link, info, &mut retry, &counters.forwarded).await {
            Ok(()) => ForwardError::Ended,
            Err(e) => e,
        };
        counters.errors.inc();
        if started.elapsed() >= HEALTHY_SESSION {
            retry.backoff = reconnect_backoff();
        }
        if err.is_severe() {
            error!(
                replication = %rep.id(),
                mt = %link.addr(),
                applied_seq = rep.applied(),
                "forwarding stopped: {err}; retrying in {} s",
                BACKOFF_SEVERE.as_secs()
            );
            retry.warned = true;
            tokio::time::sleep(BACKOFF_SEVERE).await;
            continue;
        }
        if retry.warned {
            debug!(replication = %rep.id(), mt = %link.addr(), "forwarding still failing: {err}");
        } else {
            warn!(
                replication = %rep.id(),
                mt = %link.addr(),
                applied_seq = rep.applied(),
                durable_seq = rep.durable(),
                "forwarding to the master target failed: {err}; reconnecting with backoff (repeats are logged at debug)"
            );
            retry.warned = true;
        }
        tokio::time::sleep(retry.backoff.next().unwrap_or(BACKOFF_MAX)).await;
    }
}

/// One apply stream, from hello until it fails.
async fn session(
    rep: &Arc<Replication>,
    link: &MtLink,
    info: ReplicationInfo,
    retry: &mut Retry,
    forwarded: &Counter,
) -> Result<(), ForwardError> {
    let channel = link.connect_for(rep.id()).await?;
    let (tx, rx) = mpsc::channel::<ApplyRequest>(4);
    tx.send(ApplyRequest {
        msg: Some(apply_request::Msg::Hello(info)),
    })
    .await
    .map_err(|_| ForwardError::Broken)?;
    let mut responses = MtLink::client(channel)
        .apply(ReceiverStream::new(rx))
        .await
        .map_err(ForwardError::Refused)?
        .into_inner();
    let resume = match responses.message().await {
        Ok(Some(ApplyResponse {
            msg: Some(apply_response::Msg::ResumeSeq(n)),
        })) => n,
        Ok(Some(other)) => return Err(ForwardError::NoResumeSeq(Box::new(other))),
        Ok(None) => return Err(ForwardError::Ended),
        Err(s) => return Err(ForwardError::Refused(s)),
    };
    info!(
        replication = %rep.id(),
        mt = %link.addr(),
        resume_seq = resume,
        durable_seq = rep.durable(),
        "connected to the master target"
    );
    retry.warned = false;
    rep.set_applied(resume);

    let (applied_tx, applied_rx) = watch::channel(resume);
    let sender = send_loop(rep.clone(), tx, resume, applied_rx, forwarded.clone());
    let receiver = recv_loop(rep, responses, applied_tx);
    tokio::pin!(sender, receiver);
    tokio::select! {
        r = &mut sender => match r {
            // The request stream is gone; the answer stream says why.
            Err(ForwardError::Broken) => match tokio::time::timeout(Duration::from_secs(2), &mut receiver).await {
                Ok(Err(e)) => Err(e),
                _ => Err(ForwardError::Broken),
            },
            other => other,
        },
        r = &mut receiver => r,
    }
}

/// Streams cached frames after `resume` in order, tailing the cache.
async fn send_loop(
    rep: Arc<Replication>,
    tx: mpsc::Sender<ApplyRequest>,
    resume: u64,
    mut applied: watch::Receiver<u64>,
    forwarded: Counter,
) -> Result<(), ForwardError> {
    let mut cursor = Cursor::new(rep.clone(), resume.saturating_add(1));
    let mut inflight: VecDeque<(u64, u64)> = VecDeque::new();
    let mut inflight_bytes = 0u64;
    let mut durable = rep.durable_watch();
    loop {
        let a = *applied.borrow_and_update();
        while let Some(&(last, n)) = inflight.front() {
            if last > a {
                break;
            }
            inflight.pop_front();
            inflight_bytes -= n;
        }
        if inflight_bytes >= MAX_INFLIGHT {
            applied.changed().await.map_err(|_| ForwardError::Broken)?;
            continue;
        }
        durable.borrow_and_update();
        let budget = (MAX_INFLIGHT - inflight_bytes).min(READ_STEP);
        let (c, items) = tokio::task::spawn_blocking(move || {
            let r = cursor.read(budget);
            (cursor, r)
        })
        .await
        .map_err(ForwardError::ReadTask)?;
        cursor = c;
        let items = items?;
        if items.is_empty() {
            durable.changed().await.map_err(|_| ForwardError::Broken)?;
            continue;
        }
        let stats = rep.stats();
        for item in items {
            let n = item.bytes.len() as u64;
            inflight.push_back((item.last_seq, n));
            inflight_bytes += n;
            tx.send(ApplyRequest {
                msg: Some(apply_request::Msg::Frame(item.bytes.into())),
            })
            .await
            .map_err(|_| ForwardError::Broken)?;
            stats.frames_forwarded.fetch_add(1, Ordering::Relaxed);
            stats.bytes_forwarded.fetch_add(n, Ordering::Relaxed);
            forwarded.inc_by(n);
        }
    }
}

/// Takes the MT's `applied_seq` answers.
async fn recv_loop(
    rep: &Replication,
    mut responses: Streaming<ApplyResponse>,
    applied: watch::Sender<u64>,
) -> Result<(), ForwardError> {
    loop {
        match responses.message().await {
            Ok(Some(ApplyResponse {
                msg: Some(apply_response::Msg::AppliedSeq(n)),
            })) => {
                rep.set_applied(n);
                applied.send_replace(n);
            }
            Ok(Some(other)) => {
                debug!(replication = %rep.id(), "ignoring unexpected answer from the master target: {other:?}")
            }
            Ok(None) => return Err(ForwardError::Ended),
            Err(s) => return Err(ForwardError::Refused(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_double_from_the_minimum_to_the_maximum() {
        let delays: Vec<Duration> = reconnect_backoff().take(7).collect();
        let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![200, 400, 800, 1600, 3200, 5000, 5000]);
        assert!(reconnect_backoff().nth(1000).is_some(), "it never gives up");
    }
}
