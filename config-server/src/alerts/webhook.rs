//! Alert webhooks: every raise and clear POSTed as JSON to each configured
//! URL. One ordered queue and task per URL, so a slow or dead receiver
//! delays only its own deliveries and never the evaluation; each delivery
//! is retried with exponential backoff for `webhook_retry_for`, then given
//! up (logged) so the queue moves on.

use super::evaluate::{Alert, Change};
use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// How long one POST may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The JSON body of a delivery.
#[derive(Debug, Serialize)]
pub struct Body<'a> {
    /// "raised" or "cleared".
    pub state: &'static str,
    pub alert: &'a Alert,
}

/// The delays between attempts.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub first: Duration,
    pub max: Duration,
    /// Give a delivery up once it has been retried this long.
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

/// The queues of every configured URL.
pub struct Webhooks {
    queues: Vec<mpsc::UnboundedSender<String>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Webhooks {
    /// Starts one delivery task per URL.
    pub fn start(urls: &[String], retry: Retry) -> Webhooks {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(ATTEMPT_TIMEOUT))
            .build()
            .into();
        let mut queues = Vec::new();
        let mut tasks = Vec::new();
        for url in urls {
            let (tx, rx) = mpsc::unbounded_channel();
            queues.push(tx);
            tasks.push(tokio::spawn(deliver_all(
                agent.clone(),
                url.clone(),
                retry,
                rx,
            )));
        }
        Webhooks { queues, tasks }
    }

    /// Queues `change` for every URL; returns at once.
    pub fn send(&self, change: &Change) {
        if self.queues.is_empty() {
            return;
        }
        let body = Body {
            state: if change.raised { "raised" } else { "cleared" },
            alert: &change.alert,
        };
        // Serializing plain strings and numbers cannot fail.
        let json = serde_json::to_string(&body).unwrap_or_default();
        for q in &self.queues {
            let _ = q.send(json.clone());
        }
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
    url: String,
    retry: Retry,
    mut rx: mpsc::UnboundedReceiver<String>,
) {
    while let Some(json) = rx.recv().await {
        deliver(&agent, &url, retry, json).await;
    }
}

/// Posts one body until the receiver takes it or `retry_for` has passed.
async fn deliver(agent: &ureq::Agent, url: &str, retry: Retry, json: String) {
    let started = Instant::now();
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(retry.first)
        .with_max_delay(retry.max)
        .with_max_times(usize::MAX)
        .build();
    for attempt in 1.. {
        let (a, u, j) = (agent.clone(), url.to_string(), json.clone());
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
        if started.elapsed() >= retry.retry_for {
            warn!(
                %url, attempt, %error,
                "alert webhook given up after {:?} of retries: the receiver missed this alert \
                 (`rebound alerts --all` lists it); check that {url} is up and answers 2xx to a \
                 POST, or fix [alerts] webhooks in the CS config",
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
    use std::sync::{Arc, Mutex};

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
        let hooks = Webhooks::start(
            &[url],
            Retry {
                first: Duration::from_millis(20),
                max: Duration::from_millis(100),
                retry_for: Duration::from_secs(10),
            },
        );
        hooks.send(&change(true, "a"));
        hooks.send(&change(false, "a"));
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
    }
}
