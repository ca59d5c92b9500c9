//! The command-line pieces the four binaries (`rebound-agent`, `rebound-ps`,
//! `rebound-mt`, `rebound-cs`) share: the `run` flags, the `enroll`
//! subcommand, binding the listen sockets and reporting a failed run.
//!
//! Declared once so every binary spells its flags, messages and exit codes
//! the same way, and each `main` stays a thin dispatch over its library.

use crate::config::ConfigError;
use crate::enrollment::{enroll, EnrollError, Enrolled};
use crate::pki::Role;
use crate::telemetry::{self, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;
use thiserror::Error;

/// The flags of every `run` subcommand besides the config file.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format: text or json (JSON lines on stderr).
    #[arg(long, default_value = "text")]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// What every `run` does first: the process-wide TLS provider and the
    /// log subscriber.
    pub fn start(&self) {
        crate::tls::install_crypto_provider();
        telemetry::init(self.log_format);
    }
}

/// The flags of the `run` subcommand of the PS, MT and CS.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Config file (TOML; see the binary's example-config.toml). Without it,
    /// every key has its default.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub log: LogArgs,
}

impl RunArgs {
    /// Starts TLS and logging ([`LogArgs::start`]) and loads the config.
    pub fn start<T: serde::de::DeserializeOwned + Default>(&self) -> Result<T, ConfigError> {
        self.log.start();
        crate::config::load(self.config.as_deref())
    }
}

/// `enroll`: get this component's certificate from the configuration
/// server with the deployment passphrase (DESIGN.md §3).
#[derive(Debug, Clone, clap::Args)]
pub struct EnrollArgs {
    /// The configuration server, host:port (the host must be in its
    /// certificate).
    #[arg(long)]
    pub cs: String,
    /// File holding the deployment passphrase (`rebound-cs init` printed it).
    #[arg(long)]
    pub passphrase_file: PathBuf,
    /// This component's id (the CS and operators name it by this; for an
    /// agent, the config's machine_id).
    #[arg(long)]
    pub id: String,
    /// Where ca.pem, <role>.pem and <role>.key go (point [tls] at them);
    /// default /etc/rebound/<role>.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Why `enroll` failed before or while talking to the CS.
#[derive(Debug, Error)]
pub enum EnrollCommandError {
    #[error("cannot read the passphrase file {path}: {source}")]
    PassphraseFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Enroll(#[from] EnrollError),
}

impl EnrollArgs {
    /// The output directory, absolute so the printed config snippet works
    /// from any working directory.
    pub fn out_dir(&self, role: Role) -> PathBuf {
        let out = self
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/etc/rebound/{role}")));
        std::path::absolute(&out).unwrap_or(out)
    }

    /// Enrolls as `role`, writes the files and prints the config sections
    /// that use them.
    pub async fn run(&self, role: Role) -> Result<Enrolled, EnrollCommandError> {
        crate::tls::install_crypto_provider();
        let pass = std::fs::read_to_string(&self.passphrase_file).map_err(|source| {
            EnrollCommandError::PassphraseFile {
                path: self.passphrase_file.clone(),
                source,
            }
        })?;
        let e = enroll(&self.cs, pass.trim(), role, &self.id, &self.out_dir(role)).await?;
        println!("{}", self.summary(role, &e));
        Ok(e)
    }

    /// What `enroll` prints: who enrolled where, the CA fingerprint to
    /// compare, and the config sections to paste.
    pub fn summary(&self, role: Role, e: &Enrolled) -> String {
        let (id, cs) = (&self.id, &self.cs);
        let machine = if role == Role::Agent {
            format!("machine_id = {id:?}\n")
        } else {
            String::new()
        };
        format!(
            "enrolled as {role}:{id} with the configuration server at {cs}\n\
             CA fingerprint (blake3): {}\n\
             {machine}[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[cs]\naddr = {cs:?}",
            e.ca_fingerprint, e.ca, e.cert, e.key
        )
    }
}

/// A listen address from the config could not be bound.
#[derive(Debug, Error)]
#[error("cannot listen on {addr} (config key {key}): {source}")]
pub struct ListenError {
    pub addr: String,
    pub key: &'static str,
    pub source: std::io::Error,
}

/// Binds the gRPC listener at `addr`, the value of config key `key`.
pub async fn listen(addr: &str, key: &'static str) -> Result<tokio::net::TcpListener, ListenError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError {
            addr: addr.to_string(),
            key,
            source,
        })
}

/// Binds a blocking listener (the NBD servers run on threads).
pub fn listen_std(addr: &str, key: &'static str) -> Result<std::net::TcpListener, ListenError> {
    std::net::TcpListener::bind(addr).map_err(|source| ListenError {
        addr: addr.to_string(),
        key,
        source,
    })
}

/// The error and its causes, each cause once (many messages already embed
/// their cause).
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        cur = cause.source();
    }
    text
}

/// The exit code of binary `bin` for `result`, printing a failure as
/// `bin: error: …` on stderr.
pub fn exit_code<E>(bin: &str, result: Result<(), E>) -> ExitCode
where
    E: AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{bin}: error: {}", error_text(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Error)]
    #[error("outer: inner")]
    struct Outer(#[source] Inner);

    #[derive(Debug, Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn error_text_names_each_cause_once() {
        assert_eq!(error_text(&Outer(Inner)), "outer: inner");
        assert_eq!(error_text(&Inner), "inner");
    }

    #[test]
    fn enroll_out_defaults_per_role() {
        let a = EnrollArgs {
            cs: "localhost:7443".into(),
            passphrase_file: "p".into(),
            id: "m1".into(),
            out: None,
        };
        assert_eq!(a.out_dir(Role::Mt), PathBuf::from("/etc/rebound/mt"));
        let e = Enrolled {
            ca: "/x/ca.pem".into(),
            cert: "/x/agent.pem".into(),
            key: "/x/agent.key".into(),
            ca_fingerprint: "ff".into(),
        };
        let s = a.summary(Role::Agent, &e);
        assert!(
            s.contains("machine_id = \"m1\"\n[tls]\nca = \"/x/ca.pem\""),
            "{s}"
        );
        assert!(!a.summary(Role::Ps, &e).contains("machine_id"));
    }
}
