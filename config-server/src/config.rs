//! The `rebound-cs` config file (DESIGN.md §2): one TOML file, documented
//! defaults, unknown keys are an error. `example-config.toml` documents every
//! key. Its defaults are the install layout (`/etc/rebound/tls/`, state in
//! `/var/lib/rebound/cs/`), which `rebound-cs init` writes as
//! `/etc/rebound/cs.toml`; `rebound-cs init --dir D` writes one with every
//! file in D as `D/config.toml`.

use rebound_common::cli_args::{ComponentConfig, TLS_DIR};
use rebound_common::tls::TlsFiles;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where `rebound-cs` keeps its state by default.
pub const DEFAULT_DIR: &str = "/var/lib/rebound/cs";

/// Where the plan hooks are installed by default.
pub const DEFAULT_HOOK_DIR: &str = "/etc/rebound/hooks";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC address (TLS; client certificates required except for enrollment).
    pub listen: String,
    /// Address of `/metrics` and `/healthz` (docs/METRICS.md); empty turns
    /// the endpoint off.
    pub metrics_listen: String,
    /// The SQLite database file (used when `[store] url` is empty).
    pub db: PathBuf,
    /// The CA's private key (PEM), used to sign enrolled components.
    pub ca_key: PathBuf,
    /// How long the certificates the CA signs stay valid ("90d", "12h");
    /// components renew theirs at two thirds of it.
    #[serde(with = "rebound_common::pki::lifetime::humantime_serde")]
    pub cert_lifetime: Duration,
    /// Components send a heartbeat this often (seconds, fractions allowed);
    /// three missed heartbeats make a component offline.
    pub heartbeat_secs: f64,
    /// How long a reprotect waits for the machine's agent to register
    /// (seconds), unless the operator gives `--wait-agent`.
    pub wait_agent_secs: u64,
    /// How long the CS waits for a component to answer one command (seconds).
    pub command_timeout_secs: u64,
    /// How long a planned failover waits for the source to drain (seconds).
    pub drain_timeout_secs: u64,
    /// How long a protect or reprotect waits for the first recovery point.
    pub initial_sync_timeout_secs: u64,
    /// Keep the source copy at commit (faster reprotect), unless the operator
    /// says otherwise on `rebound commit`.
    pub keep_source_copy: bool,
    /// The directory of plan hooks: a plan names an executable file in it,
    /// which the CS runs without a shell. Only root should be able to write it.
    pub hook_dir: PathBuf,
    /// The CS server certificate and the CA certificate; `cert` must carry
    /// the names components use to reach the CS.
    pub tls: TlsFiles,
    /// When the CS raises alerts and where it sends them (docs/METRICS.md).
    pub alerts: AlertsConfig,
    /// Where the state lives: the SQLite file `db` by default, or a
    /// PostgreSQL server that two CS processes (active and standby) share.
    pub store: StoreConfig,
}

/// The `[store]` section (docs/DEPLOY.md, "PostgreSQL and a standby CS").
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://USER@HOST:PORT/DB` (sqlx's URL form, `?sslmode=…`
    /// allowed): keep the state in PostgreSQL. Every CS process on the same
    /// database is one deployment: the one holding the lease serves, the
    /// others wait as standbys. Empty: the SQLite file `db`. The password
    /// belongs in a pgpass file (`PGPASSFILE` or `~/.pgpass`), not here; a
    /// URL with one makes the config a secret (init writes it 0640).
    pub url: String,
    /// With `url`: the file holding the key (64 hex digits) that seals the
    /// enrollment CA's private key in the database, so a standby CS signs
    /// with the same CA. Every CS of the deployment needs a copy (mode
    /// 0600); `rebound-cs init --store-url` writes it.
    pub secret_key_file: PathBuf,
}

impl StoreConfig {
    /// Whether the state is in PostgreSQL (else SQLite).
    pub fn is_postgres(&self) -> bool {
        !self.url.is_empty()
    }
}

/// The `[alerts]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// The RPO above which a machine raises `rpo-exceeded`, unless its
    /// policy sets its own (`rebound policy set M --rpo-alert D`).
    #[serde(with = "duration_text")]
    pub rpo_threshold: Duration,
    /// URLs the CS POSTs every raise and clear to, as JSON (http or https,
    /// checked when the config is read).
    #[serde(deserialize_with = "webhook_urls")]
    pub webhooks: Vec<String>,
    /// How long after it was queued the CS keeps retrying one webhook
    /// delivery before it gives up on it (and goes on with the next one).
    #[serde(with = "duration_text")]
    pub webhook_retry_for: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            rpo_threshold: Duration::from_secs(60),
            webhooks: Vec::new(),
            webhook_retry_for: Duration::from_secs(5 * 60),
        }
    }
}

/// `[alerts] webhooks`, each one an http or https URL: a typo fails the
/// start naming it, instead of showing up as minutes of retry warnings
/// per alert.
fn webhook_urls<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let urls = Vec::<String>::deserialize(d)?;
    for url in &urls {
        check_webhook_url(url).map_err(serde::de::Error::custom)?;
    }
    Ok(urls)
}

/// Why `url` cannot be a webhook, naming the key and the URL.
fn check_webhook_url(url: &str) -> Result<(), String> {
    let fix = "write it like \"https://alerts.example.com/rebound\"";
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|e| format!("[alerts] webhooks: {url:?} is not a URL ({e}); {fix}"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some_and(|h| !h.is_empty()) => Ok(()),
        Some("http" | "https") => Err(format!("[alerts] webhooks: {url:?} has no host; {fix}")),
        _ => Err(format!(
            "[alerts] webhooks: {url:?} is not an http or https URL; {fix}"
        )),
    }
}

/// Durations written as text ("60s", "5m", "1h 30m").
mod duration_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration: {e}; write it like \"60s\", \"5m\" or \"1h 30m\""
            ))
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::installed(Path::new("/"))
    }
}

impl ComponentConfig for Config {
    const COMPONENT: &'static str = "cs";
}

impl Config {
    /// The install layout under `root` (`/` on a real host): the database
    /// in `/var/lib/rebound/cs/`, the CA key and TLS files in
    /// `/etc/rebound/tls/`.
    pub fn installed(root: &Path) -> Config {
        let under = |p: &str| root.join(p.trim_start_matches('/'));
        let tls_dir = under(TLS_DIR);
        Config {
            ca_key: tls_dir.join("ca.key"),
            hook_dir: under(DEFAULT_HOOK_DIR),
            tls: TlsFiles::in_dir(&tls_dir, "cs"),
            ..Config::in_dir(&under(DEFAULT_DIR))
        }
    }

    /// The defaults with every file inside `dir` (what `init --dir` writes).
    pub fn in_dir(dir: &Path) -> Config {
        Config {
            listen: "127.0.0.1:7443".into(),
            metrics_listen: "127.0.0.1:9474".into(),
            db: dir.join("cs.db"),
            ca_key: dir.join("ca.key"),
            cert_lifetime: rebound_common::pki::lifetime::DEFAULT,
            heartbeat_secs: 2.0,
            wait_agent_secs: 30 * 60,
            command_timeout_secs: 60,
            drain_timeout_secs: 10 * 60,
            initial_sync_timeout_secs: 24 * 3600,
            keep_source_copy: true,
            hook_dir: dir.join("hooks"),
            tls: TlsFiles::in_dir(dir, "cs"),
            alerts: AlertsConfig::default(),
            store: StoreConfig::default(),
        }
    }

    /// The heartbeat interval, checked (at least 10 ms, at most 1 h).
    pub fn heartbeat(&self) -> Result<Duration, HeartbeatOutOfRange> {
        let s = self.heartbeat_secs;
        if !(0.01..=3600.0).contains(&s) {
            return Err(HeartbeatOutOfRange(s));
        }
        Ok(Duration::from_secs_f64(s))
    }
}

/// `heartbeat_secs` outside what the components can keep up with.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("heartbeat_secs = {0} is out of range: use a value from 0.01 to 3600")]
pub struct HeartbeatOutOfRange(pub f64);

#[cfg(test)]
mod tests {
    use super::*;
    use rebound_common::config::{check_example, check_refused};

    #[test]
    fn example_config_parses_and_matches_defaults() {
        let c: Config = check_example(include_str!("../example-config.toml"), |_| {});
        assert_eq!(c.listen, "127.0.0.1:7443");
        assert_eq!(c.heartbeat().unwrap(), Duration::from_secs(2));
        check_refused::<Config>("hearbeat_secs = 3", "hearbeat_secs");
        let c: Config =
            rebound_common::config::parse("heartbeat_secs = 0", Path::new("x.toml")).unwrap();
        let e = c.heartbeat().unwrap_err();
        assert!(e.to_string().contains("heartbeat_secs = 0"), "{e}");
    }

    #[test]
    fn alerts_section_takes_durations_as_text() {
        let c: Config = rebound_common::config::parse(
            "[alerts]\nrpo_threshold = \"2s\"\nwebhooks = [\"http://127.0.0.1:9/hook\"]\n\
             webhook_retry_for = \"1m 30s\"",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.alerts.rpo_threshold, Duration::from_secs(2));
        assert_eq!(c.alerts.webhook_retry_for, Duration::from_secs(90));
        assert_eq!(c.alerts.webhooks, vec!["http://127.0.0.1:9/hook"]);
        assert_eq!(Config::default().alerts, AlertsConfig::default());
        check_refused::<Config>("[alerts]\nrpo_treshold = \"2s\"", "rpo_treshold");
        let e = rebound_common::config::parse::<Config>(
            "[alerts]\nrpo_threshold = \"soon\"",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("soon") && e.contains("60s"), "{e}");
    }

    #[test]
    fn webhook_urls_are_checked_when_the_config_is_read() {
        let parse = |url: &str| {
            rebound_common::config::parse::<Config>(
                &format!("[alerts]\nwebhooks = [\"https://ok.example/h\", {url:?}]"),
                Path::new("x.toml"),
            )
        };
        assert!(parse("http://127.0.0.1:9/hook").is_ok());
        for bad in [
            "htp://x/hook",
            "127.0.0.1:9/hook",
            "not a url",
            "http:///hook",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("[alerts] webhooks") && e.contains(bad),
                "{bad}: {e}"
            );
        }
    }
}
