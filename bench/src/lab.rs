//! The processes under measurement: `rebound-mt`, `rebound-ps` and
//! `rebound-agent` started as real child processes on loopback, with
//! generated configs and a lab PKI in the bench directory.
//!
//! Child processes (not in-process tasks as in the demo) because the bench
//! reports each process's peak RSS (VmHWM in /proc/PID/status) and because
//! the cost of protection must include the real process boundaries. The
//! binaries are the ones next to the running `rebound-bench`, so a release bench
//! measures release binaries.

use anyhow::{anyhow, bail, Context, Result};
use rebound_common::tls::TlsFiles;
use rebound_proto::master_target_client::MasterTargetClient;
use rebound_proto::{ListPointsRequest, RestorePreImagesRequest, RollbackRequest};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tonic::transport::Channel;

pub const MACHINE: &str = "bench";
pub const DISK: &str = "disk0";

/// The three data-path processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Comp {
    Mt,
    Ps,
    Agent,
}

impl Comp {
    pub fn binary(self) -> &'static str {
        match self {
            Comp::Agent => "rebound-agent",
            Comp::Ps => "rebound-ps",
            Comp::Mt => "rebound-mt",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Comp::Agent => "agent",
            Comp::Ps => "ps",
            Comp::Mt => "mt",
        }
    }
}

/// Where the data-path binaries are: next to the running `rebound-bench`.
#[derive(Debug, Clone)]
pub struct Bins {
    pub dir: PathBuf,
}

impl Bins {
    pub fn locate() -> Result<Bins> {
        let exe =
            std::env::current_exe().context("cannot find the running rebound-bench executable")?;
        let dir = exe
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?
            .to_path_buf();
        for c in [Comp::Agent, Comp::Ps, Comp::Mt] {
            let p = dir.join(c.binary());
            if !p.is_file() {
                bail!(
                    "{} not found next to {}: the bench runs the real binaries; build them with \
                     `cargo build --release --workspace --bins` and run target/release/rebound-bench",
                    p.display(),
                    exe.display()
                );
            }
        }
        Ok(Bins { dir })
    }

    pub fn path(&self, c: Comp) -> PathBuf {
        self.dir.join(c.binary())
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `cond` every `every` until it is true or `timeout` passes.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if cond()? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        std::thread::sleep(every);
    }
}

/// Settings of one lab.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// The protected disk file (created sparse at `disk_size` when missing).
    pub disk: PathBuf,
    pub disk_size: u64,
    pub agent_buffer_bytes: u64,
    pub crash_interval_ms: u64,
    /// The MT's retention size cap (0 = none).
    pub retention_max_bytes: u64,
}

/// The agent's status (INTERFACES.md "Agent local admin socket").
#[derive(Debug, Clone, Default)]
pub struct AgentStatus {
    pub mode: String,
    pub seq: u64,
    pub durable_seq: u64,
    pub buffer_bytes: u64,
    pub bytes_captured: u64,
    pub resync_bytes_sent: u64,
    pub lag_ms: u64,
    pub consistent: bool,
    pub last_tag: String,
}

impl AgentStatus {
    fn parse(v: &Value) -> AgentStatus {
        let u = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        AgentStatus {
            mode: v.get("mode").and_then(Value::as_str).unwrap_or("").into(),
            seq: u("seq"),
            durable_seq: u("durable_seq"),
            buffer_bytes: u("buffer_bytes"),
            bytes_captured: u("bytes_captured"),
            resync_bytes_sent: u("resync_bytes_sent"),
            lag_ms: u("lag_ms"),
            consistent: v
                .get("consistent")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            last_tag: v
                .get("last_tag")
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
        }
    }
}

/// A persistent connection to the agent's admin socket.
pub struct Admin {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Admin {
    pub fn connect(sock: &Path) -> Result<Admin> {
        let w = UnixStream::connect(sock)
            .with_context(|| format!("connecting to the agent admin socket {}", sock.display()))?;
        w.set_read_timeout(Some(Duration::from_secs(180)))?;
        Ok(Admin {
            r: BufReader::new(w.try_clone()?),
            w,
        })
    }

    pub fn call(&mut self, req: Value) -> Result<Value> {
        writeln!(self.w, "{req}")?;
        let mut line = String::new();
        self.r.read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("agent admin answer {line:?} is not JSON"))?;
        if let Some(e) = v.get("error") {
            bail!("agent admin {req}: {e}");
        }
        Ok(v)
    }

    pub fn status(&mut self) -> Result<AgentStatus> {
        Ok(AgentStatus::parse(
            &self.call(serde_json::json!({"cmd": "status"}))?,
        ))
    }
}

/// A running (or stopped) set of processes.
pub struct Lab {
    pub dir: PathBuf,
    pub spec: LabSpec,
    pub certs: PathBuf,
    pub ps_port: u16,
    pub mt_port: u16,
    pub mt_nbd_port: u16,
    pub agent_nbd_port: u16,
    bins: Bins,
    rt: Handle,
    procs: BTreeMap<Comp, Child>,
    /// Peak RSS of processes that already exited, bytes.
    exited_peaks: BTreeMap<Comp, u64>,
    mt: Option<MasterTargetClient<Channel>>,
}

impl Lab {
    /// Writes the PKI, the disk (if missing) and the configs into `dir`.
    pub fn new(dir: &Path, spec: LabSpec, bins: &Bins, rt: Handle) -> Result<Lab> {
        std::fs::create_dir_all(dir)?;
        let certs = dir.join("certs");
        rebound_common::pki::write_dev_bundle(&certs, &[MACHINE.to_string()])?;
        if !spec.disk.exists() {
            std::fs::File::create(&spec.disk)
                .and_then(|f| f.set_len(spec.disk_size))
                .with_context(|| format!("creating {}", spec.disk.display()))?;
        }
        let lab = Lab {
            dir: dir.to_path_buf(),
            spec,
            certs,
            ps_port: free_port()?,
            mt_port: free_port()?,
            mt_nbd_port: free_port()?,
            agent_nbd_port: free_port()?,
            bins: bins.clone(),
            rt,
            procs: BTreeMap::new(),
            exited_peaks: BTreeMap::new(),
            mt: None,
        };
        lab.write_configs()?;
        Ok(lab)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn agent_state_dir(&self) -> PathBuf {
        self.path("agent-state")
    }

    /// The `[tls]` section of component `name`'s config (its files in the
    /// lab's certificate directory).
    fn tls_toml(&self, name: &str) -> Result<String> {
        let files = TlsFiles::in_dir(&self.certs, name);
        Ok(format!("[tls]\n{}", toml::to_string(&files)?))
    }

    fn write_configs(&self) -> Result<()> {
        let s = &self.spec;
        let agent = format!(
            "machine_id = {MACHINE:?}\nstate_dir = {:?}\nnbd_listen = \"127.0.0.1:{}\"\n\
             crash_interval_ms = {}\nbuffer_bytes = {}\nshutdown_drain_secs = 120\n\
             [[disks]]\nname = {DISK:?}\npath = {:?}\n\
             [ps]\naddr = \"127.0.0.1:{}\"\nserver_name = \"localhost\"\n{}",
            self.agent_state_dir(),
            self.agent_nbd_port,
            s.crash_interval_ms,
            s.agent_buffer_bytes,
            s.disk,
            self.ps_port,
            self.tls_toml(&format!("agent-{MACHINE}"))?
        );
        std::fs::write(self.path("agent.toml"), agent)?;
        let ps = format!(
            "listen = \"127.0.0.1:{}\"\ncache_dir = {:?}\n{}[mt]\naddr = \"127.0.0.1:{}\"\nserver_name = \"localhost\"\n",
            self.ps_port,
            self.path("ps-cache"),
            self.tls_toml("ps")?,
            self.mt_port
        );
        std::fs::write(self.path("ps.toml"), ps)?;
        let mt = format!(
            "listen = \"127.0.0.1:{}\"\nnbd_listen = \"127.0.0.1:{}\"\ndata_dir = {:?}\n{}\
             [retention]\nmax_bytes = {}\ncheck_secs = 2\n",
            self.mt_port,
            self.mt_nbd_port,
            self.path("mt-data"),
            self.tls_toml("mt")?,
            s.retention_max_bytes
        );
        std::fs::write(self.path("mt.toml"), mt)?;
        Ok(())
    }

    fn log_tail(&self, c: Comp) -> String {
        let text =
            std::fs::read_to_string(self.path(&format!("{}.log", c.name()))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Starts a component and waits until it listens.
    pub fn start(&mut self, c: Comp) -> Result<()> {
        if self.procs.contains_key(&c) {
            bail!("{} is already running", c.name());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("{}.log", c.name())))?;
        let child = Command::new(self.bins.path(c))
            .args(["run", "--config"])
            .arg(self.path(&format!("{}.toml", c.name())))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bins.path(c).display()))?;
        self.procs.insert(c, child);
        let port = match c {
            Comp::Agent => self.agent_nbd_port,
            Comp::Ps => self.ps_port,
            Comp::Mt => self.mt_port,
        };
        let sock = self.agent_state_dir().join("admin.sock");
        let res = wait_for(
            &format!("{} to listen", c.name()),
            Duration::from_secs(60),
            Duration::from_millis(20),
            || {
                self.check_alive(c)?;
                let up = TcpStream::connect(("127.0.0.1", port)).is_ok();
                Ok(up && (c != Comp::Agent || UnixStream::connect(&sock).is_ok()))
            },
        );
        res.with_context(|| format!("starting {}", c.binary()))
    }

    fn check_alive(&self, c: Comp) -> Result<()> {
        if let Some(ch) = self.procs.get(&c) {
            let path = format!("/proc/{}/stat", ch.id());
            let zombie = std::fs::read_to_string(&path)
                .map(|s| s.contains(") Z "))
                .unwrap_or(true);
            if zombie {
                bail!(
                    "{} exited unexpectedly; log tail:\n{}",
                    c.name(),
                    self.log_tail(c)
                );
            }
        }
        Ok(())
    }

    pub fn pid(&self, c: Comp) -> Option<u32> {
        self.procs.get(&c).map(|ch| ch.id())
    }

    /// Peak resident set (VmHWM) of a component, bytes; for one that already
    /// exited, its peak at exit.
    pub fn peak_rss(&self, c: Comp) -> Result<u64> {
        if let Some(pid) = self.pid(c) {
            return vm_hwm(pid);
        }
        self.exited_peaks
            .get(&c)
            .copied()
            .ok_or_else(|| anyhow!("{} never ran", c.name()))
    }

    /// CPU seconds (user + system) a running component has used so far.
    pub fn cpu_secs(&self, c: Comp) -> Option<f64> {
        cpu_secs_of(&self.pid(c)?.to_string())
    }

    /// CPU seconds of agent, PS, MT and the bench itself (writer, sampler),
    /// to diff over a load.
    pub fn cpu_all(&self) -> [f64; 4] {
        [
            self.cpu_secs(Comp::Agent).unwrap_or(0.0),
            self.cpu_secs(Comp::Ps).unwrap_or(0.0),
            self.cpu_secs(Comp::Mt).unwrap_or(0.0),
            cpu_secs_of("self").unwrap_or(0.0),
        ]
    }

    /// SIGTERM and wait for the clean exit (the agent drains first).
    pub fn stop(&mut self, c: Comp) -> Result<Duration> {
        let pid = self
            .pid(c)
            .ok_or_else(|| anyhow!("{} is not running", c.name()))?;
        if let Ok(peak) = vm_hwm(pid) {
            self.exited_peaks.insert(c, peak);
        }
        let t = Instant::now();
        crate::sys::terminate(pid);
        loop {
            // The last VmHWM before the exit counts too.
            if let Ok(peak) = vm_hwm(pid) {
                let e = self.exited_peaks.entry(c).or_insert(0);
                *e = (*e).max(peak);
            }
            let ch = self.procs.get_mut(&c).expect("checked above");
            if let Some(st) = ch.try_wait()? {
                self.procs.remove(&c);
                if !st.success() {
                    bail!(
                        "{} exited with {st} on SIGTERM; log tail:\n{}",
                        c.name(),
                        self.log_tail(c)
                    );
                }
                return Ok(t.elapsed());
            }
            if t.elapsed() > Duration::from_secs(150) {
                let _ = ch.kill();
                let _ = ch.wait();
                self.procs.remove(&c);
                bail!("{} did not exit within 150 s of SIGTERM", c.name());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn admin(&self) -> Result<Admin> {
        Admin::connect(&self.agent_state_dir().join("admin.sock"))
    }

    pub fn agent_status(&self) -> Result<AgentStatus> {
        self.admin()?.status()
    }

    /// A client of the MT with the admin certificate.
    pub fn mt(&mut self) -> Result<MasterTargetClient<Channel>> {
        if let Some(c) = &self.mt {
            return Ok(c.clone());
        }
        let tls = TlsFiles::in_dir(&self.certs, "admin");
        let addr = format!("127.0.0.1:{}", self.mt_port);
        let ch = self
            .rt
            .block_on(tls.connect(&addr, "localhost"))
            .with_context(|| format!("connecting to the master target at {addr}"))?;
        let c = MasterTargetClient::new(ch).max_decoding_message_size(64 << 20);
        self.mt = Some(c.clone());
        Ok(c)
    }

    pub fn handle(&self) -> Handle {
        self.rt.clone()
    }

    /// The MT's applied seq of the bench machine (0 before it exists).
    pub fn applied_seq(&mut self) -> Result<u64> {
        let mut c = self.mt()?;
        let r = self.rt.block_on(c.list_points(ListPointsRequest {
            replication_id: MACHINE.into(),
        }));
        match r {
            Ok(r) => Ok(r.into_inner().applied_seq),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(0),
            Err(s) => Err(anyhow!("ListPoints at the master target: {s}")),
        }
    }

    /// Waits until the agent is in data mode with every change in the stream
    /// and the MT has applied everything: replication at rest.
    pub fn wait_settled(&mut self, timeout: Duration) -> Result<AgentStatus> {
        let mut admin = self.admin()?;
        let start = Instant::now();
        loop {
            self.check_alive(Comp::Agent)?;
            let s = admin.status()?;
            let at_rest = s.consistent && s.mode == "data" && s.durable_seq >= s.seq;
            let applied = if at_rest { self.applied_seq()? } else { 0 };
            if at_rest && applied >= s.seq {
                return Ok(s);
            }
            if start.elapsed() > timeout {
                let applied = self.applied_seq().unwrap_or(0);
                bail!(
                    "replication did not settle within {} s: agent mode {}, seq {}, durable {}, \
                     applied at the MT {applied}, consistent {}",
                    timeout.as_secs(),
                    s.mode,
                    s.seq,
                    s.durable_seq,
                    s.consistent
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Cuts a tag now; returns its id and seq.
    pub fn tag(&self, kind: &str) -> Result<(String, u64)> {
        let v = self
            .admin()?
            .call(serde_json::json!({"cmd": "tag", "kind": kind}))?;
        match (v["id"].as_str(), v["seq"].as_u64()) {
            (Some(id), Some(seq)) => Ok((id.to_string(), seq)),
            _ => bail!("the agent's tag answer {v} has no id or no seq"),
        }
    }

    /// Waits until the MT has applied `seq`.
    pub fn wait_applied(&mut self, seq: u64, timeout: Duration) -> Result<()> {
        let what = format!("the master target to apply seq {seq}");
        wait_for(&what, timeout, Duration::from_millis(5), || {
            Ok(self.applied_seq()? >= seq)
        })
    }

    /// Rolls the replica back to `point`; returns (blocks, undo bytes).
    pub fn rollback(&mut self, point: &str) -> Result<(u64, u64)> {
        let mut c = self.mt()?;
        let r = self
            .rt
            .block_on(c.rollback(RollbackRequest {
                replication_id: MACHINE.into(),
                point: point.into(),
            }))
            .map_err(|s| anyhow!("Rollback to {point}: {s}"))?
            .into_inner();
        Ok((r.blocks_restored, r.undo_bytes))
    }

    pub fn restore_pre_images(&mut self) -> Result<u64> {
        let mut c = self.mt()?;
        Ok(self
            .rt
            .block_on(c.restore_pre_images(RestorePreImagesRequest {
                replication_id: MACHINE.into(),
            }))
            .map_err(|s| anyhow!("RestorePreImages: {s}"))?
            .into_inner()
            .blocks_restored)
    }

    /// Undo records (4 KiB blocks) held in the MT's retention journal now.
    pub fn retained_blocks(&self) -> Result<u64> {
        let dir = self.path(&format!("mt-data/{MACHINE}/retention"));
        let mut n = 0;
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Ok(0);
        };
        for e in rd.flatten() {
            n += count_undo_records(&e.path()).unwrap_or(0);
        }
        Ok(n)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, mut ch) in std::mem::take(&mut self.procs) {
            let _ = ch.kill();
            let _ = ch.wait();
        }
    }
}

/// CPU seconds (user + system) of /proc/<pid> ("self" for this process).
pub fn cpu_secs_of(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / crate::sys::clock_ticks_per_sec())
}

/// CPU seconds the whole machine has been busy (all CPUs, everything but
/// idle and iowait), from the first line of /proc/stat.
pub fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let busy: f64 = f.iter().take(8).sum::<f64>() - f.get(3)? - f.get(4)?;
    Some(busy / crate::sys::clock_ticks_per_sec())
}

/// VmHWM of a process, bytes.
pub fn vm_hwm(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for l in s.lines() {
        if let Some(rest) = l.strip_prefix("VmHWM:") {
            let kb: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("parsing VmHWM {rest:?}"))?;
            return Ok(kb * 1024);
        }
    }
    bail!("no VmHWM in /proc/{pid}/status")
}

/// Counts the undo records of one journal file (master-target/src/journal.rs:
/// 32-byte header "RBU2" (or "RBU1" before its CRC32C checksum) … kind at
/// byte 16; kind 1 carries 4096 data bytes).
fn count_undo_records(path: &Path) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut off = 0u64;
    let mut n = 0u64;
    let mut h = [0u8; 32];
    while off + 32 <= len {
        f.read_exact_at(&mut h, off)?;
        if &h[0..4] != b"RBU2" && &h[0..4] != b"RBU1" {
            break;
        }
        n += 1;
        off += 32 + if h[16] == 1 { 4096 } else { 0 };
    }
    Ok(n)
}
