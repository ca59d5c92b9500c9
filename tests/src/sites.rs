//! A multi-site lab for the control plane and the DR lifecycle: a
//! configuration server (`rebound-cs init` + `run`), per site a process
//! server and a master target, and an agent per machine, all real child
//! processes on loopback in a temp dir. Components enroll with
//! `<binary> enroll --cs ADDR --passphrase-file F`; the CLI (`rebound`) is
//! run as a child process too, with the admin certificate `init` wrote.
//!
//! Each MT's `[hooks] power_on` is a script that "boots" the machine at
//! that site: it starts a `rebound-agent` for the machine over the replica
//! files the MT handed over (detached with `setsid`, pid in
//! `<dir>/agents/<machine>@<site>.pid`, state dir
//! `agents/<machine>@<site>/state-<replication>`), so the agent re-registers
//! with the CS from the new site. A test that wants to start that agent
//! itself (the reprotect that waits for it) stops it with
//! [`Sites::stop_agent`] and later starts it again with
//! [`Sites::start_agent`] over the same config; [`Sites::set_power_on`]
//! turns the hook off altogether.
//!
//! Ids: sites `onprem` and `azure` by default, PS `ps-<site>`, MT
//! `mt-<site>` ([`ps_id`], [`mt_id`]); the agent of machine `m` is `m`.
//!
//! Layout of the lab dir:
//! ```text
//! cs/                        the deployment (`rebound-cs init`); cs.log beside
//! <site>/ps.toml, ps/        PS config, enrolled certs (ps/certs), cache
//! <site>/mt.toml, mt/        MT config, certs, data (mt/data/<repl>/replica/<disk>.img)
//! agents/<m>/certs           the machine's enrolled agent certificate (moves with it)
//! agents/<m>@<site>/         agent config, state dir(s), log of a hook-started agent
//! disks/<m>/<disk>.img       the machine's disks at its first site
//! power_on.sh                the MT hook
//! <name>.log                 logs of lab children: cs, ps-<site>, mt-<site>, agent-<m>@<site>
//! ```

use crate::clients::{blake3_export, blake3_file, nbd_uri, qemu_io};
use crate::lab::{binary, free_port, wait_until};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Options for a multi-site lab.
#[derive(Debug, Clone)]
pub struct SitesOptions {
    /// The two sites: machines start at the first.
    pub sites: [String; 2],
    pub machines: Vec<String>,
    /// Disks of every machine: names and sizes.
    pub disks: Vec<(String, u64)>,
    /// The agents' crash-point interval.
    pub crash_interval_ms: u64,
    /// The CS heartbeat period (three missed = offline).
    pub heartbeat_secs: f64,
}

impl Default for SitesOptions {
    fn default() -> Self {
        SitesOptions {
            sites: ["onprem".into(), "azure".into()],
            machines: vec!["m1".into()],
            disks: vec![("disk0".into(), 16 << 20)],
            crash_interval_ms: 1000,
            heartbeat_secs: 0.5,
        }
    }
}

/// Ports of one site's PS and MT.
#[derive(Debug, Clone)]
pub struct SitePorts {
    pub ps: u16,
    pub mt: u16,
    pub mt_nbd: u16,
}

/// What a CLI run gave.
#[derive(Debug)]
pub struct CliRun {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// stdout and stderr together (for error checks).
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

pub struct Sites {
    pub dir: tempfile::TempDir,
    pub opts: SitesOptions,
    pub cs_addr: String,
    /// The deployment dir: ca.pem, admin.pem, admin.key, passphrase, config.toml.
    pub cs_dir: PathBuf,
    pub ports: BTreeMap<String, SitePorts>,
    /// NBD port of each machine's agent, per site ("m1@azure").
    pub agent_nbd: BTreeMap<String, u16>,
    procs: BTreeMap<String, Child>,
}

/// `<machine>@<site>`.
fn at(machine: &str, site: &str) -> String {
    format!("{machine}@{site}")
}

impl Sites {
    /// Makes the dirs and disks, inits and starts the CS, enrolls and starts
    /// a PS and an MT per site, enrolls every machine's agent and starts it
    /// at the first site; waits until the CS sees them all online.
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

    /// Only the CS (`rebound-cs init` + `run`), nothing enrolled yet.
    pub fn cs_only(opts: SitesOptions) -> Result<Sites> {
        let dir = tempfile::Builder::new()
            .prefix("rebound-sites-")
            .tempdir()?;
        let cs_dir = dir.path().join("cs");
        let cs_port = free_port();
        let mut s = Sites {
            cs_addr: format!("127.0.0.1:{cs_port}"),
            cs_dir,
            ports: BTreeMap::new(),
            agent_nbd: BTreeMap::new(),
            procs: BTreeMap::new(),
            opts,
            dir,
        };
        s.init_cs()?;
        s.start_cs()?;
        s.write_power_on_script()?;
        Ok(s)
    }

    /// Enrolls and starts a site's PS (`ps-<site>`) and MT (`mt-<site>`),
    /// and waits until both are online at the CS.
    pub fn start_site(&mut self, site: &str) -> Result<()> {
        self.ports.insert(
            site.to_string(),
            SitePorts {
                ps: free_port(),
                mt: free_port(),
                mt_nbd: free_port(),
            },
        );
        self.enroll(
            "rebound-ps",
            &ps_id(site),
            &self.path(&format!("{site}/ps/certs")),
        )?;
        self.enroll(
            "rebound-mt",
            &mt_id(site),
            &self.path(&format!("{site}/mt/certs")),
        )?;
        self.write_ps_config(site)?;
        self.write_mt_config(site, true)?;
        self.start_component(&format!("mt-{site}"))?;
        self.start_component(&format!("ps-{site}"))?;
        self.wait_online("ps", &ps_id(site), Duration::from_secs(30))?;
        self.wait_online("mt", &mt_id(site), Duration::from_secs(30))
    }

    /// Makes the machine's disks (zero, sparse) at the first site, enrolls
    /// its agent, starts it there and waits until it is online.
    pub fn add_machine(&mut self, m: &str) -> Result<()> {
        let first = self.opts.sites[0].clone();
        std::fs::create_dir_all(self.path(&format!("disks/{m}")))?;
        for (name, size) in &self.opts.disks {
            let f = std::fs::File::create(self.path(&format!("disks/{m}/{name}.img")))?;
            f.set_len(*size)?;
        }
        self.enroll("rebound-agent", m, &self.agent_certs(m))?;
        let disks: Vec<PathBuf> = self
            .opts
            .disks
            .iter()
            .map(|(n, _)| self.path(&format!("disks/{m}/{n}.img")))
            .collect();
        self.write_agent_config(m, &first, &disks)?;
        self.start_agent(m, &first)?;
        self.wait_online("agent", m, Duration::from_secs(30))
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn passphrase_file(&self) -> PathBuf {
        self.cs_dir.join("passphrase")
    }

    /// The machine's enrolled agent certificates (ca.pem, agent.pem, agent.key).
    pub fn agent_certs(&self, machine: &str) -> PathBuf {
        self.path(&format!("agents/{machine}/certs"))
    }

    fn init_cs(&self) -> Result<()> {
        let out = Command::new(binary("rebound-cs")?)
            .args(["init", "--dir"])
            .arg(&self.cs_dir)
            .args(["--listen", &self.cs_addr])
            .output()?;
        if !out.status.success() {
            bail!(
                "rebound-cs init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Short heartbeats and waits for tests.
        let cfg = self.cs_dir.join("config.toml");
        let text = std::fs::read_to_string(&cfg)?;
        let hb = self.opts.heartbeat_secs;
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("heartbeat_secs") {
                    format!("heartbeat_secs = {hb:?}")
                } else if l.starts_with("command_timeout_secs") {
                    "command_timeout_secs = 30".to_string()
                } else if l.starts_with("drain_timeout_secs") {
                    "drain_timeout_secs = 60".to_string()
                } else if l.starts_with("initial_sync_timeout_secs") {
                    "initial_sync_timeout_secs = 120".to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&cfg, text + "\n")?;
        Ok(())
    }

    fn start_cs(&mut self) -> Result<()> {
        let cfg = self.cs_dir.join("config.toml");
        self.spawn("cs", "rebound-cs", &cfg)?;
        let port: u16 = self.cs_addr.rsplit(':').next().unwrap_or("0").parse()?;
        self.wait_port("cs", port)
    }

    /// Stops (SIGTERM) and starts the CS again over the same database.
    pub fn restart_cs(&mut self) -> Result<()> {
        self.stop("cs")?;
        self.start_cs()
    }

    /// `<binary> enroll --cs --passphrase-file --id --out`.
    pub fn enroll(&self, bin: &str, id: &str, out: &Path) -> Result<()> {
        let r = self.enroll_with(bin, id, out, &self.passphrase_file())?;
        if !r.status.success() {
            bail!(
                "{bin} enroll --id {id} failed: {}{}",
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            );
        }
        Ok(())
    }

    /// The same with any passphrase file; the raw output.
    pub fn enroll_with(&self, bin: &str, id: &str, out: &Path, pass: &Path) -> Result<Output> {
        std::fs::create_dir_all(out)?;
        Ok(Command::new(binary(bin)?)
            .args(["enroll", "--cs", &self.cs_addr, "--passphrase-file"])
            .arg(pass)
            .args(["--id", id, "--out"])
            .arg(out)
            .output()?)
    }

    fn tls_toml(dir: &Path, role: &str) -> String {
        format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            dir.join("ca.pem"),
            dir.join(format!("{role}.pem")),
            dir.join(format!("{role}.key"))
        )
    }

    fn cs_toml(&self) -> String {
        format!(
            "[cs]\naddr = {:?}\nserver_name = \"localhost\"\n",
            self.cs_addr
        )
    }

    fn write_ps_config(&self, site: &str) -> Result<()> {
        let p = &self.ports[site];
        let text = format!(
            "listen = \"127.0.0.1:{}\"\nsite = {site:?}\ncache_dir = {:?}\n{}[mt]\naddr = \"127.0.0.1:{}\"\nserver_name = \"localhost\"\n{}",
            p.ps,
            self.path(&format!("{site}/ps/cache")),
            Self::tls_toml(&self.path(&format!("{site}/ps/certs")), "ps"),
            p.mt,
            self.cs_toml(),
        );
        std::fs::write(self.path(&format!("{site}/ps.toml")), text)?;
        Ok(())
    }

    fn write_mt_config(&self, site: &str, power_on: bool) -> Result<()> {
        let p = &self.ports[site];
        let hook = if power_on {
            format!("{} {site}", self.path("power_on.sh").display())
        } else {
            String::new()
        };
        let text = format!(
            "listen = \"127.0.0.1:{}\"\nnbd_listen = \"127.0.0.1:{}\"\nsite = {site:?}\ndata_dir = {:?}\n{}{}[hooks]\npower_on = {hook:?}\nhook_timeout_secs = 30\n",
            p.mt,
            p.mt_nbd,
            self.path(&format!("{site}/mt/data")),
            Self::tls_toml(&self.path(&format!("{site}/mt/certs")), "mt"),
            self.cs_toml(),
        );
        std::fs::write(self.path(&format!("{site}/mt.toml")), text)?;
        Ok(())
    }

    /// Turns the MTs' power_on hook on or off (restarts both MTs when it
    /// changes). Off: a hand-over starts no agent; the test starts it with
    /// [`Sites::start_agent_on_replica`].
    pub fn set_power_on(&mut self, on: bool) -> Result<()> {
        for site in self.opts.sites.clone() {
            self.write_mt_config(&site, on)?;
            let name = format!("mt-{site}");
            if self.procs.contains_key(&name) {
                self.stop(&name)?;
            }
            self.start_component(&name)?;
        }
        Ok(())
    }

    /// The power_on hook: writes the agent config for the machine at the
    /// MT's site over the handed-over replica files and starts the agent
    /// detached. `$1` is the site; the MT gives REBOUND_MACHINE and
    /// REBOUND_DISKS.
    fn write_power_on_script(&self) -> Result<()> {
        let agent = binary("rebound-agent")?;
        let script = format!(
            r#"#!/bin/sh
# power_on hook of the lab: boot $REBOUND_MACHINE at site $1 from the replica.
set -e
site="$1"
m="$REBOUND_MACHINE"
base={base:?}
d="$base/agents/$m@$site"
# A fresh state dir per hand-over (the machine booted from this replica).
state="$d/state-$REBOUND_REPLICATION"
mkdir -p "$state"
echo "$REBOUND_POINT" > "$d/powered_on"
# The lab writes the agent config template (all but the disks) beforehand.
cp "$d/agent.head.toml" "$d/agent.toml"
printf 'state_dir = "%s"\n' "$state" >> "$d/agent.toml"
printf '%s' "$state" > "$d/state_dir"
for f in $REBOUND_DISKS; do
  n=$(basename "$f" .img)
  printf '[[disks]]\nname = "%s"\npath = "%s"\n' "$n" "$f" >> "$d/agent.toml"
done
cat "$d/agent.tail.toml" >> "$d/agent.toml"
RUST_LOG=info setsid {agent:?} run --config "$d/agent.toml" >> "$d/agent.log" 2>&1 < /dev/null &
echo $! > "$base/agents/$m@$site.pid"
"#,
            base = self.dir.path(),
            agent = agent,
        );
        let path = self.path("power_on.sh");
        std::fs::write(&path, script)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        for m in &self.opts.machines {
            for site in &self.opts.sites {
                self.write_agent_head_tail(m, site)?;
            }
        }
        Ok(())
    }

    fn agent_dir(&self, machine: &str, site: &str) -> PathBuf {
        self.path(&format!("agents/{}", at(machine, site)))
    }

    /// The agent config around the `[[disks]]`: head (top-level keys) and
    /// tail (tables).
    fn write_agent_head_tail(&self, machine: &str, site: &str) -> Result<()> {
        let d = self.agent_dir(machine, site);
        std::fs::create_dir_all(&d)?;
        let key = at(machine, site);
        let port = match self.agent_nbd.get(&key) {
            Some(p) => *p,
            None => free_port(),
        };
        let head = format!(
            "machine_id = {machine:?}\nsite = {site:?}\nnbd_listen = \"127.0.0.1:{port}\"\ncrash_interval_ms = {}\nshutdown_drain_secs = 10\n",
            self.opts.crash_interval_ms
        );
        let tail = format!(
            "{}{}",
            Self::tls_toml(&self.agent_certs(machine), "agent"),
            self.cs_toml()
        );
        std::fs::write(d.join("agent.head.toml"), head)?;
        std::fs::write(d.join("agent.tail.toml"), tail)?;
        std::fs::write(d.join("nbd_port"), port.to_string())?;
        Ok(())
    }

    fn write_agent_config(&mut self, machine: &str, site: &str, disks: &[PathBuf]) -> Result<()> {
        let d = self.agent_dir(machine, site);
        let mut text = std::fs::read_to_string(d.join("agent.head.toml"))?;
        let state = d.join("state");
        text.push_str(&format!("state_dir = {state:?}\n"));
        std::fs::write(d.join("state_dir"), state.as_os_str().as_encoded_bytes())?;
        for (i, f) in disks.iter().enumerate() {
            text.push_str(&format!(
                "[[disks]]\nname = {:?}\npath = {f:?}\n",
                self.opts.disks[i].0
            ));
        }
        text.push_str(&std::fs::read_to_string(d.join("agent.tail.toml"))?);
        std::fs::write(d.join("agent.toml"), text)?;
        Ok(())
    }

    /// The state dir of the machine's agent at a site (the lab's, or the
    /// one the power_on hook chose).
    pub fn agent_state_dir(&self, machine: &str, site: &str) -> Result<PathBuf> {
        let f = self.agent_dir(machine, site).join("state_dir");
        let p = std::fs::read_to_string(&f)
            .with_context(|| format!("no agent of {machine} was started at {site}"))?;
        Ok(PathBuf::from(p.trim()))
    }

    /// The agent's NBD port at a site.
    pub fn agent_port(&self, machine: &str, site: &str) -> Result<u16> {
        let p = std::fs::read_to_string(self.agent_dir(machine, site).join("nbd_port"))?;
        Ok(p.trim().parse()?)
    }

    /// Starts the machine's agent at a site (as a lab child) with the config
    /// already written there, and waits for its NBD port and admin socket.
    pub fn start_agent(&mut self, machine: &str, site: &str) -> Result<()> {
        let d = self.agent_dir(machine, site);
        let name = format!("agent-{}", at(machine, site));
        self.spawn(&name, "rebound-agent", &d.join("agent.toml"))?;
        let port = self.agent_port(machine, site)?;
        self.agent_nbd.insert(at(machine, site), port);
        self.wait_port(&name, port)?;
        let sock = self.agent_state_dir(machine, site)?.join("admin.sock");
        wait_until("agent admin socket", Duration::from_secs(30), || {
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
        let disks: Vec<PathBuf> = self
            .opts
            .disks
            .iter()
            .map(|(n, _)| self.replica_path(site, replication, n))
            .collect();
        self.write_agent_config(machine, site, &disks)?;
        self.start_agent(machine, site)
    }

    /// The replica file of a disk at a site's MT.
    pub fn replica_path(&self, site: &str, replication: &str, disk: &str) -> PathBuf {
        self.path(&format!("{site}/mt/data/{replication}/replica/{disk}.img"))
    }

    /// Waits until the power_on hook started the agent at `site`, then
    /// waits for its NBD port and admin socket.
    pub fn wait_powered_on(&mut self, machine: &str, site: &str, timeout: Duration) -> Result<()> {
        let pid_file = self.path(&format!("agents/{}.pid", at(machine, site)));
        wait_until(&format!("power_on of {machine} at {site}"), timeout, || {
            pid_file.exists()
        })?;
        let port = self.agent_port(machine, site)?;
        self.agent_nbd.insert(at(machine, site), port);
        wait_until(
            &format!("agent of {machine} at {site} to listen"),
            Duration::from_secs(30),
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
        )
    }

    /// Kills (SIGKILL) the agent at a site, whether the lab or the hook
    /// started it.
    pub fn kill_agent(&mut self, machine: &str, site: &str) -> Result<()> {
        let name = format!("agent-{}", at(machine, site));
        if let Some(mut c) = self.procs.remove(&name) {
            c.kill()?;
            c.wait()?;
        }
        self.kill_hook_agent(machine, site);
        Ok(())
    }

    /// SIGTERM the agent at a site and wait for it to exit.
    pub fn stop_agent(&mut self, machine: &str, site: &str) -> Result<()> {
        let name = format!("agent-{}", at(machine, site));
        if self.procs.contains_key(&name) {
            return self.stop(&name);
        }
        let pid_file = self.path(&format!("agents/{}.pid", at(machine, site)));
        if let Ok(p) = std::fs::read_to_string(&pid_file) {
            if let Ok(pid) = p.trim().parse::<i32>() {
                // SAFETY: kill(2) on the pid the hook recorded.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let start = Instant::now();
                // SAFETY: signal 0 only checks that the process exists.
                while unsafe { libc::kill(pid, 0) } == 0
                    && start.elapsed() < Duration::from_secs(30)
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = std::fs::remove_file(&pid_file);
        }
        Ok(())
    }

    fn kill_hook_agent(&self, machine: &str, site: &str) {
        let pid_file = self.path(&format!("agents/{}.pid", at(machine, site)));
        if let Ok(p) = std::fs::read_to_string(&pid_file) {
            if let Ok(pid) = p.trim().parse::<i32>() {
                // SAFETY: kill(2) on the pid the hook recorded.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = std::fs::remove_file(&pid_file);
        }
    }

    fn spawn(&mut self, name: &str, bin: &str, config: &Path) -> Result<()> {
        if self.procs.contains_key(name) {
            bail!("{name} already running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("{name}.log")))?;
        let child = Command::new(binary(bin)?)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {bin}"))?;
        self.procs.insert(name.to_string(), child);
        Ok(())
    }

    fn start_component(&mut self, name: &str) -> Result<()> {
        let (kind, site) = name
            .split_once('-')
            .ok_or_else(|| anyhow!("bad component name {name}"))?;
        let (bin, port) = match kind {
            "ps" => ("rebound-ps", self.ports[site].ps),
            "mt" => ("rebound-mt", self.ports[site].mt),
            _ => bail!("bad component name {name}"),
        };
        let cfg = self.path(&format!("{site}/{kind}.toml"));
        self.spawn(name, bin, &cfg)?;
        self.wait_port(name, port)
    }

    fn wait_port(&mut self, name: &str, port: u16) -> Result<()> {
        let res = wait_until(
            &format!("{name} to listen on {port}"),
            Duration::from_secs(30),
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        // Our child, not another lab's process on a reused port, must be
        // the one up.
        if let Some(c) = self.procs.get_mut(name) {
            if let Some(st) = c.try_wait()? {
                self.procs.remove(name);
                bail!(
                    "{name} exited ({st}) instead of listening on {port}:\n{}",
                    self.log_tail(name, 30)
                );
            }
        }
        res
    }

    /// SIGTERM a lab child ("cs", "ps-onprem", "mt-azure",
    /// "agent-m1@onprem") and wait for it.
    pub fn stop(&mut self, name: &str) -> Result<()> {
        let mut child = self
            .procs
            .remove(name)
            .ok_or_else(|| anyhow!("{name} not running"))?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                child.kill()?;
                child.wait()?;
                bail!("{name} did not exit within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    // ------------------------------------------------------------ CLI

    /// Runs `rebound ARGS --cs ADDR --certs <cs dir>` (stdin not a
    /// terminal, so long jobs print plain lines).
    pub fn cli(&self, args: &[&str]) -> Result<CliRun> {
        self.cli_with_certs(args, &self.cs_dir)
    }

    /// The same with another certificate dir (holding ca.pem, admin.pem,
    /// admin.key).
    pub fn cli_with_certs(&self, args: &[&str], certs: &Path) -> Result<CliRun> {
        let out = Command::new(binary("rebound")?)
            .args(args)
            .env("REBOUND_CS", &self.cs_addr)
            .env("REBOUND_CERTS", certs)
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .output()?;
        Ok(CliRun {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// A CLI command that must succeed; its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let r = self.cli(args)?;
        if !r.ok {
            bail!(
                "rebound {} failed:\n{}\n--- cs log ---\n{}",
                args.join(" "),
                r.text(),
                self.log_tail("cs", 30)
            );
        }
        Ok(r.stdout)
    }

    /// A listing with `--output json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let out = self.cli_ok(&a)?;
        serde_json::from_str(&out).with_context(|| format!("rebound {a:?} printed {out:?}"))
    }

    /// One machine from `rebound machines --output json`.
    pub fn machine(&self, id: &str) -> Result<Value> {
        let v = self.cli_json(&["machines"])?;
        v["machines"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["id"] == id).cloned())
            .ok_or_else(|| anyhow!("machine {id} not in `rebound machines`: {v}"))
    }

    /// Waits until the machine's replication state is `state`.
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Result<Value> {
        let start = Instant::now();
        let mut last = Value::Null;
        while start.elapsed() < timeout {
            if let Ok(m) = self.machine(id) {
                if m["state"] == state {
                    return Ok(m);
                }
                last = m;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("{id} not {state} after {timeout:?}: {last}")
    }

    /// Waits until a component is online at the CS (`rebound status`).
    pub fn wait_online(&self, role: &str, id: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut last = Value::Null;
        while start.elapsed() < timeout {
            if let Ok(v) = self.cli_json(&["status"]) {
                let found = v["components"].as_array().and_then(|cs| {
                    cs.iter()
                        .find(|c| c["role"] == role && c["id"] == id)
                        .cloned()
                });
                if let Some(c) = &found {
                    if c["health"] == "online" {
                        return Ok(());
                    }
                }
                last = found.unwrap_or(v);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("{role}:{id} not online at the CS after {timeout:?}: {last}")
    }

    /// Runs a lifecycle command with `--wait --output json`; the final job.
    pub fn job(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.push("--wait");
        self.cli_json(&a)
    }

    /// The machine's recovery points (`rebound points M --output json`).
    pub fn points(&self, machine: &str) -> Result<Value> {
        self.cli_json(&["points", machine])
    }

    // ------------------------------------------------------------ data

    /// One request on the agent's admin socket at a site.
    pub fn agent_admin(&self, machine: &str, site: &str, req: Value) -> Result<Value> {
        let sock = self.agent_state_dir(machine, site)?.join("admin.sock");
        let mut s = UnixStream::connect(&sock)
            .with_context(|| format!("cannot connect to {}", sock.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        writeln!(s, "{req}")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("agent admin answer {line:?} is not JSON"))?;
        if let Some(e) = v.get("error") {
            bail!("agent admin {req} failed: {e}");
        }
        Ok(v)
    }

    /// Cuts a tag on the agent at a site; its id and seq.
    pub fn tag(&self, machine: &str, site: &str, kind: &str) -> Result<(String, u64)> {
        let v = self.agent_admin(
            machine,
            site,
            serde_json::json!({"cmd": "tag", "kind": kind}),
        )?;
        Ok((
            v["id"].as_str().unwrap_or_default().to_string(),
            v["seq"].as_u64().unwrap_or(0),
        ))
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
        let port = self.agent_port(machine, site)?;
        qemu_io(
            &nbd_uri(port, disk),
            &[format!("write -P {pattern} {offset} {len}")],
        )?;
        Ok(())
    }

    /// blake3 of the file a machine's disk lives in at a site: the original
    /// disk at the first site, else the replica the MT handed over.
    pub fn disk_hash_file(&self, path: &Path) -> Result<String> {
        blake3_file(path)
    }

    /// blake3 of the MT's read-only view of a machine's disk at a point
    /// (`latest` or a point id) at a site.
    pub fn view_hash(&self, site: &str, machine: &str, disk: &str, point: &str) -> Result<String> {
        let uri = nbd_uri(
            self.ports[site].mt_nbd,
            &format!("{machine}/{disk}@{point}"),
        );
        blake3_export(&uri, &self.path("scratch-view.img"))
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
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            if let Ok(h) = self.view_hash(site, machine, disk, point) {
                if h == want {
                    return Ok(());
                }
                last = h;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        bail!("{machine}/{disk}@{point} at {site} is {last}, not {want}, after {timeout:?}")
    }

    /// A job as `rebound jobs ID --output json` shows it.
    pub fn get_job(&self, id: &str) -> Result<Value> {
        self.cli_json(&["jobs", id])
    }

    /// Waits until the job's status line contains `text`.
    pub fn wait_job_status(&self, id: &str, text: &str, timeout: Duration) -> Result<Value> {
        let start = Instant::now();
        let mut last = Value::Null;
        while start.elapsed() < timeout {
            let j = self.get_job(id)?;
            if j["status"].as_str().is_some_and(|s| s.contains(text)) {
                return Ok(j);
            }
            if j["state"] == "failed" || j["state"] == "succeeded" {
                bail!("job {id} ended before its status read {text:?}: {j}");
            }
            last = j;
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("job {id} status never read {text:?} in {timeout:?}: {last}")
    }

    /// The original disk file of a machine (first site).
    pub fn source_disk(&self, machine: &str, disk: &str) -> PathBuf {
        self.path(&format!("disks/{machine}/{disk}.img"))
    }
}

/// The PS id of a site in the lab: `ps-<site>`.
pub fn ps_id(site: &str) -> String {
    format!("ps-{site}")
}

/// The MT id of a site in the lab: `mt-<site>`.
pub fn mt_id(site: &str) -> String {
    format!("mt-{site}")
}

/// SIGKILLs every process whose command line names a path under `dir`:
/// power-on hooks start agents detached (setsid), and a hook that ran twice
/// (change-point) may have left one its pid file no longer names.
fn kill_everything_under(dir: &Path) {
    let needle = dir.to_string_lossy().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            // SAFETY: kill(2) on a process this lab started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        for m in self.opts.machines.clone() {
            for site in self.opts.sites.clone() {
                self.kill_hook_agent(&m, &site);
            }
        }
        kill_everything_under(self.dir.path());
        let names: Vec<String> = self.procs.keys().cloned().collect();
        // Agents first, the CS last.
        let mut order: Vec<String> = names
            .iter()
            .filter(|n| n.starts_with("agent"))
            .cloned()
            .collect();
        order.extend(
            names
                .iter()
                .filter(|n| !n.starts_with("agent") && *n != "cs")
                .cloned(),
        );
        order.extend(names.iter().filter(|n| *n == "cs").cloned());
        for n in order {
            if let Some(mut c) = self.procs.remove(&n) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            for n in names {
                eprintln!("----- {n} log tail -----\n{}", self.log_tail(&n, 40));
            }
            let path = self.dir.path().to_path_buf();
            eprintln!("sites lab dir kept at {}", path.display());
            let _ = std::mem::replace(
                &mut self.dir,
                tempfile::Builder::new()
                    .prefix("rebound-drop-")
                    .tempdir()
                    .expect("tempdir"),
            )
            .keep();
        }
    }
}
