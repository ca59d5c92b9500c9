//! `rebound test-failover` and `test-failover-cleanup` (DESIGN.md §7
//! views, §9): the replication's MT serves a writable copy-on-write view of
//! a point (its writes go to an overlay of their own), pins the point and
//! runs its `test_power_on` hook, while replication and retention go on;
//! the replication's state does not change. Cleanup discards the copies.
//!
//! Point choice as for a failover: a plan gives every machine a point;
//! `latest` is each machine's own newest point, `latest-multi` the newest
//! group point all machines share.

use super::{checks, Lifecycle, PointSpec, Step};
use crate::bus::ComponentKey;
use crate::convert;
use crate::error::CsError;
use crate::jobs::JobCtx;
use crate::store::{ReplState, Store};
use prost::Message;
use rebound_common::pki::Role;
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use rebound_proto::control::command_result::Detail;

/// The steps after the check.
pub(super) fn steps(machines: &[String]) -> Vec<Step> {
    let mut s = vec![Step::ChoosePoints];
    s.extend(
        machines
            .iter()
            .map(|m| Step::StartTestFailover { machine: m.clone() }),
    );
    s
}

/// What the MT last reported of a replication (its status), when it did.
pub(crate) async fn mt_replication_status(
    store: &dyn Store,
    mt: &str,
    replication_id: &str,
) -> Result<Option<pb::MtReplicationStatus>, CsError> {
    let Some(c) = store.get_component(Role::Mt, mt).await? else {
        return Ok(None);
    };
    let Ok(s) = pb::Status::decode(c.status.as_slice()) else {
        return Ok(None);
    };
    Ok(match s.status {
        Some(pb::status::Status::Mt(st)) => st
            .replications
            .into_iter()
            .find(|r| r.replication_id == replication_id),
        _ => None,
    })
}

impl Lifecycle {
    /// Every machine replicates (Protected), has a point, and runs no test
    /// failover yet.
    pub(super) async fn check_test_failover(
        &self,
        machines: &[String],
        plan: &str,
        point: &PointSpec,
    ) -> Result<(), CsError> {
        for m in machines {
            self.machine(m).await?;
            let (st, r) = self.state_of(m).await?;
            let Some(r) = r.filter(|_| st == ReplState::Protected) else {
                return Err(CsError::FailedPrecondition(format!(
                    "cannot test-fail over {m}: it is {st}; a test failover needs a replication \
                     that is Protected (`rebound machines` shows the state)"
                )));
            };
            let status = mt_replication_status(self.store.as_ref(), &r.mt, &r.id).await?;
            if let Some(s) = status.filter(|s| !s.test_point.is_empty()) {
                return Err(CsError::FailedPrecondition(format!(
                    "a test failover of {m} is already running at MT {} (point {}, exports {}): \
                     end it first (`rebound test-failover-cleanup {m}`)",
                    r.mt,
                    s.test_point,
                    s.test_exports.join(", ")
                )));
            }
        }
        let sums = self.summaries(machines).await?;
        checks::have_points(&sums, (!plan.is_empty()).then_some(plan))?;
        if matches!(point, PointSpec::LatestApp) {
            checks::have_app_points(&sums)?;
        }
        if point.multi() {
            self.multi_group(machines, plan).await?;
        }
        Ok(())
    }

    /// Every machine is known and has a replication (ending a test failover
    /// that does not run is not an error: the MT's end is idempotent).
    pub(super) async fn check_test_failover_cleanup(
        &self,
        machines: &[String],
    ) -> Result<(), CsError> {
        for m in machines {
            self.machine(m).await?;
            if self.state_of(m).await?.1.is_none() {
                return Err(CsError::FailedPrecondition(format!(
                    "{m} has no replication, so it has no test failover to end"
                )));
            }
        }
        Ok(())
    }

    /// Sends MT `mt` a command that waits up to `hook_waits` times the
    /// hook timeout (its hooks, its fence) on top of its own work; keeps
    /// its warning, returns its detail.
    pub(super) async fn hook_command(
        &self,
        ctx: &mut JobCtx,
        mt: &str,
        cmd: Cmd,
        hook_waits: u32,
    ) -> Result<Option<Detail>, CsError> {
        let limit = self.settings.hook_command_timeout(hook_waits);
        let reply = self.bus.send(ComponentKey::mt(mt), cmd, limit).await?;
        ctx.warn(reply.warning).await?;
        Ok(reply.detail)
    }

    /// `StartTestFailover` at the replication's MT with the machine's point;
    /// the step's detail names the point and the exports.
    pub(super) async fn start_test_failover(
        &self,
        ctx: &mut JobCtx,
        machine: &str,
    ) -> Result<(), CsError> {
        let r = self.repl(machine).await?;
        let point = ctx
            .get::<PointSpec>(&format!("point.{}", super::steps::key(machine)))
            .unwrap_or(PointSpec::Latest);
        let cmd = Cmd::StartTestFailover(pb::StartTestFailover {
            replication_id: r.id.clone(),
            point: Some(convert::point_spec_to_proto(&point)),
            run_test_power_on: true,
        });
        if let Some(Detail::TestCopy(t)) = self.hook_command(ctx, &r.mt, cmd, 1).await? {
            let p = t.point.map(|p| p.id).unwrap_or_default();
            ctx.status(format!(
                "{machine}'s test copy of point {p} is served by MT {} at {}: exports {}",
                r.mt,
                t.nbd_address,
                t.exports.join(", ")
            ))
            .await?;
        }
        Ok(())
    }

    /// `EndTestFailover` at the replication's MT.
    pub(super) async fn end_test_failover(
        &self,
        ctx: &mut JobCtx,
        machine: &str,
    ) -> Result<(), CsError> {
        let r = self.repl(machine).await?;
        let cmd = Cmd::EndTestFailover(pb::EndTestFailover {
            replication_id: r.id.clone(),
        });
        self.hook_command(ctx, &r.mt, cmd, 1).await?;
        ctx.status(format!(
            "{machine}'s test copy at MT {} discarded and its point unpinned",
            r.mt
        ))
        .await
    }
}
