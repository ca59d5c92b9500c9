//! `rebound demo`: the whole story of DESIGN.md §1 on loopback, with no
//! setup. In a throw-away directory it starts, as real child processes of a
//! [`rebound_lab::Sites`] lab, a configuration server (SQLite) and per site
//! (`onprem` and `azure`) a process server and a master target, each on a
//! loopback address, enrolled with one-time tokens, and the demo machine's
//! agent, enrolled with the CS's passphrase; the binaries sit next to this executable (`cargo build
//! --workspace --bins`). It drives the CS through its Admin service with
//! the admin certificate, as the operator CLI does: protect onprem→azure,
//! planned failover at `latest`, change-point to an older point and back
//! before commit, commit, reprotect azure→onprem (the agent the MT's
//! power_on hook started at azure re-registered), failback at `latest`,
//! commit, reprotect onprem→azure. Data is written and read through NBD
//! with Rebound's own NBD client; every recovery point is checked by blake3
//! through the master target's NBD view and every hand-over by the
//! replica's blake3. It prints a summary with the measured RPO, RTO and the
//! duration of each step.

mod cs;
mod io;
mod story;
mod summary;

use anyhow::Result;
use cs::Cs;
use rebound_lab::{Bins, Rng, Sites, SitesOptions};
use std::path::Path;
use std::time::Instant;
use story::{blocking, Story};
use summary::Measured;

const A: &str = "onprem";
const B: &str = "azure";
const MACHINE: &str = "m1";
const DISK: &str = "disk0";

/// The binaries the demo starts, next to the `rebound` executable.
const BINARIES: [&str; 4] = ["rebound-cs", "rebound-ps", "rebound-mt", "rebound-agent"];

pub struct DemoOptions {
    /// Keep the directory (and print where it is) instead of deleting it.
    pub keep: bool,
    /// Size of the demo disk in MiB.
    pub disk_mib: u64,
    /// Recovery points to cut and verify while protected onprem→azure.
    pub points: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            keep: false,
            disk_mib: 16,
            points: 5,
        }
    }
}

fn step(msg: &str) {
    println!("==> {msg}");
}

/// The lab's options for the demo: two sites, one machine with one disk.
fn lab_options(disk_size: u64) -> SitesOptions {
    SitesOptions {
        sites: vec![A.into(), B.into()],
        machines: vec![MACHINE.into()],
        disks: vec![(DISK.into(), disk_size)],
        ..SitesOptions::default()
    }
}

/// Starts the lab in `dir`: the CS, both sites' servers and the machine's
/// agent at onprem; and the operator's connection to the CS.
async fn start(dir: &Path, disk_size: u64) -> Result<(Sites, Cs)> {
    step("configuration server (SQLite) and, per site, a process server and a master target, enrolled with one-time tokens");
    let mut sites = blocking(|| -> Result<Sites> {
        let mut s = Sites::cs_in_dir(dir, lab_options(disk_size))?;
        s.start_site(A)?;
        s.start_site(B)?;
        Ok(s)
    })?;
    let cs = Cs::connect(&sites).await?;
    step(&format!(
        "demo machine {MACHINE}: a {} MiB disk at {A}, its agent enrolled and registered",
        disk_size >> 20
    ));
    blocking(|| sites.add_machine(MACHINE))?;
    Ok((sites, cs))
}

/// Runs the demo; returns an error at the first check that fails, after
/// stopping everything it started.
pub async fn run(opts: DemoOptions) -> Result<()> {
    rebound_common::tls::install_crypto_provider();
    Bins::locate()?.check(&BINARIES)?;
    let tmp = tempfile::Builder::new().prefix("rebound-demo-").tempdir()?;
    let dir = tmp.path().to_path_buf();
    let started = Instant::now();
    step(&format!("throw-away directory {}", dir.display()));
    let disk_size = opts.disk_mib.max(4) << 20;
    let (sites, cs) = match start(&dir, disk_size).await {
        Ok(lab) => lab,
        Err(e) => return Err(kept(e, &dir, tmp, opts.keep)),
    };
    let mut story = Story {
        sites,
        cs,
        m: Measured::default(),
        rng: Rng::new(0x9e37_79b9_7f4a_7c15),
        disk_size,
    };
    let res = story.run(opts.points).await;
    step("stopping every component and agent");
    let stopped = blocking(|| story.sites.shutdown());
    if let Err(e) = res.and(stopped) {
        drop(story);
        return Err(kept(e, &dir, tmp, opts.keep));
    }
    story.m.print(disk_size, started.elapsed());
    if opts.keep {
        println!("  directory kept at {}", tmp.keep().display());
    }
    println!("demo passed");
    Ok(())
}

/// The demo's error; with `--keep` the directory stays and its path, where
/// each component logged to `<name>.log`, is printed first.
fn kept(e: anyhow::Error, dir: &Path, tmp: tempfile::TempDir, keep: bool) -> anyhow::Error {
    if keep {
        let _ = tmp.keep();
        eprintln!(
            "demo directory kept at {} (each component logs to <name>.log there)",
            dir.display()
        );
    }
    e
}
