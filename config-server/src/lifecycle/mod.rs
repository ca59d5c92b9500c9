//! The disaster-recovery lifecycle (DESIGN.md §1, §8): protect, failover,
//! change-point, commit and reprotect, and beside them test failover,
//! verify and moving a machine to another PS, each a job of steps driven over the
//! [`Bus`] (commands to agents, PSs and MTs, and waiting for their results
//! and status).
//!
//! - `state.rs`: the replication state machine and its error messages;
//! - `checks.rs`: direction, at-least-one-point and group-point checks;
//! - `spec.rs`: the requests ([`JobSpec`]) and the point choice;
//! - this file: the validation of requests and the step lists they become;
//! - `unprotect.rs`: ending a protection (its checks and steps);
//! - `retention.rs`: telling the MT a new replication's retention;
//! - `step.rs`: the steps a job stores, and their names;
//! - `steps.rs`: what each step does (the job engine's `StepRunner`);
//! - `points.rs`: each machine's point, rollback, and power-off before a
//!   change of point;
//! - `source_copy.rs`: the disks a failover left (kept or removed at
//!   commit, the seed of the first reprotect back);
//! - `test_failover.rs`, `verify.rs` (and its schedule), `movement.rs`:
//!   those jobs' checks and steps;
//! - `stall.rs`: why a waiting step makes no progress (its components' errors);
//! - `group.rs`: the consistency-group barrier;
//! - `placement.rs`: the least-loaded PS of a site, when a request names none.
//!
//! Requests are validated before a job is created, so an operator error
//! (wrong direction, no point yet, wrong state) comes back from the RPC at
//! once; the job's first step validates again in case something changed.

pub mod checks;
pub mod group;
mod movement;
mod placement;
mod points;
mod retention;
pub mod source_copy;
pub mod spec;
mod stall;
pub mod state;
mod step;
pub mod steps;
pub mod test_failover;
mod unprotect;
pub mod verify;

pub use spec::{JobSpec, PointSpec};
pub use step::Step;

use crate::bus::{Bus, ComponentKey};
use crate::error::CsError;
use crate::jobs::JobEngine;
use crate::store::{
    Component, Job, JobFilter, Machine, Plan, PointSummary, Policy, ReplState, Replication, Store,
};
use rebound_common::pki::Role;
use state::Op;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Timeouts and defaults of the lifecycle.
#[derive(Debug, Clone)]
pub struct Settings {
    pub command_timeout: Duration,
    pub drain_timeout: Duration,
    pub initial_sync_timeout: Duration,
    pub wait_agent: Duration,
    /// How often waiting steps look at the store again.
    pub poll: Duration,
    pub keep_source_copy: bool,
    /// How long a hook may run.
    pub hook_timeout: Duration,
    /// Where the plan hooks are installed; a plan names one of its files.
    pub hook_dir: PathBuf,
}

impl Settings {
    /// How long to wait for an MT command that runs up to `hook_waits`
    /// hook-bounded waits (a hook, a fence on the machine's journals) on
    /// top of its own work.
    pub fn hook_command_timeout(&self, hook_waits: u32) -> Duration {
        self.command_timeout + self.hook_timeout * hook_waits
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            command_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(600),
            initial_sync_timeout: Duration::from_secs(24 * 3600),
            wait_agent: Duration::from_secs(30 * 60),
            poll: Duration::from_millis(200),
            keep_source_copy: true,
            hook_timeout: Duration::from_secs(600),
            hook_dir: PathBuf::from(crate::config::DEFAULT_HOOK_DIR),
        }
    }
}

/// Machines or a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    pub machines: Vec<String>,
    pub plan: String,
}

/// The lifecycle: validates requests, turns them into jobs, runs their steps.
pub struct Lifecycle {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) jobs: Arc<JobEngine>,
    pub(crate) settings: Settings,
    submit: tokio::sync::Mutex<()>,
}

impl Lifecycle {
    /// Makes the lifecycle and registers it as the job engine's step runner.
    pub fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        jobs: Arc<JobEngine>,
        settings: Settings,
    ) -> Arc<Lifecycle> {
        let l = Arc::new(Lifecycle {
            store,
            bus,
            jobs: jobs.clone(),
            settings,
            submit: tokio::sync::Mutex::new(()),
        });
        jobs.set_runner(l.clone());
        l
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Protects `machine` to `to_site` through `ps` (empty: the
    /// least-loaded online PS of its site) and `mt` (empty: the site's MT).
    pub async fn protect(
        &self,
        machine: &str,
        to_site: &str,
        ps: &str,
        mt: &str,
        group: &str,
        policy: Policy,
    ) -> Result<Job, CsError> {
        // Held from the choice of PS until the job naming it is stored.
        let _placing = self.submit.lock().await;
        let ps = self.ps_for(machine, ps).await?;
        self.submit_locked(JobSpec::Protect {
            machine: machine.into(),
            to_site: to_site.into(),
            ps,
            mt: mt.into(),
            group: group.into(),
            policy,
        })
        .await
    }

    pub async fn failover(
        &self,
        targets: &Targets,
        from_site: &str,
        to_site: &str,
        point: PointSpec,
        unplanned: bool,
    ) -> Result<Job, CsError> {
        let (machines, plan) = self.resolve(targets).await?;
        self.submit(JobSpec::Failover {
            machines,
            plan: plan.map(|p| p.name).unwrap_or_default(),
            from_site: from_site.into(),
            to_site: to_site.into(),
            point,
            unplanned,
        })
        .await
    }

    pub async fn change_point(&self, machine: &str, point: PointSpec) -> Result<Job, CsError> {
        self.submit(JobSpec::ChangePoint {
            machine: machine.into(),
            point,
        })
        .await
    }

    pub async fn commit(
        &self,
        targets: &Targets,
        keep_source_copy: Option<bool>,
    ) -> Result<Job, CsError> {
        let (machines, plan) = self.resolve(targets).await?;
        self.submit(JobSpec::Commit {
            machines,
            plan: plan.map(|p| p.name).unwrap_or_default(),
            keep_source_copy: keep_source_copy.unwrap_or(self.settings.keep_source_copy),
        })
        .await
    }

    /// Protects committed machines in the reverse direction through `ps`
    /// (empty: the least-loaded online PS of the site the first runs at).
    pub async fn reprotect(
        &self,
        targets: &Targets,
        ps: &str,
        mt: &str,
        wait_agent: Option<Duration>,
        policy: Option<Policy>,
    ) -> Result<Job, CsError> {
        let (machines, plan) = self.resolve(targets).await?;
        // Held from the choice of PS until the job naming it is stored.
        let _placing = self.submit.lock().await;
        let ps = match machines.first() {
            Some(first) => self.ps_for(first, ps).await?,
            None => ps.to_string(),
        };
        self.submit_locked(JobSpec::Reprotect {
            machines,
            plan: plan.map(|p| p.name).unwrap_or_default(),
            ps,
            mt: mt.into(),
            wait_agent_secs: wait_agent
                .unwrap_or(self.settings.wait_agent)
                .as_secs()
                .max(1),
            policy,
        })
        .await
    }

    /// A test failover of the targets at `point` (DESIGN.md §7 views):
    /// writable copies at the MT while replication goes on.
    pub async fn test_failover(&self, targets: &Targets, point: PointSpec) -> Result<Job, CsError> {
        let (machines, plan) = self.resolve(targets).await?;
        self.submit(JobSpec::TestFailover {
            machines,
            plan: plan.map(|p| p.name).unwrap_or_default(),
            point,
        })
        .await
    }

    /// Ends the targets' test failover: discards the test copies.
    pub async fn test_failover_cleanup(&self, targets: &Targets) -> Result<Job, CsError> {
        let (machines, plan) = self.resolve(targets).await?;
        self.submit(JobSpec::TestFailoverCleanup {
            machines,
            plan: plan.map(|p| p.name).unwrap_or_default(),
        })
        .await
    }

    /// Verifies `machine`'s replica against its source at a new tag
    /// (`point`, empty = a generated id), repairing when asked.
    pub async fn verify(&self, machine: &str, point: &str, repair: bool) -> Result<Job, CsError> {
        let tag = if point.is_empty() {
            format!("verify-{}", rebound_common::time::now_ms())
        } else {
            point.to_string()
        };
        self.submit(JobSpec::Verify {
            machine: machine.into(),
            tag,
            repair,
        })
        .await
    }

    /// Moves `machine`'s replication to another PS of the same site.
    pub async fn move_machine(&self, machine: &str, ps: &str) -> Result<Job, CsError> {
        self.submit(JobSpec::Move {
            machine: machine.into(),
            ps: ps.into(),
        })
        .await
    }

    /// Ends the protection of `machine`; the MT deletes its replica when
    /// `delete_replica`.
    pub async fn unprotect(&self, machine: &str, delete_replica: bool) -> Result<Job, CsError> {
        self.submit(JobSpec::Unprotect {
            machine: machine.into(),
            delete_replica,
        })
        .await
    }

    /// Validates, creates and starts the job for `spec`.
    pub async fn submit(&self, spec: JobSpec) -> Result<Job, CsError> {
        let _one_at_a_time = self.submit.lock().await;
        self.submit_locked(spec).await
    }

    /// [`Lifecycle::submit`] for a caller that holds the submit lock.
    async fn submit_locked(&self, spec: JobSpec) -> Result<Job, CsError> {
        self.validate(&spec, None).await?;
        let steps = self.steps(&spec).await?;
        let spec_json = serde_json::to_string(&spec)
            .map_err(|e| CsError::Internal(format!("job spec: {e}")))?;
        let job = self
            .jobs
            .create(
                spec.kind(),
                spec.machines(),
                spec.plan(),
                spec_json,
                steps.iter().map(Step::new_step).collect(),
            )
            .await?;
        self.jobs.start(&job.id);
        Ok(job)
    }

    /// Machines (in plan order) and the plan, from targets.
    async fn resolve(&self, t: &Targets) -> Result<(Vec<String>, Option<Plan>), CsError> {
        match (t.machines.is_empty(), t.plan.is_empty()) {
            (false, true) => {
                let mut ms = t.machines.clone();
                ms.dedup();
                Ok((ms, None))
            }
            (true, false) => {
                let plan = self.store.get_plan(&t.plan).await?.ok_or_else(|| {
                    CsError::NotFound(format!(
                        "no recovery plan {}: `rebound plan show` lists the plans",
                        t.plan
                    ))
                })?;
                let ms = plan.machines();
                if ms.is_empty() {
                    return Err(CsError::FailedPrecondition(format!(
                        "recovery plan {} has no machines",
                        t.plan
                    )));
                }
                Ok((ms, Some(plan)))
            }
            (true, true) => Err(CsError::InvalidArgument(
                "name the machines or a plan (--plan P)".into(),
            )),
            (false, false) => Err(CsError::InvalidArgument(
                "name either machines or a plan, not both".into(),
            )),
        }
    }

    pub(crate) async fn machine(&self, id: &str) -> Result<Machine, CsError> {
        self.store.get_machine(id).await?.ok_or_else(|| {
            CsError::NotFound(format!(
                "machine {id} is unknown: install and enroll its agent (`rebound-agent enroll`), \
                 start it pointing at this CS, then retry"
            ))
        })
    }

    pub(crate) async fn state_of(
        &self,
        id: &str,
    ) -> Result<(ReplState, Option<Replication>), CsError> {
        let r = self.store.current_replication(id).await?;
        Ok((
            r.as_ref()
                .map(|r| r.state)
                .unwrap_or(ReplState::Unprotected),
            r,
        ))
    }

    pub(crate) async fn component(&self, role: Role, id: &str) -> Result<Component, CsError> {
        self.store.get_component(role, id).await?.ok_or_else(|| {
            CsError::NotFound(format!(
                "no {role} {id:?} is known: enroll it and start it pointing at this CS \
                 (`rebound status` lists the components)"
            ))
        })
    }

    /// The MT at `site`: `wanted` when given (checked), else the only one.
    pub(crate) async fn mt_at(&self, site: &str, wanted: &str) -> Result<String, CsError> {
        if !wanted.is_empty() {
            let c = self.component(Role::Mt, wanted).await?;
            if c.site != site {
                return Err(CsError::FailedPrecondition(format!(
                    "MT {wanted} is at site {:?}, but the target site is {site}: choose an MT at {site}",
                    c.site
                )));
            }
            return Ok(wanted.to_string());
        }
        let mts: Vec<String> = (self.at_site(Role::Mt, site).await?.into_iter())
            .map(|c| c.id)
            .collect();
        match mts.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(CsError::FailedPrecondition(format!(
                "no master target at site {site} is registered: start rebound-mt there, or name one with --mt"
            ))),
            many => Err(CsError::FailedPrecondition(format!(
                "several master targets at site {site} ({}): choose one with --mt",
                many.join(", ")
            ))),
        }
    }

    async fn not_busy(&self, machine: &str, own_job: Option<&str>) -> Result<(), CsError> {
        let active = self
            .store
            .list_jobs(&JobFilter::active_on(machine, 10))
            .await?;
        if let Some(j) = active.iter().find(|j| Some(j.id.as_str()) != own_job) {
            return Err(CsError::FailedPrecondition(format!(
                "machine {machine} is busy with job {} ({}, {}): wait for it (`rebound jobs {} --watch`)",
                j.id,
                j.kind,
                j.state.as_str(),
                j.id
            )));
        }
        Ok(())
    }

    async fn summaries(
        &self,
        machines: &[String],
    ) -> Result<Vec<(String, Option<PointSummary>)>, CsError> {
        let mut out = Vec::new();
        for m in machines {
            let s = match self.store.current_replication(m).await? {
                Some(r) => self.store.get_point_summary(&r.id).await?,
                None => None,
            };
            out.push((m.clone(), s));
        }
        Ok(out)
    }

    /// The consistency group `latest-multi` uses: the plan's, else the one
    /// all machines share.
    pub(crate) async fn multi_group(
        &self,
        machines: &[String],
        plan: &str,
    ) -> Result<String, CsError> {
        if !plan.is_empty() {
            if let Some(p) = self.store.get_plan(plan).await? {
                if !p.consistency_group.is_empty() {
                    return Ok(p.consistency_group);
                }
            }
        }
        let mut group: Option<String> = None;
        for m in machines {
            let g = self.machine(m).await?.group;
            match &group {
                None => group = Some(g),
                Some(x) if *x == g => {}
                Some(_) => group = Some(String::new()),
            }
        }
        match group {
            Some(g) if !g.is_empty() => Ok(g),
            _ => Err(CsError::FailedPrecondition(format!(
                "latest-multi needs machines of one consistency group, and {} are not: \
                 put them in a group (`rebound group create`) or use --point latest",
                machines.join(", ")
            ))),
        }
    }

    /// The checks of a request; `own_job` is the job re-checking itself.
    pub async fn validate(&self, spec: &JobSpec, own_job: Option<&str>) -> Result<(), CsError> {
        let machines = spec.machines();
        if machines.is_empty() {
            return Err(CsError::InvalidArgument("no machines given".into()));
        }
        for m in &machines {
            self.not_busy(m, own_job).await?;
        }
        match spec {
            JobSpec::Protect {
                machine,
                to_site,
                ps,
                mt,
                group,
                ..
            } => {
                let m = self.machine(machine).await?;
                let (st, _) = self.state_of(machine).await?;
                state::next(machine, st, Op::Protect)?;
                if to_site.is_empty() || *to_site == m.site {
                    return Err(CsError::InvalidArgument(format!(
                        "{machine} runs at site {}: protect it --to another site",
                        m.site
                    )));
                }
                let p = self.component(Role::Ps, ps).await?;
                if p.site != m.site {
                    return Err(CsError::FailedPrecondition(format!(
                        "PS {ps} is at site {:?}, but {machine} runs at {}: choose a PS at {}",
                        p.site, m.site, m.site
                    )));
                }
                self.mt_at(to_site, mt).await?;
                if !group.is_empty() && self.store.get_group(group).await?.is_none() {
                    return Err(CsError::NotFound(format!(
                        "no consistency group {group}: create it first (`rebound group create {group}`)"
                    )));
                }
            }
            JobSpec::Failover {
                machines,
                plan,
                from_site,
                to_site,
                point,
                ..
            } => {
                let mut repls = Vec::new();
                for m in machines {
                    self.machine(m).await?;
                    let (st, r) = self.state_of(m).await?;
                    let Some(r) = r else {
                        return Err(state::next(m, st, Op::Failover).unwrap_err());
                    };
                    checks::direction(&r, from_site, to_site)?;
                    repls.push((m, st));
                }
                let sums = self.summaries(machines).await?;
                let plan_name = (!plan.is_empty()).then_some(plan.as_str());
                checks::have_points(&sums, plan_name)?;
                if matches!(point, PointSpec::LatestApp) {
                    checks::have_app_points(&sums)?;
                }
                for (m, st) in repls {
                    state::next(m, st, Op::Failover)?;
                }
                if point.multi() {
                    self.multi_group(machines, plan).await?;
                }
            }
            JobSpec::ChangePoint { machine, point } => {
                let (st, _) = self.state_of(machine).await?;
                state::next(machine, st, Op::ChangePoint)?;
                if point.multi() {
                    return Err(CsError::InvalidArgument(format!(
                        "change-point works on one machine: {point} is for plans; give a point id or time"
                    )));
                }
            }
            JobSpec::Commit { machines, .. } => {
                for m in machines {
                    let (st, _) = self.state_of(m).await?;
                    state::next(m, st, Op::Commit)?;
                }
            }
            JobSpec::Reprotect {
                machines, ps, mt, ..
            } => {
                let p = self.component(Role::Ps, ps).await?;
                for m in machines {
                    let mach = self.machine(m).await?;
                    let (st, r) = self.state_of(m).await?;
                    state::next(m, st, Op::Reprotect)?;
                    if p.site != mach.site {
                        return Err(CsError::FailedPrecondition(format!(
                            "PS {ps} is at site {:?}, but {m} now runs at {}: choose a PS at {}",
                            p.site, mach.site, mach.site
                        )));
                    }
                    let back_to = self.reverse_target(m, r.as_ref()).await?;
                    self.mt_at(&back_to, mt).await?;
                }
            }
            JobSpec::Unprotect { machine, .. } => self.check_unprotect(machine).await?,
            JobSpec::TestFailover {
                machines,
                plan,
                point,
            } => self.check_test_failover(machines, plan, point).await?,
            JobSpec::TestFailoverCleanup { machines, .. } => {
                self.check_test_failover_cleanup(machines).await?
            }
            JobSpec::Verify { machine, tag, .. } => self.check_verify(machine, tag).await?,
            JobSpec::Move { machine, ps } => self.check_move(machine, ps).await?,
        }
        Ok(())
    }

    /// The site a reprotect of `machine` replicates to: where its committed
    /// replication came from.
    pub(crate) async fn reverse_target(
        &self,
        machine: &str,
        current: Option<&Replication>,
    ) -> Result<String, CsError> {
        let Some(r) = current else {
            return Err(CsError::FailedPrecondition(format!(
                "{machine} has no replication to reverse"
            )));
        };
        if r.state == ReplState::WaitingForAgent {
            return Ok(r.to_site.clone());
        }
        Ok(r.from_site.clone())
    }

    /// The step list of a request.
    async fn steps(&self, spec: &JobSpec) -> Result<Vec<Step>, CsError> {
        let mut s = vec![Step::Check];
        let each = |f: fn(String) -> Step, ms: &[String], s: &mut Vec<Step>| {
            for m in ms {
                s.push(f(m.clone()));
            }
        };
        match spec {
            JobSpec::Protect { machine, .. } => {
                let m = machine.clone();
                s.push(Step::CreateReplication { machine: m.clone() });
                s.push(Step::AddToPs { machine: m.clone() });
                s.push(Step::PrepareMt { machine: m.clone() });
                s.push(Step::SetRetention { machine: m.clone() });
                s.push(Step::StartAgent { machine: m.clone() });
                s.push(Step::WaitFirstPoint { machine: m });
            }
            JobSpec::Failover {
                machines,
                plan,
                point,
                unplanned,
                ..
            } => {
                s.push(Step::BeginFailover);
                if !unplanned {
                    each(|machine| Step::Fence { machine }, machines, &mut s);
                    each(|machine| Step::Drain { machine }, machines, &mut s);
                }
                if matches!(point, PointSpec::Latest) {
                    each(|machine| Step::CatchUp { machine }, machines, &mut s);
                }
                s.push(Step::ChoosePoints);
                let groups = match self.store.get_plan(plan).await? {
                    Some(p) if !plan.is_empty() => p.groups,
                    _ => vec![crate::store::PlanGroup {
                        machines: machines.clone(),
                        ..Default::default()
                    }],
                };
                for (i, g) in groups.iter().enumerate() {
                    if !g.pre_hook.is_empty() {
                        s.push(Step::Hook {
                            name: g.pre_hook.clone(),
                            label: format!("pre-hook of plan group {}", i + 1),
                        });
                    }
                    each(|machine| Step::Rollback { machine }, &g.machines, &mut s);
                    each(|machine| Step::HandOver { machine }, &g.machines, &mut s);
                    if !g.post_hook.is_empty() {
                        s.push(Step::Hook {
                            name: g.post_hook.clone(),
                            label: format!("post-hook of plan group {}", i + 1),
                        });
                    }
                }
            }
            JobSpec::ChangePoint { machine, .. } => {
                let m = machine.clone();
                s.push(Step::PowerOff { machine: m.clone() });
                s.push(Step::RestorePreImages { machine: m.clone() });
                s.push(Step::Rollback { machine: m.clone() });
                s.push(Step::HandOver { machine: m });
            }
            JobSpec::Commit { machines, .. } => {
                each(|machine| Step::EndReplication { machine }, machines, &mut s);
                each(|machine| Step::RemoveFromPs { machine }, machines, &mut s);
                each(|machine| Step::RetireSource { machine }, machines, &mut s);
            }
            JobSpec::Reprotect { machines, .. } => {
                each(
                    |machine| Step::CreateReplication { machine },
                    machines,
                    &mut s,
                );
                each(|machine| Step::WaitAgent { machine }, machines, &mut s);
                for m in machines {
                    s.push(Step::AddToPs { machine: m.clone() });
                    s.push(Step::PrepareMt { machine: m.clone() });
                    s.push(Step::SetRetention { machine: m.clone() });
                    s.push(Step::StartAgent { machine: m.clone() });
                }
                each(|machine| Step::WaitFirstPoint { machine }, machines, &mut s);
            }
            JobSpec::Unprotect { machine, .. } => s.extend(unprotect::steps(machine)),
            JobSpec::TestFailover { machines, .. } => s.extend(test_failover::steps(machines)),
            JobSpec::TestFailoverCleanup { machines, .. } => each(
                |machine| Step::EndTestFailover { machine },
                machines,
                &mut s,
            ),
            JobSpec::Verify { machine, .. } => s.push(Step::Verify {
                machine: machine.clone(),
            }),
            JobSpec::Move { machine, ps } => s.extend(movement::steps(machine, ps)),
        }
        Ok(s)
    }

    pub(crate) fn agent(machine: &str) -> ComponentKey {
        ComponentKey::agent(machine)
    }
}

#[cfg(test)]
mod tests;
