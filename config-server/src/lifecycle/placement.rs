//! Which process server carries a new replication when the operator names
//! none (`rebound protect` or `reprotect` without `--ps`): a site may run
//! several PSs (scale-out), and the CS spreads machines over them.
//!
//! The choice is the online PS of the machine's site carrying the fewest
//! replications, ties broken by the smaller id so the choice is repeatable.
//! A PS's load is the replications whose source streams through it now
//! (ended, failed-over and committed ones do not count) plus the machines
//! of pending or running protect and reprotect jobs that name it and have no
//! streaming replication yet: a job reserves its PS before the replication
//! exists. The caller holds the lifecycle's submit lock from the choice until
//! the job naming the PS is stored, so requests started together see each
//! other's choices and spread. Online means its control stream is up now
//! (the bus), not what the store last recorded: a PS that is down cannot
//! take the replication. The chosen PS is written into the job's request, so
//! the job (and a resumed job) names it, and the CS logs it.

use super::{JobSpec, Lifecycle};
use crate::bus::ComponentKey;
use crate::error::CsError;
use crate::store::{Component, Job, JobFilter, ReplState, Replication};
use rebound_common::pki::Role;
use std::collections::{BTreeMap, HashSet};
use tracing::{info, warn};

/// A PS a pending or running job names for one of its machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reserved {
    pub machine: String,
    pub ps: String,
}

/// Whether `r`'s source streams through its PS: the initial sync, the
/// protected state, and the drain of a failover. An unprotected, failed-over,
/// committed or waiting-for-agent replication sends nothing through it.
pub(crate) fn carried(r: &Replication) -> bool {
    matches!(
        r.state,
        ReplState::InitialSync | ReplState::Protected | ReplState::FailingOver
    )
}

/// The PSs that the protect and reprotect jobs in `active` name, one per
/// machine. A job whose request cannot be read reserves nothing (and is
/// logged): placement must not fail because of an old job.
pub(crate) fn reserved(active: &[Job]) -> Vec<Reserved> {
    let mut out = Vec::new();
    for j in active {
        let spec: JobSpec = match serde_json::from_str(&j.spec) {
            Ok(s) => s,
            Err(e) => {
                warn!(job = %j.id, error = %e, "placement: cannot read the job's request");
                continue;
            }
        };
        let (machines, ps) = match spec {
            JobSpec::Protect { machine, ps, .. } => (vec![machine], ps),
            JobSpec::Reprotect { machines, ps, .. } => (machines, ps),
            _ => continue,
        };
        out.extend(machines.into_iter().map(|machine| Reserved {
            machine,
            ps: ps.clone(),
        }));
    }
    out
}

/// The load of each `online` PS: the replications in `current` it carries,
/// plus the `reserved` machines that have no carried replication yet.
fn loads<'a>(
    online: &'a [String],
    current: &'a [Replication],
    reserved: &'a [Reserved],
) -> BTreeMap<&'a str, usize> {
    let mut load: BTreeMap<&str, usize> = online.iter().map(|id| (id.as_str(), 0)).collect();
    let carried: Vec<&Replication> = current.iter().filter(|r| carried(r)).collect();
    // A machine whose job already created its replication counts once.
    let streaming: HashSet<&str> = carried.iter().map(|r| r.machine.as_str()).collect();
    let pending = (reserved.iter()).filter(|r| !streaming.contains(r.machine.as_str()));
    let named = carried.iter().map(|r| r.ps.as_str());
    for ps in named.chain(pending.map(|r| r.ps.as_str())) {
        if let Some(n) = load.get_mut(ps) {
            *n += 1;
        }
    }
    load
}

/// The least-loaded of `online` PS ids (see [`loads`]), ties by the smaller
/// id, with its load. `None` when `online` is empty.
pub(crate) fn least_loaded(
    online: &[String],
    current: &[Replication],
    reserved: &[Reserved],
) -> Option<(String, usize)> {
    // BTreeMap iterates by id, and min_by_key keeps the first of equal loads.
    loads(online, current, reserved)
        .into_iter()
        .min_by_key(|(_, n)| *n)
        .map(|(id, n)| (id.to_string(), n))
}

impl Lifecycle {
    /// The components of `role` at `site` that are not revoked.
    pub(crate) async fn at_site(&self, role: Role, site: &str) -> Result<Vec<Component>, CsError> {
        Ok((self.store.list_components().await?.into_iter())
            .filter(|c| c.role == role && c.site == site && !c.revoked)
            .collect())
    }

    /// The PS for `machine` when `wanted` is empty: the least-loaded online
    /// PS of the site it runs at. `wanted` itself when given (the request's
    /// checks judge it). The caller holds the submit lock until the job
    /// naming the PS is stored.
    pub(crate) async fn ps_for(&self, machine: &str, wanted: &str) -> Result<String, CsError> {
        if !wanted.is_empty() {
            return Ok(wanted.to_string());
        }
        let site = self.machine(machine).await?.site;
        let (online, down): (Vec<Component>, Vec<Component>) = (self.at_site(Role::Ps, &site))
            .await?
            .into_iter()
            .partition(|c| self.bus.connection(&ComponentKey::ps(&c.id)).is_some());
        let online: Vec<String> = online.into_iter().map(|c| c.id).collect();
        let current = self.store.current_replications().await?;
        let active = self.store.list_job_heads(&JobFilter::all_active()).await?;
        let Some((ps, load)) = least_loaded(&online, &current, &reserved(&active)) else {
            let known = if down.is_empty() {
                "none is registered".to_string()
            } else {
                let ids: Vec<&str> = down.iter().map(|c| c.id.as_str()).collect();
                format!("{} not connected", ids.join(", "))
            };
            return Err(CsError::FailedPrecondition(format!(
                "no process server at site {site} (where {machine} runs) is online ({known}): \
                 start rebound-ps there (`rebound status` lists the components), or name one \
                 with --ps"
            )));
        };
        info!(
            machine,
            site = %site,
            ps = %ps,
            replications = load,
            "no PS named: chose the least-loaded online PS of the site"
        );
        Ok(ps)
    }
}
