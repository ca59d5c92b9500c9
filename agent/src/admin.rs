//! The local admin socket and status file (INTERFACES.md "Agent local admin
//! socket").
//!
//! Tests, the lab scripts and an operator on the machine talk to the agent
//! through `<state_dir>/admin.sock`: one JSON line in, one JSON line out
//! (`status`, `tag`, `wait_durable`). The same status is written to
//! `<state_dir>/status.json` every second, atomically, for tools that only
//! read files.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rebound_common::frame::TagKind;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::capture::{Capture, TagError};
use crate::config::Settings;
use crate::sender::Link;

/// Default wait of `tag` for a resync window to finish.
const DEFAULT_TAG_TIMEOUT_MS: u64 = 60_000;
/// Default wait of `wait_durable`.
const DEFAULT_WAIT_TIMEOUT_MS: u64 = 30_000;
/// Longest request line accepted.
const MAX_LINE: usize = 64 << 10;

/// What the admin handlers need.
pub struct Admin {
    pub capture: Arc<Capture>,
    pub link: Arc<Link>,
    pub settings: Arc<Settings>,
}

impl Admin {
    /// The status object (also the content of status.json).
    pub fn status(&self) -> Value {
        let snap = self.capture.snapshot();
        let mut v = serde_json::to_value(&snap).unwrap_or_else(|_| json!({}));
        if let Value::Object(m) = &mut v {
            m.insert("connected".into(), json!(self.link.is_connected()));
            m.insert("bytes_sent".into(), json!(self.link.bytes_sent()));
            m.insert("machine_id".into(), json!(self.settings.machine_id));
            m.insert(
                "replication_id".into(),
                json!(self.capture.replication_id()),
            );
        }
        v
    }

    async fn tag(&self, req: &Value) -> Value {
        let kind_s = req.get("kind").and_then(Value::as_str).unwrap_or("crash");
        let Some(kind) = TagKind::parse(kind_s) else {
            return json!({"error": format!("unknown tag kind {kind_s:?}: use crash, app or shutdown")});
        };
        let timeout = Duration::from_millis(
            req.get("timeout_ms")
                .and_then(Value::as_u64)
                .unwrap_or(DEFAULT_TAG_TIMEOUT_MS),
        );
        let deadline = Instant::now() + timeout;
        loop {
            match self.capture.cut_tag(kind, true) {
                Ok(Some((id, seq))) => {
                    info!(tag = %id, seq, "recovery point cut on request");
                    return json!({"id": id, "seq": seq});
                }
                Ok(None) => return json!({"error": "no tag was cut"}),
                Err(e @ TagError::Fenced) => return json!({"error": e.to_string()}),
                Err(e) => {
                    if Instant::now() >= deadline {
                        return json!({"error": format!("{e} (waited {} ms)", timeout.as_millis())});
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_durable(&self, req: &Value) -> Value {
        let timeout = Duration::from_millis(
            req.get("timeout_ms")
                .and_then(Value::as_u64)
                .unwrap_or(DEFAULT_WAIT_TIMEOUT_MS),
        );
        let deadline = Instant::now() + timeout;
        let target = self.capture.stream().handed_over_seq();
        self.capture.stream().request_flush();
        let mut rx = self.capture.stream().durable_watch();
        loop {
            let s = self.capture.snapshot();
            let want = target.max(s.window_end_tag_seq);
            if s.consistent && s.durable_seq >= want {
                return json!({"durable_seq": s.durable_seq});
            }
            let now = Instant::now();
            if now >= deadline {
                return json!({"error": format!(
                    "timed out after {} ms: durable_seq {} of {} (mode {}, {} extents waiting for resync, connected {})",
                    timeout.as_millis(), s.durable_seq, want, s.mode.as_str(), s.resync_pending_extents,
                    self.link.is_connected()
                )});
            }
            if !s.consistent {
                self.capture.stream().request_flush();
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            let _ = tokio::time::timeout(wait, rx.changed()).await;
        }
    }

    /// Answers one request line.
    pub async fn handle(&self, line: &str) -> Value {
        let req: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => return json!({"error": format!("request is not JSON: {e}")}),
        };
        match req.get("cmd").and_then(Value::as_str) {
            Some("status") => self.status(),
            Some("tag") => self.tag(&req).await,
            Some("wait_durable") => self.wait_durable(&req).await,
            Some(other) => {
                json!({"error": format!("unknown cmd {other:?}: use status, tag or wait_durable")})
            }
            None => json!({"error": "missing \"cmd\""}),
        }
    }
}

async fn connection(admin: Arc<Admin>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut r).take(MAX_LINE as u64).read_line(&mut line).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                debug!("admin connection: {e}");
                return;
            }
        }
        if line.trim().is_empty() {
            continue;
        }
        let answer = admin.handle(line.trim()).await;
        let mut out = answer.to_string();
        out.push('\n');
        if w.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Serves the admin socket until `stop`.
pub async fn serve(listener: UnixListener, admin: Arc<Admin>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => { tokio::spawn(connection(admin.clone(), s)); }
                Err(e) => {
                    warn!("admin socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => if *stop.borrow() { return },
        }
    }
}

/// Writes `status.json` every second until `stop`.
pub async fn status_writer(admin: Arc<Admin>, path: PathBuf, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => if *stop.borrow() { return },
        }
        let mut text = admin.status().to_string();
        text.push('\n');
        let p = path.clone();
        let r = tokio::task::spawn_blocking(move || {
            rebound_common::durable::write_atomic(&p, text.as_bytes())
        })
        .await;
        match r {
            Ok(Err(e)) if !warned => {
                warned = true;
                warn!("cannot write {}: {e}", path.display());
            }
            Ok(Ok(())) => warned = false,
            _ => {}
        }
    }
}
