//! The steps of `rebound demo`'s story over a running [`Sites`] lab: each
//! step drives the configuration server as the operator would, checks its
//! outcome by blake3 (a point's view at the MT, a handed-over replica) and
//! records what it measured.
//!
//! The lab's calls block (child processes, polling), so the long ones run
//! in [`blocking`] to keep the runtime's other threads serving the admin
//! connection.

use super::cs::Cs;
use super::io::{hash_export, nbd_io};
use super::summary::Measured;
use super::{step, A, B, DISK, MACHINE};
use anyhow::{anyhow, bail, Result};
use rebound_common::time::now_ms;
use rebound_lab::{blake3_file, nbd_uri, random_writes, Rng, Sites};
use rebound_proto::control as pb;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a machine may take to boot at a site after a hand-over.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a blocking lab call without stalling the async runtime.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

pub struct Story {
    pub sites: Sites,
    pub cs: Cs,
    pub m: Measured,
    pub rng: Rng,
    pub disk_size: u64,
}

impl Story {
    /// Random writes through the agent's NBD export at `site`.
    pub fn write(&mut self, site: &str, n: usize) -> Result<()> {
        let cmds = random_writes(&mut self.rng, self.disk_size, n);
        let addr = self.sites.agent_addr(MACHINE, site)?;
        self.m.written += nbd_io(&nbd_uri(addr, DISK), &cmds)?;
        Ok(())
    }

    /// Writes at `site` (whose disk is `disk`), tags a point, waits for it at
    /// `to`'s MT and checks its view there by blake3 against `disk`.
    async fn point(&mut self, site: &str, to: &str, disk: &Path) -> Result<()> {
        self.write(site, 32)?;
        let (id, seq) = self.sites.tag(MACHINE, site, "crash")?;
        let want = blake3_file(disk)?;
        let t = Instant::now();
        self.cs.wait_point(&id).await?;
        let lag = t.elapsed();
        self.m.lags.push(lag);
        let uri = self.sites.view_uri(to, MACHINE, DISK, &id)?;
        let t0 = Instant::now();
        loop {
            match hash_export(&uri) {
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
            .cs
            .admin()
            .protect(pb::ProtectRequest {
                machine: MACHINE.into(),
                to_site: to.into(),
                ps: rebound_lab::ps_id(from),
                mt: rebound_lab::mt_id(to),
                group: String::new(),
                policy: None,
            })
            .await?
            .into_inner();
        self.cs.settle(r.job, "Protected").await?;
        self.took(&format!("protect {from}→{to}"), t);
        Ok(())
    }

    async fn reprotect(&mut self, from: &str, to: &str) -> Result<()> {
        step(&format!(
            "reprotect {MACHINE} {from} → {to} (its agent at {from} re-registered)"
        ));
        let t = Instant::now();
        let r = self
            .cs
            .admin()
            .reprotect(pb::ReprotectRequest {
                targets: Cs::targets(),
                ps: rebound_lab::ps_id(from),
                mt: rebound_lab::mt_id(to),
                wait_agent_secs: 60,
                policy: None,
            })
            .await?
            .into_inner();
        let m = self.cs.settle(r.job, "Protected").await?;
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
    /// `source`; the replication id. Stops the agent left at `from`.
    async fn failover(&mut self, from: &str, to: &str, source: &Path) -> Result<String> {
        step(&format!(
            "planned failover {MACHINE} {from} → {to} at latest (fence, drain, hand over, power on)"
        ));
        let m = self.cs.machine().await?;
        println!("    agent-reported RPO before failover: {} ms", m.rpo_ms);
        self.m.rpo_ms.push((format!("{from}→{to}"), m.rpo_ms));
        self.sites.forget_boot(MACHINE, to);
        let t = Instant::now();
        let asked = now_ms();
        let r = self
            .cs
            .admin()
            .failover(pb::FailoverRequest {
                targets: Cs::targets(),
                from_site: from.into(),
                to_site: to.into(),
                point: Some(crate::operator::parse_point("latest")?),
                unplanned: false,
            })
            .await?
            .into_inner();
        let m = self.cs.settle(r.job, "FailedOver").await?;
        let powered = blocking(|| self.sites.wait_booted(MACHINE, to, BOOT_TIMEOUT))?;
        let rto = powered.saturating_sub(asked);
        self.m.rto.push((format!("{from}→{to}"), rto));
        self.took(&format!("failover {from}→{to}"), t);
        // The source's last content is what it held when it was fenced.
        let want = blake3_file(source)?;
        let got = blake3_file(&self.replica(to, &m.replication_id))?;
        if got != want {
            bail!("after failover at latest the replica at {to} has blake3 {got}, the source had {want}: writes were lost");
        }
        self.m.replicas += 1;
        println!(
            "    RTO {rto} ms (command → power_on hook); replica at {to} = source {}… (nothing lost)",
            &want[..16]
        );
        blocking(|| self.sites.stop_agent(MACHINE, from))?;
        Ok(m.replication_id)
    }

    async fn commit(&mut self, at: &str) -> Result<()> {
        step(&format!("commit {MACHINE} at {at}"));
        let t = Instant::now();
        let r = self
            .cs
            .admin()
            .commit(pb::CommitRequest {
                targets: Cs::targets(),
                keep_source_copy: None,
            })
            .await?
            .into_inner();
        self.cs.settle(r.job, "Committed").await?;
        self.cs.wait_online("agent", MACHINE).await?;
        let m = self.cs.machine().await?;
        if m.site != at {
            bail!("after commit {MACHINE} runs at {}, not {at}", m.site);
        }
        self.took(&format!("commit at {at}"), t);
        Ok(())
    }

    async fn change_point(&mut self, id: &str) -> Result<()> {
        let r = self
            .cs
            .admin()
            .change_point(pb::ChangePointRequest {
                machine: MACHINE.into(),
                point: Some(crate::operator::parse_point(id)?),
            })
            .await?
            .into_inner();
        self.cs.finish(r.job).await?;
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
        let m = self.cs.machine().await?;
        let back = m
            .failover_point
            .map(|p| p.id)
            .ok_or_else(|| anyhow!("{MACHINE} failed over but the CS shows no failover point"))?;
        step(&format!(
            "change-point before commit: {MACHINE} at {at} to {older} and back to {back}"
        ));
        let replica = self.replica(at, replication);
        let latest = blake3_file(&replica)?;
        let t = Instant::now();
        for (id, want) in [(older, older_hash), (back, latest)] {
            // The machine is off while its disks roll; the hook boots it again.
            blocking(|| self.sites.stop_agent(MACHINE, at))?;
            self.sites.forget_boot(MACHINE, at);
            self.change_point(&id).await?;
            blocking(|| self.sites.wait_booted(MACHINE, at, BOOT_TIMEOUT))?;
            let got = blake3_file(&replica)?;
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
        self.sites.replica_path(site, replication, DISK)
    }

    /// The whole story, from the machine's first writes at onprem to its
    /// protection onprem→azure again after a failover and a failback.
    pub async fn run(&mut self, points: usize) -> Result<()> {
        let disk = self.sites.source_disk(MACHINE, DISK);
        self.write(A, 64)?;
        self.protect(A, B).await?;
        step(&format!(
            "writing at {A} through NBD and verifying {points} recovery points at {B}"
        ));
        for _ in 0..points {
            self.point(A, B, &disk).await?;
        }
        let r1 = self.failover(A, B, &disk).await?;
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
}
