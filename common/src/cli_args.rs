//! The command-line pieces the four binaries (`rebound-agent`, `rebound-ps`,
//! `rebound-mt`, `rebound-cs`) share: the `run` flags, the `enroll`
//! subcommand, binding the listen sockets and reporting a failed run.
//!
//! Declared once so every binary spells its flags, messages and exit codes
//! the same way, and each `main` stays a thin dispatch over its library.

use crate::config::ConfigError;
use crate::control::CsConfig;
use crate::enrollment::{
    checked_names, default_server_names, enroll_with, Credential, EnrollError, EnrollOptions,
    Enrolled, NameError, TokenText,
};
use crate::pki::Role;
use crate::telemetry::{self, LogFormat};
use std::path::{Path, PathBuf};
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

/// Where the install layout keeps a component's config:
/// `/etc/rebound/<component>.toml`.
pub fn default_config(component: &str) -> PathBuf {
    PathBuf::from(format!("/etc/rebound/{component}.toml"))
}

/// A daemon's config file, named after its component (`agent`, `ps`, `mt`,
/// `cs`) for the install layout's default paths.
pub trait ComponentConfig: serde::de::DeserializeOwned + Default {
    const COMPONENT: &'static str;
}

/// Why `run` could not load its config.
#[derive(Debug, Error)]
pub enum RunError {
    #[error("config file {path} does not exist: copy the example ({example} when installed from the package, {component}'s example-config.toml in the source) there and edit it, or pass --config FILE")]
    NoConfig {
        path: PathBuf,
        example: PathBuf,
        component: &'static str,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Loads the config of `T`'s component from `path`, default
/// [`default_config`]; a missing file says where the example is.
pub fn load_config<T: ComponentConfig>(path: Option<&Path>) -> Result<T, RunError> {
    let path = path.map_or_else(|| default_config(T::COMPONENT), Path::to_path_buf);
    if !path.exists() {
        return Err(RunError::NoConfig {
            example: PathBuf::from(format!("/etc/rebound/{}.toml.example", T::COMPONENT)),
            component: T::COMPONENT,
            path,
        });
    }
    Ok(crate::config::load(Some(&path))?)
}

/// The flags of the `run` subcommand of the PS, MT and CS.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Config file (TOML; see the binary's example-config.toml); default
    /// /etc/rebound/<component>.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub log: LogArgs,
}

impl RunArgs {
    /// Starts TLS and logging ([`LogArgs::start`]) and loads the config.
    pub fn start<T: ComponentConfig>(&self) -> Result<T, RunError> {
        self.log.start();
        load_config(self.config.as_deref())
    }
}

/// `enroll`: get this component's certificate from the configuration
/// server with the deployment passphrase (an agent enrolling a new machine
/// id) or a one-time token (everything else; DESIGN.md §3).
#[derive(Debug, Clone, clap::Args)]
pub struct EnrollArgs {
    /// The configuration server, host:port (the host must be in its
    /// certificate); with a standby CS, every CS comma-separated, the
    /// active first (`--cs cs1:7443,cs2:7443`): tried in turn.
    #[arg(long, value_name = "ADDR[,ADDR…]")]
    pub cs: String,
    /// File holding the deployment passphrase (`rebound-cs init` printed
    /// it). Agents only, for a machine id with no live certificate.
    #[arg(long, required_unless_present_any = ["token", "token_file"], conflicts_with_all = ["token", "token_file"])]
    pub passphrase_file: Option<PathBuf>,
    /// A one-time token for this role and id (`rebound token create --role
    /// ROLE --id ID`). It pins the deployment's CA.
    #[arg(long, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// File holding the token (keeps it out of the process list).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// This component's id (the CS and operators name it by this; for an
    /// agent, the config's machine_id).
    #[arg(long)]
    pub id: String,
    /// Where ca.pem, <component>.pem and <component>.key go; default
    /// /etc/rebound/tls, where every config looks by default.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A DNS name or IP address other components reach this server by, put
    /// in its certificate (repeatable; PS and MT only). Default: the host
    /// name and the host of `advertise` (else `listen`) in --config.
    /// localhost and 127.0.0.1 are in the certificate only when named.
    #[arg(long = "name")]
    pub names: Vec<String>,
    /// This component's config, read for the default --name; default
    /// /etc/rebound/<component>.toml (ignored when missing).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Why `enroll` failed before or while talking to the CS.
#[derive(Debug, Error)]
pub enum EnrollCommandError {
    #[error("cannot read the {what} file {path}: {source}")]
    CredentialFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Enroll(#[from] EnrollError),
}

impl EnrollArgs {
    /// The output directory, absolute so the printed config snippet works
    /// from any working directory.
    pub fn out_dir(&self) -> PathBuf {
        let out = self.out.clone().unwrap_or_else(|| PathBuf::from(TLS_DIR));
        std::path::absolute(&out).unwrap_or(out)
    }

    /// The names the certificate serves TLS for: `--name`s, else the
    /// defaults; none for an agent (its certificate cannot serve).
    pub fn server_names(&self, role: Role) -> Result<Vec<String>, EnrollError> {
        if role == Role::Agent && !self.names.is_empty() {
            return Err(NameError::AgentNames(self.names.clone()).into());
        }
        if role == Role::Agent || !self.names.is_empty() {
            return Ok(checked_names(&self.names)?);
        }
        let config = self
            .config
            .clone()
            .unwrap_or_else(|| default_config(role.as_str()));
        Ok(default_server_names(Some(&config)))
    }

    /// Enrolls as `role`, writes the files and prints the config sections
    /// that use them.
    pub async fn run(&self, role: Role) -> Result<Enrolled, EnrollCommandError> {
        crate::tls::install_crypto_provider();
        let e = enroll_with(&EnrollOptions {
            cs_addr: self.cs.clone(),
            credential: self.credential()?,
            role,
            id: self.id.clone(),
            server_names: self.server_names(role)?,
            out_dir: self.out_dir(),
        })
        .await?;
        println!("{}", self.summary(role, &e));
        Ok(e)
    }

    /// The passphrase or token the flags name.
    pub fn credential(&self) -> Result<Credential, EnrollCommandError> {
        let read = |what: &'static str, path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|source| EnrollCommandError::CredentialFile {
                what,
                path: path.clone(),
                source,
            })
        };
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(read("token", f)?),
            (None, None) => None,
        };
        if let Some(t) = token {
            let t = TokenText::parse(&t).map_err(EnrollError::from)?;
            return Ok(Credential::Token(t));
        }
        match &self.passphrase_file {
            Some(f) => Ok(Credential::Passphrase(
                read("passphrase", f)?.trim().to_string(),
            )),
            None => Err(EnrollError::Invalid(
                "give --passphrase-file (agents), --token or --token-file".into(),
            )
            .into()),
        }
    }

    /// What `enroll` prints: who enrolled where, the names it serves TLS
    /// for, the CA fingerprint to compare, and the config sections to paste
    /// (`[cs]` with every address of `--cs`: the first as `addr`, the
    /// others as `standby`).
    pub fn summary(&self, role: Role, e: &Enrolled) -> String {
        let id = &self.id;
        let cs = CsConfig::from_list(&self.cs);
        let standby = if cs.standby.is_empty() {
            String::new()
        } else {
            format!("\nstandby = {:?}", cs.standby)
        };
        let machine = if role == Role::Agent {
            format!("machine_id = {id:?}\n")
        } else {
            String::new()
        };
        let names = if role == Role::Agent {
            "none (an agent's certificate is a client's only)".to_string()
        } else if e.server_names.is_empty() {
            "none: no one can connect to this server; enroll again with --name HOST".to_string()
        } else {
            e.server_names.join(", ")
        };
        format!(
            "enrolled as {role}:{id} with the configuration server at {}\n\
             TLS server names: {names}\n\
             CA fingerprint (blake3): {}\n\
             {machine}[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[cs]\naddr = {:?}{standby}",
            e.cs_addr, e.ca_fingerprint, e.ca, e.cert, e.key, cs.addr
        )
    }
}

/// Where the install layout keeps the TLS files (`ca.pem`,
/// `<component>.pem`, `<component>.key`).
pub const TLS_DIR: &str = "/etc/rebound/tls";

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
            passphrase_file: Some("p".into()),
            token: None,
            token_file: None,
            id: "m1".into(),
            out: None,
            names: Vec::new(),
            config: None,
        };
        assert_eq!(a.out_dir(), PathBuf::from("/etc/rebound/tls"));
        assert!(a.server_names(Role::Agent).unwrap().is_empty());
        let named = EnrollArgs {
            names: vec!["ps1.example.net".into(), "10.0.0.3".into()],
            ..a.clone()
        };
        assert_eq!(
            named.server_names(Role::Ps).unwrap(),
            vec!["ps1.example.net".to_string(), "10.0.0.3".to_string()]
        );
        let e = named.server_names(Role::Agent).unwrap_err().to_string();
        assert!(e.contains("cannot serve"), "{e}");
        let wild = EnrollArgs {
            names: vec!["*.example.net".into()],
            ..a.clone()
        };
        let e = wild.server_names(Role::Mt).unwrap_err().to_string();
        assert!(e.contains("wildcard"), "{e}");
        let e = Enrolled {
            ca: "/x/ca.pem".into(),
            cert: "/x/agent.pem".into(),
            key: "/x/agent.key".into(),
            ca_fingerprint: "ff".into(),
            server_names: vec!["ps1".into(), "10.0.0.3".into()],
            cs_addr: "localhost:7443".into(),
        };
        let s = a.summary(Role::Agent, &e);
        assert!(
            s.contains("machine_id = \"m1\"\n[tls]\nca = \"/x/ca.pem\""),
            "{s}"
        );
        assert!(s.ends_with("[cs]\naddr = \"localhost:7443\""), "{s}");
        let ps = a.summary(Role::Ps, &e);
        assert!(!ps.contains("machine_id"));
        assert!(ps.contains("TLS server names: ps1, 10.0.0.3"), "{ps}");
        // Every CS of --cs goes into [cs]: the first as addr, the rest as
        // standby; the summary names the one that answered.
        let pair = EnrollArgs {
            cs: "cs1:7443, cs2:7443,cs3:7443".into(),
            ..a.clone()
        };
        let e = Enrolled {
            cs_addr: "cs2:7443".into(),
            ..e
        };
        let s = pair.summary(Role::Agent, &e);
        assert!(
            s.contains("with the configuration server at cs2:7443\n"),
            "{s}"
        );
        assert!(
            s.ends_with("[cs]\naddr = \"cs1:7443\"\nstandby = [\"cs2:7443\", \"cs3:7443\"]"),
            "{s}"
        );
        let tail = s.split("[cs]\n").nth(1).unwrap();
        let cs: CsConfig = toml::from_str(tail).unwrap();
        assert_eq!(cs.addrs(), ["cs1:7443", "cs2:7443", "cs3:7443"]);
    }

    #[test]
    fn enroll_flags_take_exactly_one_credential() {
        #[derive(clap::Parser, Debug)]
        struct Cmd {
            #[command(flatten)]
            enroll: EnrollArgs,
        }
        use clap::Parser;
        let base = ["x", "--cs", "cs:7443", "--id", "m1", "--out", "/tmp/o"];
        let with = |extra: &[&str]| {
            Cmd::try_parse_from(base.iter().chain(extra).copied()).map(|c| c.enroll)
        };
        let a = with(&["--passphrase-file", "p"]).unwrap();
        assert_eq!(a.passphrase_file, Some(PathBuf::from("p")));
        assert_eq!(with(&["--token", "t"]).unwrap().token.as_deref(), Some("t"));
        assert!(with(&["--token-file", "f"]).unwrap().token_file.is_some());
        assert!(with(&[]).is_err(), "a credential is required");
        assert!(with(&["--passphrase-file", "p", "--token", "t"]).is_err());
        assert!(with(&["--token", "t", "--token-file", "f"]).is_err());
    }

    #[test]
    fn enroll_takes_a_token_or_a_token_file() {
        let text = crate::enrollment::TokenText::generate(b"ca").to_string();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, format!("{text}\n")).unwrap();
        let base = EnrollArgs {
            cs: "localhost:7443".into(),
            passphrase_file: None,
            token: Some(text.clone()),
            token_file: None,
            id: "ps1".into(),
            out: None,
            names: Vec::new(),
            config: None,
        };
        let from_file = EnrollArgs {
            token: None,
            token_file: Some(file),
            ..base.clone()
        };
        for a in [&base, &from_file] {
            match a.credential().unwrap() {
                Credential::Token(t) => assert_eq!(t.to_string(), text),
                other => panic!("{other:?}"),
            }
        }
        let bad = EnrollArgs {
            token: Some("nonsense".into()),
            ..base.clone()
        };
        let e = bad.credential().unwrap_err().to_string();
        assert!(e.contains("malformed"), "{e}");
        let missing = EnrollArgs {
            passphrase_file: Some(dir.path().join("nope")),
            token: None,
            ..base
        };
        let e = missing.credential().unwrap_err().to_string();
        assert!(e.contains("passphrase file") && e.contains("nope"), "{e}");
    }

    #[derive(Debug, Default, serde::Deserialize)]
    struct Cfg {
        #[allow(dead_code)]
        listen: String,
    }

    impl ComponentConfig for Cfg {
        const COMPONENT: &'static str = "ps";
    }

    #[test]
    fn a_missing_config_names_the_path_and_the_example() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ps.toml");
        let e = load_config::<Cfg>(Some(&path)).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("/etc/rebound/ps.toml.example"), "{e}");
        std::fs::write(&path, "listen = 'x'").unwrap();
        load_config::<Cfg>(Some(&path)).unwrap();
        assert_eq!(default_config("mt"), PathBuf::from("/etc/rebound/mt.toml"));
    }
}
