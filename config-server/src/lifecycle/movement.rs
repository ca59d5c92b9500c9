//! `rebound move MACHINE --ps PS2`: the machine's replication continues
//! through another PS of the same site, without a resync and without
//! losing a point. The MT first accepts PS2 as well, PS2 learns the
//! replication, the agent switches its stream (`moving`: records the old
//! PS acknowledged are still forwarded by it, so the agent waits for them
//! rather than resending), and once PS2 carries the stream and the MT has
//! applied everything the old PS held, the old PS drops its cache and the
//! CS records PS2 as the replication's PS.

use super::{Lifecycle, Step};
use crate::bus::ComponentKey;
use crate::error::CsError;
use crate::jobs::JobCtx;
use crate::store::{now_ms, ReplState, Store};
use prost::Message;
use rebound_common::pki::Role;
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use std::time::Duration;

/// The steps after the check. `RemoveFromPs` runs while the replication
/// still names the old PS, so it is the old one that forgets it.
pub(super) fn steps(machine: &str, ps: &str) -> Vec<Step> {
    let (m, p) = (|| machine.to_string(), || ps.to_string());
    vec![
        Step::SetReplicationPs {
            machine: m(),
            ps: p(),
            done: false,
        },
        Step::AddToNewPs {
            machine: m(),
            ps: p(),
        },
        Step::SwitchAgent {
            machine: m(),
            ps: p(),
        },
        Step::WaitMoved {
            machine: m(),
            ps: p(),
        },
        Step::RemoveFromPs { machine: m() },
        Step::RecordPs {
            machine: m(),
            ps: p(),
        },
        Step::SetReplicationPs {
            machine: m(),
            ps: p(),
            done: true,
        },
    ]
}

/// A PS's last status report: when it was stored (ms) and what it said.
pub(crate) async fn ps_status(
    store: &dyn Store,
    ps: &str,
) -> Result<Option<(u64, pb::PsStatus)>, CsError> {
    let Some(c) = store.get_component(Role::Ps, ps).await? else {
        return Ok(None);
    };
    let Ok(s) = pb::Status::decode(c.status.as_slice()) else {
        return Ok(None);
    };
    Ok(match s.status {
        Some(pb::status::Status::Ps(p)) => Some((c.status_ms, p)),
        _ => None,
    })
}

/// The PS's lag line for a replication.
pub(crate) fn lag_of<'a>(s: &'a pb::PsStatus, rid: &str) -> Option<&'a pb::PsReplicationLag> {
    s.replications.iter().find(|x| x.replication_id == rid)
}

/// How long an agent waits, in a move, for the MT to apply what the old
/// PS still forwards before it resyncs instead.
pub(crate) use rebound_common::control::MOVE_WAIT as AGENT_MOVE_WAIT;

/// How long a move waits for the old PS to be drained: never shorter than
/// the agent's own wait (plus a margin for its retries), so the job does
/// not give up while the agent still waits for the old PS.
pub(crate) fn move_wait(drain_timeout: Duration) -> Duration {
    drain_timeout.max(AGENT_MOVE_WAIT + Duration::from_secs(30))
}

/// What the old PS held for the replication at its last report after the
/// switch.
#[derive(Debug, Clone, Copy)]
enum Held {
    /// No report since the switch.
    NoReport,
    /// Its durable seq for the replication (None: not listed, unknown).
    Reported(Option<u64>),
}

impl Lifecycle {
    /// The machine replicates (Protected), its agent and `ps` are
    /// connected, and `ps` is another PS at the machine's site.
    pub(super) async fn check_move(&self, machine: &str, ps: &str) -> Result<(), CsError> {
        self.machine(machine).await?;
        let (st, r) = self.state_of(machine).await?;
        let Some(r) = r.filter(|_| st == ReplState::Protected) else {
            return Err(CsError::FailedPrecondition(format!(
                "cannot move {machine}: it is {st}; only a replicating machine (Protected) moves \
                 to another PS (`rebound machines` shows the state)"
            )));
        };
        if r.ps == ps {
            return Err(CsError::FailedPrecondition(format!(
                "{machine} already replicates through PS {ps}: nothing to move"
            )));
        }
        let p = self.component(Role::Ps, ps).await?;
        if p.site != r.from_site {
            return Err(CsError::FailedPrecondition(format!(
                "PS {ps} is at site {:?}, but {machine} runs at {}: a move stays within the \
                 machine's site; choose a PS at {}",
                p.site, r.from_site, r.from_site
            )));
        }
        if p.revoked || self.bus.connection(&ComponentKey::ps(ps)).is_none() {
            return Err(CsError::FailedPrecondition(format!(
                "PS {ps} is not connected to the CS: start it (`rebound status` shows the \
                 components) and retry the move of {machine}"
            )));
        }
        if self.bus.connection(&Self::agent(machine)).is_none() {
            return Err(CsError::FailedPrecondition(format!(
                "the agent on {machine} is not connected: it switches the stream itself; start \
                 it and retry"
            )));
        }
        Ok(())
    }

    /// Lets the replication's MT accept Apply and ChunkHashes from `ps`
    /// (as well as the PSs before it, until `done`).
    pub(super) async fn set_replication_ps(
        &self,
        machine: &str,
        ps: &str,
        done: bool,
    ) -> Result<(), CsError> {
        let set = |replication_id| {
            Cmd::SetReplicationPs(pb::SetReplicationPs {
                replication_id,
                ps_id: ps.to_string(),
                move_done: done,
            })
        };
        self.to_mt(machine, set).await.map(drop)
    }

    /// Waits until `ps` reports the replication and the MT has applied
    /// everything the old PS held after the switch (its status after the
    /// switch, so its report's lag does not hide records). An old PS that
    /// is not connected, or whose report does not list the replication,
    /// may still hold records: that is waited out, never taken as drained.
    /// The wait lasts at least as long as the agent's ([`move_wait`]); at
    /// its end the job fails and the old PS keeps its cache, so what it
    /// holds is never dropped while the agent may still wait for it.
    pub(super) async fn wait_moved(
        &self,
        ctx: &mut JobCtx,
        machine: &str,
        ps: &str,
    ) -> Result<(), CsError> {
        let r = self.repl(machine).await?;
        let switched = match ctx.get::<u64>("switched_ms") {
            Some(ms) => ms,
            None => {
                let ms = now_ms();
                ctx.set("switched_ms", &ms).await?;
                ms
            }
        };
        let limit = move_wait(self.settings.drain_timeout);
        let (store, bus) = (self.store.clone(), self.bus.clone());
        let (old, new, rid) = (r.ps.clone(), ps.to_string(), r.id.clone());
        // What the old PS held at its last report after the switch, if any.
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None::<Held>));
        let last = seen.clone();
        self.wait_for(
            ctx,
            format!(
                "waiting for PS {ps} to carry {machine} and MT {} to apply what PS {} held",
                r.mt, r.ps
            ),
            limit,
            || {
                let (store, bus, seen) = (store.clone(), bus.clone(), seen.clone());
                let (old, new, rid) = (old.clone(), new.clone(), rid.clone());
                async move {
                    let carried = ps_status(store.as_ref(), &new)
                        .await?
                        .is_some_and(|(_, s)| lag_of(&s, &rid).is_some());
                    let applied = store
                        .get_point_summary(&rid)
                        .await?
                        .map(|s| s.applied_seq)
                        .unwrap_or(0);
                    let held = match ps_status(store.as_ref(), &old).await? {
                        Some((at, s)) if at > switched => {
                            Held::Reported(lag_of(&s, &rid).map(|l| l.durable_seq))
                        }
                        _ => Held::NoReport,
                    };
                    let connected = bus.connection(&ComponentKey::ps(&old)).is_some();
                    let drained = matches!(held, Held::Reported(Some(d)) if applied >= d);
                    *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(held);
                    Ok((carried && connected && drained).then_some(()))
                }
            },
            || {
                let held = *last.lock().unwrap_or_else(|p| p.into_inner());
                let holds = match held {
                    Some(Held::Reported(Some(d))) => format!(
                        "it last reported holding {machine}'s records up to seq {d}, more than                          MT {} has applied",
                        r.mt
                    ),
                    Some(Held::Reported(None)) => format!(
                        "its status does not list replication {} at all, so what it still holds                          is unknown",
                        r.id
                    ),
                    _ => "it has not reported since the switch (paused, restarting or                           disconnected), so what it still holds is unknown"
                        .to_string(),
                };
                format!(
                    "the move of {machine} (replication {}) to PS {ps} is not done after {}: the                      old PS {} may still hold records the master target needs ({holds}); its                      cache is kept and still forwarded. Check that PS {} runs and reaches MT {}                      (`rebound status`, its log) and that PS {ps} carries the stream, then re-run                      `rebound move {machine} --ps {ps}`; if PS {} is gone for good, resync                      {machine} instead",
                    r.id,
                    super::steps::human(limit),
                    r.ps,
                    r.ps,
                    r.mt,
                    r.ps
                )
            },
        )
        .await
    }

    /// The replication's PS is `ps` from now on.
    pub(super) async fn record_ps(&self, machine: &str, ps: &str) -> Result<(), CsError> {
        let mut r = self.repl(machine).await?;
        if r.ps != ps {
            r.ps = ps.to_string();
            r.updated_ms = now_ms();
            self.store.put_replication(&r).await?;
        }
        Ok(())
    }
}
