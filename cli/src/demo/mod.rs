//! `rebound demo`: the whole story of DESIGN.md §1 on loopback, with no
//! setup. In a throw-away directory it initialises a configuration server
//! (SQLite), starts a process server and a master target per site
//! (`onprem` and `azure`) and the demo machine's agent, all in this process
//! (their libraries, enrolled with the CS's passphrase), and drives the CS
//! through its Admin service with the admin certificate, as the operator
//! CLI does: protect onprem→azure, planned failover at `latest`, commit,
//! reprotect azure→onprem (the agent the MT's power_on hook started at
//! azure re-registered), failback at `latest`, commit, reprotect
//! onprem→azure. Data is written through NBD with qemu-io; every recovery
//! point is checked by blake3 through the master target's NBD view and every
//! hand-over by the replica's blake3. It prints a summary with the measured
//! RPO, RTO and the duration of each step.
//!
//! The power_on hook boots the machine at the other site by running this
//! executable's hidden `__demo-agent` subcommand ([`agent_main`]).

mod io;
/// Also the in-process lab of the bench's failover through the CS.
pub mod lab;

use anyhow::{anyhow, bail, Result};
use io::{hash_export, hash_file, qemu_io};
use lab::{now_ms, Lab, DISK, MACHINE};
use rebound_proto::control as pb;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const A: &str = "onprem";
const B: &str = "azure";

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

/// The hidden `rebound __demo-agent --config FILE`: an agent over the
/// config the demo's power_on hook wrote, until SIGTERM.
pub async fn agent_main(config: &Path) -> Result<()> {
    let cfg: rebound_agent::config::Config = rebound_common::config::load(Some(config))
        .map_err(|e| anyhow!("loading the agent config: {e}"))?;
    let l = std::net::TcpListener::bind(&cfg.nbd_listen)
        .map_err(|e| anyhow!("cannot listen for NBD on {}: {e}", cfg.nbd_listen))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    rebound_agent::run(cfg, l, async move {
        term.recv().await;
    })
    .await
    .map_err(|e| anyhow!("agent: {e}"))
}

/// What the story measured.
#[derive(Default)]
struct Measured {
    verified: usize,
    replicas: usize,
    written: u64,
    lags: Vec<Duration>,
    rpo_ms: Vec<(String, u64)>,
    rto: Vec<(String, u64)>,
    steps: Vec<(String, Duration)>,
    /// Points verified while protected onprem→azure: id and blake3.
    first: Vec<(String, String)>,
    /// Change-point (rollback at the MT) checks passed.
    rollbacks: usize,
}

struct Story {
    lab: Lab,
    m: Measured,
    rng: u64,
    disk_size: u64,
    scratch: PathBuf,
}

impl Story {
    /// Random writes through the agent's NBD export at `site`.
    fn write(&mut self, site: &str, n: usize) -> Result<()> {
        let mut cmds = Vec::new();
        for _ in 0..n {
            self.rng = self
                .rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = self.rng;
            let len = ((r >> 40) % 256 + 1) * 512;
            let off = ((r >> 8) % ((self.disk_size - len) / 512)) * 512;
            cmds.push(format!("write -P {} {off} {len}", (r >> 32) % 255 + 1));
            self.m.written += len;
        }
        let port = self.lab.agent_port(site)?;
        qemu_io(&format!("nbd://127.0.0.1:{port}/{DISK}"), &cmds)
    }

    /// Writes at `site` (whose disk is `disk`), tags a point, waits for it at
    /// `to`'s MT and checks its view there by blake3 against `disk`.
    async fn point(&mut self, site: &str, to: &str, disk: &Path) -> Result<()> {
        self.write(site, 32)?;
        let (id, seq) = self.lab.tag(site)?;
        let want = hash_file(disk)?;
        let t = Instant::now();
        self.lab.wait_point(&id).await?;
        let lag = t.elapsed();
        self.m.lags.push(lag);
        let uri = format!(
            "nbd://127.0.0.1:{}/{MACHINE}/{DISK}@{id}",
            self.lab.mt_nbd[to]
        );
        let t0 = Instant::now();
        loop {
            match hash_export(&uri, &self.scratch) {
                Ok(h) if h == want => break,
                Ok(h) if t0.elapsed() > Duration::from_secs(30) => {
                    bail!("point {id} at {to}: the view's blake3 {h} differs from the disk's {want} at the tag")
                }
                Err(e) if t0.elapsed() > Duration::from_secs(30) => return Err(e),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        self.m.verified += 1;
        self.m.first.push((id.clone(), want.clone()));
        println!(
            "    point {id} (seq {seq}) listed {:.0} ms after the tag; view at {to} = {}… matches",
            lag.as_secs_f64() * 1000.0,
            &want[..16]
        );
        Ok(())
    }

    fn took(&mut self, name: &str, t: Instant) {
        let d = t.elapsed();
        println!("    {name}: {:.1} s", d.as_secs_f64());
        self.m.steps.push((name.to_string(), d));
    }

    async fn protect(&mut self, from: &str, to: &str) -> Result<()> {
        step(&format!("protect {MACHINE} {from} → {to}"));
        let t = Instant::now();
        let r = self
            .lab
            .admin
            .protect(pb::ProtectRequest {
                machine: MACHINE.into(),
                to_site: to.into(),
                ps: format!("ps-{from}"),
                mt: format!("mt-{to}"),
                group: String::new(),
                policy: None,
            })
            .await?
            .into_inner();
        self.lab.finish(r.job).await?;
        self.lab.wait_state("Protected").await?;
        self.took(&format!("protect {from}→{to}"), t);
        Ok(())
    }

    async fn reprotect(&mut self, from: &str, to: &str) -> Result<()> {
        step(&format!(
            "reprotect {MACHINE} {from} → {to} (its agent at {from} re-registered)"
        ));
        let t = Instant::now();
        let r = self
            .lab
            .admin
            .reprotect(pb::ReprotectRequest {
                targets: Some(pb::Targets {
                    machines: vec![MACHINE.into()],
                    plan: String::new(),
                }),
                ps: format!("ps-{from}"),
                mt: format!("mt-{to}"),
                wait_agent_secs: 60,
            })
            .await?
            .into_inner();
        self.lab.finish(r.job).await?;
        let m = self.lab.wait_state("Protected").await?;
        if m.from_site != from || m.to_site != to {
            bail!(
                "after reprotect {MACHINE} replicates {} → {}, not {from} → {to}",
                m.from_site,
                m.to_site
            );
        }
        self.took(&format!("reprotect {from}→{to}"), t);
        Ok(())
    }

    /// Planned failover at `latest`; checks the handed-over replica against
    /// `want`; the replication id. Stops the agent left at `from`.
    async fn failover(&mut self, from: &str, to: &str, source: &Path) -> Result<String> {
        step(&format!(
            "planned failover {MACHINE} {from} → {to} at latest (fence, drain, hand over, power on)"
        ));
        let m = self.lab.machine().await?;
        println!("    agent-reported RPO before failover: {} ms", m.rpo_ms);
        self.m.rpo_ms.push((format!("{from}→{to}"), m.rpo_ms));
        self.lab.clear_power_on(to);
        let t = Instant::now();
        let asked = now_ms();
        let r = self
            .lab
            .admin
            .failover(pb::FailoverRequest {
                targets: Some(pb::Targets {
                    machines: vec![MACHINE.into()],
                    plan: String::new(),
                }),
                from_site: from.into(),
                to_site: to.into(),
                point: Some(crate::operator::parse_point("latest")?),
                unplanned: false,
            })
            .await?
            .into_inner();
        self.lab.finish(r.job).await?;
        let m = self.lab.wait_state("FailedOver").await?;
        let powered = self.lab.wait_powered_on(to).await?;
        let rto = powered.saturating_sub(asked);
        self.m.rto.push((format!("{from}→{to}"), rto));
        self.took(&format!("failover {from}→{to}"), t);
        // The source's last content is what it held when it was fenced.
        let want = hash_file(source)?;
        let replica = self.replica(to, &m.replication_id);
        let got = hash_file(&replica)?;
        if got != want {
            bail!("after failover at latest the replica at {to} has blake3 {got}, the source had {want}: writes were lost");
        }
        self.m.replicas += 1;
        println!(
            "    RTO {rto} ms (command → power_on hook); replica at {to} = source {}… (nothing lost)",
            &want[..16]
        );
        self.lab.stop_agent(from).await?;
        Ok(m.replication_id)
    }

    async fn commit(&mut self, at: &str) -> Result<()> {
        step(&format!("commit {MACHINE} at {at}"));
        let t = Instant::now();
        let r = self
            .lab
            .admin
            .commit(pb::CommitRequest {
                targets: Some(pb::Targets {
                    machines: vec![MACHINE.into()],
                    plan: String::new(),
                }),
                keep_source_copy: None,
            })
            .await?
            .into_inner();
        self.lab.finish(r.job).await?;
        self.lab.wait_state("Committed").await?;
        self.lab.wait_online("agent", MACHINE).await?;
        let m = self.lab.machine().await?;
        if m.site != at {
            bail!("after commit {MACHINE} runs at {}, not {at}", m.site);
        }
        self.took(&format!("commit at {at}"), t);
        Ok(())
    }

    async fn change_point(&mut self, id: &str) -> Result<()> {
        let r = self
            .lab
            .admin
            .change_point(pb::ChangePointRequest {
                machine: MACHINE.into(),
                point: Some(crate::operator::parse_point(id)?),
            })
            .await?
            .into_inner();
        self.lab.finish(r.job).await?;
        Ok(())
    }

    /// Before commit: change-point to an older point (the MT powers the
    /// machine off, rolls the replica back and powers it on again through
    /// the hook) and back to the failover point, checking the replica by
    /// blake3 each time.
    async fn change_point_and_back(&mut self, at: &str, replication: &str) -> Result<()> {
        let Some((older, older_hash)) = self.m.first.get(self.m.first.len() / 2).cloned() else {
            return Ok(());
        };
        let m = self.lab.machine().await?;
        let back = m
            .failover_point
            .map(|p| p.id)
            .ok_or_else(|| anyhow!("{MACHINE} failed over but the CS shows no failover point"))?;
        step(&format!(
            "change-point before commit: {MACHINE} at {at} to {older} and back to {back}"
        ));
        let replica = self.replica(at, replication);
        let latest = hash_file(&replica)?;
        let t = Instant::now();
        for (id, want) in [(older, older_hash), (back, latest)] {
            // The machine is off while its disks roll; the hook boots it again.
            self.lab.stop_agent(at).await?;
            self.lab.clear_power_on(at);
            self.change_point(&id).await?;
            self.lab.wait_powered_on(at).await?;
            let got = hash_file(&replica)?;
            if got != want {
                bail!("after change-point to {id} the replica at {at} has blake3 {got}, the point had {want}");
            }
            println!("    replica = {id} {}…", &want[..16]);
            self.m.rollbacks += 1;
        }
        self.took("change-point older point and back", t);
        Ok(())
    }

    fn replica(&self, site: &str, replication: &str) -> PathBuf {
        self.lab
            .dir
            .join(format!("{site}/mt/data/{replication}/replica/{DISK}.img"))
    }

    async fn run(&mut self, points: usize, disk: &Path) -> Result<()> {
        self.write(A, 64)?;
        self.protect(A, B).await?;
        step(&format!(
            "writing at {A} through NBD and verifying {points} recovery points at {B}"
        ));
        for _ in 0..points {
            self.point(A, B, disk).await?;
        }
        let r1 = self.failover(A, B, disk).await?;
        self.change_point_and_back(B, &r1).await?;
        self.commit(B).await?;
        self.reprotect(B, A).await?;
        let at_b = self.replica(B, &r1);
        step(&format!("writing at {B}, verifying the point at {A}"));
        self.point(B, A, &at_b).await?;
        let r2 = self.failover(B, A, &at_b).await?;
        self.commit(A).await?;
        self.reprotect(A, B).await?;
        let at_a = self.replica(A, &r2);
        step(&format!("writing at {A} again, verifying the point at {B}"));
        self.point(A, B, &at_a).await?;
        Ok(())
    }

    fn summary(&self, total: Duration) {
        let m = &self.m;
        let mut lags = m.lags.clone();
        lags.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!();
        println!("Rebound demo summary");
        println!(
            "  sites                              : {A} and {B}, machine {MACHINE} ({} MiB disk)",
            self.disk_size >> 20
        );
        println!("  recovery points verified by blake3 : {}", m.verified);
        println!(
            "  hand-overs verified by blake3      : {} (nothing lost at latest)",
            m.replicas
        );
        println!(
            "  change-point checks by blake3      : {} (rollback to an older point and back)",
            m.rollbacks
        );
        println!(
            "  written through NBD                : {:.1} MiB",
            m.written as f64 / 1048576.0
        );
        println!(
            "  tag-to-applied lag (RPO bound)     : median {:.0} ms, max {:.0} ms",
            lags.get(lags.len() / 2)
                .copied()
                .map(ms)
                .unwrap_or_default(),
            lags.last().copied().map(ms).unwrap_or_default()
        );
        // RPO as the agent reported it to the CS just before each failover.
        for (d, r) in &m.rpo_ms {
            let label = format!("RPO before failover {d}");
            println!("  {label:<35}: {r} ms");
        }
        for (d, r) in &m.rto {
            let label = format!("RTO failover {d}");
            println!("  {label:<35}: {r} ms (command → power_on hook)");
        }
        for (name, d) in &m.steps {
            println!("  {name:<35}: {:.1} s", d.as_secs_f64());
        }
        println!(
            "  total                              : {:.1} s",
            total.as_secs_f64()
        );
    }
}

/// Runs the demo; returns an error at the first check that fails, after
/// stopping everything it started.
pub async fn run(opts: DemoOptions) -> Result<()> {
    rebound_common::tls::install_crypto_provider();
    let tmp = tempfile::Builder::new().prefix("rebound-demo-").tempdir()?;
    let dir = tmp.path().to_path_buf();
    let started = Instant::now();
    step(&format!("throw-away directory {}", dir.display()));
    step("configuration server (SQLite) and, per site, a process server and a master target, enrolled with the passphrase");
    let mut lab = Lab::start_cs(&dir).await?;
    let res = async {
        lab.start_site(A).await?;
        lab.start_site(B).await?;
        let disk_size = opts.disk_mib.max(4) << 20;
        step(&format!(
            "demo machine {MACHINE}: a {} MiB disk at {A}, its agent enrolled and registered",
            disk_size >> 20
        ));
        let disk = lab.add_machine(&[A, B], disk_size).await?;
        Ok::<_, anyhow::Error>((disk, disk_size))
    }
    .await;
    let (res, story) = match res {
        Ok((disk, disk_size)) => {
            let mut s = Story {
                lab,
                m: Measured::default(),
                rng: 0x9e37_79b9_7f4a_7c15,
                disk_size,
                scratch: dir.join("scratch.img"),
            };
            let r = s.run(opts.points, &disk).await;
            (r, Some(s))
        }
        Err(e) => {
            let _ = lab.shutdown(&[A, B]).await;
            return Err(e);
        }
    };
    let mut story = story.expect("story");
    step("stopping every component and agent");
    let stopped = story.lab.shutdown(&[A, B]).await;
    if let Err(e) = res {
        if opts.keep {
            eprintln!("demo directory kept at {}", tmp.keep().display());
        }
        return Err(e);
    }
    stopped?;
    story.summary(started.elapsed());
    if opts.keep {
        println!("  directory kept at {}", tmp.keep().display());
    }
    println!("demo passed");
    Ok(())
}
