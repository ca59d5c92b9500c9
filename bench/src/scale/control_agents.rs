//! Many simulated agents in this one process, each a real participant of
//! the configuration server's control plane: enrolled with the deployment
//! passphrase through the component side of enrollment
//! ([`rebound_common::enrollment::enroll`], what `rebound-agent enroll`
//! calls), then holding the control stream through the component side of
//! the control channel ([`rebound_common::control::spawn`], what the agent
//! runs): the hello an agent sends (site, disks, writable, instance), a
//! heartbeat and an agent status every period, an answer to every command.
//!
//! Nothing is replicated: the machines stay unprotected, so what the CS
//! carries is the control plane of a thousand machines and nothing else.

use anyhow::{anyhow, Context, Result};
use futures::stream::{self, StreamExt, TryStreamExt};
use rebound_common::control::{self, ControlHandle, ControlHandler, CsConfig};
use rebound_common::pki::Role;
use rebound_common::tls::TlsFiles;
use rebound_proto::control as pb;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Enrollments in flight at once (each is a key pair, a TLS handshake and
/// two RPCs; the CS signs and stores a certificate for each).
const ENROLL_CONCURRENCY: usize = 16;
/// The disks every simulated machine announces (name, size).
const DISKS: [(&str, u64); 2] = [("disk0", 32 << 30), ("disk1", 128 << 30)];
/// An agent's default capture buffer, as its status reports it.
const BUFFER_LIMIT: u64 = 256 << 20;

/// The machine id of simulated agent `n`.
pub fn machine_id(n: usize) -> String {
    format!("sim-{n:04}")
}

/// Enrolls `ids` as agents with the passphrase, [`ENROLL_CONCURRENCY`] at a
/// time; each one's certificates go to `dir/<id>`. Returns those dirs.
pub async fn enroll_all(
    cs_addr: &str,
    passphrase: &str,
    ids: &[String],
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    stream::iter(ids.iter().map(|id| async move {
        let out = dir.join(id);
        rebound_common::enrollment::enroll(cs_addr, passphrase, Role::Agent, id, &out)
            .await
            .with_context(|| format!("enrolling simulated agent {id} at {cs_addr}"))?;
        Ok::<_, anyhow::Error>(out)
    }))
    .buffered(ENROLL_CONCURRENCY)
    .try_collect()
    .await
}

/// One simulated machine's agent on the control channel.
struct SimAgent {
    id: String,
    site: String,
    instance: String,
}

impl ControlHandler for SimAgent {
    /// What `rebound-agent` says on connect: its machine, site and disks,
    /// writable (not fenced), no replication yet.
    fn hello(&self) -> pb::Hello {
        pb::Hello {
            role: Role::Agent.as_str().into(),
            id: self.id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            site: self.site.clone(),
            addresses: Vec::new(),
            disks: DISKS
                .iter()
                .enumerate()
                .map(|(i, (name, size))| pb::Disk {
                    index: i as u32,
                    name: (*name).into(),
                    size: *size,
                    path: format!("/dev/vd{}", (b'a' + i as u8) as char),
                })
                .collect(),
            writable: true,
            replication_id: String::new(),
            instance: self.instance.clone(),
        }
    }

    /// An idle, unprotected agent's status.
    fn status(&self) -> Option<pb::Status> {
        Some(pb::Status {
            status: Some(pb::status::Status::Agent(pb::AgentStatus {
                mode: "data".into(),
                buffer_limit: BUFFER_LIMIT,
                ..Default::default()
            })),
        })
    }

    /// Every command succeeds (an unprotected machine gets few: a policy,
    /// a revocation list).
    fn handle(&self, _cmd: pb::Command) -> Pin<Box<dyn Future<Output = pb::CommandResult> + Send>> {
        Box::pin(async { control::ok_result() })
    }
}

/// The simulated agents' control streams; all end when this is dropped.
pub struct Fleet {
    handles: Vec<ControlHandle>,
    stop: watch::Sender<bool>,
}

impl Fleet {
    /// Opens the control streams of the agents enrolled in `cert_dirs`
    /// (`ids[i]`'s in `cert_dirs[i]`), `batch` at a time, each batch
    /// waited for until connected (at most `timeout` per batch), as a fleet
    /// comes up. Must run on the runtime the streams then live on.
    pub async fn connect(
        cs_addr: &str,
        site: &str,
        ids: &[String],
        cert_dirs: &[PathBuf],
        batch: usize,
        timeout: Duration,
    ) -> Result<Fleet> {
        let (stop, stop_rx) = watch::channel(false);
        let mut fleet = Fleet {
            handles: Vec::with_capacity(ids.len()),
            stop,
        };
        let cs = CsConfig {
            addr: cs_addr.to_string(),
            standby: Vec::new(),
            server_name: rebound_common::tls::host_of(cs_addr).into(),
        };
        for (ids, dirs) in ids.chunks(batch.max(1)).zip(cert_dirs.chunks(batch.max(1))) {
            for (id, dir) in ids.iter().zip(dirs) {
                let agent = SimAgent {
                    id: id.clone(),
                    site: site.to_string(),
                    instance: control::instance_id(),
                };
                let tls = TlsFiles::in_dir(dir, Role::Agent.as_str());
                let h = control::spawn(cs.clone(), tls, Arc::new(agent), stop_rx.clone());
                fleet.handles.push(h);
            }
            fleet.wait_connected(timeout).await?;
        }
        Ok(fleet)
    }

    /// Waits until every stream opened so far is welcomed.
    async fn wait_connected(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let up = self.connected();
            if up == self.handles.len() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(anyhow!(
                    "only {up} of {} simulated agents are connected to the CS after {:.0} s",
                    self.handles.len(),
                    timeout.as_secs_f64()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many streams the CS welcomed and that are still up.
    pub fn connected(&self) -> usize {
        self.handles.iter().filter(|h| h.connected()).count()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
