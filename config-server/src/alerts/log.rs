//! The open alerts and the last cleared ones, kept in the store as one
//! settings value (JSON under the key "alerts") so any engine behind the
//! `Store` trait keeps them without a table of its own, and a CS restart
//! neither forgets an open alert nor raises it twice, nor loses a webhook
//! body it had not delivered.

use super::evaluate::{Alert, Change, Open};
use super::webhook::Delivery;
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};

/// The settings key the log is stored under.
pub const KEY: &str = "alerts";

/// How many cleared alerts the CS keeps.
pub const CLEARED_KEPT: usize = 100;

/// What the store keeps of the alerts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AlertLog {
    pub open: Vec<Alert>,
    /// Newest first, at most [`CLEARED_KEPT`].
    pub cleared: Vec<Alert>,
    /// Webhook bodies not delivered yet, in order: saved with the change
    /// they tell of, so a CS that stops before a receiver took them sends
    /// them at its next start.
    pub outbox: Vec<Delivery>,
}

impl AlertLog {
    /// The log as the store has it (empty when there is none yet).
    pub async fn load(store: &dyn Store) -> Result<AlertLog, StoreError> {
        let Some(bytes) = store.get_setting(KEY).await? else {
            return Ok(AlertLog::default());
        };
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            what: format!("reading the settings value {KEY:?} (open and cleared alerts)"),
            message: e.to_string(),
        })
    }

    pub async fn save(&self, store: &dyn Store) -> Result<(), StoreError> {
        // Serializing plain strings and numbers cannot fail.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        store.put_setting(KEY, &bytes).await
    }

    /// The open alerts keyed for the evaluator.
    pub fn open_map(&self) -> Open {
        self.open
            .iter()
            .map(|a| ((a.kind.clone(), a.subject.clone()), a.clone()))
            .collect()
    }

    /// The log after `changes`, with `open` the evaluator's open alerts now.
    pub fn apply(&mut self, open: &Open, changes: &[Change]) {
        self.open = open.values().cloned().collect();
        for c in changes.iter().filter(|c| !c.raised) {
            self.cleared.insert(0, c.alert.clone());
        }
        self.cleared.truncate(CLEARED_KEPT);
    }

    /// What `rebound alerts` lists: the open ones, newest first, then with
    /// `all` the cleared ones.
    pub fn listed(&self, all: bool) -> Vec<Alert> {
        let mut out = self.open.clone();
        out.sort_by_key(|a| std::cmp::Reverse(a.raised_ms));
        if all {
            out.extend(self.cleared.iter().cloned());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::evaluate::{evaluate, Kind, Pending, Reading};
    use super::*;
    use crate::store::SqliteStore;

    fn reading(subject: &str, value: f64) -> Reading {
        Reading {
            kind: Kind::LinkError,
            subject: subject.into(),
            site: "onprem".into(),
            value: Some(value),
            threshold: 0.0,
            raise_above: 0.5,
            clear_at_or_below: 0.5,
            raise_after_ms: 0,
            problem: "down".into(),
            fine: "up".into(),
            component: subject.into(),
            replication: String::new(),
        }
    }

    #[tokio::test]
    async fn keeps_open_alerts_and_the_last_hundred_cleared_across_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("cs.db")).await.unwrap();
        let mut log = AlertLog::load(&store).await.unwrap();
        assert_eq!(log, AlertLog::default());
        let mut open = log.open_map();
        for t in 0..(CLEARED_KEPT as u64 + 5) {
            let c = evaluate(
                &mut open,
                &mut Pending::new(),
                &[reading("agent:m1", 1.0)],
                2 * t + 1,
            );
            log.apply(&open, &c);
            let c = evaluate(
                &mut open,
                &mut Pending::new(),
                &[reading("agent:m1", 0.0)],
                2 * t + 2,
            );
            log.apply(&open, &c);
        }
        let c = evaluate(
            &mut open,
            &mut Pending::new(),
            &[reading("ps:ps1", 1.0)],
            1000,
        );
        log.apply(&open, &c);
        log.save(&store).await.unwrap();
        let back = AlertLog::load(&store).await.unwrap();
        assert_eq!(back, log);
        assert_eq!(back.open.len(), 1);
        assert_eq!(back.cleared.len(), CLEARED_KEPT);
        assert_eq!(
            back.cleared[0].cleared_ms,
            2 * (CLEARED_KEPT as u64 + 4) + 2
        );
        assert_eq!(back.listed(false).len(), 1);
        assert_eq!(back.listed(true).len(), 1 + CLEARED_KEPT);
        assert_eq!(back.open_map().len(), 1);
        store.put_setting(KEY, b"not json").await.unwrap();
        let e = AlertLog::load(&store).await.unwrap_err().to_string();
        assert!(e.contains("alerts"), "{e}");
        store.close().await;
    }
}
