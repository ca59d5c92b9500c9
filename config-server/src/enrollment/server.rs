//! The CS side of enrollment: the `Enrollment` gRPC service.
//!
//! It is the one service callable without a client certificate (the server
//! TLS config makes client certificates optional for exactly this). What a
//! request may be granted is decided in `grant.rs`; here the request is
//! parsed, rate-limited per remote address, and answered: a refusal raises
//! an `enrollment-refused` event and nothing is signed or stored, a grant
//! issues the certificate and records it (`IssuedCert`).

use super::grant::{self, Grant};
use super::limit::FailureLimit;
use super::*;
use crate::store::{now_ms, Component, Event, Health, IssuedCert};
use rebound_common::enrollment::{PassphraseVerifier, ProofRequest};
use rebound_proto::control::enrollment_server::Enrollment;
use rebound_proto::control::{
    EnrollParamsRequest, EnrollParamsResponse, EnrollRequest, EnrollResponse,
};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

pub struct EnrollmentService {
    store: Arc<dyn Store>,
    ca_cert_pem: String,
    ca_key_pem: String,
    /// blake3 of the DER of the certificate this server presents.
    server_cert_fp: [u8; 32],
    /// How long an issued certificate is valid (config `cert_lifetime`).
    cert_lifetime: std::time::Duration,
    /// The CS's renewed identity: once it exists the server presents it,
    /// so proofs are bound to it instead.
    renewed: Option<std::path::PathBuf>,
    failures: FailureLimit,
}

impl EnrollmentService {
    /// `server_cert_pem` is the certificate the CS presents in TLS; proofs
    /// are bound to it.
    pub fn new(
        store: Arc<dyn Store>,
        ca_cert_pem: String,
        ca_key_pem: String,
        server_cert_pem: &str,
    ) -> Result<EnrollmentService, CsError> {
        let der = first_cert_der(server_cert_pem)
            .map_err(|e| CsError::Pki(format!("the CS server certificate: {e}")))?;
        Ok(EnrollmentService {
            store,
            ca_cert_pem,
            ca_key_pem,
            server_cert_fp: *blake3::hash(&der).as_bytes(),
            cert_lifetime: rebound_common::pki::lifetime::DEFAULT,
            renewed: None,
            failures: FailureLimit::default(),
        })
    }

    /// Binds proofs to the renewed server certificate at `path` once the
    /// CS has renewed its own (`tls::renewed`).
    pub fn with_renewed(mut self, path: std::path::PathBuf) -> Self {
        self.renewed = Some(path);
        self
    }

    /// blake3 of the certificate the server presents now.
    fn server_cert_fp(&self) -> [u8; 32] {
        let renewed = self
            .renewed
            .as_deref()
            .and_then(|p| rebound_common::tls::renewed::load(p).ok().flatten())
            .and_then(|ck| first_cert_der(&ck.cert_pem).ok());
        match renewed {
            Some(der) => *blake3::hash(&der).as_bytes(),
            None => self.server_cert_fp,
        }
    }

    /// Issues certificates valid for `lifetime` instead of the default.
    pub fn with_cert_lifetime(mut self, lifetime: std::time::Duration) -> Self {
        self.cert_lifetime = lifetime;
        self
    }

    /// The passphrase verifier and salt.
    async fn verifier(&self) -> Result<(PassphraseVerifier, Vec<u8>), Status> {
        let missing = || {
            Status::failed_precondition(
                "this configuration server has no enrollment passphrase: run `rebound-cs init` \
                 (or check the config key db points at the database init made)",
            )
        };
        let salt = self
            .store
            .get_setting(SALT_KEY)
            .await?
            .ok_or_else(missing)?;
        let v = load_verifier(self.store.as_ref())
            .await?
            .ok_or_else(missing)?;
        Ok((v, salt))
    }

    /// Issues the certificate and records it.
    async fn issue(&self, r: &EnrollRequest, role: Role, remote: &str) -> Result<Issued, Status> {
        let issued = sign_csr(
            &self.ca_cert_pem,
            &self.ca_key_pem,
            &r.csr_pem,
            role,
            &r.id,
            self.cert_lifetime,
        )
        .map_err(Status::from)?;
        let now = now_ms();
        let expiry_ms = crate::fleet::components::cert_expiry_ms_pem(&issued.cert_pem).unwrap_or(0);
        self.store
            .put_issued_cert(&IssuedCert {
                serial: issued.serial_hex.clone(),
                role,
                id: r.id.clone(),
                issued_ms: now,
                expiry_ms,
                revoked_ms: None,
            })
            .await?;
        let mut c = self
            .store
            .get_component(role, &r.id)
            .await?
            .unwrap_or_else(|| Component::new(role, &r.id));
        if c.health == Health::Online {
            info!(role = %role, id = %r.id, "re-enrolling a component that is online");
        }
        c.cert_serial = issued.serial_hex.clone();
        c.cert_fingerprint = issued.fingerprint_hex.clone();
        c.cert_expiry_ms = expiry_ms;
        c.enrolled_ms = now;
        // The new certificate is good; the older ones stay revoked in the
        // issued-certificate records (revocation is per serial).
        c.revoked = false;
        self.store.put_component(&c).await?;
        info!(%remote, role = %role, id = %r.id, serial = %issued.serial_hex, "enrolled");
        Ok(issued)
    }

    /// Counts a refusal against `ip` and records it as an event.
    async fn refused(&self, ip: IpAddr, remote: &str, who: &str, status: Status) -> Status {
        self.failures.failed(ip);
        warn!(%remote, component = %who, "{}", status.message());
        let event = Event {
            time_ms: now_ms(),
            component: who.to_string(),
            severity: "warning".into(),
            kind: "enrollment-refused".into(),
            message: format!("from {remote}: {}", status.message()),
            replication: String::new(),
        };
        if let Err(e) = self.store.add_event(&event).await {
            warn!("cannot record the refused enrollment: {e}");
        }
        status
    }

    /// Decides and answers one request; a refusal is returned as is.
    async fn grant_and_issue(
        &self,
        r: &EnrollRequest,
        remote: &str,
    ) -> Result<EnrollResponse, Status> {
        let role = Role::parse(&r.role)
            .filter(|r| enrollable(*r))
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "cannot enroll role {:?}: only agent, ps, mt and admin enroll",
                    r.role
                ))
            })?;
        check_id(&r.id).map_err(Status::invalid_argument)?;
        if r.client_nonce.len() < 16 {
            return Err(Status::invalid_argument(
                "client_nonce must have at least 16 random bytes",
            ));
        }
        // Before a token is redeemed: a bad request must not use it up.
        check_csr(&r.csr_pem, role, &r.id).map_err(Status::from)?;
        let fp = self.server_cert_fp();
        let now = now_ms();
        let (grant, server_key) = if r.token.is_empty() {
            let (v, _) = self.verifier().await?;
            let request = ProofRequest {
                role: &r.role,
                id: &r.id,
                csr_pem: &r.csr_pem,
                client_nonce: &r.client_nonce,
                server_cert_fp: &fp,
            };
            let store = self.store.as_ref();
            let g = grant::by_passphrase(store, &v, &r.proof, &request, role, now).await?;
            (g, Some(v.server_key))
        } else {
            (
                grant::by_token(self.store.as_ref(), &r.token, role, &r.id, now).await?,
                None,
            )
        };
        let issued = self.issue(r, role, remote).await?;
        let proof = match (grant, server_key) {
            (Grant::Passphrase, Some(k)) => {
                server_proof(&k, &r.proof, &issued.cert_pem, &self.ca_cert_pem, &fp).to_vec()
            }
            // The token pinned the CA: the client trusts the answer by that.
            _ => Vec::new(),
        };
        Ok(EnrollResponse {
            cert_pem: issued.cert_pem,
            ca_pem: self.ca_cert_pem.clone(),
            server_proof: proof,
        })
    }
}

/// The certificate request is one [`sign_csr`] will sign: a signed
/// PKCS#10 request asking only for names `role` may have.
fn check_csr(csr_pem: &str, role: Role, id: &str) -> Result<(), CsError> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        CsError::InvalidArgument(format!(
            "the certificate request for {role}:{id} is not a valid signed PKCS#10 request: {e}; \
             the token was not used"
        ))
    })?;
    checked_san(&csr.params.subject_alt_names, role, id)?;
    Ok(())
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn params(
        &self,
        _req: Request<EnrollParamsRequest>,
    ) -> Result<Response<EnrollParamsResponse>, Status> {
        let (_, salt) = self.verifier().await?;
        Ok(Response::new(EnrollParamsResponse {
            salt,
            kdf: KDF.into(),
            ca_pem: self.ca_cert_pem.clone(),
        }))
    }

    async fn enroll(
        &self,
        req: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let addr = req.remote_addr();
        let ip = addr
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let remote = addr.map(|a| a.to_string()).unwrap_or_else(|| "?".into());
        let r = req.into_inner();
        let who = format!("{}:{}", r.role, r.id);
        if let Some(wait) = self.failures.blocked(ip) {
            return Err(Status::resource_exhausted(format!(
                "enrollment of {who} refused: too many failed enrollments from {ip}; try again \
                 in {} s, with a valid passphrase or token",
                wait.as_secs().max(1)
            )));
        }
        match self.grant_and_issue(&r, &remote).await {
            Ok(answer) => Ok(Response::new(answer)),
            Err(s) if s.code() == tonic::Code::Internal || s.code() == tonic::Code::Unavailable => {
                Err(s)
            }
            Err(s) => Err(self.refused(ip, &remote, &who, s).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::Cs;
    use rebound_common::enrollment::TokenText;
    use rebound_common::pki::PeerIdentity;

    fn request(token: &str, csr_pem: String) -> Request<EnrollRequest> {
        Request::new(EnrollRequest {
            role: "ps".into(),
            id: "ps1".into(),
            csr_pem,
            client_nonce: vec![7; 16],
            token: token.into(),
            ..Default::default()
        })
    }

    /// A malformed request is refused before its token is redeemed: the
    /// token still enrolls once the request is right.
    #[tokio::test]
    async fn a_bad_certificate_request_leaves_the_token_usable() {
        let cs = Cs::start().await;
        let store = cs.store().await;
        let text = cs.token(Role::Ps, "ps1", 0).await;
        let token = TokenText::parse(&text).unwrap().presented();
        let read = |f: &str| std::fs::read_to_string(cs.dir.join(f)).unwrap();
        let svc = EnrollmentService::new(
            Arc::new(store.clone()),
            read("ca.pem"),
            read("ca.key"),
            &read("cs.pem"),
        )
        .unwrap();
        let e = svc
            .enroll(request(&token, "not a request".into()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message()
                .contains("ps:ps1 is not a valid signed PKCS#10 request")
                && e.message().contains("the token was not used"),
            "{}",
            e.message()
        );
        let who = PeerIdentity {
            role: Role::Ps,
            id: "ps1".into(),
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = |names: &[String]| rebound_common::tls::renewal::csr(&key, &who, names).unwrap();
        let e = svc
            .enroll(request(&token, csr(&["*.example.net".into()])))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("certificate request for ps:ps1"),
            "{}",
            e.message()
        );
        let ok = svc
            .enroll(request(&token, csr(&["ps1.example.net".into()])))
            .await
            .unwrap()
            .into_inner();
        assert!(!ok.cert_pem.is_empty());
        // Used once, it is used up.
        let e = svc
            .enroll(request(&token, csr(&["ps1.example.net".into()])))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
        cs.stop_with(store).await;
    }
}
