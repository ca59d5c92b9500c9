//! `rebound soak --minutes N --seed S` (`rebound-bench soak`): an endurance
//! run in the manner of DRBD's `endurance.py` and Ceph's thrashers. A lab
//! of one machine with two disks runs fio (random reads and writes, zipf,
//! crc32c verify) through the agent's NBD export on both disks while the
//! soak cuts a recovery point every second with the writers paused (and
//! records the blake3 of each source disk at it) and, on a schedule drawn
//! from the seed, kills the agent, the process server and the master
//! target with SIGKILL and restarts them, and breaks the agent → PS and
//! PS → MT links through the lab's fault proxies (cuts, stalls, delays,
//! truncations mid-frame).
//!
//! At the end it restarts whatever is down, lets the last fio rounds
//! finish, waits until the master target applied everything, and compares
//! every retained point with its record through the master target's view;
//! it prints what it did ([`Summary`]) and the command exits non-zero on
//! any difference, any fio verify error and any component that exited on
//! its own.

mod fio;
mod points;
pub mod schedule;
mod summary;

pub use summary::Summary;

use anyhow::{bail, Context, Result};
use rebound_lab::{Component, Fault, FaultProxy, Lab, LabOptions, RetentionConfig, Rng};
use schedule::{Action, Event, Link};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The points retention keeps: long enough that a short run checks every
/// point it cut, short enough that a long run also drops points under the
/// faults and checks fewer at the end.
const RETENTION_SECS: u64 = 180;
/// A recorded point cut less than this long ago must still be retained
/// (the window less the retention pass interval and some slack).
const MUST_KEEP: Duration = Duration::from_secs(RETENTION_SECS - 20);
const POINT_EVERY: Duration = Duration::from_secs(1);
/// A fio round lasts this many milliseconds (uniform).
const ROUND_MS: (u64, u64) = (3_000, 8_000);
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// How long the end may wait for the master target to apply the last point.
const SETTLE: Duration = Duration::from_secs(300);
const COMPONENTS: [Component; 3] = [Component::Agent, Component::Ps, Component::Mt];

/// What `rebound soak` was asked for.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub minutes: f64,
    pub seed: u64,
    /// Size of each of the two protected disks, MiB.
    pub disk_mib: u64,
    /// Work here (kept); otherwise in a temp dir, kept only on failure.
    pub dir: Option<PathBuf>,
}

/// Runs a soak; the summary (its `failures` say whether it passed). An
/// error means the soak itself could not go on (a component that does not
/// start again, a tool missing).
pub fn run(opts: &SoakOptions) -> Result<Summary> {
    rebound_common::tls::install_crypto_provider();
    for (tool, pkg) in [("fio", "fio"), ("nbdcopy", "libnbd-bin")] {
        if rebound_lab::run_tool(tool, &["--version"]).is_err() {
            bail!("the soak needs {tool}: apt-get install -y {pkg}");
        }
    }
    let (dir, temp) = match &opts.dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new().prefix("rebound-soak-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    eprintln!("rebound soak: seed {}, lab in {}", opts.seed, dir.display());
    let result = Soak::new(opts, &dir).and_then(Soak::run);
    let failed = !matches!(&result, Ok(s) if s.passed());
    if let (true, Some(t)) = (failed, temp) {
        eprintln!(
            "the soak failed: its lab (logs, fio output) is kept in {}",
            t.keep().display()
        );
    }
    result
}

struct Soak {
    lab: Lab,
    started: Instant,
    planned: Duration,
    events: VecDeque<Event>,
    /// Components killed and when each is restarted.
    down: BTreeMap<Component, Instant>,
    /// The fio round of each disk.
    rounds: Vec<Option<fio::Round>>,
    round_no: u64,
    fio_dir: PathBuf,
    rng: Rng,
    records: BTreeMap<String, points::Record>,
    raced: Vec<String>,
    agent_kills: u64,
    s: Summary,
}

impl Soak {
    fn new(opts: &SoakOptions, dir: &Path) -> Result<Soak> {
        let size = opts.disk_mib * MIB;
        let lab = Lab::in_dir(
            &dir.join("lab"),
            LabOptions {
                disks: vec![("disk0".into(), size), ("disk1".into(), size)],
                // The soak cuts the points; the agent's own timer would cut
                // points nobody recorded.
                crash_interval_ms: 24 * 3600 * 1000,
                // Small enough that an outage of the PS sends the agent
                // to bitmap mode and back.
                agent_buffer_bytes: 16 * MIB,
                retention: RetentionConfig {
                    window_secs: RETENTION_SECS,
                    ..RetentionConfig::default()
                },
                fault_proxies: true,
                ..LabOptions::default()
            },
        )?;
        let fio_dir = dir.join("fio");
        std::fs::create_dir_all(&fio_dir)
            .with_context(|| format!("cannot create {}", fio_dir.display()))?;
        let planned = Duration::from_secs_f64(opts.minutes.max(0.0) * 60.0);
        let s = Summary {
            seed: opts.seed,
            planned,
            disks: lab.opts.disks.clone(),
            kills: COMPONENTS.iter().map(|c| (c.name(), 0)).collect(),
            ..Summary::default()
        };
        Ok(Soak {
            events: schedule::plan(opts.seed, planned).into(),
            rounds: (0..lab.opts.disks.len()).map(|_| None).collect(),
            lab,
            started: Instant::now(),
            planned,
            down: BTreeMap::new(),
            round_no: 0,
            fio_dir,
            rng: Rng::new(opts.seed ^ 0x50a4_f10e),
            records: BTreeMap::new(),
            raced: Vec::new(),
            agent_kills: 0,
            s,
        })
    }

    fn run(mut self) -> Result<Summary> {
        self.lab.start_all()?;
        self.started = Instant::now();
        let end = self.started + self.planned;
        let mut next_point = self.started + POINT_EVERY;
        let mut next_progress = self.started + PROGRESS_EVERY;
        while Instant::now() < end {
            self.restart_due()?;
            self.check_alive()?;
            self.apply_due()?;
            self.poll_fio()?;
            points::mark_durable(&self.lab, &mut self.records);
            if Instant::now() >= next_point {
                self.point();
                next_point = (next_point + POINT_EVERY).max(Instant::now());
            }
            if Instant::now() >= next_progress {
                self.progress();
                next_progress += PROGRESS_EVERY;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.finish()
    }

    fn progress(&self) {
        eprintln!(
            "soak {:>4} s: kills {}; points {} cut ({} recorded); fio rounds {} clean, {} broken; {}",
            self.started.elapsed().as_secs(),
            self.s.kills_line(),
            self.s.points_cut,
            self.records.len(),
            self.s.fio_clean,
            self.s.fio_broken_by_kill,
            points::status_line(&self.lab)
        );
    }

    fn apply_due(&mut self) -> Result<()> {
        while self
            .events
            .front()
            .is_some_and(|e| self.started + e.at <= Instant::now())
        {
            let Some(e) = self.events.pop_front() else {
                break;
            };
            match e.action {
                Action::Kill { component, down } => self.kill(component, down)?,
                Action::Fault { link, fault } => self.inject(link, fault)?,
            }
        }
        Ok(())
    }

    fn proxy(&self, link: Link) -> Result<&FaultProxy> {
        let (agent_ps, ps_mt) = self
            .lab
            .proxies()
            .context("the soak lab has no fault proxies")?;
        Ok(match link {
            Link::AgentPs => agent_ps,
            Link::PsMt => ps_mt,
        })
    }

    fn inject(&mut self, link: Link, fault: Fault) -> Result<()> {
        self.proxy(link)?.inject(fault);
        *self
            .s
            .faults
            .entry(link.name().to_string())
            .or_default()
            .entry(schedule::fault_kind(&fault))
            .or_default() += 1;
        Ok(())
    }

    fn kill(&mut self, c: Component, down: Duration) -> Result<()> {
        if !self.lab.is_running(c) {
            return Ok(());
        }
        if c == Component::Agent {
            points::mark_durable(&self.lab, &mut self.records);
        }
        self.lab.kill9(c)?;
        *self.s.kills.entry(c.name()).or_default() += 1;
        if c == Component::Agent {
            self.agent_kills += 1;
        }
        self.down.insert(c, Instant::now() + down);
        Ok(())
    }

    /// Restarts the components whose down time is over (all of them when
    /// `all`).
    fn restart(&mut self, all: bool) -> Result<()> {
        let due: Vec<Component> = self
            .down
            .iter()
            .filter(|(_, at)| all || **at <= Instant::now())
            .map(|(c, _)| *c)
            .collect();
        for c in due {
            self.down.remove(&c);
            self.start(c)?;
        }
        Ok(())
    }

    fn restart_due(&mut self) -> Result<()> {
        self.restart(false)
    }

    /// Starts `c`, three tries; an error with its log tail when it will not.
    fn start(&mut self, c: Component) -> Result<()> {
        let mut last = None;
        for _ in 0..3 {
            match self.lab.start(c) {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let e = last.unwrap_or_else(|| anyhow::anyhow!("no attempt"));
        Err(e.context(format!(
            "the {} does not start again after a kill; its log ends with:\n{}",
            c.name(),
            self.lab.log_tail(c, 30)
        )))
    }

    /// A component that exited on its own is a failure; it is restarted
    /// so the run goes on.
    fn check_alive(&mut self) -> Result<()> {
        for c in COMPONENTS {
            if self.down.contains_key(&c) {
                continue;
            }
            if let Err(e) = self.lab.check_alive(c) {
                self.s.failures.push(format!(
                    "the {} exited on its own at {} s: {e:#}\n{}",
                    c.name(),
                    self.started.elapsed().as_secs(),
                    self.lab.log_tail(c, 20)
                ));
                self.start(c)?;
            }
        }
        Ok(())
    }

    fn poll_fio(&mut self) -> Result<()> {
        for i in 0..self.rounds.len() {
            if let Some(r) = &mut self.rounds[i] {
                if let Some(o) = r.poll()? {
                    let kills_at_start = r.agent_kills_at_start;
                    let name = r.spec.name.clone();
                    self.rounds[i] = None;
                    self.tally(&name, kills_at_start, o);
                }
            }
            if self.rounds[i].is_none() && self.lab.is_running(Component::Agent) {
                self.rounds[i] = Some(self.start_round(i)?);
            }
        }
        Ok(())
    }

    fn start_round(&mut self, disk: usize) -> Result<fio::Round> {
        self.round_no += 1;
        let (name, size) = self.lab.opts.disks[disk].clone();
        let spec = fio::RoundSpec {
            name: format!("round{}-{name}", self.round_no),
            uri: self.lab.agent_uri(&name),
            size,
            runtime: Duration::from_millis(ROUND_MS.0 + self.rng.below(ROUND_MS.1 - ROUND_MS.0)),
            seed: self.rng.next_u64() >> 1,
        };
        fio::Round::start(spec, &self.fio_dir, self.agent_kills)
    }

    fn tally(&mut self, name: &str, kills_at_start: u64, o: fio::Outcome) {
        self.s.bytes_written += o.written;
        self.s.bytes_read += o.read;
        if !o.verify_errors.is_empty() {
            self.s.fio_verify_errors += o.verify_errors.len() as u64;
            self.s.failures.push(format!(
                "fio {name}: {} verify errors, the first: {}",
                o.verify_errors.len(),
                o.verify_errors[0]
            ));
        }
        if o.success {
            self.s.fio_clean += 1;
        } else if self.agent_kills > kills_at_start {
            self.s.fio_broken_by_kill += 1;
        } else {
            self.s.fio_failed += 1;
            self.s.failures.push(format!(
                "fio {name} failed with no agent kill during it (its output is {}): {}",
                self.fio_dir.join(name).display(),
                o.stderr_tail
            ));
        }
    }

    /// Pauses fio, cuts and records a point, resumes fio.
    fn point(&mut self) {
        if !self.lab.is_running(Component::Agent) {
            *self
                .s
                .points_skipped
                .entry("agent down".into())
                .or_default() += 1;
            return;
        }
        let running: Vec<&fio::Round> = self.rounds.iter().flatten().collect();
        for r in &running {
            let _ = r.pause();
        }
        let cut = points::cut(&self.lab);
        for r in &running {
            let _ = r.resume();
        }
        self.record(cut);
    }

    fn record(&mut self, cut: std::result::Result<(String, points::Record), points::Skip>) {
        let reason = match cut {
            Ok((id, rec)) => {
                self.s.points_cut += 1;
                self.records.insert(id, rec);
                return;
            }
            Err(points::Skip::Raced(why)) => {
                self.s.points_raced += 1;
                if let Some(id) = why.split(':').next() {
                    self.raced.push(id.to_string());
                }
                return;
            }
            Err(points::Skip::AgentDown) => "agent down".to_string(),
            Err(points::Skip::NotQuiet) => "agent not quiet".to_string(),
            Err(points::Skip::Refused(why)) => format!("refused ({})", refusal(&why)),
        };
        *self.s.points_skipped.entry(reason).or_default() += 1;
    }

    /// Everything up, last rounds finished, last point applied, then every
    /// retained point compared.
    fn finish(mut self) -> Result<Summary> {
        self.s.ran = self.started.elapsed();
        eprintln!("soak: the schedule is over; restarting what is down and settling");
        self.restart(true)?;
        for i in 0..self.rounds.len() {
            if let Some(mut r) = self.rounds[i].take() {
                let (name, kills) = (r.spec.name.clone(), r.agent_kills_at_start);
                let limit = r.spec.runtime + Duration::from_secs(60);
                let o = r.finish(limit)?;
                self.tally(&name, kills, o);
            }
        }
        // A replication that never settles is the soak's finding, not an
        // error of the soak: it is reported with the tallies so far.
        let settled = self.final_point().and_then(|last| {
            self.lab
                .wait_applied(last, SETTLE)
                .context("waiting for the master target to apply the last point")
        });
        if let Err(e) = settled {
            self.s.failures.push(format!(
                "replication did not settle after the faults: {e:#}"
            ));
            return Ok(self.s);
        }
        points::mark_durable(&self.lab, &mut self.records);
        self.s.latest_exact = true;
        for (i, (disk, _)) in self.lab.opts.disks.clone().iter().enumerate() {
            let view = self.lab.point_hash(disk, "latest")?;
            let source = self.lab.source_hash(i)?;
            if view != source {
                self.s.latest_exact = false;
                self.s.failures.push(format!(
                    "disk {disk}: the replica's latest is {view}, the source {source}"
                ));
            }
        }
        eprintln!("soak: comparing every retained point");
        let checked = points::check_all(&self.lab, &self.records, &self.raced, MUST_KEEP)?;
        self.s.retained_exact = checked.exact;
        self.s.retained_agent = checked.agent_points;
        self.s.dropped_by_retention = checked.dropped;
        self.s.lost_with_agent = checked.not_durable;
        self.s.failures.extend(checked.failures);
        for link in [Link::AgentPs, Link::PsMt] {
            let st = self.proxy(link)?.stats();
            self.s.proxy_effect.push(format!(
                "{}: {} cuts and {} truncations hit open connections; {} connections, {:.1} MiB forwarded",
                link.name(),
                st.cuts,
                st.truncations,
                st.connections,
                st.bytes as f64 / MIB as f64
            ));
        }
        Ok(self.s)
    }

    /// The last point, with nothing writing: retried while the agent
    /// finishes a resync. Its seq.
    fn final_point(&mut self) -> Result<u64> {
        let deadline = Instant::now() + SETTLE;
        loop {
            match points::cut(&self.lab) {
                Ok((id, rec)) => {
                    let seq = rec.seq;
                    self.s.points_cut += 1;
                    self.records.insert(id, rec);
                    return Ok(seq);
                }
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "the agent cut no last point in {} s: {e:?}",
                        SETTLE.as_secs()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }
}

/// A refusal's reason without its details, so alike refusals count
/// together: the agent's sentence up to its colon, and the mode it names.
fn refusal(why: &str) -> String {
    let why = why.trim_matches(|c| c == '"' || c == ' ');
    let head = why.split(':').next().unwrap_or(why);
    let mode = why
        .split("agent is in ")
        .nth(1)
        .and_then(|rest| rest.split(" mode").next())
        .map(|m| format!(", {m} mode"))
        .unwrap_or_default();
    format!("{head}{mode}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_count_by_their_sentence_and_mode() {
        let why = "\"no recovery point can be cut now: the agent is in resync mode and changes are missing\"";
        assert_eq!(
            refusal(why),
            "no recovery point can be cut now, resync mode"
        );
        assert_eq!(
            refusal("the stream position is not known yet: the agent has not reached"),
            "the stream position is not known yet"
        );
    }
}
