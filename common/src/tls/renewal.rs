//! Certificate renewal (DESIGN.md §3): a running component replaces its
//! certificate before it expires, without a restart.
//!
//! At two thirds of the current certificate's life ([`Validity::renew_at_ms`])
//! the task makes a new key and a CSR for the same server names, and asks
//! an [`Issuer`] for a certificate: agents, PSs and MTs ask the CS
//! (`Control.Renew`, authenticated by the certificate being replaced), the
//! CS signs its own with the CA key it holds. The answer is checked before
//! anything is written: same role and id, the key just made, signed by the
//! CA this component already trusts. It is then saved as the renewed
//! identity ([`super::renewed`]), which the TLS server and every new client
//! connection use from then on. A failure is retried with backoff, and
//! logged, until the certificate expires and beyond.

use super::renewed;
use crate::control::{in_turn, CsConfig};
use crate::pki::lifetime::Validity;
use crate::pki::{peer_identity, CertKeyPem, PeerIdentity, PkiError, Role};
use crate::tls::{TlsError, TlsFiles};
use backon::{BackoffBuilder, ExponentialBuilder};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rebound_proto::control::control_client::ControlClient;
use rebound_proto::control::RenewRequest;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Why one renewal attempt failed.
#[derive(Debug, Error)]
pub enum RenewalError {
    #[error("cannot read {what} {path}: {source} (enroll the component again)")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the current certificate {path}: {source} (enroll the component again)")]
    Current { path: PathBuf, source: PkiError },
    #[error("cannot make the key and request for {who}: {0}", who = .1)]
    Request(rcgen::Error, PeerIdentity),
    #[error("cannot reach the configuration server to renew: {0}")]
    Connect(#[from] TlsError),
    #[error("cannot reach any configuration server to renew: {tried}; check that one of them runs (a standby CS answers only once it has taken over)")]
    Unreachable { tried: String },
    #[error("the configuration server at {addr} refused to renew {who}: {message}")]
    Refused {
        addr: String,
        who: PeerIdentity,
        message: String,
    },
    #[error("cannot sign the renewed certificate of {who}: {message}")]
    Sign { who: PeerIdentity, message: String },
    #[error("the renewed certificate for {who} is refused, nothing was written: {why}")]
    Answer { who: PeerIdentity, why: String },
    #[error("cannot save the renewed identity {path}: {source} (check the state directory's owner and free space)")]
    Save {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An issuer's answer: the certificate (PEM).
pub type IssueFuture<'a> = Pin<Box<dyn Future<Output = Result<String, RenewalError>> + Send + 'a>>;

/// What signs the next certificate.
pub trait Issuer: Send + Sync + 'static {
    /// Answers the certificate (PEM) for `csr_pem`, made by `who`.
    fn issue<'a>(&'a self, who: &'a PeerIdentity, csr_pem: String) -> IssueFuture<'a>;

    /// The CA certificate (PEM) this issuer signs with, when it knows it
    /// (the CS signing its own). A current certificate from another CA is
    /// then renewed at once: that is how the CS moves its own certificate
    /// to a new CA when the CA is rotated (docs/SECURITY.md).
    fn signs_with(&self) -> Option<&str> {
        None
    }
}

/// Whether `der` is signed by the first certificate of `ca_pem`.
fn signed_by(der: &[u8], ca_pem: &str) -> bool {
    let Some(Ok(ca)) = CertificateDer::pem_slice_iter(ca_pem.as_bytes()).next() else {
        return false;
    };
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(ca).is_err() {
        return false;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .is_ok_and(|v| {
            v.verify_client_cert(&CertificateDer::from(der), &[], UnixTime::now())
                .is_ok()
        })
}

/// Asks the CS over `Control.Renew`, presenting the current certificate:
/// each address of the CS in turn until one answers.
pub struct ControlIssuer {
    pub cs: CsConfig,
    pub tls: TlsFiles,
}

impl ControlIssuer {
    /// Asks the CS at `addr`.
    async fn issue_at(
        &self,
        addr: &str,
        who: &PeerIdentity,
        csr_pem: String,
    ) -> Result<String, RenewalError> {
        let channel = self
            .tls
            .connect(addr, self.cs.server_name_at(addr), Role::Cs)
            .await?;
        let answer = ControlClient::new(channel)
            .renew(RenewRequest { csr_pem })
            .await
            .map_err(|s| RenewalError::Refused {
                addr: addr.to_string(),
                who: who.clone(),
                message: s.message().to_string(),
            })?;
        Ok(answer.into_inner().cert_pem)
    }
}

impl Issuer for ControlIssuer {
    fn issue<'a>(&'a self, who: &'a PeerIdentity, csr_pem: String) -> IssueFuture<'a> {
        Box::pin(async move {
            let addrs: Vec<String> = self.cs.addrs().into_iter().map(String::from).collect();
            in_turn(
                &addrs,
                |addr| {
                    let csr_pem = csr_pem.clone();
                    async move { self.issue_at(&addr, who, csr_pem).await }
                },
                |e| matches!(e, RenewalError::Connect(_)),
            )
            .await
            .map_err(|t| {
                t.into_error_listing(
                    |e| match e {
                        RenewalError::Connect(c) => c.to_string(),
                        other => other.to_string(),
                    },
                    |tried| RenewalError::Unreachable { tried },
                )
            })
        })
    }
}

/// One component's renewal: its enrolled files, where the renewed identity
/// goes, and who signs.
#[derive(Clone)]
pub struct Renewal {
    pub tls: TlsFiles,
    pub renewed: PathBuf,
    pub issuer: Arc<dyn Issuer>,
}

/// The renewal of a component that has a CS: `None` without one (a lab
/// deployment's certificates are made by `rebound certs` and not renewed).
pub fn spawn_with_cs(
    cs: &CsConfig,
    tls: &TlsFiles,
    state_dir: &Path,
    shutdown: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if !cs.enabled() {
        return None;
    }
    // The request is authenticated by the certificate it replaces, which
    // is the renewed one after the first renewal.
    let tls = tls.clone().with_renewed(state_dir);
    let issuer = Arc::new(ControlIssuer {
        cs: cs.clone(),
        tls: tls.clone(),
    });
    let renewal = Renewal {
        tls,
        renewed: renewed::path_in(state_dir),
        issuer,
    };
    Some(tokio::spawn(renewal.run(shutdown)))
}

/// Retry delays after a failed attempt.
const BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_secs(1))
    .with_max_delay(Duration::from_secs(60))
    .with_factor(2.0)
    .with_jitter()
    .without_max_times();
/// The longest single sleep: the wall clock is looked at again after it, so
/// a clock that jumps (or a host that slept) does not delay renewal.
const WAKE_UP: Duration = Duration::from_secs(30);

impl Renewal {
    /// The identity in use, as the TLS server and clients pick it
    /// ([`TlsFiles::renewed_in_use`]): the renewed one once it exists,
    /// unless the component was enrolled again since (then renewing the
    /// renewed one would bring back the identity the enrollment replaced).
    pub fn current(&self) -> Result<CertKeyPem, RenewalError> {
        if let Some(ck) = self.renewed_in_use()? {
            return Ok(ck);
        }
        let read = |what, path: &Path| {
            std::fs::read_to_string(path).map_err(|source| RenewalError::Read {
                what,
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(CertKeyPem {
            cert_pem: read("certificate", &self.tls.cert)?,
            key_pem: read("private key", &self.tls.key)?,
        })
    }

    fn renewed_in_use(&self) -> Result<Option<CertKeyPem>, RenewalError> {
        let tls = TlsFiles {
            renewed: Some(self.renewed.clone()),
            ..self.tls.clone()
        };
        tls.renewed_in_use().map_err(|e| RenewalError::Read {
            what: "renewed identity",
            path: self.renewed.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })
    }

    fn current_path(&self) -> &Path {
        match self.renewed_in_use() {
            Ok(Some(_)) => &self.renewed,
            _ => &self.tls.cert,
        }
    }

    /// The current certificate's DER, identity and validity.
    fn current_cert(&self) -> Result<(Vec<u8>, PeerIdentity, Validity), RenewalError> {
        let bad = |source| RenewalError::Current {
            path: self.current_path().to_path_buf(),
            source,
        };
        let der = CertificateDer::from_pem_slice(self.current()?.cert_pem.as_bytes())
            .map_err(|e| bad(PkiError::Parse(e.to_string())))?
            .to_vec();
        let who = peer_identity(&der).map_err(bad)?;
        let validity = Validity::of_der(&der).map_err(bad)?;
        Ok((der, who, validity))
    }

    /// Renews until `shutdown`: sleeps until the current certificate is due,
    /// renews it (retrying with backoff), and starts over with the new one.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF.build();
        let mut last_error = String::new();
        loop {
            let wait = match self.current_cert() {
                Ok((der, who, _))
                    if self
                        .issuer
                        .signs_with()
                        .is_some_and(|ca| !signed_by(&der, ca)) =>
                {
                    info!(certificate = %who, "the certificate is not from the CA this issuer signs with (the CA was rotated): renewing it now");
                    Duration::ZERO
                }
                Ok((_, _, v)) => {
                    Duration::from_millis(v.renew_at_ms().saturating_sub(crate::time::now_ms()))
                }
                Err(e) => {
                    warn!(error = %e, "certificate renewal cannot read the current certificate");
                    WAKE_UP
                }
            };
            if !wait.is_zero() {
                if sleep_or_stop(wait.min(WAKE_UP), &mut shutdown).await {
                    return;
                }
                continue;
            }
            match self.renew_once().await {
                Ok(v) => {
                    backoff = BACKOFF.build();
                    last_error.clear();
                    info!(
                        path = %self.renewed.display(),
                        expires = %humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_millis(v.not_after_ms)
                        ),
                        "certificate renewed"
                    );
                }
                Err(e) => {
                    let text = e.to_string();
                    if text != last_error {
                        warn!(error = %text, "certificate renewal failed; retrying");
                        last_error = text;
                    } else {
                        debug!(error = %text, "certificate renewal failed again");
                    }
                    let delay = backoff.next().unwrap_or(Duration::from_secs(60));
                    if sleep_or_stop(delay, &mut shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// One renewal: new key, CSR, the issuer's answer checked, saved.
    pub async fn renew_once(&self) -> Result<Validity, RenewalError> {
        let (der, who, _) = self.current_cert()?;
        let names = server_names(&der).map_err(|source| RenewalError::Current {
            path: self.current_path().to_path_buf(),
            source,
        })?;
        let key = KeyPair::generate().map_err(|e| RenewalError::Request(e, who.clone()))?;
        let csr_pem = csr(&key, &who, &names).map_err(|e| RenewalError::Request(e, who.clone()))?;
        let cert_pem = self.issuer.issue(&who, csr_pem).await?;
        let validity = self.check(&who, &key, &cert_pem)?;
        let ck = CertKeyPem {
            cert_pem,
            key_pem: key.serialize_pem(),
        };
        renewed::save(&self.renewed, &ck).map_err(|source| RenewalError::Save {
            path: self.renewed.clone(),
            source,
        })?;
        Ok(validity)
    }

    /// The issued certificate is for `who`, carries `key`, and chains to
    /// the CA in `[tls] ca`.
    fn check(
        &self,
        who: &PeerIdentity,
        key: &KeyPair,
        cert_pem: &str,
    ) -> Result<Validity, RenewalError> {
        let refuse = |why: String| RenewalError::Answer {
            who: who.clone(),
            why,
        };
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| refuse(format!("no certificate in the answer: {e}")))?;
        let ca = std::fs::read(&self.tls.ca).map_err(|source| RenewalError::Read {
            what: "CA certificate",
            path: self.tls.ca.clone(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca).flatten() {
            roots
                .add(c)
                .map_err(|e| refuse(format!("the CA {}: {e}", self.tls.ca.display())))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| refuse(format!("the CA {}: {e}", self.tls.ca.display())))?
            .verify_client_cert(&der, &[], UnixTime::now())
            .map_err(|e| {
                refuse(format!(
                    "it does not chain to the CA {}: {e}",
                    self.tls.ca.display()
                ))
            })?;
        let got = peer_identity(&der).map_err(|e| refuse(e.to_string()))?;
        if got != *who {
            return Err(refuse(format!("it was issued for {got}")));
        }
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| refuse(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(refuse(
                "it does not carry the key made for this request".into(),
            ));
        }
        Validity::of_der(&der).map_err(|e| refuse(e.to_string()))
    }
}

/// Sleeps `d`; true when `shutdown` turned true first.
async fn sleep_or_stop(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        r = shutdown.changed() => r.is_err() || *shutdown.borrow(),
    }
}

/// A CSR for `key` with CN `role:id` and `names` (DNS names and IPs).
pub fn csr(key: &KeyPair, who: &PeerIdentity, names: &[String]) -> Result<String, rcgen::Error> {
    let mut params = CertificateParams::new(names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, who.to_string());
    params.distinguished_name = dn;
    params.serialize_request(key)?.pem()
}

/// The DNS names and IP addresses a certificate serves TLS for, in its
/// order (IPs in their usual text form).
pub fn server_names(der: &[u8]) -> Result<Vec<String>, PkiError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Parse(e.to_string()))?
    else {
        return Ok(Vec::new());
    };
    let mut names = Vec::new();
    for n in &san.value.general_names {
        match n {
            GeneralName::DNSName(d) => names.push(d.to_string()),
            GeneralName::IPAddress(b) => {
                let ip = match b.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default()),
                    16 => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()),
                    _ => {
                        return Err(PkiError::Parse(format!(
                            "an IP address of {} bytes",
                            b.len()
                        )))
                    }
                };
                names.push(ip.to_string());
            }
            // Other names (the role URI) are the issuer's to set.
            _ => {}
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests;
