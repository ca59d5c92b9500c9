//! The configuration servers of a [`Sites`] lab: one CS on its SQLite file
//! (the default every test uses), or on a PostgreSQL database of its own
//! (a [`ScratchDb`] on the server `PG_SCRATCH_URL` names), optionally
//! with a standby CS on a host of its own that takes the store lease when
//! the active one dies.
//!
//! Names: the first CS is the lab process `cs` (its deployment in `cs/`),
//! the standby `cs2` (in `cs2/`, made with `rebound-cs init --join` and the
//! first one's store key). Which one is active is whichever holds the lease,
//! and only that one binds its listen address, so "which one listens" is
//! the lab's answer ([`Sites::active_cs`]). Components get `[cs] addr` and
//! `standby` (each CS has its own certificate: `server_name` empty, the
//! host of the address dialed), and the CLI and enrollment `--cs A,A2`
//! ([`Sites::cs_dial`], `A,A2`).

use super::Sites;
use crate::config;
use crate::process;
use anyhow::{anyhow, bail, Context, Result};
use rebound_common::control::CsConfig;
use rebound_cs::store::scratch::ScratchDb;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The lab process name of the first CS.
pub const CS: &str = "cs";
/// The lab process name of the standby CS.
pub const CS_STANDBY: &str = "cs2";

/// The standby configuration server of a lab: its listen address and its
/// deployment dir (ca.pem, cs.pem, store.key, config.toml; the admin
/// certificate is the first CS's).
#[derive(Debug, Clone)]
pub struct StandbyCs {
    pub addr: String,
    pub dir: PathBuf,
}

/// A CS the lab killed with SIGKILL ([`Sites::kill_cs_active`]).
#[derive(Debug, Clone)]
pub struct KilledCs {
    /// `cs` or `cs2`.
    pub name: String,
    /// Its listen address.
    pub addr: String,
    pub pid: u32,
    /// When the kill was sent.
    pub at: Instant,
}

/// A new PostgreSQL database for the lab's CS store; fails when
/// `PG_SCRATCH_URL` is unset (a test that asks for PostgreSQL never
/// runs on SQLite instead). Made on a thread with a runtime of its own, so
/// it works inside and outside a test's runtime.
pub(crate) fn scratch_db() -> Result<ScratchDb> {
    let t = std::thread::Builder::new()
        .stack_size(16 << 20)
        .spawn(|| -> Result<ScratchDb> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(rt.block_on(ScratchDb::create())?)
        })?;
    t.join()
        .map_err(|_| anyhow!("creating the scratch PostgreSQL database panicked"))?
        .context("the lab's CS store on PostgreSQL")
}

impl Sites {
    /// `rebound-cs init` of the first CS (on PostgreSQL with `--store-url`
    /// when the lab has a database), with short heartbeats and waits.
    pub(super) fn init_cs(&self) -> Result<()> {
        let host = rebound_common::tls::host_of(&self.cs_addr);
        let mut cmd = Command::new(self.bins.path("rebound-cs")?);
        cmd.args(["init", "--dir"]).arg(&self.cs_dir).args([
            "--listen",
            &self.cs_addr,
            "--name",
            host,
        ]);
        if let Some(db) = &self.store_db {
            cmd.args(["--store-url", &db.url]);
        }
        run_init(cmd, &self.cs_addr)?;
        self.tune_cs_config(&self.cs_dir, &self.cs_addr)
    }

    /// `rebound-cs init --join` of the standby CS in its own dir, with the
    /// first CS's store key.
    pub(super) fn init_standby_cs(&self, sb: &StandbyCs) -> Result<()> {
        let db = (self.store_db.as_ref())
            .ok_or_else(|| anyhow!("a standby CS needs the store on PostgreSQL"))?;
        let host = rebound_common::tls::host_of(&sb.addr);
        let mut cmd = Command::new(self.bins.path("rebound-cs")?);
        cmd.args(["init", "--dir"])
            .arg(&sb.dir)
            .args(["--listen", &sb.addr, "--name", host])
            .args(["--store-url", &db.url, "--join", "--secret-key-file"])
            .arg(self.cs_dir.join("store.key"));
        run_init(cmd, &sb.addr)?;
        self.tune_cs_config(&sb.dir, &sb.addr)
    }

    /// What the lab changes in a CS config `init` wrote: short heartbeats,
    /// a metrics port on its host (always for a pair: the standby's is how
    /// the lab sees it run), the timeouts of the tests.
    fn tune_cs_config(&self, dir: &Path, addr: &str) -> Result<()> {
        let host = rebound_common::tls::host_of(addr);
        let path = dir.join("config.toml");
        let mut cfg: rebound_cs::Config = config::read_toml(&path)?;
        cfg.heartbeat_secs = self.opts.heartbeat_secs;
        cfg.metrics_listen = config::metrics_listen(
            host.parse().context("the CS host is not an IP address")?,
            self.opts.metrics || self.standby_cs.is_some(),
        );
        cfg.command_timeout_secs = 30;
        cfg.drain_timeout_secs = 60;
        cfg.initial_sync_timeout_secs = 120;
        config::write_toml(&path, &cfg)
    }

    /// Starts the first CS and waits until it listens (on PostgreSQL: it
    /// took the lease).
    pub(super) fn start_cs(&mut self) -> Result<()> {
        let addr: SocketAddr = self.cs_addr.parse()?;
        let bin = self.bins.path("rebound-cs")?;
        self.procs
            .start(CS, &bin, &self.cs_dir.join("config.toml"), addr)
    }

    /// Starts the standby CS and waits until its metrics endpoint answers:
    /// it waits for the lease and does not bind its listen address.
    pub fn start_standby_cs(&mut self) -> Result<()> {
        let sb = self.standby()?.clone();
        let bin = self.bins.path("rebound-cs")?;
        let cfg = sb.dir.join("config.toml");
        let ready = crate::metrics::metrics_addr(&cfg)?;
        self.procs.start(CS_STANDBY, &bin, &cfg, ready)
    }

    /// Stops (SIGTERM) and starts the first CS again over the same store.
    pub fn restart_cs(&mut self) -> Result<()> {
        self.stop(CS)?;
        self.start_cs()
    }

    fn standby(&self) -> Result<&StandbyCs> {
        self.standby_cs
            .as_ref()
            .ok_or_else(|| anyhow!("this lab has no standby CS (SitesOptions::standby_cs)"))
    }

    /// The `[cs]` section of the lab's components: the first CS, checked
    /// by its host; with a standby both, each checked by the host dialed.
    pub(crate) fn cs_link(&self) -> CsConfig {
        match &self.standby_cs {
            Some(sb) => CsConfig {
                addr: self.cs_addr.clone(),
                standby: vec![sb.addr.clone()],
                server_name: String::new(),
            },
            None => config::cs_link(&self.cs_addr),
        }
    }

    /// The listen address of the lab's CS `name` (`cs` or `cs2`).
    pub fn cs_listen(&self, name: &str) -> Result<String> {
        match name {
            CS => Ok(self.cs_addr.clone()),
            CS_STANDBY => Ok(self.standby()?.addr.clone()),
            _ => bail!("no CS {name} in the lab: write {CS} or {CS_STANDBY}"),
        }
    }

    /// The deployment dir of the lab's CS `name`.
    pub fn cs_dir_of(&self, name: &str) -> Result<PathBuf> {
        match name {
            CS => Ok(self.cs_dir.clone()),
            CS_STANDBY => Ok(self.standby()?.dir.clone()),
            _ => bail!("no CS {name} in the lab: write {CS} or {CS_STANDBY}"),
        }
    }

    /// The running CS processes of the lab.
    fn running_cs(&self) -> Vec<&'static str> {
        [CS, CS_STANDBY]
            .into_iter()
            .filter(|n| self.procs.is_running(n))
            .collect()
    }

    /// The CS that serves now: the one running process whose listen address
    /// accepts (a standby does not bind it while it waits for the lease).
    pub fn active_cs(&self) -> Result<String> {
        let mut serving = Vec::new();
        for n in self.running_cs() {
            let addr: SocketAddr = self.cs_listen(n)?.parse()?;
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                serving.push(n);
            }
        }
        match serving.as_slice() {
            [one] => Ok(one.to_string()),
            [] => bail!(
                "no CS of the lab listens (running: {:?})",
                self.running_cs()
            ),
            many => bail!("more than one CS listens: {many:?}; the store lease is broken"),
        }
    }

    /// SIGKILLs the CS that serves now (no chance to release anything: the
    /// lease goes when PostgreSQL sees its session end).
    pub fn kill_cs_active(&mut self) -> Result<KilledCs> {
        let name = self.active_cs()?;
        let addr = self.cs_listen(&name)?;
        let pid = (self.procs.pid(&name)).ok_or_else(|| anyhow!("{name} is not running"))?;
        let at = Instant::now();
        self.procs.kill9(&name)?;
        Ok(KilledCs {
            name,
            addr,
            pid,
            at,
        })
    }

    /// Whether the CS `name` serves: `rebound machines` against it alone
    /// succeeds.
    pub fn cs_serves(&self, name: &str) -> Result<bool> {
        let addr = self.cs_listen(name)?;
        let r = crate::cli::run(&self.bins, &addr, &self.cs_dir, &["machines"])?;
        Ok(r.ok)
    }

    /// Waits until the CS `name` serves ([`Sites::cs_serves`]); how long
    /// after `since` it first did.
    pub fn wait_cs_serves(
        &self,
        name: &str,
        since: Instant,
        timeout: Duration,
    ) -> Result<Duration> {
        let addr: SocketAddr = self.cs_listen(name)?.parse()?;
        loop {
            // The CLI only once the port accepts: a child run costs more
            // than a connect.
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && self.cs_serves(name)?
            {
                return Ok(since.elapsed());
            }
            if since.elapsed() > timeout {
                bail!(
                    "{name} ({addr}) does not serve {timeout:?} after the start of the wait; \
                     log tail:\n{}",
                    self.log_tail(name, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a killed CS is gone: its process does not exist and nothing
    /// accepts on its listen address.
    pub fn cs_is_dead(&self, k: &KilledCs) -> Result<bool> {
        let addr: SocketAddr = k.addr.parse()?;
        let listens = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok();
        Ok(!process::alive(k.pid) && !listens)
    }
}

/// Runs a `rebound-cs init`; an error with its output when it fails.
fn run_init(mut cmd: Command, addr: &str) -> Result<()> {
    let out = cmd.output().context("cannot run rebound-cs init")?;
    if !out.status.success() {
        bail!(
            "rebound-cs init for {addr} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
