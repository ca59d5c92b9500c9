//! The RTO section's planned failover at `latest`, run as the real failover
//! job of the configuration server, timed from the command to the
//! MT's power_on hook and split by the job's own step records.
//!
//! The lab is a [`rebound_lab::Sites`] of child processes: a CS, a PS and an
//! MT per site (`onprem`, `azure`) and the machine's agent, on loopback with
//! mutual TLS, every component enrolled with the CS's passphrase, and an MT
//! `[hooks] power_on` that records when it ran and boots the machine at the
//! target (a `rebound-agent` over the handed-over replica). The CS keeps its
//! default heartbeat (2 s): the catch-up step waits for the MT's status
//! report, so the drain is what a default setup sees. The machine is
//! protected onprem→azure, the bench's churn writer writes text-like data to
//! the agent's NBD export, and while it writes the failover is asked through
//! the Admin API's `Failover` RPC — the one `rebound failover --point
//! latest` sends, with the admin certificate. Its split, from the CS's step
//! times (`JobStep::started_ms`, `ended_ms`, same clock as the hook's
//! `date +%s%3N`):
//!
//! - drain: command → end of the step before "choose recovery points"
//!   (begin failover, fence, drain to the PS, MT applied everything);
//! - rollback: → end of the "roll … back" step (choose points, MT rollback);
//! - hand-over: → the power_on hook ran (MT hand-over, hook start).
//!
//! After the hand-over the replica must equal the source disk as the fence
//! left it (blake3): a failover at `latest` that loses writes is an error,
//! not a figure. Every wait is bounded (jobs 120 s, states 90 s, the hook
//! 90 s).

use anyhow::{anyhow, bail, Context, Result};
use rebound_common::time::now_ms;
use rebound_lab::{blake3_file, mt_id, ps_id, wait_until, CsAdmin, Sites, SitesOptions};
use rebound_proto::control as pb;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;

use crate::profiles::Profile;
use crate::rto::FailoverTimes;
use crate::writer::{Writer, WriterSpec};
use crate::{mb, Bench};

const FROM: &str = "onprem";
const TO: &str = "azure";
const MACHINE: &str = "m1";
const DISK: &str = "disk0";
/// How long a job and a machine state change may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);
const STATE_TIMEOUT: Duration = Duration::from_secs(90);

/// The failover job's figures beside the split.
pub struct JobFailover {
    pub times: FailoverTimes,
    /// Command → power_on hook.
    pub total: Duration,
    /// The last step of the drain (MT applied everything: it waits for the
    /// MT's periodic status report).
    pub catch_up: Duration,
    /// The CS's heartbeat (status report period), seconds.
    pub heartbeat_secs: f64,
    /// Agent-reported RPO (ms) just before the command.
    pub rpo_ms: u64,
    /// Churn rate achieved before the command (bytes/s).
    pub churn_rate: f64,
    /// For the JSON document: steps, raw times, how the churn ended.
    pub detail: Value,
}

/// What the section calls: builds the lab, runs the failover; the lab's
/// processes end with it (the CS last).
pub fn planned_failover_latest(b: &Bench) -> Result<JobFailover> {
    let dir = b.dir.join("failover");
    let _ = std::fs::remove_dir_all(&dir);
    b.progress(&format!(
        "rto: configuration server, PS + MT at {FROM} and at {TO}, agent of {MACHINE} (child processes)"
    ));
    let opts = SitesOptions {
        sites: vec![FROM.into(), TO.into()],
        ps_per_site: 1,
        machines: vec![MACHINE.into()],
        disks: vec![(DISK.into(), b.plan.failover_disk)],
        crash_interval_ms: 1000,
        // The CS's default, not a test's short one: the catch-up part of
        // the drain waits for the MT's next status report.
        heartbeat_secs: rebound_cs::Config::default().heartbeat_secs,
        metrics: true,
        ..SitesOptions::default()
    };
    let r = Sites::cs_in_dir(&dir, opts)
        .context("starting the configuration server")
        .and_then(|mut lab| run(b, &mut lab));
    b.clean_section(&dir);
    r
}

fn run(b: &Bench, lab: &mut Sites) -> Result<JobFailover> {
    let p = b.plan.clone();
    let rt = b.rt.clone();
    lab.start_site(FROM).context("starting the source site")?;
    lab.start_site(TO).context("starting the target site")?;
    lab.add_machine(MACHINE).context("adding the machine")?;
    let mut admin = bounded(&rt, "connecting to the CS", 30, CsAdmin::connect(lab))?;
    b.progress(&format!(
        "rto: protect {MACHINE} {FROM} → {TO} ({} MiB disk, initial sync)",
        p.failover_disk >> 20
    ));
    bounded(&rt, "protecting the machine", 240, protect(&mut admin))?;

    b.progress(&format!(
        "rto: {:.0} MB/s of text-like churn for {:.0} s, then `failover --point latest` through the CS",
        mb(p.rto_rate),
        p.failover_churn_secs
    ));
    let w = Writer::start(WriterSpec {
        addr: lab.agent_addr(MACHINE, FROM)?,
        export: DISK.into(),
        write_size: p.write_size,
        conns: p.writer_conns,
        rate: p.rto_rate as u64,
        pool: Arc::new(Profile::Text.pool(p.pool_bytes)),
        seed: 61,
    })?;
    std::thread::sleep(Duration::from_secs_f64(p.failover_churn_secs));
    if !w.running() {
        let e = w.stop().err().map(|e| format!("{e:#}")).unwrap_or_default();
        bail!("the churn writer stopped before the failover command: {e}");
    }
    let churned = w.bytes();
    let rpo_ms = bounded(&rt, "reading the machine", 30, admin.machine(MACHINE))?.rpo_ms;

    let powered_file = powered_on_file(lab);
    let _ = std::fs::remove_file(&powered_file);
    let asked = now_ms();
    let job = bounded(&rt, "the failover job", 180, failover(&mut admin));
    let powered = job
        .as_ref()
        .ok()
        .map(|_| wait_powered_on(&powered_file, Duration::from_secs(90)));
    // The fence refuses the writer's next write; stop it either way.
    let until_fence = w.bytes() - churned;
    let churn_end = match w.stop() {
        Ok(_) => "stopped by the bench after the failover".to_string(),
        Err(e) => format!("ended by the fence: {e:#}"),
    };
    let job = job?;
    let powered = powered.ok_or_else(|| anyhow!("no power-on after the job"))??;

    let m = bounded(
        &rt,
        "waiting for FailedOver",
        120,
        admin.wait_state(MACHINE, "FailedOver", STATE_TIMEOUT),
    )?;
    let point = m.failover_point.map(|p| p.id).unwrap_or_default();
    let replica = lab.replica_path(TO, &m.replication_id, DISK);
    let source = lab.source_disk(MACHINE, DISK);
    let (want, got) = (blake3_file(&source)?, blake3_file(&replica)?);
    if want != got {
        bail!(
            "after the failover at latest the replica at {TO} has blake3 {got}, the fenced source {want}: writes were lost"
        );
    }

    let s = split(&job, asked, powered)?;
    let times = FailoverTimes {
        point,
        drain: s.drain,
        rollback: s.rollback,
        rollback_blocks: None,
        hand_over: Some(s.hand_over),
    };
    let steps: Vec<Value> = job
        .steps
        .iter()
        .map(|st| {
            json!({
                "name": st.name, "state": st.state,
                "ms": st.ended_ms.saturating_sub(st.started_ms),
                "from_command_ms": st.started_ms.saturating_sub(asked),
            })
        })
        .collect();
    Ok(JobFailover {
        total: Duration::from_millis(powered.saturating_sub(asked)),
        catch_up: s.catch_up,
        heartbeat_secs: lab_heartbeat(lab),
        rpo_ms,
        churn_rate: churned as f64 / p.failover_churn_secs,
        detail: json!({
            "lab": "CS + PS/MT per site + agent, child processes (rebound-lab Sites)",
            "job": job.id, "steps": steps,
            "command_ms": asked, "power_on_ms": powered,
            "rpo_ms_at_command": rpo_ms,
            "churn_bytes_before_command": churned,
            "churn_bytes_after_command": until_fence,
            "churn_end": churn_end,
            "replica_blake3": got,
        }),
        times,
    })
}

/// Runs `fut` on the runtime, at most `secs` seconds (Admin calls have no
/// deadline of their own).
fn bounded<T>(
    rt: &Handle,
    what: &str,
    secs: u64,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    rt.block_on(tokio::time::timeout(Duration::from_secs(secs), fut))
        .map_err(|_| anyhow!("{what}: no answer within {secs} s"))?
        .with_context(|| what.to_string())
}

/// The heartbeat the lab's CS runs with (its config file), 0 if unreadable.
fn lab_heartbeat(lab: &Sites) -> f64 {
    rebound_lab::config::read_toml::<rebound_cs::Config>(&lab.cs_dir.join("config.toml"))
        .map(|c| c.heartbeat_secs)
        .unwrap_or(0.0)
}

/// Where the power_on hook at the target writes when it ran (ms since the
/// epoch, `date +%s%3N`).
fn powered_on_file(lab: &Sites) -> PathBuf {
    lab.path(&format!("agents/{MACHINE}@{TO}/powered_on_ms"))
}

/// Waits until the power_on hook ran at the target; when it ran.
fn wait_powered_on(file: &std::path::Path, timeout: Duration) -> Result<u64> {
    wait_until("the power_on hook at the target", timeout, || file.exists())?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{} holds {text:?}, not a time in ms", file.display()))
}

async fn protect(cs: &mut CsAdmin) -> Result<()> {
    let r = cs
        .admin
        .protect(pb::ProtectRequest {
            machine: MACHINE.into(),
            to_site: TO.into(),
            ps: ps_id(FROM),
            mt: mt_id(TO),
            group: String::new(),
            policy: None,
        })
        .await
        .context("Admin.Protect")?
        .into_inner();
    cs.finish(r.job, JOB_TIMEOUT).await?;
    cs.wait_state(MACHINE, "Protected", STATE_TIMEOUT).await?;
    Ok(())
}

/// The Admin `Failover` RPC as `rebound failover --point latest` sends it,
/// followed to the job's end.
async fn failover(cs: &mut CsAdmin) -> Result<pb::Job> {
    let r = cs
        .admin
        .failover(pb::FailoverRequest {
            targets: Some(pb::Targets {
                machines: vec![MACHINE.into()],
                plan: String::new(),
            }),
            from_site: FROM.into(),
            to_site: TO.into(),
            point: Some(pb::PointChoice {
                choice: Some(pb::point_choice::Choice::Latest(pb::Empty {})),
            }),
            unplanned: false,
        })
        .await
        .context("Admin.Failover")?
        .into_inner();
    cs.finish(r.job, JOB_TIMEOUT).await
}

#[derive(Debug, PartialEq)]
struct Split {
    drain: Duration,
    catch_up: Duration,
    rollback: Duration,
    hand_over: Duration,
}

/// Splits command → power-on by the job's step records (ms since the
/// epoch): the three parts add up to the whole.
fn split(job: &pb::Job, asked: u64, powered: u64) -> Result<Split> {
    let names = || {
        job.steps
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let choose = job
        .steps
        .iter()
        .position(|s| s.name == "choose recovery points")
        .filter(|&i| i > 0)
        .ok_or_else(|| {
            anyhow!(
                "no drain before \"choose recovery points\" in [{}]",
                names()
            )
        })?;
    let last = &job.steps[choose - 1];
    let drained = last.ended_ms;
    let rolled = job
        .steps
        .iter()
        .find(|s| s.name.starts_with("roll "))
        .map(|s| s.ended_ms)
        .ok_or_else(|| anyhow!("no rollback step in [{}]", names()))?;
    if !job.steps.iter().any(|s| s.name.starts_with("hand ")) {
        bail!("no hand-over step in [{}]", names());
    }
    if !(asked <= drained && drained <= rolled && rolled <= powered) {
        bail!(
            "step times out of order: command {asked}, drained {drained}, rolled back {rolled}, power-on {powered} (ms)"
        );
    }
    let ms = Duration::from_millis;
    Ok(Split {
        drain: ms(drained - asked),
        catch_up: ms(drained.saturating_sub(last.started_ms)),
        rollback: ms(rolled - drained),
        hand_over: ms(powered - rolled),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, started_ms: u64, ended_ms: u64) -> pb::JobStep {
        pb::JobStep {
            name: name.into(),
            state: "done".into(),
            started_ms,
            ended_ms,
            ..Default::default()
        }
    }

    fn job() -> pb::Job {
        pb::Job {
            steps: vec![
                step("begin failover", 1010, 1020),
                step("fence m1 at the source", 1020, 1100),
                step("drain m1", 1100, 1500),
                step("apply everything pending for m1", 1500, 2000),
                step("choose recovery points", 2010, 2020),
                step("roll m1 back to its recovery point", 2020, 2300),
                step("hand m1 over (power on)", 2300, 2600),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn split_adds_up_to_command_to_power_on() {
        let s = split(&job(), 1000, 2450).unwrap();
        assert_eq!(
            s,
            Split {
                drain: Duration::from_millis(1000),
                catch_up: Duration::from_millis(500),
                rollback: Duration::from_millis(300),
                hand_over: Duration::from_millis(150),
            }
        );
    }

    #[test]
    fn split_rejects_missing_steps_and_disordered_times() {
        let mut j = job();
        j.steps.retain(|s| !s.name.starts_with("hand "));
        assert!(split(&j, 1000, 2450)
            .unwrap_err()
            .to_string()
            .contains("no hand-over"));
        assert!(split(&job(), 2100, 2450)
            .unwrap_err()
            .to_string()
            .contains("out of order"));
        assert!(split(&job(), 1000, 2200).is_err());
    }
}
