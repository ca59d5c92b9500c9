//! One-time enrollment tokens: what an operator creates for one role and id
//! (`rebound token create`), and what the CS keeps of it. Redeeming one is
//! enrollment's part (`enrollment::grant`).
//!
//! The token text carries the CA's hash so the enrolling component can pin
//! the CA before it sends the secret; the CS stores only a verifier of the
//! secret, so the text is shown once and a copy of the database is no token.

use crate::enrollment::{check_id, first_cert_der};
use crate::service::AdminService;
use crate::store::{now_ms, Event, Token};
use rebound_common::enrollment::{token_verifier, TokenText};
use rebound_common::pki::Role;
use rebound_proto::control as pb;
use std::time::Duration;
use tonic::{Response, Status};
use tracing::info;

/// How long a token lasts when the request does not say.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// The longest a token may last: it is a bearer secret in transit.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// `Admin.CreateToken`.
pub async fn create_token(
    svc: &AdminService,
    req: pb::CreateTokenRequest,
) -> Result<Response<pb::CreateTokenResponse>, Status> {
    let role = Role::parse(&req.role)
        .filter(|r| matches!(r, Role::Agent | Role::Ps | Role::Mt | Role::Admin))
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "--role {:?}: a token enrolls an agent, ps, mt or admin",
                req.role
            ))
        })?;
    check_id(&req.id).map_err(|e| Status::invalid_argument(format!("--id: {e}")))?;
    let ttl = match req.ttl_secs {
        0 => DEFAULT_TTL,
        s => Duration::from_secs(s),
    };
    if ttl > MAX_TTL {
        return Err(Status::invalid_argument(format!(
            "--ttl {}: a token may last at most {}; create it closer to when it is used",
            humantime::format_duration(ttl),
            humantime::format_duration(MAX_TTL)
        )));
    }
    let ca_der = first_cert_der(&svc.ca_pem)
        .map_err(|e| Status::internal(format!("the CS's CA certificate ([tls] ca): {e}")))?;
    let text = TokenText::generate(&ca_der);
    let now = now_ms();
    let expires_ms = now.saturating_add(ttl.as_millis() as u64);
    svc.store
        .put_token(&Token {
            token_id: text.token_id.clone(),
            role,
            id: req.id.clone(),
            verifier: token_verifier(&text.secret).to_vec(),
            created_ms: now,
            expires_ms,
            used_ms: None,
        })
        .await?;
    svc.store
        .add_event(&Event {
            time_ms: now,
            component: format!("{role}:{}", req.id),
            severity: "info".into(),
            kind: "token-created".into(),
            message: format!(
                "enrollment token {} created for {role}:{}, valid for {}",
                text.token_id,
                req.id,
                humantime::format_duration(ttl)
            ),
            replication: String::new(),
        })
        .await?;
    info!(token = %text.token_id, role = %role, id = %req.id, "enrollment token created");
    Ok(Response::new(pb::CreateTokenResponse {
        token: text.to_string(),
        expires_ms,
    }))
}
