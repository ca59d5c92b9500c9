//! The process server's TOML config (DESIGN.md §2, §6).
//!
//! One file per process, every key with a documented default (see
//! `example-config.toml`), unknown keys refused so a typo never silently
//! falls back to a default.

use rebound_common::cli_args::ComponentConfig;
use rebound_common::control::CsConfig;
use rebound_common::tls::TlsFiles;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Default cache cap: 8 GiB.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 8 << 30;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server listens on (`host:port`).
    pub listen: String,
    /// Address of `/metrics` and `/healthz` (docs/METRICS.md); empty turns
    /// the endpoint off.
    pub metrics_listen: String,
    /// Directory of the durable frame cache (one subdirectory per replication).
    pub cache_dir: PathBuf,
    /// Total segment bytes at which the cache stops reading agent streams.
    pub cache_max_bytes: u64,
    /// zstd level for frames the PS compresses; 0 stores every frame raw.
    pub compression_level: i32,
    /// mTLS files of this process server.
    pub tls: TlsFiles,
    /// The master target frames are forwarded to, unless the CS names
    /// another for a replication (AddReplication).
    pub mt: MtConfig,
    /// The gRPC address agents dial, as told to the CS; empty = the address
    /// `listen` bound.
    pub advertise: String,
    /// The site this PS runs at (the user's name, e.g. "onprem").
    pub site: String,
    /// The configuration server; empty `addr` = standalone.
    pub cs: CsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:9443".into(),
            metrics_listen: "127.0.0.1:9472".into(),
            cache_dir: PathBuf::from("/var/lib/rebound/ps"),
            cache_max_bytes: DEFAULT_CACHE_MAX_BYTES,
            compression_level: 1,
            tls: TlsFiles::installed("ps"),
            mt: MtConfig::default(),
            advertise: String::new(),
            site: String::new(),
            cs: CsConfig::default(),
        }
    }
}

impl ComponentConfig for Config {
    const COMPONENT: &'static str = "ps";
}

impl Config {
    /// Checks values serde cannot: the cap must be positive and the zstd
    /// level one zstd knows.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cache_max_bytes == 0 {
            return Err(ConfigError::ZeroCacheCap);
        }
        if !(-7..=22).contains(&self.compression_level) {
            return Err(ConfigError::CompressionLevel(self.compression_level));
        }
        Ok(())
    }
}

/// A config value serde accepted but the process server cannot use.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cache_max_bytes must be greater than 0")]
    ZeroCacheCap,
    #[error("compression_level {0} is out of range: use 1..=22 (fast levels down to -7), or 0 to store frames raw")]
    CompressionLevel(i32),
}

/// The `[mt]` section: where the master target listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtConfig {
    /// `host:port` of the master target's gRPC server.
    pub addr: String,
    /// Name the master target's certificate is checked against; empty
    /// means the host of `addr`.
    pub server_name: String,
}

impl Default for MtConfig {
    fn default() -> Self {
        MtConfig {
            addr: "127.0.0.1:9444".into(),
            server_name: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rebound_common::config::{check_example, check_refused};

    #[test]
    fn example_config_parses_and_matches_defaults_where_documented() {
        let c: Config = check_example(include_str!("../example-config.toml"), |_| {});
        assert!(c.validate().is_ok());
        let bad = Config {
            cache_max_bytes: 0,
            ..Config::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("cache_max_bytes"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        check_refused::<Config>("cache_max = 1", "cache_max");
        check_refused::<Config>("[mt]\nadress = 'x'", "adress");
    }
}
