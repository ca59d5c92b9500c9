//! The enrollment CA's private key, sealed in the store (DESIGN.md §3).
//!
//! On PostgreSQL every CS of a deployment (the active one and its
//! standbys) signs with the same CA, so the CA lives in the shared store:
//! its certificate as is, its private key sealed with an AEAD
//! (ChaCha20-Poly1305, random nonce) under a 32-byte key that never enters
//! the database: the file `[store] secret_key_file` (64 hex digits), copied
//! to every CS of the deployment. A database dump alone does not give the
//! CA key away; a wrong or tampered copy fails to open instead of signing
//! with garbage.
//!
//! Sealed format: one version byte (1), the 12-byte nonce, then the
//! ciphertext with its 16-byte tag; the associated data names what it is,
//! so a sealed value cannot be passed off as another.

use crate::config::Config;
use crate::error::CsError;
use crate::store::Store;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The store setting holding the CA certificate (PEM).
pub const CA_CERT_KEY: &str = "ca.cert_pem";
/// The store setting holding the sealed CA private key.
pub const CA_KEY_SEALED: &str = "ca.key_sealed";

/// The first byte of a sealed value.
const VERSION: u8 = 1;
/// What a sealed value is (authenticated, not stored).
const AAD: &[u8] = b"rebound-cs enrollment CA private key, sealed v1";

#[derive(Debug, Error)]
pub enum SealError {
    #[error(
        "cannot read the store's secret key file {path} ([store] secret_key_file): {source}; \
         copy store.key from the first CS of the deployment (rebound-cs init --store-url wrote it)"
    )]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the store's secret key file {path} must hold 64 hex digits (32 bytes); it holds {found}"
    )]
    KeyFormat { path: PathBuf, found: String },
    #[error(
        "the store's CA key does not open with {path}: every CS of the deployment needs the \
         same secret_key_file"
    )]
    WrongKey { path: PathBuf },
    #[error("the sealed CA key in the store is {0}: restore the database from a backup")]
    Damaged(&'static str),
    #[error("cannot seal the CA key: the system's random source failed")]
    Random,
}

/// The key that seals the CA key, and the file it came from (for messages).
pub struct SealKey {
    bytes: [u8; 32],
    path: PathBuf,
}

impl SealKey {
    /// A new random key, to be written to `path`.
    pub fn generate(path: &Path) -> Result<SealKey, SealError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SealError::Random)?;
        Ok(SealKey {
            bytes,
            path: path.to_path_buf(),
        })
    }

    /// Reads the key from `path` (64 hex digits, surrounding blanks ignored).
    pub fn read(path: &Path) -> Result<SealKey, SealError> {
        let text = std::fs::read_to_string(path).map_err(|source| SealError::KeyFile {
            path: path.to_path_buf(),
            source,
        })?;
        let hex = text.trim();
        let bad = |found: String| SealError::KeyFormat {
            path: path.to_path_buf(),
            found,
        };
        if !hex.is_ascii() {
            return Err(bad("characters other than hex digits".into()));
        }
        if hex.len() != 64 {
            return Err(bad(format!("{} characters", hex.len())));
        }
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| bad("characters other than hex digits".into()))?;
        }
        Ok(SealKey {
            bytes,
            path: path.to_path_buf(),
        })
    }

    /// The file's text: 64 hex digits and a newline.
    pub fn to_file_text(&self) -> String {
        format!("{}\n", rebound_common::enrollment::hex(&self.bytes))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn aead(&self) -> LessSafeKey {
        // A 32-byte key is always the right length for ChaCha20-Poly1305.
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &self.bytes).expect("a 32-byte key"))
    }

    /// Seals `pem` (the CA private key).
    pub fn seal(&self, pem: &str) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut data = pem.as_bytes().to_vec();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(AAD),
                &mut data,
            )
            .map_err(|_| SealError::Random)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + data.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// Opens what [`SealKey::seal`] made.
    pub fn unseal(&self, sealed: &[u8]) -> Result<String, SealError> {
        let (&version, rest) = sealed.split_first().ok_or(SealError::Damaged("empty"))?;
        if version != VERSION {
            return Err(SealError::Damaged(
                "of an unknown format (from a newer rebound-cs?)",
            ));
        }
        if rest.len() < NONCE_LEN {
            return Err(SealError::Damaged("truncated"));
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Damaged("truncated"))?;
        let mut data = sealed.to_vec();
        let plain = self
            .aead()
            .open_in_place(nonce, Aad::from(AAD), &mut data)
            .map_err(|_| SealError::WrongKey {
                path: self.path.clone(),
            })?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError::Damaged("not text"))
    }
}

/// Puts the CA (certificate and sealed key) into the store.
pub async fn put_ca(
    store: &dyn Store,
    key: &SealKey,
    ca_cert_pem: &str,
    ca_key_pem: &str,
) -> Result<(), CsError> {
    let sealed = key.seal(ca_key_pem)?;
    store.put_setting(CA_KEY_SEALED, &sealed).await?;
    store
        .put_setting(CA_CERT_KEY, ca_cert_pem.as_bytes())
        .await?;
    Ok(())
}

/// The CA in the store, `(certificate, private key)`, opened with `key`;
/// `None` when the store holds no CA (no deployment was made in it).
pub async fn get_ca(store: &dyn Store, key: &SealKey) -> Result<Option<(String, String)>, CsError> {
    let Some(cert) = store.get_setting(CA_CERT_KEY).await? else {
        return Ok(None);
    };
    let sealed = store
        .get_setting(CA_KEY_SEALED)
        .await?
        .ok_or(SealError::Damaged("missing next to the CA certificate"))?;
    let cert = String::from_utf8(cert)
        .map_err(|_| CsError::Pki("the CA certificate in the store is not text".into()))?;
    Ok(Some((cert, key.unseal(&sealed)?)))
}

/// Whether the store already holds a deployment's CA.
pub async fn has_ca(store: &dyn Store) -> Result<bool, CsError> {
    Ok(store.get_setting(CA_CERT_KEY).await?.is_some())
}

/// The CA private key a CS of `config` signs with: from the store on
/// PostgreSQL (sealed, opened with `[store] secret_key_file`), else the
/// file `ca_key`.
pub async fn ca_key_pem(config: &Config, store: &dyn Store) -> Result<String, CsError> {
    if !config.store.is_postgres() {
        return crate::read("CA key (ca_key)", &config.ca_key);
    }
    let key = SealKey::read(&config.store.secret_key_file)?;
    match get_ca(store, &key).await? {
        Some((_, pem)) => Ok(pem),
        None => Err(CsError::FailedPrecondition(format!(
            "the store {} holds no CA: make the deployment's first CS with `rebound-cs init \
             --store-url URL` (or add this one with --join)",
            crate::store::postgres::redact_url(&config.store.url)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_in(dir: &Path, name: &str) -> SealKey {
        let path = dir.join(name);
        let k = SealKey::generate(&path).unwrap();
        std::fs::write(&path, k.to_file_text()).unwrap();
        SealKey::read(&path).unwrap()
    }

    const PEM: &str =
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";

    #[test]
    fn a_sealed_key_opens_with_its_key_only() {
        let tmp = tempfile::tempdir().unwrap();
        let (k, other) = (key_in(tmp.path(), "a.key"), key_in(tmp.path(), "b.key"));
        let sealed = k.seal(PEM).unwrap();
        assert!(!sealed.windows(11).any(|w| w == b"PRIVATE KEY"));
        assert_eq!(k.unseal(&sealed).unwrap(), PEM);
        // A random nonce: sealing twice gives different bytes.
        assert_ne!(k.seal(PEM).unwrap(), sealed);
        let e = other.unseal(&sealed).unwrap_err().to_string();
        assert!(
            e.contains("does not open with")
                && e.contains("b.key")
                && e.contains("same secret_key_file"),
            "{e}"
        );
    }

    #[test]
    fn a_tampered_or_truncated_value_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let k = key_in(tmp.path(), "a.key");
        let sealed = k.seal(PEM).unwrap();
        for i in [1, 13, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(
                matches!(k.unseal(&bad), Err(SealError::WrongKey { .. })),
                "byte {i}"
            );
        }
        let mut newer = sealed.clone();
        newer[0] = 2;
        assert!(matches!(k.unseal(&newer), Err(SealError::Damaged(_))));
        assert!(matches!(k.unseal(&sealed[..5]), Err(SealError::Damaged(_))));
        assert!(matches!(k.unseal(&[]), Err(SealError::Damaged(_))));
    }

    #[test]
    fn key_files_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = SealKey::read(&tmp.path().join("none"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            missing.contains("none") && missing.contains("secret_key_file"),
            "{missing}"
        );
        let short = tmp.path().join("short");
        std::fs::write(&short, "abcd\n").unwrap();
        let e = SealKey::read(&short).err().unwrap().to_string();
        assert!(
            e.contains("64 hex digits") && e.contains("4 characters"),
            "{e}"
        );
        let not_hex = tmp.path().join("nothex");
        std::fs::write(&not_hex, "zz".repeat(32)).unwrap();
        let e = SealKey::read(&not_hex).err().unwrap().to_string();
        assert!(e.contains("hex digits"), "{e}");
        // 64 bytes that are not 64 characters: refused, no panic on a
        // slice inside a character.
        let wide = tmp.path().join("wide");
        std::fs::write(&wide, "é".repeat(32)).unwrap();
        let e = SealKey::read(&wide).err().unwrap().to_string();
        assert!(e.contains("hex digits"), "{e}");
        let k = key_in(tmp.path(), "ok.key");
        assert_eq!(k.to_file_text().trim().len(), 64);
    }

    /// A SQLite store and a seal key in `dir`.
    async fn store_and_key(dir: &Path) -> (crate::store::SqliteStore, SealKey) {
        let store = crate::store::SqliteStore::open(&dir.join("cs.db"))
            .await
            .unwrap();
        (store, key_in(dir, "a.key"))
    }

    #[tokio::test]
    async fn a_store_without_a_ca_is_named_without_its_password() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, k) = store_and_key(tmp.path()).await;
        let mut config = Config::in_dir(tmp.path());
        config.store.url = "postgres://rebound:s3cret-pw@db.example:5432/rebound".into();
        config.store.secret_key_file = k.path().to_path_buf();
        let e = ca_key_pem(&config, &store).await.unwrap_err().to_string();
        assert!(e.contains("holds no CA") && e.contains("db.example"), "{e}");
        assert!(!e.contains("s3cret-pw"), "{e}");
        store.close().await;
    }

    #[tokio::test]
    async fn the_ca_goes_through_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, k) = store_and_key(tmp.path()).await;
        assert!(!has_ca(&store).await.unwrap());
        assert!(get_ca(&store, &k).await.unwrap().is_none());
        put_ca(&store, &k, "CERT", PEM).await.unwrap();
        assert!(has_ca(&store).await.unwrap());
        assert_eq!(
            get_ca(&store, &k).await.unwrap(),
            Some(("CERT".to_string(), PEM.to_string()))
        );
        let stored = store.get_setting(CA_KEY_SEALED).await.unwrap().unwrap();
        assert!(!stored
            .windows(10)
            .any(|w| PEM.as_bytes().windows(10).any(|p| p == w)));
        let other = key_in(tmp.path(), "b.key");
        let e = get_ca(&store, &other).await.unwrap_err().to_string();
        assert!(e.contains("does not open with"), "{e}");
        store.close().await;
    }
}
