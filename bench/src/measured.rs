//! The lab under measurement: a [`rebound_lab::Lab`] (`rebound-mt`,
//! `rebound-ps` and `rebound-agent` as real child processes on loopback,
//! configs, PKI and logs in the bench directory, which is kept) plus what
//! the bench reads from it: each process's peak RSS (VmHWM, also of a
//! process it stopped) and CPU seconds, the agent's status as numbers,
//! replication at rest, the MT's rollback RPCs and its retention journal
//! size.
//!
//! Child processes (not in-process tasks) because the bench reports each
//! process's peak RSS and because the cost of protection must include the
//! real process boundaries. The binaries are found as the lab finds them:
//! next to the running `rebound-bench`, so a release bench measures release
//! binaries (or in `REBOUND_BIN_DIR`).

use anyhow::{anyhow, bail, Context, Result};
use rebound_common::tls::TlsFiles;
use rebound_lab::config::SERVER_NAME;
use rebound_lab::{AgentAdmin, Component, Lab, LabOptions, RetentionConfig};
use rebound_proto::master_target_client::MasterTargetClient;
use rebound_proto::{ListPointsRequest, RestorePreImagesRequest, RollbackRequest};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tonic::transport::Channel;

use crate::usage::{cpu_secs_of, vm_hwm};

pub const MACHINE: &str = "bench";
pub const DISK: &str = "disk0";

/// Settings of one lab.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Where the protected disk `disk0.img` is (created sparse at
    /// `disk_size` when missing).
    pub source_dir: PathBuf,
    pub disk_size: u64,
    pub agent_buffer_bytes: u64,
    pub crash_interval_ms: u64,
    /// The MT's retention size cap (0 = none).
    pub retention_max_bytes: u64,
    /// The daemons serve `/metrics` (`metrics_listen`) or not.
    pub metrics: bool,
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
    pub fn parse(v: &Value) -> AgentStatus {
        let u = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        AgentStatus {
            mode: s("mode"),
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
            last_tag: s("last_tag"),
        }
    }

    /// The agent's status on an admin connection.
    pub fn read(admin: &mut AgentAdmin) -> Result<AgentStatus> {
        Ok(AgentStatus::parse(&admin.status()?))
    }
}

/// A lab of the three data-path processes and what the bench reads of it.
pub struct MeasuredLab {
    pub lab: Lab,
    /// The bench's runtime, for the MT client.
    rt: Handle,
    /// Peak RSS of processes the bench stopped, bytes.
    exited_peaks: BTreeMap<Component, u64>,
    mt: Option<MasterTargetClient<Channel>>,
}

impl MeasuredLab {
    /// Writes the PKI, the disk (if missing) and the configs into `dir`.
    pub fn new(dir: &Path, spec: LabSpec, rt: Handle) -> Result<MeasuredLab> {
        let opts = LabOptions {
            machine: MACHINE.into(),
            disks: vec![(DISK.into(), spec.disk_size)],
            source_dir: Some(spec.source_dir),
            crash_interval_ms: spec.crash_interval_ms,
            agent_buffer_bytes: spec.agent_buffer_bytes,
            shutdown_drain_secs: 120,
            retention: RetentionConfig {
                max_bytes: spec.retention_max_bytes,
                check_secs: 2,
                ..RetentionConfig::default()
            },
            metrics: spec.metrics,
            ..LabOptions::default()
        };
        Ok(MeasuredLab {
            lab: Lab::in_dir(dir, opts)?,
            rt,
            exited_peaks: BTreeMap::new(),
            mt: None,
        })
    }

    pub fn disk_size(&self) -> u64 {
        self.lab.opts.disks[0].1
    }

    /// The agent's NBD listener.
    pub fn agent_nbd(&self) -> SocketAddr {
        self.lab.agent_nbd
    }

    pub fn agent_state_dir(&self) -> PathBuf {
        self.lab.agent_state_dir()
    }

    /// Starts a component and waits until it listens.
    pub fn start(&mut self, c: Component) -> Result<()> {
        self.lab
            .start(c)
            .with_context(|| format!("starting {}", c.binary()))
    }

    pub fn pid(&self, c: Component) -> Option<u32> {
        self.lab.pid(c)
    }

    /// Peak resident set (VmHWM) of a component, bytes; for one the bench
    /// stopped, its peak at exit.
    pub fn peak_rss(&self, c: Component) -> Result<u64> {
        if let Some(pid) = self.pid(c) {
            return vm_hwm(pid);
        }
        self.exited_peaks
            .get(&c)
            .copied()
            .ok_or_else(|| anyhow!("{} never ran", c.name()))
    }

    /// CPU seconds (user + system) a running component has used so far.
    pub fn cpu_secs(&self, c: Component) -> Option<f64> {
        cpu_secs_of(&self.pid(c)?.to_string())
    }

    /// CPU seconds of agent, PS, MT and the bench itself (writer, sampler),
    /// to diff over a load.
    pub fn cpu_all(&self) -> [f64; 4] {
        [
            self.cpu_secs(Component::Agent).unwrap_or(0.0),
            self.cpu_secs(Component::Ps).unwrap_or(0.0),
            self.cpu_secs(Component::Mt).unwrap_or(0.0),
            cpu_secs_of("self").unwrap_or(0.0),
        ]
    }

    /// SIGTERM and wait for the clean exit (the agent drains first); its
    /// VmHWM is read until it is gone, so the peak at exit counts.
    pub fn stop(&mut self, c: Component) -> Result<Duration> {
        let pid = self
            .pid(c)
            .ok_or_else(|| anyhow!("{} is not running", c.name()))?;
        let first = vm_hwm(pid).unwrap_or(0);
        let done = Arc::new(AtomicBool::new(false));
        let watch = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut peak = first;
                while !done.load(Ordering::Relaxed) {
                    if let Ok(p) = vm_hwm(pid) {
                        peak = peak.max(p);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                peak
            })
        };
        let r = self.lab.stop(c);
        done.store(true, Ordering::Relaxed);
        let peak = watch.join().unwrap_or(first);
        self.exited_peaks.insert(c, peak);
        r
    }

    pub fn admin(&self) -> Result<AgentAdmin> {
        self.lab.admin()
    }

    pub fn agent_status(&self) -> Result<AgentStatus> {
        AgentStatus::read(&mut self.admin()?)
    }

    /// A client of the MT with the admin certificate, on the bench's runtime.
    pub fn mt(&mut self) -> Result<MasterTargetClient<Channel>> {
        if let Some(c) = &self.mt {
            return Ok(c.clone());
        }
        let tls = TlsFiles::in_dir(&self.lab.certs, "admin");
        let addr = self.lab.mt_addr.to_string();
        let ch = self
            .rt
            .block_on(tls.connect(&addr, SERVER_NAME, rebound_common::pki::Role::Mt))
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
            self.lab.check_alive(Component::Agent)?;
            let s = AgentStatus::read(&mut admin)?;
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
        self.lab.tag(kind)
    }

    /// Waits until the MT has applied `seq` (polled every 5 ms: the direct
    /// failover's drain time ends here).
    pub fn wait_applied(&mut self, seq: u64, timeout: Duration) -> Result<()> {
        let what = format!("the master target to apply seq {seq}");
        rebound_lab::wait_for(&what, timeout, Duration::from_millis(5), || {
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
            .map_err(|s| anyhow!("Rollback of {MACHINE} to {point} at the MT: {s}"))?
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
            .map_err(|s| anyhow!("RestorePreImages of {MACHINE} at the MT: {s}"))?
            .into_inner()
            .blocks_restored)
    }

    /// Undo records (4 KiB blocks) held in the MT's retention journal now.
    pub fn retained_blocks(&self) -> Result<u64> {
        let dir = self.lab.path(&format!("mt-data/{MACHINE}/retention"));
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
