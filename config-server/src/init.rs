//! `rebound-cs init --dir D`: a new deployment (DESIGN.md §3).
//!
//! Makes the CA, the CS server certificate (for `localhost`, `127.0.0.1` and
//! any extra names), the admin client certificate the CLI uses, and a random
//! enrollment passphrase. The passphrase is returned so `main` prints it
//! once, and written to `D/passphrase` (mode 0600); the database keeps only
//! its salted hash (see `enrollment::passphrase_key`). A ready
//! `D/config.toml` points at everything in D.

use crate::config::Config;
use crate::enrollment::{new_passphrase, set_passphrase};
use crate::error::CsError;
use crate::store::SqliteStore;
use rebound_common::pki::{write_cert, Ca, Role};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What `init` made.
#[derive(Debug, Clone)]
pub struct Initialized {
    pub dir: PathBuf,
    pub passphrase: String,
    pub passphrase_file: PathBuf,
    pub config_file: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub ca_cert: PathBuf,
    /// The listen address in the written config (what components dial).
    pub listen: String,
}

/// Creates a deployment in `dir`. Refuses a directory that already holds
/// one. `server_names` are extra DNS names/IPs for the CS certificate;
/// `listen` overrides the default listen address in the written config.
pub async fn init(
    dir: &Path,
    server_names: &[String],
    listen: Option<&str>,
) -> Result<Initialized, CsError> {
    for existing in ["ca.pem", "ca.key", "cs.db"] {
        if dir.join(existing).exists() {
            return Err(CsError::AlreadyExists(format!(
                "{} already holds a deployment ({existing} exists): use another --dir, or remove \
                 the directory if that deployment is no longer wanted",
                dir.display()
            )));
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CsError::io(format!("cannot create {}", dir.display()), e))?;
    let pki =
        |e: rebound_common::pki::PkiError| CsError::Pki(format!("init in {}: {e}", dir.display()));

    let ca = Ca::generate("deployment").map_err(pki)?;
    ca.write(dir).map_err(pki)?;
    let mut names = rebound_common::pki::local_server_names();
    for n in server_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    write_cert(dir, "cs", &ca.issue(Role::Cs, "cs", &names).map_err(pki)?).map_err(pki)?;
    write_cert(
        dir,
        "admin",
        &ca.issue(Role::Admin, "admin", &[]).map_err(pki)?,
    )
    .map_err(pki)?;

    let mut config = Config::in_dir(dir);
    if let Some(l) = listen {
        config.listen = l.to_string();
    }
    let store = SqliteStore::open(&config.db).await?;
    let passphrase = new_passphrase();
    set_passphrase(&store, &passphrase).await?;
    store.close().await;

    let passphrase_file = dir.join("passphrase");
    write_private(&passphrase_file, format!("{passphrase}\n").as_bytes())?;
    let config_file = dir.join("config.toml");
    let text = toml::to_string(&config)
        .map_err(|e| CsError::Internal(format!("cannot write the config: {e}")))?;
    write_private(
        &config_file,
        format!("# Written by `rebound-cs init`; see example-config.toml for every key.\n{text}")
            .as_bytes(),
    )?;
    Ok(Initialized {
        dir: dir.to_path_buf(),
        passphrase,
        passphrase_file,
        config_file,
        admin_cert: dir.join("admin.pem"),
        admin_key: dir.join("admin.key"),
        ca_cert: dir.join("ca.pem"),
        listen: config.listen.clone(),
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CsError> {
    use std::io::Write;
    let err = |e| CsError::io(format!("cannot write {}", path.display()), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn init_makes_a_deployment_and_keeps_only_a_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cs");
        let out = init(&dir, &["cs.example".into()], None).await.unwrap();
        for f in [
            "ca.pem",
            "ca.key",
            "cs.pem",
            "cs.key",
            "admin.pem",
            "admin.key",
            "cs.db",
        ] {
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
        // The database holds the salted key, not the passphrase.
        let store = SqliteStore::open(&cfg.db).await.unwrap();
        let key = store
            .get_setting(crate::enrollment::VERIFIER_KEY)
            .await
            .unwrap()
            .unwrap();
        let salt = store
            .get_setting(crate::enrollment::SALT_KEY)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            key,
            crate::enrollment::passphrase_key(&salt, &out.passphrase)
        );
        let db = std::fs::read(&cfg.db).unwrap();
        assert!(!db
            .windows(out.passphrase.len())
            .any(|w| w == out.passphrase.as_bytes()));
        // A second init in the same place is refused.
        let again = init(&dir, &[], None).await.unwrap_err();
        assert!(
            again.to_string().contains("already holds a deployment"),
            "{again}"
        );
    }
}
