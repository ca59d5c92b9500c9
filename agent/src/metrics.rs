//! The agent's numbers for an operator's Prometheus: every
//! `rebound_agent_*` metric of docs/METRICS.md, served by the daemon's
//! [`Endpoint`] on `metrics_listen`.
//!
//! It exists so an operator sees churn, mode, buffer fill, lag and a
//! resync's progress per machine without the admin socket. Every metric
//! carries the `machine` label (the registry's constant label). The data
//! path pays one atomic add per event: each disk's NBD face holds its
//! [`DiskCounters`], fetched once when the exports are built; the sender
//! counts frame bytes in the [`Link`](crate::sender::Link)'s counter and the ordering point
//! counts tags in [`PointsByKind`]. Gauges (mode, buffer, dirty extents,
//! lag, resync progress, link) copy at scrape time the status the agent
//! builds for the configuration server anyway ([`Runtime::status`]).

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rebound_common::frame::TagKind;
use rebound_common::metrics::{Endpoint, Readiness, Registry};
use rebound_proto::control::AgentStatus;

use crate::capture::Mode;
use crate::control::Runtime;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiskLabel {
    disk: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// Tags cut since the agent started, by kind; every kind is listed from
/// the start (at 0) so a scrape shows the series before the first point.
#[derive(Clone, Debug)]
pub struct PointsByKind(Family<KindLabel, Counter>);

impl Default for PointsByKind {
    fn default() -> Self {
        let family = Family::<KindLabel, Counter>::default();
        for kind in [TagKind::Crash, TagKind::App, TagKind::Shutdown] {
            let _ = family.get_or_create(&KindLabel {
                kind: kind.as_str(),
            });
        }
        PointsByKind(family)
    }
}

impl PointsByKind {
    /// Counts one tag of `kind`.
    pub fn count(&self, kind: TagKind) {
        self.0
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }
}

/// The counters of one disk's NBD face (detached, counting nowhere, by
/// default).
#[derive(Clone, Debug, Default)]
pub struct DiskCounters {
    writes: Counter,
    written_bytes: Counter,
    nbd_errors: Counter,
}

impl DiskCounters {
    /// A write or write-zeroes request of `bytes` captured.
    pub fn captured(&self, bytes: u64) {
        self.writes.inc();
        self.written_bytes.inc_by(bytes);
    }

    /// A request answered with an error.
    pub fn failed(&self) {
        self.nbd_errors.inc();
    }
}

/// The gauges a scrape refreshes from the agent's status.
#[derive(Clone, Default)]
struct Gauges {
    mode: Family<ModeLabel, Gauge>,
    buffer_bytes: Gauge,
    buffer_capacity_bytes: Gauge,
    dirty_extents: Gauge,
    lag_seconds: Gauge<f64, AtomicU64>,
    resync_done_bytes: Gauge,
    resync_total_bytes: Gauge,
    link_up: Gauge,
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Gauges {
    fn set(&self, s: &AgentStatus, link_up: bool) {
        for m in [Mode::Data, Mode::Bitmap, Mode::Resync] {
            let on = i64::from(m.as_str() == s.mode);
            self.mode
                .get_or_create(&ModeLabel { mode: m.as_str() })
                .set(on);
        }
        self.buffer_bytes.set(gauge_value(s.buffer_bytes));
        self.buffer_capacity_bytes.set(gauge_value(s.buffer_limit));
        self.dirty_extents.set(gauge_value(s.dirty_extents));
        self.lag_seconds.set(s.rpo_ms as f64 / 1000.0);
        self.resync_done_bytes.set(gauge_value(s.resync_bytes_sent));
        self.resync_total_bytes
            .set(gauge_value(s.resync_bytes_total));
        self.link_up.set(i64::from(link_up));
    }
}

/// The agent's registry, before it becomes the endpoint.
pub struct AgentMetrics {
    registry: Registry,
    writes: Family<DiskLabel, Counter>,
    written_bytes: Family<DiskLabel, Counter>,
    nbd_errors: Counter,
    gauges: Gauges,
}

impl AgentMetrics {
    /// Registers every `rebound_agent_*` family for machine `machine_id`;
    /// the sent bytes and tag counters are the link's and the capture's.
    pub fn new(machine_id: &str, runtime: &Runtime) -> AgentMetrics {
        let machine = (Cow::Borrowed("machine"), Cow::Owned(machine_id.to_string()));
        let mut registry = Registry::with_prefix_and_labels("rebound_agent", [machine].into_iter());
        let (writes, written_bytes) = (Family::default(), Family::default());
        let (nbd_errors, gauges) = (Counter::default(), Gauges::default());
        let g = &gauges;
        let r = &mut registry;
        r.register(
            "written_bytes",
            "bytes of writes captured (write and write-zeroes requests)",
            written_bytes.clone(),
        );
        r.register("writes", "write requests captured", writes.clone());
        r.register(
            "sent_bytes",
            "bytes of frames sent to the PS",
            runtime.link.sent_counter().clone(),
        );
        r.register(
            "mode",
            "1 for the current mode (data, bitmap, resync), 0 for the others",
            g.mode.clone(),
        );
        r.register(
            "buffer_bytes",
            "change buffer in use",
            g.buffer_bytes.clone(),
        );
        r.register(
            "buffer_capacity_bytes",
            "change buffer size",
            g.buffer_capacity_bytes.clone(),
        );
        r.register(
            "dirty_extents",
            "extents in the dirty log (bitmap mode)",
            g.dirty_extents.clone(),
        );
        r.register(
            "lag_seconds",
            "age of the oldest write the PS does not hold yet",
            g.lag_seconds.clone(),
        );
        r.register(
            "resync_done_bytes",
            "bytes a running resync has sent",
            g.resync_done_bytes.clone(),
        );
        r.register(
            "resync_total_bytes",
            "bytes the running resync covers",
            g.resync_total_bytes.clone(),
        );
        r.register(
            "points",
            "tags cut, by kind (crash, app, shutdown)",
            runtime.capture.points_cut().0.clone(),
        );
        r.register(
            "nbd_errors",
            "NBD requests answered with an error",
            nbd_errors.clone(),
        );
        r.register(
            "link_up",
            "1 while the PS link works, 0 while it fails",
            g.link_up.clone(),
        );
        AgentMetrics {
            registry,
            writes,
            written_bytes,
            nbd_errors,
            gauges,
        }
    }

    /// The counters of disk `name`, shown at 0 from now on.
    pub fn disk(&self, name: &str) -> DiskCounters {
        let label = DiskLabel {
            disk: name.to_string(),
        };
        DiskCounters {
            writes: self.writes.get_or_create(&label).clone(),
            written_bytes: self.written_bytes.get_or_create(&label).clone(),
            nbd_errors: self.nbd_errors.clone(),
        }
    }

    /// The endpoint serving these metrics, its gauges refreshed from
    /// `runtime`'s status at each scrape.
    pub fn endpoint(self, runtime: Arc<Runtime>, readiness: Readiness) -> Endpoint {
        let gauges = self.gauges;
        let mut endpoint = Endpoint::new(self.registry, readiness);
        endpoint.on_scrape(move || gauges.set(&runtime.status(), runtime.link.is_connected()));
        endpoint
    }
}

#[cfg(test)]
mod tests;
