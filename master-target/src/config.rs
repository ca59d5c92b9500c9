//! The `rebound-mt` config file (DESIGN.md §2): one TOML file, documented
//! defaults, unknown keys are an error. `example-config.toml` documents every
//! key.

use rebound_common::cli_args::ComponentConfig;
use rebound_common::control::CsConfig;
use rebound_common::tls::TlsFiles;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC address (mutual TLS).
    pub listen: String,
    /// Address of `/metrics` and `/healthz` (docs/METRICS.md); empty turns
    /// the endpoint off.
    pub metrics_listen: String,
    /// The gRPC address others dial, told to the CS; empty = the address
    /// `listen` bound.
    pub advertise: String,
    /// NBD address for read-only recovery-point views: TLS only
    /// (NBD_OPT_STARTTLS) with a client certificate from the deployment's
    /// CA; an admin certificate sees every machine, an agent's its own.
    pub nbd_listen: String,
    /// Replicas, retention journals and recovery-point catalogs.
    pub data_dir: PathBuf,
    pub tls: TlsFiles,
    pub retention: RetentionConfig,
    /// The site this MT runs at (the user's name, e.g. "azure").
    pub site: String,
    /// The configuration server; empty `addr` = standalone.
    pub cs: CsConfig,
    pub hooks: HooksConfig,
    pub reprotect: ReprotectConfig,
}

/// The `[reprotect]` section (DESIGN.md §8 reprotect).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ReprotectConfig {
    /// The only directories (or files) a reprotect's replica may be seeded
    /// from: the disk paths in a seed come from an agent, so a path whose
    /// real location (symlinks and `..` resolved) is not under one of
    /// these is not read. Empty = never seed.
    pub seed_dirs: Vec<PathBuf>,
}

impl Default for ReprotectConfig {
    fn default() -> Self {
        ReprotectConfig {
            seed_dirs: vec![PathBuf::from(DEFAULT_SEED_DIR)],
        }
    }
}

/// Where the agent's file disks live under its systemd unit (the only path
/// the unit lets it write).
pub const DEFAULT_SEED_DIR: &str = "/var/lib/rebound/agent/disks";

/// The `[hooks]` section (DESIGN.md §7 "Hand-over").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HooksConfig {
    /// Shell command (`sh -c`) run at hand-over to boot the machine at this
    /// site; empty = none.
    pub power_on: String,
    /// Shell command run to stop the machine the hand-over booted (before
    /// change-point undoes its writes); same environment as `power_on`.
    /// Empty: the MT only waits for the machine's agent to let go of the
    /// hand-over journal.
    pub power_off: String,
    /// Shell command run when a test failover's copy is ready: the test
    /// exports in its environment; empty = none.
    pub test_power_on: String,
    /// Shell command run at test-failover cleanup, before the copy goes.
    pub test_power_off: String,
    /// How long a hook may run before it is killed, in seconds.
    pub hook_timeout_secs: u64,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            power_on: String::new(),
            power_off: String::new(),
            test_power_on: String::new(),
            test_power_off: String::new(),
            hook_timeout_secs: 300,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:9444".into(),
            metrics_listen: "127.0.0.1:9473".into(),
            advertise: String::new(),
            nbd_listen: "127.0.0.1:10810".into(),
            data_dir: PathBuf::from("/var/lib/rebound/mt"),
            tls: TlsFiles::installed("mt"),
            retention: RetentionConfig::default(),
            site: String::new(),
            cs: CsConfig::default(),
            hooks: HooksConfig::default(),
            reprotect: ReprotectConfig::default(),
        }
    }
}

impl ComponentConfig for Config {
    const COMPONENT: &'static str = "mt";
}

/// The `[retention]` section (DESIGN.md §7 "Retention").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Recovery points older than this many seconds are dropped, oldest
    /// first. The newest point is always kept.
    pub window_secs: u64,
    /// Cap on the retention journal per replication, in bytes; 0 = no cap.
    /// Over the cap the oldest points are dropped (the window shrinks).
    pub max_bytes: u64,
    /// How often the retention task runs, in seconds.
    pub check_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            window_secs: 24 * 3600,
            max_bytes: 0,
            check_secs: 5,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rebound_common::config::{check_example, check_refused};

    #[test]
    fn example_config_parses_and_matches_defaults() {
        check_example::<Config>(include_str!("../example-config.toml"), |_| {});
        check_refused::<Config>("[retention]\nwindow = 3", "window");
    }
}
