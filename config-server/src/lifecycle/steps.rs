//! What each lifecycle step does: commands over the bus to agents, PSs and
//! MTs, waits on the status they report (stored by the control channel),
//! and replication state changes through the state machine.
//!
//! Every step may run twice (a CS restart mid-step resumes it), so each is
//! written to be repeatable: components apply a repeated command
//! idempotently, waits re-check the store, and records are only created
//! once (the job data remembers what was created). The one exception is a
//! plan hook, an installed program the CS cannot know to be repeatable,
//! which is not re-run.

use super::stall::StallWatch;
use super::state::{self, Op};
use super::{JobSpec, Lifecycle, Step};
use crate::bus::{BusError, ComponentKey, Reply};
use crate::convert;
use crate::error::CsError;
use crate::jobs::{JobCtx, StepFut, StepRunner};
use crate::store::{now_ms, ReplState, Replication};
use prost::Message;
use rebound_common::pki::Role;
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use rebound_proto::control::command_result::Detail;
use std::future::Future;
use std::time::{Duration, Instant};

impl From<BusError> for CsError {
    fn from(e: BusError) -> CsError {
        match e {
            BusError::Timeout { .. } => CsError::Unavailable(e.to_string()),
            BusError::Failed { .. } => CsError::FailedPrecondition(e.to_string()),
        }
    }
}

/// `host` of `host:port`, for the TLS server name.
fn host(addr: &str) -> String {
    addr.rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
        .unwrap_or_else(|| addr.to_string())
}

pub(super) fn key(machine: &str) -> String {
    machine.to_string()
}

impl StepRunner for Lifecycle {
    fn run_step<'a>(&'a self, ctx: &'a mut JobCtx, action: &'a str) -> StepFut<'a> {
        Box::pin(async move {
            let step: Step = serde_json::from_str(action)
                .map_err(|e| CsError::Internal(format!("unknown step {action}: {e}")))?;
            let spec: JobSpec = serde_json::from_str(&ctx.job().spec)
                .map_err(|e| CsError::Internal(format!("job spec unreadable: {e}")))?;
            self.step(ctx, &spec, step).await
        })
    }

    fn resumable(&self, action: &str) -> bool {
        !matches!(serde_json::from_str::<Step>(action), Ok(Step::Hook { .. }))
    }
}

impl Lifecycle {
    pub(super) async fn send(&self, to: ComponentKey, cmd: Cmd) -> Result<Reply, CsError> {
        Ok(self
            .bus
            .send(to, cmd, self.settings.command_timeout)
            .await?)
    }

    pub(super) async fn repl(&self, machine: &str) -> Result<Replication, CsError> {
        self.store
            .current_replication(machine)
            .await?
            .ok_or_else(|| CsError::FailedPrecondition(format!("{machine} has no replication")))
    }

    /// Sends the MT of the machine's current replication the command that
    /// `cmd` builds from the replication's id; returns the replication.
    pub(super) async fn to_mt(
        &self,
        machine: &str,
        cmd: impl FnOnce(String) -> Cmd,
    ) -> Result<Replication, CsError> {
        let r = self.repl(machine).await?;
        self.send(ComponentKey::mt(&r.mt), cmd(r.id.clone()))
            .await?;
        Ok(r)
    }

    /// Moves the machine's current replication through `op`.
    pub(super) async fn transition(&self, machine: &str, op: Op) -> Result<Replication, CsError> {
        let mut r = self.repl(machine).await?;
        r.state = state::next(machine, r.state, op)?;
        r.updated_ms = now_ms();
        self.store.put_replication(&r).await?;
        Ok(r)
    }

    /// The first address a component registered, and its TLS server name.
    pub(super) async fn address(&self, role: Role, id: &str) -> Result<(String, String), CsError> {
        let c = self.component(role, id).await?;
        let a = c.addresses.first().cloned().ok_or_else(|| {
            CsError::FailedPrecondition(format!(
                "{role} {id} registered no address: set `advertise` (or `listen`) in its config and restart it"
            ))
        })?;
        Ok((a.clone(), host(&a)))
    }

    async fn new_replication_id(&self, machine: &str) -> Result<String, CsError> {
        let n = self.store.list_replications(Some(machine)).await?.len();
        let mut i = n + 1;
        loop {
            let id = if i == 1 {
                machine.to_string()
            } else {
                format!("{machine}-{i}")
            };
            if self.store.get_replication(&id).await?.is_none() {
                return Ok(id);
            }
            i += 1;
        }
    }

    /// Waits until `check` yields a value, polling the store; `what` is the
    /// status line (followed by the newest error the job's components
    /// reported, see [`StallWatch`]), `on_timeout` the error.
    pub(super) async fn wait_for<T, F, Fut>(
        &self,
        ctx: &mut JobCtx,
        what: String,
        limit: Duration,
        mut check: F,
        on_timeout: impl FnOnce() -> String,
    ) -> Result<T, CsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, CsError>>,
    {
        let deadline = Instant::now() + limit;
        let mut stall = StallWatch::default();
        ctx.status(what.clone()).await?;
        loop {
            if let Some(v) = check().await? {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(CsError::Unavailable(stall.explain(on_timeout())));
            }
            let line = stall.line(self.store.as_ref(), ctx.job(), &what).await?;
            ctx.status(line).await?;
            tokio::time::sleep(self.settings.poll).await;
        }
    }

    async fn step(&self, ctx: &mut JobCtx, spec: &JobSpec, step: Step) -> Result<(), CsError> {
        match step {
            Step::Check => {
                let id = ctx.job_id().to_string();
                self.validate(spec, Some(&id)).await
            }
            Step::CreateReplication { machine } => {
                self.create_replication(ctx, spec, &machine).await
            }
            Step::WaitAgent { machine } => self.wait_agent(ctx, spec, &machine).await,
            Step::AddToPs { machine } => {
                let r = self.repl(&machine).await?;
                self.add_to_ps(&machine, &r.ps).await
            }
            Step::PrepareMt { machine } => self.prepare_mt(ctx, &machine).await,
            Step::StartAgent { machine } => {
                let r = self.repl(&machine).await?;
                self.start_agent(&machine, &r.ps, false).await
            }
            Step::SetRetention { machine } => self.set_retention(&machine).await,
            Step::StopAgent { machine } => self.stop_agent(ctx, &machine).await,
            Step::MarkUnprotected { machine } => self.mark_unprotected(&machine).await,
            Step::WaitFirstPoint { machine } => self.wait_first_point(ctx, &machine).await,
            Step::BeginFailover => {
                for m in spec.machines() {
                    self.transition(&m, Op::Failover).await?;
                }
                Ok(())
            }
            Step::Fence { machine } => {
                let tag = format!("shutdown-{}", ctx.job_id());
                self.send(
                    Self::agent(&machine),
                    Cmd::Fence(pb::Fence {
                        tag_id: tag,
                        run_shutdown_hook: true,
                    }),
                )
                .await
                .map_err(|e| unplanned_hint(e, &machine))?;
                Ok(())
            }
            Step::Drain { machine } => {
                let limit = self.settings.drain_timeout;
                let reply = self
                    .bus
                    .send(
                        Self::agent(&machine),
                        Cmd::Drain(pb::Drain {
                            timeout_ms: limit.as_millis().min(u32::MAX as u128) as u32,
                        }),
                        limit + self.settings.command_timeout,
                    )
                    .await
                    .map_err(|e| unplanned_hint(e.into(), &machine))?;
                ctx.warn(reply.warning).await?;
                let seq = match reply.detail {
                    Some(Detail::Drained(d)) => d.durable_seq.max(d.shutdown_tag_seq),
                    _ => 0,
                };
                ctx.set(&format!("drained.{}", key(&machine)), &seq).await
            }
            Step::CatchUp { machine } => self.catch_up(ctx, &machine).await,
            Step::ChoosePoints => self.choose_points(ctx, spec).await,
            Step::Hook { name, label } => self.hook(ctx, spec, &name, &label).await,
            Step::Rollback { machine } => self.rollback(ctx, spec, &machine).await,
            Step::HandOver { machine } => {
                let r = self
                    .to_mt(&machine, |replication_id| {
                        Cmd::HandOver(pb::HandOver {
                            replication_id,
                            run_power_on: true,
                        })
                    })
                    .await?;
                // The machine now lives at the target site: from here on
                // only an agent there may register (split-brain guard).
                let mut m = self.machine(&machine).await?;
                if r.state == ReplState::FailingOver && m.site == r.from_site {
                    self.remember_source_disks(&m, &r).await?;
                }
                m.site = r.to_site.clone();
                self.store.put_machine(&m).await?;
                if r.state == ReplState::FailingOver {
                    self.transition(&machine, Op::FailoverDone).await?;
                }
                Ok(())
            }
            Step::RestorePreImages { machine } => {
                let restore =
                    |replication_id| Cmd::RestorePreImages(pb::RestorePreImages { replication_id });
                self.to_mt(&machine, restore).await.map(drop)
            }
            Step::EndReplication { machine } => {
                let end = |replication_id| {
                    Cmd::EndReplication(pb::EndReplication {
                        replication_id,
                        keep_replica: spec.keep_replica(),
                    })
                };
                self.to_mt(&machine, end).await.map(drop)
            }
            Step::RemoveFromPs { machine } => {
                let r = self.repl(&machine).await?;
                let ps = ComponentKey::ps(&r.ps);
                let cmd = Cmd::RemoveReplication(pb::RemoveReplication {
                    replication_id: r.id.clone(),
                });
                if self.bus.connection(&ps).is_none() {
                    return ctx
                        .warn(format!(
                            "{ps} is not connected, so its cache for {machine} (replication {}) \
                             was not dropped; it holds no data the replica needs",
                            r.id
                        ))
                        .await;
                }
                if let Err(e) = self.send(ps, cmd).await {
                    ctx.warn(format!("{e}; its cache for {machine} stays"))
                        .await?;
                }
                Ok(())
            }
            Step::RetireSource { machine } => self.retire_source(ctx, spec, &machine).await,
            Step::PowerOff { machine } => self.power_off(ctx, &machine).await,
            Step::StartTestFailover { machine } => self.start_test_failover(ctx, &machine).await,
            Step::EndTestFailover { machine } => self.end_test_failover(ctx, &machine).await,
            Step::Verify { machine } => self.run_verify(ctx, spec, &machine).await,
            Step::SetReplicationPs { machine, ps, done } => {
                self.set_replication_ps(&machine, &ps, done).await
            }
            Step::AddToNewPs { machine, ps } => self.add_to_ps(&machine, &ps).await,
            Step::SwitchAgent { machine, ps } => self.start_agent(&machine, &ps, true).await,
            Step::WaitMoved { machine, ps } => self.wait_moved(ctx, &machine, &ps).await,
            Step::RecordPs { machine, ps } => self.record_ps(&machine, &ps).await,
        }
    }

    /// Tells PS `ps` to accept the machine's stream and forward it to the
    /// replication's MT.
    pub(super) async fn add_to_ps(&self, machine: &str, ps: &str) -> Result<(), CsError> {
        let r = self.repl(machine).await?;
        let (mt_addr, mt_name) = self.address(Role::Mt, &r.mt).await?;
        let cmd = Cmd::AddReplication(pb::AddReplication {
            replication_id: r.id.clone(),
            machine_id: machine.to_string(),
            mt_address: mt_addr,
            mt_server_name: mt_name,
        });
        self.send(ComponentKey::ps(ps), cmd).await.map(drop)
    }

    /// Tells the machine's agent to stream its replication through `ps`:
    /// with a resync at protect and reprotect, as the same stream when
    /// `moving` (`rebound move`).
    async fn start_agent(&self, machine: &str, ps: &str, moving: bool) -> Result<(), CsError> {
        let r = self.repl(machine).await?;
        let (ps_address, ps_server_name) = self.address(Role::Ps, ps).await?;
        let cmd = Cmd::StartReplication(pb::StartReplication {
            replication_id: r.id.clone(),
            ps_address,
            ps_server_name,
            resync: !moving,
            policy: Some(convert::policy_to_proto(&r.policy)),
            moving,
        });
        self.send(Self::agent(machine), cmd).await.map(drop)
    }

    async fn create_replication(
        &self,
        ctx: &mut JobCtx,
        spec: &JobSpec,
        machine: &str,
    ) -> Result<(), CsError> {
        let data_key = format!("replication.{machine}");
        if ctx.get::<String>(&data_key).is_some() {
            return Ok(());
        }
        let m = self.machine(machine).await?;
        let (st, current) = self.state_of(machine).await?;
        let now = now_ms();
        let r = match spec {
            JobSpec::Protect {
                to_site,
                ps,
                mt,
                group,
                policy,
                ..
            } => {
                if let (ReplState::InitialSync, Some(r)) = (st, &current) {
                    r.clone() // a retry: keep the replication being synced
                } else {
                    let mut m = m.clone();
                    m.group = group.clone();
                    m.policy = *policy;
                    self.store.put_machine(&m).await?;
                    Replication {
                        id: self.new_replication_id(machine).await?,
                        machine: machine.to_string(),
                        from_site: m.site.clone(),
                        to_site: to_site.clone(),
                        ps: ps.clone(),
                        mt: self.mt_at(to_site, mt).await?,
                        policy: *policy,
                        state: state::next(machine, st, Op::Protect)?,
                        previous: String::new(),
                        failover_point: None,
                        created_ms: now,
                        updated_ms: now,
                    }
                }
            }
            JobSpec::Reprotect { ps, mt, policy, .. } => {
                if let (ReplState::WaitingForAgent, Some(r)) = (st, &current) {
                    let mut r = r.clone();
                    r.ps = ps.clone();
                    r.mt = self.mt_at(&r.to_site, mt).await?;
                    r
                } else {
                    let prev = current.ok_or_else(|| {
                        CsError::FailedPrecondition(format!(
                            "{machine} has no replication to reverse"
                        ))
                    })?;
                    let to = prev.from_site.clone();
                    let policy = policy.map_or(prev.policy, |c| prev.policy.overlay(&c));
                    if policy != m.policy {
                        let mut m = m.clone();
                        m.policy = policy;
                        self.store.put_machine(&m).await?;
                    }
                    Replication {
                        id: self.new_replication_id(machine).await?,
                        machine: machine.to_string(),
                        from_site: m.site.clone(),
                        mt: self.mt_at(&to, mt).await?,
                        to_site: to,
                        ps: ps.clone(),
                        policy,
                        state: state::next(machine, st, Op::Reprotect)?,
                        previous: prev.id.clone(),
                        failover_point: None,
                        created_ms: now,
                        updated_ms: now,
                    }
                }
            }
            _ => {
                return Err(CsError::Internal(format!(
                    "create-replication in a {} job",
                    spec.kind()
                )))
            }
        };
        self.store.put_replication(&r).await?;
        ctx.set(&data_key, &r.id).await
    }

    async fn wait_agent(
        &self,
        ctx: &mut JobCtx,
        spec: &JobSpec,
        machine: &str,
    ) -> Result<(), CsError> {
        let limit = spec.wait_agent().unwrap_or(self.settings.wait_agent);
        let site = self.machine(machine).await?.site;
        let agent = Self::agent(machine);
        let store = self.store.clone();
        let bus = self.bus.clone();
        let m = machine.to_string();
        self.wait_for(
            ctx,
            format!("waiting for agent on {machine} to register (at site {site})"),
            limit,
            || {
                let (store, bus, agent, m) = (store.clone(), bus.clone(), agent.clone(), m.clone());
                async move {
                    let site = store
                        .get_machine(&m)
                        .await?
                        .map(|m| m.site)
                        .unwrap_or_default();
                    Ok(bus
                        .connection(&agent)
                        .filter(|c| c.site == site)
                        .map(|_| ()))
                }
            },
            || {
                format!(
                    "the agent on {machine} did not register within {}: check that the \
                     rebound-agent service runs on {machine} at site {site}, that its config has \
                     this CS's address and site = \"{site}\", and that it is enrolled \
                     (`rebound-agent enroll --cs ADDR --passphrase-file F`); then re-run the \
                     reprotect (it waits again)",
                    human(limit)
                )
            },
        )
        .await?;
        let st = self.repl(machine).await?.state;
        if st == ReplState::WaitingForAgent {
            self.transition(machine, Op::AgentRegistered).await?;
        }
        Ok(())
    }

    async fn wait_first_point(&self, ctx: &mut JobCtx, machine: &str) -> Result<(), CsError> {
        let r = self.repl(machine).await?;
        if r.state == ReplState::Protected {
            return Ok(());
        }
        let deadline = Instant::now() + self.settings.initial_sync_timeout;
        let waiting = format!("initial sync of {machine}: waiting for the first recovery point");
        ctx.status(waiting.clone()).await?;
        let mut stall = StallWatch::default();
        loop {
            if let Some(s) = self.store.get_point_summary(&r.id).await? {
                if s.count > 0 {
                    break;
                }
            }
            let what = match self.resync_progress(machine).await? {
                Some(progress) => format!("initial sync of {machine}: {progress}"),
                None => waiting.clone(),
            };
            let line = stall.line(self.store.as_ref(), ctx.job(), &what).await?;
            ctx.status(line).await?;
            if Instant::now() >= deadline {
                return Err(CsError::Unavailable(stall.explain(format!(
                    "{machine} has no recovery point after {} of initial sync: check `rebound status` \
                     for its agent, PS {} and MT {} and their logs; re-run the command to keep waiting",
                    human(self.settings.initial_sync_timeout),
                    r.ps,
                    r.mt
                ))));
            }
            tokio::time::sleep(self.settings.poll).await;
        }
        self.transition(machine, Op::FirstPoint).await?;
        Ok(())
    }

    /// "40% (400 of 1000 MiB)" from the agent's last status, when resyncing.
    async fn resync_progress(&self, machine: &str) -> Result<Option<String>, CsError> {
        let Some(c) = self.store.get_component(Role::Agent, machine).await? else {
            return Ok(None);
        };
        let Ok(s) = pb::Status::decode(c.status.as_slice()) else {
            return Ok(None);
        };
        Ok(match s.status {
            Some(pb::status::Status::Agent(a)) if a.resync_bytes_total > 0 => Some(format!(
                "{}% ({} of {} MiB resynced)",
                a.resync_bytes_sent * 100 / a.resync_bytes_total,
                a.resync_bytes_sent >> 20,
                a.resync_bytes_total >> 20
            )),
            _ => None,
        })
    }

    /// Waits until the MT has applied everything the source handed over:
    /// after a drain, up to the drained seq; unplanned, up to what the PS
    /// holds (when it can tell).
    async fn catch_up(&self, ctx: &mut JobCtx, machine: &str) -> Result<(), CsError> {
        let r = self.repl(machine).await?;
        let target = match ctx.get::<u64>(&format!("drained.{}", key(machine))) {
            Some(seq) => seq,
            None => match self.ps_durable_seq(&r).await? {
                Some(seq) => seq,
                None => {
                    return ctx
                        .warn(format!(
                            "PS {} is offline, so what it still holds for {machine} is unknown; \
                             failing over to what MT {} has applied",
                            r.ps, r.mt
                        ))
                        .await
                }
            },
        };
        let store = self.store.clone();
        let rid = r.id.clone();
        self.wait_for(
            ctx,
            format!("waiting for MT {} to apply {machine} up to seq {target}", r.mt),
            self.settings.drain_timeout,
            || {
                let (store, rid) = (store.clone(), rid.clone());
                async move {
                    let s = store.get_point_summary(&rid).await?;
                    Ok(s.filter(|s| s.applied_seq >= target).map(|_| ()))
                }
            },
            || {
                format!(
                    "MT {} did not apply {machine} up to seq {target} within {}: check the PS {} → \
                     MT {} link (`rebound status`), or fail over with --point latest-processed to use \
                     what is applied",
                    r.mt,
                    human(self.settings.drain_timeout),
                    r.ps,
                    r.mt
                )
            },
        )
        .await
    }

    /// What the PS holds durably for a replication, from its last status,
    /// when the PS is connected.
    pub(super) async fn ps_durable_seq(&self, r: &Replication) -> Result<Option<u64>, CsError> {
        if self.bus.connection(&ComponentKey::ps(&r.ps)).is_none() {
            return Ok(None);
        }
        let status = super::movement::ps_status(self.store.as_ref(), &r.ps).await?;
        Ok(status.and_then(|(_, s)| super::movement::lag_of(&s, &r.id).map(|l| l.durable_seq)))
    }

    async fn hook(
        &self,
        ctx: &mut JobCtx,
        spec: &JobSpec,
        name: &str,
        label: &str,
    ) -> Result<(), CsError> {
        let dir = &self.settings.hook_dir;
        ctx.status(format!("running {label}: {}", dir.join(name).display()))
            .await?;
        crate::hooks::run(crate::hooks::Run {
            dir,
            name,
            label,
            env: vec![
                ("REBOUND_JOB", ctx.job_id().to_string()),
                ("REBOUND_JOB_KIND", spec.kind().to_string()),
                ("REBOUND_PLAN", spec.plan().to_string()),
                ("REBOUND_MACHINES", spec.machines().join(" ")),
            ],
            timeout: self.settings.hook_timeout,
        })
        .await?;
        Ok(())
    }
}

/// Adds "use --unplanned" to a fence/drain failure.
fn unplanned_hint(e: CsError, machine: &str) -> CsError {
    CsError::Unavailable(format!(
        "{e}. A planned failover needs {machine}'s source agent; if the source site is down, \
         fail over with --unplanned"
    ))
}

/// "30m", "90s", "2h".
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m) = (s / 3600, s / 60);
    if h > 0 && h * 3600 == s {
        format!("{h}h")
    } else if m > 0 && m * 60 == s {
        format!("{m}m")
    } else if s > 0 {
        format!("{s}s")
    } else {
        format!("{}ms", d.as_millis())
    }
}
