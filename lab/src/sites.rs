//! A multi-site lab for the control plane and the DR lifecycle: a
//! configuration server (`rebound-cs init` + `run`), per site one or more
//! process servers and a master target, and an agent per machine, all real
//! child processes, each simulated host on a loopback address of its own:
//! the CS, every site (its PSs and MT, enrolled with that address as their
//! certificate's name, see [`Sites::start_site`]) and every machine's agent
//! at each site. Nothing listens on 127.0.0.1 or 0.0.0.0.
//! Components enroll with `<binary> enroll --cs ADDR --passphrase-file F`;
//! the CLI (`rebound`) runs as a child process with the admin certificate
//! `init` wrote.
//!
//! Each MT's `[hooks] power_on` is a script that "boots" the machine at
//! that site: it starts a `rebound-agent` over the replica files the MT
//! handed over (detached with `setsid`, pid in `agents/<m>@<site>.pid`,
//! state dir `agents/<m>@<site>/state-<replication>`, the time it ran in
//! `agents/<m>@<site>/powered_on_ms`), so the agent re-registers with the
//! CS from the new site. A test that starts that agent itself stops it with
//! [`Sites::stop_agent`] and starts it again with [`Sites::start_agent`];
//! [`Sites::set_power_on`] turns the hooks off altogether. The MT's
//! `power_off` hook stops that agent; `test_power_on` / `test_power_off`
//! record their environment (see [`crate::power`]).
//!
//! Ids: sites `onprem` and `azure` by default, PS `ps-<site>` (more PSs:
//! `ps-<site>-2`, …), MT `mt-<site>` ([`ps_id`], [`mt_id`]); the agent of
//! machine `m` is `m`.
//!
//! Layout of the lab dir:
//! ```text
//! cs/                        the deployment (`rebound-cs init`); cs.log beside
//! cs2/                       the standby CS's (`init --join`), when asked for; cs2.log
//! <site>/<ps id>.toml, <site>/<ps id>/   PS config, enrolled certs, cache
//! <site>/mt.toml, mt/        MT config, certs, data (mt/data/<repl>/replica/<disk>.img)
//! agents/<m>/certs           the machine's enrolled agent certificate (moves with it)
//! agents/<m>@<site>/         agent.in.toml (the hook's template), agent.toml, state dir(s)
//! disks/<m>/<disk>.img       the machine's disks at its first site
//! power_on.sh, power_off.sh, test_power_on.sh, test_power_off.sh   the MT hooks
//! <name>.log                 logs: cs, ps-<site>, mt-<site>, agent-<m>@<site>
//! ```

use crate::admin;
use crate::bin::Bins;
use crate::clients::{blake3_export, blake3_file, nbd_tls_dir, nbd_uri, nbds_uri, qemu_io};
use crate::config;
use crate::net::Host;
use crate::pki::Enroller;
use crate::process::{self, Procs, START_TIMEOUT};
use crate::wait::{wait_for, wait_until};
use anyhow::{anyhow, bail, Context, Result};
pub use cs::{KilledCs, StandbyCs, CS, CS_STANDBY};
use rebound_agent::config::{Config as AgentConfig, DiskConfig};
use rebound_common::tls::TlsFiles;
use rebound_cs::store::scratch::ScratchDb;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

mod cs;

/// The placeholder the power_on hook replaces with the agent's state dir.
pub(crate) const STATE_DIR_MARK: &str = "@STATE_DIR@";

/// Options for a multi-site lab.
#[derive(Debug, Clone)]
pub struct SitesOptions {
    /// The sites: machines start at the first.
    pub sites: Vec<String>,
    /// Process servers per site (`ps-<site>`, `ps-<site>-2`, …).
    pub ps_per_site: usize,
    pub machines: Vec<String>,
    /// Disks of every machine: names and sizes.
    pub disks: Vec<(String, u64)>,
    /// The agents' crash-point interval.
    pub crash_interval_ms: u64,
    /// The CS heartbeat period (three missed = offline).
    pub heartbeat_secs: f64,
    /// Every daemon serves `/metrics` on a port of its host (its
    /// `metrics_listen`); false writes `metrics_listen = ""` (off).
    pub metrics: bool,
    /// The CS keeps its state in a PostgreSQL database of the lab's own
    /// (on the server `PG_SCRATCH_URL` names; the lab fails without
    /// it); false: the SQLite file, as `rebound-cs init` makes it.
    pub postgres: bool,
    /// A standby CS on a host of its own (needs `postgres`), started
    /// after the first and waiting for the store lease (`cs2`).
    pub standby_cs: bool,
}

impl Default for SitesOptions {
    fn default() -> Self {
        SitesOptions {
            sites: vec!["onprem".into(), "azure".into()],
            ps_per_site: 1,
            machines: vec!["m1".into()],
            disks: vec![("disk0".into(), 16 << 20)],
            crash_interval_ms: 1000,
            heartbeat_secs: 0.5,
            metrics: true,
            postgres: false,
            standby_cs: false,
        }
    }
}

/// Addresses of one site's servers.
#[derive(Debug, Clone)]
pub struct SiteAddrs {
    /// The site's host: its PSs and MT listen on this address.
    pub host: Host,
    /// The site's process servers, `ps_id(site)` first.
    pub ps: Vec<(String, SocketAddr)>,
    pub mt: SocketAddr,
    pub mt_nbd: SocketAddr,
}

pub struct Sites {
    pub dir: PathBuf,
    temp: Option<tempfile::TempDir>,
    pub opts: SitesOptions,
    pub bins: Bins,
    pub cs_addr: String,
    /// What the CLI and enrollment dial (`--cs`, `REBOUND_CS`): `cs_addr`,
    /// then the standby CS's address when there is one.
    pub cs_dial: String,
    /// The deployment dir: ca.pem, admin.pem, admin.key, passphrase, config.toml.
    pub cs_dir: PathBuf,
    pub sites: BTreeMap<String, SiteAddrs>,
    /// The NBD listener of each machine's agent per site ("m1@azure").
    pub agent_nbd: BTreeMap<String, SocketAddr>,
    procs: Procs,
    /// The standby CS, when the options ask for one.
    pub standby_cs: Option<StandbyCs>,
    /// The CS store's PostgreSQL database (dropped after the processes).
    store_db: Option<ScratchDb>,
}

/// `<machine>@<site>`.
fn at(machine: &str, site: &str) -> String {
    format!("{machine}@{site}")
}

/// The first PS id of a site in the lab: `ps-<site>`.
pub fn ps_id(site: &str) -> String {
    format!("ps-{site}")
}

/// The MT id of a site in the lab: `mt-<site>`.
pub fn mt_id(site: &str) -> String {
    format!("mt-{site}")
}

/// The id of the `n`th (from 0) PS of a site.
fn nth_ps_id(site: &str, n: usize) -> String {
    match n {
        0 => ps_id(site),
        n => format!("ps-{site}-{}", n + 1),
    }
}

impl Sites {
    /// Makes the dirs and disks, inits and starts the CS, enrolls and starts
    /// the PSs and the MT of every site, enrolls every machine's agent and
    /// starts it at the first site; waits until the CS sees them all online.
    pub fn start(opts: SitesOptions) -> Result<Sites> {
        let mut s = Sites::cs_only(opts)?;
        for site in s.opts.sites.clone() {
            s.start_site(&site)?;
        }
        for m in s.opts.machines.clone() {
            s.add_machine(&m)?;
        }
        Ok(s)
    }

    /// Only the CS (`rebound-cs init` + `run`) in a new temp dir, nothing
    /// enrolled yet.
    pub fn cs_only(opts: SitesOptions) -> Result<Sites> {
        let temp = tempfile::Builder::new()
            .prefix("rebound-sites-")
            .tempdir()?;
        let mut s = Sites::cs_in_dir(temp.path(), opts)?;
        s.temp = Some(temp);
        Ok(s)
    }

    /// Only the CS (and its standby, when asked for), in `dir`.
    pub fn cs_in_dir(dir: &Path, opts: SitesOptions) -> Result<Sites> {
        if opts.standby_cs && !opts.postgres {
            bail!("a standby CS needs the store on PostgreSQL (SitesOptions::postgres)");
        }
        std::fs::create_dir_all(dir)?;
        let store_db = if opts.postgres {
            Some(cs::scratch_db()?)
        } else {
            None
        };
        let cs_addr = Host::next().addr().to_string();
        let standby_cs = opts.standby_cs.then(|| StandbyCs {
            addr: Host::next().addr().to_string(),
            dir: dir.join("cs2"),
        });
        let cs_dial = match &standby_cs {
            Some(sb) => format!("{cs_addr},{}", sb.addr),
            None => cs_addr.clone(),
        };
        let mut s = Sites {
            dir: dir.to_path_buf(),
            temp: None,
            bins: Bins::locate()?,
            cs_addr,
            cs_dial,
            cs_dir: dir.join("cs"),
            sites: BTreeMap::new(),
            agent_nbd: BTreeMap::new(),
            procs: Procs::new(dir),
            opts,
            standby_cs,
            store_db,
        };
        s.init_cs()?;
        s.start_cs()?;
        if let Some(sb) = s.standby_cs.clone() {
            s.init_standby_cs(&sb)?;
            s.start_standby_cs()?;
        }
        s.write_hook_scripts()?;
        Ok(s)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn passphrase_file(&self) -> PathBuf {
        self.cs_dir.join("passphrase")
    }

    /// The machine's enrolled agent certificates (ca.pem, agent.pem, agent.key).
    pub fn agent_certs(&self, machine: &str) -> PathBuf {
        self.path(&format!("agents/{machine}/certs"))
    }

    // ------------------------------------------------------------ CS

    /// `<binary> enroll --cs --id --out`: an agent with the passphrase, a
    /// PS or MT with a token the lab's admin creates first.
    pub fn enroll(&self, bin: &str, id: &str, out: &Path) -> Result<()> {
        let pass = self.passphrase_file();
        self.enroller(&pass).enroll(bin, id, out)
    }

    /// The same with `--name` for each of `names` (a server's certificate).
    pub fn enroll_named(&self, bin: &str, id: &str, out: &Path, names: &[String]) -> Result<()> {
        let pass = self.passphrase_file();
        self.enroller(&pass).enroll_named(bin, id, out, names)
    }

    /// `<binary> enroll` with the passphrase file `pass`, whatever the
    /// role (no token); the raw output.
    pub fn enroll_with(&self, bin: &str, id: &str, out: &Path, pass: &Path) -> Result<Output> {
        let mut e = self.enroller(pass);
        e.admin_certs = None;
        e.output(bin, id, out)
    }

    /// `<binary> enroll --token-file` with `token` (any text); the raw
    /// output.
    pub fn enroll_token(&self, bin: &str, id: &str, out: &Path, token: &str) -> Result<Output> {
        self.enroller(&self.passphrase_file())
            .output_token(bin, id, out, token)
    }

    /// A one-time enrollment token for `role:id`, as the lab's operator
    /// creates it (`rebound token create`).
    pub fn token(&self, role: &str, id: &str) -> Result<String> {
        self.enroller(&self.passphrase_file()).token(role, id)
    }

    fn enroller<'a>(&'a self, passphrase_file: &'a Path) -> Enroller<'a> {
        Enroller {
            bins: &self.bins,
            cs_addr: &self.cs_dial,
            passphrase_file,
            admin_certs: Some(&self.cs_dir),
        }
    }

    // ------------------------------------------------------------ sites

    /// Enrolls and starts a site's PSs and MT and waits until all are
    /// online at the CS.
    ///
    /// A site is one host: its PSs and its MT listen on a loopback address
    /// of their own, and each enrolls with that address as its certificate's
    /// name (`enroll --name`), as on a real recovery site, so the agent's and
    /// the PS's TLS checks see the address they dial.
    pub fn start_site(&mut self, site: &str) -> Result<()> {
        let host = Host::next();
        let names = [host.to_string()];
        let addrs = SiteAddrs {
            host,
            ps: (0..self.opts.ps_per_site.max(1))
                .map(|n| (nth_ps_id(site, n), host.addr()))
                .collect(),
            mt: host.addr(),
            mt_nbd: host.addr(),
        };
        self.sites.insert(site.to_string(), addrs.clone());
        let mt_certs = self.path(&format!("{site}/mt/certs"));
        self.enroll_named("rebound-mt", &mt_id(site), &mt_certs, &names)?;
        self.write_mt_config(site, true)?;
        self.start_component(&mt_id(site))?;
        for (id, addr) in &addrs.ps {
            let dir = self.path(&format!("{site}/{id}"));
            self.enroll_named("rebound-ps", id, &dir.join("certs"), &names)?;
            let mut cfg = config::ps(
                *addr,
                &dir.join("cache"),
                addrs.mt,
                TlsFiles::in_dir(&dir.join("certs"), "ps"),
            );
            cfg.site = site.into();
            cfg.cs = self.cs_link();
            if !self.opts.metrics {
                cfg.metrics_listen.clear();
            }
            config::write_toml(&self.path(&format!("{site}/{id}.toml")), &cfg)?;
            self.start_component(id)?;
        }
        for (id, _) in &addrs.ps {
            self.wait_online("ps", id, Duration::from_secs(30))?;
        }
        self.wait_online("mt", &mt_id(site), Duration::from_secs(30))
    }

    fn write_mt_config(&self, site: &str, power_on: bool) -> Result<()> {
        let a = &self.sites[site];
        let mut cfg = config::mt(
            a.mt,
            a.mt_nbd,
            &self.path(&format!("{site}/mt/data")),
            TlsFiles::in_dir(&self.path(&format!("{site}/mt/certs")), "mt"),
        );
        cfg.site = site.into();
        cfg.cs = self.cs_link();
        if !self.opts.metrics {
            cfg.metrics_listen.clear();
        }
        cfg.hooks = self.mt_hooks(site, power_on);
        // The machines' disks, which a reprotect seeds from when kept.
        cfg.reprotect.seed_dirs = vec![self.path("disks")];
        config::write_toml(&self.path(&format!("{site}/mt.toml")), &cfg)
    }

    /// Starts a PS or MT of the lab by id (`ps-<site>…`, `mt-<site>`) with
    /// its config already written.
    pub(crate) fn start_component(&mut self, id: &str) -> Result<()> {
        let (site, a) = self
            .sites
            .iter()
            .find(|(site, a)| id == mt_id(site) || a.ps.iter().any(|(p, _)| p == id))
            .ok_or_else(|| anyhow!("no site runs {id}"))?;
        let (bin, cfg, ready) = if id == mt_id(site) {
            ("rebound-mt", self.path(&format!("{site}/mt.toml")), a.mt)
        } else {
            let addr = a.ps.iter().find(|(p, _)| p == id).map(|(_, a)| *a);
            let addr = addr.ok_or_else(|| anyhow!("no PS {id}"))?;
            ("rebound-ps", self.path(&format!("{site}/{id}.toml")), addr)
        };
        let bin = self.bins.path(bin)?;
        self.procs.start(id, &bin, &cfg, ready)
    }

    /// Turns the MTs' hooks (power_on, power_off, test_power_on,
    /// test_power_off) on or off (restarting the MTs). Off: a hand-over
    /// starts no agent; the test starts it with
    /// [`Sites::start_agent_on_replica`].
    pub fn set_power_on(&mut self, on: bool) -> Result<()> {
        for site in self.opts.sites.clone() {
            self.write_mt_config(&site, on)?;
            let id = mt_id(&site);
            if self.procs.is_running(&id) {
                self.stop(&id)?;
            }
            self.start_component(&id)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------ machines

    /// Makes the machine's disks (zero, sparse) at the first site, enrolls
    /// its agent, writes its agent configs for every site, starts it at the
    /// first site and waits until it is online.
    pub fn add_machine(&mut self, m: &str) -> Result<()> {
        let first = self.opts.sites[0].clone();
        std::fs::create_dir_all(self.path(&format!("disks/{m}")))?;
        for (name, size) in &self.opts.disks {
            let f = std::fs::File::create(self.source_disk(m, name))?;
            f.set_len(*size)?;
        }
        self.enroll("rebound-agent", m, &self.agent_certs(m))?;
        for site in self.opts.sites.clone() {
            self.write_agent_template(m, &site)?;
        }
        let disks: Vec<PathBuf> = (self.opts.disks.iter())
            .map(|(n, _)| self.source_disk(m, n))
            .collect();
        self.write_agent_config(m, &first, &disks)?;
        self.start_agent(m, &first)?;
        self.wait_online("agent", m, Duration::from_secs(30))
    }

    pub(crate) fn agent_dir(&self, machine: &str, site: &str) -> PathBuf {
        self.path(&format!("agents/{}", at(machine, site)))
    }

    /// The agent config of a machine at a site, without disks and with a
    /// placeholder state dir: what the power_on hook completes.
    fn write_agent_template(&mut self, machine: &str, site: &str) -> Result<()> {
        let d = self.agent_dir(machine, site);
        std::fs::create_dir_all(&d)?;
        let nbd = *self
            .agent_nbd
            .entry(at(machine, site))
            .or_insert_with(|| Host::next().addr());
        let cfg = AgentConfig {
            machine_id: machine.into(),
            site: site.into(),
            state_dir: PathBuf::from(STATE_DIR_MARK),
            nbd_listen: nbd.to_string(),
            metrics_listen: config::metrics_listen(nbd.ip(), self.opts.metrics),
            crash_interval_ms: self.opts.crash_interval_ms,
            shutdown_drain_secs: 10,
            tls: TlsFiles::in_dir(&self.agent_certs(machine), "agent"),
            cs: self.cs_link(),
            ..AgentConfig::default()
        };
        std::fs::write(d.join("agent.in.toml"), config::agent_without_disks(&cfg)?)?;
        Ok(())
    }

    /// The template completed with a state dir of the lab's and `disks`.
    fn write_agent_config(&mut self, machine: &str, site: &str, disks: &[PathBuf]) -> Result<()> {
        let d = self.agent_dir(machine, site);
        let mut cfg: AgentConfig = config::read_toml(&d.join("agent.in.toml"))?;
        cfg.state_dir = d.join("state");
        cfg.disks = (self.opts.disks.iter().zip(disks))
            .map(|((name, _), path)| DiskConfig {
                name: name.clone(),
                path: path.clone(),
                ..Default::default()
            })
            .collect();
        std::fs::write(
            d.join("state_dir"),
            cfg.state_dir.as_os_str().as_encoded_bytes(),
        )?;
        config::write_toml(&d.join("agent.toml"), &cfg)
    }

    /// Where a daemon of the lab serves `/metrics` and `/healthz` (its
    /// config's `metrics_listen`): `who` is "cs" (the standby "cs2"), a PS id, an MT id
    /// (`mt-<site>`) or "agent:<machine>@<site>".
    pub fn metrics_addr(&self, who: &str) -> Result<SocketAddr> {
        crate::metrics::metrics_addr(&self.config_file(who)?)
    }

    /// The config file of a daemon of the lab (see [`Sites::metrics_addr`]).
    pub fn config_file(&self, who: &str) -> Result<PathBuf> {
        if who == cs::CS || who == cs::CS_STANDBY {
            return Ok(self.cs_dir_of(who)?.join("config.toml"));
        }
        if let Some(key) = who.strip_prefix("agent:") {
            let (m, site) = key
                .split_once('@')
                .ok_or_else(|| anyhow!("{who}: write agent:<machine>@<site>"))?;
            let d = self.agent_dir(m, site);
            // The power_on hook writes agent.toml from the template, which
            // holds the same metrics_listen.
            let cfg = d.join("agent.toml");
            return Ok(if cfg.exists() {
                cfg
            } else {
                d.join("agent.in.toml")
            });
        }
        for (site, a) in &self.sites {
            if who == mt_id(site) {
                return Ok(self.path(&format!("{site}/mt.toml")));
            }
            if a.ps.iter().any(|(p, _)| p == who) {
                return Ok(self.path(&format!("{site}/{who}.toml")));
            }
        }
        bail!("no daemon {who} in the lab: write cs, a PS id, mt-<site> or agent:<machine>@<site>")
    }

    /// The state dir of the machine's agent at a site (the lab's, or the
    /// one the power_on hook chose).
    pub fn agent_state_dir(&self, machine: &str, site: &str) -> Result<PathBuf> {
        let f = self.agent_dir(machine, site).join("state_dir");
        let p = std::fs::read_to_string(&f)
            .with_context(|| format!("no agent of {machine} was started at {site}"))?;
        Ok(PathBuf::from(p.trim()))
    }

    /// The agent's NBD address at a site.
    pub fn agent_addr(&self, machine: &str, site: &str) -> Result<SocketAddr> {
        self.agent_nbd
            .get(&at(machine, site))
            .copied()
            .ok_or_else(|| anyhow!("{machine} has no agent config at {site}"))
    }

    /// Starts the machine's agent at a site (as a lab child) with the config
    /// already written there, and waits for its NBD port and admin socket.
    pub fn start_agent(&mut self, machine: &str, site: &str) -> Result<()> {
        let cfg = self.agent_dir(machine, site).join("agent.toml");
        let bin = self.bins.path("rebound-agent")?;
        let ready = self.agent_addr(machine, site)?;
        let name = format!("agent-{}", at(machine, site));
        self.procs.start(&name, &bin, &cfg, ready)?;
        let sock = self.agent_state_dir(machine, site)?.join("admin.sock");
        wait_until("agent admin socket", START_TIMEOUT, || {
            UnixStream::connect(&sock).is_ok()
        })
    }

    /// With the power_on hook off: start the agent at `site` over the
    /// replica files the site's MT holds for `replication`.
    pub fn start_agent_on_replica(
        &mut self,
        machine: &str,
        site: &str,
        replication: &str,
    ) -> Result<()> {
        let disks: Vec<PathBuf> = (self.opts.disks.iter())
            .map(|(n, _)| self.replica_path(site, replication, n))
            .collect();
        self.write_agent_config(machine, site, &disks)?;
        self.start_agent(machine, site)
    }

    /// The replica file of a disk at a site's MT.
    pub fn replica_path(&self, site: &str, replication: &str, disk: &str) -> PathBuf {
        self.path(&format!("{site}/mt/data/{replication}/replica/{disk}.img"))
    }

    pub(crate) fn hook_pid_file(&self, machine: &str, site: &str) -> PathBuf {
        self.path(&format!("agents/{}.pid", at(machine, site)))
    }

    fn hook_pid(&self, machine: &str, site: &str) -> Option<u32> {
        let p = std::fs::read_to_string(self.hook_pid_file(machine, site)).ok()?;
        p.trim().parse().ok()
    }

    /// Waits until the power_on hook started the agent at `site`, then
    /// for its NBD port.
    pub fn wait_powered_on(&mut self, machine: &str, site: &str, timeout: Duration) -> Result<()> {
        let pid_file = self.hook_pid_file(machine, site);
        wait_until(&format!("power_on of {machine} at {site}"), timeout, || {
            pid_file.exists()
        })?;
        let addr = self.agent_addr(machine, site)?;
        wait_until(
            &format!("the agent of {machine} at {site} to listen on {addr}"),
            START_TIMEOUT,
            || TcpStream::connect(addr).is_ok(),
        )
    }

    /// Kills (SIGKILL) the agent at a site, whether the lab or the hook
    /// started it.
    pub fn kill_agent(&mut self, machine: &str, site: &str) -> Result<()> {
        let name = format!("agent-{}", at(machine, site));
        if self.procs.is_running(&name) {
            self.procs.kill9(&name)?;
        }
        if let Some(pid) = self.hook_pid(machine, site) {
            process::kill9_pid(pid, START_TIMEOUT)?;
        }
        let _ = std::fs::remove_file(self.hook_pid_file(machine, site));
        Ok(())
    }

    /// SIGTERM the agent at a site and wait for it to exit.
    pub fn stop_agent(&mut self, machine: &str, site: &str) -> Result<()> {
        let name = format!("agent-{}", at(machine, site));
        if self.procs.is_running(&name) {
            return self.stop(&name);
        }
        if let Some(pid) = self.hook_pid(machine, site) {
            process::terminate_pid(pid, Duration::from_secs(30));
        }
        let _ = std::fs::remove_file(self.hook_pid_file(machine, site));
        Ok(())
    }

    /// SIGTERM a lab child ("cs", "ps-onprem", "mt-azure",
    /// "agent-m1@onprem") and wait for it.
    pub fn stop(&mut self, name: &str) -> Result<()> {
        self.procs.stop(name).map(|_| ())
    }

    /// The pid of the lab process `name` (as its log is named), while it
    /// runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.pid(name)
    }

    /// Every TCP address the lab's processes listen on (its children and
    /// the agents the power_on hook started).
    pub fn listening(&self) -> Result<Vec<SocketAddr>> {
        let mut pids: Vec<u32> = (self.procs.names().iter())
            .filter_map(|n| self.procs.pid(n))
            .collect();
        for key in self.agent_nbd.keys() {
            if let Some((m, site)) = key.split_once('@') {
                pids.extend(self.hook_pid(m, site));
            }
        }
        crate::net::listening(&pids).context("cannot read /proc/net/tcp")
    }

    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        self.procs.log_tail(name, lines)
    }

    // ------------------------------------------------------------ data

    /// One request on the agent's admin socket at a site.
    pub fn agent_admin(&self, machine: &str, site: &str, req: Value) -> Result<Value> {
        admin::call(
            &self.agent_state_dir(machine, site)?.join("admin.sock"),
            req,
        )
    }

    /// Cuts a tag on the agent at a site; its id and seq.
    pub fn tag(&self, machine: &str, site: &str, kind: &str) -> Result<(String, u64)> {
        let sock = self.agent_state_dir(machine, site)?.join("admin.sock");
        admin::AgentAdmin::connect(&sock)?.tag(kind)
    }

    /// Writes `pattern` bytes at `offset` through the agent's NBD export at
    /// a site (qemu-io).
    pub fn write(
        &self,
        machine: &str,
        site: &str,
        disk: &str,
        offset: u64,
        len: u64,
        pattern: u8,
    ) -> Result<()> {
        let addr = self.agent_addr(machine, site)?;
        qemu_io(
            &nbd_uri(addr, disk),
            &[format!("write -P {pattern} {offset} {len}")],
        )?;
        Ok(())
    }

    /// blake3 of a file (a disk or a replica).
    pub fn disk_hash_file(&self, path: &Path) -> Result<String> {
        blake3_file(path)
    }

    /// blake3 of the MT's read-only view of a machine's disk at a point
    /// (`latest` or a point id) at a site.
    pub fn view_hash(&self, site: &str, machine: &str, disk: &str, point: &str) -> Result<String> {
        let uri = self.view_uri(site, machine, disk, point)?;
        blake3_export(&uri, &self.path("scratch-view.img"))
    }

    /// `nbds://…/<machine>/<disk>@<point>?tls-certificates=…` on the MT of
    /// `site`, with the lab's admin certificate (views are served over TLS
    /// only).
    pub fn view_uri(&self, site: &str, machine: &str, disk: &str, point: &str) -> Result<String> {
        let a = self
            .sites
            .get(site)
            .ok_or_else(|| anyhow!("no site {site} in the lab"))?;
        let certs = nbd_tls_dir(
            &TlsFiles::in_dir(&self.cs_dir, "admin"),
            &self.path("nbd-admin"),
        )?;
        Ok(nbds_uri(
            a.mt_nbd,
            &format!("{machine}/{disk}@{point}"),
            &certs,
        ))
    }

    /// Waits until the MT view at `point` hashes to `want`.
    pub fn wait_view_hash(
        &self,
        site: &str,
        machine: &str,
        disk: &str,
        point: &str,
        want: &str,
        timeout: Duration,
    ) -> Result<()> {
        let what = format!("{machine}/{disk}@{point} at {site} to hash to {want}");
        let mut last = String::new();
        wait_for(&what, timeout, Duration::from_millis(300), || {
            if let Ok(h) = self.view_hash(site, machine, disk, point) {
                last = h;
            }
            Ok(last == want)
        })
        .map_err(|e| anyhow!("{e}; last hash {last}"))
    }

    /// The original disk file of a machine (first site).
    pub fn source_disk(&self, machine: &str, disk: &str) -> PathBuf {
        self.path(&format!("disks/{machine}/{disk}.img"))
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        for key in self.agent_nbd.keys().cloned().collect::<Vec<_>>() {
            if let Some((m, site)) = key.split_once('@') {
                if let Some(pid) = self.hook_pid(m, site) {
                    let _ = process::signal(pid, "KILL");
                }
            }
        }
        process::kill_everything_under(&self.dir);
        let names = self.procs.names();
        // Agents first, the CSs last.
        let mut order: Vec<&str> = names
            .iter()
            .filter(|n| n.starts_with("agent"))
            .map(String::as_str)
            .collect();
        order.extend(
            names
                .iter()
                .filter(|n| !n.starts_with("agent") && !n.starts_with("cs"))
                .map(String::as_str),
        );
        self.procs.kill_all(&order);
        if std::thread::panicking() {
            for n in &names {
                eprintln!("----- {n} log tail -----\n{}", self.log_tail(n, 40));
            }
            if let Some(t) = self.temp.take() {
                eprintln!("sites lab dir kept at {}", t.keep().display());
            }
        }
    }
}
