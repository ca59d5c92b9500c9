//! Enrollment (DESIGN.md §3): how a component gets its certificate.
//!
//! A fresh agent, PS, MT or operator has a key pair it makes itself and one
//! credential: the deployment passphrase (an agent enrolling a machine id
//! no one holds) or a one-time token an operator created for exactly its
//! role and id (everything else; `grant.rs` holds the rules).
//!
//! 1. The client connects with TLS but accepts whatever certificate the CS
//!    presents, remembering it (the handshake signature is still checked,
//!    so the peer owns that certificate's key).
//! 2. `Params` gives the salt and the CA. With a token the client checks
//!    the CA against the hash the token carries and that it signed the
//!    server certificate seen, and only then sends the token's secret.
//!    With the passphrase it signs the request and the fingerprint of the
//!    server certificate it saw: a man in the middle presenting its own
//!    certificate can neither forward that proof nor make one.
//! 3. The CS checks the grant (`grant.rs`), signs the CSR with CN
//!    `"<role>:<id>"` ([`sign_csr`]), records the certificate, and answers
//!    with it, the CA and (passphrase) its own proof.
//! 4. The client checks the CA (pinned, or proven by the passphrase), that
//!    it signed the server certificate seen, and that the issued
//!    certificate carries its identity and key; only then does it write
//!    `ca.pem`, `<role>.pem` and `<role>.key`.
//!
//! The CS stores verifiers, not keys: the passphrase's Ed25519 public key
//! (plus the MAC key of its own proof) and each token's hash. A copy of the
//! database enrolls nothing; the MAC key lets it pose as the CS to a new
//! agent enrolling with the passphrase, which a token's CA pin prevents.

pub mod client;
mod grant;
mod limit;
pub mod server;
#[cfg(test)]
mod tests;

pub use client::{enroll, enroll_with, EnrollError, EnrollOptions, Enrolled};
// The proof primitives live in `rebound_common::enrollment`, shared with the
// client every component links.
pub use grant::create_hint;
pub use rebound_common::enrollment::{
    check_id, client_proof, enrollable, first_cert_der, hex, passphrase_key, proofs_equal,
    server_proof, PassphraseVerifier, KDF,
};
pub use server::EnrollmentService;

use crate::error::CsError;
use crate::store::Store;
use rand::RngCore;
use rcgen::{
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rebound_common::enrollment::check_server_name;
use rebound_common::pki::Role;

/// Settings keys in the store.
pub const SALT_KEY: &str = "enrollment.salt";
/// The passphrase's [`PassphraseVerifier`].
pub const VERIFIER_KEY: &str = "enrollment.verifier";
/// Where older versions kept the passphrase key itself; emptied when the
/// verifier is made from it.
pub const LEGACY_KEY: &str = "enrollment.key";
/// A new random passphrase: 32 hex digits in four groups (128 bits).
pub fn new_passphrase() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..16],
        &hex[16..24],
        &hex[24..32]
    )
}

/// Sets (or rotates) the deployment passphrase: a fresh salt and the derived
/// key go to the store. Enrolled certificates stay valid (DESIGN.md §3).
pub async fn set_passphrase(store: &dyn Store, passphrase: &str) -> Result<(), CsError> {
    if passphrase.trim().len() < 16 {
        return Err(CsError::InvalidArgument(
            "the passphrase must have at least 16 characters".into(),
        ));
    }
    let mut salt = [0u8; 32];
    rand::rng().fill_bytes(&mut salt);
    let key = passphrase_key(&salt, passphrase);
    store.put_setting(SALT_KEY, &salt).await?;
    let v = PassphraseVerifier::from_key(&key);
    store.put_setting(VERIFIER_KEY, &v.to_bytes()).await?;
    store.put_setting(LEGACY_KEY, &[]).await?;
    Ok(())
}

/// The stored passphrase verifier; a database that still holds the key
/// itself (an older CS) gets the verifier made from it and the key erased.
pub async fn load_verifier(store: &dyn Store) -> Result<Option<PassphraseVerifier>, CsError> {
    let corrupt = |what: &str| {
        CsError::Internal(format!(
            "the stored enrollment {what} is corrupt: set a new passphrase with `rebound-cs \
             rotate-passphrase`"
        ))
    };
    if let Some(b) = store.get_setting(VERIFIER_KEY).await? {
        return PassphraseVerifier::from_bytes(&b)
            .map(Some)
            .ok_or_else(|| corrupt("verifier"));
    }
    let Some(key) = store
        .get_setting(LEGACY_KEY)
        .await?
        .filter(|k| !k.is_empty())
    else {
        return Ok(None);
    };
    let key = <[u8; 32]>::try_from(key.as_slice()).map_err(|_| corrupt("key"))?;
    let v = PassphraseVerifier::from_key(&key);
    store.put_setting(VERIFIER_KEY, &v.to_bytes()).await?;
    store.put_setting(LEGACY_KEY, &[]).await?;
    Ok(Some(v))
}

/// An issued certificate and what the CS records about it.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub serial_hex: String,
    pub fingerprint_hex: String,
}

/// The subjectAltNames a CSR asks for, checked: DNS names and IP addresses
/// only, no wildcard, and none for an agent or admin (their certificates
/// never serve).
fn checked_san(
    sans: &[rcgen::SanType],
    role: Role,
    id: &str,
) -> Result<Vec<rcgen::SanType>, CsError> {
    let refuse = |why: String| {
        CsError::InvalidArgument(format!("the certificate request for {role}:{id}: {why}"))
    };
    if matches!(role, Role::Agent | Role::Admin) && !sans.is_empty() {
        return Err(refuse(format!(
            "asks for server names, but an {role} certificate cannot serve TLS"
        )));
    }
    for san in sans {
        let name = match san {
            rcgen::SanType::DnsName(d) => d.as_str().to_string(),
            rcgen::SanType::IpAddress(ip) => ip.to_string(),
            other => {
                return Err(refuse(format!(
                    "asks for {other:?}; only DNS names and IP addresses are issued"
                )))
            }
        };
        check_server_name(&name).map_err(|e| refuse(e.to_string()))?;
    }
    Ok(sans.to_vec())
}

/// Signs a CSR with the CA. The subject is replaced by CN `"<role>:<id>"`
/// (how every server authorises peers), the certificate is never a CA, and
/// it may serve TLS for the DNS names/IPs the CSR asks for (PS and MT are
/// servers, reached by those names; see [`checked_san`]) as well as act as
/// a client. It is valid for `lifetime` from now (the config's
/// `cert_lifetime`).
pub fn sign_csr(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    csr_pem: &str,
    role: Role,
    id: &str,
    lifetime: std::time::Duration,
) -> Result<Issued, CsError> {
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        CsError::InvalidArgument(format!(
            "the certificate request for {role}:{id} is not a valid signed PKCS#10 request: {e}"
        ))
    })?;
    let p = &mut csr.params;
    p.subject_alt_names = checked_san(&p.subject_alt_names, role, id)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{role}:{id}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if !p.subject_alt_names.is_empty() {
        p.extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    p.custom_extensions.clear();
    p.use_authority_key_identifier_extension = true;
    rebound_common::pki::lifetime::set_validity(p, lifetime);
    let mut serial = [0u8; 16];
    rand::rng().fill_bytes(&mut serial);
    serial[0] &= 0x7f;
    p.serial_number = Some(SerialNumber::from_slice(&serial));
    let pki = |e: rcgen::Error| CsError::Pki(format!("cannot sign {role}:{id}: {e}"));
    let key = KeyPair::from_pem(ca_key_pem).map_err(pki)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, key).map_err(pki)?;
    let cert = csr.signed_by(&issuer).map_err(pki)?;
    Ok(Issued {
        fingerprint_hex: hex(blake3::hash(cert.der()).as_bytes()),
        // The one serial form revocation lists compare (not `hex(&serial)`,
        // which keeps a leading zero byte the DER integer drops).
        serial_hex: rebound_common::pki::serial_hex(cert.der())
            .map_err(|e| CsError::Pki(format!("the certificate issued to {role}:{id}: {e}")))?,
        cert_pem: cert.pem(),
    })
}

#[cfg(test)]
mod signing_tests {
    use super::*;
    use rcgen::CertificateParams;
    use rebound_common::pki::{peer_identity, Ca};

    const DAY: std::time::Duration = std::time::Duration::from_secs(86400);

    #[test]
    fn signed_csr_carries_role_and_id_whatever_the_csr_asked() {
        let ca = Ca::generate("t").unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "admin:admin");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let issued = sign_csr(ca.cert_pem(), ca.key_pem(), &csr, Role::Ps, "ps1", DAY).unwrap();
        let der = first_cert_der(&issued.cert_pem).unwrap();
        let who = peer_identity(&der).unwrap();
        assert_eq!((who.role, who.id.as_str()), (Role::Ps, "ps1"));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca(), "a CSR must not get a CA certificate");
        let until = cert.validity().not_after.timestamp() as u64 * 1000;
        let left = until.saturating_sub(rebound_common::time::now_ms());
        assert!((86_390_000..=86_400_000).contains(&left), "{left} ms");
        assert_eq!(
            issued.serial_hex,
            rebound_common::pki::serial_hex(&der).unwrap()
        );
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        let bad = sign_csr(ca.cert_pem(), ca.key_pem(), "junk", Role::Ps, "ps1", DAY).unwrap_err();
        assert!(bad.to_string().contains("ps:ps1"), "{bad}");
    }

    fn csr(names: &[&str]) -> String {
        let key = KeyPair::generate().unwrap();
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let params = CertificateParams::new(names).unwrap();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn the_requested_names_are_issued_and_checked() {
        let ca = Ca::generate("t").unwrap();
        let sign = |names: &[&str], role| {
            sign_csr(ca.cert_pem(), ca.key_pem(), &csr(names), role, "x", DAY)
        };
        let issued = sign(&["ps1.example.net", "10.0.0.3"], Role::Ps).unwrap();
        let der = first_cert_der(&issued.cert_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| format!("{n}"))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[0].contains("ps1.example.net"), "{names:?}");
        assert!(names[1].contains("0a:00:00:03"), "{names:?}");
        let e = sign(&["*.example.net"], Role::Mt).unwrap_err().to_string();
        assert!(e.contains("wildcard") && e.contains("mt:x"), "{e}");
        let e = sign(&["host1"], Role::Agent).unwrap_err().to_string();
        assert!(e.contains("an agent certificate cannot serve"), "{e}");
        let e = sign(&["host1"], Role::Admin).unwrap_err().to_string();
        assert!(e.contains("an admin certificate cannot serve"), "{e}");
        sign(&[], Role::Agent).unwrap();
    }

    #[tokio::test]
    async fn a_stored_passphrase_key_becomes_a_verifier_and_is_erased() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("cs.db"))
            .await
            .unwrap();
        assert!(load_verifier(&store).await.unwrap().is_none());
        let key = passphrase_key(b"salt", "an old deployment passphrase");
        store.put_setting(LEGACY_KEY, &key).await.unwrap();
        let v = load_verifier(&store).await.unwrap().unwrap();
        assert_eq!(v, PassphraseVerifier::from_key(&key));
        assert_eq!(store.get_setting(LEGACY_KEY).await.unwrap().unwrap(), b"");
        assert_eq!(load_verifier(&store).await.unwrap(), Some(v));
    }

    #[test]
    fn ids_and_passphrases() {
        assert!(check_id("m1.a-b_c").is_ok());
        assert!(check_id("a:b").is_err());
        assert!(check_id("").is_err());
        assert_eq!(new_passphrase().len(), 35);
    }
}
