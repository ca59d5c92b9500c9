//! `rebound unprotect`: ending a protection cleanly. The agent stops
//! streaming (the machine keeps its disks), the PS drops its cache of the
//! replication, the MT ends the replication and keeps or deletes the
//! replica, and the machine is Unprotected (it can be protected again).
//!
//! Only a replication that streams (InitialSync, Protected) can be ended:
//! during or after a failover the replica is the machine, and the state
//! machine's refusal says what to do instead.

use super::state::{self, Op};
use super::{Lifecycle, Step};
use crate::bus::ComponentKey;
use crate::error::CsError;
use crate::jobs::JobCtx;
use crate::store::{now_ms, ReplState};
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;

/// The steps after the check.
pub(super) fn steps(machine: &str) -> Vec<Step> {
    let m = || machine.to_string();
    vec![
        Step::StopAgent { machine: m() },
        Step::RemoveFromPs { machine: m() },
        Step::EndReplication { machine: m() },
        Step::MarkUnprotected { machine: m() },
    ]
}

impl Lifecycle {
    /// Whether `machine` can be unprotected now.
    pub(super) async fn check_unprotect(&self, machine: &str) -> Result<(), CsError> {
        self.machine(machine).await?;
        let (st, _) = self.state_of(machine).await?;
        state::next(machine, st, Op::Unprotect).map(drop)
    }

    /// Tells the machine's agent to stop streaming; the machine keeps
    /// running on its disks (they stay writable, not fenced). An
    /// agent that is not connected is a warning: the replication ends
    /// anyway, and its PS refuses the stream if the agent comes back.
    pub(super) async fn stop_agent(&self, ctx: &mut JobCtx, machine: &str) -> Result<(), CsError> {
        let (_, r) = self.state_of(machine).await?;
        let Some(r) = r else {
            return Ok(());
        };
        let agent = ComponentKey::agent(machine);
        if self.bus.connection(&agent).is_none() {
            return ctx
                .warn(format!(
                    "the agent on {machine} is not connected, so it was not told to stop \
                     streaming replication {}: stop or reconfigure it when it is back",
                    r.id
                ))
                .await;
        }
        let cmd = Cmd::StopReplication(pb::StopReplication {
            replication_id: r.id.clone(),
            remove_source_copy: false,
            keep_running: true,
        });
        self.bus
            .send(agent, cmd, self.settings.command_timeout)
            .await?;
        Ok(())
    }

    /// The last step: the machine's replication is Unprotected.
    pub(super) async fn mark_unprotected(&self, machine: &str) -> Result<(), CsError> {
        let (st, r) = self.state_of(machine).await?;
        let Some(mut r) = r else {
            return Ok(());
        };
        if st == ReplState::Unprotected {
            return Ok(());
        }
        r.state = state::next(machine, st, Op::Unprotect)?;
        r.updated_ms = now_ms();
        self.store.put_replication(&r).await?;
        Ok(())
    }
}
