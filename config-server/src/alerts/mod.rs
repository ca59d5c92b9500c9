//! Alerts at the CS (docs/METRICS.md "Alerts"): every second the CS reads
//! its fleet from the store ([`view`]), turns it into readings per subject
//! ([`readings`]), and the state machine ([`evaluate`]) raises and clears
//! alerts with hysteresis. Each change is saved with its webhook bodies
//! ([`log`], so `rebound alerts` and a restarted CS see it and a restarted
//! CS still posts them), queued for the webhooks ([`webhook`]), filed as an
//! event (`rebound status`) and logged. The same round leaves the metric
//! snapshot the scrape shows.

pub mod evaluate;
pub mod log;
pub mod readings;
pub mod view;
pub mod webhook;

#[cfg(test)]
mod tests;

use crate::bus::Bus;
use crate::config::AlertsConfig;
use crate::metrics::{CsMetrics, JobTally, Snapshot};
use crate::store::{Event, Store, StoreError};
use evaluate::{Change, Open, Pending};
use log::AlertLog;
use readings::Rules;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};
use view::View;

/// How often the CS evaluates.
pub const EVERY: Duration = Duration::from_secs(1);

/// Event kind of a clear; a raise is filed under the alert's own kind.
pub const CLEARED_EVENT: &str = "alert-cleared";

/// The evaluator with what it keeps between rounds.
pub struct Alerts {
    store: Arc<dyn Store>,
    /// The live control streams: what is online.
    bus: Arc<dyn Bus>,
    rules: Rules,
    metrics: CsMetrics,
    hooks: webhook::Webhooks,
    log: AlertLog,
    /// Finished deliveries are out of `log`'s outbox, not yet saved.
    unsaved: bool,
    open: Open,
    pending: Pending,
    jobs: JobTally,
}

impl Alerts {
    /// Loads the open alerts the store keeps and starts the webhook queues
    /// with the bodies not delivered before.
    pub async fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        cfg: &AlertsConfig,
        heartbeat: Duration,
        metrics: CsMetrics,
    ) -> Result<Alerts, StoreError> {
        let log = match AlertLog::load(store.as_ref()).await {
            // An unreadable log is not worth a CS that does not start: the
            // open alerts are raised again from what components report.
            Err(e @ StoreError::Corrupt { .. }) => {
                warn!("{e}; starting with no open alerts (they are raised again if still true)");
                AlertLog::default()
            }
            other => other?,
        };
        let mut hooks =
            webhook::Webhooks::start(&cfg.webhooks, webhook::Retry::new(cfg.webhook_retry_for));
        hooks.resume(&log.outbox);
        Ok(Alerts {
            open: log.open_map(),
            pending: Pending::new(),
            log,
            unsaved: false,
            rules: Rules {
                rpo_default: cfg.rpo_threshold,
                offline_grace: (heartbeat * 5).max(Duration::from_secs(10)),
                started_ms: rebound_common::time::now_ms(),
            },
            hooks,
            store,
            bus,
            metrics,
            jobs: JobTally::default(),
        })
    }

    /// One round: read, evaluate, save the changes with their webhook
    /// bodies, queue those, record the events, refresh the snapshot. The
    /// evaluation is kept only once the changes are saved: a failed save
    /// finds them again next round.
    pub async fn round(&mut self) -> Result<Vec<Change>, StoreError> {
        let now = rebound_common::time::now_ms();
        let finished = self.hooks.finished();
        if !finished.is_empty() {
            self.log.outbox.retain(|d| !finished.contains(&d.id));
            self.unsaved = true;
        }
        let view = View::load(self.store.as_ref(), self.bus.as_ref()).await?;
        let (mut open, mut pending) = (self.open.clone(), self.pending.clone());
        let changes = evaluate::evaluate(
            &mut open,
            &mut pending,
            &readings::readings(&view, &self.rules, now),
            now,
        );
        let mut log = self.log.clone();
        let mut bodies = Vec::new();
        for c in &changes {
            bodies.extend(self.hooks.deliveries(c, now));
        }
        if !changes.is_empty() {
            log.apply(&open, &changes);
            log.outbox.extend(bodies.iter().cloned());
        }
        if !changes.is_empty() || self.unsaved {
            log.save(self.store.as_ref()).await?;
            self.unsaved = false;
        }
        (self.open, self.pending, self.log) = (open, pending, log);
        for d in bodies {
            self.hooks.queue(d);
        }
        for c in &changes {
            if let Err(e) = self.record(c).await {
                warn!(alert = %c.alert.id, "cannot file the event of this alert change: {e}");
            }
        }
        let metrics = self.metrics.clone();
        self.jobs
            .refresh(self.store.as_ref(), |kind, secs| {
                metrics.observe_job(kind, secs)
            })
            .await?;
        self.metrics
            .set_snapshot(Snapshot::of(&view, &self.rules, &self.jobs, &self.open));
        Ok(changes)
    }

    /// The alert log as this evaluator keeps it.
    pub fn log(&self) -> &AlertLog {
        &self.log
    }

    async fn record(&self, c: &Change) -> Result<(), StoreError> {
        let a = &c.alert;
        let (severity, kind, time_ms) = if c.raised {
            warn!(alert = %a.id, kind = %a.kind, subject = %a.subject, "alert raised: {}", a.message);
            (a.severity.clone(), a.kind.clone(), a.raised_ms)
        } else {
            info!(alert = %a.id, kind = %a.kind, subject = %a.subject, "alert cleared: {}", a.message);
            ("info".to_string(), CLEARED_EVENT.to_string(), a.cleared_ms)
        };
        let message = if c.raised {
            a.message.clone()
        } else {
            format!("{} cleared: {}", a.kind, a.message)
        };
        self.store
            .add_event(&Event {
                time_ms,
                component: c.component.clone(),
                severity,
                kind,
                message,
                replication: c.replication.clone(),
            })
            .await
    }
}

/// Evaluates every [`EVERY`] until `stop` turns true.
pub async fn run(mut alerts: Alerts, stop: watch::Receiver<bool>) {
    let mut ticker = crate::tick::Ticker::new(EVERY, stop);
    while ticker.tick().await {
        if let Err(e) = alerts.round().await {
            warn!("alert evaluation failed: {e}; retrying in {EVERY:?}");
        }
    }
}
