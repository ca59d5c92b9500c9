//! The master target's numbers for an operator's Prometheus
//! (docs/METRICS.md, the `rebound_mt_*` families): what apply, retention
//! and rollback do per replication, and how long the fdatasyncs of the
//! replicas and journals take.
//!
//! The data path pays only for atomics: a replication keeps its
//! [`Observer`] (its labelled counter, taken once when it is opened, and a
//! few atomics apply, retention and rollback set where things happen), and
//! [`Timed`] wraps the storage so every fdatasync lands in the histogram.
//! Gauges are filled at scrape time by [`MtMetrics::refresh`] from state
//! the MT keeps anyway. A scrape never waits for a replication's lock (a
//! rollback holds it for minutes): a replication that is busy keeps the
//! numbers of the previous scrape until the next one finds it free.

use crate::replication::{Inner, Replication, Store};
use crate::storage::{Storage, Target};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use rebound_common::metrics::{latency_buckets, Endpoint, MetricsError, Readiness, Registry};
use rebound_common::time::now_ms;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;
use tokio::sync::watch;

/// The point kinds every replication reports, 0 when it holds none, so a
/// dashboard finds the series before the first point of a kind.
const KINDS: [&str; 3] = ["crash", "app", "shutdown"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct ReplicationLabels {
    replication: String,
    machine: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PointLabels {
    replication: String,
    machine: String,
    kind: String,
}

type PerReplication<M> = Family<ReplicationLabels, M>;
type Seconds = Gauge<f64, AtomicU64>;

/// Every `rebound_mt_*` family of one MT (clones share the series).
#[derive(Clone)]
pub struct MtMetrics {
    applied_seq: PerReplication<Gauge>,
    apply_lag: PerReplication<Seconds>,
    applied_bytes: PerReplication<Counter>,
    retention_bytes: PerReplication<Gauge>,
    oldest_point_age: PerReplication<Seconds>,
    points: Family<PointLabels, Gauge>,
    retention_capped: PerReplication<Gauge>,
    rollback_done: PerReplication<Gauge>,
    rollback_total: PerReplication<Gauge>,
    fsync: Histogram,
    /// The replications (and point kinds) of the last scrape: the series
    /// of a replication that has ended since are removed.
    shown: Arc<Mutex<BTreeMap<ReplicationLabels, BTreeSet<String>>>>,
}

impl Default for MtMetrics {
    fn default() -> MtMetrics {
        MtMetrics {
            applied_seq: Family::default(),
            apply_lag: Family::default(),
            applied_bytes: Family::default(),
            retention_bytes: Family::default(),
            oldest_point_age: Family::default(),
            points: Family::default(),
            retention_capped: Family::default(),
            rollback_done: Family::default(),
            rollback_total: Family::default(),
            fsync: Histogram::new(latency_buckets()),
            shown: Arc::default(),
        }
    }
}

fn labels(r: &Replication) -> ReplicationLabels {
    ReplicationLabels {
        replication: r.id().to_string(),
        machine: r.machine_id().to_string(),
    }
}

fn point_labels(l: &ReplicationLabels, kind: &str) -> PointLabels {
    PointLabels {
        replication: l.replication.clone(),
        machine: l.machine.clone(),
        kind: kind.to_string(),
    }
}

impl MtMetrics {
    /// Adds every family to the MT's registry.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register(
            "rebound_mt_applied_seq",
            "last applied sequence number",
            self.applied_seq.clone(),
        );
        r.register(
            "rebound_mt_apply_lag_seconds",
            "write-to-apply latency of the last applied recovery point: the MT's clock when it applied the point minus the point's time (the agent's clock; 0 if that is ahead); set only when a point is applied, so it does not grow while apply stalls",
            self.apply_lag.clone(),
        );
        r.register(
            "rebound_mt_applied_bytes",
            "data bytes written to the replica (writes and zeroed ranges)",
            self.applied_bytes.clone(),
        );
        r.register(
            "rebound_mt_retention_bytes",
            "retention journal size",
            self.retention_bytes.clone(),
        );
        r.register(
            "rebound_mt_oldest_point_age_seconds",
            "age of the oldest recovery point held (0 when none)",
            self.oldest_point_age.clone(),
        );
        r.register(
            "rebound_mt_points",
            "recovery points held, by kind",
            self.points.clone(),
        );
        r.register(
            "rebound_mt_retention_capped",
            "1 while the size cap keeps the retention window shorter than the policy",
            self.retention_capped.clone(),
        );
        r.register(
            "rebound_mt_rollback_done_bytes",
            "bytes a running rollback has restored",
            self.rollback_done.clone(),
        );
        r.register(
            "rebound_mt_rollback_total_bytes",
            "bytes the running rollback restores",
            self.rollback_total.clone(),
        );
        r.register(
            "rebound_mt_fsync_seconds",
            "fdatasync latency of replicas and journals",
            self.fsync.clone(),
        );
    }

    /// The histogram every fdatasync of the MT's storage lands in.
    pub(crate) fn fsync(&self) -> Histogram {
        self.fsync.clone()
    }

    /// What replication `id` (of `machine`) updates where things happen.
    pub(crate) fn observer(&self, id: &str, machine: &str) -> Observer {
        let l = ReplicationLabels {
            replication: id.to_string(),
            machine: machine.to_string(),
        };
        Observer {
            applied_bytes: self.applied_bytes.get_or_create(&l).clone(),
            apply_lag_ms: AtomicU64::new(0),
            retention_capped: AtomicBool::new(false),
            rollback_done: AtomicU64::new(0),
            rollback_total: AtomicU64::new(0),
        }
    }

    /// Copies every replication's state into the gauges (the `on_scrape`
    /// of the MT's endpoint).
    pub fn refresh(&self, store: &Store) {
        let now = now_ms();
        let mut shown = self.shown.lock().unwrap_or_else(PoisonError::into_inner);
        let mut now_shown = BTreeMap::new();
        for r in store.list() {
            let l = labels(&r);
            let mut kinds = shown.remove(&l).unwrap_or_default();
            self.set_atomics(&l, r.observed());
            if let Some(o) = r.try_observe(now) {
                self.applied_seq
                    .get_or_create(&l)
                    .set(i64::try_from(o.applied_seq).unwrap_or(i64::MAX));
                self.retention_bytes
                    .get_or_create(&l)
                    .set(i64::try_from(o.journal_bytes).unwrap_or(i64::MAX));
                self.oldest_point_age
                    .get_or_create(&l)
                    .set(o.oldest_point_age_ms as f64 / 1000.0);
                kinds.extend(KINDS.iter().map(|k| k.to_string()));
                kinds.extend(o.points_by_kind.keys().cloned());
                for k in &kinds {
                    let n = o.points_by_kind.get(k).copied().unwrap_or(0);
                    self.points
                        .get_or_create(&point_labels(&l, k))
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
            now_shown.insert(l, kinds);
        }
        // What is left ended since the last scrape.
        for (l, kinds) in shown.iter() {
            self.forget(l, kinds);
        }
        *shown = now_shown;
    }

    fn set_atomics(&self, l: &ReplicationLabels, o: &Observer) {
        let load = |a: &AtomicU64| i64::try_from(a.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        self.apply_lag
            .get_or_create(l)
            .set(o.apply_lag_ms.load(Ordering::Relaxed) as f64 / 1000.0);
        self.retention_capped
            .get_or_create(l)
            .set(i64::from(o.retention_capped.load(Ordering::Relaxed)));
        self.rollback_done
            .get_or_create(l)
            .set(load(&o.rollback_done));
        self.rollback_total
            .get_or_create(l)
            .set(load(&o.rollback_total));
    }

    fn forget(&self, l: &ReplicationLabels, kinds: &BTreeSet<String>) {
        for f in [
            &self.applied_seq,
            &self.retention_bytes,
            &self.retention_capped,
            &self.rollback_done,
            &self.rollback_total,
        ] {
            f.remove(l);
        }
        self.apply_lag.remove(l);
        self.oldest_point_age.remove(l);
        self.applied_bytes.remove(l);
        for k in kinds {
            self.points.remove(&point_labels(l, k));
        }
    }
}

/// What one replication counts where it happens: data applied, the lag
/// of the last point applied, whether the size cap shortened its window,
/// and a running rollback's progress.
pub(crate) struct Observer {
    applied_bytes: Counter,
    apply_lag_ms: AtomicU64,
    retention_capped: AtomicBool,
    rollback_done: AtomicU64,
    rollback_total: AtomicU64,
}

impl Observer {
    /// A durability cycle wrote `bytes` of data to the replica.
    pub(crate) fn applied(&self, bytes: u64) {
        if bytes > 0 {
            self.applied_bytes.inc_by(bytes);
        }
    }

    /// A recovery point stamped `point_ms` (the agent's clock) was applied
    /// at `now_ms` (the MT's clock): its write-to-apply latency, 0 when the
    /// agent's clock is ahead.
    pub(crate) fn point_applied(&self, point_ms: u64, now_ms: u64) {
        self.apply_lag_ms
            .store(now_ms.saturating_sub(point_ms), Ordering::Relaxed);
    }

    pub(crate) fn set_retention_capped(&self, capped: bool) {
        self.retention_capped.store(capped, Ordering::Relaxed);
    }

    pub(crate) fn retention_capped(&self) -> bool {
        self.retention_capped.load(Ordering::Relaxed)
    }

    /// A rollback of `total` bytes starts; its progress reads 0 again when
    /// the returned guard goes (the rollback ended, well or not).
    pub(crate) fn rollback_started(&self, total: u64) -> RollbackProgress<'_> {
        self.rollback_done.store(0, Ordering::Relaxed);
        self.rollback_total.store(total, Ordering::Relaxed);
        RollbackProgress(self)
    }
}

/// A running rollback's progress (see [`Observer::rollback_started`]).
pub(crate) struct RollbackProgress<'a>(&'a Observer);

impl RollbackProgress<'_> {
    /// `bytes` more of the replica are at the point.
    pub(crate) fn restored(&self, bytes: u64) {
        self.0.rollback_done.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Drop for RollbackProgress<'_> {
    fn drop(&mut self) {
        self.0.rollback_done.store(0, Ordering::Relaxed);
        self.0.rollback_total.store(0, Ordering::Relaxed);
    }
}

/// A replication's numbers at one moment (see [`Replication::try_observe`]).
pub(crate) struct Observation {
    pub applied_seq: u64,
    pub journal_bytes: u64,
    /// 0 when no point is held.
    pub oldest_point_age_ms: u64,
    pub points_by_kind: BTreeMap<String, u64>,
}

/// Age at `now_ms` of the oldest point `inner` holds, by the clock
/// retention ages points with (the MT's when it cut them); 0 when none.
pub(crate) fn oldest_point_age_ms(inner: &Inner, now_ms: u64) -> u64 {
    if inner.points().is_empty() {
        return 0;
    }
    now_ms.saturating_sub(inner.points().retention_ms(0))
}

impl Replication {
    /// The numbers for the gauges, or `None` when the replication's lock
    /// is held (apply, retention or a rollback): a scrape does not wait.
    pub(crate) fn try_observe(&self, now_ms: u64) -> Option<Observation> {
        let inner = self.try_read_inner()?;
        let mut points_by_kind = BTreeMap::new();
        for p in inner.points().as_slice() {
            *points_by_kind.entry(p.kind.clone()).or_insert(0u64) += 1;
        }
        Some(Observation {
            applied_seq: inner.applied_seq(),
            journal_bytes: inner.journal_bytes(),
            oldest_point_age_ms: oldest_point_age_ms(&inner, now_ms),
            points_by_kind,
        })
    }

    /// Age of the oldest recovery point held at `now_ms`, in seconds (0
    /// when none): the status the CS shows and alerts on.
    pub fn oldest_point_age_secs(&self, now_ms: u64) -> u64 {
        oldest_point_age_ms(&self.read_summary(), now_ms) / 1000
    }

    /// Whether the size cap keeps the retention window shorter than the
    /// policy now (see `retention`).
    pub fn retention_capped(&self) -> bool {
        self.observed().retention_capped()
    }
}

/// The MT's storage with every fdatasync timed into
/// `rebound_mt_fsync_seconds`.
pub(crate) struct Timed {
    inner: Arc<dyn Storage>,
    fsync: Histogram,
}

impl Timed {
    pub(crate) fn new(inner: Arc<dyn Storage>, fsync: Histogram) -> Timed {
        Timed { inner, fsync }
    }
}

impl Storage for Timed {
    fn write_all_at(&self, target: Target, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at(target, file, buf, offset)
    }

    fn zero_range(&self, target: Target, file: &File, offset: u64, len: u64) -> io::Result<()> {
        self.inner.zero_range(target, file, offset, len)
    }

    fn sync_data(&self, target: Target, file: &File) -> io::Result<()> {
        let started = Instant::now();
        let r = self.inner.sync_data(target, file);
        self.fsync.observe(started.elapsed().as_secs_f64());
        r
    }
}

/// The MT's `/metrics` and `/healthz` while they run; dropping it stops
/// them.
pub(crate) struct Served {
    store: Arc<OnceLock<Arc<Store>>>,
    _stop: watch::Sender<bool>,
}

impl Served {
    /// The gauges show `store` from now on (before it is open, a scrape
    /// shows the counters and the fsync histogram only).
    pub(crate) fn show(&self, store: Arc<Store>) {
        let _ = self.store.set(store);
    }
}

/// Binds `metrics_listen` (empty: the endpoint is off) and serves
/// `metrics` and `readiness` there until the returned [`Served`] goes.
pub(crate) async fn serve(
    metrics_listen: &str,
    metrics: &MtMetrics,
    readiness: &Readiness,
) -> Result<Served, MetricsError> {
    let listener = rebound_common::metrics::bind(metrics_listen).await?;
    let (stop, stopped) = watch::channel(false);
    let served = Served {
        store: Arc::default(),
        _stop: stop,
    };
    if let Some(listener) = listener {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut endpoint = Endpoint::new(registry, readiness.clone());
        let (metrics, store) = (metrics.clone(), served.store.clone());
        endpoint.on_scrape(move || {
            if let Some(store) = store.get() {
                metrics.refresh(store);
            }
        });
        tokio::spawn(endpoint.serve(listener, stopped));
    }
    Ok(served)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollback_progress_counts_up_and_reads_zero_after() {
        let m = MtMetrics::default();
        let o = m.observer("r1", "m1");
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        {
            let p = o.rollback_started(1 << 20);
            p.restored(4096);
            p.restored(8192);
            assert_eq!(load(&o.rollback_done), 12288);
            assert_eq!(load(&o.rollback_total), 1 << 20);
        }
        assert_eq!((load(&o.rollback_done), load(&o.rollback_total)), (0, 0));
    }
}
