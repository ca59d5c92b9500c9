//! The renewed identity: where a component keeps the certificate and key
//! the CS issued it by renewal (DESIGN.md §3).
//!
//! Enrollment writes `<component>.pem` and `.key` under `/etc/rebound/tls`,
//! which a running daemon cannot write (the units run with
//! `ProtectSystem=strict`, PS/MT/CS as the `rebound` user). Renewal therefore
//! writes into the component's state directory, and both the TLS server
//! (its certificate resolver) and every new client connection use the
//! renewed identity once it exists.
//!
//! Certificate and key live in ONE file (the certificate chain's PEM, then
//! the key's), replaced with [`crate::durable::write_atomic_mode`]: a crash
//! while renewing leaves either the old pair or the new one, never a
//! certificate with another key.

use crate::pki::CertKeyPem;
use std::path::{Path, PathBuf};

/// The renewed identity's file in a component's state directory.
pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join("tls").join("renewed-identity.pem")
}

/// Writes the renewed identity (mode 0600), atomically and durably.
pub fn save(path: &Path, ck: &CertKeyPem) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut text = ck.cert_pem.trim_end().to_string();
    text.push('\n');
    text.push_str(ck.key_pem.trim_end());
    text.push('\n');
    crate::durable::write_atomic_mode(path, text.as_bytes(), 0o600)
}

/// Reads a renewed identity; `None` when there is none yet. The file holds
/// the certificate blocks first and the private key block last.
pub fn load(path: &Path) -> std::io::Result<Option<CertKeyPem>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(at) = text.find("-----BEGIN PRIVATE KEY-----").or_else(|| {
        text.find("-----BEGIN EC PRIVATE KEY-----")
            .or_else(|| text.find("-----BEGIN RSA PRIVATE KEY-----"))
    }) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} holds no private key: delete it to fall back to the enrolled certificate",
                path.display()
            ),
        ));
    };
    Ok(Some(CertKeyPem {
        cert_pem: text[..at].to_string(),
        key_pem: text[at..].to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, Role};

    #[test]
    fn a_saved_identity_loads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        assert!(load(&path).unwrap().is_none());
        let ca = Ca::generate("t").unwrap();
        let ck = ca.issue(Role::Ps, "p", &["localhost".into()]).unwrap();
        save(&path, &ck).unwrap();
        let back = load(&path).unwrap().unwrap();
        assert_eq!(back.cert_pem.trim(), ck.cert_pem.trim());
        assert_eq!(back.key_pem.trim(), ck.key_pem.trim());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
