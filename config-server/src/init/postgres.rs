//! `rebound-cs init --store-url URL`: the CS processes of a PostgreSQL
//! deployment (docs/DEPLOY.md, "PostgreSQL and a standby CS").
//!
//! The first CS ([`init_first`]) makes the deployment as a SQLite init
//! does, but keeps its CA in the store, the private key sealed
//! ([`crate::ca_seal`]) with a new key written to `store.key`; the CA key
//! is never written to disk. Every other CS ([`join`]) reads the CA from
//! the store with a copy of that key file and gets its own server
//! certificate from it: no new CA, no new passphrase.

use super::{prepare, record_issued, write_config, write_new, write_private, Initialized, Layout};
use crate::ca_seal::{self, SealKey};
use crate::config::Config;
use crate::enrollment::{new_passphrase, set_passphrase};
use crate::error::CsError;
use crate::store::postgres::{redact_url, PgStore};
use crate::store::rows::q;
use crate::store::Store;
use rebound_common::pki::{write_cert, Ca, CertKeyPem, Role};
use rebound_common::tls::host_of;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The port of `metrics_listen` a PostgreSQL init writes.
const METRICS_PORT: u16 = 9474;

/// The name of the seal key's file next to the certificates.
pub const KEY_FILE: &str = "store.key";

/// What [`join`] made.
#[derive(Debug, Clone)]
pub struct Joined {
    pub dir: PathBuf,
    pub config_file: PathBuf,
    pub ca_cert: PathBuf,
    /// The copy of the seal key this CS reads.
    pub key_file: PathBuf,
    pub listen: String,
    pub server_names: Vec<String>,
}

/// The config of a CS on `url`: the seal key in the TLS directory, and
/// the metrics endpoint on the listen host, so CS processes on one machine
/// with different loopback addresses do not contend for one port.
fn postgres_config(layout: &Layout, mut config: Config, url: &str) -> Config {
    config.store.url = url.to_string();
    config.store.secret_key_file = layout.tls_dir.join(KEY_FILE);
    if let Ok(ip) = host_of(&config.listen).parse::<IpAddr>() {
        if !ip.is_unspecified() {
            config.metrics_listen = SocketAddr::new(ip, METRICS_PORT).to_string();
        }
    }
    config
}

fn pki_err(dir: &Path) -> impl Fn(rebound_common::pki::PkiError) -> CsError + '_ {
    move |e| CsError::Pki(format!("init in {}: {e}", dir.display()))
}

/// Writes this CS's certificate and key, lets the service read the key,
/// and records the certificate as issued.
async fn write_cs_cert(
    store: &dyn Store,
    dir: &Path,
    id: &str,
    ck: &CertKeyPem,
) -> Result<(), CsError> {
    write_cert(dir, "cs", ck).map_err(pki_err(dir))?;
    share_key(&dir.join("cs.key"))?;
    record_issued(store, Role::Cs, id, &ck.cert_pem).await
}

fn share_key(path: &Path) -> Result<(), CsError> {
    rebound_common::pki::share_key_with_service_group(path)
        .map_err(|e| CsError::io(format!("cannot set the group of {}", path.display()), e))
}

async fn open_store(config: &Config) -> Result<Arc<dyn Store>, CsError> {
    Ok(crate::store::open(&config.store, &config.db).await?)
}

/// The files one init call created, removed again when it fails, so a
/// rerun finds the place empty. A file that was there before is not
/// recorded (and not removed).
#[derive(Default)]
struct Created(Vec<PathBuf>);

impl Created {
    /// Records the paths among `paths` that do not exist yet (before they
    /// are written).
    fn fresh<'a>(&mut self, paths: impl IntoIterator<Item = &'a Path>) {
        for p in paths {
            if !p.exists() {
                self.0.push(p.to_path_buf());
            }
        }
    }

    fn remove_all(&self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Puts the CA (certificate and sealed key) into the store in one
/// transaction, unless the store already holds one: the certificate's
/// insert does nothing on a conflict, so of two inits racing on one
/// database exactly one wins, and the other is refused.
async fn claim_ca(store: &PgStore, key: &SealKey, ca: &Ca) -> Result<(), CsError> {
    let sealed = key.seal(ca.key_pem())?;
    let w = "putting the CA into the store";
    let mut tx = store.pool().begin().await.map_err(q(w))?;
    let inserted = sqlx::query(
        "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
    )
    .bind(ca_seal::CA_CERT_KEY)
    .bind(ca.cert_pem().as_bytes())
    .execute(&mut *tx)
    .await
    .map_err(q(w))?;
    if inserted.rows_affected() == 0 {
        return Err(already_there(store.url()));
    }
    sqlx::query(
        "INSERT INTO settings (key, value) VALUES ($1, $2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .bind(ca_seal::CA_KEY_SEALED)
    .bind(sealed)
    .execute(&mut *tx)
    .await
    .map_err(q(w))?;
    tx.commit().await.map_err(q(w))?;
    Ok(())
}

/// Takes back the CA [`claim_ca`] put in (only if it is still this one),
/// after a later record failed, so the database can take a new init.
async fn release_ca(store: &PgStore, ca: &Ca) {
    let w = "removing a half-made deployment's CA";
    let sql = sqlx::query(
        "DELETE FROM settings WHERE key IN ($2, $3)
         AND EXISTS (SELECT 1 FROM settings WHERE key = $2 AND value = $1)",
    );
    let _ = sql
        .bind(ca.cert_pem().as_bytes())
        .bind(ca_seal::CA_CERT_KEY)
        .bind(ca_seal::CA_KEY_SEALED)
        .execute(store.pool())
        .await
        .map_err(q(w));
}

fn already_there(shown: &str) -> CsError {
    CsError::AlreadyExists(format!(
        "the database {shown} already holds a Rebound deployment: add this CS to it with \
         `--join --secret-key-file STORE_KEY` (the {KEY_FILE} of its first CS), or give \
         another database"
    ))
}

/// Makes the first CS of a deployment on the PostgreSQL database `url`:
/// CA (kept in the store, its key sealed), `store.key`, the CS and admin
/// certificates, the enrollment passphrase and the config. Refuses a
/// database that already holds a deployment.
///
/// The files come first, the store's records last (the CA claimed with a
/// conflict check, see [`claim_ca`]); when anything fails, the files this
/// call created are removed and a claimed CA is taken back, so the init
/// can be run again.
pub async fn init_first(
    layout: &Layout,
    server_names: &[String],
    listen: Option<&str>,
    url: &str,
) -> Result<Initialized, CsError> {
    let (config, names) = prepare(layout, server_names, listen)?;
    let config = postgres_config(layout, config, url);
    let dir = &layout.tls_dir;
    let store = PgStore::open(url).await?;
    if ca_seal::has_ca(&store).await? {
        store.close().await;
        return Err(already_there(store.url()));
    }
    let mut created = Created::default();
    let made = make_first(layout, &config, &names, &store, &mut created).await;
    store.close().await;
    let passphrase = made.inspect_err(|_| created.remove_all())?;
    Ok(Initialized {
        dir: dir.to_path_buf(),
        passphrase,
        passphrase_file: layout.passphrase_file.clone(),
        config_file: layout.config_file.clone(),
        admin_cert: dir.join("admin.pem"),
        admin_key: dir.join("admin.key"),
        ca_cert: dir.join("ca.pem"),
        listen: config.listen.clone(),
        server_names: names,
    })
}

/// The work of [`init_first`]: every file (recorded in `created`), then
/// the store's records. Returns the enrollment passphrase.
async fn make_first(
    layout: &Layout,
    config: &Config,
    names: &[String],
    store: &PgStore,
    created: &mut Created,
) -> Result<String, CsError> {
    let dir = &layout.tls_dir;
    let pki = pki_err(dir);
    let ca = Ca::generate("deployment").map_err(&pki)?;
    let key = SealKey::generate(&config.store.secret_key_file)?;
    let lifetime = config.cert_lifetime;
    let cs = ca
        .issue_for(Role::Cs, "cs", names, lifetime)
        .map_err(&pki)?;
    let admin = ca
        .issue_for(Role::Admin, "admin", &[], lifetime)
        .map_err(&pki)?;
    let passphrase = new_passphrase();

    created.fresh([key.path()]);
    write_private(key.path(), key.to_file_text().as_bytes())?;
    share_key(key.path())?;
    let ca_pem = dir.join("ca.pem");
    created.fresh([ca_pem.as_path()]);
    write_new(&ca_pem, ca.cert_pem().as_bytes(), 0o644)?;
    for name in ["cs", "admin"] {
        let (k, c) = (
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}.pem")),
        );
        created.fresh([k.as_path(), c.as_path()]);
    }
    write_cert(dir, "cs", &cs).map_err(&pki)?;
    share_key(&dir.join("cs.key"))?;
    write_cert(dir, "admin", &admin).map_err(&pki)?;
    created.fresh([layout.passphrase_file.as_path()]);
    write_private(
        &layout.passphrase_file,
        format!("{passphrase}\n").as_bytes(),
    )?;
    created.fresh([layout.config_file.as_path()]);
    write_config(&layout.config_file, config, dir)?;

    claim_ca(store, &key, &ca).await?;
    let records = async {
        record_issued(store, Role::Cs, "cs", &cs.cert_pem).await?;
        record_issued(store, Role::Admin, "admin", &admin.cert_pem).await?;
        set_passphrase(store, &passphrase).await
    }
    .await;
    if records.is_err() {
        release_ca(store, &ca).await;
    }
    records.map(|()| passphrase)
}

/// The certificate id of a CS that joins, after its listen host:
/// `cs-10.0.0.6`.
fn join_id(listen: &str) -> String {
    let host: String = host_of(listen)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if host.is_empty() {
        "cs-2".into()
    } else {
        format!("cs-{host}")
    }
}

/// Adds a CS to the deployment on `url`: reads the CA from the store with
/// the seal key in `key_file` (a copy of the first CS's `store.key`),
/// copies that key next to its certificates, issues its own server
/// certificate, and writes its config. Refuses a database without a
/// deployment and a key that does not open its CA.
pub async fn join(
    layout: &Layout,
    server_names: &[String],
    listen: Option<&str>,
    url: &str,
    key_file: &Path,
) -> Result<Joined, CsError> {
    let key = SealKey::read(key_file)?;
    let (config, names) = prepare(layout, server_names, listen)?;
    let config = postgres_config(layout, config, url);
    let dir = &layout.tls_dir;
    let pki = pki_err(dir);
    let store = open_store(&config).await?;
    let made = async {
        let Some((ca_pem, ca_key)) = ca_seal::get_ca(store.as_ref(), &key).await? else {
            return Err(CsError::FailedPrecondition(format!(
                "the database {} holds no Rebound deployment to join: make its first CS \
                 with `rebound-cs init --store-url URL` (without --join)",
                redact_url(url)
            )));
        };
        let ca = Ca::from_pem(&ca_pem, &ca_key).map_err(&pki)?;
        let id = join_id(&config.listen);
        let cs = ca
            .issue_for(Role::Cs, &id, &names, config.cert_lifetime)
            .map_err(&pki)?;
        write_new(&dir.join("ca.pem"), ca_pem.as_bytes(), 0o644)?;
        write_cs_cert(store.as_ref(), dir, &id, &cs).await
    }
    .await;
    store.close().await;
    made?;
    let key_copy = &config.store.secret_key_file;
    let same = std::fs::canonicalize(key_file).ok() == std::fs::canonicalize(key_copy).ok();
    if !same {
        write_private(key_copy, key.to_file_text().as_bytes())?;
        share_key(key_copy)?;
    }
    write_config(&layout.config_file, &config, dir)?;
    Ok(Joined {
        dir: dir.to_path_buf(),
        config_file: layout.config_file.clone(),
        ca_cert: dir.join("ca.pem"),
        key_file: key_copy.clone(),
        listen: config.listen.clone(),
        server_names: names,
    })
}

#[cfg(test)]
mod tests;
