//! Certificate renewal over the control plane (DESIGN.md §3): a component's
//! current certificate authenticates its request for the next one.
//!
//! Renewal grants nothing new: the caller's certificate must be one this CS
//! issued to that very role and id, unexpired and not revoked, and the
//! request must ask for exactly the server names it already has. A revoked
//! or expired component enrolls again with a token instead. The CS renews
//! its own server certificate the same way, signing locally
//! ([`LocalIssuer`]).

use crate::config::Config;
use crate::control::ControlService;
use crate::enrollment::sign_csr;
use crate::error::CsError;
use crate::store::{IssuedCert, Store};
use rcgen::CertificateSigningRequestParams;
use rebound_common::pki::lifetime::Validity;
use rebound_common::pki::{serial_hex, PeerIdentity, Role};
use rebound_common::time::now_ms;
use rebound_common::tls::renewal::{server_names, IssueFuture, Issuer, Renewal, RenewalError};
use rebound_common::tls::renewed;
use rebound_common::tls::require_role;
use rebound_proto::control as pb;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

/// What the CS signs renewed certificates with.
pub struct Signer {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    /// The config's `cert_lifetime`.
    pub lifetime: Duration,
}

impl Signer {
    /// Signs `csr_pem` for `who` and records the certificate.
    async fn issue(
        &self,
        store: &dyn Store,
        who: &PeerIdentity,
        csr_pem: &str,
    ) -> Result<crate::enrollment::Issued, CsError> {
        let issued = sign_csr(
            &self.ca_cert_pem,
            &self.ca_key_pem,
            csr_pem,
            who.role,
            &who.id,
            self.lifetime,
        )?;
        let expiry_ms =
            crate::fleet::components::cert_expiry_ms_pem(&issued.cert_pem).ok_or_else(|| {
                CsError::Pki(format!("the certificate renewed for {who} has no expiry"))
            })?;
        store
            .put_issued_cert(&IssuedCert {
                serial: issued.serial_hex.clone(),
                role: who.role,
                id: who.id.clone(),
                issued_ms: now_ms(),
                expiry_ms,
                revoked_ms: None,
            })
            .await?;
        Ok(issued)
    }
}

impl ControlService {
    /// Lets this service renew certificates (without it, `Renew` is
    /// refused as unavailable).
    pub fn with_signer(mut self, signer: Arc<Signer>) -> Self {
        self.signer = Some(signer);
        self
    }
}

/// What to tell a component that cannot renew.
fn enroll_again(who: &PeerIdentity) -> String {
    format!(
        "enroll it again: `rebound token create --role {} --id {}` on the CS, then `enroll` \
         on its host with --token",
        who.role, who.id
    )
}

/// `Control.Renew`.
pub async fn renew(
    svc: &ControlService,
    req: Request<pb::RenewRequest>,
) -> Result<Response<pb::RenewResponse>, Status> {
    let who = require_role(&req, &[Role::Agent, Role::Ps, Role::Mt])?;
    let signer = svc.signer.as_ref().ok_or_else(|| {
        Status::unavailable(format!(
            "this configuration server does not renew certificates (started without its CA \
             key): {who} keeps its certificate until it expires"
        ))
    })?;
    let der = req
        .peer_certs()
        .and_then(|c| c.first().map(|d| d.as_ref().to_vec()))
        .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
    let bad_cert = |e: rebound_common::pki::PkiError| {
        Status::unauthenticated(format!("the certificate of {who}: {e}"))
    };
    let serial = serial_hex(&der).map_err(bad_cert)?;
    let validity = Validity::of_der(&der).map_err(bad_cert)?;
    let now = now_ms();
    if validity.not_after_ms <= now {
        return Err(Status::unauthenticated(format!(
            "certificate {who} (serial {serial}) has expired, so it cannot renew itself: {}",
            enroll_again(&who)
        )));
    }
    check_recorded(svc, &who, &serial).await?;
    let r = req.into_inner();
    check_same_names(&who, &der, &r.csr_pem)?;
    check_half_life(&who, &serial, &validity, now)?;
    let issued = signer
        .issue(svc.store.as_ref(), &who, &r.csr_pem)
        .await
        .map_err(Status::from)?;
    // Read again: a revocation since the checks above must not be undone.
    if let Some(mut c) = svc.store.get_component(who.role, &who.id).await? {
        c.cert_serial = issued.serial_hex.clone();
        c.cert_fingerprint = issued.fingerprint_hex.clone();
        c.cert_expiry_ms =
            crate::fleet::components::cert_expiry_ms_pem(&issued.cert_pem).unwrap_or(0);
        svc.store.put_component(&c).await?;
    }
    revoke_if_revoked_meanwhile(svc, &who, &serial, &issued.serial_hex).await?;
    info!(component = %who, old_serial = %serial, serial = %issued.serial_hex, "certificate renewed");
    Ok(Response::new(pb::RenewResponse {
        cert_pem: issued.cert_pem,
        ca_pem: signer.ca_cert_pem.clone(),
    }))
}

/// When `ms` (since the Unix epoch) is, as an operator reads it.
fn at(ms: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms))
}

/// The caller's certificate is the newest one this CS issued to that very
/// role and id, and neither it nor the component is revoked: an older
/// certificate (a copy left behind, or one replaced by enrollment) cannot
/// mint new ones.
async fn check_recorded(
    svc: &ControlService,
    who: &PeerIdentity,
    serial: &str,
) -> Result<(), Status> {
    let c = match svc.store.get_issued_cert(serial).await? {
        None => {
            return Err(Status::permission_denied(format!(
                "certificate {who} (serial {serial}) was not issued by this configuration \
                 server, so it cannot renew here: {}",
                enroll_again(who)
            )))
        }
        Some(c) => c,
    };
    if c.role != who.role || c.id != who.id {
        return Err(Status::permission_denied(format!(
            "certificate {who} (serial {serial}) was issued to {}:{}, not {who}: {}",
            c.role,
            c.id,
            enroll_again(who)
        )));
    }
    if c.revoked_ms.is_some() {
        return Err(Status::permission_denied(format!(
            "certificate {who} (serial {serial}) is revoked, so it cannot renew: {}",
            enroll_again(who)
        )));
    }
    if let Some(latest) = svc.store.latest_cert(who.role, &who.id).await? {
        if latest.serial != serial {
            return Err(Status::permission_denied(format!(
                "certificate {who} (serial {serial}) is not the newest one issued to {who} \
                 (serial {}, issued {}), so it cannot renew: only the newest certificate \
                 renews. Use the newest certificate on that host (its TLS files or renewed \
                 state), or {}",
                latest.serial,
                at(latest.issued_ms),
                enroll_again(who)
            )));
        }
    }
    if svc
        .store
        .get_component(who.role, &who.id)
        .await?
        .is_some_and(|c| c.revoked)
    {
        return Err(Status::permission_denied(format!(
            "{who} is revoked, so certificate {serial} cannot renew: {}",
            enroll_again(who)
        )));
    }
    Ok(())
}

/// A certificate renews only once half its life has passed (its holder
/// renews at two thirds): a caller cannot flood the CS with renewals.
fn check_half_life(
    who: &PeerIdentity,
    serial: &str,
    validity: &Validity,
    now: u64,
) -> Result<(), Status> {
    let half =
        validity.not_before_ms + validity.not_after_ms.saturating_sub(validity.not_before_ms) / 2;
    if now < half {
        return Err(Status::failed_precondition(format!(
            "certificate {who} (serial {serial}) is too new to renew: it may renew from {} \
             (half its life; it renews by itself at {}), it is valid until {}",
            at(half),
            at(validity.renew_at_ms()),
            at(validity.not_after_ms)
        )));
    }
    Ok(())
}

/// A `rebound revoke` that ran while this renewal was signing must win:
/// when the caller's certificate is revoked now, every certificate of the
/// component (the new one too) is revoked again and the renewal refused.
async fn revoke_if_revoked_meanwhile(
    svc: &ControlService,
    who: &PeerIdentity,
    serial: &str,
    new_serial: &str,
) -> Result<(), Status> {
    let revoked = svc
        .store
        .get_issued_cert(serial)
        .await?
        .is_some_and(|c| c.revoked_ms.is_some());
    if !revoked {
        return Ok(());
    }
    let store = svc.store.as_ref();
    store.revoke_certs(who.role, &who.id, now_ms()).await?;
    if let Some(mut c) = store.get_component(who.role, &who.id).await? {
        c.revoked = true;
        store.put_component(&c).await?;
    }
    let list = crate::fleet::revoke::refresh(store, &svc.revocations).await?;
    let key = crate::bus::ComponentKey {
        role: who.role,
        id: who.id.clone(),
    };
    let pending = crate::fleet::revoke::push_all(
        store,
        svc.bus.as_ref(),
        &list,
        &key,
        crate::fleet::revoke::PUSH_TIMEOUT,
    )
    .await?;
    warn!(component = %who, serial = %new_serial, ?pending, "revoked while renewing: the renewed certificate is revoked too");
    Err(Status::permission_denied(format!(
        "certificate {who} (serial {serial}) was revoked while it renewed: the certificate just \
         issued (serial {new_serial}) is revoked too. {}",
        enroll_again(who)
    )))
}

/// The request asks for exactly the names the current certificate has:
/// renewal never widens what a component may serve.
fn check_same_names(who: &PeerIdentity, der: &[u8], csr_pem: &str) -> Result<(), Status> {
    let mut have = server_names(der)
        .map_err(|e| Status::unauthenticated(format!("the certificate of {who}: {e}")))?;
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        Status::invalid_argument(format!(
            "the renewal request of {who} is not a valid signed PKCS#10 request: {e}"
        ))
    })?;
    let mut asked = Vec::new();
    for san in &csr.params.subject_alt_names {
        match san {
            rcgen::SanType::DnsName(d) => asked.push(d.as_str().to_string()),
            rcgen::SanType::IpAddress(ip) => asked.push(ip.to_string()),
            other => asked.push(format!("{other:?}")),
        }
    }
    have.sort();
    asked.sort();
    if have != asked {
        return Err(Status::invalid_argument(format!(
            "the renewal request of {who} asks for the server names [{}], but its certificate \
             has [{}]: renewal keeps the names; to change them {}",
            asked.join(", "),
            have.join(", "),
            enroll_again(who)
        )));
    }
    Ok(())
}

/// The CS's own renewal: it signs its server certificate with the CA key
/// it holds, and records it like any other.
pub struct LocalIssuer {
    pub signer: Arc<Signer>,
    pub store: Arc<dyn Store>,
}

impl Issuer for LocalIssuer {
    fn issue<'a>(&'a self, who: &'a PeerIdentity, csr_pem: String) -> IssueFuture<'a> {
        Box::pin(async move {
            let issued = self
                .signer
                .issue(self.store.as_ref(), who, &csr_pem)
                .await
                .map_err(|e| RenewalError::Sign {
                    who: who.clone(),
                    message: e.to_string(),
                })?;
            Ok(issued.cert_pem)
        })
    }

    fn signs_with(&self) -> Option<&str> {
        Some(&self.signer.ca_cert_pem)
    }
}

/// Where the CS keeps its renewed server certificate: in its state
/// directory (its database's), which the service may write.
pub fn renewed_path(config: &Config) -> PathBuf {
    renewed::path_in(config.db.parent().unwrap_or(Path::new(".")))
}

/// Starts the CS's renewal of its own server certificate; it ends when
/// `stop` turns true.
pub fn spawn_own(
    config: &Config,
    signer: Arc<Signer>,
    store: Arc<dyn Store>,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let renewal = Renewal {
        tls: config.tls.clone(),
        renewed: renewed_path(config),
        issuer: Arc::new(LocalIssuer { signer, store }),
    };
    tokio::spawn(renewal.run(stop))
}

#[cfg(test)]
mod tests;
