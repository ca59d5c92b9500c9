//! Enrollment (DESIGN.md §3), the component side: what `rebound-agent|
//! rebound-ps|rebound-mt enroll --cs ADDR --passphrase-file F` calls
//! ([`enroll`]), plus the passphrase-proof primitives both sides share.
//!
//! A fresh component has a key pair it makes itself and the deployment
//! passphrase, nothing else. It connects with TLS accepting whatever
//! certificate the CS presents (remembering it; the handshake signature is
//! still checked), sends its CSR with a proof of the passphrase bound to the
//! server certificate it saw, and accepts the CA it gets back only when the
//! CS's own proof checks out, that CA signed the server certificate seen,
//! and the issued certificate carries this role, id and key. The CS side
//! lives in `rebound-cs` (`enrollment::server`).
//!
//! The CS stores only the derived key (a salted hash of the passphrase).

use crate::pki::{peer_identity, write_cert, CertKeyPem, Role};
use crate::tls::error_chain;
use rcgen::{CertificateParams, DnType, KeyPair};
use rebound_proto::control::enrollment_client::EnrollmentClient;
use rebound_proto::control::{EnrollParamsRequest, EnrollRequest};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;

use rand::RngCore;

mod names;

pub use names::{
    advertised_host, check_server_name, checked_names, default_server_names, host_name, NameError,
};

/// The key derivation named in `EnrollParamsResponse.kdf`.
pub const KDF: &str = "blake3-derive-key-v1";

/// The passphrase key: `blake3::derive_key(context, salt || passphrase)`.
///
/// Why a fast hash is enough here: the passphrase is machine-generated at
/// `init` with 128 bits of entropy, so guessing it from a stolen database is
/// infeasible however cheap one guess is; a slow, memory-hard KDF (argon2)
/// only helps for human-chosen passwords. The salt makes the stored key
/// differ between deployments even for an equal passphrase. Surrounding
/// whitespace (a trailing newline in the passphrase file) is ignored.
pub fn passphrase_key(salt: &[u8], passphrase: &str) -> [u8; 32] {
    let mut m = Vec::with_capacity(salt.len() + passphrase.len() + 8);
    m.extend_from_slice(&(salt.len() as u64).to_le_bytes());
    m.extend_from_slice(salt);
    m.extend_from_slice(passphrase.trim().as_bytes());
    blake3::derive_key("rebound enrollment passphrase v1", &m)
}

/// Hashes length-prefixed fields, so no two field lists hash alike.
fn transcript(label: &str, fields: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(label.as_bytes());
    for f in fields {
        h.update(&(f.len() as u64).to_le_bytes());
        h.update(f);
    }
    *h.finalize().as_bytes()
}

/// The client's proof of the passphrase, bound to the request and to the
/// server certificate it saw (`server_cert_fp` = blake3 of its DER).
pub fn client_proof(
    key: &[u8; 32],
    role: &str,
    id: &str,
    csr_pem: &str,
    client_nonce: &[u8],
    server_cert_fp: &[u8; 32],
) -> [u8; 32] {
    let t = transcript(
        "rebound enroll client v1",
        &[
            role.as_bytes(),
            id.as_bytes(),
            csr_pem.as_bytes(),
            client_nonce,
            server_cert_fp,
        ],
    );
    *blake3::keyed_hash(key, &t).as_bytes()
}

/// The CS's proof of the passphrase, bound to the client's proof (so it is
/// fresh: the client nonce is inside) and to what the CS hands out.
pub fn server_proof(
    key: &[u8; 32],
    client_proof: &[u8],
    cert_pem: &str,
    ca_pem: &str,
    server_cert_fp: &[u8; 32],
) -> [u8; 32] {
    let t = transcript(
        "rebound enroll server v1",
        &[
            client_proof,
            cert_pem.as_bytes(),
            ca_pem.as_bytes(),
            server_cert_fp,
        ],
    );
    *blake3::keyed_hash(key, &t).as_bytes()
}

/// Constant-time comparison of two proofs.
pub fn proofs_equal(a: &[u8], b: &[u8; 32]) -> bool {
    match <[u8; 32]>::try_from(a) {
        Ok(a) => blake3::Hash::from(a) == blake3::Hash::from(*b),
        Err(_) => false,
    }
}

/// Roles that may enroll.
pub fn enrollable(role: Role) -> bool {
    matches!(role, Role::Agent | Role::Ps | Role::Mt)
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

#[derive(Debug, Error)]
pub enum EnrollError {
    #[error("invalid enrollment request: {0}")]
    Invalid(String),
    #[error("cannot reach the configuration server at {addr}: {message} (check --cs and that rebound-cs runs there)")]
    Connect { addr: String, message: String },
    #[error("the configuration server at {addr} refused the enrollment: {message}")]
    Refused { addr: String, message: String },
    #[error("the configuration server at {addr} is not trusted: {message}. Nothing was written; check --cs points at your CS and that no proxy sits in between")]
    Untrusted { addr: String, message: String },
    #[error(transparent)]
    Name(#[from] NameError),
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
    /// The CS, `host:port`. `host` must be a name in the CS certificate
    /// (what `rebound-cs init` printed as its names).
    pub cs_addr: String,
    pub passphrase: String,
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
    let server_names = if role == Role::Agent {
        Vec::new()
    } else {
        crate::pki::local_server_names()
    };
    enroll_with(&EnrollOptions {
        cs_addr: cs_addr.to_string(),
        passphrase: passphrase.to_string(),
        role,
        id: id.to_string(),
        server_names,
        out_dir: out_dir.to_path_buf(),
    })
    .await
}

/// Accepts any server certificate, remembering it; checks the handshake
/// signature. Only for enrollment (see the module doc).
#[derive(Debug)]
struct RememberingVerifier {
    /// The crypto provider's algorithms, for the handshake signatures.
    algorithms: WebPkiSupportedAlgorithms,
    seen: Mutex<Option<(CertificateDer<'static>, Vec<CertificateDer<'static>>)>>,
}

impl ServerCertVerifier for RememberingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| rustls::Error::General("verifier lock poisoned".into()))?;
        *seen = Some((
            end_entity.clone().into_owned(),
            intermediates
                .iter()
                .map(|c| c.clone().into_owned())
                .collect(),
        ));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The host part of `host:port` (IPv6 in brackets allowed).
fn host_of(addr: &str) -> Result<String, EnrollError> {
    let bad = || EnrollError::Invalid(format!("--cs {addr:?} is not host:port"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok(host.to_string())
}

/// Enrolls as described by `opts`. See the module doc for what is checked.
pub async fn enroll_with(opts: &EnrollOptions) -> Result<Enrolled, EnrollError> {
    let addr = opts.cs_addr.clone();
    if !enrollable(opts.role) {
        return Err(EnrollError::Invalid(format!(
            "role {} cannot enroll: only agent, ps and mt do",
            opts.role
        )));
    }
    check_id(&opts.id).map_err(EnrollError::Invalid)?;
    let server_names = checked_names(&opts.server_names)?;
    if opts.role == Role::Agent && !server_names.is_empty() {
        return Err(NameError::AgentNames(server_names).into());
    }
    let host = host_of(&addr)?;
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

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(RememberingVerifier {
        algorithms: provider.signature_verification_algorithms,
        seen: Mutex::new(None),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| EnrollError::Pki(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp_addr = addr.clone();
    let sni = server_name.clone();
    let connect = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let connector = connector.clone();
        let tcp_addr = tcp_addr.clone();
        let sni = sni.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&tcp_addr).await?;
            tcp.set_nodelay(true)?;
            let stream = connector.connect(sni, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let connect_err = |message: String| EnrollError::Connect {
        addr: addr.clone(),
        message,
    };
    // The scheme is http because TLS is already done by our connector.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| EnrollError::Invalid(format!("--cs {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .connect_with_connector(connect)
        .await
        .map_err(|e| connect_err(error_chain(&e)))?;
    let mut client = EnrollmentClient::new(channel);
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
    let params = client
        .params(EnrollParamsRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    if params.kdf != KDF {
        return Err(EnrollError::Refused {
            addr: addr.clone(),
            message: format!(
                "it uses key derivation {:?}, this program knows only {KDF:?}: use matching versions",
                params.kdf
            ),
        });
    }
    let (server_cert, intermediates) = verifier
        .seen
        .lock()
        .ok()
        .and_then(|s| s.clone())
        .ok_or_else(|| connect_err("no TLS certificate was seen".into()))?;
    let server_fp = *blake3::hash(server_cert.as_ref()).as_bytes();
    let pk = passphrase_key(&params.salt, &opts.passphrase);
    let mut nonce = [0u8; 32];
    rand::rng().fill_bytes(&mut nonce);
    let role = opts.role.as_str();
    let proof = client_proof(&pk, role, &opts.id, &csr_pem, &nonce, &server_fp);
    let answer = client
        .enroll(EnrollRequest {
            role: role.to_string(),
            id: opts.id.clone(),
            csr_pem: csr_pem.clone(),
            client_nonce: nonce.to_vec(),
            proof: proof.to_vec(),
            token: String::new(),
        })
        .await
        .map_err(refused)?
        .into_inner();

    let untrusted = |message: String| EnrollError::Untrusted {
        addr: addr.clone(),
        message,
    };
    let expected = server_proof(&pk, &proof, &answer.cert_pem, &answer.ca_pem, &server_fp);
    if !proofs_equal(&answer.server_proof, &expected) {
        return Err(untrusted(
            "its proof of the passphrase is wrong, so the CA it sent cannot be trusted".into(),
        ));
    }
    let ca_der = first_cert_der(&answer.ca_pem).map_err(|e| untrusted(format!("its CA: {e}")))?;
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der.clone()))
        .map_err(|e| untrusted(format!("its CA certificate is unusable: {e}")))?;
    let roots = Arc::new(roots);
    let server_check = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| untrusted(format!("its CA certificate is unusable: {e}")))?;
    server_check
        .verify_server_cert(
            &server_cert,
            &intermediates,
            &server_name,
            &[],
            UnixTime::now(),
        )
        .map_err(|e| {
            untrusted(format!(
                "its TLS certificate is not signed by the CA it sent, or not for {host:?}: {e}"
            ))
        })?;
    let cert_der = first_cert_der(&answer.cert_pem)
        .map_err(|e| untrusted(format!("the issued certificate: {e}")))?;
    let client_check = WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| untrusted(format!("its CA certificate is unusable: {e}")))?;
    client_check
        .verify_client_cert(
            &CertificateDer::from(cert_der.clone()),
            &[],
            UnixTime::now(),
        )
        .map_err(|e| {
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
        server_check
            .verify_server_cert(&issued, &[], &sn, &[], UnixTime::now())
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
