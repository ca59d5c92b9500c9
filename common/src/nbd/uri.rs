//! NBD URIs as libnbd spells them (`nbd://`, `nbds://`, `nbd+unix://`),
//! for Rebound's own [`client`](super::client): the lab and the demo hand
//! one URI to it and to nbdcopy alike.

use std::fmt;
use std::path::PathBuf;

use super::client::ClientError;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `host:port`.
    Tcp(String),
    /// A unix-domain socket.
    Unix(PathBuf),
    /// `host:port` with NBD_OPT_STARTTLS, the client certificate, key and
    /// CA read from `certificates` (see [`super::tls::client_dir_files`]).
    Tls { addr: String, certificates: PathBuf },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp {a}"),
            Endpoint::Unix(p) => write!(f, "unix socket {}", p.display()),
            Endpoint::Tls { addr, .. } => write!(f, "tcp {addr} (TLS)"),
        }
    }
}

impl Endpoint {
    /// Splits an NBD URI into the endpoint and the export name:
    /// `nbd://host:port/export`, `nbds://host:port/export?tls-certificates=DIR`
    /// or `nbd+unix:///export?socket=/path`. The
    /// export name is everything after the first `/` of the path, taken
    /// literally (no percent-decoding), so it may hold `/` and `@`.
    pub fn parse_uri(uri: &str) -> Result<(Endpoint, String), ClientError> {
        let bad = |reason| ClientError::InvalidUri {
            uri: uri.to_string(),
            reason,
        };
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let rest = rest.strip_prefix('/').unwrap_or(rest);
            let (export, socket) =
                with_param(rest, "socket").ok_or_else(|| bad("a unix URI needs ?socket=PATH"))?;
            return Ok((Endpoint::Unix(PathBuf::from(socket)), export.to_string()));
        }
        if let Some(rest) = uri.strip_prefix("nbds://") {
            let (rest, certificates) = with_param(rest, "tls-certificates")
                .ok_or_else(|| bad("a TLS URI needs ?tls-certificates=DIR"))?;
            let (addr, export) =
                Self::tcp_parts(rest).ok_or_else(|| bad("the URI names no host"))?;
            let certificates = PathBuf::from(certificates);
            return Ok((Endpoint::Tls { addr, certificates }, export));
        }
        let rest = uri
            .strip_prefix("nbd://")
            .ok_or_else(|| bad("the URI must start with nbd://, nbds:// or nbd+unix://"))?;
        let (addr, export) = Self::tcp_parts(rest).ok_or_else(|| bad("the URI names no host"))?;
        Ok((Endpoint::Tcp(addr), export))
    }

    /// `authority/export` of a TCP URI: the address (port 10809 when none)
    /// and the export name; `None` without a host.
    fn tcp_parts(rest: &str) -> Option<(String, String)> {
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() {
            return None;
        }
        let addr = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:10809")
        };
        Some((addr, export.to_string()))
    }
}

/// Splits `path?query` into the path and the non-empty value of `key` in
/// the query; `None` when there is no query or no such value.
fn with_param<'a>(rest: &'a str, key: &str) -> Option<(&'a str, &'a str)> {
    let (path, query) = rest.split_once('?')?;
    let value = query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .filter(|v| !v.is_empty())?;
    Some((path, value))
}
