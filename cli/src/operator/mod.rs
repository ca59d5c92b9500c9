//! The operator subcommands of `rebound` (DESIGN.md §9) over the
//! configuration server's `Admin` service, with the admin certificate.
//!
//! Where the CS is and which certificate to use: `--cs ADDR` (env
//! `REBOUND_CS`, default `127.0.0.1:7443`) and `--certs DIR` (env
//! `REBOUND_CERTS`, default `~/.config/rebound`) holding `ca.pem`,
//! `admin.pem` and `admin.key` as `rebound-cs init` wrote them.

mod client;
mod dr;
mod enroll;
mod fleet;
mod json;
mod parse;
mod print;
mod revoke;
mod token;
mod watch;

pub use client::{connect, CsArgs};
pub use fleet::{FleetCmd, PolicyArgs, PolicyCmd, PolicySet};
pub use parse::{parse_duration, parse_point};

use anyhow::{bail, Result};
use clap::{Subcommand, ValueEnum};
use rebound_proto::control as pb;

/// How listings are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// One JSON document, for scripts.
    Json,
}

/// Machines or a plan (exactly one).
#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    /// Machine ids.
    #[arg(required_unless_present = "plan", conflicts_with = "plan")]
    pub machines: Vec<String>,
    /// A recovery plan instead of machines (`rebound plan create`).
    #[arg(long)]
    pub plan: Option<String>,
}

impl TargetArgs {
    fn to_proto(&self) -> pb::Targets {
        pb::Targets {
            machines: self.machines.clone(),
            plan: self.plan.clone().unwrap_or_default(),
        }
    }
}

/// Where the CS is, and how a lifecycle command reports its job.
#[derive(clap::Args, Debug, Clone)]
pub struct WaitArgs {
    #[command(flatten)]
    pub cs: CsArgs,
    /// Follow the job until it ends (progress bar on a terminal, plain
    /// lines otherwise); exit non-zero when it fails.
    #[arg(long)]
    pub wait: bool,
    /// Output format of the job (json prints the job document).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Where the CS is, and how its answer is printed.
#[derive(clap::Args, Debug, Clone)]
pub struct ShowArgs {
    #[command(flatten)]
    pub cs: CsArgs,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl ShowArgs {
    /// Prints an answer as JSON (`to_json`) or as a table (`table`).
    fn show<T>(
        &self,
        r: &T,
        to_json: impl FnOnce(&T) -> serde_json::Value,
        table: impl FnOnce(&T),
    ) -> Result<()> {
        match self.output {
            Output::Json => json::print(&to_json(r)),
            Output::Table => table(r),
        }
        Ok(())
    }
}

/// A plan or group by name, where the CS is, and how its answer is printed.
#[derive(clap::Args, Debug, Clone)]
pub struct NamedShowArgs {
    pub name: String,
    #[command(flatten)]
    pub args: ShowArgs,
}

/// The plan or group to delete, and where the CS is.
#[derive(clap::Args, Debug, Clone)]
pub struct DeleteArgs {
    pub name: String,
    #[command(flatten)]
    pub cs: CsArgs,
}

impl DeleteArgs {
    /// Reports the answer `r` to deleting the `what` (plan, group).
    fn deleted(
        &self,
        what: &str,
        r: Result<tonic::Response<pb::Empty>, tonic::Status>,
    ) -> Result<()> {
        let name = &self.name;
        r.map_err(|e| self.cs.error(e, &format!("deleting {what} {name}")))?;
        println!("{what} {name} deleted");
        Ok(())
    }
}

#[derive(Subcommand, Debug)]
pub enum OperatorCmd {
    /// Health of the deployment: sites, components (online/offline, agent
    /// mode, buffer, RPO), machine counts, running jobs and recent warnings.
    Status {
        #[command(flatten)]
        args: ShowArgs,
    },
    /// Every machine at a glance: where it runs, replication state and
    /// direction, RPO, last recovery point, agent health, running job.
    Machines {
        #[command(flatten)]
        args: ShowArgs,
    },
    /// Start protecting a machine: replicate it from the site it runs at to
    /// SITE through process server PS (at its site; without --ps the
    /// least-loaded online one) and master target MT (at SITE). The job runs
    /// the initial sync and ends when the first recovery point exists.
    Protect {
        /// Machine id (its agent must have registered: see `rebound machines`).
        machine: String,
        /// Target site.
        #[arg(long = "to")]
        to_site: String,
        /// Process server id at the machine's site (default: the online PS
        /// there carrying the fewest replications; the job names it).
        #[arg(long)]
        ps: Option<String>,
        /// Master target id at the target site.
        #[arg(long)]
        mt: String,
        /// Consistency group to join (`rebound group create`).
        #[arg(long)]
        group: Option<String>,
        /// Crash-consistent point interval, e.g. 5s (default: the CS policy).
        #[arg(long, value_parser = parse_duration)]
        crash_interval: Option<std::time::Duration>,
        /// App-consistent point interval, e.g. 1h (default: the CS policy).
        #[arg(long, value_parser = parse_duration)]
        app_interval: Option<std::time::Duration>,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Fail machines (or a plan) over to the other site at a recovery point.
    /// Planned (default): the source is fenced and drained first, so nothing
    /// is lost at `latest`. `--unplanned`: the source is gone; use what the
    /// master target has applied.
    #[command(after_help = POINT_HELP)]
    Failover {
        #[command(flatten)]
        targets: TargetArgs,
        /// The site the machines run at now (must match the replication).
        #[arg(long = "from")]
        from_site: String,
        /// The site to fail over to (must match the replication).
        #[arg(long = "to")]
        to_site: String,
        /// Recovery point: latest, latest-processed, latest-app,
        /// latest-multi, latest-multi-app, a point id, or a time.
        #[arg(long, default_value = "latest")]
        point: String,
        /// The source site is down: skip fence and drain.
        #[arg(long)]
        unplanned: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Before commit: move a failed-over machine to another recovery point.
    #[command(after_help = POINT_HELP)]
    ChangePoint {
        machine: String,
        /// The new recovery point (same choices as failover).
        #[arg(long)]
        point: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Commit a failover: ends the old replication and removes (or keeps)
    /// the source copy. After this, `rebound reprotect`.
    Commit {
        #[command(flatten)]
        targets: TargetArgs,
        /// Keep the copy at the old source site for a faster reprotect.
        #[arg(long, conflicts_with = "remove_source_copy")]
        keep_source_copy: bool,
        /// Remove the copy at the old source site.
        #[arg(long)]
        remove_source_copy: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Protect committed machines in the reverse direction. Waits for each
    /// machine's agent to register from its new site, then runs a
    /// differential resync by block hashes and streams changes.
    Reprotect {
        #[command(flatten)]
        targets: TargetArgs,
        /// Process server at the site the machines run at now (default: the
        /// online PS there carrying the fewest replications).
        #[arg(long)]
        ps: Option<String>,
        /// Master target at the site they left (default: that site's MT).
        #[arg(long)]
        mt: Option<String>,
        /// How long to wait for the agent to register, e.g. 30m, 90s (default:
        /// the CS setting, 30 min).
        #[arg(long, value_parser = parse_duration)]
        wait_agent: Option<std::time::Duration>,
        /// The new replication's retention and RPO alert (default: those of
        /// the replication it reverses).
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// List jobs (newest first), show one with its steps, or follow them
    /// live with --watch.
    Jobs {
        /// A job id: show it with its steps.
        id: Option<String>,
        /// Follow live: the job given, or every running job.
        #[arg(long)]
        watch: bool,
        /// Only jobs that have not finished.
        #[arg(long)]
        active: bool,
        /// Only jobs of this machine.
        #[arg(long)]
        machine: Option<String>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        args: ShowArgs,
    },
    /// Recovery plans: named, ordered groups of machines failed over,
    /// committed and reprotected together.
    Plan {
        #[command(subcommand)]
        cmd: PlanCmd,
    },
    /// Consistency groups: machines whose recovery points are cut together
    /// (two-phase barrier), for `--point latest-multi`.
    Group {
        #[command(subcommand)]
        cmd: GroupCmd,
    },
    #[command(flatten)]
    Dr(dr::DrCmd),
    #[command(flatten)]
    Fleet(FleetCmd),
    /// Revoke a component's certificates: `rebound revoke ps:ps-onprem`.
    /// The CS, every PS and MT refuse it within seconds, also on open
    /// streams; to let it back, create a token and enroll it again.
    Revoke(revoke::RevokeArgs),
    /// One-time enrollment tokens: `rebound token create --role ps --id
    /// ps1 --ttl 1h` (a PS, MT, operator or re-enrolling agent needs one).
    Token {
        #[command(subcommand)]
        cmd: token::TokenCmd,
    },
    /// This operator's own admin certificate from a token (`rebound token
    /// create --role admin --id NAME`), into ~/.config/rebound.
    Enroll(enroll::EnrollArgs),
}

const POINT_HELP: &str = "Recovery points (--point):
  latest            drain everything pending, then the newest point (lowest RPO)
  latest-processed  the newest point already applied (lowest RTO)
  latest-app        the newest app-consistent point; later writes are LOST
  latest-multi      plans/groups: the newest group point every member has
  latest-multi-app  the same, app-consistent group points only
  <point id>        that point (`rebound points M` lists them)
  <time>            the newest point at or before it: 2026-11-26T12:00:00Z,
                    a Unix time in ms, or an age like 10m (ten minutes ago)
  group:<tag>       the point of this consistency-group tag";

#[derive(Subcommand, Debug)]
pub enum PlanCmd {
    /// Create (or replace) a plan. Each --group is one ordered step of
    /// machines; hooks run on the CS host before/after that step. A hook is
    /// the name of an executable installed in the CS's hook directory
    /// (`hook_dir`, default /etc/rebound/hooks), never a command line.
    #[command(
        after_help = "Example:\n  rebound plan create erp --group db1,db2 --group app1 \
                            --consistency-group erp-cg\n  \
                            rebound plan create web --group w1 --pre-hook start-app --post-hook ''"
    )]
    Create {
        name: String,
        /// Comma-separated machines of one step (repeat, in order).
        #[arg(long = "group", required = true)]
        groups: Vec<String>,
        /// Hook before each step, in step order ('' for none): the name of
        /// an executable in the CS's hook directory.
        #[arg(long = "pre-hook")]
        pre_hooks: Vec<String>,
        /// Hook after each step, in step order ('' for none).
        #[arg(long = "post-hook")]
        post_hooks: Vec<String>,
        /// Consistency group the plan's machines share (for latest-multi).
        #[arg(long)]
        consistency_group: Option<String>,
        #[command(flatten)]
        args: ShowArgs,
    },
    /// Show one plan.
    Show(NamedShowArgs),
    /// List the plans.
    List(ShowArgs),
    /// Delete a plan (the machines stay as they are).
    Delete(DeleteArgs),
}

#[derive(Subcommand, Debug)]
pub enum GroupCmd {
    /// Create (or replace) a consistency group.
    Create {
        name: String,
        /// Comma-separated member machines.
        #[arg(long, required = true, value_delimiter = ',')]
        machines: Vec<String>,
        /// Longest time members hold writes during a barrier, in ms (default 100).
        #[arg(long, default_value_t = 100)]
        hold_ms: u32,
        /// Cut a group point this often, e.g. 30s (default: only on demand,
        /// `rebound group cut`).
        #[arg(long, value_parser = parse_duration)]
        interval: Option<std::time::Duration>,
        /// Cut group points as app-consistent (freeze/thaw on every member).
        #[arg(long)]
        app: bool,
        #[command(flatten)]
        args: ShowArgs,
    },
    /// Delete a consistency group.
    Delete(DeleteArgs),
    /// List the consistency groups.
    List(ShowArgs),
    /// Cut one group point now (a two-phase barrier across the members).
    Cut(NamedShowArgs),
}

/// Runs one operator subcommand; on error prints it (with its causes, no
/// backtrace) and exits with status 1.
pub async fn run(cmd: OperatorCmd) -> Result<()> {
    if let Err(e) = run_inner(cmd).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

async fn run_inner(cmd: OperatorCmd) -> Result<()> {
    match cmd {
        OperatorCmd::Status { args } => {
            let mut c = connect(&args.cs).await?;
            let r = args
                .cs
                .answer(c.status(pb::StatusRequest {}).await, "reading the status")?;
            args.show(&r, json::status, print::status)
        }
        OperatorCmd::Machines { args } => {
            let mut c = connect(&args.cs).await?;
            let r = args.cs.answer(
                c.machines(pb::MachinesRequest {}).await,
                "listing the machines",
            )?;
            args.show(&r, json::machines, print::machines)
        }
        OperatorCmd::Protect {
            machine,
            to_site,
            ps,
            mt,
            group,
            crash_interval,
            app_interval,
            policy,
            wait,
        } => {
            let mut c = connect(&wait.cs).await?;
            let policy = fleet::policy(crash_interval, app_interval, &policy);
            let r = c
                .protect(pb::ProtectRequest {
                    machine: machine.clone(),
                    to_site,
                    ps: ps.unwrap_or_default(),
                    mt,
                    group: group.unwrap_or_default(),
                    policy,
                })
                .await;
            watch::started(&mut c, &wait, r, &format!("protecting {machine}")).await
        }
        OperatorCmd::Failover {
            targets,
            from_site,
            to_site,
            point,
            unplanned,
            wait,
        } => {
            let choice = chosen_point(&point)?;
            let mut c = connect(&wait.cs).await?;
            let r = c
                .failover(pb::FailoverRequest {
                    targets: Some(targets.to_proto()),
                    from_site: from_site.clone(),
                    to_site: to_site.clone(),
                    point: Some(choice),
                    unplanned,
                })
                .await;
            watch::started(
                &mut c,
                &wait,
                r,
                &format!("failing over {from_site} → {to_site}"),
            )
            .await
        }
        OperatorCmd::ChangePoint {
            machine,
            point,
            wait,
        } => {
            let choice = chosen_point(&point)?;
            let mut c = connect(&wait.cs).await?;
            let r = c
                .change_point(pb::ChangePointRequest {
                    machine: machine.clone(),
                    point: Some(choice),
                })
                .await;
            watch::started(
                &mut c,
                &wait,
                r,
                &format!("changing the point of {machine}"),
            )
            .await
        }
        OperatorCmd::Commit {
            targets,
            keep_source_copy,
            remove_source_copy,
            wait,
        } => {
            let keep = if keep_source_copy {
                Some(true)
            } else if remove_source_copy {
                Some(false)
            } else {
                None
            };
            let mut c = connect(&wait.cs).await?;
            let r = c
                .commit(pb::CommitRequest {
                    targets: Some(targets.to_proto()),
                    keep_source_copy: keep,
                })
                .await;
            watch::started(&mut c, &wait, r, "committing").await
        }
        OperatorCmd::Reprotect {
            targets,
            ps,
            mt,
            wait_agent,
            policy,
            wait,
        } => {
            let mut c = connect(&wait.cs).await?;
            let r = c
                .reprotect(pb::ReprotectRequest {
                    targets: Some(targets.to_proto()),
                    ps: ps.unwrap_or_default(),
                    mt: mt.unwrap_or_default(),
                    wait_agent_secs: wait_agent.map(|d| d.as_secs().max(1)).unwrap_or(0),
                    policy: fleet::policy(None, None, &policy),
                })
                .await;
            watch::started(&mut c, &wait, r, "reprotecting").await
        }
        OperatorCmd::Jobs {
            id,
            watch: follow,
            active,
            machine,
            limit,
            args,
        } => {
            let mut c = connect(&args.cs).await?;
            match (id, follow) {
                (Some(id), true) => watch::follow(&mut c, &args.cs, &id, args.output).await,
                (Some(id), false) => {
                    let j = args.cs.answer(
                        c.get_job(pb::GetJobRequest { id: id.clone() }).await,
                        &format!("reading job {id}"),
                    )?;
                    args.show(&j, json::job, print::job_detail)
                }
                (None, true) => watch::follow_all(&mut c, &args.cs, machine).await,
                (None, false) => {
                    let r = args.cs.answer(
                        c.list_jobs(pb::ListJobsRequest {
                            active_only: active,
                            limit,
                            machine: machine.unwrap_or_default(),
                        })
                        .await,
                        "listing the jobs",
                    )?;
                    let to_json = |r: &pb::ListJobsResponse| json::list("jobs", &r.jobs, json::job);
                    args.show(&r, to_json, |r| print::jobs(&r.jobs))
                }
            }
        }
        OperatorCmd::Plan { cmd } => plan(cmd).await,
        OperatorCmd::Group { cmd } => group(cmd).await,
        OperatorCmd::Dr(cmd) => dr::run(cmd).await,
        OperatorCmd::Fleet(cmd) => fleet::run(cmd).await,
        OperatorCmd::Revoke(args) => revoke::run(args).await,
        OperatorCmd::Token { cmd } => token::run(cmd).await,
        OperatorCmd::Enroll(args) => enroll::run(args).await,
    }
}

/// The recovery point `--point` names; warns first when it loses writes.
fn chosen_point(point: &str) -> Result<pb::PointChoice> {
    let choice = parse_point(point)?;
    let p = point.trim().to_ascii_lowercase();
    if p == "latest-app" || p == "latest-multi-app" {
        eprintln!(
            "warning: --point {p} rolls back to the newest app-consistent point: every write \
             after it is lost on the recovered machine (use --point latest to keep them)"
        );
    }
    Ok(choice)
}

async fn plan(cmd: PlanCmd) -> Result<()> {
    match cmd {
        PlanCmd::Create {
            name,
            groups,
            pre_hooks,
            post_hooks,
            consistency_group,
            args,
        } => {
            let steps = plan_steps(&groups);
            if pre_hooks.len() > steps.len() || post_hooks.len() > steps.len() {
                bail!(
                    "more --pre-hook/--post-hook than --group steps ({}): give one hook per \
                     step, in order, '' for none",
                    steps.len()
                );
            }
            let plan = pb::Plan {
                name: name.clone(),
                groups: steps
                    .into_iter()
                    .enumerate()
                    .map(|(i, machines)| pb::PlanGroup {
                        machines,
                        pre_hook: pre_hooks.get(i).cloned().unwrap_or_default(),
                        post_hook: post_hooks.get(i).cloned().unwrap_or_default(),
                    })
                    .collect(),
                consistency_group: consistency_group.unwrap_or_default(),
            };
            let mut c = connect(&args.cs).await?;
            let p = args.cs.answer(
                c.create_plan(pb::CreatePlanRequest { plan: Some(plan) })
                    .await,
                &format!("creating plan {name}"),
            )?;
            args.show(&p, json::plan, |p| {
                println!("plan {} created", p.name);
                print::plan(p);
            })
        }
        PlanCmd::Show(NamedShowArgs { name, args }) => {
            let mut c = connect(&args.cs).await?;
            let p = args.cs.answer(
                c.show_plan(pb::PlanRequest { name: name.clone() }).await,
                &format!("reading plan {name}"),
            )?;
            args.show(&p, json::plan, print::plan)
        }
        PlanCmd::List(args) => {
            let mut c = connect(&args.cs).await?;
            let r = args.cs.answer(
                c.list_plans(pb::ListPlansRequest {}).await,
                "listing the plans",
            )?;
            let to_json = |r: &pb::ListPlansResponse| json::list("plans", &r.plans, json::plan);
            args.show(&r, to_json, |r| {
                if r.plans.is_empty() {
                    println!("no plans (create one with `rebound plan create`)");
                }
                for p in &r.plans {
                    print::plan(p);
                }
            })
        }
        PlanCmd::Delete(d) => {
            let mut c = connect(&d.cs).await?;
            let r = c.delete_plan(pb::PlanRequest {
                name: d.name.clone(),
            });
            d.deleted("plan", r.await)
        }
    }
}

/// The machines of each `--group a,b` occurrence, in order.
fn plan_steps(groups: &[String]) -> Vec<Vec<String>> {
    groups
        .iter()
        .map(|g| {
            g.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|g| !g.is_empty())
        .collect()
}

async fn group(cmd: GroupCmd) -> Result<()> {
    match cmd {
        GroupCmd::Create {
            name,
            machines,
            hold_ms,
            interval,
            app,
            args,
        } => {
            let mut c = connect(&args.cs).await?;
            let g = args.cs.answer(
                c.create_group(pb::CreateGroupRequest {
                    group: Some(pb::Group {
                        name: name.clone(),
                        machines,
                        hold_ms,
                        interval_secs: interval.map(|d| d.as_secs().max(1) as u32).unwrap_or(0),
                        app,
                    }),
                })
                .await,
                &format!("creating group {name}"),
            )?;
            args.show(&g, json::group, |g| {
                println!("group {} created", g.name);
                print::groups(std::slice::from_ref(g));
            })
        }
        GroupCmd::Delete(d) => {
            let mut c = connect(&d.cs).await?;
            let r = c.delete_group(pb::GroupRequest {
                name: d.name.clone(),
            });
            d.deleted("group", r.await)
        }
        GroupCmd::List(args) => {
            let mut c = connect(&args.cs).await?;
            let r = args.cs.answer(
                c.list_groups(pb::ListGroupsRequest {}).await,
                "listing the groups",
            )?;
            let to_json = |r: &pb::ListGroupsResponse| json::list("groups", &r.groups, json::group);
            args.show(&r, to_json, |r| print::groups(&r.groups))
        }
        GroupCmd::Cut(NamedShowArgs { name, args }) => {
            let mut c = connect(&args.cs).await?;
            let r = args.cs.answer(
                c.cut_group_point(pb::GroupRequest { name: name.clone() })
                    .await,
                &format!("cutting a point of group {name}"),
            )?;
            let to_json = |r: &pb::CutGroupPointResponse| serde_json::json!({"tag_id": r.tag_id, "members": r.members});
            args.show(&r, to_json, |r| {
                println!(
                    "group {name}: point {} cut on {} members",
                    r.tag_id, r.members
                )
            })
        }
    }
}

/// `rebound points M`: from the CS when `--cs` (or `REBOUND_CS`) is given
/// and `--mt` is not; otherwise straight from the master target.
pub async fn points_via_cs(machine: &str, cs: &CsArgs, output: Output) -> Result<()> {
    let args = ShowArgs {
        cs: cs.clone(),
        output,
    };
    if let Err(e) = points_inner(machine, &args).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

async fn points_inner(machine: &str, args: &ShowArgs) -> Result<()> {
    let mut c = connect(&args.cs).await?;
    let r = args.cs.answer(
        c.points(pb::PointsRequest {
            machine: machine.into(),
        })
        .await,
        &format!("listing the recovery points of {machine}"),
    )?;
    args.show(&r, json::points, print::points)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The operator subcommands as a whole command line (for parse tests).
    #[derive(Parser)]
    pub(crate) struct T {
        #[command(subcommand)]
        pub(crate) cmd: OperatorCmd,
    }

    #[test]
    fn plan_steps_keep_each_group_apart() {
        let steps = plan_steps(&["db1, db2".into(), "app1".into(), ",".into()]);
        assert_eq!(
            steps,
            vec![
                vec!["db1".to_string(), "db2".into()],
                vec!["app1".to_string()]
            ]
        );
    }

    #[test]
    fn targets_are_machines_or_a_plan() {
        let t = T::try_parse_from(["t", "commit", "m1", "m2"]).unwrap();
        assert!(
            matches!(t.cmd, OperatorCmd::Commit { ref targets, .. } if targets.machines.len() == 2)
        );
        let t = T::try_parse_from(["t", "commit", "--plan", "p"]).unwrap();
        assert!(
            matches!(t.cmd, OperatorCmd::Commit { ref targets, .. } if targets.plan.as_deref() == Some("p"))
        );
        assert!(T::try_parse_from(["t", "commit"]).is_err());
        assert!(T::try_parse_from(["t", "commit", "m1", "--plan", "p"]).is_err());
        let t = T::try_parse_from(["t", "reprotect", "m1", "--ps", "ps-b", "--wait-agent", "2m"])
            .unwrap();
        assert!(matches!(
            t.cmd,
            OperatorCmd::Reprotect { wait_agent: Some(d), .. } if d.as_secs() == 120
        ));
        let t = T::try_parse_from(["t", "protect", "m1", "--to", "b", "--mt", "mt-b"]).unwrap();
        assert!(matches!(t.cmd, OperatorCmd::Protect { ps: None, .. }));
        let t = T::try_parse_from(["t", "reprotect", "m1"]).unwrap();
        assert!(matches!(t.cmd, OperatorCmd::Reprotect { ps: None, .. }));
    }
}
