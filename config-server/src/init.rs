//! `rebound-cs init`: a new deployment (DESIGN.md §3).
//!
//! Makes the CA, the CS server certificate (for the names the CS is reached
//! at), the admin client certificate the CLI uses, and a random enrollment
//! passphrase. The passphrase is returned so `main` prints it once, and
//! written to a file (mode 0600); the database keeps only its salted hash
//! (see `enrollment::passphrase_key`). A ready config points at everything.
//!
//! Two layouts ([`Layout`]): the install layout of a real host (config
//! `/etc/rebound/cs.toml`, TLS files in `/etc/rebound/tls/`, passphrase
//! `/etc/rebound/passphrase`, database in `/var/lib/rebound/cs/`), or every
//! file in one directory (`--dir D`, for labs and tests).

use crate::config::Config;
use crate::enrollment::{new_passphrase, set_passphrase};
use crate::error::CsError;
use crate::store::SqliteStore;
use rebound_common::enrollment::{checked_names, host_name};
use rebound_common::pki::{write_cert, Ca, Role};
use rebound_common::tls::host_of;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

mod postgres;
pub use postgres::{init_first, join, Joined};

/// Where `init` puts a deployment's files.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// ca.pem, ca.key, cs.pem, cs.key, admin.pem, admin.key.
    pub tls_dir: PathBuf,
    pub config_file: PathBuf,
    pub passphrase_file: PathBuf,
    /// The config written, before its listen address is set.
    pub config: Config,
}

impl Layout {
    /// Everything in `dir` (`init --dir`): `dir/config.toml`,
    /// `dir/passphrase`, the TLS files and the database.
    pub fn in_dir(dir: &Path) -> Layout {
        Layout {
            tls_dir: dir.to_path_buf(),
            config_file: dir.join("config.toml"),
            passphrase_file: dir.join("passphrase"),
            config: Config::in_dir(dir),
        }
    }

    /// The install layout under `root` (`/` on a real host).
    pub fn installed(root: &Path) -> Layout {
        let etc = root.join("etc/rebound");
        let config = Config::installed(root);
        Layout {
            tls_dir: config
                .tls
                .ca
                .parent()
                .map_or_else(|| etc.join("tls"), Path::to_path_buf),
            config_file: etc.join("cs.toml"),
            passphrase_file: etc.join("passphrase"),
            config,
        }
    }

    /// Files whose presence means a deployment is already there.
    fn existing(&self) -> [PathBuf; 5] {
        [
            self.tls_dir.join("ca.pem"),
            self.tls_dir.join("ca.key"),
            self.config.db.clone(),
            self.config_file.clone(),
            self.passphrase_file.clone(),
        ]
    }
}

/// What `init` made.
#[derive(Debug, Clone)]
pub struct Initialized {
    /// The directory of the TLS files.
    pub dir: PathBuf,
    pub passphrase: String,
    pub passphrase_file: PathBuf,
    pub config_file: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub ca_cert: PathBuf,
    /// The listen address in the written config (what components dial).
    pub listen: String,
    /// The names the CS certificate is valid for.
    pub server_names: Vec<String>,
}

/// The CS certificate's names: `names` (default: the host name), the
/// listen host unless unspecified, and `localhost`/127.0.0.1 when listening
/// on 127.0.0.1, so local tools reach a loopback CS by either.
pub fn cs_server_names(names: &[String], listen: &str) -> Result<Vec<String>, CsError> {
    let mut all: Vec<String> = if names.is_empty() {
        let h = host_name();
        rebound_common::enrollment::check_server_name(&h)
            .is_ok()
            .then_some(h)
            .into_iter()
            .collect()
    } else {
        names.to_vec()
    };
    let host = host_of(listen);
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => {}
        Ok(ip) if ip == IpAddr::from([127, 0, 0, 1]) => {
            all.extend(["localhost".to_string(), "127.0.0.1".to_string()])
        }
        _ if host.is_empty() => {}
        _ => all.push(host.to_string()),
    }
    checked_names(&all).map_err(|e| CsError::InvalidArgument(e.to_string()))
}

/// Records a certificate signed outside enrollment (`init`, `admin-cert`),
/// so revocation and `rebound components` know it like an enrolled one.
pub(crate) async fn record_issued(
    store: &dyn crate::store::Store,
    role: Role,
    id: &str,
    cert_pem: &str,
) -> Result<(), CsError> {
    let bad = |e: String| CsError::Pki(format!("the {role}:{id} certificate just issued: {e}"));
    let der = rebound_common::enrollment::first_cert_der(cert_pem).map_err(bad)?;
    let serial = rebound_common::pki::serial_hex(&der).map_err(|e| bad(e.to_string()))?;
    let validity =
        rebound_common::pki::lifetime::Validity::of_der(&der).map_err(|e| bad(e.to_string()))?;
    store
        .put_issued_cert(&crate::store::IssuedCert {
            serial,
            role,
            id: id.to_string(),
            issued_ms: rebound_common::time::now_ms(),
            expiry_ms: validity.not_after_ms,
            revoked_ms: None,
        })
        .await?;
    Ok(())
}

/// The config `layout` gets with `listen`, and the CS certificate's names;
/// refuses a place that already holds a deployment and creates the
/// directories.
fn prepare(
    layout: &Layout,
    server_names: &[String],
    listen: Option<&str>,
) -> Result<(Config, Vec<String>), CsError> {
    let mut config = layout.config.clone();
    if let Some(l) = listen {
        config.listen = l.to_string();
    }
    let names = cs_server_names(server_names, &config.listen)?;
    for existing in layout.existing() {
        if existing.exists() {
            return Err(CsError::AlreadyExists(format!(
                "{} exists, so a deployment is already there: use another --dir, or remove its \
                 files if that deployment is no longer wanted",
                existing.display()
            )));
        }
    }
    let dir = &layout.tls_dir;
    let state_dir = config.db.parent().unwrap_or(dir);
    for (d, mode) in [
        (dir.as_path(), 0o755),
        (state_dir, 0o700),
        (layout.config_file.parent().unwrap_or(dir), 0o755),
    ] {
        // One directory for everything (`--dir`) stays private.
        let mode = if d == state_dir || *dir == *state_dir {
            0o700
        } else {
            mode
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(d)
            .map_err(|e| CsError::io(format!("cannot create {}", d.display()), e))?;
    }
    Ok((config, names))
}

/// Creates a deployment in `dir` (every file there). See [`init_layout`].
pub async fn init(
    dir: &Path,
    server_names: &[String],
    listen: Option<&str>,
) -> Result<Initialized, CsError> {
    init_layout(&Layout::in_dir(dir), server_names, listen).await
}

/// Creates a deployment in `layout`. Refuses a place that already holds
/// one. `server_names` are the DNS names/IPs for the CS certificate (see
/// [`cs_server_names`]); `listen` overrides the default listen address in
/// the written config.
pub async fn init_layout(
    layout: &Layout,
    server_names: &[String],
    listen: Option<&str>,
) -> Result<Initialized, CsError> {
    let (config, names) = prepare(layout, server_names, listen)?;
    let dir = &layout.tls_dir;
    let pki =
        |e: rebound_common::pki::PkiError| CsError::Pki(format!("init in {}: {e}", dir.display()));

    let ca = Ca::generate("deployment").map_err(pki)?;
    ca.write(dir).map_err(pki)?;
    let lifetime = config.cert_lifetime;
    let cs = ca
        .issue_for(Role::Cs, "cs", &names, lifetime)
        .map_err(pki)?;
    let admin = ca
        .issue_for(Role::Admin, "admin", &[], lifetime)
        .map_err(pki)?;
    write_cert(dir, "cs", &cs).map_err(pki)?;
    write_cert(dir, "admin", &admin).map_err(pki)?;

    // The CS runs as the service user: it reads its key and the CA key.
    for key in ["cs.key", "ca.key"] {
        let path = dir.join(key);
        rebound_common::pki::share_key_with_service_group(&path)
            .map_err(|e| CsError::io(format!("cannot set the group of {}", path.display()), e))?;
    }
    let store = SqliteStore::open(&config.db).await?;
    let passphrase = new_passphrase();
    set_passphrase(&store, &passphrase).await?;
    for (role, id, ck) in [(Role::Cs, "cs", &cs), (Role::Admin, "admin", &admin)] {
        record_issued(&store, role, id, &ck.cert_pem).await?;
    }
    store.close().await;
    give_to_state_dir_owner(&config.db)?;

    let passphrase_file = layout.passphrase_file.clone();
    write_private(&passphrase_file, format!("{passphrase}\n").as_bytes())?;
    let config_file = layout.config_file.clone();
    write_config(&config_file, &config, dir)?;
    Ok(Initialized {
        dir: dir.to_path_buf(),
        passphrase,
        passphrase_file,
        config_file,
        admin_cert: dir.join("admin.pem"),
        admin_key: dir.join("admin.key"),
        ca_cert: dir.join("ca.pem"),
        listen: config.listen.clone(),
        server_names: names,
    })
}

/// Whether the config of `config` holds a secret: a PostgreSQL URL with a
/// password (DEPLOY.md recommends a pgpass file instead).
pub fn config_holds_password(config: &Config) -> bool {
    url_holds_password(&config.store.url)
}

/// Whether the store URL `url` carries a password.
pub fn url_holds_password(url: &str) -> bool {
    crate::store::postgres::redact_url(url) != url
}

/// What init says about a config whose store URL carries a password.
pub fn password_note(config_file: &Path) -> String {
    format!(
        "{} holds the database password, so it is mode 0640 (root and the service's group): \
         better leave the password out of [store] url and put it in a pgpass file \
         (docs/DEPLOY.md, \"PostgreSQL and a standby CS\")",
        config_file.display()
    )
}

/// Writes the config file of `config`. Paths, addresses and timeouts are
/// not secret, so it is world-readable like the other components' configs,
/// unless its store URL carries a password: then mode 0640, with the group
/// of `tls_dir` when that is a service group (the install layout's
/// `root:rebound`), so only root and the service read it.
fn write_config(path: &Path, config: &Config, tls_dir: &Path) -> Result<(), CsError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let text = toml::to_string(config)
        .map_err(|e| CsError::Internal(format!("cannot write the config: {e}")))?;
    let secret = config_holds_password(config);
    let text =
        format!("# Written by `rebound-cs init`; see example-config.toml for every key.\n{text}");
    write_new(path, text.as_bytes(), if secret { 0o640 } else { 0o644 })?;
    if !secret {
        return Ok(());
    }
    let err = |e| {
        CsError::io(
            format!("cannot restrict {} to the service", path.display()),
            e,
        )
    };
    let gid = std::fs::metadata(tls_dir).map_err(err)?.gid();
    if gid != 0 {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o640)).map_err(err)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CsError> {
    write_new(path, bytes, 0o600)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CsError> {
    use std::io::Write;
    let err = |e| CsError::io(format!("cannot write {}", path.display()), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

/// The database `init` (run as root) made belongs to the owner of its
/// directory: in the install layout the package made
/// `/var/lib/rebound/cs` for the `rebound` user the service runs as, and
/// the CS must write its database.
fn give_to_state_dir_owner(db: &Path) -> Result<(), CsError> {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = db.parent() else {
        return Ok(());
    };
    let meta = std::fs::metadata(dir)
        .map_err(|e| CsError::io(format!("cannot stat {}", dir.display()), e))?;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| CsError::io(format!("cannot list {}", dir.display()), e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_db = (path.file_name().and_then(|n| n.to_str()))
            .zip(db.file_name().and_then(|n| n.to_str()))
            .is_some_and(|(n, d)| n.starts_with(d));
        let owner = entry.metadata().map(|m| (m.uid(), m.gid())).ok();
        if is_db && owner != Some((meta.uid(), meta.gid())) {
            std::os::unix::fs::chown(&path, Some(meta.uid()), Some(meta.gid())).map_err(|e| {
                CsError::io(
                    format!("cannot hand {} to its directory's owner", path.display()),
                    e,
                )
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use std::os::unix::fs::PermissionsExt;

    /// What init writes into the TLS directory.
    const TLS_FILES: [&str; 6] = [
        "ca.pem",
        "ca.key",
        "cs.pem",
        "cs.key",
        "admin.pem",
        "admin.key",
    ];

    #[tokio::test]
    async fn init_makes_a_deployment_and_keeps_only_a_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cs");
        let out = init(&dir, &["cs.example".into()], None).await.unwrap();
        for f in TLS_FILES.iter().chain(&["cs.db"]) {
            assert!(dir.join(f).exists(), "{f} missing");
        }
        let mode = std::fs::metadata(&out.passphrase_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&out.passphrase_file).unwrap();
        assert_eq!(text.trim(), out.passphrase);
        let cfg: Config = rebound_common::config::load(Some(&out.config_file)).unwrap();
        assert_eq!(cfg.db, dir.join("cs.db"));
        // The database holds a verifier, neither the passphrase nor its key.
        let store = SqliteStore::open(&cfg.db).await.unwrap();
        let verifier = crate::enrollment::load_verifier(&store)
            .await
            .unwrap()
            .unwrap();
        let salt = store
            .get_setting(crate::enrollment::SALT_KEY)
            .await
            .unwrap()
            .unwrap();
        let key = crate::enrollment::passphrase_key(&salt, &out.passphrase);
        assert_eq!(
            verifier,
            crate::enrollment::PassphraseVerifier::from_key(&key)
        );
        store.close().await;
        let db = std::fs::read(&cfg.db).unwrap();
        let wal = std::fs::read(cfg.db.with_extension("db-wal")).unwrap_or_default();
        for bytes in [&db, &wal] {
            assert!(!bytes
                .windows(out.passphrase.len())
                .any(|w| w == out.passphrase.as_bytes()));
            assert!(!bytes.windows(32).any(|w| w == key));
        }
        // A second init in the same place is refused.
        let again = init(&dir, &[], None).await.unwrap_err();
        assert!(
            again.to_string().contains("a deployment is already there"),
            "{again}"
        );
        // Listening on 127.0.0.1, local tools may use either loopback name.
        let (_, cert) = x509(&dir.join("cs.pem"));
        for n in ["cs.example", "localhost", "127.0.0.1"] {
            assert!(cert.contains(&n.to_string()), "{n} not in {cert:?}");
        }
    }

    /// The subjectAltNames of a PEM certificate file.
    fn x509(path: &Path) -> (String, Vec<String>) {
        let pem = std::fs::read_to_string(path).unwrap();
        let der = rebound_common::enrollment::first_cert_der(&pem).unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        let names = c
            .subject_alternative_name()
            .unwrap()
            .map(|s| {
                s.value
                    .general_names
                    .iter()
                    .map(|n| match n {
                        x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                        x509_parser::extensions::GeneralName::IPAddress(b) => {
                            match <[u8; 4]>::try_from(*b) {
                                Ok(v4) => IpAddr::from(v4).to_string(),
                                Err(_) => format!("{b:?}"),
                            }
                        }
                        other => format!("{other:?}"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        (c.subject().to_string(), names)
    }

    #[tokio::test]
    async fn init_without_dir_writes_the_install_layout() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::installed(root.path());
        let out = init_layout(&layout, &[], Some("10.0.0.5:7443"))
            .await
            .unwrap();
        let etc = root.path().join("etc/rebound");
        assert_eq!(out.config_file, etc.join("cs.toml"));
        assert_eq!(out.passphrase_file, etc.join("passphrase"));
        for f in TLS_FILES {
            assert!(etc.join("tls").join(f).exists(), "{f} missing");
        }
        let cfg: Config = rebound_common::config::load(Some(&out.config_file)).unwrap();
        assert_eq!(cfg.db, root.path().join("var/lib/rebound/cs/cs.db"));
        assert!(cfg.db.exists());
        assert_eq!(cfg.tls.cert, etc.join("tls/cs.pem"));
        assert_eq!(cfg.ca_key, etc.join("tls/ca.key"));
        // Not on loopback: the host name and the listen host, no localhost.
        let (_, names) = x509(&etc.join("tls/cs.pem"));
        assert!(names.contains(&"10.0.0.5".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n == "localhost" || n == "127.0.0.1"));
        assert_eq!(out.server_names, names);
        assert_eq!(Layout::installed(Path::new("/")).config, Config::default());
    }

    /// As the packages set it up: the state dir belongs to the service's
    /// user and /etc/rebound/tls to its group (65534 stands in for
    /// `rebound`; changing owners needs root, which the suite runs as).
    #[tokio::test]
    async fn init_as_root_leaves_the_service_user_able_to_run_the_cs() {
        use std::os::unix::fs::MetadataExt;
        let root = tempfile::tempdir().unwrap();
        let (state, tls) = (
            root.path().join("var/lib/rebound/cs"),
            root.path().join("etc/rebound/tls"),
        );
        for d in [&state, &tls] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).expect("chown: needs root");
        std::os::unix::fs::chown(&tls, None, Some(65534)).unwrap();
        let out = init_layout(&Layout::installed(root.path()), &[], Some("10.0.0.5:7443"))
            .await
            .unwrap();
        let db = std::fs::metadata(state.join("cs.db")).unwrap();
        assert_eq!((db.uid(), db.gid()), (65534, 65534), "the database");
        let cfg = std::fs::metadata(&out.config_file).unwrap();
        assert_eq!(cfg.permissions().mode() & 0o777, 0o644, "the config");
        for key in ["cs.key", "ca.key"] {
            let k = std::fs::metadata(tls.join(key)).unwrap();
            assert_eq!(
                (k.permissions().mode() & 0o777, k.gid()),
                (0o640, 65534),
                "{key}"
            );
        }
        let pass = std::fs::metadata(&out.passphrase_file).unwrap();
        assert_eq!(pass.permissions().mode() & 0o777, 0o600, "the passphrase");
    }

    /// The config is world-readable without a store password, and 0640
    /// with the group of the TLS directory (the service's) with one.
    #[test]
    fn a_config_with_a_store_password_is_readable_by_the_service_only() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let tls = tmp.path().join("tls");
        std::fs::create_dir(&tls).unwrap();
        std::os::unix::fs::chown(&tls, None, Some(65534)).expect("chown: needs root");
        let mut config = Config::in_dir(tmp.path());
        config.store.url = "postgres://rebound@db.example:5432/rebound".into();
        assert!(!config_holds_password(&config));
        let plain = tmp.path().join("plain.toml");
        write_config(&plain, &config, &tls).unwrap();
        let m = std::fs::metadata(&plain).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o644);
        config.store.url = "postgres://rebound:pw@db.example:5432/rebound".into();
        assert!(config_holds_password(&config));
        let secret = tmp.path().join("secret.toml");
        write_config(&secret, &config, &tls).unwrap();
        let m = std::fs::metadata(&secret).unwrap();
        assert_eq!((m.permissions().mode() & 0o777, m.gid()), (0o640, 65534));
        let back: Config = rebound_common::config::load(Some(&secret)).unwrap();
        assert_eq!(back.store.url, config.store.url);
    }

    #[test]
    fn cs_names_refuse_wildcards() {
        let e = cs_server_names(&["*.example".into()], "10.0.0.5:7443").unwrap_err();
        assert!(e.to_string().contains("wildcard"), "{e}");
        assert_eq!(
            cs_server_names(&["cs.example".into()], "0.0.0.0:7443").unwrap(),
            vec!["cs.example".to_string()]
        );
    }
}
