//! Link failures as events for the configuration server, rate-limited.
//!
//! A link retries every few seconds for as long as it fails; an event per
//! attempt would bury everything else in `rebound status`. One event goes
//! out when the cause changes (or the peer does), the same again at most
//! every [`REPEAT_EVERY`] while it persists (so a CS that restarted, or an
//! operator reading only the newest events, still sees it), and one
//! `link-restored` info event when a link that failed works again.

use super::{LinkFailure, Peer, RESTORED_KIND};
use crate::control::ControlHandle;
use rebound_proto::control::Event;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often an unchanged failure is reported again.
pub const REPEAT_EVERY: Duration = Duration::from_secs(60);

/// The last failure reported on one link.
#[derive(Debug)]
struct Reported {
    addr: String,
    kind: &'static str,
    at: Instant,
}

/// Where a component's link events go: its control channel, once it runs
/// (shared by the reporters of all its links).
#[derive(Clone, Default)]
pub struct EventSink(Arc<OnceLock<ControlHandle>>);

impl EventSink {
    /// Sets the control channel (the first one set stays).
    pub fn set(&self, h: ControlHandle) {
        let _ = self.0.set(h);
    }

    pub fn get(&self) -> Option<&ControlHandle> {
        self.0.get()
    }
}

impl fmt::Debug for EventSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.0.get().is_some() {
            "set"
        } else {
            "unset"
        };
        write!(f, "EventSink({state})")
    }
}

/// The reporting state of one link (the agent's to its PS, a PS's to one
/// MT) and where its events go.
#[derive(Debug, Default)]
pub struct LinkReporter {
    sink: EventSink,
    last: Mutex<Option<Reported>>,
}

impl LinkReporter {
    /// A reporter for another link of the same component (same sink).
    pub fn sibling(&self) -> LinkReporter {
        LinkReporter {
            sink: self.sink.clone(),
            last: Mutex::new(None),
        }
    }

    /// Sends events to `h` from now on.
    pub fn set_events(&self, h: ControlHandle) {
        self.sink.set(h);
    }

    /// The event for `failure` if one is due at `now`.
    pub fn failed(
        &self,
        peer: &Peer,
        replication: &str,
        failure: &LinkFailure,
        now: Instant,
    ) -> Option<Event> {
        let kind = failure.cause.kind();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let due = match last.as_ref() {
            Some(r) => {
                r.kind != kind
                    || r.addr != peer.addr
                    || now.saturating_duration_since(r.at) >= REPEAT_EVERY
            }
            None => true,
        };
        if !due {
            return None;
        }
        *last = Some(Reported {
            addr: peer.addr.clone(),
            kind,
            at: now,
        });
        Some(Event {
            severity: "error".into(),
            kind: kind.into(),
            message: failure.message(peer),
            replication_id: replication.into(),
            ..Default::default()
        })
    }

    /// The `link-restored` event when a failure was reported, else None.
    pub fn restored(&self, peer: &Peer, replication: &str) -> Option<Event> {
        let was = self.last.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        Some(Event {
            severity: "info".into(),
            kind: RESTORED_KIND.into(),
            message: format!(
                "the link to {peer} works again (it failed with {})",
                was.kind
            ),
            replication_id: replication.into(),
            ..Default::default()
        })
    }

    /// Sends the failure's event when due. Without a control channel yet
    /// nothing is recorded, so the first event goes out once there is one.
    pub fn report_failure(&self, peer: &Peer, replication: &str, failure: &LinkFailure) {
        if let Some(h) = self.sink.get() {
            if let Some(ev) = self.failed(peer, replication, failure, Instant::now()) {
                h.event(ev);
            }
        }
    }

    /// Sends `link-restored` when a failure was reported.
    pub fn report_restored(&self, peer: &Peer, replication: &str) {
        if let Some(h) = self.sink.get() {
            if let Some(ev) = self.restored(peer, replication) {
                h.event(ev);
            }
        }
    }
}
