//! `rebound-cs admin-cert`: a new admin certificate for the CLI, signed on
//! the CS host with the CA key (DESIGN.md §3).
//!
//! Admin certificates expire like every other (`cert_lifetime`) and the CLI
//! does not renew them: an operator whose certificate is about to expire
//! (or was lost or revoked) gets a new one here, as root on the CS host, the
//! way `init` made the first. The certificate is recorded as issued, so
//! `rebound revoke admin:NAME` can revoke it.

use crate::config::Config;
use crate::error::CsError;
use rebound_common::durable::write_atomic_mode;
use rebound_common::pki::lifetime::Validity;
use rebound_common::pki::{Ca, Role};
use std::path::{Path, PathBuf};

/// The admin name when none is given.
pub const DEFAULT_ID: &str = "admin";

/// What [`issue`] wrote.
#[derive(Debug, Clone)]
pub struct AdminCert {
    /// `admin:<id>`.
    pub who: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: String,
    /// When the certificate expires, in ms since the Unix epoch.
    pub expiry_ms: u64,
}

/// Signs a new admin certificate for `id` with the CA of `config`, records
/// it as issued, and writes `admin.key` (mode 0600, first) and `admin.pem`
/// into `out` (default: the directory of `[tls] cert`).
pub async fn issue(config: &Config, id: &str, out: Option<&Path>) -> Result<AdminCert, CsError> {
    rebound_common::enrollment::check_id(id)
        .map_err(|e| CsError::InvalidArgument(format!("--id {id:?}: {e}")))?;
    let dir = match out {
        Some(d) => d.to_path_buf(),
        None => config
            .tls
            .cert
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    };
    let ca_pem = crate::read("CA certificate ([tls] ca)", &config.tls.ca)?;
    // On PostgreSQL the CA key is only in the store, sealed.
    let store = crate::store::open(&config.store, &config.db).await?;
    let ca_key = match crate::ca_seal::ca_key_pem(config, store.as_ref()).await {
        Ok(k) => k,
        Err(e) => {
            store.close().await;
            return Err(e);
        }
    };
    let pki = |e: rebound_common::pki::PkiError| {
        CsError::Pki(format!(
            "cannot sign an admin certificate for admin:{id} with the CA {} and key {}: {e}",
            config.tls.ca.display(),
            if config.store.is_postgres() {
                "sealed in the store".to_string()
            } else {
                config.ca_key.display().to_string()
            }
        ))
    };
    let signed = async {
        let ca = Ca::from_pem(&ca_pem, &ca_key).map_err(pki)?;
        let ck = ca
            .issue_for(Role::Admin, id, &[], config.cert_lifetime)
            .map_err(pki)?;
        let der = rebound_common::enrollment::first_cert_der(&ck.cert_pem)
            .map_err(|e| CsError::Pki(format!("the admin:{id} certificate just issued: {e}")))?;
        let serial = rebound_common::pki::serial_hex(&der).map_err(pki)?;
        let validity = Validity::of_der(&der).map_err(pki)?;
        // Recorded before it is written: every certificate in use is one
        // the CS knows, and can revoke.
        crate::init::record_issued(store.as_ref(), Role::Admin, id, &ck.cert_pem).await?;
        Ok::<_, CsError>((ck, serial, validity))
    }
    .await;
    store.close().await;
    let (ck, serial, validity) = signed?;
    let cert = dir.join("admin.pem");
    let key = dir.join("admin.key");
    // The key first: a certificate never sits next to a key it does not match
    // for long, and the key is never readable by others, even for a moment.
    for (path, text, mode) in [(&key, &ck.key_pem, 0o600), (&cert, &ck.cert_pem, 0o644)] {
        write_atomic_mode(path, text.as_bytes(), mode)
            .map_err(|e| CsError::io(format!("cannot write {}", path.display()), e))?;
    }
    Ok(AdminCert {
        who: format!("{}:{id}", Role::Admin),
        cert,
        key,
        serial,
        expiry_ms: validity.not_after_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{init_layout, Layout};
    use crate::store::{SqliteStore, Store};

    #[tokio::test]
    async fn an_admin_certificate_is_issued_recorded_and_written_key_first_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cs");
        let layout = Layout::in_dir(&dir);
        init_layout(&layout, &[], None).await.unwrap();
        let config = layout.config.clone();
        let out = tmp.path().join("ops");
        std::fs::create_dir_all(&out).unwrap();
        let before = rebound_common::time::now_ms();
        let issued = issue(&config, "ops1", Some(&out)).await.unwrap();
        assert_eq!(issued.cert, out.join("admin.pem"));
        assert_eq!(issued.key, out.join("admin.key"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&issued.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let pem = std::fs::read_to_string(&issued.cert).unwrap();
        let der = rebound_common::enrollment::first_cert_der(&pem).unwrap();
        let who = rebound_common::pki::peer_identity(&der).unwrap();
        assert_eq!((who.role, who.id.as_str()), (Role::Admin, "ops1"));
        let v = Validity::of_der(&der).unwrap();
        let life = config.cert_lifetime.as_millis() as u64;
        assert!(
            v.not_after_ms >= before / 1000 * 1000 + life - 1000
                && v.not_after_ms <= rebound_common::time::now_ms() + life,
            "{v:?}"
        );
        assert_eq!(issued.expiry_ms, v.not_after_ms);
        let store = SqliteStore::open(&config.db).await.unwrap();
        let rec = store
            .get_issued_cert(&rebound_common::pki::serial_hex(&der).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((rec.role, rec.id.as_str()), (Role::Admin, "ops1"));
        assert_eq!(rec.expiry_ms, v.not_after_ms);
        let latest = store
            .latest_cert(Role::Admin, "ops1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(latest.serial, issued.serial);
        store.close().await;
        // The key goes with the certificate.
        let key = std::fs::read_to_string(&issued.key).unwrap();
        let kp = rcgen::KeyPair::from_pem(&key).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            kp.public_key_raw()
        );
        // The default directory is that of the CS certificate.
        let again = issue(&config, DEFAULT_ID, None).await.unwrap();
        assert_eq!(again.cert, dir.join("admin.pem"));
        assert_eq!(again.who, "admin:admin");
        // A bad name is refused before anything is signed.
        let e = issue(&config, "no such/name", Some(&out))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("--id \"no such/name\""), "{e}");
    }
}
