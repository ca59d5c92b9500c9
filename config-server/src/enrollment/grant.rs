//! What an enrollment request may be granted (DESIGN.md §3): the CS, not
//! the client, decides.
//!
//! - The passphrase enrolls an agent only, and only for a machine id with
//!   no live identity (no unrevoked, unexpired certificate recorded) that
//!   was not revoked: anyone who read the passphrase on one host must not
//!   take over another machine's id, nor become a PS, an MT or an operator.
//! - Everything else (a PS, an MT, an operator, an agent re-enrolling an
//!   id) needs a one-time token created for exactly that role and id; it is
//!   used up by the enrollment it grants.
//!
//! Every refusal names the role:id and says what to do.

use super::*;
use crate::store::{IssuedCert, Token};
use rebound_common::enrollment::{PassphraseVerifier, Presented, ProofRequest};
use std::time::{Duration, UNIX_EPOCH};
use tonic::Status;

/// How a granted request proved its right.
pub enum Grant {
    /// The passphrase: the CS answers with its own proof.
    Passphrase,
    /// A token, now used up.
    Token,
}

fn when(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `rebound token create --role R --id I`, for refusal messages.
pub fn create_hint(role: Role, id: &str) -> String {
    format!("`rebound token create --role {role} --id {id}`")
}

fn denied(role: Role, id: &str, why: String) -> Status {
    Status::permission_denied(format!("enrollment of {role}:{id} refused: {why}"))
}

/// The passphrase route: an agent, a proof that checks, and no identity
/// already held by the id.
pub async fn by_passphrase(
    store: &dyn Store,
    verifier: &PassphraseVerifier,
    proof: &[u8],
    request: &ProofRequest<'_>,
    role: Role,
    now: u64,
) -> Result<Grant, Status> {
    let id = request.id;
    let hint = create_hint(role, id);
    if role != Role::Agent {
        return Err(denied(
            role,
            id,
            format!(
                "the passphrase enrolls agents only; a {} enrolls with a one-time token. \
                 Create one on an admin host with {hint} and enroll with --token",
                role_name(role)
            ),
        ));
    }
    if !verifier.check_client_proof(proof, request) {
        return Err(denied(
            role,
            id,
            "the passphrase is wrong (or a proxy between you and the CS changed the TLS \
             certificate). Use the passphrase `rebound-cs init` printed; it is in the file \
             `passphrase` in the CS's init directory"
                .into(),
        ));
    }
    if let Some(live) = store.live_certs(role, id, now).await?.first() {
        return Err(denied(role, id, held(live, &hint)));
    }
    if let Some(c) = store.latest_cert(role, id).await? {
        if let Some(at) = c.revoked_ms {
            return Err(denied(
                role,
                id,
                format!(
                    "its certificate was revoked at {}; the passphrase does not bring a revoked \
                     machine back: an operator creates a token with {hint}",
                    when(at)
                ),
            ));
        }
    }
    Ok(Grant::Passphrase)
}

fn held(live: &IssuedCert, hint: &str) -> String {
    format!(
        "machine id {id} already has a live certificate (serial {serial}, valid until {until}); \
         the passphrase enrolls only a machine id no one holds. To re-enroll this machine, an \
         operator creates a token with {hint}; if the old one is lost or stolen, also run \
         `rebound revoke agent:{id}`",
        id = live.id,
        serial = live.serial,
        until = when(live.expiry_ms),
    )
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Ps => "process server",
        Role::Mt => "master target",
        Role::Admin => "operator (admin)",
        Role::Cs => "configuration server",
        Role::Agent => "agent",
    }
}

/// The token route: a token this CS issued, with this secret, for exactly
/// `role`:`id`, unexpired and unused; it is used up here.
pub async fn by_token(
    store: &dyn Store,
    text: &str,
    role: Role,
    id: &str,
    now: u64,
) -> Result<Grant, Status> {
    let hint = create_hint(role, id);
    let p = Presented::parse(text)
        .map_err(|e| Status::invalid_argument(format!("enrollment of {role}:{id} refused: {e}")))?;
    let unknown = || {
        denied(
            role,
            id,
            format!(
                "the token is not one this CS issued, or its secret is wrong: create a new one \
                 with {hint}"
            ),
        )
    };
    let t = store.get_token(&p.token_id).await?.ok_or_else(unknown)?;
    if !proofs_equal(&t.verifier, &p.verifier()) {
        return Err(unknown());
    }
    check_token(&t, role, id, now, &hint)?;
    // Claim it: of two enrollments racing with one token, one gets it.
    let was = store
        .redeem_token(&p.token_id, now)
        .await?
        .ok_or_else(unknown)?;
    check_token(&was, role, id, now, &hint)?;
    Ok(Grant::Token)
}

fn check_token(t: &Token, role: Role, id: &str, now: u64, hint: &str) -> Result<(), Status> {
    if t.role != role || t.id != id {
        return Err(denied(
            role,
            id,
            format!(
                "the token was created for {}:{}, not {role}:{id}: create one for this identity \
                 with {hint}",
                t.role, t.id
            ),
        ));
    }
    if let Some(at) = t.used_ms {
        return Err(denied(
            role,
            id,
            format!(
                "the token was already used at {}; a token enrolls once: create a new one with \
                 {hint}",
                when(at)
            ),
        ));
    }
    if t.expires_ms <= now {
        return Err(denied(
            role,
            id,
            format!(
                "the token expired at {}: create a new one with {hint} (--ttl sets how long it \
                 lasts)",
                when(t.expires_ms)
            ),
        ));
    }
    Ok(())
}
