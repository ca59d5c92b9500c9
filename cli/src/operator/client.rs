//! Connecting to the configuration server with the admin certificate, and
//! turning gRPC errors into messages that say what to do.

use anyhow::{anyhow, Result};
use rebound_common::tls::TlsFiles;
use rebound_proto::control::admin_client::AdminClient;
use std::path::PathBuf;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The default CS address.
pub const DEFAULT_CS: &str = "127.0.0.1:7443";

/// Where the CS is and the admin certificate to reach it with.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CsArgs {
    /// Configuration server address host:port [env REBOUND_CS; default
    /// 127.0.0.1:7443].
    #[arg(long = "cs", value_name = "ADDR")]
    pub cs: Option<String>,
    /// Directory with ca.pem, admin.pem and admin.key from `rebound-cs init`
    /// [env REBOUND_CERTS; default ~/.config/rebound].
    #[arg(long = "certs", value_name = "DIR")]
    pub certs: Option<PathBuf>,
}

impl CsArgs {
    /// True when the operator named a CS (flag or environment).
    pub fn given(&self) -> bool {
        self.cs.is_some() || std::env::var_os("REBOUND_CS").is_some_and(|v| !v.is_empty())
    }

    pub fn addr(&self) -> String {
        self.cs
            .clone()
            .or_else(|| std::env::var("REBOUND_CS").ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| DEFAULT_CS.to_string())
    }

    pub fn certs_dir(&self) -> PathBuf {
        if let Some(d) = &self.certs {
            return d.clone();
        }
        if let Some(d) = std::env::var_os("REBOUND_CERTS").filter(|v| !v.is_empty()) {
            return PathBuf::from(d);
        }
        match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".config/rebound"),
            None => PathBuf::from(".config/rebound"),
        }
    }

    /// An error of an RPC, with what to do about it.
    /// The answer of an admin RPC, or the error that says what failed
    /// while `doing` what.
    pub fn answer<T>(
        &self,
        r: Result<tonic::Response<T>, Status>,
        doing: &str,
    ) -> anyhow::Result<T> {
        r.map(tonic::Response::into_inner)
            .map_err(|e| self.error(e, doing))
    }

    pub fn error(&self, s: Status, doing: &str) -> anyhow::Error {
        let addr = self.addr();
        let msg = s.message();
        let hint = match s.code() {
            Code::Unavailable if msg.contains("transport") || msg.contains("connect") => format!(
                "cannot reach the configuration server at {addr} ({msg}): check that \
                 `rebound-cs run` is up there, and --cs / REBOUND_CS"
            ),
            Code::PermissionDenied | Code::Unauthenticated => format!(
                "{msg}: the CS refused the certificate in {}; operator commands need the \
                 admin certificate (admin.pem/admin.key written by `rebound-cs init`), pass \
                 its directory with --certs or REBOUND_CERTS",
                self.certs_dir().display()
            ),
            _ => msg.to_string(),
        };
        anyhow!("{doing}: {hint}")
    }
}

/// The TLS server name for an address: the host, or `localhost` for a
/// loopback address (the CS certificate always covers it).
fn server_name(addr: &str) -> String {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    match host {
        "" | "127.0.0.1" | "::1" | "localhost" => "localhost".into(),
        h => h.into(),
    }
}

/// Connects to the CS's `Admin` service.
pub async fn connect(args: &CsArgs) -> Result<AdminClient<Channel>> {
    let dir = args.certs_dir();
    let tls = TlsFiles::in_dir(&dir, "admin");
    for f in [&tls.ca, &tls.cert, &tls.key] {
        if !f.exists() {
            return Err(anyhow!(
                "{} is missing: copy ca.pem, admin.pem and admin.key from the CS deployment \
                 directory (`rebound-cs init --dir D` wrote them into D) to {}, or pass --certs D \
                 (or set REBOUND_CERTS)",
                f.display(),
                dir.display()
            ));
        }
    }
    let addr = args.addr();
    let ch = tls
        .connect(&addr, &server_name(&addr), rebound_common::pki::Role::Cs)
        .await
        .map_err(|e| {
            anyhow!(
                "cannot reach the configuration server at {addr}: {e}\nCheck that `rebound-cs \
                 run` is up there and that --cs / REBOUND_CS names it; the certificates come \
                 from {}",
                dir.display()
            )
        })?;
    Ok(AdminClient::new(ch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert_eq!(server_name("127.0.0.1:7443"), "localhost");
        assert_eq!(server_name("cs.example:7443"), "cs.example");
        assert_eq!(server_name("[::1]:7443"), "localhost");
    }
}
