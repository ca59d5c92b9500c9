//! A lab of one protected machine without a configuration server: its
//! agent, a process server and a master target as real child processes,
//! each on its own loopback address, with a dev PKI, typed configs and logs
//! in the lab dir. Components can be SIGKILLed and restarted over the same
//! state, which is what the fault tests and the bench do.
//!
//! Layout of the lab dir:
//! ```text
//! certs/, other-ca/       the lab PKI, and an unrelated CA for refusals
//! source/<disk>.img       the protected disks (unless LabOptions::source_dir)
//! agent.toml ps.toml mt.toml, agent.log ps.log mt.log
//! agent-state/ ps-cache/ mt-data/
//! ```

use crate::admin::AgentAdmin;
use crate::bin::Bins;
use crate::clients::{blake3_export, blake3_file, nbd_tls_dir, nbd_uri, nbds_uri};
use crate::config;
use crate::net::Host;
use crate::process::{Procs, START_TIMEOUT};
use crate::proxy::FaultProxy;
use crate::wait::{wait_for, wait_until};
use anyhow::{anyhow, Context, Result};
use rebound_common::tls::TlsFiles;
use rebound_mt::config::RetentionConfig;
use rebound_proto::master_target_client::MasterTargetClient;
use rebound_proto::{ListPointsRequest, RecoveryPoint};
use serde_json::Value;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

/// The three component kinds a lab runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    Agent,
    Ps,
    Mt,
}

impl Component {
    pub fn binary(self) -> &'static str {
        match self {
            Component::Agent => "rebound-agent",
            Component::Ps => "rebound-ps",
            Component::Mt => "rebound-mt",
        }
    }

    /// The name of its config and log in the lab dir.
    pub fn name(self) -> &'static str {
        match self {
            Component::Agent => "agent",
            Component::Ps => "ps",
            Component::Mt => "mt",
        }
    }
}

/// Options for a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub machine: String,
    /// Disk names and sizes.
    pub disks: Vec<(String, u64)>,
    /// Where the disk files are (created sparse when missing); default
    /// `<lab>/source`.
    pub source_dir: Option<PathBuf>,
    pub crash_interval_ms: u64,
    pub agent_buffer_bytes: u64,
    pub bitmap_after_secs: u64,
    pub shutdown_drain_secs: u64,
    pub ps_cache_max_bytes: u64,
    /// The MT's `[retention]`.
    pub retention: RetentionConfig,
    /// Routes agent → PS and PS → MT through a [`FaultProxy`] each (see
    /// [`Lab::proxies`]); TLS still runs end to end.
    pub fault_proxies: bool,
    /// Every daemon serves `/metrics` on a port of its host (its
    /// `metrics_listen`); false writes `metrics_listen = ""` (off).
    pub metrics: bool,
}

impl LabOptions {
    /// The defaults with one disk, `disk0`, of `size` bytes.
    pub fn disk_size(size: u64) -> LabOptions {
        LabOptions {
            disks: vec![("disk0".into(), size)],
            ..LabOptions::default()
        }
    }
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            machine: "m1".into(),
            disks: vec![("disk0".into(), 64 << 20)],
            source_dir: None,
            crash_interval_ms: 60_000,
            agent_buffer_bytes: 256 << 20,
            bitmap_after_secs: 30,
            shutdown_drain_secs: 10,
            ps_cache_max_bytes: 8 << 30,
            retention: RetentionConfig::default(),
            fault_proxies: false,
            metrics: true,
        }
    }
}

pub struct Lab {
    /// The lab dir (a temp dir unless [`Lab::in_dir`] named one).
    pub dir: PathBuf,
    temp: Option<tempfile::TempDir>,
    pub opts: LabOptions,
    pub certs: PathBuf,
    pub bins: Bins,
    /// The agent's NBD listener (the machine's host).
    pub agent_nbd: SocketAddr,
    pub ps_addr: SocketAddr,
    pub mt_addr: SocketAddr,
    /// The MT's NBD listener (point views).
    pub mt_nbd: SocketAddr,
    /// Agent → PS and PS → MT, with [`LabOptions::fault_proxies`].
    proxies: Option<(FaultProxy, FaultProxy)>,
    procs: Procs,
    rt: tokio::runtime::Runtime,
}

impl Lab {
    /// A lab in a new temp dir (kept when a test panics).
    pub fn new(opts: LabOptions) -> Result<Lab> {
        let temp = tempfile::Builder::new().prefix("rebound-lab-").tempdir()?;
        let mut lab = Lab::in_dir(temp.path(), opts)?;
        lab.temp = Some(temp);
        Ok(lab)
    }

    /// A lab in a new temp dir with MT, PS and agent started.
    pub fn started(opts: LabOptions) -> Result<Lab> {
        let mut lab = Lab::new(opts)?;
        lab.start_all()?;
        Ok(lab)
    }

    /// A lab in `dir`: PKI, source disks (sparse, zero, when missing) and
    /// configs; nothing started.
    pub fn in_dir(dir: &Path, opts: LabOptions) -> Result<Lab> {
        std::fs::create_dir_all(dir)?;
        let certs = dir.join("certs");
        crate::pki::dev_bundle(&certs, std::slice::from_ref(&opts.machine))?;
        // A second, unrelated CA for the wrong-certificate tests.
        crate::pki::dev_bundle(&dir.join("other-ca"), std::slice::from_ref(&opts.machine))?;
        let (agent, ps, mt) = (Host::next(), Host::next(), Host::next());
        let (ps_addr, mt_addr) = (ps.addr(), mt.addr());
        let proxies = if opts.fault_proxies {
            Some((
                FaultProxy::start("agent-ps", ps_addr)?,
                FaultProxy::start("ps-mt", mt_addr)?,
            ))
        } else {
            None
        };
        let lab = Lab {
            dir: dir.to_path_buf(),
            temp: None,
            certs,
            bins: Bins::locate()?,
            agent_nbd: agent.addr(),
            ps_addr,
            mt_addr,
            mt_nbd: mt.addr(),
            proxies,
            procs: Procs::new(dir),
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?,
            opts,
        };
        for i in 0..lab.opts.disks.len() {
            let path = lab.source_disk(i);
            if !path.exists() {
                std::fs::create_dir_all(path.parent().unwrap_or(dir))?;
                std::fs::File::create(&path)
                    .and_then(|f| f.set_len(lab.opts.disks[i].1))
                    .with_context(|| format!("cannot create {}", path.display()))?;
            }
        }
        lab.write_configs()?;
        Ok(lab)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The source disk file of disk `i`.
    pub fn source_disk(&self, i: usize) -> PathBuf {
        let dir = self
            .opts
            .source_dir
            .clone()
            .unwrap_or_else(|| self.path("source"));
        dir.join(format!("{}.img", self.opts.disks[i].0))
    }

    pub fn agent_state_dir(&self) -> PathBuf {
        self.path("agent-state")
    }

    pub fn config_path(&self, c: Component) -> PathBuf {
        self.path(&format!("{}.toml", c.name()))
    }

    /// Where a component serves `/metrics` and `/healthz` (its config's
    /// `metrics_listen`).
    pub fn metrics_addr(&self, c: Component) -> Result<SocketAddr> {
        crate::metrics::metrics_addr(&self.config_path(c))
    }

    fn write_configs(&self) -> Result<()> {
        let o = &self.opts;
        let disks: Vec<(String, PathBuf)> = (0..o.disks.len())
            .map(|i| (o.disks[i].0.clone(), self.source_disk(i)))
            .collect();
        let tls = |name: &str| TlsFiles::in_dir(&self.certs, name);
        let mut agent = config::agent(
            &o.machine,
            &self.agent_state_dir(),
            self.agent_nbd,
            &disks,
            self.ps_link(),
            tls(&format!("agent-{}", o.machine)),
        );
        agent.crash_interval_ms = o.crash_interval_ms;
        agent.buffer_bytes = o.agent_buffer_bytes;
        agent.bitmap_after_secs = o.bitmap_after_secs;
        agent.shutdown_drain_secs = o.shutdown_drain_secs;
        if !o.metrics {
            agent.metrics_listen.clear();
        }
        config::write_toml(&self.config_path(Component::Agent), &agent)?;

        let mut ps = config::ps(
            self.ps_addr,
            &self.path("ps-cache"),
            self.mt_link(),
            tls("ps"),
        );
        ps.cache_max_bytes = o.ps_cache_max_bytes;
        if !o.metrics {
            ps.metrics_listen.clear();
        }
        // Through a proxy the PS still checks the MT's own name.
        ps.mt.server_name = self.mt_addr.ip().to_string();
        config::write_toml(&self.config_path(Component::Ps), &ps)?;

        let mut mt = config::mt(self.mt_addr, self.mt_nbd, &self.path("mt-data"), tls("mt"));
        mt.retention = o.retention.clone();
        if !o.metrics {
            mt.metrics_listen.clear();
        }
        config::write_toml(&self.config_path(Component::Mt), &mt)
    }

    /// The fault proxies, agent → PS and PS → MT, when the lab runs with
    /// [`LabOptions::fault_proxies`].
    pub fn proxies(&self) -> Option<(&FaultProxy, &FaultProxy)> {
        self.proxies.as_ref().map(|(a, b)| (a, b))
    }

    /// Where the agent reaches the PS: its proxy, or the PS itself.
    fn ps_link(&self) -> SocketAddr {
        self.proxies.as_ref().map_or(self.ps_addr, |p| p.0.addr())
    }

    /// Where the PS reaches the MT: its proxy, or the MT itself.
    fn mt_link(&self) -> SocketAddr {
        self.proxies.as_ref().map_or(self.mt_addr, |p| p.1.addr())
    }

    fn ready_addr(&self, c: Component) -> SocketAddr {
        match c {
            Component::Agent => self.agent_nbd,
            Component::Ps => self.ps_addr,
            Component::Mt => self.mt_addr,
        }
    }

    /// Starts a component and waits until it listens (the agent: and its
    /// admin socket answers).
    pub fn start(&mut self, c: Component) -> Result<()> {
        let bin = self.bins.path(c.binary())?;
        let cfg = self.config_path(c);
        self.procs.start(c.name(), &bin, &cfg, self.ready_addr(c))?;
        if c == Component::Agent {
            let sock = self.agent_state_dir().join("admin.sock");
            wait_until("the agent admin socket", START_TIMEOUT, || {
                UnixStream::connect(&sock).is_ok()
            })?;
        }
        Ok(())
    }

    /// MT, PS, agent.
    pub fn start_all(&mut self) -> Result<()> {
        self.start(Component::Mt)?;
        self.start(Component::Ps)?;
        self.start(Component::Agent)
    }

    /// Fails when the component exited on its own.
    pub fn check_alive(&mut self, c: Component) -> Result<()> {
        self.procs.check_alive(c.name())
    }

    pub fn is_running(&self, c: Component) -> bool {
        self.procs.is_running(c.name())
    }

    pub fn pid(&self, c: Component) -> Option<u32> {
        self.procs.pid(c.name())
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self, c: Component) -> Result<()> {
        self.procs.kill9(c.name())
    }

    /// SIGTERM and wait for a clean exit; how long it took.
    pub fn stop(&mut self, c: Component) -> Result<Duration> {
        self.procs.stop_clean(c.name())
    }

    pub fn log_tail(&self, c: Component, lines: usize) -> String {
        self.procs.log_tail(c.name(), lines)
    }

    pub fn log(&self, c: Component) -> String {
        std::fs::read_to_string(self.procs.log_path(c.name())).unwrap_or_default()
    }

    // ------------------------------------------------------------ agent

    /// A connection to the agent's admin socket.
    pub fn admin(&self) -> Result<AgentAdmin> {
        AgentAdmin::connect(&self.agent_state_dir().join("admin.sock"))
    }

    /// One request on the agent's admin socket.
    pub fn agent_admin(&self, req: Value) -> Result<Value> {
        self.admin()?.call(req)
    }

    pub fn agent_status(&self) -> Result<Value> {
        self.admin()?.status()
    }

    /// Cuts a tag now; returns its id and seq.
    pub fn tag(&self, kind: &str) -> Result<(String, u64)> {
        self.admin()?.tag(kind)
    }

    /// Cuts a tag with writes paused; its id, seq and the blake3 of the
    /// first source disk at it.
    pub fn tag_hash(&self, kind: &str) -> Result<(String, u64, String)> {
        let (id, seq) = self.tag(kind)?;
        Ok((id, seq, self.source_hash(0)?))
    }

    /// A number from the agent's status (`resync_bytes_sent`, …).
    pub fn agent_counter(&self, key: &str) -> Result<u64> {
        let st = self.agent_status()?;
        st[key]
            .as_u64()
            .ok_or_else(|| anyhow!("the agent status has no number {key}: {st}"))
    }

    pub fn agent_uri(&self, disk: &str) -> String {
        nbd_uri(self.agent_nbd, disk)
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
        let addr = self.mt_addr.to_string();
        let ch = self
            .rt
            .block_on(tls.connect(&addr, config::SERVER_NAME, rebound_common::pki::Role::Mt))
            .with_context(|| format!("cannot connect to the master target at {addr}"))?;
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
            }))
            .map_err(|s| anyhow!("ListPoints of {} at the MT: {s}", self.opts.machine))?
            .into_inner();
        Ok((r.points, r.applied_seq))
    }

    /// Waits until the MT has applied `seq`.
    pub fn wait_applied(&self, seq: u64, timeout: Duration) -> Result<()> {
        let mut last = 0;
        let res = wait_for(
            &format!("the MT to apply seq {seq}"),
            timeout,
            Duration::from_millis(20),
            || {
                if let Ok((_, applied)) = self.points() {
                    last = applied;
                }
                Ok(last >= seq)
            },
        );
        res.map_err(|e| {
            anyhow!(
                "{e}: applied only up to {last}\nagent:\n{}\nps:\n{}\nmt:\n{}",
                self.log_tail(Component::Agent, 15),
                self.log_tail(Component::Ps, 15),
                self.log_tail(Component::Mt, 15)
            )
        })
    }

    /// Waits until the MT applied `seq`, then the blake3 of the first
    /// disk's view at `point`.
    pub fn applied_point_hash(&self, point: &str, seq: u64, timeout: Duration) -> Result<String> {
        self.wait_applied(seq, timeout)?;
        self.point_hash(&self.opts.disks[0].0, point)
    }

    /// `nbds://…/<machine>/<disk>@<point>?tls-certificates=…` on the MT,
    /// with the lab's admin certificate (views are served over TLS only).
    pub fn point_uri(&self, disk: &str, point: &str) -> Result<String> {
        Ok(nbds_uri(
            self.mt_nbd,
            &format!("{}/{disk}@{point}", self.opts.machine),
            &self.nbd_admin_dir()?,
        ))
    }

    /// The admin certificate as NBD clients read it (see [`nbd_tls_dir`]).
    pub fn nbd_admin_dir(&self) -> Result<PathBuf> {
        nbd_tls_dir(
            &TlsFiles::in_dir(&self.certs, "admin"),
            &self.path("nbd-admin"),
        )
    }

    /// blake3 of the MT's view of `disk` at `point`.
    pub fn point_hash(&self, disk: &str, point: &str) -> Result<String> {
        blake3_export(
            &self.point_uri(disk, point)?,
            &self.path("scratch-view.img"),
        )
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
        self.procs.kill_all(&["agent", "ps", "mt"]);
        if std::thread::panicking() {
            for c in [Component::Agent, Component::Ps, Component::Mt] {
                eprintln!(
                    "----- {} log tail -----\n{}",
                    c.name(),
                    self.log_tail(c, 40)
                );
            }
            if let Some(t) = self.temp.take() {
                eprintln!("lab dir kept at {}", t.keep().display());
            }
        }
    }
}
