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
    /// is not connected is waited for; only when it stays away for the
    /// whole wait does the move go on without it (with a warning).
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
        let (store, bus) = (self.store.clone(), self.bus.clone());
        let (old, new, rid) = (r.ps.clone(), ps.to_string(), r.id.clone());
        let waited = self
            .wait_for(
                ctx,
                format!(
                    "waiting for PS {ps} to carry {machine} and MT {} to apply what PS {} held",
                    r.mt, r.ps
                ),
                self.settings.drain_timeout,
                || {
                    let (store, bus) = (store.clone(), bus.clone());
                    let (old, new, rid) = (old.clone(), new.clone(), rid.clone());
                    async move {
                        let carried = ps_status(store.as_ref(), &new)
                            .await?
                            .is_some_and(|(_, s)| lag_of(&s, &rid).is_some());
                        if !carried {
                            return Ok(None);
                        }
                        let applied = store
                            .get_point_summary(&rid)
                            .await?
                            .map(|s| s.applied_seq)
                            .unwrap_or(0);
                        // An old PS that is away (paused, restarting) may still
                        // hold records: wait for it to come back and report.
                        if bus.connection(&ComponentKey::ps(&old)).is_none() {
                            return Ok(None);
                        }
                        Ok(match ps_status(store.as_ref(), &old).await? {
                            Some((at, s)) if at > switched => {
                                let held = lag_of(&s, &rid).map(|l| l.durable_seq).unwrap_or(0);
                                (applied >= held).then_some(())
                            }
                            _ => None,
                        })
                    }
                },
                || {
                    format!(
                    "PS {ps} did not take over {machine} within {}, or MT {} did not apply what \
                     PS {} held: check `rebound status` and the PSs' logs; re-run the move to \
                     keep waiting (the old PS still forwards what it holds)",
                    super::steps::human(self.settings.drain_timeout),
                    r.mt,
                    r.ps
                )
                },
            )
            .await;
        match waited {
            Err(_) if self.bus.connection(&ComponentKey::ps(&r.ps)).is_none() => {
                // The old PS is gone: what it held cannot be forwarded; the
                // agent resends what the MT is missing (its resync).
                ctx.warn(format!(
                    "the old PS {} did not come back within {}, so what it still held for \
                     {machine} is lost with it; the agent resyncs what the MT is missing",
                    r.ps,
                    super::steps::human(self.settings.drain_timeout)
                ))
                .await
            }
            other => other,
        }
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
