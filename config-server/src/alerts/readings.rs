//! The rules of docs/METRICS.md "Alerts" as readings: for every subject
//! the CS watches, its value now, the levels that raise and clear its
//! alert, and the messages that say what is wrong, where and what to do.

use super::evaluate::{Kind, Reading};
use super::view::View;
use crate::store::{Health, ReplState, RPO_ALERT_OFF};
use rebound_common::pki::Role;
use std::time::Duration;

/// A machine's RPO alert clears at or below this share of its threshold.
pub const RPO_CLEAR: f64 = 0.8;
/// A PS's cache alert is raised above this share of the cap ...
pub const CACHE_RAISE: f64 = 0.8;
/// ... and cleared at or below this one.
pub const CACHE_CLEAR: f64 = 0.7;

/// What the rules need besides the fleet.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// `[alerts] rpo_threshold`: the threshold of machines whose policy sets
    /// none.
    pub rpo_default: Duration,
    /// How long a component stays offline (counted from its last heartbeat,
    /// or from the CS's start) before it raises an alert: components
    /// reconnecting after a CS restart do not page anyone. A link error or
    /// a shrunk retention must also last this long before it is raised.
    pub offline_grace: Duration,
    /// When this CS process started (ms).
    pub started_ms: u64,
}

impl Rules {
    /// The RPO threshold of a machine whose policy says `rpo_alert_ms`.
    pub fn rpo_threshold_ms(&self, rpo_alert_ms: u64) -> u64 {
        if rpo_alert_ms == 0 {
            self.rpo_default.as_millis() as u64
        } else {
            rpo_alert_ms
        }
    }
}

/// Every reading of `view` now.
pub fn readings(view: &View, rules: &Rules, now_ms: u64) -> Vec<Reading> {
    let mut out = Vec::new();
    rpo(view, rules, &mut out);
    components(view, rules, now_ms, &mut out);
    retention(view, rules, &mut out);
    caches(view, &mut out);
    links(view, rules, &mut out);
    out
}

fn flag(kind: Kind, subject: String, site: String, on: Option<bool>) -> Reading {
    Reading {
        kind,
        component: subject.clone(),
        subject,
        site,
        value: on.map(|b| if b { 1.0 } else { 0.0 }),
        threshold: 0.0,
        raise_above: 0.5,
        clear_at_or_below: 0.5,
        raise_after_ms: 0,
        problem: String::new(),
        fine: String::new(),
        replication: String::new(),
    }
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn rpo(view: &View, rules: &Rules, out: &mut Vec<Reading>) {
    for m in &view.machines {
        let Some(r) = view.current.get(&m.id) else {
            continue;
        };
        if r.state != ReplState::Protected || m.policy.rpo_alert_ms == RPO_ALERT_OFF {
            continue;
        }
        let threshold = secs(rules.rpo_threshold_ms(m.policy.rpo_alert_ms));
        let value = view.rpo_ms(&m.id).map(secs);
        let now = value.unwrap_or(0.0);
        out.push(Reading {
            kind: Kind::RpoExceeded,
            subject: m.id.clone(),
            site: m.site.clone(),
            value,
            threshold,
            raise_above: threshold,
            clear_at_or_below: threshold * RPO_CLEAR,
            raise_after_ms: 0,
            problem: format!(
                "the RPO of {} at {} is {now:.1} s, over its threshold of {threshold:.1} s: writes \
                 are not reaching its replica at {} in time. Check the agent's link to {} and the \
                 PS's link to {} (`rebound status`, `rebound components`), or raise the threshold \
                 (`rebound policy set {} --rpo-alert D`)",
                m.id, m.site, r.to_site, r.ps, r.mt, m.id
            ),
            fine: format!(
                "the RPO of {} is {now:.1} s again, within {:.1} s (80 % of its threshold)",
                m.id,
                threshold * RPO_CLEAR
            ),
            component: format!("agent:{}", m.id),
            replication: r.id.clone(),
        });
    }
}

fn components(view: &View, rules: &Rules, now_ms: u64, out: &mut Vec<Reading>) {
    for c in &view.components {
        let subject = format!("{}:{}", c.role.as_str(), c.id);
        let since = c.last_heartbeat_ms.max(rules.started_ms);
        let value = match c.health {
            // Never connected: nothing to miss yet.
            Health::Enrolled => None,
            Health::Online => Some(0.0),
            Health::Offline => Some(secs(now_ms.saturating_sub(since))),
        };
        let grace = rules.offline_grace.as_secs_f64();
        out.push(Reading {
            kind: Kind::ComponentOffline,
            component: subject.clone(),
            site: c.site.clone(),
            value,
            threshold: grace,
            raise_above: grace,
            clear_at_or_below: 0.0,
            // The grace is in the value: seconds offline.
            raise_after_ms: 0,
            problem: format!(
                "{subject} at {} is offline: no heartbeat for {:.0} s. Check that its host is up, \
                 `systemctl status rebound-{}` there, and that it reaches the CS; `rebound remove \
                 {subject}` if it was decommissioned",
                c.site,
                secs(now_ms.saturating_sub(c.last_heartbeat_ms)),
                c.role.as_str()
            ),
            fine: format!("{subject} at {} is online again", c.site),
            subject,
            replication: String::new(),
        });
    }
}

fn retention(view: &View, rules: &Rules, out: &mut Vec<Reading>) {
    for m in &view.machines {
        let Some(r) = view.current.get(&m.id) else {
            continue;
        };
        if r.state == ReplState::Unprotected {
            continue;
        }
        let status = view
            .mt(&r.mt)
            .and_then(|s| s.replications.iter().find(|x| x.replication_id == r.id));
        let mut reading = flag(
            Kind::RetentionShrunk,
            m.id.clone(),
            view.site_of(Role::Mt, &r.mt),
            status.map(|s| s.retention_capped),
        );
        let (window, cap) =
            status.map_or((0, 0), |s| (s.retention_window_secs, s.retention_max_bytes));
        reading.problem = format!(
            "the retention of {} at {} is shorter than its {window} s window: the size cap of \
             {cap} bytes drops points younger than the window. Raise the cap (`rebound policy set \
             {} --retention-size N`) or shorten the window",
            m.id, r.mt, m.id
        );
        reading.fine = format!(
            "the retention of {} at {} covers its window again",
            m.id, r.mt
        );
        // An MT restarting or trimming for a moment does not page anyone.
        reading.raise_after_ms = rules.offline_grace.as_millis() as u64;
        reading.component = format!("mt:{}", r.mt);
        reading.replication = r.id.clone();
        out.push(reading);
    }
}

fn caches(view: &View, out: &mut Vec<Reading>) {
    for c in view.components.iter().filter(|c| c.role == Role::Ps) {
        let subject = format!("ps:{}", c.id);
        let use_ = view
            .ps(&c.id)
            .filter(|p| p.cache_limit > 0)
            .map(|p| (p.cache_bytes, p.cache_limit));
        let (bytes, limit) = use_.unwrap_or((0, 0));
        let share = use_.map(|(b, l)| b as f64 / l as f64);
        let pct = share.unwrap_or(0.0) * 100.0;
        out.push(Reading {
            kind: Kind::PsCacheFull,
            component: subject.clone(),
            site: c.site.clone(),
            value: share,
            threshold: CACHE_RAISE,
            raise_above: CACHE_RAISE,
            clear_at_or_below: CACHE_CLEAR,
            raise_after_ms: 0,
            problem: format!(
                "the cache of {subject} at {} is {pct:.0} % full ({bytes} of {limit} bytes): \
                 its MT does not keep up or is unreachable; when it is full agents fall back to \
                 bitmap mode. Check the PS's link to its MT (`rebound status`) or raise its cache \
                 cap",
                c.site
            ),
            fine: format!(
                "the cache of {subject} is {pct:.0} % full again, at or below {:.0} %",
                CACHE_CLEAR * 100.0
            ),
            subject,
            replication: String::new(),
        });
    }
}

fn links(view: &View, rules: &Rules, out: &mut Vec<Reading>) {
    for c in &view.components {
        let (error, peer) = match c.role {
            Role::Agent => (view.agent(&c.id).map(|a| a.link_error.clone()), "its PS"),
            Role::Ps => (view.ps(&c.id).map(|p| p.link_error.clone()), "its MT"),
            _ => continue,
        };
        let subject = format!("{}:{}", c.role.as_str(), c.id);
        let mut reading = flag(
            Kind::LinkError,
            subject.clone(),
            c.site.clone(),
            error.as_ref().map(|e| !e.is_empty()),
        );
        reading.problem = format!(
            "{subject} at {} cannot reach {peer}: {}. Check the network and that the peer runs \
             (`rebound components`)",
            c.site,
            error.unwrap_or_default()
        );
        reading.fine = format!("{subject} reaches {peer} again");
        // A peer restarting or upgrading does not page anyone.
        reading.raise_after_ms = rules.offline_grace.as_millis() as u64;
        out.push(reading);
    }
}
