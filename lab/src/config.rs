//! Component configs from the crates' own `Config` types, serialized with
//! toml: a renamed or removed key breaks the lab's build, not a test run.
//!
//! Builders fill what a lab always sets (addresses, dirs, TLS files, the
//! `[cs]` link); the caller changes any other field on the returned value.

use anyhow::{Context, Result};
use rebound_agent::config::{Config as AgentConfig, DiskConfig, PsConfig};
use rebound_common::control::CsConfig;
use rebound_common::tls::TlsFiles;
use rebound_mt::config::Config as MtConfig;
use rebound_ps::config::{Config as PsServerConfig, MtConfig as PsMtLink};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The TLS server name every lab certificate carries.
pub const SERVER_NAME: &str = "localhost";

/// Writes `cfg` as TOML to `path`.
pub fn write_toml<T: Serialize>(path: &Path, cfg: &T) -> Result<()> {
    let text =
        toml::to_string(cfg).with_context(|| format!("cannot serialize {}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a TOML config of type `T` (strict: unknown keys fail).
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))
}

/// A `metrics_listen` for a daemon on the host `ip`: a free port there
/// (`[ip]:port` for an IPv6 host), or `""` (the endpoint off) when `on` is
/// false.
pub fn metrics_listen(ip: std::net::IpAddr, on: bool) -> String {
    let port = match ip {
        _ if !on => return String::new(),
        std::net::IpAddr::V4(v4) => crate::net::free_port_on(v4),
        // The lab's hosts are 127.0.0.x; an IPv6 host takes a port the
        // kernel picks.
        std::net::IpAddr::V6(v6) => std::net::TcpListener::bind((v6, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port on [{v6}] for metrics_listen: {e}")),
    };
    SocketAddr::from((ip, port)).to_string()
}

/// Sets `metrics_listen` in a daemon's TOML config that the lab did not
/// write (`rebound-cs init`'s, a copy of another daemon's), so that no two
/// daemons of parallel tests share a default metrics port.
pub fn set_metrics_listen(path: &Path, listen: &str) -> Result<()> {
    let mut doc: toml::Table = read_toml(path)?;
    doc.insert("metrics_listen".into(), toml::Value::String(listen.into()));
    write_toml(path, &doc)
}

/// `[cs]` pointing at the lab's configuration server, checked against its
/// certificate by the address's host (what `rebound-cs init --name` put in).
pub fn cs_link(cs_addr: &str) -> CsConfig {
    CsConfig {
        addr: cs_addr.to_string(),
        server_name: rebound_common::tls::host_of(cs_addr).into(),
        standby: Vec::new(),
    }
}

/// An agent of `machine` with its state in `state_dir`, exporting `disks`
/// (name, backing file) over NBD on `nbd_listen`, streaming to `ps`.
pub fn agent(
    machine: &str,
    state_dir: &Path,
    nbd_listen: SocketAddr,
    disks: &[(String, PathBuf)],
    ps: SocketAddr,
    tls: TlsFiles,
) -> AgentConfig {
    AgentConfig {
        machine_id: machine.into(),
        state_dir: state_dir.to_path_buf(),
        nbd_listen: nbd_listen.to_string(),
        metrics_listen: metrics_listen(nbd_listen.ip(), true),
        shutdown_drain_secs: 10,
        disks: disks
            .iter()
            .map(|(name, path)| DiskConfig {
                name: name.clone(),
                path: path.clone(),
                ..Default::default()
            })
            .collect(),
        ps: PsConfig {
            addr: ps.to_string(),
            server_name: SERVER_NAME.into(),
        },
        tls,
        ..AgentConfig::default()
    }
}

/// A process server on `listen` with its cache in `cache_dir`, forwarding
/// to the MT at `mt`.
pub fn ps(listen: SocketAddr, cache_dir: &Path, mt: SocketAddr, tls: TlsFiles) -> PsServerConfig {
    PsServerConfig {
        listen: listen.to_string(),
        metrics_listen: metrics_listen(listen.ip(), true),
        cache_dir: cache_dir.to_path_buf(),
        tls,
        mt: PsMtLink {
            addr: mt.to_string(),
            server_name: mt.ip().to_string(),
        },
        ..PsServerConfig::default()
    }
}

/// A master target on `listen` (gRPC) and `nbd_listen` (point views) with
/// its replicas and journals in `data_dir`.
pub fn mt(listen: SocketAddr, nbd_listen: SocketAddr, data_dir: &Path, tls: TlsFiles) -> MtConfig {
    MtConfig {
        listen: listen.to_string(),
        nbd_listen: nbd_listen.to_string(),
        metrics_listen: metrics_listen(listen.ip(), true),
        data_dir: data_dir.to_path_buf(),
        tls,
        ..MtConfig::default()
    }
}

/// The agent config as TOML without its `[[disks]]`, for a power_on hook
/// that appends the disks it was handed.
pub fn agent_without_disks(cfg: &AgentConfig) -> Result<String> {
    let mut table = toml::Table::try_from(cfg).context("cannot serialize the agent config")?;
    table.remove("disks");
    Ok(toml::to_string(&table)?)
}

#[cfg(test)]
mod tests {
    use super::metrics_listen;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    #[test]
    fn metrics_listen_binds_the_hosts_address_or_nothing() {
        let v4: SocketAddr = metrics_listen(IpAddr::V4(Ipv4Addr::LOCALHOST), true)
            .parse()
            .unwrap();
        assert_eq!(v4.ip(), Ipv4Addr::LOCALHOST);
        assert_eq!(metrics_listen(IpAddr::V4(Ipv4Addr::LOCALHOST), false), "");
        let v6 = metrics_listen(IpAddr::V6(Ipv6Addr::LOCALHOST), true);
        assert!(v6.starts_with("[::1]:"), "{v6}");
        assert!(v6.parse::<SocketAddr>().unwrap().port() > 0);
        assert_eq!(metrics_listen(IpAddr::V6(Ipv6Addr::LOCALHOST), false), "");
    }
}
