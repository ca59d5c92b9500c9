//! Connecting to the configuration server with the admin certificate, and
//! turning gRPC errors into messages that say what to do. A deployment
//! with a standby CS is named by every address (`--cs A,B`): they are
//! tried in turn, and the first that answers is used.

use anyhow::{anyhow, Result};
use rebound_common::control::{in_turn, split_addrs, Tried};
use rebound_common::tls::{TlsError, TlsFiles};
use rebound_proto::control::admin_client::AdminClient;
use std::path::PathBuf;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The default CS address.
pub const DEFAULT_CS: &str = "127.0.0.1:7443";

/// Where the CS is and the admin certificate to reach it with.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CsArgs {
    /// Configuration server address host:port; with a standby CS every
    /// address comma-separated, tried in turn (`cs1:7443,cs2:7443`) [env
    /// REBOUND_CS; default 127.0.0.1:7443].
    #[arg(long = "cs", value_name = "ADDR[,ADDR…]")]
    pub cs: Option<String>,
    /// Directory with ca.pem, admin.pem and admin.key from `rebound-cs init`
    /// [env REBOUND_CERTS; default ~/.config/rebound, then /etc/rebound/tls].
    #[arg(long = "certs", value_name = "DIR")]
    pub certs: Option<PathBuf>,
}

impl CsArgs {
    /// True when the operator named a CS (flag or environment).
    pub fn given(&self) -> bool {
        self.cs.is_some() || std::env::var_os("REBOUND_CS").is_some_and(|v| !v.is_empty())
    }

    /// The CS as given: one address or the comma-separated list.
    pub fn addr(&self) -> String {
        self.cs
            .clone()
            .or_else(|| std::env::var("REBOUND_CS").ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| DEFAULT_CS.to_string())
    }

    /// Every CS address, in the order they are tried.
    pub fn addrs(&self) -> Vec<String> {
        let addrs = split_addrs(&self.addr());
        if addrs.is_empty() {
            vec![DEFAULT_CS.to_string()]
        } else {
            addrs
        }
    }

    /// Where the admin certificate is looked for, in order: the one
    /// directory named by --certs or REBOUND_CERTS, else the user's
    /// `~/.config/rebound` and then the host's `/etc/rebound/tls`.
    pub fn certs_candidates(&self) -> Vec<PathBuf> {
        if let Some(d) = &self.certs {
            return vec![d.clone()];
        }
        if let Some(d) = std::env::var_os("REBOUND_CERTS").filter(|v| !v.is_empty()) {
            return vec![PathBuf::from(d)];
        }
        let user = match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".config/rebound"),
            None => PathBuf::from(".config/rebound"),
        };
        vec![user, PathBuf::from(rebound_common::cli_args::TLS_DIR)]
    }

    /// The first candidate directory holding `admin.pem` (else the first).
    pub fn certs_dir(&self) -> PathBuf {
        let candidates = self.certs_candidates();
        candidates
            .iter()
            .find(|d| d.join("admin.pem").exists())
            .unwrap_or(&candidates[0])
            .clone()
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
        let addr = self.addrs().join(", ");
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

/// The TLS server name for an address: its host (the CS certificate names
/// the hosts it is reached at; `rebound-cs init --name`).
fn server_name(addr: &str) -> String {
    rebound_common::tls::server_name_for("", addr).to_string()
}

/// Connects to the CS's `Admin` service.
pub async fn connect(args: &CsArgs) -> Result<AdminClient<Channel>> {
    let dir = args.certs_dir();
    let tls = TlsFiles::in_dir(&dir, "admin");
    for f in [&tls.ca, &tls.cert, &tls.key] {
        if !f.exists() {
            let tried: Vec<String> = args
                .certs_candidates()
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            return Err(anyhow!(
                "{} is missing (looked for ca.pem, admin.pem and admin.key in {}): on the CS \
                 host `rebound-cs init` wrote them into /etc/rebound/tls (`--dir D`: into D); \
                 copy them to ~/.config/rebound, or pass --certs DIR (or set REBOUND_CERTS)",
                f.display(),
                tried.join(", then ")
            ));
        }
    }
    let addrs = args.addrs();
    let ch = in_turn(
        &addrs,
        |addr| {
            let tls = &tls;
            async move {
                tls.connect(&addr, &server_name(&addr), rebound_common::pki::Role::Cs)
                    .await
            }
        },
        |e| matches!(e, TlsError::Connect { .. }),
    )
    .await
    .map_err(|t| unreachable(&addrs, t, &dir))?;
    Ok(AdminClient::new(ch))
}

/// Why no CS of `addrs` could be connected to, and what to do.
fn unreachable(addrs: &[String], t: Tried<TlsError>, certs: &std::path::Path) -> anyhow::Error {
    let certs = certs.display();
    match t {
        Tried::Unreachable(errors) if addrs.len() > 1 => {
            let each: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow!(
                "cannot reach any configuration server (tried {}): {}\nCheck that `rebound-cs \
                 run` is up at one of them (a standby CS answers only once it has taken over) \
                 and that --cs / REBOUND_CS lists them; the certificates come from {certs}",
                addrs.join(", "),
                each.join("; ")
            )
        }
        t => {
            let e = t.into_error(|mut all| all.remove(0));
            anyhow!(
                "cannot reach the configuration server at {}: {e}\nCheck that `rebound-cs \
                 run` is up there and that --cs / REBOUND_CS names it; the certificates come \
                 from {certs}",
                addrs.join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert_eq!(server_name("127.0.0.1:7443"), "127.0.0.1");
        assert_eq!(server_name("cs.example:7443"), "cs.example");
        assert_eq!(server_name("[::1]:7443"), "::1");
    }

    #[test]
    fn every_cs_address_in_the_order_given() {
        #[derive(clap::Parser, Debug)]
        struct Cmd {
            #[command(flatten)]
            cs: CsArgs,
        }
        use clap::Parser;
        let c = Cmd::try_parse_from(["x", "--cs", "cs1:7443, cs2:7443,"]).unwrap();
        assert_eq!(c.cs.addrs(), ["cs1:7443", "cs2:7443"]);
        assert!(c.cs.given());
        let one = CsArgs {
            cs: Some("cs1:7443".into()),
            ..CsArgs::default()
        };
        assert_eq!(one.addrs(), ["cs1:7443"]);
        let blank = CsArgs {
            cs: Some(" , ".into()),
            ..CsArgs::default()
        };
        assert_eq!(blank.addrs(), [DEFAULT_CS]);
    }

    /// A loopback address that refuses connections: a privileged port
    /// (`port` below 1024, e.g. 1 tcpmux or 2 compressnet) that no
    /// unprivileged test can bind and no service of a test host listens on,
    /// unlike a port bound and closed again, which a parallel test may take.
    fn refusing(port: u16) -> String {
        format!("127.0.0.1:{port}")
    }

    #[tokio::test]
    async fn connect_reaches_the_second_cs_when_the_first_refuses() {
        use rebound_common::pki::{write_cert, Ca, Role};
        rebound_common::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test").unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        let cs = ca.issue(Role::Cs, "cs", &["127.0.0.1".into()]).unwrap();
        write_cert(dir.path(), "cs", &cs).unwrap();
        let admin = ca.issue(Role::Admin, "ops", &[]).unwrap();
        write_cert(dir.path(), "admin", &admin).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let serving = listener.local_addr().unwrap().to_string();
        let incoming = TlsFiles::in_dir(dir.path(), "cs")
            .acceptor(
                rebound_common::tls::ClientAuth::Required,
                &rebound_common::tls::Revocations::new(),
            )
            .unwrap()
            .incoming(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(tonic::service::Routes::default())
                .serve_with_incoming(incoming),
        );
        let (down, also_down) = (refusing(1), refusing(2));
        let args = |cs: String| CsArgs {
            cs: Some(cs),
            certs: Some(dir.path().to_path_buf()),
        };
        connect(&args(format!("{down},{serving}"))).await.unwrap();
        let e = connect(&args(format!("{down},{also_down}")))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&down) && e.contains(&also_down), "{e}");
        assert!(e.contains("any configuration server"), "{e}");
        assert!(e.contains("standby"), "{e}");
        let e = connect(&args(down.clone())).await.unwrap_err().to_string();
        assert!(
            e.contains(&format!("configuration server at {down}")),
            "{e}"
        );
    }

    #[test]
    fn certs_are_looked_for_in_the_user_then_the_host_directory() {
        let named = CsArgs {
            certs: Some(PathBuf::from("/d")),
            ..CsArgs::default()
        };
        assert_eq!(named.certs_candidates(), vec![PathBuf::from("/d")]);
        if std::env::var_os("REBOUND_CERTS").is_none() {
            let c = CsArgs::default().certs_candidates();
            assert_eq!(c.len(), 2);
            assert!(c[0].ends_with(".config/rebound"), "{c:?}");
            assert_eq!(c[1], PathBuf::from("/etc/rebound/tls"));
        }
    }
}
