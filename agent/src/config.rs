//! The agent's TOML config (DESIGN.md §2, §5).
//!
//! One file per agent, every key with a documented default (see
//! `agent/example-config.toml`); unknown keys are an error so a typo never
//! silently falls back to a default. `validate` turns it into the checked
//! values the rest of the agent uses, so nothing else re-derives defaults.

use rebound_common::cli_args::ComponentConfig;
use rebound_common::control::CsConfig;
use rebound_common::tls::TlsFiles;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::AgentError;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/rebound/agent";
/// Default NBD TCP listen address: none. The exports are on the unix
/// socket only (mode 0600), because NBD has no authentication and anyone
/// who reaches a TCP export can write the machine's disks.
pub const DEFAULT_NBD_LISTEN: &str = "";

/// The whole config file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The protected machine's id; must match the agent certificate's id.
    /// Default: the host name.
    pub machine_id: String,
    /// The replication this agent streams; default: `machine_id`.
    pub replication_id: String,
    /// Where the dirty-extent log, markers, sockets and status live.
    pub state_dir: PathBuf,
    /// NBD TCP listen address (`host:port`); the binary binds it. Empty
    /// (the default): no TCP export, the unix socket only.
    pub nbd_listen: String,
    /// Address of `/metrics` and `/healthz` (docs/METRICS.md); empty turns
    /// the endpoint off.
    pub metrics_listen: String,
    /// NBD unix socket; default `<state_dir>/nbd.sock`.
    pub nbd_socket: Option<PathBuf>,
    /// Crash-consistent recovery point interval, in milliseconds.
    pub crash_interval_ms: u64,
    /// Change buffer size in bytes (data mode); full → bitmap mode.
    pub buffer_bytes: u64,
    /// PS unreachable this long (seconds) → bitmap mode.
    pub bitmap_after_secs: u64,
    /// On SIGTERM, how long to wait for the PS to acknowledge the buffer.
    pub shutdown_drain_secs: u64,
    /// An extent whose records the PS holds stays marked in the dirty-extent
    /// log until no write touched it for this long (seconds), so writes to
    /// hot extents never wait for a dirty-log sync.
    pub dirty_keep_secs: u64,
    /// At most this many extents stay marked only because they are hot; over
    /// it the least recently written are cleared first. Bounds what a crash
    /// resync compares beyond the records the PS did not hold.
    pub dirty_keep_extents: u64,
    /// The protected disks, in stream order (index = position).
    pub disks: Vec<DiskConfig>,
    /// The process server this agent streams to.
    pub ps: PsConfig,
    /// mTLS files (CA, our certificate and key).
    pub tls: TlsFiles,
    /// The site this machine runs at (sent to the configuration server).
    pub site: String,
    /// `[cs]`: the configuration server; empty `addr` = standalone.
    pub cs: CsConfig,
    /// `[hooks]`: commands run via `sh -c`.
    pub hooks: HooksConfig,
    /// How long a hook may run, in seconds.
    pub hook_timeout_secs: u64,
    /// App-consistent recovery point interval, in seconds; 0 = off.
    pub app_interval_secs: u64,
}

/// `[hooks]`: shell commands (run with `sh -c`, `REBOUND_MACHINE`,
/// `REBOUND_SITE`, `REBOUND_REPLICATION` and `REBOUND_HOOK` in the
/// environment). Empty = none.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HooksConfig {
    /// Run after a planned failover's drain (fence asked for it).
    pub shutdown: String,
    /// Quiesce the application before an app-consistent point.
    pub freeze: String,
    /// Resume the application after the point (always run after a freeze).
    pub thaw: String,
}

/// One protected disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DiskConfig {
    /// NBD export name and disk name in the replication; default `disk<index>`.
    pub name: String,
    /// Backing file or block device.
    pub path: PathBuf,
    /// The hand-over journal (DESIGN.md §7 "Hand-over"): set when this agent
    /// runs a failed-over machine on its replica files. Before the first
    /// write to each 4 KiB block the block's pre-image is appended here, so
    /// a change-point can discard what the machine wrote. A path that does
    /// not exist means the replication was committed: no journaling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handover_journal: Option<PathBuf>,
}

/// `[ps]`: where the change stream goes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PsConfig {
    /// `host:port` of the process server.
    pub addr: String,
    /// Name in the PS certificate (TLS server name); empty means the host
    /// of `addr`.
    pub server_name: String,
}

impl Default for PsConfig {
    fn default() -> Self {
        PsConfig {
            addr: "127.0.0.1:9443".into(),
            server_name: String::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            machine_id: String::new(),
            replication_id: String::new(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            nbd_listen: DEFAULT_NBD_LISTEN.into(),
            metrics_listen: "127.0.0.1:9471".into(),
            nbd_socket: None,
            crash_interval_ms: 5000,
            buffer_bytes: 256 << 20,
            bitmap_after_secs: 30,
            shutdown_drain_secs: 30,
            dirty_keep_secs: 30,
            dirty_keep_extents: 4096,
            disks: Vec::new(),
            ps: PsConfig::default(),
            tls: TlsFiles::installed("agent"),
            site: String::new(),
            cs: CsConfig::default(),
            hooks: HooksConfig::default(),
            hook_timeout_secs: 60,
            app_interval_secs: 3600,
        }
    }
}

impl ComponentConfig for Config {
    const COMPONENT: &'static str = "agent";
}

/// The config after defaults and checks; what the agent runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub machine_id: String,
    pub replication_id: String,
    pub state_dir: PathBuf,
    pub nbd_socket: PathBuf,
    pub crash_interval: Duration,
    pub buffer_limit: u64,
    pub bitmap_after: Duration,
    pub shutdown_drain: Duration,
    /// See [`Config::dirty_keep_secs`].
    pub dirty_keep: Duration,
    /// See [`Config::dirty_keep_extents`].
    pub dirty_keep_extents: u64,
    pub disks: Vec<DiskConfig>,
    pub ps: PsConfig,
    pub tls: TlsFiles,
    pub site: String,
    pub cs: CsConfig,
    pub hooks: HooksConfig,
    pub hook_timeout: Duration,
    /// Zero = no periodic app-consistent points.
    pub app_interval: Duration,
}

impl Settings {
    /// The replication the configuration server assigned (`StartReplication`),
    /// kept across restarts.
    pub fn assigned_path(&self) -> PathBuf {
        self.state_dir.join("replication.json")
    }
    pub fn dirty_log_path(&self) -> PathBuf {
        self.state_dir.join("dirty.log")
    }
    pub fn initialized_marker(&self) -> PathBuf {
        self.state_dir.join("initialized")
    }
    pub fn clean_marker(&self) -> PathBuf {
        self.state_dir.join("clean-shutdown")
    }
    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join("admin.sock")
    }
    pub fn status_path(&self) -> PathBuf {
        self.state_dir.join("status.json")
    }
}

/// What is wrong with a config file; each says which key to set or fix.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("machine_id is not set and the host name is unknown; set machine_id")]
    NoMachineId,
    #[error("no [[disks]] configured: add at least one with name and path")]
    NoDisks,
    #[error("disk {index} ({name}) has no path")]
    DiskWithoutPath { index: usize, name: String },
    #[error("disk name {0:?} is used twice; names must be unique")]
    DuplicateDiskName(String),
    #[error("crash_interval_ms must be > 0")]
    ZeroCrashInterval,
    #[error("buffer_bytes = {0} is too small; use at least 8 MiB (8388608)")]
    BufferTooSmall(u64),
    #[error("[cs] is set but `site` is not: set site = \"<name of this site>\"")]
    NoSite,
    #[error("[ps] addr is not set")]
    NoPsAddr,
}

impl Config {
    /// Applies the defaults that depend on other keys and checks the rest.
    pub fn validate(&self) -> Result<Settings, AgentError> {
        let machine_id = if self.machine_id.is_empty() {
            crate::sys::hostname()
        } else {
            self.machine_id.clone()
        };
        if machine_id.is_empty() {
            return Err(ConfigError::NoMachineId.into());
        }
        let replication_id = if self.replication_id.is_empty() {
            machine_id.clone()
        } else {
            self.replication_id.clone()
        };
        if self.disks.is_empty() {
            return Err(ConfigError::NoDisks.into());
        }
        let mut disks = self.disks.clone();
        let mut names = std::collections::HashSet::new();
        for (i, d) in disks.iter_mut().enumerate() {
            if d.name.is_empty() {
                d.name = format!("disk{i}");
            }
            if d.path.as_os_str().is_empty() {
                return Err(ConfigError::DiskWithoutPath {
                    index: i,
                    name: d.name.clone(),
                }
                .into());
            }
            if !names.insert(d.name.clone()) {
                return Err(ConfigError::DuplicateDiskName(d.name.clone()).into());
            }
        }
        if self.crash_interval_ms == 0 {
            return Err(ConfigError::ZeroCrashInterval.into());
        }
        if self.buffer_bytes < (8 << 20) {
            return Err(ConfigError::BufferTooSmall(self.buffer_bytes).into());
        }
        if self.cs.enabled() && self.site.is_empty() {
            return Err(ConfigError::NoSite.into());
        }
        if self.ps.addr.is_empty() {
            return Err(ConfigError::NoPsAddr.into());
        }
        let nbd_socket = self
            .nbd_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("nbd.sock"));
        Ok(Settings {
            machine_id,
            replication_id,
            state_dir: self.state_dir.clone(),
            nbd_socket,
            crash_interval: Duration::from_millis(self.crash_interval_ms),
            buffer_limit: self.buffer_bytes,
            bitmap_after: Duration::from_secs(self.bitmap_after_secs),
            shutdown_drain: Duration::from_secs(self.shutdown_drain_secs),
            dirty_keep: Duration::from_secs(self.dirty_keep_secs),
            dirty_keep_extents: self.dirty_keep_extents,
            disks,
            ps: self.ps.clone(),
            // Renewal keeps the renewed identity in the state directory.
            tls: self.tls.clone().with_renewed(&self.state_dir),
            site: self.site.clone(),
            cs: self.cs.clone(),
            hooks: self.hooks.clone(),
            hook_timeout: Duration::from_secs(self.hook_timeout_secs.max(1)),
            app_interval: Duration::from_secs(self.app_interval_secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn defaults_and_derived_values() {
        let text = r#"
machine_id = "m1"
[[disks]]
path = "/tmp/d0.img"
[[disks]]
name = "data"
path = "/tmp/d1.img"
handover_journal = "/tmp/j/data.journal"
"#;
        let c: Config = rebound_common::config::parse(text, Path::new("t.toml")).unwrap();
        let s = c.validate().unwrap();
        assert_eq!(s.replication_id, "m1");
        assert_eq!(s.disks[0].name, "disk0");
        assert_eq!(s.disks[1].name, "data");
        assert_eq!(s.disks[0].handover_journal, None);
        assert_eq!(
            s.disks[1].handover_journal.as_deref(),
            Some(Path::new("/tmp/j/data.journal"))
        );
        assert_eq!(s.nbd_socket, Path::new(DEFAULT_STATE_DIR).join("nbd.sock"));
        assert_eq!(s.buffer_limit, 256 << 20);
        assert_eq!(s.crash_interval, Duration::from_secs(5));
        assert_eq!(s.dirty_keep, Duration::from_secs(30));
        assert_eq!(s.dirty_keep_extents, 4096);
        assert_eq!(c.nbd_listen, DEFAULT_NBD_LISTEN);
    }

    #[test]
    fn unknown_keys_and_duplicates_are_refused() {
        let e = rebound_common::config::parse::<Config>("machine = 'x'", Path::new("t.toml"));
        assert!(e.is_err());
        let text = r#"
machine_id = "m1"
[[disks]]
name = "a"
path = "/x"
[[disks]]
name = "a"
path = "/y"
"#;
        let c: Config = rebound_common::config::parse(text, Path::new("t.toml")).unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../example-config.toml");
        let c: Config = rebound_common::config::parse(text, Path::new("example")).unwrap();
        c.validate().unwrap();
    }
}
