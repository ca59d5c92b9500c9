//! Revocation: `rebound revoke COMPONENT` marks every unexpired certificate
//! of a component revoked and pushes the list to every PS and MT.
//!
//! The CS is the authority on the revocation list: the store records which
//! issued certificates are revoked, and the list is every revoked serial
//! that has not expired yet (an expired certificate fails the handshake by
//! itself). The CS enforces its own copy ([`Revocations`], which also cuts
//! the open connections of a newly revoked serial) and sends the whole list
//! (`SetRevoked`) to each PS and MT: at once to those connected, and to each
//! after its welcome when it connects, so one that was offline catches up
//! before it serves anything the CS asks of it.

use crate::bus::{Bus, BusError, ComponentKey};
use crate::error::CsError;
use crate::service::AdminService;
use crate::store::{now_ms, Event, Store};
use rebound_common::pki::Role;
use rebound_common::tls::Revocations;
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use std::time::Duration;
use tonic::{Response, Status};
use tracing::{info, warn};

/// How long one PS or MT may take to take the list.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// `agent`, `ps`, `mt` or `admin`: the roles an operator may revoke.
fn revocable_role(role: &str) -> Result<Role, CsError> {
    match Role::parse(role) {
        Some(r @ (Role::Agent | Role::Ps | Role::Mt | Role::Admin)) => Ok(r),
        _ => Err(CsError::InvalidArgument(format!(
            "cannot revoke a component of role {role:?}: name agent:ID, ps:ID, mt:ID or admin:ID \
             (`rebound components` lists them)"
        ))),
    }
}

/// Reads the current list from the store into the CS's own copy (cutting the
/// CS's open connections of newly revoked serials) and returns it.
pub async fn refresh(store: &dyn Store, own: &Revocations) -> Result<Vec<String>, CsError> {
    let serials = store.revoked_serials(now_ms()).await?;
    let cut = own.set(serials.iter().cloned());
    if cut > 0 {
        info!(
            connections = cut,
            "closed connections of revoked certificates"
        );
    }
    Ok(serials)
}

/// Sends the list to one PS or MT and waits until it has taken it (the PS
/// and MT persist it before they answer).
pub async fn push(
    bus: &dyn Bus,
    to: &ComponentKey,
    serials: Vec<String>,
    timeout: Duration,
) -> Result<(), BusError> {
    bus.send(
        to.clone(),
        Cmd::SetRevoked(pb::SetRevoked { serials }),
        timeout,
    )
    .await
    .map(|_| ())
}

/// Sends the list to a PS or MT that has just been welcomed; logs what
/// failed (it gets the list again at its next connection or revocation).
pub async fn push_on_hello(
    store: &dyn Store,
    bus: &dyn Bus,
    own: &Revocations,
    key: &ComponentKey,
    timeout: Duration,
) {
    if !matches!(key.role, Role::Ps | Role::Mt) {
        return;
    }
    let serials = match refresh(store, own).await {
        Ok(s) => s,
        Err(e) => {
            warn!(component = %key, error = %e, "revocation list not read; not sent on connect");
            return;
        }
    };
    // Nothing was ever revoked (or all of it expired): nothing to enforce.
    // The list only grows until its certificates expire, so a PS or MT
    // that kept an older list refuses nothing it should accept.
    if serials.is_empty() {
        return;
    }
    if let Err(e) = push(bus, key, serials, timeout).await {
        warn!(component = %key, error = %e, "revocation list not taken on connect");
    }
}

/// Sends the list to every connected PS and MT but `revoked` (which need not
/// enforce its own revocation) at once; returns those that did not take it
/// ("ps:ps1: why"), which get it when they connect again.
pub async fn push_all(
    store: &dyn Store,
    bus: &dyn Bus,
    serials: &[String],
    revoked: &ComponentKey,
    timeout: Duration,
) -> Result<Vec<String>, CsError> {
    let mut pending = Vec::new();
    let mut sends = Vec::new();
    for c in store.list_components().await? {
        let key = ComponentKey {
            role: c.role,
            id: c.id.clone(),
        };
        if !matches!(c.role, Role::Ps | Role::Mt) || c.revoked || &key == revoked {
            continue;
        }
        if bus.connection(&key).is_none() {
            pending.push(format!(
                "{key}: not connected; it gets the list when it connects"
            ));
            continue;
        }
        sends.push(async move {
            let r = push(bus, &key, serials.to_vec(), timeout).await;
            (key, r)
        });
    }
    for (key, r) in futures::future::join_all(sends).await {
        if let Err(e) = r {
            warn!(component = %key, error = %e, "revocation list not taken");
            pending.push(format!("{key}: {e}"));
        }
    }
    Ok(pending)
}

/// Revokes every unexpired certificate of `role:id`, ends its control
/// stream, and pushes the new list.
pub async fn revoke_component(
    svc: &AdminService,
    role: &str,
    id: &str,
) -> Result<pb::RevokeResponse, CsError> {
    let role = revocable_role(role)?;
    let key = ComponentKey {
        role,
        id: id.to_string(),
    };
    let store = svc.store.as_ref();
    let known = store.latest_cert(role, id).await?.is_some();
    let component = store.get_component(role, id).await?;
    if !known && component.is_none() {
        return Err(CsError::NotFound(format!(
            "no certificate was issued to {key}: check the role and id (`rebound components` \
             lists the fleet)"
        )));
    }
    let serials = store.revoke_certs(role, id, now_ms()).await?;
    if let Some(mut c) = component {
        c.revoked = true;
        store.put_component(&c).await?;
    }
    let message = format!(
        "{key} revoked ({} certificate(s): {}); it is refused by the CS, every PS and MT, also on \
         streams already open. To let it back, create a token (`rebound token create --role {} \
         --id {id}`) and enroll it again",
        serials.len(),
        if serials.is_empty() {
            "none unexpired".to_string()
        } else {
            serials.join(", ")
        },
        role
    );
    warn!("{message}");
    store
        .add_event(&Event {
            time_ms: now_ms(),
            component: key.to_string(),
            severity: "warning".into(),
            kind: "revoked".into(),
            message,
            replication: String::new(),
        })
        .await?;
    let list = refresh(store, &svc.revocations).await?;
    if let Some(c) = svc.bus.connection(&key) {
        svc.bus.kick(&key, c.conn_id);
    }
    let pending = push_all(store, svc.bus.as_ref(), &list, &key, PUSH_TIMEOUT).await?;
    Ok(pb::RevokeResponse { serials, pending })
}

/// `Admin.Revoke`.
pub async fn revoke(
    svc: &AdminService,
    req: pb::RevokeRequest,
) -> Result<Response<pb::RevokeResponse>, Status> {
    Ok(Response::new(
        revoke_component(svc, &req.role, &req.id).await?,
    ))
}
