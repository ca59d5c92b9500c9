//! The names a server certificate is issued for: what `enroll --name` and
//! `rebound-cs init --name` accept, and what they default to.
//!
//! A component is dialled by the address in other components' configs (or
//! the one it registered with the CS), and the dialler checks that host
//! against the certificate's subjectAltName. So the default names are the
//! ones it is reached at on a real host: its host name and the host of the
//! address it advertises. `localhost`/127.0.0.1 are only in a certificate
//! when named, since another host never reaches a server by them.

use std::net::IpAddr;
use std::path::Path;
use thiserror::Error;

/// A `--name` that cannot go into a certificate.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error(
        "server name {0:?} is a wildcard: certificates name each host; pass --name once per name"
    )]
    Wildcard(String),
    #[error("server name {0:?} is an unspecified address that nothing dials: name the host's real address")]
    Unspecified(String),
    #[error("server name {0:?} is neither a DNS name nor an IP address")]
    Invalid(String),
    #[error("an agent's certificate cannot serve TLS, so it takes no server names (got {0:?})")]
    AgentNames(Vec<String>),
}

/// Checks one server name: a DNS name or an IP address, not a wildcard and
/// not 0.0.0.0/`::`.
pub fn check_server_name(name: &str) -> Result<(), NameError> {
    if name.contains('*') {
        return Err(NameError::Wildcard(name.to_string()));
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        if ip.is_unspecified() {
            return Err(NameError::Unspecified(name.to_string()));
        }
        return Ok(());
    }
    match rustls::pki_types::DnsName::try_from(name) {
        Ok(_) if !name.is_empty() => Ok(()),
        _ => Err(NameError::Invalid(name.to_string())),
    }
}

/// Checks every name, dropping repeats (first occurrence kept).
pub fn checked_names(names: &[String]) -> Result<Vec<String>, NameError> {
    let mut out: Vec<String> = Vec::new();
    for n in names {
        let n = n.trim();
        check_server_name(n)?;
        if !out.iter().any(|o| o.eq_ignore_ascii_case(n)) {
            out.push(n.to_string());
        }
    }
    Ok(out)
}

/// This machine's host name; empty when it cannot be read.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The host of the address a component's config says it is reached at:
/// `advertise`, else `listen`; none when that host is unspecified
/// (0.0.0.0, `::`) or the file has neither (or cannot be read).
pub fn advertised_host(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let table: toml::Table = text.parse().ok()?;
    let addr = ["advertise", "listen"]
        .iter()
        .filter_map(|k| table.get(*k).and_then(|v| v.as_str()))
        .find(|a| !a.trim().is_empty())?;
    let host = crate::tls::host_of(addr.trim());
    if host.is_empty() || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
        return None;
    }
    Some(host.to_string())
}

/// The names a server certificate gets when none are given: the host name
/// and the advertised host from `config` (when it exists), the ones that
/// can go into a certificate.
pub fn default_server_names(config: Option<&Path>) -> Vec<String> {
    let candidates = [Some(host_name()), config.and_then(advertised_host)];
    let names: Vec<String> = candidates
        .into_iter()
        .flatten()
        .filter(|n| check_server_name(n).is_ok())
        .collect();
    checked_names(&names).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_names_or_ips() {
        for ok in ["ps1.example.net", "ps-1", "10.0.0.3", "::1", "localhost"] {
            check_server_name(ok).unwrap();
        }
        assert!(matches!(
            check_server_name("*.example.net"),
            Err(NameError::Wildcard(_))
        ));
        assert!(check_server_name("*.example.net")
            .unwrap_err()
            .to_string()
            .contains("wildcard"));
        assert!(matches!(
            check_server_name("0.0.0.0"),
            Err(NameError::Unspecified(_))
        ));
        for bad in ["", "a b", "host:7000", "under_score!"] {
            assert!(check_server_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            checked_names(&["a".into(), "A".into(), "10.0.0.1".into()]).unwrap(),
            vec!["a".to_string(), "10.0.0.1".to_string()]
        );
    }

    #[test]
    fn defaults_are_the_host_name_and_the_advertised_host() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ps.toml");
        std::fs::write(
            &cfg,
            "listen = \"0.0.0.0:9443\"\nadvertise = \"10.1.2.3:9443\"\n",
        )
        .unwrap();
        let names = default_server_names(Some(&cfg));
        assert!(names.contains(&"10.1.2.3".to_string()), "{names:?}");
        let host = host_name();
        if !host.is_empty() {
            assert_eq!(names[0], host);
        }
        assert!(!names.iter().any(|n| n == "localhost" || n == "127.0.0.1"));

        std::fs::write(&cfg, "listen = \"0.0.0.0:9443\"\n").unwrap();
        assert_eq!(advertised_host(&cfg), None);
        std::fs::write(&cfg, "listen = \"[fd00::3]:9443\"\nadvertise = \"\"\n").unwrap();
        assert_eq!(advertised_host(&cfg).as_deref(), Some("fd00::3"));
        assert_eq!(advertised_host(&dir.path().join("missing.toml")), None);
    }
}
