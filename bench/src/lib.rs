//! `rebound-bench` (also run as `rebound bench`): measures, in one run on
//! this machine, what operators choose a DR product by — the cost of
//! protection, the churn the path keeps up with, RPO, resync and RTO —
//! beside the machine's own limits and the tools an operator would
//! otherwise use, and prints one table of every figure beside its goal
//! (and `--json FILE`).
//!
//! The real binaries run as child processes on loopback in a temp dir (or
//! `--dir`), everything bounded in time. Sections, in run order:
//! [`limits`] (1), [`cost`] (2), [`sustained`] (3, with peak RSS), [`rpo`]
//! (4), [`rto`] (6) on one lab, then [`resync`] (5) on its own lab, then
//! [`scale`] (7: hundreds of disks on one PS and MT, a thousand agents on
//! the configuration server). The
//! RTO's planned failover is the configuration server's failover job, in
//! a multi-site lab of child processes (CS, PS + MT per site, agent:
//! [`failover`]). A failing section marks its rows `error` and the run
//! continues, so the table always has every row; the command then exits
//! non-zero.
//!
//! With metrics on (the default, as deployed) every daemon serves
//! `/metrics` and [`scraper`] scrapes each once a second; `--metrics both`
//! measures sections 2 and 3 again with metrics off ([`overhead`]).
//!
//! `rebound-bench soak` (also `rebound soak`) is the endurance run instead:
//! see [`soak`].
#![deny(unsafe_code)]

pub mod cost;
pub mod failover;
pub mod floor;
pub mod limits;
pub mod measured;
pub mod overhead;
pub mod placement;
pub mod profiles;
pub mod report;
pub mod resync;
pub mod rpo;
pub mod rto;
pub mod sampler;
pub mod scale;
pub mod scraper;
pub mod soak;
pub mod sustained;
mod sys;
pub mod tools;
pub mod usage;
pub mod writer;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;

use measured::{LabSpec, MeasuredLab};
use rebound_lab::{Bins, Component};
use report::{Goal, Report};

const MIB: u64 = 1 << 20;

/// The binaries a run starts: the data path in every lab, the CS and the
/// operator CLI in the failover's.
const BINARIES: [&str; 5] = [
    "rebound-agent",
    "rebound-ps",
    "rebound-mt",
    "rebound-cs",
    "rebound",
];

pub struct BenchOptions {
    /// Smaller sizes and durations (CI smoke test): same rows, rougher figures.
    pub quick: bool,
    /// Also write the table as JSON here.
    pub json: Option<PathBuf>,
    /// Work here (kept) instead of a temp dir (deleted).
    pub dir: Option<PathBuf>,
    /// Run only these parts (empty: all of them).
    pub only: Vec<Part>,
    /// Whether the daemons serve metrics (and are scraped).
    pub metrics: MetricsMode,
    /// The store of the configuration server the scale section's control
    /// part lists 1,000 machines from.
    pub cs_store: CsStore,
}

/// Where the CS of the scale section's control part keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CsStore {
    /// The SQLite file, as `rebound-cs init` makes it (the default).
    #[default]
    Sqlite,
    /// A database of its own on the PostgreSQL server `PG_SCRATCH_URL`
    /// names (`scripts/pg-scratch start DIR` starts a throw-away one).
    Postgres,
}

/// Whether the labs' daemons serve `/metrics` (scraped once a second by
/// [`scraper`] on the main lab), or both ways for sections 2 and 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsMode {
    /// Served and scraped, as deployed.
    #[default]
    On,
    /// `metrics_listen = ""` on every daemon.
    Off,
    /// Sections 2 and 3 both ways, side by side ([`overhead`]).
    Both,
}

impl MetricsMode {
    /// The main lab's daemons serve metrics.
    pub fn serves(self) -> bool {
        self != MetricsMode::Off
    }
}

/// The parts of a run that `--only` can pick: each is independent of the
/// others (a note that uses a limits row leaves its share out without it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Section 1, the machine's limits.
    Limits,
    /// Sections 2, 3, 4 and 6 and peak memory, on one lab.
    Main,
    /// Section 5, on its own lab.
    Resync,
    /// Section 7: ingest and control channel at scale, on their own labs.
    Scale,
}

impl BenchOptions {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }
}

/// Sizes and durations of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub quick: bool,
    /// Seconds per machine-limit micro-benchmark.
    pub limit_secs: f64,
    pub disk_write_bytes: u64,
    /// Written before one fdatasync for the bulk durable write rate.
    pub disk_bulk_bytes: u64,
    pub fsync_samples: usize,
    pub tls_bytes: u64,
    /// The protected disk of the main lab (cost, sustained, RPO, RTO).
    pub main_disk: u64,
    pub agent_buffer: u64,
    pub retention_max: u64,
    pub crash_interval_ms: u64,
    pub fio_secs: u64,
    pub settle_timeout: Duration,
    /// Bytes of each data profile the writers cut writes from.
    pub pool_bytes: usize,
    pub write_size: usize,
    pub writer_conns: usize,
    /// Throughput search: first rate (bytes/s), factor, cap, step length.
    pub ramp_start: f64,
    pub ramp_factor: f64,
    pub ramp_max: f64,
    pub ramp_step: Duration,
    /// How long a rate must hold to count as sustained.
    pub sustain_secs: f64,
    pub sustain_retries: u32,
    /// No retry or upward hold starts after the sustained section has run
    /// this long.
    pub sustain_budget: Duration,
    pub rpo_secs: f64,
    pub rto_rate: f64,
    pub rto_churn_secs: f64,
    /// The disk of the machine failed over through the CS, and how long it
    /// is churned before the failover command.
    pub failover_disk: u64,
    pub failover_churn_secs: f64,
    pub resync_disk: u64,
    pub resync_timeout: Duration,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        let full = Plan {
            quick,
            limit_secs: 1.0,
            disk_write_bytes: 256 * MIB,
            disk_bulk_bytes: 1024 * MIB,
            fsync_samples: 200,
            tls_bytes: 2048 * MIB,
            main_disk: 1024 * MIB,
            agent_buffer: 256 * MIB,
            retention_max: 2048 * MIB,
            crash_interval_ms: 5000,
            fio_secs: 5,
            settle_timeout: Duration::from_secs(240),
            pool_bytes: 32 << 20,
            write_size: 256 << 10,
            writer_conns: 2,
            ramp_start: 40e6,
            ramp_factor: 1.5,
            ramp_max: 900e6,
            ramp_step: Duration::from_millis(2500),
            sustain_secs: 30.0,
            sustain_retries: 1,
            sustain_budget: Duration::from_secs(300),
            rpo_secs: 12.0,
            rto_rate: 50e6,
            rto_churn_secs: 25.0,
            failover_disk: 256 * MIB,
            failover_churn_secs: 10.0,
            resync_disk: 4096 * MIB,
            resync_timeout: Duration::from_secs(600),
        };
        if !quick {
            return full;
        }
        Plan {
            limit_secs: 0.2,
            disk_write_bytes: 64 * MIB,
            disk_bulk_bytes: 128 * MIB,
            fsync_samples: 40,
            tls_bytes: 128 * MIB,
            main_disk: 256 * MIB,
            retention_max: 512 * MIB,
            fio_secs: 2,
            pool_bytes: 8 << 20,
            ramp_start: 60e6,
            ramp_factor: 2.0,
            ramp_step: Duration::from_secs(1),
            sustain_secs: 4.0,
            sustain_retries: 0,
            sustain_budget: Duration::from_secs(30),
            rpo_secs: 3.0,
            rto_churn_secs: 3.0,
            failover_disk: 64 * MIB,
            failover_churn_secs: 3.0,
            resync_disk: 256 * MIB,
            ..full
        }
    }
}

/// The run's context, handed to every section.
pub struct Bench {
    pub plan: Plan,
    pub dir: PathBuf,
    pub bins: Bins,
    pub rt: Handle,
    report: Report,
    details: Map<String, Value>,
    started: Instant,
    max_retained_blocks: u64,
    /// Limit rows measured again later in the run (see [`Bench::set_again`]).
    again: BTreeMap<String, f64>,
    load_at_start: String,
    /// `--dir` was given: sections keep their logs when they clean up.
    keep_logs: bool,
    pub metrics: MetricsMode,
    pub cs_store: CsStore,
    /// Sections 2 and 3 as measured with metrics off (`--metrics both`).
    metrics_off: Option<overhead::Off>,
}

/// Bytes per second → MB/s (10^6 bytes).
pub fn mb(bytes_per_sec: f64) -> f64 {
    bytes_per_sec / 1e6
}

impl Bench {
    /// Frees a finished section's directory: all of it in a temp dir; with
    /// `--dir`, only the big files (disks, journals, segments, replicas):
    /// the logs, configs, certificates and state files stay for a
    /// post-mortem or to start the same processes again by hand.
    pub fn clean_section(&self, dir: &Path) {
        if !self.keep_logs {
            let _ = std::fs::remove_dir_all(dir);
            return;
        }
        fn remove_big_files(dir: &Path) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let path = e.path();
                let Ok(meta) = e.metadata() else { continue };
                if meta.is_dir() {
                    remove_big_files(&path);
                } else if meta.len() > KEEP_MAX && path.extension().is_none_or(|x| x != "log") {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        /// Files up to this size are kept with `--dir` (logs always).
        const KEEP_MAX: u64 = 1 << 20;
        remove_big_files(dir);
    }

    pub fn progress(&self, msg: &str) {
        eprintln!(
            "[bench {:6.1}s] {msg}",
            self.started.elapsed().as_secs_f64()
        );
    }

    pub fn set(&mut self, id: &str, value: f64, note: impl Into<String>) {
        self.report.set(id, value, note);
    }

    /// A row this run could not measure (it needs a part left out).
    pub fn not_run(&mut self, id: &str, why: &str) {
        self.report.not_run(id, why);
    }

    /// A figure measured earlier in the run (a machine limit), if it was.
    pub fn value(&self, id: &str) -> Option<f64> {
        self.report.rows().iter().find(|r| r.id == id)?.value
    }

    /// A limit row measured again, `when` in the run: the host's speed
    /// moves within a run, so a floor set beside a figure also uses the
    /// limits as they were at that figure's time. The table keeps section
    /// 1's value; the JSON lists every re-measurement under `limits.again`.
    pub fn set_again(&mut self, id: &str, value: f64, when: &str) {
        self.again.insert(id.into(), value);
        let entry = self
            .details
            .entry("limits.again")
            .or_insert_with(|| json!({}));
        if let Some(m) = entry.as_object_mut() {
            m.insert(format!("{id} ({when})"), json!(value));
        }
    }

    /// The latest re-measurement of a limit row, if there was one.
    pub fn value_again(&self, id: &str) -> Option<f64> {
        self.again.get(id).copied()
    }

    /// Extra data for the JSON document.
    pub fn detail(&mut self, key: &str, v: Value) {
        self.details.insert(key.into(), v);
    }

    /// Notes the MT's retention journal size (for its memory goal).
    pub fn track_retained(&mut self, lab: &MeasuredLab) {
        if let Ok(n) = lab.retained_blocks() {
            self.max_retained_blocks = self.max_retained_blocks.max(n);
        }
    }

    /// Records a section's outcome; a failure marks its unmeasured rows.
    fn outcome(&mut self, prefixes: &[&str], r: Result<()>) {
        if let Err(e) = r {
            let msg = format!("{e:#}");
            self.progress(&format!("FAILED: {msg}"));
            for p in prefixes {
                self.report.fail(p, &msg);
            }
        }
    }

    fn memory(&mut self, lab: &MeasuredLab) -> Result<()> {
        let buffer_mib = (self.plan.agent_buffer / MIB) as f64;
        let agent = lab.peak_rss(Component::Agent)? as f64 / MIB as f64;
        let ps = lab.peak_rss(Component::Ps)? as f64 / MIB as f64;
        let mt = lab.peak_rss(Component::Mt)? as f64 / MIB as f64;
        let blocks = self.max_retained_blocks;
        let mt_goal = 256.0 + (blocks * 32) as f64 / MIB as f64;
        self.report
            .set_goal("mem.agent", Goal::AtMost(buffer_mib + 64.0));
        self.report.set_goal("mem.mt", Goal::AtMost(mt_goal));
        self.set(
            "mem.agent",
            agent,
            format!("VmHWM; goal = buffer {buffer_mib:.0} MiB + 64 MiB"),
        );
        self.set("mem.ps", ps, "VmHWM over sections 2-6");
        self.set(
            "mem.mt",
            mt,
            format!("VmHWM; goal = 256 MiB + 32 B x {blocks} retained blocks (max seen)"),
        );
        Ok(())
    }

    fn meta(&self) -> Value {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| s.lines().next().map(|l| l.to_string()))
            .unwrap_or_default();
        let load = std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "loadavg_at_start": self.load_at_start,
            "loadavg_at_end": load,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "cpu": cpu,
            "kernel": kernel,
            "memory": mem,
            "dir": self.dir,
            "binaries": self.bins.dir,
            "duration_s": self.started.elapsed().as_secs_f64(),
            "plan": self.plan,
            "details": self.details,
        })
    }
}

/// Runs the bench (the blocking work on a blocking thread; gRPC calls on the
/// caller's runtime).
pub async fn run(opts: BenchOptions) -> Result<()> {
    let rt = Handle::current();
    tokio::task::spawn_blocking(move || run_blocking(opts, rt))
        .await
        .context("the bench thread panicked")?
}

fn run_blocking(opts: BenchOptions, rt: Handle) -> Result<()> {
    rebound_common::tls::install_crypto_provider();
    tools::check_all()?;
    let bins = Bins::locate()?;
    bins.check(&BINARIES)?;
    let (dir, _tmp) = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("rebound-bench-")
                .tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let mut b = Bench {
        keep_logs: opts.dir.is_some(),
        metrics: opts.metrics,
        cs_store: opts.cs_store,
        metrics_off: None,
        plan: Plan::new(opts.quick),
        dir,
        bins,
        rt,
        report: Report::default(),
        details: Map::new(),
        started: Instant::now(),
        max_retained_blocks: 0,
        again: BTreeMap::new(),
        load_at_start: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string(),
    };
    b.progress(&format!(
        "rebound-bench{} in {} with the binaries in {} (load average {}; metrics {:?})",
        if opts.quick { " --quick" } else { "" },
        b.dir.display(),
        b.bins.dir.display(),
        b.load_at_start,
        opts.metrics
    ));

    const PARTS: [(Part, &[&str]); 4] = [
        (Part::Limits, &["limits."]),
        (Part::Main, &["cost.", "sustained.", "mem.", "rpo.", "rto."]),
        (Part::Resync, &["resync."]),
        (Part::Scale, &["scale."]),
    ];
    for (part, prefixes) in PARTS {
        if !opts.runs(part) {
            for p in prefixes {
                b.report.skip(p);
            }
            continue;
        }
        let r = match part {
            Part::Limits => {
                b.progress("limits: blake3, zstd, disk, loopback TLS");
                limits::run(&mut b)
            }
            Part::Main => {
                if opts.metrics == MetricsMode::Both {
                    match overhead::run_off(&mut b) {
                        Ok(off) => b.metrics_off = Some(off),
                        Err(e) => b.progress(&format!("metrics off: FAILED: {e:#}")),
                    }
                }
                main_lab(&mut b)
            }
            Part::Resync => resync::run(&mut b),
            Part::Scale => {
                scale::run(&mut b);
                Ok(())
            }
        };
        b.outcome(prefixes, r);
    }

    let table = b.report.table();
    b.progress(&format!(
        "done in {:.0} s",
        b.started.elapsed().as_secs_f64()
    ));
    println!(
        "rebound-bench{} ({} CPUs, {}; MB = 10^6 bytes)",
        if opts.quick { " --quick" } else { "" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        b.dir.display()
    );
    print!("{table}");
    if let Some(off) = &b.metrics_off {
        println!();
        print!("{}", overhead::table(b.report.rows(), off));
        let v = overhead::json(off);
        b.detail("metrics_off", v);
    }
    if let Some(path) = &opts.json {
        let doc = b.report.json(b.meta());
        let text = serde_json::to_string_pretty(&doc)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    let errors = b.report.errors();
    if errors > 0 {
        bail!("{errors} figures could not be measured (see the notes of the rows marked error)");
    }
    Ok(())
}

/// The lab of sections 2, 3, 4 and 6 in `b.dir/name`, started and past
/// its initial sync.
fn open_main_lab(b: &Bench, name: &str, metrics: bool) -> Result<MeasuredLab> {
    let p = &b.plan;
    let dir = b.dir.join(name);
    let mut lab = MeasuredLab::new(
        &dir,
        LabSpec {
            source_dir: dir.clone(),
            disk_size: p.main_disk,
            agent_buffer_bytes: p.agent_buffer,
            crash_interval_ms: p.crash_interval_ms,
            retention_max_bytes: p.retention_max,
            metrics,
        },
        b.rt.clone(),
    )?;
    b.progress(&format!(
        "starting rebound-mt, rebound-ps, rebound-agent ({} MiB disk, metrics {}) and waiting for the initial sync",
        p.main_disk >> 20,
        if metrics { "on" } else { "off" }
    ));
    lab.start(Component::Mt)?;
    lab.start(Component::Ps)?;
    lab.start(Component::Agent)?;
    lab.wait_settled(p.settle_timeout)?;
    Ok(lab)
}

/// Sections 2, 3, 4 and 6 on one lab (one initial sync instead of four);
/// memory is read at the end so the peaks cover all of them.
fn main_lab(b: &mut Bench) -> Result<()> {
    let dir = b.dir.join("main");
    let mut lab = open_main_lab(b, "main", b.metrics.serves())?;
    let scraper = if b.metrics.serves() {
        let targets = [Component::Agent, Component::Ps, Component::Mt]
            .into_iter()
            .map(|c| lab.lab.metrics_addr(c))
            .collect::<Result<Vec<_>>>()?;
        Some(scraper::Scraper::start(targets).context("starting the metrics scraper")?)
    } else {
        None
    };

    let r = cost::run(b, &mut lab);
    b.outcome(&["cost."], r);
    let r = sustained::run(b, &mut lab);
    b.outcome(&["sustained."], r);
    let r = rpo::run(b, &mut lab);
    b.outcome(&["rpo."], r);
    let r = rto::run(b, &mut lab);
    b.outcome(&["rto."], r);
    b.track_retained(&lab);
    let r = b.memory(&lab);
    b.outcome(&["mem."], r);
    if let Some(s) = scraper {
        let scrapes = s.stop();
        b.detail(
            "metrics_scrapes",
            json!({"interval_s": scraper::INTERVAL.as_secs_f64(), "scrapes": scrapes}),
        );
    }
    drop(lab);
    b.clean_section(&dir);
    Ok(())
}
