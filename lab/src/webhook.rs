//! A loopback webhook receiver, so a test sees the alerts the configuration
//! server posts (`[alerts] webhooks` in its config) the way an operator's
//! pager would: over HTTP, in the order they arrive.
//!
//! It serves `POST /hook` on a free port of a host the test picks (a lab
//! host's 127.0.0.x), on a runtime and a thread of its own, so it outlives
//! restarts of the CS and stops when dropped. Each JSON body it accepts is
//! kept in order; [`WebhookReceiver::fail_first`] makes it answer 500 to
//! the next posts, so the sender's retry is exercised.

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What the handler shares with the test.
#[derive(Default)]
struct Shared {
    /// The accepted bodies, in arrival order.
    bodies: Mutex<Vec<Value>>,
    /// Posts still to answer with 500.
    fail_left: AtomicU64,
    /// Every post, refused ones included.
    posts: AtomicU64,
}

impl Shared {
    fn bodies(&self) -> MutexGuard<'_, Vec<Value>> {
        self.bodies.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An HTTP server on loopback that records the JSON bodies POSTed to it.
pub struct WebhookReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
}

impl WebhookReceiver {
    /// Listens on a free port of `ip` and serves `POST /hook`.
    pub fn start(ip: Ipv4Addr) -> Result<WebhookReceiver> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("webhook-receiver")
            .enable_all()
            .build()
            .context("cannot start the runtime of the webhook receiver")?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind((ip, 0)))
            .with_context(|| format!("the webhook receiver cannot listen on {ip}"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(shared.clone());
        rt.spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("webhook receiver on {addr} stopped: {e}");
            }
        });
        Ok(WebhookReceiver {
            addr,
            shared,
            rt: Some(rt),
        })
    }

    /// The URL to give the sender: `http://<ip>:<port>/hook`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The bodies accepted so far, in arrival order (a body that is not
    /// JSON is kept as a JSON string of its text).
    pub fn received(&self) -> Vec<Value> {
        self.bodies().clone()
    }

    /// Every POST so far, including those answered with 500.
    pub fn posts(&self) -> u64 {
        self.shared.posts.load(Ordering::SeqCst)
    }

    /// Answers 500 to the next `n` posts (and keeps none of them).
    pub fn fail_first(&self, n: u64) {
        self.shared.fail_left.store(n, Ordering::SeqCst);
    }

    /// Waits until an accepted body satisfies `pred`; that body. The error
    /// lists what did arrive.
    pub fn wait_for(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Result<Value> {
        let start = Instant::now();
        loop {
            if let Some(v) = self.bodies().iter().find(|v| pred(v)) {
                return Ok(v.clone());
            }
            if start.elapsed() > timeout {
                bail!(
                    "no matching webhook post within {timeout:?} at {} ({} posts, accepted: {})",
                    self.url(),
                    self.posts(),
                    Value::Array(self.received())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn bodies(&self) -> MutexGuard<'_, Vec<Value>> {
        self.shared.bodies()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// One POST: 500 while failures are asked for, else kept and 204.
async fn receive(State(s): State<Arc<Shared>>, body: Bytes) -> StatusCode {
    s.posts.fetch_add(1, Ordering::SeqCst);
    let failing = s
        .fail_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    s.bodies().push(v);
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(url: &str, body: &str) -> u16 {
        match ureq::post(url)
            .header("content-type", "application/json")
            .send(body)
        {
            Ok(r) => r.status().as_u16(),
            Err(ureq::Error::StatusCode(c)) => c,
            Err(e) => panic!("post to {url}: {e}"),
        }
    }

    #[test]
    fn it_keeps_bodies_in_order_after_the_failures_asked_for() {
        let r = WebhookReceiver::start(Ipv4Addr::LOCALHOST).unwrap();
        r.fail_first(2);
        assert_eq!(post(&r.url(), r#"{"n":1}"#), 500);
        assert_eq!(post(&r.url(), r#"{"n":1}"#), 500);
        assert_eq!(post(&r.url(), r#"{"n":1}"#), 204);
        assert_eq!(post(&r.url(), "not json"), 204);
        assert_eq!(post(&r.url(), r#"{"n":2}"#), 204);
        assert_eq!(r.posts(), 5);
        assert_eq!(
            r.received(),
            vec![
                serde_json::json!({"n": 1}),
                Value::String("not json".into()),
                serde_json::json!({"n": 2})
            ]
        );
        let v = r.wait_for(|v| v["n"] == 2, Duration::from_secs(1)).unwrap();
        assert_eq!(v["n"], 2);
        let e = r
            .wait_for(|v| v["n"] == 3, Duration::from_millis(100))
            .unwrap_err();
        assert!(e.to_string().contains("5 posts"), "{e}");
    }
}
