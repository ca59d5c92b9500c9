//! Following jobs: an indicatif progress bar on a terminal, plain lines
//! otherwise (one per change of status or step).

use super::client::CsArgs;
use super::{json, print, Output, WaitArgs};
use anyhow::{anyhow, bail, Result};
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rebound_proto::control as pb;
use rebound_proto::control::admin_client::AdminClient;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;
use tonic::transport::Channel;

type Client = AdminClient<Channel>;

fn finished(j: &pb::Job) -> bool {
    j.state == "succeeded" || j.state == "failed"
}

/// After a lifecycle RPC (its answer `r`, an error naming what it was
/// `doing`): print the job, and follow it with `--wait`.
pub async fn started(
    c: &mut Client,
    wait: &WaitArgs,
    r: Result<tonic::Response<pb::JobStarted>, tonic::Status>,
    doing: &str,
) -> Result<()> {
    let job = job_of(wait, r, doing)?;
    if wait.wait {
        return follow(c, &wait.cs, &job.id, wait.output).await;
    }
    print_started(&job, wait.output);
    Ok(())
}

/// The job a lifecycle RPC started (an error naming what it was `doing`).
pub fn job_of(
    wait: &WaitArgs,
    r: Result<tonic::Response<pb::JobStarted>, tonic::Status>,
    doing: &str,
) -> Result<pb::Job> {
    let job = wait.cs.answer(r, doing)?.job;
    job.ok_or_else(|| anyhow!("the CS answered without a job ({doing})"))
}

/// Says a job started and how to follow it (or prints it as JSON).
pub fn print_started(job: &pb::Job, output: Output) {
    match output {
        Output::Json => json::print(&json::job(job)),
        Output::Table => {
            println!(
                "job {} started: {} {}",
                job.id,
                job.kind,
                if job.plan.is_empty() {
                    job.machines.join(", ")
                } else {
                    format!("plan {}", job.plan)
                }
            );
            println!("follow it with `rebound jobs {} --watch`", job.id);
        }
    }
}

/// What a plain-lines follower has printed already.
#[derive(Default)]
struct Seen {
    status: String,
    steps: BTreeMap<u32, String>,
    warnings: usize,
}

impl Seen {
    /// New lines for this job state.
    /// New lines for this job state; `true` marks a status line (shown as
    /// the bar's message on a terminal).
    fn lines(&mut self, j: &pb::Job) -> Vec<(bool, String)> {
        let mut out = Vec::new();
        for s in &j.steps {
            if self.steps.get(&s.index) != Some(&s.state) {
                self.steps.insert(s.index, s.state.clone());
                if s.state == "pending" {
                    continue;
                }
                let mut l = format!(
                    "[{}] step {}/{} {}: {}",
                    j.id,
                    s.index + 1,
                    j.steps.len(),
                    s.name,
                    s.state
                );
                if !s.error.is_empty() {
                    l.push_str(&format!(" — {}", s.error));
                } else if !s.detail.is_empty() {
                    l.push_str(&format!(" — {}", s.detail));
                }
                out.push((false, l));
            }
        }
        if !j.status.is_empty() && j.status != self.status {
            self.status = j.status.clone();
            // Said already by a step line of this batch.
            let said = out.iter().any(|(_, l)| l.ends_with(&j.status));
            if !said {
                out.push((true, format!("[{}] {}% {}", j.id, j.progress, j.status)));
            }
        }
        for w in j.warnings.iter().skip(self.warnings) {
            out.push((false, format!("[{}] warning: {w}", j.id)));
        }
        self.warnings = j.warnings.len();
        out
    }
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:.bold} [{bar:30.cyan/blue}] {pos:>3}% {elapsed} {wide_msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

/// The job's stream: WatchJob, or GetJob polling when the stream breaks.
async fn next_job(
    c: &mut Client,
    stream: &mut Option<tonic::Streaming<pb::Job>>,
    id: &str,
    cs: &CsArgs,
) -> Result<Option<pb::Job>> {
    if let Some(s) = stream.as_mut() {
        match s.next().await {
            Some(Ok(j)) => return Ok(Some(j)),
            Some(Err(_)) | None => *stream = None,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let j = c
        .get_job(pb::GetJobRequest { id: id.into() })
        .await
        .map_err(|e| cs.error(e, &format!("reading job {id}")))?
        .into_inner();
    Ok(Some(j))
}

/// Follows one job until it ends; an error when it failed.
pub async fn follow(c: &mut Client, cs: &CsArgs, id: &str, output: Output) -> Result<()> {
    let last = track(c, cs, id, output).await?;
    match output {
        Output::Json => json::print(&json::job(&last)),
        Output::Table => succeeded_line(&last),
    }
    failed(&last)
}

/// The line that says a job succeeded, and how long it took.
pub fn succeeded_line(last: &pb::Job) {
    let took = print::dur(last.ended_ms.saturating_sub(last.started_ms));
    if last.state == "succeeded" {
        println!("job {} {} succeeded in {took}", last.id, last.kind);
    }
}

/// An error naming the job's failure, when it failed.
pub fn failed(last: &pb::Job) -> Result<()> {
    if last.state == "failed" {
        bail!(
            "job {} ({}) failed: {}",
            last.id,
            last.kind,
            if last.error.is_empty() {
                "no error recorded (see `rebound jobs ID`)"
            } else {
                &last.error
            }
        );
    }
    Ok(())
}

/// Follows one job until it ends, showing its progress when `output` is a
/// table; the job as it ended.
pub async fn track(c: &mut Client, cs: &CsArgs, id: &str, output: Output) -> Result<pb::Job> {
    let mut stream = match c.watch_job(pb::WatchJobRequest { id: id.into() }).await {
        Ok(s) => Some(s.into_inner()),
        Err(e) if e.code() == tonic::Code::NotFound => {
            return Err(cs.error(e, &format!("watching job {id}")))
        }
        Err(_) => None,
    };
    let tty = output == Output::Table && std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = ProgressBar::new(100);
        b.set_style(bar_style());
        b.set_prefix(format!("job {id}"));
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let mut seen = Seen::default();
    let last = loop {
        let Some(j) = next_job(c, &mut stream, id, cs).await? else {
            continue;
        };
        let lines = seen.lines(&j);
        match &bar {
            Some(b) => {
                for (_, l) in lines.iter().filter(|(status, _)| !status) {
                    b.println(l);
                }
                b.set_position(j.progress.min(100) as u64);
                b.set_message(j.status.clone());
            }
            None if output == Output::Table => {
                for (_, l) in &lines {
                    println!("{l}");
                }
            }
            None => {}
        }
        if finished(&j) {
            break j;
        }
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(last)
}

/// `rebound jobs --watch`: every running job, live, until interrupted.
pub async fn follow_all(c: &mut Client, cs: &CsArgs, machine: Option<String>) -> Result<()> {
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let mut bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let mut done: std::collections::BTreeSet<String> = Default::default();
    if !tty {
        println!("watching running jobs (ctrl-c to stop)");
    }
    loop {
        let r = c
            .list_jobs(pb::ListJobsRequest {
                active_only: false,
                limit: 50,
                machine: machine.clone().unwrap_or_default(),
            })
            .await
            .map_err(|e| cs.error(e, "listing the jobs"))?
            .into_inner();
        for j in r.jobs.iter().rev() {
            let known = seen.contains_key(&j.id);
            if done.contains(&j.id) || (finished(j) && !known) {
                done.insert(j.id.clone());
                continue;
            }
            let s = seen.entry(j.id.clone()).or_default();
            let lines = s.lines(j);
            if tty {
                let b = bars.entry(j.id.clone()).or_insert_with(|| {
                    let b = multi.add(ProgressBar::new(100));
                    b.set_style(bar_style());
                    b.set_prefix(format!("{} {} {}", j.id, j.kind, j.machines.join(",")));
                    b
                });
                for (_, l) in lines.iter().filter(|(status, _)| !status) {
                    b.println(l);
                }
                b.set_position(j.progress.min(100) as u64);
                b.set_message(if j.error.is_empty() {
                    j.status.clone()
                } else {
                    j.error.clone()
                });
                if finished(j) && !b.is_finished() {
                    b.finish();
                }
            } else {
                for (_, l) in &lines {
                    println!("{l}");
                }
                if finished(j) && known {
                    println!("[{}] {}", j.id, j.state);
                }
            }
            if finished(j) {
                seen.remove(&j.id);
                done.insert(j.id.clone());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(status: &str, steps: &[(&str, &str)]) -> pb::Job {
        pb::Job {
            id: "j1".into(),
            kind: "reprotect".into(),
            status: status.into(),
            progress: 10,
            steps: steps
                .iter()
                .enumerate()
                .map(|(i, (n, s))| pb::JobStep {
                    index: i as u32,
                    name: n.to_string(),
                    state: s.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn plain_lines_only_on_change() {
        let mut seen = Seen::default();
        let l = seen.lines(&job(
            "waiting for agent on m1 to register",
            &[("wait for agent", "running"), ("resync", "pending")],
        ));
        let text: Vec<String> = l.into_iter().map(|(_, s)| s).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(text[0].contains("step 1/2 wait for agent: running"));
        assert!(text[1].contains("waiting for agent on m1 to register"));
        let l = seen.lines(&job(
            "waiting for agent on m1 to register",
            &[("wait for agent", "running"), ("resync", "pending")],
        ));
        assert!(l.is_empty(), "{l:?}");
        let l = seen.lines(&job(
            "resync",
            &[("wait for agent", "done"), ("resync", "running")],
        ));
        assert_eq!(l.len(), 3, "{l:?}");
    }
}
