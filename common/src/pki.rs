//! PKI: the deployment's CA and the certificates it issues (DESIGN.md §3).
//!
//! Every gRPC connection is mutual TLS, and authorisation goes by the peer
//! certificate. A certificate's subject common name carries the component's
//! role and id as `"<role>:<id>"` (for agents the id is the machine id), so
//! a server learns who is calling from the handshake alone. Enrollment with
//! the configuration server will issue the same kind of certificate from a
//! CSR; until then `write_dev_bundle` makes a whole PKI on disk.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::fmt;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

pub mod lifetime;

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("peer certificate cannot be parsed: {0}")]
    Parse(String),
    #[error(
        "peer certificate subject {0:?} is not a Rebound identity (expected CN \"<role>:<id>\")"
    )]
    NotRebound(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// What a certificate's holder is allowed to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Ps,
    Mt,
    Cs,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Ps => "ps",
            Role::Mt => "mt",
            Role::Cs => "cs",
            Role::Admin => "admin",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "agent" => Role::Agent,
            "ps" => Role::Ps,
            "mt" => Role::Mt,
            "cs" => Role::Cs,
            "admin" => Role::Admin,
            _ => return None,
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is on the other end of a connection, from its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub role: Role,
    pub id: String,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role, self.id)
    }
}

/// A certificate and its private key, PEM encoded.
#[derive(Debug, Clone)]
pub struct CertKeyPem {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The deployment's certificate authority.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Makes a new self-signed CA.
    pub fn generate(name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Rebound CA {name}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        lifetime::set_validity(&mut params, lifetime::CA);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ca::from_pem(&cert_pem, &key_pem)
    }

    /// Loads a CA from its certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Writes `ca.pem` and `ca.key` into `dir` (the key 0600).
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        let pem = CertKeyPem {
            cert_pem: self.cert_pem().into(),
            key_pem: self.key_pem().into(),
        };
        write_cert(dir, "ca", &pem)
    }

    /// Issues a certificate for `role:id`, usable as a TLS client and (with
    /// `server_names`) as a TLS server, valid for [`lifetime::DEFAULT`].
    pub fn issue(
        &self,
        role: Role,
        id: &str,
        server_names: &[String],
    ) -> Result<CertKeyPem, PkiError> {
        self.issue_for(role, id, server_names, lifetime::DEFAULT)
    }

    /// [`Ca::issue`] valid for `lifetime` from now.
    pub fn issue_for(
        &self,
        role: Role,
        id: &str,
        server_names: &[String],
        lifetime: Duration,
    ) -> Result<CertKeyPem, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(server_names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{role}:{id}"));
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if !server_names.is_empty() {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.use_authority_key_identifier_extension = true;
        lifetime::set_validity(&mut params, lifetime);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertKeyPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Reads the Rebound identity (`CN = "<role>:<id>"`) from a DER certificate.
pub fn peer_identity(der: &[u8]) -> Result<PeerIdentity, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let (role, id) = cn
        .split_once(':')
        .ok_or_else(|| PkiError::NotRebound(cn.clone()))?;
    let role = Role::parse(role).ok_or_else(|| PkiError::NotRebound(cn.clone()))?;
    if id.is_empty() {
        return Err(PkiError::NotRebound(cn));
    }
    Ok(PeerIdentity {
        role,
        id: id.to_string(),
    })
}

/// A certificate's serial number in the one form every component compares
/// (revocation lists, the CS's records): lower-case hex of the DER
/// integer's value without leading zero bytes.
pub fn serial_hex(der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let raw = cert.raw_serial();
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let hex: String = raw[start..].iter().map(|b| format!("{b:02x}")).collect();
    Ok(if hex.is_empty() { "00".into() } else { hex })
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    crate::durable::write_atomic_mode(path, text.as_bytes(), mode).map_err(|source| {
        PkiError::Write {
            path: path.display().to_string(),
            source,
        }
    })
}

/// Lets the service group read the key of a daemon that runs as it (PS, MT,
/// CS: the `rebound` user): when the key's directory belongs to a group
/// other than root's and the key's own (the install layout's
/// `/etc/rebound/tls`, 0750 `root:rebound`), the key gets that group and
/// mode 0640, so the daemon reads what root enrolled. Elsewhere it stays
/// 0600. Never called for the agent's key (the agent runs as root and its
/// key must not be readable by the services on the same host) nor the
/// admin's.
pub fn share_key_with_service_group(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir_gid = std::fs::metadata(dir)?.gid();
    let own_gid = std::fs::metadata(path)?.gid();
    let mode = if dir_gid != 0 && dir_gid != own_gid {
        std::os::unix::fs::chown(path, None, Some(dir_gid))?;
        0o640
    } else {
        0o600
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Writes `<name>.key` (0600) and then `<name>.pem` (0644) into `dir`, each
/// replaced whole (temporary file, fsync, rename): a crash leaves either
/// pair or a new key with the old certificate, which a server that reloads
/// its identity refuses to load and retries, never a half-written file.
pub fn write_cert(dir: &Path, name: &str, ck: &CertKeyPem) -> Result<(), PkiError> {
    write_file(&dir.join(format!("{name}.key")), &ck.key_pem, 0o600)?;
    write_file(&dir.join(format!("{name}.pem")), &ck.cert_pem, 0o644)
}

/// The names every server certificate covers, so a one-machine deployment
/// works without naming any: `localhost` and `127.0.0.1`.
pub fn local_server_names() -> Vec<String> {
    vec!["localhost".to_string(), "127.0.0.1".to_string()]
}

/// Writes a complete PKI for a lab deployment into `dir`: `ca.pem`/`ca.key`,
/// `ps.pem`/`.key`, `mt.pem`/`.key` (servers for `localhost` and 127.0.0.1),
/// `admin.pem`/`.key`, and `agent-<machine>.pem`/`.key` per machine.
pub fn write_dev_bundle(dir: &Path, machines: &[String]) -> Result<(), PkiError> {
    write_dev_bundle_for(dir, machines, &local_server_names())
}

/// [`write_dev_bundle`] with the PS and MT certificates valid for `servers`.
pub fn write_dev_bundle_for(
    dir: &Path,
    machines: &[String],
    servers: &[String],
) -> Result<(), PkiError> {
    write_dev_bundle_with(dir, machines, servers, lifetime::DEFAULT)
}

/// [`write_dev_bundle_for`] with every certificate but the CA's valid for
/// `lifetime`.
pub fn write_dev_bundle_with(
    dir: &Path,
    machines: &[String],
    servers: &[String],
    lifetime: Duration,
) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    let ca = Ca::generate("lab")?;
    ca.write(dir)?;
    let issue = |role, id: &str, names: &[String]| ca.issue_for(role, id, names, lifetime);
    write_cert(dir, "ps", &issue(Role::Ps, "ps1", servers)?)?;
    write_cert(dir, "mt", &issue(Role::Mt, "mt1", servers)?)?;
    write_cert(dir, "admin", &issue(Role::Admin, "admin", &[])?)?;
    for m in machines {
        write_cert(dir, &format!("agent-{m}"), &issue(Role::Agent, m, &[])?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn key_mode_and_gid(dir: &Path, name: &str, shared: bool) -> (u32, u32) {
        let ca = Ca::generate("t").unwrap();
        write_cert(dir, name, &ca.issue(Role::Ps, "p", &[]).unwrap()).unwrap();
        let key = dir.join(format!("{name}.key"));
        if shared {
            share_key_with_service_group(&key).unwrap();
        }
        let m = std::fs::metadata(key).unwrap();
        (m.permissions().mode() & 0o777, m.gid())
    }

    #[test]
    fn only_a_service_key_in_a_service_group_directory_is_group_readable() {
        let dir = tempfile::tempdir().unwrap();
        let own = std::fs::metadata(dir.path()).unwrap().gid();
        assert_eq!(key_mode_and_gid(dir.path(), "ps", true), (0o600, own));
        // /etc/rebound/tls is root:rebound 0750: the services' group reads
        // their keys, never the agent's. 65534 (nogroup) stands in for
        // `rebound`; changing a directory's group needs root, which the
        // suite runs as.
        std::os::unix::fs::chown(dir.path(), None, Some(65534))
            .expect("chown to gid 65534: this test needs root");
        assert_eq!(key_mode_and_gid(dir.path(), "ps", true), (0o640, 65534));
        let agent = key_mode_and_gid(dir.path(), "agent", false);
        assert_eq!(agent.0, 0o600, "the agent's key");
        // Enrolling again over a shared key makes a private one private.
        assert_eq!(key_mode_and_gid(dir.path(), "ps", false).0, 0o600);
    }

    use super::*;

    #[test]
    fn enrolling_again_replaces_both_files_whole() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("t").unwrap();
        let (key, cert) = (dir.path().join("ps.key"), dir.path().join("ps.pem"));
        std::fs::write(&key, "an old key, left readable").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let ck = ca.issue(Role::Ps, "p", &[]).unwrap();
        write_cert(dir.path(), "ps", &ck).unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), ck.key_pem);
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), ck.cert_pem);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&key), mode(&cert)), (0o600, 0o644));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
    }

    #[test]
    fn identity_roundtrip() {
        let ca = Ca::generate("t").unwrap();
        let ck = ca.issue(Role::Agent, "m1", &[]).unwrap();
        let der = rustls_pemfile_der(&ck.cert_pem);
        let id = peer_identity(&der).unwrap();
        assert_eq!(
            id,
            PeerIdentity {
                role: Role::Agent,
                id: "m1".into()
            }
        );
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        again.issue(Role::Ps, "p", &["localhost".into()]).unwrap();
    }

    fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }
}
