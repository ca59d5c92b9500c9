//! The CS side of enrollment: the `Enrollment` gRPC service.
//!
//! It is the one service callable without a client certificate (the server
//! TLS config makes client certificates optional for exactly this). It
//! checks the passphrase proof before doing anything else: a wrong proof is
//! refused with PERMISSION_DENIED and nothing is signed or stored.

use super::*;
use crate::store::{now_ms, Component, Health};
use rebound_proto::control::enrollment_server::Enrollment;
use rebound_proto::control::{
    EnrollParamsRequest, EnrollParamsResponse, EnrollRequest, EnrollResponse,
};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

pub struct EnrollmentService {
    store: Arc<dyn Store>,
    ca_cert_pem: String,
    ca_key_pem: String,
    /// blake3 of the DER of the certificate this server presents.
    server_cert_fp: [u8; 32],
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
        })
    }

    async fn key(&self) -> Result<([u8; 32], Vec<u8>), Status> {
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
        let key = self
            .store
            .get_setting(VERIFIER_KEY)
            .await?
            .ok_or_else(missing)?;
        let key = <[u8; 32]>::try_from(key.as_slice()).map_err(|_| {
            Status::internal("the stored enrollment key is corrupt: re-set the passphrase")
        })?;
        Ok((key, salt))
    }
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn params(
        &self,
        _req: Request<EnrollParamsRequest>,
    ) -> Result<Response<EnrollParamsResponse>, Status> {
        let (_, salt) = self.key().await?;
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
        let remote = req
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "?".into());
        let r = req.into_inner();
        let role = Role::parse(&r.role)
            .filter(|r| enrollable(*r))
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "cannot enroll role {:?}: only agent, ps and mt enroll",
                    r.role
                ))
            })?;
        check_id(&r.id).map_err(Status::invalid_argument)?;
        if r.client_nonce.len() < 16 {
            return Err(Status::invalid_argument(
                "client_nonce must have at least 16 random bytes",
            ));
        }
        let (key, _) = self.key().await?;
        let expected = client_proof(
            &key,
            &r.r#role,
            &r.id,
            &r.csr_pem,
            &r.client_nonce,
            &self.server_cert_fp,
        );
        if !proofs_equal(&r.proof, &expected) {
            warn!(%remote, role = %role, id = %r.id, "enrollment refused: wrong passphrase proof");
            return Err(Status::permission_denied(format!(
                "enrollment of {role}:{} refused: the passphrase is wrong (or a proxy between you \
                 and the CS changed the TLS certificate). Use the passphrase `rebound-cs init` \
                 printed; it is in the file `passphrase` in the CS's init directory",
                r.id
            )));
        }
        let issued = sign_csr(&self.ca_cert_pem, &self.ca_key_pem, &r.csr_pem, role, &r.id)
            .map_err(Status::from)?;
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
        c.cert_expiry_ms =
            crate::fleet::components::cert_expiry_ms_pem(&issued.cert_pem).unwrap_or(0);
        c.enrolled_ms = now_ms();
        c.revoked = false;
        self.store.put_component(&c).await?;
        info!(%remote, role = %role, id = %r.id, serial = %issued.serial_hex, "enrolled");
        let proof = server_proof(
            &key,
            &r.proof,
            &issued.cert_pem,
            &self.ca_cert_pem,
            &self.server_cert_fp,
        );
        Ok(Response::new(EnrollResponse {
            cert_pem: issued.cert_pem,
            ca_pem: self.ca_cert_pem.clone(),
            server_proof: proof.to_vec(),
        }))
    }
}
