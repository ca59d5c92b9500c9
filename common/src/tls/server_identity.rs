//! The certificate a server presents, reloaded when renewal replaces it.
//!
//! A component renews its certificate while it runs (DESIGN.md §3), so the
//! identity cannot be fixed when the listener starts: every handshake asks
//! this resolver, which serves the renewed identity (`tls::renewed`) once it
//! exists and picks up each later renewal, or a re-enrolled certificate,
//! without a restart. The files are looked at (one `stat` each) per
//! handshake and parsed only when they changed. Files that do not load (one
//! that does not parse, or a certificate whose new key is not written yet)
//! leave the identity served so far in place and are loaded again at the
//! next handshake, logged once per version of the files.

use super::{TlsError, TlsFiles};
use crate::pki::peer_identity;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tracing::{info, warn};

/// What identifies one version of a file: a renewal replaces the file by
/// rename (a new inode), an edit in place changes its time or length.
type Stamp = Option<(u64, i64, i64, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}

/// The renewed identity, the enrolled certificate and its key.
type Stamps = [Stamp; 3];

struct Current {
    /// The files `key` was loaded from.
    stamps: Stamps,
    /// The files that last failed to load (logged once, retried).
    failed: Option<Stamps>,
    key: Arc<CertifiedKey>,
}

/// Resolves the server certificate from the enrolled files or, once there
/// is one, the renewed identity.
pub(super) struct ReloadingIdentity {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: Mutex<Current>,
}

impl std::fmt::Debug for ReloadingIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReloadingIdentity({})", self.files.cert.display())
    }
}

impl ReloadingIdentity {
    /// Loads the identity now, so a server with no usable certificate fails
    /// at start with the file to fix.
    pub(super) fn new(
        files: &TlsFiles,
        provider: Arc<CryptoProvider>,
    ) -> Result<ReloadingIdentity, TlsError> {
        let stamps = Self::stamps(files);
        let key = Arc::new(files.certified_key(&provider)?);
        Ok(ReloadingIdentity {
            files: files.clone(),
            provider,
            current: Mutex::new(Current {
                stamps,
                failed: None,
                key,
            }),
        })
    }

    fn stamps(files: &TlsFiles) -> Stamps {
        [
            files.renewed.as_deref().and_then(stamp),
            stamp(&files.cert),
            stamp(&files.key),
        ]
    }

    /// The identity to present now: reloaded first when its files changed.
    pub(super) fn current(&self) -> Arc<CertifiedKey> {
        let stamps = Self::stamps(&self.files);
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.stamps != stamps {
            match self.files.certified_key(&self.provider) {
                Ok(key) => {
                    let who = key
                        .cert
                        .first()
                        .and_then(|c| peer_identity(c.as_ref()).ok())
                        .map(|p| p.to_string())
                        .unwrap_or_default();
                    info!(certificate = %who, "TLS server now presents its new certificate");
                    cur.key = Arc::new(key);
                    cur.stamps = stamps;
                    cur.failed = None;
                }
                Err(e) => {
                    if cur.failed != Some(stamps) {
                        warn!("TLS server keeps its current certificate: the changed one does not load (retried at each handshake): {e}");
                        cur.failed = Some(stamps);
                    }
                }
            }
        }
        cur.key.clone()
    }
}

impl ResolvesServerCert for ReloadingIdentity {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}
