//! Forwarding to the master target (DESIGN.md §6): one apply stream per
//! replication, each to the MT of the replication's route or to the
//! default `[mt]`, and the proxy for the agents' chunk-hash requests.
//!
//! - [`route`]: which MT a replication goes to, kept across restarts;
//! - [`link`]: connections to one MT and the chunk-hash proxy;
//! - [`apply_stream`]: the per-replication task that streams cached frames
//!   and hands the MT's applied seq back to the cache;
//! - [`Forwarders`] (here): the tasks, one per replication.

pub mod apply_stream;
pub mod error;
pub mod link;
pub mod route;

pub use apply_stream::MAX_INFLIGHT;
pub use error::ForwardError;
pub use link::MtLink;
pub use route::{load_route, route_path, Route};

use crate::cache::Replication;
use crate::metrics::PsMetrics;
use crate::segment;
use rebound_common::tls::TlsFiles;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;

/// Largest gRPC message exchanged with the MT (one frame plus room).
pub const MAX_MESSAGE: usize = segment::MAX_ENTRY + (1 << 20);

/// The forwarding tasks, one per replication, each to its replication's
/// MT (its route), or to the default `[mt]` of the config.
#[derive(Debug)]
pub struct Forwarders {
    link: Arc<MtLink>,
    tls: TlsFiles,
    links: Mutex<HashMap<String, Arc<MtLink>>>,
    /// The machine of each routed replication: the CS assigned the
    /// replication to it (AddReplication), and only its agent may use it.
    machines: Mutex<HashMap<String, String>>,
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
    closed: AtomicBool,
    /// Where the apply streams count forwarded bytes and failures, and the
    /// ingest streams received bytes.
    metrics: Arc<PsMetrics>,
}

impl Forwarders {
    pub fn new(link: Arc<MtLink>) -> Forwarders {
        Forwarders {
            tls: link.tls.clone(),
            link,
            links: Mutex::new(HashMap::new()),
            machines: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            metrics: Arc::default(),
        }
    }

    /// These forwarders, counting into `metrics` (the registry's).
    pub fn counting(mut self, metrics: Arc<PsMetrics>) -> Forwarders {
        self.metrics = metrics;
        self
    }

    /// The PS's metrics families.
    pub fn metrics(&self) -> &Arc<PsMetrics> {
        &self.metrics
    }

    /// Why this PS cannot reach its MTs now: one sentence per failing link
    /// a forwarder uses (its route's, or the default `[mt]`), empty while
    /// all work.
    pub fn link_errors(&self) -> Vec<String> {
        let ids: Vec<String> = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut out: Vec<String> = ids
            .iter()
            .filter_map(|id| self.link_for(id).failure())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The default link (`[mt]`).
    pub fn link(&self) -> &Arc<MtLink> {
        &self.link
    }

    /// The MT link of replication `id`: its route, else the default.
    pub fn link_for(&self, id: &str) -> Arc<MtLink> {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .unwrap_or_else(|| self.link.clone())
    }

    /// Sets replication `id`'s route. Returns true when it changed (the
    /// caller restarts its forwarder).
    pub fn set_route(&self, id: &str, route: &Route) -> bool {
        self.machines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), route.machine_id.clone());
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if links
            .get(id)
            .is_some_and(|l| l.addr == route.mt_address && l.server_name == route.mt_server_name)
        {
            return false;
        }
        links.insert(
            id.to_string(),
            Arc::new(
                MtLink::new(
                    self.tls.clone(),
                    route.mt_address.clone(),
                    route.mt_server_name.clone(),
                )
                .reporting_like(&self.link),
            ),
        );
        true
    }

    /// The machine replication `id` is routed for, when the CS routed it
    /// here (AddReplication, kept across restarts in its route).
    pub fn routed_machine(&self, id: &str) -> Option<String> {
        self.machines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Starts the replication's forwarder unless it runs already.
    pub fn ensure(&self, rep: &Arc<Replication>) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if tasks.get(rep.id()).is_some_and(|h| !h.is_finished()) {
            return;
        }
        let task = tokio::spawn(apply_stream::forward_loop(
            rep.clone(),
            self.link_for(rep.id()),
            apply_stream::Counters::new(&self.metrics, rep.id()),
        ));
        tasks.insert(rep.id().to_string(), task);
    }

    /// Stops replication `id`'s forwarder (a route change or RemoveReplication).
    pub fn stop(&self, id: &str) {
        let task = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(t) = task {
            t.abort();
        }
    }

    /// Forgets replication `id` entirely.
    pub fn remove(&self, id: &str) {
        self.stop(id);
        self.metrics.forget(id);
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.machines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Stops every forwarder (nothing they hold needs flushing: the cache
    /// keeps every frame until the MT has applied it).
    pub fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, t) in tasks {
            t.abort();
        }
    }
}
