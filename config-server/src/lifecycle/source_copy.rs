//! The machine's disks at the site it failed over from (its "source
//! copy"): what a commit does with them and what a reprotect gains from
//! them.
//!
//! - At the failover's hand-over the CS remembers the disk files the source
//!   agent reported (`Disk.path`) at the old site.
//! - A commit that keeps the source copy records it; the first reprotect
//!   back to that site sends the paths to the new replication's MT
//!   (`PrepareReplication.seed_paths`), which copies them in as the replica
//!   when it adopts nothing, so the first resync only sends what differs.
//! - `commit --remove-source-copy` forgets it and has the old agent delete
//!   the files; when that agent is offline the removal waits, and is sent
//!   when the agent next connects from the old site ([`remove_on_hello`]).

use super::state::Op;
use super::{JobSpec, Lifecycle};
use crate::bus::{Bus, ComponentKey};
use crate::convert;
use crate::error::CsError;
use crate::jobs::JobCtx;
use crate::store::records::{self, PendingRemoval, Record, SiteDisks};
use crate::store::{now_ms, Event, Machine, ReplState, Replication, Store};
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use std::time::Duration;
use tracing::{info, warn};

fn stop_cmd(replication_id: &str, remove: bool) -> Cmd {
    Cmd::StopReplication(pb::StopReplication {
        replication_id: replication_id.to_string(),
        remove_source_copy: remove,
        keep_running: false,
    })
}

impl Lifecycle {
    /// At a failover's hand-over, before the machine's site changes: the
    /// disks it leaves at the old site.
    pub(super) async fn remember_source_disks(
        &self,
        m: &Machine,
        r: &Replication,
    ) -> Result<(), CsError> {
        let disks = SiteDisks {
            site: r.from_site.clone(),
            paths: m.disks.iter().map(|d| d.path.clone()).collect(),
        };
        records::put(self.store.as_ref(), Record::FailedOverFrom, &m.id, &disks).await?;
        Ok(())
    }

    /// `PrepareReplication` at the replication's MT, with the kept source
    /// copy at the MT's site as seed when there is one.
    pub(super) async fn prepare_mt(&self, ctx: &mut JobCtx, machine: &str) -> Result<(), CsError> {
        let r = self.repl(machine).await?;
        let m = self.machine(machine).await?;
        let kept: Option<SiteDisks> =
            records::get(self.store.as_ref(), Record::KeptCopy, machine).await?;
        let seed_paths = match kept {
            Some(k) if k.site == r.to_site && !r.previous.is_empty() => k.paths,
            _ => Vec::new(),
        };
        if !r.previous.is_empty() && seed_paths.iter().all(String::is_empty) {
            let prev = self.store.get_replication(&r.previous).await?;
            if prev.is_some_and(|p| p.mt != r.mt) {
                ctx.warn(format!(
                    "no source copy of {machine} is kept at site {} (the commit removed it, or \
                     its agent reported no disk paths): the first resync copies the whole disk",
                    r.to_site
                ))
                .await?;
            }
        }
        let cmd = Cmd::PrepareReplication(pb::PrepareReplication {
            replication_id: r.id.clone(),
            machine_id: machine.to_string(),
            disks: m.disks.iter().map(convert::disk_to_proto).collect(),
            adopt_from: r.previous.clone(),
            ps_id: r.ps.clone(),
            seed_paths,
        });
        let reply = self.send(ComponentKey::mt(&r.mt), cmd).await?;
        ctx.warn(reply.warning).await
    }

    /// The commit's last step: the old source agent stops streaming and
    /// keeps (recorded for a reprotect) or removes its disks; a removal
    /// whose agent is offline waits for it.
    pub(super) async fn retire_source(
        &self,
        ctx: &mut JobCtx,
        spec: &JobSpec,
        machine: &str,
    ) -> Result<(), CsError> {
        let keep = spec.keep_source_copy().unwrap_or(true);
        let r = self.repl(machine).await?;
        if r.state == ReplState::Committed {
            return Ok(());
        }
        let store = self.store.as_ref();
        if keep {
            let left = records::get::<SiteDisks>(store, Record::FailedOverFrom, machine)
                .await?
                .filter(|d| d.site == r.from_site);
            match left {
                Some(d) => records::put(store, Record::KeptCopy, machine, &d).await?,
                None => records::clear(store, Record::KeptCopy, machine).await?,
            }
        } else {
            records::clear(store, Record::KeptCopy, machine).await?;
        }
        let agent = Self::agent(machine);
        let old_side = self
            .bus
            .connection(&agent)
            .filter(|c| c.site == r.from_site);
        let sent = match old_side {
            Some(_) => match self.send(agent, stop_cmd(&r.id, !keep)).await {
                Ok(_) => true,
                Err(e) => {
                    ctx.warn(format!(
                        "the source agent of {machine} at {}: {e}",
                        r.from_site
                    ))
                    .await?;
                    false
                }
            },
            None => false,
        };
        if !keep && !sent {
            let pending = PendingRemoval {
                replication_id: r.id.clone(),
                site: r.from_site.clone(),
                job_id: ctx.job_id().to_string(),
            };
            records::put(store, Record::PendingRemoval, machine, &pending).await?;
            ctx.warn(format!(
                "the removal of {machine}'s source copy at site {} is pending: its agent there is \
                 not connected; the CS has it remove the old disks when it next connects from {}",
                r.from_site, r.from_site
            ))
            .await?;
        }
        self.transition(machine, Op::Commit).await?;
        Ok(())
    }
}

/// Whether an agent of `machine` connecting from `site` has a source-copy
/// removal waiting (it is then let in to receive it).
pub async fn removal_pending(
    store: &dyn Store,
    machine: &str,
    site: &str,
) -> Result<bool, CsError> {
    let p: Option<PendingRemoval> = records::get(store, Record::PendingRemoval, machine).await?;
    Ok(p.is_some_and(|p| p.site == site))
}

/// Sends a waiting `commit --remove-source-copy` to the machine's agent
/// that just connected from `site`; clears it and records an event when
/// the agent removed the copy.
pub async fn remove_on_hello(
    store: &dyn Store,
    bus: &dyn Bus,
    machine: &str,
    site: &str,
    timeout: Duration,
) -> Result<(), CsError> {
    let Some(p) = records::get::<PendingRemoval>(store, Record::PendingRemoval, machine)
        .await?
        .filter(|p| p.site == site)
    else {
        return Ok(());
    };
    let agent = ComponentKey::agent(machine);
    if let Err(e) = bus
        .send(agent.clone(), stop_cmd(&p.replication_id, true), timeout)
        .await
    {
        warn!(machine, site, error = %e, "pending source-copy removal not done; retried when the agent connects again");
        return Err(e.into());
    }
    records::clear(store, Record::PendingRemoval, machine).await?;
    let message = format!(
        "the source copy of {machine} at site {site} was removed by its agent when it connected \
         again (commit --remove-source-copy, job {})",
        p.job_id
    );
    info!(machine, site, "{message}");
    store
        .add_event(&Event {
            time_ms: now_ms(),
            component: agent.to_string(),
            severity: "info".into(),
            kind: "source-copy-removed".into(),
            message,
            replication: p.replication_id,
        })
        .await?;
    Ok(())
}
