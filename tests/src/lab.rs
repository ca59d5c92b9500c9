//! A lab: one machine's agent, a process server and a master target as real
//! child processes on loopback, with configs, certificates and logs in a temp
//! dir. Processes can be killed with SIGKILL and restarted over the same
//! state, which is what the fault tests do.

use crate::clients::{blake3_export, blake3_file, nbd_uri};
use anyhow::{anyhow, bail, Context, Result};
use rebound_common::tls::TlsFiles;
use rebound_proto::master_target_client::MasterTargetClient;
use rebound_proto::{ListPointsRequest, RecoveryPoint};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The three component kinds a lab runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    Agent,
    Ps,
    Mt,
}

impl Component {
    fn binary(self) -> &'static str {
        match self {
            Component::Agent => "rebound-agent",
            Component::Ps => "rebound-ps",
            Component::Mt => "rebound-mt",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Component::Agent => "agent",
            Component::Ps => "ps",
            Component::Mt => "mt",
        }
    }
}

/// Path of a workspace binary next to the running test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .ok_or_else(|| anyhow!("cannot locate the target dir from {}", exe.display()))?;
    let path = profile_dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build the binaries first: `cargo build --workspace --bins && cargo test --workspace`",
            path.display()
        );
    }
    Ok(path)
}

/// A free loopback port for a server the test starts.
///
/// Ports come from 20000–32767, below Linux's ephemeral range, so neither a
/// client connection's source port nor another lab's port-0 bind can take
/// one between this call and the server's bind; a per-process counter keeps
/// the labs of one test binary (its tests run in parallel) apart, and the
/// pid spreads test binaries.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20000;
    const SPAN: u32 = 12700;
    let base = std::process::id().wrapping_mul(997) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (base + n * 7) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000-32767")
}

/// Polls `cond` until it is true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// Options for a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub machine: String,
    /// Disk names and sizes.
    pub disks: Vec<(String, u64)>,
    pub crash_interval_ms: u64,
    pub agent_buffer_bytes: u64,
    pub bitmap_after_secs: u64,
    pub ps_cache_max_bytes: u64,
    /// Extra TOML lines for the MT's `[retention]` table.
    pub mt_retention: String,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            machine: "m1".into(),
            disks: vec![("disk0".into(), 64 << 20)],
            crash_interval_ms: 60_000,
            agent_buffer_bytes: 256 << 20,
            bitmap_after_secs: 30,
            ps_cache_max_bytes: 8 << 30,
            mt_retention: String::new(),
        }
    }
}

pub struct Lab {
    pub dir: tempfile::TempDir,
    pub opts: LabOptions,
    pub certs: PathBuf,
    pub ps_port: u16,
    pub mt_port: u16,
    pub mt_nbd_port: u16,
    pub agent_nbd_port: u16,
    procs: BTreeMap<Component, Child>,
    rt: tokio::runtime::Runtime,
}

impl Lab {
    /// Makes the lab dir, PKI, source disks (sparse, zero) and configs.
    pub fn new(opts: LabOptions) -> Result<Lab> {
        let dir = tempfile::Builder::new().prefix("rebound-lab-").tempdir()?;
        let certs = dir.path().join("certs");
        rebound_common::pki::write_dev_bundle(&certs, std::slice::from_ref(&opts.machine))?;
        // A second, unrelated CA for the wrong-certificate tests.
        rebound_common::pki::write_dev_bundle(
            &dir.path().join("other-ca"),
            std::slice::from_ref(&opts.machine),
        )?;
        std::fs::create_dir_all(dir.path().join("source"))?;
        for (name, size) in &opts.disks {
            let f = std::fs::File::create(dir.path().join("source").join(format!("{name}.img")))?;
            f.set_len(*size)?;
        }
        let lab = Lab {
            certs,
            ps_port: free_port(),
            mt_port: free_port(),
            mt_nbd_port: free_port(),
            agent_nbd_port: free_port(),
            procs: BTreeMap::new(),
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?,
            opts,
            dir,
        };
        lab.write_configs()?;
        Ok(lab)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The source disk file of disk `i`.
    pub fn source_disk(&self, i: usize) -> PathBuf {
        self.path(&format!("source/{}.img", self.opts.disks[i].0))
    }

    pub fn agent_state_dir(&self) -> PathBuf {
        self.path("agent-state")
    }

    fn tls_toml(&self, name: &str) -> String {
        let t = TlsFiles::in_dir(&self.certs, name);
        format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            t.ca, t.cert, t.key
        )
    }

    fn write_configs(&self) -> Result<()> {
        let o = &self.opts;
        let mut agent = format!(
            "machine_id = {:?}\nstate_dir = {:?}\nnbd_listen = \"127.0.0.1:{}\"\ncrash_interval_ms = {}\nshutdown_drain_secs = 10\nbuffer_bytes = {}\nbitmap_after_secs = {}\n",
            o.machine,
            self.agent_state_dir(),
            self.agent_nbd_port,
            o.crash_interval_ms,
            o.agent_buffer_bytes,
            o.bitmap_after_secs,
        );
        for (i, (name, _)) in o.disks.iter().enumerate() {
            agent.push_str(&format!(
                "[[disks]]\nname = {name:?}\npath = {:?}\n",
                self.source_disk(i)
            ));
        }
        agent.push_str(&format!(
            "[ps]\naddr = \"127.0.0.1:{}\"\nserver_name = \"localhost\"\n",
            self.ps_port
        ));
        agent.push_str(&self.tls_toml(&format!("agent-{}", o.machine)));
        std::fs::write(self.path("agent.toml"), agent)?;

        let ps = format!(
            "listen = \"127.0.0.1:{}\"\ncache_dir = {:?}\ncache_max_bytes = {}\n{}[mt]\naddr = \"127.0.0.1:{}\"\nserver_name = \"localhost\"\n",
            self.ps_port,
            self.path("ps-cache"),
            o.ps_cache_max_bytes,
            self.tls_toml("ps"),
            self.mt_port
        );
        std::fs::write(self.path("ps.toml"), ps)?;

        let mt = format!(
            "listen = \"127.0.0.1:{}\"\nnbd_listen = \"127.0.0.1:{}\"\ndata_dir = {:?}\n{}[retention]\n{}\n",
            self.mt_port,
            self.mt_nbd_port,
            self.path("mt-data"),
            self.tls_toml("mt"),
            o.mt_retention
        );
        std::fs::write(self.path("mt.toml"), mt)?;
        Ok(())
    }

    /// Starts a component and waits until it listens.
    pub fn start(&mut self, c: Component) -> Result<()> {
        if self.procs.contains_key(&c) {
            bail!("{} already running", c.name());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("{}.log", c.name())))?;
        let child = Command::new(binary(c.binary())?)
            .args(["run", "--config"])
            .arg(self.path(&format!("{}.toml", c.name())))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", c.binary()))?;
        self.procs.insert(c, child);
        let port = match c {
            Component::Agent => self.agent_nbd_port,
            Component::Ps => self.ps_port,
            Component::Mt => self.mt_port,
        };
        let what = format!("{} to listen on port {port}", c.name());
        let res = wait_until(&what, Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        // A port answering is not enough: it must be our child answering
        // (a process that failed to bind exits at once).
        std::thread::sleep(Duration::from_millis(100));
        self.check_alive(c)?;
        res?;
        if c == Component::Agent {
            let sock = self.agent_state_dir().join("admin.sock");
            wait_until("agent admin socket", Duration::from_secs(30), || {
                UnixStream::connect(&sock).is_ok()
            })?;
        }
        Ok(())
    }

    pub fn start_all(&mut self) -> Result<()> {
        self.start(Component::Mt)?;
        self.start(Component::Ps)?;
        self.start(Component::Agent)
    }

    /// Fails when the component exited on its own.
    pub fn check_alive(&mut self, c: Component) -> Result<()> {
        if let Some(child) = self.procs.get_mut(&c) {
            if let Some(status) = child.try_wait()? {
                self.procs.remove(&c);
                bail!(
                    "{} exited unexpectedly ({status}); log tail:\n{}",
                    c.name(),
                    self.log_tail(c, 40)
                );
            }
        }
        Ok(())
    }

    pub fn is_running(&self, c: Component) -> bool {
        self.procs.contains_key(&c)
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self, c: Component) -> Result<()> {
        let mut child = self
            .procs
            .remove(&c)
            .ok_or_else(|| anyhow!("{} not running", c.name()))?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, c: Component) -> Result<()> {
        let mut child = self
            .procs
            .remove(&c)
            .ok_or_else(|| anyhow!("{} not running", c.name()))?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait()? {
                if !st.success() {
                    bail!(
                        "{} exited with {st} on SIGTERM:\n{}",
                        c.name(),
                        self.log_tail(c, 30)
                    );
                }
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                child.kill()?;
                bail!("{} did not exit within 60 s of SIGTERM", c.name());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self, c: Component, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.path(&format!("{}.log", c.name()))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn log(&self, c: Component) -> String {
        std::fs::read_to_string(self.path(&format!("{}.log", c.name()))).unwrap_or_default()
    }

    // ------------------------------------------------------------ agent

    /// One request on the agent's admin socket.
    pub fn agent_admin(&self, req: Value) -> Result<Value> {
        let sock = self.agent_state_dir().join("admin.sock");
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

    pub fn agent_status(&self) -> Result<Value> {
        self.agent_admin(serde_json::json!({"cmd": "status"}))
    }

    /// Cuts a tag now; returns its id and seq.
    pub fn tag(&self, kind: &str) -> Result<(String, u64)> {
        let v = self.agent_admin(serde_json::json!({"cmd": "tag", "kind": kind}))?;
        let id = v["id"]
            .as_str()
            .ok_or_else(|| anyhow!("tag answer {v} has no id"))?;
        let seq = v["seq"]
            .as_u64()
            .ok_or_else(|| anyhow!("tag answer {v} has no seq"))?;
        Ok((id.to_string(), seq))
    }

    pub fn agent_uri(&self, disk: &str) -> String {
        nbd_uri(self.agent_nbd_port, disk)
    }

    /// blake3 of a source disk file (the agent's backing file).
    pub fn source_hash(&self, i: usize) -> Result<String> {
        blake3_file(&self.source_disk(i))
    }

    // ------------------------------------------------------------ master target

    pub fn mt_client(&self) -> Result<MasterTargetClient<Channel>> {
        self.mt_client_as(&TlsFiles::in_dir(&self.certs, "admin"))
    }

    pub fn mt_client_as(&self, tls: &TlsFiles) -> Result<MasterTargetClient<Channel>> {
        rebound_common::tls::install_crypto_provider();
        let addr = format!("127.0.0.1:{}", self.mt_port);
        let ch = self.rt.block_on(tls.connect(&addr, "localhost"))?;
        Ok(MasterTargetClient::new(ch).max_decoding_message_size(64 << 20))
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The MT's points and applied seq for this lab's machine.
    pub fn points(&self) -> Result<(Vec<RecoveryPoint>, u64)> {
        let mut c = self.mt_client()?;
        let r = self
            .rt
            .block_on(c.list_points(ListPointsRequest {
                replication_id: self.opts.machine.clone(),
            }))?
            .into_inner();
        Ok((r.points, r.applied_seq))
    }

    /// Waits until the MT has applied `seq`.
    pub fn wait_applied(&self, seq: u64, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut last = 0;
        while start.elapsed() < timeout {
            if let Ok((_, applied)) = self.points() {
                last = applied;
                if applied >= seq {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "MT applied only up to seq {last} after {timeout:?}, wanted {seq}\nagent:\n{}\nps:\n{}\nmt:\n{}",
            self.log_tail(Component::Agent, 15),
            self.log_tail(Component::Ps, 15),
            self.log_tail(Component::Mt, 15)
        )
    }

    /// `nbd://…/<machine>/<disk>@<point>` on the MT.
    pub fn point_uri(&self, disk: &str, point: &str) -> String {
        nbd_uri(
            self.mt_nbd_port,
            &format!("{}/{disk}@{point}", self.opts.machine),
        )
    }

    /// blake3 of the MT's view of `disk` at `point`.
    pub fn point_hash(&self, disk: &str, point: &str) -> Result<String> {
        blake3_export(&self.point_uri(disk, point), &self.path("scratch-view.img"))
    }

    /// blake3 of the replica file itself (after a rollback, for instance).
    pub fn replica_hash(&self, disk: &str) -> Result<String> {
        blake3_file(&self.replica_path(disk))
    }

    pub fn replica_path(&self, disk: &str) -> PathBuf {
        self.path(&format!("mt-data/{}/replica/{disk}.img", self.opts.machine))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let comps: Vec<Component> = self.procs.keys().copied().collect();
        for c in comps {
            if let Some(mut child) = self.procs.remove(&c) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for c in [Component::Agent, Component::Ps, Component::Mt] {
                eprintln!(
                    "----- {} log tail -----\n{}",
                    c.name(),
                    self.log_tail(c, 40)
                );
            }
            // Keep the lab dir for a post-mortem.
            let path = self.dir.path().to_path_buf();
            eprintln!("lab dir kept at {}", path.display());
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

/// Writes `data` at `offset` of a file (used to prepare replicas in tests).
pub fn write_at(path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, offset)?;
    Ok(())
}
