//! Where the MT raises events for the configuration server.
//!
//! Storage code has no control channel of its own: the store holds an
//! [`Events`] sink, which `run` connects to the control task once it has
//! started. Until then (and without a CS) events are only logged by whoever
//! raises them.

use rebound_common::control::ControlHandle;
use rebound_proto::control as pb;
use std::sync::{Arc, OnceLock};

/// A sink of events, shared by the store and its replications.
#[derive(Clone, Default)]
pub struct Events(Arc<OnceLock<ControlHandle>>);

impl Events {
    /// Sends every later event to the CS through `handle`. Only the first
    /// connection counts: there is one control task per process.
    pub fn connect(&self, handle: ControlHandle) {
        let _ = self.0.set(handle);
    }

    /// Raises an error event about `replication`.
    pub fn error(&self, kind: &str, replication: &str, message: String) {
        self.raise("error", kind, replication, message);
    }

    /// Raises an informational event about `replication` (a problem that
    /// solved itself).
    pub fn info(&self, kind: &str, replication: &str, message: String) {
        self.raise("info", kind, replication, message);
    }

    fn raise(&self, severity: &str, kind: &str, replication: &str, message: String) {
        if let Some(h) = self.0.get() {
            h.event(pb::Event {
                severity: severity.into(),
                kind: kind.into(),
                message,
                replication_id: replication.into(),
                time_ms: 0,
                component: String::new(),
            });
        }
    }
}
