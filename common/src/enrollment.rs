//! Enrollment (DESIGN.md §3), the component side: what `rebound-agent|
//! rebound-ps|rebound-mt enroll --cs ADDR[,ADDR…] --passphrase-file F |
//! --token T` calls ([`enroll_with`]: each CS address in turn until one
//! answers), plus the primitives both sides share (the
//! passphrase proofs in `proof.rs`, the token text in `token.rs`).
//!
//! A fresh component has a key pair it makes itself and either the
//! deployment passphrase (agents enrolling a new machine id) or a one-time
//! token an operator created for exactly its role and id (everything else).
//! It connects with TLS accepting whatever certificate the CS presents
//! (remembering it; the handshake signature is still checked).
//!
//! - With the passphrase it sends its CSR with a proof bound to the server
//!   certificate it saw, and accepts the CA it gets back only when the CS's
//!   own proof checks out.
//! - With a token it first pins the CA: the CA in `Params` must hash to the
//!   token's CA hash and must have signed the server certificate it saw;
//!   only then does it send the token's id and secret.
//!
//! Either way the CA must have signed the server certificate seen, and the
//! issued certificate must carry this role, id and key, before anything is
//! written. The CS side lives in `rebound-cs` (`enrollment::server`).

use crate::pki::{peer_identity, write_cert, CertKeyPem, Role};
use rcgen::{CertificateParams, DnType, KeyPair};
use rebound_proto::control::{EnrollParamsRequest, EnrollRequest};
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::{Path, PathBuf};
use thiserror::Error;

use rand::RngCore;

mod connect;
mod names;
mod proof;
mod token;

pub use names::{
    advertised_host, check_server_name, checked_names, default_server_names, host_name, NameError,
};
pub use proof::{
    client_proof, passphrase_key, proofs_equal, server_key, server_proof, PassphraseVerifier,
    ProofRequest, KDF,
};
pub use token::{verifier as token_verifier, MalformedToken, Presented, TokenText};

/// Roles that may enroll: agents with the passphrase or a token; PS, MT
/// and operators (admin) with a token.
pub fn enrollable(role: Role) -> bool {
    matches!(role, Role::Agent | Role::Ps | Role::Mt | Role::Admin)
}

/// What proves the right to enroll.
#[derive(Debug, Clone)]
pub enum Credential {
    /// The deployment passphrase: only an agent, only for a machine id with
    /// no live identity.
    Passphrase(String),
    /// A one-time token for exactly this role and id.
    Token(TokenText),
}

/// Checks a component id: 1–128 characters of `[A-Za-z0-9._-]`.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!("id {id:?} must have 1 to 128 characters"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "id {id:?} contains {c:?}: use letters, digits, '.', '_' and '-' only"
        ));
    }
    Ok(())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The DER of the first certificate in a PEM text.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, String> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("no PEM certificate: {e}"))?;
    if p.label != "CERTIFICATE" {
        return Err(format!("expected a CERTIFICATE, found {}", p.label));
    }
    Ok(p.contents)
}

/// The server that answered enrollment is not the CS: its certificate is
/// from the deployment's CA (any enrolled PS or MT holds one, for names it
/// chose) but of another role.
#[derive(Debug, Error)]
#[error("it presented certificate {presented}, but only the configuration server (a cs certificate) enrolls: check --cs points at the CS")]
struct NotTheCs {
    presented: String,
}

/// The server enrolling us must present the CS's certificate (role `cs`).
fn require_cs(server_cert: &[u8]) -> Result<(), NotTheCs> {
    match peer_identity(server_cert) {
        Ok(who) if who.role == Role::Cs => Ok(()),
        Ok(who) => Err(NotTheCs {
            presented: who.to_string(),
        }),
        Err(e) => Err(NotTheCs {
            presented: format!("that is no Rebound identity ({e})"),
        }),
    }
}

#[derive(Debug, Error)]
pub enum EnrollError {
    #[error("invalid enrollment request: {0}")]
    Invalid(String),
    #[error("cannot reach the configuration server at {addr}: {message} (check --cs and that rebound-cs runs there)")]
    Connect { addr: String, message: String },
    #[error("cannot reach any configuration server: {tried} (check that --cs lists the deployment's CS addresses and that rebound-cs runs at one of them; a standby CS answers only once it has taken over)")]
    Unreachable { tried: String },
    #[error("the configuration server at {addr} refused the enrollment: {message}")]
    Refused { addr: String, message: String },
    #[error("the configuration server at {addr} is not trusted: {message}. Nothing was written; check --cs points at your CS and that no proxy sits in between")]
    Untrusted { addr: String, message: String },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Token(#[from] MalformedToken),
    #[error("cannot make the key or certificate request: {0}")]
    Pki(String),
    #[error("cannot write {path}: {source} (check --out / the state directory is writable)")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What to enroll as, and where.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    /// The CS, `host:port`, or every CS of the deployment comma-separated
    /// (the active first; tried in turn). Each `host` must be a name in
    /// that CS's certificate (what `rebound-cs init` printed as its names).
    pub cs_addr: String,
    pub credential: Credential,
    pub role: Role,
    pub id: String,
    /// DNS names/IPs the certificate should be valid for as a TLS server
    /// (PS and MT: the names others dial it by); empty for agents.
    pub server_names: Vec<String>,
    /// Where `ca.pem`, `<role>.pem` and `<role>.key` go.
    pub out_dir: PathBuf,
}

/// Where enrollment wrote the files (ready for a `[tls]` config section).
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// blake3 of the CA certificate's DER (hex), for the operator to compare.
    pub ca_fingerprint: String,
    /// The names the certificate serves TLS for (none for an agent).
    pub server_names: Vec<String>,
    /// The address of the CS that enrolled (the first of `--cs` that
    /// answered).
    pub cs_addr: String,
}

/// Enrolls `role:id` with the CS at `cs_addr` and writes the files into
/// `out_dir`, for a deployment on one host: PS and MT certificates are valid
/// as servers for `localhost` and `127.0.0.1` only. Real hosts use
/// [`enroll_with`] with the names the component is reached at.
pub async fn enroll(
    cs_addr: &str,
    passphrase: &str,
    role: Role,
    id: &str,
    out_dir: &Path,
) -> Result<Enrolled, EnrollError> {
    enroll_local(
        cs_addr,
        Credential::Passphrase(passphrase.into()),
        role,
        id,
        out_dir,
    )
    .await
}

/// [`enroll`] with a token's text (`rebound token create` printed it).
pub async fn enroll_token(
    cs_addr: &str,
    token: &str,
    role: Role,
    id: &str,
    out_dir: &Path,
) -> Result<Enrolled, EnrollError> {
    let token = TokenText::parse(token)?;
    enroll_local(cs_addr, Credential::Token(token), role, id, out_dir).await
}

async fn enroll_local(
    cs_addr: &str,
    credential: Credential,
    role: Role,
    id: &str,
    out_dir: &Path,
) -> Result<Enrolled, EnrollError> {
    let server_names = if matches!(role, Role::Ps | Role::Mt) {
        crate::pki::local_server_names()
    } else {
        Vec::new()
    };
    enroll_with(&EnrollOptions {
        cs_addr: cs_addr.to_string(),
        credential,
        role,
        id: id.to_string(),
        server_names,
        out_dir: out_dir.to_path_buf(),
    })
    .await
}

/// Enrolls as described by `opts`, with the first CS address that answers
/// (one that cannot be reached moves on to the next; an answer, even a
/// refusal, ends the turn). See the module doc for what is checked.
pub async fn enroll_with(opts: &EnrollOptions) -> Result<Enrolled, EnrollError> {
    let addrs = crate::control::split_addrs(&opts.cs_addr);
    if addrs.is_empty() {
        return Err(EnrollError::Invalid(
            "--cs names no address: give host:port of the configuration server (several \
             comma-separated when it has a standby)"
                .into(),
        ));
    }
    for a in &addrs {
        connect::host_of(a)?;
    }
    crate::control::in_turn(
        &addrs,
        |addr| enroll_at(opts, addr),
        |e| matches!(e, EnrollError::Connect { .. }),
    )
    .await
    .map_err(|t| {
        t.into_error_listing(
            |e| match e {
                EnrollError::Connect { addr, message } => format!("{addr}: {message}"),
                other => other.to_string(),
            },
            |tried| EnrollError::Unreachable { tried },
        )
    })
}

/// Enrolls with the CS at `addr`.
async fn enroll_at(opts: &EnrollOptions, addr: String) -> Result<Enrolled, EnrollError> {
    if !enrollable(opts.role) {
        return Err(EnrollError::Invalid(format!(
            "role {} cannot enroll: only agent, ps, mt and admin do",
            opts.role
        )));
    }
    check_id(&opts.id).map_err(EnrollError::Invalid)?;
    if opts.role != Role::Agent && matches!(opts.credential, Credential::Passphrase(_)) {
        return Err(EnrollError::Invalid(format!(
            "{role}:{id} enrolls with a token, not the passphrase (the passphrase enrolls \
             agents only): create one on an admin host with `rebound token create --role {role} \
             --id {id}` and pass it with --token",
            role = opts.role,
            id = opts.id
        )));
    }
    let server_names = checked_names(&opts.server_names)?;
    if opts.role == Role::Agent && !server_names.is_empty() {
        return Err(NameError::AgentNames(server_names).into());
    }
    let host = connect::host_of(&addr)?;
    let server_name = ServerName::try_from(host.clone())
        .map_err(|e| EnrollError::Invalid(format!("--cs host {host:?}: {e}")))?;

    // The key stays here; only the CSR travels.
    let key = KeyPair::generate().map_err(|e| EnrollError::Pki(e.to_string()))?;
    let mut params = CertificateParams::new(server_names.clone())
        .map_err(|e| EnrollError::Pki(format!("server names {server_names:?}: {e}")))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{}:{}", opts.role, opts.id));
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| EnrollError::Pki(e.to_string()))?;

    let (mut client, seen) = connect::connect(&addr, server_name.clone()).await?;
    let connect_err = |message: String| EnrollError::Connect {
        addr: addr.clone(),
        message,
    };
    let refused = |s: tonic::Status| {
        if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown {
            connect_err(s.message().to_string())
        } else {
            EnrollError::Refused {
                addr: addr.clone(),
                message: s.message().to_string(),
            }
        }
    };
    let untrusted = |message: String| EnrollError::Untrusted {
        addr: addr.clone(),
        message,
    };
    let params = client
        .params(EnrollParamsRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    let (server_cert, intermediates) = seen
        .lock()
        .ok()
        .and_then(|s| s.clone())
        .ok_or_else(|| connect_err("no TLS certificate was seen".into()))?;
    let server_fp = *blake3::hash(server_cert.as_ref()).as_bytes();
    let mut nonce = [0u8; 32];
    rand::rng().fill_bytes(&mut nonce);
    let role = opts.role.as_str();
    let request = ProofRequest {
        role,
        id: &opts.id,
        csr_pem: &csr_pem,
        client_nonce: &nonce,
        server_cert_fp: &server_fp,
    };
    // What the answer's CA is checked against: the CS's proof of the
    // passphrase, or the CA the token pinned.
    let (proof, token, pinned) = match &opts.credential {
        Credential::Passphrase(pass) => {
            if params.kdf != KDF {
                return Err(EnrollError::Refused {
                    addr: addr.clone(),
                    message: format!(
                        "it uses key derivation {:?}, this program knows only {KDF:?}: use \
                         matching versions",
                        params.kdf
                    ),
                });
            }
            let pk = passphrase_key(&params.salt, pass);
            (client_proof(&pk, &request), String::new(), Err(pk))
        }
        Credential::Token(t) => {
            let ca_der = first_cert_der(&params.ca_pem)
                .map_err(|e| untrusted(format!("the CA it sent: {e}")))?;
            if !t.pins(&ca_der) {
                return Err(untrusted(format!(
                    "its CA (blake3 {}) is not the one the token pins ({}); the token was not \
                     sent. Check --cs names the deployment that created the token",
                    hex(blake3::hash(&ca_der).as_bytes()),
                    t.ca_hash
                )));
            }
            let check = connect::CaCheck::new(&ca_der).map_err(untrusted)?;
            check
                .server(&server_cert, &intermediates, &server_name)
                .map_err(|e| {
                    untrusted(format!(
                        "its TLS certificate is not signed by the CA the token pins, or not for \
                         {host:?} ({e}); the token was not sent"
                    ))
                })?;
            // Any enrolled PS or MT holds a certificate from this CA for
            // names it chose: only the CS's may receive the token.
            require_cs(&server_cert)
                .map_err(|e| untrusted(format!("{e}; the token was not sent")))?;
            (Vec::new(), t.presented(), Ok(ca_der))
        }
    };
    let answer = client
        .enroll(EnrollRequest {
            role: role.to_string(),
            id: opts.id.clone(),
            csr_pem: csr_pem.clone(),
            client_nonce: nonce.to_vec(),
            proof: proof.clone(),
            token,
        })
        .await
        .map_err(refused)?
        .into_inner();

    let ca_der = first_cert_der(&answer.ca_pem).map_err(|e| untrusted(format!("its CA: {e}")))?;
    match pinned {
        Err(pk) => {
            let expected = server_proof(
                &server_key(&pk),
                &proof,
                &answer.cert_pem,
                &answer.ca_pem,
                &server_fp,
            );
            if !proofs_equal(&answer.server_proof, &expected) {
                return Err(untrusted(
                    "its proof of the passphrase is wrong, so the CA it sent cannot be trusted"
                        .into(),
                ));
            }
        }
        Ok(pinned) if pinned != ca_der => {
            return Err(untrusted(
                "it answered with another CA than the one the token pins".into(),
            ))
        }
        Ok(_) => {}
    }
    let check = connect::CaCheck::new(&ca_der).map_err(untrusted)?;
    check
        .server(&server_cert, &intermediates, &server_name)
        .map_err(|e| {
            untrusted(format!(
                "its TLS certificate is not signed by the CA it sent, or not for {host:?}: {e}"
            ))
        })?;
    require_cs(&server_cert).map_err(|e| untrusted(e.to_string()))?;
    let cert_der = first_cert_der(&answer.cert_pem)
        .map_err(|e| untrusted(format!("the issued certificate: {e}")))?;
    check.client(&cert_der).map_err(|e| {
        untrusted(format!(
            "the issued certificate does not chain to its CA: {e}"
        ))
    })?;
    let who =
        peer_identity(&cert_der).map_err(|e| untrusted(format!("the issued certificate: {e}")))?;
    if who.role != opts.role || who.id != opts.id {
        return Err(untrusted(format!(
            "it issued a certificate for {who}, not {}:{}",
            opts.role, opts.id
        )));
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|e| untrusted(format!("the issued certificate: {e}")))?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(untrusted(
            "the issued certificate does not carry the key made for this request".into(),
        ));
    }
    // The names others will dial this server by: a CS that left one out
    // would make every connection to it fail later, far from the cause.
    for name in &server_names {
        let sn = ServerName::try_from(name.clone())
            .map_err(|e| EnrollError::Invalid(format!("--name {name:?}: {e}")))?;
        let issued = CertificateDer::from(cert_der.clone());
        check
            .server(&issued, &[], &sn)
            .map_err(|e| EnrollError::Refused {
                addr: addr.clone(),
                message: format!(
                    "it issued a certificate that does not serve TLS for {name:?} ({e}); \
                     nothing was written: check that the CS runs the same version"
                ),
            })?;
    }

    write_files(opts, &answer.ca_pem, &answer.cert_pem, &key.serialize_pem())?;
    Ok(Enrolled {
        ca: opts.out_dir.join("ca.pem"),
        cert: opts.out_dir.join(format!("{role}.pem")),
        key: opts.out_dir.join(format!("{role}.key")),
        ca_fingerprint: hex(blake3::hash(&ca_der).as_bytes()),
        server_names,
        cs_addr: addr,
    })
}

fn write_files(
    opts: &EnrollOptions,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(), EnrollError> {
    let dir = &opts.out_dir;
    std::fs::create_dir_all(dir).map_err(|source| EnrollError::Write {
        path: dir.clone(),
        source,
    })?;
    let ca_path = dir.join("ca.pem");
    crate::durable::write_atomic(&ca_path, ca_pem.as_bytes()).map_err(|source| {
        EnrollError::Write {
            path: ca_path.clone(),
            source,
        }
    })?;
    write_cert(
        dir,
        opts.role.as_str(),
        &CertKeyPem {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        },
    )
    .map_err(|e| EnrollError::Write {
        path: dir.join(format!("{}.pem", opts.role)),
        source: std::io::Error::other(e.to_string()),
    })?;
    // The daemons that run as the service user read their key through its
    // group; the agent's stays root's alone.
    if matches!(opts.role, Role::Ps | Role::Mt | Role::Cs) {
        let key_path = dir.join(format!("{}.key", opts.role));
        crate::pki::share_key_with_service_group(&key_path).map_err(|source| {
            EnrollError::Write {
                path: key_path,
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(cs_addr: String) -> EnrollOptions {
        EnrollOptions {
            cs_addr,
            credential: Credential::Passphrase("p".into()),
            role: Role::Agent,
            id: "m1".into(),
            server_names: Vec::new(),
            out_dir: PathBuf::from("/nonexistent/never-written"),
        }
    }

    /// A loopback address that refuses connections: a privileged port
    /// (`port` below 1024, e.g. 1 tcpmux or 2 compressnet) that no
    /// unprivileged test can bind and no service of a test host listens on,
    /// unlike a port bound and closed again, which a parallel test may take.
    fn refusing(port: u16) -> String {
        format!("127.0.0.1:{port}")
    }

    #[tokio::test]
    async fn every_cs_address_is_tried_and_named() {
        crate::tls::install_crypto_provider();
        let (a, b) = (refusing(1), refusing(2));
        let e = enroll_with(&options(format!("{a},{b}"))).await.unwrap_err();
        assert!(matches!(e, EnrollError::Unreachable { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&a) && text.contains(&b), "{text}");
        assert!(text.contains("standby"), "{text}");
        // One address keeps the error of that address.
        let e = enroll_with(&options(a.clone())).await.unwrap_err();
        assert!(matches!(e, EnrollError::Connect { .. }), "{e:?}");
        // An entry that is no host:port is refused before anything is dialed.
        let e = enroll_with(&options(format!("{a},cs2"))).await.unwrap_err();
        assert!(e.to_string().contains("\"cs2\" is not host:port"), "{e}");
        let e = enroll_with(&options(" , ".into())).await.unwrap_err();
        assert!(e.to_string().contains("names no address"), "{e}");
    }
}
