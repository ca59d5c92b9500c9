//! The RPO alert: an agent's status reports its RPO; when it passes the
//! machine's `rpo_alert_ms` the CS raises one `rpo-exceeded` warning, and
//! one info event when it is back under, so a lasting breach is one event,
//! not one per status.

use crate::error::CsError;
use crate::store::{now_ms, Event, Store};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether one agent's RPO is over its threshold now (per control stream).
#[derive(Debug, Default)]
pub struct RpoAlert {
    over: AtomicBool,
}

impl RpoAlert {
    /// The event a status with `rpo_ms` raises for `machine` whose
    /// threshold is `alert_ms` (0 = no alert), if it crosses it.
    pub fn crossing(&self, machine: &str, rpo_ms: u64, alert_ms: u64) -> Option<Event> {
        if alert_ms == 0 {
            self.over.store(false, Ordering::Relaxed);
            return None;
        }
        let over = rpo_ms > alert_ms;
        if self.over.swap(over, Ordering::Relaxed) == over {
            return None;
        }
        let (severity, kind, message) = if over {
            (
                "warning",
                "rpo-exceeded",
                format!(
                    "the RPO of {machine} is {rpo_ms} ms, over its alert threshold of {alert_ms} \
                     ms: check the link to its PS and the PS's link to its MT (`rebound status`), \
                     or raise the threshold (`rebound policy set {machine} --rpo-alert D`)"
                ),
            )
        } else {
            (
                "info",
                "rpo-recovered",
                format!("the RPO of {machine} is {rpo_ms} ms, back under {alert_ms} ms"),
            )
        };
        Some(Event {
            time_ms: now_ms(),
            component: format!("agent:{machine}"),
            severity: severity.into(),
            kind: kind.into(),
            message,
            replication: String::new(),
        })
    }

    /// Checks an agent's reported RPO against its machine's policy and
    /// records the event of a crossing.
    pub async fn check(
        &self,
        store: &dyn Store,
        machine: &str,
        rpo_ms: u64,
    ) -> Result<(), CsError> {
        let Some(m) = store.get_machine(machine).await? else {
            return Ok(());
        };
        if let Some(mut e) = self.crossing(machine, rpo_ms, m.policy.rpo_alert_ms) {
            if let Some(r) = store.current_replication(machine).await? {
                e.replication = r.id;
            }
            store.add_event(&e).await?;
        }
        Ok(())
    }
}
