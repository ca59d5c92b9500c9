//! Alerts at the CS (docs/METRICS.md "Alerts"): every second the CS reads
//! its fleet from the store ([`view`]), turns it into readings per subject
//! ([`readings`]), and the state machine ([`evaluate`]) raises and clears
//! alerts with hysteresis. Each change is saved ([`log`], so `rebound
//! alerts` and a restarted CS see it), filed as an event (`rebound
//! status`), logged, and queued for the webhooks ([`webhook`]). The same
//! round leaves the metric snapshot the scrape shows.

pub mod evaluate;
pub mod log;
pub mod readings;
pub mod view;
pub mod webhook;

#[cfg(test)]
mod tests;

use crate::config::AlertsConfig;
use crate::metrics::{CsMetrics, JobTally, Snapshot};
use crate::store::{Event, Store, StoreError};
use evaluate::{Change, Open};
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
    rules: Rules,
    metrics: CsMetrics,
    hooks: webhook::Webhooks,
    log: AlertLog,
    open: Open,
    jobs: JobTally,
}

impl Alerts {
    /// Loads the open alerts the store keeps and starts the webhook queues.
    pub async fn new(
        store: Arc<dyn Store>,
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
        Ok(Alerts {
            open: log.open_map(),
            log,
            rules: Rules {
                rpo_default: cfg.rpo_threshold,
                offline_grace: (heartbeat * 5).max(Duration::from_secs(10)),
                started_ms: rebound_common::time::now_ms(),
            },
            hooks: webhook::Webhooks::start(
                &cfg.webhooks,
                webhook::Retry::new(cfg.webhook_retry_for),
            ),
            store,
            metrics,
            jobs: JobTally::default(),
        })
    }

    /// One round: read, evaluate, record the changes, refresh the snapshot.
    pub async fn round(&mut self) -> Result<Vec<Change>, StoreError> {
        let now = rebound_common::time::now_ms();
        let view = View::load(self.store.as_ref()).await?;
        let changes = evaluate::evaluate(
            &mut self.open,
            &readings::readings(&view, &self.rules, now),
            now,
        );
        if !changes.is_empty() {
            self.log.apply(&self.open, &changes);
            self.log.save(self.store.as_ref()).await?;
            for c in &changes {
                self.record(c).await?;
                self.hooks.send(c);
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
