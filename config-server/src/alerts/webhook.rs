//! Alert webhooks: every raise and clear POSTed as JSON to each configured
//! URL. One ordered queue and task per URL, so a slow or dead receiver
//! delays only its own deliveries and never the evaluation. Each body is a
//! [`Delivery`] kept in the alert log's outbox until the receiver answered
//! 2xx, so a CS that stops or crashes posts it again at its next start; it
//! is retried with exponential backoff until `webhook_retry_for` after it
//! was queued, then given up (logged). A queue holds at most
//! [`QUEUE_MAX`] bodies: past that the oldest is dropped (logged), so a dead
//! receiver neither grows the CS's memory nor gets hours-old news.

use super::evaluate::{Alert, Change};
use backon::{BackoffBuilder, ExponentialBuilder};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};

/// How long one POST may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// How many bodies wait for one URL at most.
pub const QUEUE_MAX: usize = 1000;

/// The JSON body of a delivery.
#[derive(Debug, Serialize)]
pub struct Body<'a> {
    /// "raised" or "cleared".
    pub state: &'static str,
    pub alert: &'a Alert,
}

/// One body on its way to one URL, kept in the alert log's outbox until it
/// is delivered, given up or dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Unique among the deliveries not finished yet.
    pub id: u64,
    pub url: String,
    /// The JSON [`Body`].
    pub body: String,
    /// When the change was queued (ms): retries stop `retry_for` after it.
    pub queued_ms: u64,
}

/// The delays between attempts.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub first: Duration,
    pub max: Duration,
    /// Give a delivery up once this long has passed since it was queued.
    pub retry_for: Duration,
}

impl Retry {
    /// 1 s doubling to 1 min, for `retry_for`.
    pub fn new(retry_for: Duration) -> Retry {
        Retry {
            first: Duration::from_secs(1),
            max: Duration::from_secs(60),
            retry_for,
        }
    }
}

/// The bodies waiting for one URL.
struct Queue {
    url: String,
    waiting: Mutex<VecDeque<Delivery>>,
    wake: Notify,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Delivery>> {
        // A panic while holding the lock leaves a plain queue behind.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The queues of every configured URL.
pub struct Webhooks {
    queues: Vec<Arc<Queue>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Ids of the deliveries that are finished (taken, given up, dropped).
    done_tx: mpsc::UnboundedSender<u64>,
    done_rx: mpsc::UnboundedReceiver<u64>,
    next_id: u64,
}

impl Webhooks {
    /// Starts one delivery task per URL.
    pub fn start(urls: &[String], retry: Retry) -> Webhooks {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(ATTEMPT_TIMEOUT))
            .build()
            .into();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let mut queues = Vec::new();
        let mut tasks = Vec::new();
        for url in urls {
            let q = Arc::new(Queue {
                url: url.clone(),
                waiting: Mutex::new(VecDeque::new()),
                wake: Notify::new(),
            });
            queues.push(q.clone());
            tasks.push(tokio::spawn(deliver_all(
                agent.clone(),
                q,
                retry,
                done_tx.clone(),
            )));
        }
        Webhooks {
            queues,
            tasks,
            done_tx,
            done_rx,
            next_id: 0,
        }
    }

    /// Queues again what an earlier CS left in its outbox, in order.
    pub fn resume(&mut self, outbox: &[Delivery]) {
        for d in outbox {
            self.next_id = self.next_id.max(d.id + 1);
            self.queue(d.clone());
        }
    }

    /// The deliveries of `change`, one per URL, not queued yet: the caller
    /// keeps them in the outbox first, then [`Webhooks::queue`]s them.
    pub fn deliveries(&mut self, change: &Change, now_ms: u64) -> Vec<Delivery> {
        if self.queues.is_empty() {
            return Vec::new();
        }
        let body = Body {
            state: if change.raised { "raised" } else { "cleared" },
            alert: &change.alert,
        };
        // Serializing plain strings and numbers cannot fail.
        let body = serde_json::to_string(&body).unwrap_or_default();
        let mut out = Vec::new();
        for q in &self.queues {
            out.push(Delivery {
                id: self.next_id,
                url: q.url.clone(),
                body: body.clone(),
                queued_ms: now_ms,
            });
            self.next_id += 1;
        }
        out
    }

    /// Hands `d` to its URL's task; returns at once. A delivery to a URL
    /// that is no longer configured is finished, not sent.
    pub fn queue(&mut self, d: Delivery) {
        let Some(q) = self.queues.iter().find(|q| q.url == d.url) else {
            warn!(
                url = %d.url,
                "alert webhook not sent: {} is no longer in [alerts] webhooks", d.url
            );
            let _ = self.done_tx.send(d.id);
            return;
        };
        let dropped = {
            let mut waiting = q.lock();
            let dropped = if waiting.len() >= QUEUE_MAX {
                waiting.pop_front()
            } else {
                None
            };
            waiting.push_back(d);
            dropped
        };
        q.wake.notify_one();
        if let Some(old) = dropped {
            warn!(
                url = %old.url,
                "alert webhook dropped: {QUEUE_MAX} deliveries already wait for {}, the oldest \
                 goes (`rebound alerts --all` lists every alert); check that it is up and \
                 answers 2xx to a POST",
                old.url
            );
            let _ = self.done_tx.send(old.id);
        }
    }

    /// The ids of the deliveries finished since the last call.
    pub fn finished(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        while let Ok(id) = self.done_rx.try_recv() {
            out.push(id);
        }
        out
    }
}

impl Drop for Webhooks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn deliver_all(
    agent: ureq::Agent,
    q: Arc<Queue>,
    retry: Retry,
    done: mpsc::UnboundedSender<u64>,
) {
    loop {
        let next = q.lock().pop_front();
        match next {
            Some(d) => {
                deliver(&agent, retry, &d).await;
                let _ = done.send(d.id);
            }
            None => q.wake.notified().await,
        }
    }
}

/// Posts one body until the receiver takes it or `retry_for` has passed
/// since it was queued (at least one attempt).
async fn deliver(agent: &ureq::Agent, retry: Retry, d: &Delivery) {
    let url = &d.url;
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(retry.first)
        .with_max_delay(retry.max)
        .with_max_times(usize::MAX)
        .build();
    for attempt in 1.. {
        let (a, u, j) = (agent.clone(), url.to_string(), d.body.clone());
        let sent = tokio::task::spawn_blocking(move || {
            a.post(&u)
                .header("content-type", "application/json")
                .send(j.as_str())
                .map(|_| ())
        })
        .await;
        let error = match sent {
            Ok(Ok(())) => {
                if attempt > 1 {
                    info!(%url, attempt, "alert webhook delivered after retrying");
                }
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("the delivery task failed: {e}"),
        };
        let waited = rebound_common::time::now_ms().saturating_sub(d.queued_ms);
        if Duration::from_millis(waited) >= retry.retry_for {
            warn!(
                %url, attempt, %error,
                "alert webhook given up {:?} after it was queued: the receiver missed this \
                 alert (`rebound alerts --all` lists it); check that {url} is up and answers 2xx \
                 to a POST, or fix [alerts] webhooks in the CS config",
                retry.retry_for
            );
            return;
        }
        let wait = delays.next().unwrap_or(retry.max);
        warn!(
            %url, attempt, %error,
            "alert webhook failed, retrying in {wait:?}: check that {url} is up and answers 2xx \
             to a POST"
        );
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use axum::routing::post;
    use std::time::Instant;

    fn change(raised: bool, id: &str) -> Change {
        Change {
            raised,
            alert: Alert {
                id: id.into(),
                kind: "rpo-exceeded".into(),
                subject: "m1".into(),
                severity: "warning".into(),
                message: "behind".into(),
                raised_ms: 1,
                cleared_ms: if raised { 0 } else { 2 },
                value: 3.5,
                threshold: 2.0,
                site: "onprem".into(),
            },
            component: "agent:m1".into(),
            replication: String::new(),
        }
    }

    #[tokio::test]
    async fn a_failed_post_is_retried_and_deliveries_stay_in_order() {
        let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let calls = Arc::new(Mutex::new(0u32));
        let app = {
            let (got, calls) = (got.clone(), calls.clone());
            axum::Router::new().route(
                "/hook",
                post(move |body: String| {
                    let (got, calls) = (got.clone(), calls.clone());
                    async move {
                        let n = {
                            let mut c = calls.lock().unwrap();
                            *c += 1;
                            *c
                        };
                        if n == 1 {
                            return StatusCode::SERVICE_UNAVAILABLE;
                        }
                        got.lock()
                            .unwrap()
                            .push(serde_json::from_str(&body).unwrap());
                        StatusCode::OK
                    }
                }),
            )
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        let mut hooks = Webhooks::start(
            &[url],
            Retry {
                first: Duration::from_millis(20),
                max: Duration::from_millis(100),
                retry_for: Duration::from_secs(10),
            },
        );
        for c in [change(true, "a"), change(false, "a")] {
            for d in hooks.deliveries(&c, rebound_common::time::now_ms()) {
                hooks.queue(d);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.lock().unwrap().len() < 2 {
            assert!(Instant::now() < deadline, "webhook not delivered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = got.lock().unwrap().clone();
        assert_eq!(
            *calls.lock().unwrap(),
            3,
            "one failure, then both delivered"
        );
        assert_eq!(got[0]["state"], "raised");
        assert_eq!(got[1]["state"], "cleared");
        let a = &got[0]["alert"];
        assert_eq!(a["id"], "a");
        assert_eq!(a["kind"], "rpo-exceeded");
        assert_eq!(a["subject"], "m1");
        assert_eq!(a["value"], 3.5);
        assert_eq!(a["threshold"], 2.0);
        assert_eq!(a["site"], "onprem");
        assert_eq!(got[1]["alert"]["cleared_ms"], 2);
        let mut done = Vec::new();
        while done.len() < 2 {
            assert!(
                Instant::now() < deadline,
                "deliveries not reported finished"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            done.extend(hooks.finished());
        }
        assert_eq!(done, vec![0, 1]);
    }

    #[tokio::test]
    async fn a_full_queue_drops_its_oldest_and_a_late_body_is_given_up_after_one_try() {
        // Refuses every connection: nothing listens there any more.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", closed.local_addr().unwrap());
        drop(closed);
        let retry = Retry {
            first: Duration::from_secs(30),
            max: Duration::from_secs(30),
            retry_for: Duration::from_secs(60),
        };
        let mut hooks = Webhooks::start(std::slice::from_ref(&url), retry);
        // Queued an hour ago: one attempt, then given up, without the
        // 30 s backoff.
        let now = rebound_common::time::now_ms();
        let late = Delivery {
            id: 7,
            url: url.clone(),
            body: "{}".into(),
            queued_ms: now - 3_600_000,
        };
        hooks.resume(std::slice::from_ref(&late));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut done = Vec::new();
        while done.is_empty() {
            assert!(
                Instant::now() < deadline,
                "a late delivery was not given up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            done = hooks.finished();
        }
        assert_eq!(done, vec![7]);
        // Fresh ids go on after the resumed ones.
        let c = change(true, "a");
        assert_eq!(hooks.deliveries(&c, now)[0].id, 8);
        // Past the bound the oldest waiting ones go (nothing runs between
        // these calls on the test's single thread).
        let mut first = 0;
        for i in 0..QUEUE_MAX + 2 {
            let d = hooks.deliveries(&c, now).remove(0);
            if i == 0 {
                first = d.id;
            }
            hooks.queue(d);
        }
        assert_eq!(hooks.finished(), vec![first, first + 1]);
        // An outbox entry for a URL no longer configured is not sent.
        hooks.queue(Delivery {
            url: "http://gone.example/h".into(),
            ..late
        });
        assert_eq!(hooks.finished(), vec![7]);
    }
}
