//! Which process server carries a new replication when the operator names
//! none (`rebound protect` or `reprotect` without `--ps`): a site may run
//! several PSs (scale-out), and the CS spreads machines over them.
//!
//! The choice is the online PS of the machine's site carrying the fewest
//! current replications, ties broken by the smaller id so the choice is
//! repeatable. Online means its control stream is up now (the bus), not
//! what the store last recorded: a PS that is down cannot take the
//! replication. The chosen PS is written into the job's request, so the job
//! (and a resumed job) names it, and the CS logs it.

use super::Lifecycle;
use crate::bus::ComponentKey;
use crate::error::CsError;
use crate::store::{Component, Replication};
use rebound_common::pki::Role;
use std::collections::BTreeMap;
use tracing::info;

/// The least-loaded of `online` PS ids: the fewest replications in `current`
/// naming it, ties by the smaller id. `None` when `online` is empty.
pub(crate) fn least_loaded(online: &[String], current: &[Replication]) -> Option<String> {
    let mut load: BTreeMap<&str, usize> = online.iter().map(|id| (id.as_str(), 0)).collect();
    for r in current {
        if let Some(n) = load.get_mut(r.ps.as_str()) {
            *n += 1;
        }
    }
    // BTreeMap iterates by id, and min_by_key keeps the first of equal loads.
    load.into_iter()
        .min_by_key(|(_, n)| *n)
        .map(|(id, _)| id.to_string())
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
    /// checks judge it).
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
        let Some(ps) = least_loaded(&online, &current) else {
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
        let load = current.iter().filter(|r| r.ps == ps).count();
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
