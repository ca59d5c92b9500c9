//! The operator RPCs (`Admin` service) the `rebound` CLI calls (DESIGN.md
//! §9). Only admin certificates may call them: every method starts with
//! `require_role(Admin)`, so an agent, PS or MT certificate gets
//! PERMISSION_DENIED.
//!
//! Reads come from the store (what components last reported); lifecycle
//! operations validate and start jobs and return at once with the job, which
//! the CLI then watches (`WatchJob`).

use crate::bus::{Bus, CommandBus, ComponentKey};
use crate::convert;
use crate::error::CsError;
use crate::fleet::{components, policy};
use crate::jobs::JobEngine;
use crate::lifecycle::group::cut_group_point;
use crate::lifecycle::{Lifecycle, Targets};
use crate::store::{Group, JobFilter, Machine, Plan, Store};
use rebound_common::pki::Role;
use rebound_common::tls::require_role;
use rebound_proto::control as pb;
use rebound_proto::control::admin_server::Admin;
use rebound_proto::control::command::Cmd;
use rebound_proto::control::command_result::Detail;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct AdminService {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) bus: Arc<CommandBus>,
    pub(crate) jobs: Arc<JobEngine>,
    pub(crate) lifecycle: Arc<Lifecycle>,
    /// The revocation list the CS's server enforces; `Revoke` updates it.
    pub(crate) revocations: rebound_common::tls::Revocations,
    /// The deployment's CA certificate: tokens carry its hash.
    pub(crate) ca_pem: String,
}

type Res<T> = Result<Response<T>, Status>;

fn admin<T>(req: &Request<T>) -> Result<(), Status> {
    require_role(req, &[Role::Admin]).map(|_| ())
}

fn targets(t: Option<pb::Targets>) -> Targets {
    let t = t.unwrap_or_default();
    Targets {
        machines: t.machines,
        plan: t.plan,
    }
}

fn point(c: Option<&pb::PointChoice>) -> Result<crate::lifecycle::PointSpec, Status> {
    convert::point_spec_from_proto(c).map_err(|e| Status::invalid_argument(format!("--point: {e}")))
}

fn started(j: crate::store::Job) -> Res<pb::JobStarted> {
    Ok(Response::new(pb::JobStarted {
        job: Some(convert::job_to_proto(&j)),
    }))
}

impl AdminService {
    /// The named consistency group, or `NOT_FOUND`.
    async fn group(&self, name: &str) -> Result<Group, Status> {
        let g = self.store.get_group(name).await?;
        g.ok_or_else(|| Status::not_found(format!("no consistency group {name}")))
    }

    /// The named recovery plan, or `NOT_FOUND`.
    async fn plan(&self, name: &str) -> Result<Plan, Status> {
        let p = self.store.get_plan(name).await?;
        p.ok_or_else(|| Status::not_found(format!("no recovery plan {name}")))
    }

    pub fn new(
        store: Arc<dyn Store>,
        bus: Arc<CommandBus>,
        jobs: Arc<JobEngine>,
        lifecycle: Arc<Lifecycle>,
    ) -> AdminService {
        AdminService {
            store,
            bus,
            jobs,
            lifecycle,
            revocations: Default::default(),
            ca_pem: String::new(),
        }
    }

    /// Shares the revocation list the CS's server enforces.
    pub fn with_revocations(mut self, r: rebound_common::tls::Revocations) -> AdminService {
        self.revocations = r;
        self
    }

    /// The deployment's CA, whose hash `CreateToken` puts in each token.
    pub fn with_ca_pem(mut self, ca_pem: String) -> AdminService {
        self.ca_pem = ca_pem;
        self
    }

    async fn check_machines_exist(&self, machines: &[String]) -> Result<(), Status> {
        let mut unknown = Vec::new();
        for m in machines {
            if self.store.get_machine(m).await?.is_none() {
                unknown.push(m.as_str());
            }
        }
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "unknown machines: {} (a machine is known once its agent registered; `rebound machines` lists them)",
                unknown.join(", ")
            )))
        }
    }

    /// Moves each existing machine of `machines` to the consistency group
    /// that `to` names for it (`None` leaves it where it is), or stops at the
    /// first machine `to` refuses.
    async fn regroup(
        &self,
        machines: &[String],
        to: impl Fn(&Machine) -> Result<Option<String>, Status>,
    ) -> Result<(), Status> {
        for m in machines {
            if let Some(mut mach) = self.store.get_machine(m).await? {
                if let Some(group) = to(&mach)? {
                    mach.group = group;
                    self.store.put_machine(&mach).await?;
                }
            }
        }
        Ok(())
    }
}

fn check_name(what: &str, name: &str) -> Result<(), Status> {
    crate::enrollment::check_id(name)
        .map_err(|e| Status::invalid_argument(format!("{what} name: {e}")))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Res<pb::CreateTokenResponse> {
        admin(&req)?;
        crate::tokens::create_token(self, req.into_inner()).await
    }

    async fn revoke(&self, req: Request<pb::RevokeRequest>) -> Res<pb::RevokeResponse> {
        admin(&req)?;
        crate::fleet::revoke::revoke(self, req.into_inner()).await
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Res<pb::StatusResponse> {
        admin(&req)?;
        let components = components::list(self.store.as_ref(), self.bus.as_ref()).await?;
        let machines = self.store.list_machines().await?;
        let current = self.store.current_replications().await?;
        let protected = crate::fleet::machines::protected_count(&machines, &current);
        let running = self.store.list_jobs(&JobFilter::all_active()).await?.len();
        let events = self
            .store
            .recent_events(20)
            .await?
            .into_iter()
            .map(|e| pb::Event {
                severity: e.severity,
                kind: e.kind,
                message: e.message,
                replication_id: e.replication,
                time_ms: e.time_ms,
                component: e.component,
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            sites: self.store.list_sites().await?,
            components,
            machines: machines.len() as u32,
            protected_machines: protected,
            running_jobs: running as u32,
            cs_version: components::CS_VERSION.into(),
            events,
        }))
    }

    async fn machines(&self, req: Request<pb::MachinesRequest>) -> Res<pb::MachinesResponse> {
        admin(&req)?;
        let machines = crate::fleet::machines::list(self.store.as_ref(), self.bus.as_ref()).await?;
        Ok(Response::new(pb::MachinesResponse { machines }))
    }

    async fn points(&self, req: Request<pb::PointsRequest>) -> Res<pb::PointsResponse> {
        admin(&req)?;
        let machine = req.into_inner().machine;
        let r = self
            .store
            .current_replication(&machine)
            .await?
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "{machine} has no replication, so no recovery points: protect it first"
                ))
            })?;
        let timeout = self
            .lifecycle
            .settings()
            .command_timeout
            .min(Duration::from_secs(30));
        let reply = self
            .bus
            .send(
                ComponentKey::mt(&r.mt),
                Cmd::ListPoints(pb::ListPoints {
                    replication_id: r.id.clone(),
                }),
                timeout,
            )
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let list = match reply.detail {
            Some(Detail::PointList(l)) => l,
            _ => pb::PointList::default(),
        };
        Ok(Response::new(pb::PointsResponse {
            machine,
            replication_id: r.id,
            points: list.points,
            applied_seq: list.applied_seq,
            rolled_back_to: list.rolled_back_to,
        }))
    }

    async fn protect(&self, req: Request<pb::ProtectRequest>) -> Res<pb::JobStarted> {
        admin(&req)?;
        let r = req.into_inner();
        let policy = convert::policy_from_proto(r.policy.as_ref());
        started(
            self.lifecycle
                .protect(&r.machine, &r.to_site, &r.ps, &r.mt, &r.group, policy)
                .await?,
        )
    }

    async fn failover(&self, req: Request<pb::FailoverRequest>) -> Res<pb::JobStarted> {
        admin(&req)?;
        let r = req.into_inner();
        let p = point(r.point.as_ref())?;
        started(
            self.lifecycle
                .failover(
                    &targets(r.targets),
                    &r.from_site,
                    &r.to_site,
                    p,
                    r.unplanned,
                )
                .await?,
        )
    }

    async fn change_point(&self, req: Request<pb::ChangePointRequest>) -> Res<pb::JobStarted> {
        admin(&req)?;
        let r = req.into_inner();
        let p = point(r.point.as_ref())?;
        started(self.lifecycle.change_point(&r.machine, p).await?)
    }

    async fn commit(&self, req: Request<pb::CommitRequest>) -> Res<pb::JobStarted> {
        admin(&req)?;
        let r = req.into_inner();
        started(
            self.lifecycle
                .commit(&targets(r.targets), r.keep_source_copy)
                .await?,
        )
    }

    async fn reprotect(&self, req: Request<pb::ReprotectRequest>) -> Res<pb::JobStarted> {
        admin(&req)?;
        let r = req.into_inner();
        let wait = (r.wait_agent_secs > 0).then(|| Duration::from_secs(r.wait_agent_secs));
        // Fields not given keep the value of the replication it reverses.
        let policy = r.policy.as_ref().map(convert::policy_verbatim);
        started(
            self.lifecycle
                .reprotect(&targets(r.targets), &r.ps, &r.mt, wait, policy)
                .await?,
        )
    }

    async fn test_failover(&self, req: Request<pb::TestFailoverRequest>) -> Res<pb::JobStarted> {
        admin(&req)?;
        let r = req.into_inner();
        let point = point(r.point.as_ref())?;
        started(
            self.lifecycle
                .test_failover(&targets(r.targets), point)
                .await?,
        )
    }

    async fn test_failover_cleanup(
        &self,
        req: Request<pb::TestFailoverCleanupRequest>,
    ) -> Res<pb::JobStarted> {
        admin(&req)?;
        let r = req.into_inner();
        started(
            self.lifecycle
                .test_failover_cleanup(&targets(r.targets))
                .await?,
        )
    }

    async fn verify(&self, req: Request<pb::VerifyRequest>) -> Res<pb::JobStarted> {
        admin(&req)?;
        let r = req.into_inner();
        started(
            self.lifecycle
                .verify(&r.machine, &r.point, r.repair)
                .await?,
        )
    }

    async fn r#move(&self, req: Request<pb::MoveRequest>) -> Res<pb::JobStarted> {
        admin(&req)?;
        let r = req.into_inner();
        started(self.lifecycle.move_machine(&r.machine, &r.ps).await?)
    }

    async fn unprotect(&self, req: Request<pb::UnprotectRequest>) -> Res<pb::JobStarted> {
        admin(&req)?;
        let r = req.into_inner();
        started(
            self.lifecycle
                .unprotect(&r.machine, r.delete_replica)
                .await?,
        )
    }

    async fn set_policy(&self, req: Request<pb::SetPolicyRequest>) -> Res<pb::SetPolicyResponse> {
        admin(&req)?;
        let r = req.into_inner();
        let changes = r.policy.unwrap_or_default();
        let timeout = self.lifecycle.settings().command_timeout;
        let applied = policy::set_policy_resetting(
            self.store.as_ref(),
            self.bus.as_ref(),
            timeout,
            &r.machine,
            &changes,
            &r.reset,
        )
        .await?;
        Ok(Response::new(pb::SetPolicyResponse {
            policy: Some(convert::policy_to_proto(&applied.policy)),
            pending: applied.pending,
        }))
    }

    async fn components(&self, req: Request<pb::ComponentsRequest>) -> Res<pb::ComponentsResponse> {
        admin(&req)?;
        Ok(Response::new(pb::ComponentsResponse {
            components: components::list(self.store.as_ref(), self.bus.as_ref()).await?,
            cs_version: components::CS_VERSION.into(),
        }))
    }

    async fn remove_component(&self, req: Request<pb::RemoveComponentRequest>) -> Res<pb::Empty> {
        admin(&req)?;
        let r = req.into_inner();
        components::remove(self.store.as_ref(), self.bus.as_ref(), &r.role, &r.id).await?;
        tracing::info!(role = %r.role, id = %r.id, "component forgotten");
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Res<pb::Job> {
        admin(&req)?;
        let id = req.into_inner().id;
        let j = self.store.get_job(&id).await?.ok_or_else(|| {
            Status::not_found(format!("no job {id}: `rebound jobs` lists the jobs"))
        })?;
        Ok(Response::new(convert::job_to_proto(&j)))
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> Res<pb::ListJobsResponse> {
        admin(&req)?;
        let r = req.into_inner();
        let jobs = self
            .store
            .list_jobs(&JobFilter {
                active_only: r.active_only,
                machine: (!r.machine.is_empty()).then_some(r.machine),
                limit: r.limit,
            })
            .await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(convert::job_to_proto).collect(),
        }))
    }

    type WatchJobStream = ReceiverStream<Result<pb::Job, Status>>;

    async fn watch_job(&self, req: Request<pb::WatchJobRequest>) -> Res<Self::WatchJobStream> {
        admin(&req)?;
        let id = req.into_inner().id;
        // Subscribe before reading, so no change falls in between.
        let mut updates = self.jobs.subscribe();
        let first = self.store.get_job(&id).await?.ok_or_else(|| {
            Status::not_found(format!("no job {id}: `rebound jobs` lists the jobs"))
        })?;
        let (tx, rx) = mpsc::channel(64);
        let store = self.store.clone();
        tokio::spawn(async move {
            let done = first.state.finished();
            if tx.send(Ok(convert::job_to_proto(&first))).await.is_err() || done {
                return;
            }
            loop {
                let job = match updates.recv().await {
                    Ok(j) if j.id == id => j,
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        match store.get_job(&id).await {
                            Ok(Some(j)) => j,
                            _ => return,
                        }
                    }
                    Err(_) => return,
                };
                let done = job.state.finished();
                if tx.send(Ok(convert::job_to_proto(&job))).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn create_plan(&self, req: Request<pb::CreatePlanRequest>) -> Res<pb::Plan> {
        admin(&req)?;
        let p = convert::plan_from_proto(&req.into_inner().plan.unwrap_or_default());
        check_name("plan", &p.name)?;
        let machines = p.machines();
        if machines.is_empty() {
            return Err(Status::invalid_argument(format!(
                "plan {} has no machines: give at least one group of machines",
                p.name
            )));
        }
        crate::hooks::check_plan(&self.lifecycle.settings().hook_dir, &p).map_err(CsError::from)?;
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = machines.iter().find(|m| !seen.insert(m.as_str())) {
            return Err(Status::invalid_argument(format!(
                "machine {dup} is in plan {} twice",
                p.name
            )));
        }
        self.check_machines_exist(&machines).await?;
        if !p.consistency_group.is_empty()
            && self.store.get_group(&p.consistency_group).await?.is_none()
        {
            return Err(Status::not_found(format!(
                "no consistency group {}: create it first",
                p.consistency_group
            )));
        }
        self.store.put_plan(&p).await?;
        Ok(Response::new(convert::plan_to_proto(&p)))
    }

    async fn show_plan(&self, req: Request<pb::PlanRequest>) -> Res<pb::Plan> {
        admin(&req)?;
        let p = self.plan(&req.into_inner().name).await?;
        Ok(Response::new(convert::plan_to_proto(&p)))
    }

    async fn delete_plan(&self, req: Request<pb::PlanRequest>) -> Res<pb::Empty> {
        admin(&req)?;
        let name = req.into_inner().name;
        let running = self.store.list_jobs(&JobFilter::all_active()).await?;
        if let Some(j) = running.iter().find(|j| j.plan == name) {
            return Err(Status::failed_precondition(format!(
                "plan {name} is used by running job {}: wait for it",
                j.id
            )));
        }
        if !self.store.delete_plan(&name).await? {
            return Err(Status::not_found(format!("no recovery plan {name}")));
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_plans(&self, req: Request<pb::ListPlansRequest>) -> Res<pb::ListPlansResponse> {
        admin(&req)?;
        let plans = self.store.list_plans().await?;
        Ok(Response::new(pb::ListPlansResponse {
            plans: plans.iter().map(convert::plan_to_proto).collect(),
        }))
    }

    async fn create_group(&self, req: Request<pb::CreateGroupRequest>) -> Res<pb::Group> {
        admin(&req)?;
        let g = convert::group_from_proto(&req.into_inner().group.unwrap_or_default());
        check_name("group", &g.name)?;
        self.check_machines_exist(&g.machines).await?;
        self.regroup(&g.machines, |mach| {
            if !mach.group.is_empty() && mach.group != g.name {
                return Err(Status::failed_precondition(format!(
                    "machine {} is already in consistency group {}: remove it there first",
                    mach.id, mach.group
                )));
            }
            Ok(Some(g.name.clone()))
        })
        .await?;
        self.store.put_group(&g).await?;
        Ok(Response::new(convert::group_to_proto(&g)))
    }

    async fn delete_group(&self, req: Request<pb::GroupRequest>) -> Res<pb::Empty> {
        admin(&req)?;
        let name = req.into_inner().name;
        let g = self.group(&name).await?;
        self.regroup(&g.machines, |mach| {
            Ok((mach.group == name).then(String::new))
        })
        .await?;
        self.store.delete_group(&name).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_groups(
        &self,
        req: Request<pb::ListGroupsRequest>,
    ) -> Res<pb::ListGroupsResponse> {
        admin(&req)?;
        let groups = self.store.list_groups().await?;
        Ok(Response::new(pb::ListGroupsResponse {
            groups: groups.iter().map(convert::group_to_proto).collect(),
        }))
    }

    async fn cut_group_point(
        &self,
        req: Request<pb::GroupRequest>,
    ) -> Res<pb::CutGroupPointResponse> {
        admin(&req)?;
        let name = req.into_inner().name;
        let g = self.group(&name).await?;
        let p = cut_group_point(
            self.bus.as_ref(),
            &g,
            self.lifecycle.settings().command_timeout,
        )
        .await?;
        Ok(Response::new(pb::CutGroupPointResponse {
            tag_id: p.tag,
            members: p.members,
        }))
    }

    async fn alerts(&self, req: Request<pb::AlertsRequest>) -> Res<pb::AlertsResponse> {
        admin(&req)?;
        let all = req.into_inner().all;
        Ok(Response::new(
            alerts_listed(self.store.as_ref(), all).await?,
        ))
    }
}

/// `Admin.alerts`: the open alerts (and with `all` the cleared ones) as the
/// store keeps them. An unreadable log answers an error that says what the
/// CS does about it, not a bare database error.
pub async fn alerts_listed(store: &dyn Store, all: bool) -> Result<pb::AlertsResponse, Status> {
    match crate::alerts::log::AlertLog::load(store).await {
        Ok(log) => Ok(pb::AlertsResponse {
            alerts: log
                .listed(all)
                .iter()
                .map(convert::alert_to_proto)
                .collect(),
        }),
        Err(e @ crate::store::StoreError::Corrupt { .. }) => {
            tracing::warn!("listing the alerts: {e}");
            Err(Status::data_loss(format!(
                "the CS cannot read its alert log: {e}. It keeps evaluating (open alerts are \
                 raised again if still true) and writes a new log at the next alert raised or \
                 cleared; until then the recent events of `rebound status` show past alerts"
            )))
        }
        Err(e) => Err(e.into()),
    }
}
