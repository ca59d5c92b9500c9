//! Why a waiting job makes no progress.
//!
//! A step that waits (for the first recovery point, for the MT to catch up,
//! for an agent) only sees that nothing happens. The components say why in
//! their events: the agent cannot reach its PS, the PS cannot reach its MT
//! (`link-*` kinds, with the fix), an MT poisoned a replication. This module
//! finds the newest such error for the job's machines and puts it on the
//! job's status line, so `rebound jobs` and `rebound jobs ID` show the cause
//! while the job waits, and the timeout's error names it too.
//!
//! Cheap on purpose: waits poll every few hundred milliseconds, so the
//! events are looked at no more often than [`LOOK_EVERY`], and only the
//! newest [`SCAN`] of them.

use crate::error::CsError;
use crate::store::{Event, Job, Store};
use rebound_common::link_error::RESTORED_KIND;
use rebound_common::pki::Role;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How often a waiting step looks for a new cause.
pub const LOOK_EVERY: Duration = Duration::from_secs(1);
/// How many of the newest events are searched.
const SCAN: u32 = 200;

/// Who may explain a machine's stall: its agent, the PS and MT of its
/// current replication, and events naming that replication.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Relevant {
    /// Component keys as events store them (`agent:m1`, `ps:ps1`).
    components: HashSet<String>,
    replications: HashSet<String>,
}

impl Relevant {
    /// The components and replications of `machines`, from the store.
    pub async fn of(store: &dyn Store, machines: &[String]) -> Result<Relevant, CsError> {
        let mut r = Relevant::default();
        for m in machines {
            r.components.insert(key(Role::Agent, m));
            if let Some(rep) = store.current_replication(m).await? {
                r.components.insert(key(Role::Ps, &rep.ps));
                r.components.insert(key(Role::Mt, &rep.mt));
                r.replications.insert(rep.id);
            }
        }
        Ok(r)
    }

    fn covers(&self, e: &Event) -> bool {
        if e.replication.is_empty() {
            self.components.contains(&e.component)
        } else {
            // A PS or MT serves other replications too: only this job's count.
            self.replications.contains(&e.replication)
        }
    }
}

fn key(role: Role, id: &str) -> String {
    format!("{role}:{id}")
}

/// The newest error among `events` (newest first) that explains a stall
/// of `relevant` since `since_ms`, as "agent m1: <message>". A link error
/// is ignored once its component reported the link restored.
pub fn newest_cause(events: &[Event], relevant: &Relevant, since_ms: u64) -> Option<String> {
    let mut restored: HashSet<&str> = HashSet::new();
    for e in events {
        if e.time_ms < since_ms {
            break;
        }
        if !relevant.covers(e) {
            continue;
        }
        if e.kind == RESTORED_KIND {
            restored.insert(&e.component);
            continue;
        }
        if e.severity != "error"
            || (e.kind.starts_with("link-") && restored.contains(&*e.component))
        {
            continue;
        }
        let who = e.component.replacen(':', " ", 1);
        return Some(format!("{who}: {}", e.message));
    }
    None
}

/// The newest cause for `job`'s machines, looked up at most every
/// [`LOOK_EVERY`]; one per waiting step.
#[derive(Debug, Default)]
pub struct StallWatch {
    looked: Option<Instant>,
    cause: Option<String>,
}

impl StallWatch {
    /// Looks again when due; returns the current cause for `machines`
    /// (reported since `since_ms`).
    pub async fn cause(
        &mut self,
        store: &dyn Store,
        machines: &[String],
        since_ms: u64,
    ) -> Result<Option<&str>, CsError> {
        if self.looked.is_none_or(|t| t.elapsed() >= LOOK_EVERY) {
            self.looked = Some(Instant::now());
            let relevant = Relevant::of(store, machines).await?;
            let events = store.recent_events(SCAN).await?;
            self.cause = newest_cause(&events, &relevant, since_ms);
        }
        Ok(self.cause.as_deref())
    }

    /// `what`, with the current cause for `job`'s machines after a dash
    /// when there is one.
    pub async fn line(
        &mut self,
        store: &dyn Store,
        job: &Job,
        what: &str,
    ) -> Result<String, CsError> {
        let since = job.started_ms.max(job.created_ms);
        Ok(match self.cause(store, &job.machines, since).await? {
            Some(c) => format!("{what} — {c}"),
            None => what.to_string(),
        })
    }

    /// A timeout's error, with the last cause seen.
    pub fn explain(&self, error: String) -> String {
        match &self.cause {
            Some(c) => format!("{error} (last cause reported: {c})"),
            None => error,
        }
    }
}

#[cfg(test)]
mod tests;
