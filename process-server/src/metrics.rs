//! The process server's Prometheus metrics (docs/METRICS.md, the
//! `rebound_ps_*` rows): what an operator watches of a PS is how much
//! arrives from the agents, how much reaches the MT, how full the cache is
//! and how far the MT is behind.
//!
//! Counters move where the events happen (an ingest stream and an apply
//! stream each take their replication's labelled counters once and keep
//! them). Gauges copy, at scrape time ([`PsMetrics::refresh`]), what the
//! cache and the status sampler keep anyway, so the data path pays nothing
//! for them.

use crate::cache::{Cache, Replication};
use crate::forward::Forwarders;
use crate::status::{self, StatusCell};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rebound_common::metrics::Registry;
use rebound_proto::control::PsStatus;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The label of every per-replication family.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicationLabels {
    pub replication: String,
}

fn labels(id: &str) -> ReplicationLabels {
    ReplicationLabels {
        replication: id.to_string(),
    }
}

/// A gauge of a fraction (ratios, seconds).
type Fraction = Gauge<f64, AtomicU64>;
type PerReplication<M> = Family<ReplicationLabels, M>;

/// The families of a process server's registry.
#[derive(Debug, Default)]
pub struct PsMetrics {
    received: PerReplication<Counter>,
    forwarded: PerReplication<Counter>,
    forward_errors: PerReplication<Counter>,
    compression_ratio: PerReplication<Fraction>,
    cache_bytes: PerReplication<Gauge>,
    cache_capacity: Gauge,
    backlog_bytes: PerReplication<Gauge>,
    backlog_seconds: PerReplication<Fraction>,
    link_up: Gauge,
    /// The replications the gauges showed at the last refresh: those gone
    /// since (removed) lose their series.
    shown: Mutex<HashSet<String>>,
}

impl PsMetrics {
    /// Adds every family to `registry` (the families are shared handles:
    /// this value keeps counting into them).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "rebound_ps_received_bytes",
            "Frame bytes received from agents (as sent)",
            self.received.clone(),
        );
        registry.register(
            "rebound_ps_forwarded_bytes",
            "Frame bytes forwarded to the master target",
            self.forwarded.clone(),
        );
        registry.register(
            "rebound_ps_compression_ratio",
            "Uncompressed / compressed bytes of the frames received (1 when uncompressed)",
            self.compression_ratio.clone(),
        );
        registry.register(
            "rebound_ps_cache_bytes",
            "Cache held for the replication",
            self.cache_bytes.clone(),
        );
        registry.register(
            "rebound_ps_cache_capacity_bytes",
            "The cache cap (cache_max_bytes)",
            self.cache_capacity.clone(),
        );
        registry.register(
            "rebound_ps_backlog_bytes",
            "Cache bytes held but not yet applied at the master target (whole segments)",
            self.backlog_bytes.clone(),
        );
        registry.register(
            "rebound_ps_backlog_seconds",
            "Age of the oldest record not yet applied at the master target",
            self.backlog_seconds.clone(),
        );
        registry.register(
            "rebound_ps_forward_errors",
            "Failed forward streams to the master target",
            self.forward_errors.clone(),
        );
        registry.register(
            "rebound_ps_link_up",
            "1 while the master target link works, 0 while it fails",
            self.link_up.clone(),
        );
    }

    /// Replication `id`'s received-bytes counter, for one ingest stream.
    pub fn received(&self, id: &str) -> Counter {
        self.received.get_or_create_owned(&labels(id))
    }

    /// Replication `id`'s forwarded-bytes counter, for one apply stream.
    pub fn forwarded(&self, id: &str) -> Counter {
        self.forwarded.get_or_create_owned(&labels(id))
    }

    /// Replication `id`'s failed-forward-streams counter.
    pub fn forward_errors(&self, id: &str) -> Counter {
        self.forward_errors.get_or_create_owned(&labels(id))
    }

    /// Drops the counters of a removed replication.
    pub fn forget(&self, id: &str) {
        let l = labels(id);
        self.received.remove(&l);
        self.forwarded.remove(&l);
        self.forward_errors.remove(&l);
    }

    /// Copies the cache's state, the last sampled `status` (for the
    /// backlog's age) and the MT link's health into the gauges.
    pub fn refresh(&self, cache: &Cache, status: Option<&PsStatus>, link_up: bool) {
        self.cache_capacity.set(gauge(cache.account().cap()));
        self.link_up.set(i64::from(link_up));
        let lag_ms: HashMap<&str, u64> = status
            .map(|s| {
                s.replications
                    .iter()
                    .map(|r| (r.replication_id.as_str(), r.lag_ms))
                    .collect()
            })
            .unwrap_or_default();
        let mut now = HashSet::new();
        for rep in cache.replications() {
            let l = labels(rep.id());
            self.cache_bytes
                .get_or_create(&l)
                .set(gauge(rep.cache_bytes()));
            self.backlog_bytes
                .get_or_create(&l)
                .set(gauge(rep.backlog_bytes()));
            let lag = lag_ms.get(rep.id()).copied().unwrap_or(0);
            self.backlog_seconds
                .get_or_create(&l)
                .set(lag as f64 / 1000.0);
            self.compression_ratio
                .get_or_create(&l)
                .set(compression_ratio(&rep));
            now.insert(rep.id().to_string());
        }
        let mut shown = self.shown.lock().unwrap_or_else(|p| p.into_inner());
        for gone in shown.difference(&now) {
            let l = labels(gone);
            self.cache_bytes.remove(&l);
            self.backlog_bytes.remove(&l);
            self.backlog_seconds.remove(&l);
            self.compression_ratio.remove(&l);
        }
        *shown = now;
    }
}

/// A byte count as a gauge value (caches stay far below i64::MAX).
fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Uncompressed ÷ stored bytes of the frames this replication cached
/// since the PS started; 1 before any.
fn compression_ratio(rep: &Replication) -> f64 {
    let s = rep.stats();
    let stored = s.bytes_stored.load(Ordering::Relaxed);
    let plain = s.bytes_uncompressed.load(Ordering::Relaxed);
    if stored == 0 || plain == 0 {
        1.0
    } else {
        plain as f64 / stored as f64
    }
}

/// What a scrape reads, once the cache is recovered.
pub struct Sources {
    pub cache: Arc<Cache>,
    pub forwarders: Arc<Forwarders>,
    pub status: Arc<StatusCell>,
}

/// The endpoint's `on_scrape` closure: copies [`Sources`] into the
/// gauges, and leaves them alone while the cache is still recovering
/// (`sources` not set yet).
pub fn on_scrape(sources: Arc<OnceLock<Sources>>) -> impl Fn() + Send + Sync + 'static {
    move || {
        if let Some(s) = sources.get() {
            let status = status::last(&s.status);
            s.forwarders.metrics().refresh(
                &s.cache,
                status.as_ref(),
                s.forwarders.link_errors().is_empty(),
            );
        }
    }
}
