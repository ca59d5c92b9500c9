//! The alert state machine on its own: what the CS reads of each subject
//! now goes in, the raises and clears come out. Pure (no store, no clock)
//! so the hysteresis rules are tested without a fleet.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The alert kinds of docs/METRICS.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    RpoExceeded,
    ComponentOffline,
    RetentionShrunk,
    PsCacheFull,
    LinkError,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::RpoExceeded,
        Kind::ComponentOffline,
        Kind::RetentionShrunk,
        Kind::PsCacheFull,
        Kind::LinkError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RpoExceeded => "rpo-exceeded",
            Kind::ComponentOffline => "component-offline",
            Kind::RetentionShrunk => "retention-shrunk",
            Kind::PsCacheFull => "ps-cache-full",
            Kind::LinkError => "link-error",
        }
    }

    /// A component that is gone or cannot reach its peer stops replication
    /// ("error"); the others warn of a risk ("warning").
    pub fn severity(self) -> &'static str {
        match self {
            Kind::ComponentOffline | Kind::LinkError => "error",
            _ => "warning",
        }
    }
}

/// One alert, open (`cleared_ms` 0) or cleared: what `rebound alerts`
/// lists and the webhook body carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// "<kind>/<subject>/<raised_ms>".
    pub id: String,
    pub kind: String,
    pub subject: String,
    pub severity: String,
    pub message: String,
    pub raised_ms: u64,
    pub cleared_ms: u64,
    pub value: f64,
    pub threshold: f64,
    pub site: String,
}

/// What the CS reads of one subject now.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub kind: Kind,
    /// A machine id, or "role:id".
    pub subject: String,
    pub site: String,
    /// The measured value; `None` while it is unknown (its reporter is
    /// offline): an open alert then stays open, none is raised.
    pub value: Option<f64>,
    /// The threshold reported with the alert.
    pub threshold: f64,
    /// Raise when the value is above this ...
    pub raise_above: f64,
    /// ... clear when it is at or below this (hysteresis).
    pub clear_at_or_below: f64,
    /// Raise only once the value has stayed above `raise_above` this long
    /// (ms; 0 raises at once): a peer restarting does not page anyone.
    pub raise_after_ms: u64,
    /// What is wrong, where, and what to do (the raise's message).
    pub problem: String,
    /// That it is fine again (the clear's message).
    pub fine: String,
    /// Where the events of this subject are filed ("agent:m1", "ps:ps1").
    pub component: String,
    /// The replication concerned, empty when none.
    pub replication: String,
}

/// A raise or a clear, with where its event is filed.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub raised: bool,
    pub alert: Alert,
    pub component: String,
    pub replication: String,
}

/// The open alerts by kind and subject.
pub type Open = BTreeMap<(String, String), Alert>;

/// Since when (ms) each subject not yet raised has been above its raise
/// level, by kind and subject.
pub type Pending = BTreeMap<(String, String), u64>;

/// Applies this round's `readings` to `open`: raises the subjects over
/// their threshold (once they have stayed over it for their
/// `raise_after_ms`, counted in `pending`), clears those back under their
/// clear level and those no longer watched (removed, revoked,
/// unprotected).
pub fn evaluate(
    open: &mut Open,
    pending: &mut Pending,
    readings: &[Reading],
    now_ms: u64,
) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for r in readings {
        let key = (r.kind.as_str().to_string(), r.subject.clone());
        seen.insert(key.clone());
        let Some(value) = r.value else {
            // Unknown: the condition is not seen to hold.
            pending.remove(&key);
            continue;
        };
        if open.contains_key(&key) || value <= r.raise_above {
            pending.remove(&key);
        } else {
            let since = *pending.entry(key.clone()).or_insert(now_ms);
            if now_ms.saturating_sub(since) < r.raise_after_ms {
                continue;
            }
            pending.remove(&key);
        }
        match open.get(&key) {
            Some(_) if value <= r.clear_at_or_below => {
                if let Some(mut a) = open.remove(&key) {
                    a.cleared_ms = now_ms;
                    a.value = value;
                    a.message = r.fine.clone();
                    changes.push(change(false, a, &r.component, &r.replication));
                }
            }
            None if value > r.raise_above => {
                let a = Alert {
                    id: format!("{}/{}/{now_ms}", key.0, r.subject),
                    kind: key.0.clone(),
                    subject: r.subject.clone(),
                    severity: r.kind.severity().to_string(),
                    message: r.problem.clone(),
                    raised_ms: now_ms,
                    cleared_ms: 0,
                    value,
                    threshold: r.threshold,
                    site: r.site.clone(),
                };
                open.insert(key, a.clone());
                changes.push(change(true, a, &r.component, &r.replication));
            }
            _ => {}
        }
    }
    pending.retain(|k, _| seen.contains(k));
    let gone: Vec<_> = open
        .keys()
        .filter(|k| !seen.contains(*k))
        .cloned()
        .collect();
    for key in gone {
        if let Some(mut a) = open.remove(&key) {
            a.cleared_ms = now_ms;
            a.message = format!(
                "{} of {} cleared: {} is no longer watched (removed, revoked or unprotected)",
                a.kind, a.subject, a.subject
            );
            let component = if a.subject.contains(':') {
                a.subject.clone()
            } else {
                format!("machine:{}", a.subject)
            };
            changes.push(change(false, a, &component, ""));
        }
    }
    changes
}

fn change(raised: bool, alert: Alert, component: &str, replication: &str) -> Change {
    Change {
        raised,
        alert,
        component: component.to_string(),
        replication: replication.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpo(value: Option<f64>) -> Reading {
        Reading {
            kind: Kind::RpoExceeded,
            subject: "m1".into(),
            site: "onprem".into(),
            value,
            threshold: 10.0,
            raise_above: 10.0,
            clear_at_or_below: 8.0,
            raise_after_ms: 0,
            problem: "m1 is behind".into(),
            fine: "m1 caught up".into(),
            component: "agent:m1".into(),
            replication: "r1".into(),
        }
    }

    fn states(changes: &[Change]) -> Vec<(bool, f64)> {
        changes.iter().map(|c| (c.raised, c.alert.value)).collect()
    }

    #[test]
    fn raises_above_the_threshold_and_clears_only_at_the_clear_level() {
        let mut open = Open::new();
        assert!(evaluate(&mut open, &mut Pending::new(), &[rpo(Some(10.0))], 1).is_empty());
        let c = evaluate(&mut open, &mut Pending::new(), &[rpo(Some(12.0))], 2);
        assert_eq!(states(&c), vec![(true, 12.0)]);
        let a = &c[0].alert;
        assert_eq!(a.id, "rpo-exceeded/m1/2");
        assert_eq!(
            (a.severity.as_str(), a.message.as_str()),
            ("warning", "m1 is behind")
        );
        assert_eq!((a.threshold, a.site.as_str()), (10.0, "onprem"));
        assert_eq!(
            (c[0].component.as_str(), c[0].replication.as_str()),
            ("agent:m1", "r1")
        );
        // A lasting breach is one raise; between the levels nothing moves.
        assert!(evaluate(&mut open, &mut Pending::new(), &[rpo(Some(30.0))], 3).is_empty());
        assert!(evaluate(&mut open, &mut Pending::new(), &[rpo(Some(9.0))], 4).is_empty());
        // Unknown keeps it open.
        assert!(evaluate(&mut open, &mut Pending::new(), &[rpo(None)], 5).is_empty());
        assert_eq!(open.len(), 1);
        let c = evaluate(&mut open, &mut Pending::new(), &[rpo(Some(8.0))], 6);
        assert_eq!(states(&c), vec![(false, 8.0)]);
        assert_eq!(c[0].alert.cleared_ms, 6);
        assert_eq!(c[0].alert.raised_ms, 2);
        assert_eq!(c[0].alert.message, "m1 caught up");
        assert!(open.is_empty());
        // Under the raise level again: nothing.
        assert!(evaluate(&mut open, &mut Pending::new(), &[rpo(Some(9.5))], 7).is_empty());
        // Unknown never raises.
        assert!(evaluate(&mut open, &mut Pending::new(), &[rpo(None)], 8).is_empty());
    }

    #[test]
    fn a_held_condition_raises_only_after_its_hold_time() {
        let mut open = Open::new();
        let mut pending = Pending::new();
        let mut link = rpo(Some(1.0));
        link.kind = Kind::LinkError;
        link.raise_above = 0.5;
        link.clear_at_or_below = 0.5;
        link.raise_after_ms = 10_000;
        let at = |v: f64| Reading {
            value: Some(v),
            ..link.clone()
        };
        // A flap shorter than the hold time raises nothing.
        assert!(evaluate(&mut open, &mut pending, &[at(1.0)], 1_000).is_empty());
        assert!(evaluate(&mut open, &mut pending, &[at(1.0)], 10_999).is_empty());
        assert!(evaluate(&mut open, &mut pending, &[at(0.0)], 11_000).is_empty());
        assert!(pending.is_empty());
        // Unknown restarts the count too.
        assert!(evaluate(&mut open, &mut pending, &[at(1.0)], 12_000).is_empty());
        let unknown = Reading {
            value: None,
            ..link.clone()
        };
        assert!(evaluate(&mut open, &mut pending, &[unknown], 13_000).is_empty());
        assert!(evaluate(&mut open, &mut pending, &[at(1.0)], 14_000).is_empty());
        assert!(evaluate(&mut open, &mut pending, &[at(1.0)], 23_999).is_empty());
        // Held for the whole time: raised, at the moment it is raised.
        let c = evaluate(&mut open, &mut pending, &[at(1.0)], 24_000);
        assert_eq!(states(&c), vec![(true, 1.0)]);
        assert_eq!(c[0].alert.raised_ms, 24_000);
        assert!(pending.is_empty());
        // It clears at once, like any other.
        let c = evaluate(&mut open, &mut pending, &[at(0.0)], 25_000);
        assert_eq!(states(&c), vec![(false, 0.0)]);
        // A subject no longer watched forgets its count.
        assert!(evaluate(&mut open, &mut pending, &[at(1.0)], 26_000).is_empty());
        assert!(evaluate(&mut open, &mut pending, &[], 27_000).is_empty());
        assert!(pending.is_empty());
    }

    #[test]
    fn a_subject_no_longer_watched_is_cleared() {
        let mut open = Open::new();
        let mut r = rpo(Some(1.0));
        r.kind = Kind::ComponentOffline;
        r.subject = "ps:ps1".into();
        r.raise_above = 0.5;
        r.clear_at_or_below = 0.5;
        assert_eq!(
            states(&evaluate(
                &mut open,
                &mut Pending::new(),
                &[r, rpo(Some(20.0))],
                1
            ))
            .len(),
            2
        );
        assert_eq!(
            open.values().next().map(|a| a.severity.as_str()),
            Some("error")
        );
        let c = evaluate(&mut open, &mut Pending::new(), &[], 2);
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| !c.raised && c.alert.cleared_ms == 2));
        let comps: Vec<_> = c.iter().map(|c| c.component.as_str()).collect();
        assert!(
            comps.contains(&"ps:ps1") && comps.contains(&"machine:m1"),
            "{comps:?}"
        );
        assert!(
            c[0].alert.message.contains("no longer watched"),
            "{:?}",
            c[0].alert
        );
    }
}
