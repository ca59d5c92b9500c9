//! Which recovery point each machine of a job gets ([`Lifecycle::choose_points`],
//! shared by failover and test failover), rolling the replica back to it,
//! and powering off a failed-over machine before a change of point (the
//! MT undoes what it wrote from its hand-over journal).

use super::steps::key;
use super::{JobSpec, Lifecycle, PointSpec};
use crate::bus::ComponentKey;
use crate::convert;
use crate::error::CsError;
use crate::jobs::JobCtx;
use crate::store::{now_ms, Point};
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use rebound_proto::control::command_result::Detail;

/// The MT runs the power_off hook (up to its hook timeout), then waits up
/// to the hook timeout again for the machine's agent to let go of its
/// hand-over journals (the fence).
const POWER_OFF_HOOK_WAITS: u32 = 2;

impl Lifecycle {
    /// Resolves a plan-wide point (`latest-multi`: the newest group point
    /// every machine has) once, and remembers each machine's point for its
    /// rollback or test copy; `latest` stays each machine's own newest.
    pub(super) async fn choose_points(
        &self,
        ctx: &mut JobCtx,
        spec: &JobSpec,
    ) -> Result<(), CsError> {
        let (machines, plan, point) = match spec {
            JobSpec::Failover {
                machines,
                plan,
                point,
                ..
            }
            | JobSpec::TestFailover {
                machines,
                plan,
                point,
            } => (machines, plan, point),
            _ => return Ok(()),
        };
        let chosen = match point {
            PointSpec::LatestMulti | PointSpec::LatestMultiApp => {
                let sums = self.summaries(machines).await?;
                let p = super::checks::newest_common_group_point(
                    &sums,
                    *point == PointSpec::LatestMultiApp,
                )?;
                let group = self.multi_group(machines, plan).await?;
                ctx.status(format!("group point {} of group {group} chosen", p.group))
                    .await?;
                PointSpec::GroupTag(p.group)
            }
            other => other.clone(),
        };
        for m in machines {
            ctx.set(&format!("point.{}", key(m)), &chosen).await?;
        }
        Ok(())
    }

    pub(super) async fn rollback(
        &self,
        ctx: &mut JobCtx,
        spec: &JobSpec,
        machine: &str,
    ) -> Result<(), CsError> {
        let r = self.repl(machine).await?;
        let point = match spec {
            JobSpec::ChangePoint { point, .. } => point.clone(),
            JobSpec::Failover { point, .. } => ctx
                .get::<PointSpec>(&format!("point.{}", key(machine)))
                .unwrap_or_else(|| point.clone()),
            _ => {
                return Err(CsError::Internal(format!(
                    "rollback in a {} job",
                    spec.kind()
                )))
            }
        };
        let reply = self
            .send(
                ComponentKey::mt(&r.mt),
                Cmd::Rollback(pb::Rollback {
                    replication_id: r.id.clone(),
                    point: Some(convert::point_spec_to_proto(&point)),
                }),
            )
            .await?;
        ctx.warn(reply.warning).await?;
        let got: Option<Point> = match reply.detail {
            Some(Detail::RolledBack(rb)) => rb.point.as_ref().map(convert::point_from_proto),
            _ => None,
        };
        if let Some(p) = &got {
            if point == PointSpec::LatestApp {
                ctx.warn(format!(
                    "{machine} failed over to app-consistent point {} (time {} ms): writes after it \
                     are not in the failed-over machine",
                    p.id, p.time_ms
                ))
                .await?;
            }
            ctx.status(format!(
                "{machine} rolled back to point {} ({})",
                p.id, p.kind
            ))
            .await?;
        }
        let mut r = self.repl(machine).await?;
        r.failover_point = got;
        r.updated_ms = now_ms();
        self.store.put_replication(&r).await?;
        Ok(())
    }

    /// Stops the failed-over machine (the MT's power_off hook and fence)
    /// and restores the pre-images of what it wrote since its hand-over, so
    /// the replica is again exactly its point before the rollback to
    /// another one.
    pub(super) async fn power_off(&self, ctx: &mut JobCtx, machine: &str) -> Result<(), CsError> {
        let r = self.repl(machine).await?;
        let cmd = Cmd::PowerOff(pb::PowerOff {
            replication_id: r.id.clone(),
        });
        let detail = self
            .hook_command(ctx, &r.mt, cmd, POWER_OFF_HOOK_WAITS)
            .await?;
        if let Some(Detail::PoweredOff(p)) = detail {
            ctx.status(format!(
                "{machine} powered off at MT {}; {} blocks it wrote since its hand-over restored",
                r.mt, p.blocks_restored
            ))
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::POWER_OFF_HOOK_WAITS;
    use crate::lifecycle::Settings;
    use std::time::Duration;

    #[test]
    fn power_off_waits_for_the_hook_and_the_fence() {
        let s = Settings {
            command_timeout: Duration::from_secs(60),
            hook_timeout: Duration::from_secs(300),
            ..Settings::default()
        };
        assert_eq!(
            s.hook_command_timeout(POWER_OFF_HOOK_WAITS),
            Duration::from_secs(60 + 2 * 300)
        );
        assert_eq!(s.hook_command_timeout(1), Duration::from_secs(360));
    }
}
