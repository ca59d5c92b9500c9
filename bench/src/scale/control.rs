//! A thousand simulated agents on the configuration server's control
//! channel, and how long `rebound machines` and `rebound status` take then.
//!
//! The CS is the real `rebound-cs` child process of a [`Sites`] lab (the
//! SQLite store, or PostgreSQL with `--cs-store postgres`; the default
//! heartbeat of 2 s, metrics on, as deployed). The
//! agents are simulated in this process ([`agents`]): each enrolls for
//! real with the passphrase and holds a real control stream, heartbeats
//! and status included, so the CS registers a machine with two disks per
//! agent. With all of them connected, the operator CLI `rebound` (a child
//! process, admin certificate) runs `machines` and `status` a number of
//! times; each run is timed from spawn to exit, as an operator waits for
//! it. `machines --output json` must list every simulated machine, and
//! `status` must count them.
//!
//! Rows: `scale.control.machines` (listed), `…machines_cli_ms` (p50) and
//! `…_max_ms`, the same for `status`, and `…cs_rss_mib` (the CS's peak
//! resident set, VmHWM, over enrollment, connection and the listings).

#[path = "control_agents.rs"]
mod agents;

use crate::{Bench, CsStore};
use anyhow::{anyhow, bail, Context, Result};
use rebound_lab::{Sites, SitesOptions};
use serde_json::json;
use std::time::{Duration, Instant};

/// The simulated machines' site.
const SITE: &str = "onprem";
/// Streams opened before waiting for them to be welcomed.
const CONNECT_BATCH: usize = 100;
/// How long one batch may take to be welcomed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the agents run before the listings (two heartbeats).
const SETTLE: Duration = Duration::from_secs(4);
/// How long the CS may take to list every machine once all are connected.
const LIST_TIMEOUT: Duration = Duration::from_secs(60);

/// Sizes of one run.
struct Size {
    agents: usize,
    /// Timed runs of each command.
    runs: usize,
}

impl Size {
    fn of(b: &Bench) -> Size {
        if b.plan.quick {
            // Small enough to pass on two busy cores while the rest of the
            // test suite runs beside it (the smoke test runs `--quick`).
            Size {
                agents: 30,
                runs: 3,
            }
        } else {
            Size {
                agents: 1000,
                runs: 10,
            }
        }
    }
}

/// Measures the control-channel scale rows (`scale.control.*`).
pub fn run(b: &mut Bench) -> Result<()> {
    let f = figures(b)?;
    record(b, &f);
    Ok(())
}

/// What one run measured.
#[derive(Debug)]
struct Figures {
    agents: usize,
    /// Machines `rebound machines --output json` listed.
    listed: usize,
    enroll_s: f64,
    connect_s: f64,
    machines: Timed,
    status: Timed,
    /// The CS's VmHWM and, at the end, VmRSS (MiB).
    cs_hwm_mib: f64,
    cs_rss_mib: Option<f64>,
    /// The CS's CPU (% of one core) with every agent connected and idle:
    /// heartbeats and status reports only.
    cs_idle_cpu_pct: f64,
    load_before: String,
    load_after: String,
}

/// Starts the CS, enrolls and connects the simulated agents, times the
/// CLI; the lab ends with it.
fn figures(b: &Bench) -> Result<Figures> {
    let size = Size::of(b);
    let dir = b.dir.join("scale-control");
    let _ = std::fs::remove_dir_all(&dir);
    b.progress(&format!(
        "scale: configuration server ({:?} store) with {} simulated agents on its control channel",
        b.cs_store, size.agents
    ));
    let opts = SitesOptions {
        sites: vec![SITE.into()],
        machines: Vec::new(),
        heartbeat_secs: rebound_cs::Config::default().heartbeat_secs,
        metrics: true,
        postgres: b.cs_store == CsStore::Postgres,
        ..SitesOptions::default()
    };
    let r = Sites::cs_in_dir(&dir, opts)
        .context("starting the configuration server")
        .and_then(|lab| measure(b, &lab, &size));
    b.clean_section(&dir);
    r
}

fn measure(b: &Bench, lab: &Sites, size: &Size) -> Result<Figures> {
    let rt = b.rt.clone();
    let cs_pid = lab
        .pid("cs")
        .ok_or_else(|| anyhow!("the configuration server is not running"))?;
    let pass_file = lab.passphrase_file();
    let passphrase = std::fs::read_to_string(&pass_file)
        .with_context(|| format!("reading {}", pass_file.display()))?
        .trim()
        .to_string();
    let ids: Vec<String> = (0..size.agents).map(agents::machine_id).collect();

    let t = Instant::now();
    let certs = rt.block_on(agents::enroll_all(
        &lab.cs_addr,
        &passphrase,
        &ids,
        &lab.path("agents"),
    ))?;
    let enroll_s = t.elapsed().as_secs_f64();
    b.progress(&format!(
        "scale: {} agents enrolled in {enroll_s:.1} s; opening their control streams",
        ids.len()
    ));

    let t = Instant::now();
    let fleet = rt.block_on(agents::Fleet::connect(
        &lab.cs_addr,
        SITE,
        &ids,
        &certs,
        CONNECT_BATCH,
        CONNECT_TIMEOUT,
    ))?;
    let connect_s = t.elapsed().as_secs_f64();
    let listed = wait_listed(lab, size.agents)?;
    b.progress(&format!(
        "scale: {} control streams up in {connect_s:.1} s, {listed} machines listed; timing `rebound machines` and `rebound status` ({} runs each)",
        fleet.connected(),
        size.runs
    ));
    // Two heartbeats, so every agent's status is stored and the listings
    // carry it; the CS's CPU meanwhile is what the fleet's heartbeats and
    // status reports cost it.
    let cpu = cpu_secs(cs_pid)?;
    let t = Instant::now();
    std::thread::sleep(SETTLE);
    let cs_idle_cpu_pct = (cpu_secs(cs_pid)? - cpu) / t.elapsed().as_secs_f64() * 100.0;

    let load_before = load_average();
    let machines = time_cli(lab, &["machines"], size.runs)?;
    let status = time_cli(lab, &["status"], size.runs)?;
    let load_after = load_average();
    let counted = status_machines(lab)?;
    let still_up = fleet.connected();
    if counted != size.agents as u64 || still_up != size.agents {
        bail!(
            "`rebound status` counts {counted} machines and {still_up} agents are connected, of {} simulated",
            size.agents
        );
    }
    let cs_hwm_mib = crate::usage::vm_hwm(cs_pid)? as f64 / MIB;
    let cs_rss_mib = vm_rss(cs_pid).map(|v| v as f64 / MIB);
    drop(fleet);
    Ok(Figures {
        agents: size.agents,
        listed,
        enroll_s,
        connect_s,
        machines,
        status,
        cs_hwm_mib,
        cs_rss_mib,
        cs_idle_cpu_pct,
        load_before,
        load_after,
    })
}

const MIB: f64 = (1u64 << 20) as f64;

/// Sets the rows and the JSON detail.
fn record(b: &mut Bench, f: &Figures) {
    let n = f.agents;
    b.set(
        "scale.control.machines",
        f.listed as f64,
        format!(
            "`rebound machines --output json` with {n} simulated agents connected, CS on {:?} (enrolled in {:.0} s, streams up in {:.0} s)",
            b.cs_store, f.enroll_s, f.connect_s
        ),
    );
    b.set(
        "scale.control.machines_cli_ms",
        f.machines.p50,
        format!(
            "p50 of {} runs of `rebound machines` (spawn to exit), max {:.0} ms; load average {} before, {} after",
            f.machines.ms.len(),
            f.machines.max,
            f.load_before,
            f.load_after
        ),
    );
    b.set(
        "scale.control.machines_cli_max_ms",
        f.machines.max,
        format!("max of {} runs", f.machines.ms.len()),
    );
    b.set(
        "scale.control.status_cli_ms",
        f.status.p50,
        format!(
            "p50 of {} runs of `rebound status`, max {:.0} ms",
            f.status.ms.len(),
            f.status.max
        ),
    );
    b.set(
        "scale.control.status_cli_max_ms",
        f.status.max,
        format!("max of {} runs", f.status.ms.len()),
    );
    b.set(
        "scale.control.cs_rss_mib",
        f.cs_hwm_mib,
        format!(
            "VmHWM of rebound-cs over enrolling and connecting {n} agents and the listings{}; its CPU with all {n} idle (heartbeats, status): {:.0}% of a core",
            f.cs_rss_mib
                .map(|r| format!(" (VmRSS {r:.0} MiB at the end)"))
                .unwrap_or_default(),
            f.cs_idle_cpu_pct
        ),
    );
    b.detail(
        "scale.control",
        json!({
            "agents": n,
            "enroll_s": f.enroll_s,
            "connect_s": f.connect_s,
            "machines_ms": f.machines.ms,
            "status_ms": f.status.ms,
            "cs_vm_hwm_mib": f.cs_hwm_mib,
            "cs_vm_rss_mib": f.cs_rss_mib,
            "cs_idle_cpu_pct": f.cs_idle_cpu_pct,
            "loadavg_before": f.load_before,
            "loadavg_after": f.load_after,
        }),
    );
}

/// Waits until `rebound machines --output json` lists `want` machines; how
/// many it listed.
fn wait_listed(lab: &Sites, want: usize) -> Result<usize> {
    let start = Instant::now();
    loop {
        let v = lab.cli_json(&["machines"])?;
        let n = v["machines"].as_array().map(Vec::len).unwrap_or(0);
        if n >= want {
            if n != want {
                bail!("`rebound machines` lists {n} machines, {want} were simulated");
            }
            return Ok(n);
        }
        if start.elapsed() > LIST_TIMEOUT {
            bail!(
                "`rebound machines` lists {n} of {want} machines {:.0} s after every agent connected",
                LIST_TIMEOUT.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The machine count `rebound status --output json` gives.
fn status_machines(lab: &Sites) -> Result<u64> {
    let v = lab.cli_json(&["status"])?;
    v["machines"]
        .as_u64()
        .ok_or_else(|| anyhow!("`rebound status --output json` has no machine count: {v}"))
}

/// The times of `runs` runs of one CLI command, ms.
#[derive(Debug)]
struct Timed {
    ms: Vec<f64>,
    p50: f64,
    max: f64,
}

/// Runs `rebound ARGS` (the table an operator reads) `runs` times; every
/// run must succeed.
fn time_cli(lab: &Sites, args: &[&str], runs: usize) -> Result<Timed> {
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let r = lab.cli(args)?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if !r.ok {
            bail!("rebound {} failed: {}", args.join(" "), r.text());
        }
    }
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Timed {
        p50: sorted[sorted.len() / 2],
        max: sorted.last().copied().unwrap_or(0.0),
        ms,
    })
}

/// CPU seconds of a process so far.
fn cpu_secs(pid: u32) -> Result<f64> {
    crate::usage::cpu_secs_of(&pid.to_string())
        .ok_or_else(|| anyhow!("cannot read the CPU time of pid {pid} (/proc/{pid}/stat)"))
}

/// VmRSS of a process, bytes.
fn vm_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    kb.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
