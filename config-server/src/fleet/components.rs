//! One component as `rebound components` and `rebound status` show it,
//! the certificate expiry and version checks made when it connects, and
//! `rebound remove`, which forgets a decommissioned one.

use crate::bus::{Bus, ComponentKey};
use crate::error::CsError;
use crate::store::{Component, Health, ReplState, Store};
use prost::Message;
use rebound_common::pki::Role;
use rebound_proto::control as pb;

/// The version of this CS.
pub const CS_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The notAfter of a DER certificate, in ms since the epoch; `None` when it
/// does not parse.
pub fn cert_expiry_ms(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = cert.validity().not_after.timestamp();
    u64::try_from(secs).ok().map(|s| s.saturating_mul(1000))
}

/// The notAfter of the first certificate in a PEM text (as enrollment
/// issues it), in ms since the epoch.
pub fn cert_expiry_ms_pem(pem: &str) -> Option<u64> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    cert_expiry_ms(&p.contents)
}

/// A sentence naming both versions when `version` differs from the CS's
/// (`None` when equal or unknown).
pub fn version_mismatch(key: &ComponentKey, version: &str) -> Option<String> {
    if version.is_empty() || version == CS_VERSION {
        return None;
    }
    Some(format!(
        "{key} runs {version}, the CS runs {CS_VERSION}: upgrade the older one so that all \
         components run the CS's version; upgrade order in docs/DEPLOY.md"
    ))
}

/// The health the CS sees now: online while its control stream is up; one
/// that never connected stays enrolled; any other is offline (whatever
/// the store says: a CS that crashed never wrote their offline).
pub fn health(bus: &dyn Bus, c: &Component) -> Health {
    let key = ComponentKey {
        role: c.role,
        id: c.id.clone(),
    };
    if bus.connection(&key).is_some() {
        Health::Online
    } else if c.health == Health::Enrolled {
        Health::Enrolled
    } else {
        Health::Offline
    }
}

/// The component as the Admin RPCs answer it.
pub fn info(bus: &dyn Bus, c: &Component) -> pb::ComponentInfo {
    let key = ComponentKey {
        role: c.role,
        id: c.id.clone(),
    };
    pb::ComponentInfo {
        role: c.role.as_str().into(),
        id: c.id.clone(),
        site: c.site.clone(),
        version: c.version.clone(),
        addresses: c.addresses.clone(),
        health: match health(bus, c) {
            // Refused at every connection until it enrolls again.
            Health::Offline | Health::Enrolled if c.revoked => "revoked".into(),
            h => h.as_str().into(),
        },
        last_heartbeat_ms: c.last_heartbeat_ms,
        cert_fingerprint: c.cert_fingerprint.clone(),
        status: pb::Status::decode(c.status.as_slice()).ok(),
        cert_expiry_ms: c.cert_expiry_ms,
        version_mismatch: version_mismatch(&key, &c.version).unwrap_or_default(),
    }
}

/// Every agent, PS and MT the CS knows.
pub async fn list(store: &dyn Store, bus: &dyn Bus) -> Result<Vec<pb::ComponentInfo>, CsError> {
    Ok(store
        .list_components()
        .await?
        .iter()
        .filter(|c| matches!(c.role, Role::Agent | Role::Ps | Role::Mt))
        .map(|c| info(bus, c))
        .collect())
}

/// `agent`, `ps` or `mt` (what `rebound remove` may forget).
pub fn fleet_role(role: &str) -> Result<Role, CsError> {
    match Role::parse(role) {
        Some(r @ (Role::Agent | Role::Ps | Role::Mt)) => Ok(r),
        _ => Err(CsError::InvalidArgument(format!(
            "cannot remove a component of role {role:?}: name an agent, ps or mt \
             (`rebound components` lists them)"
        ))),
    }
}

/// Forgets a decommissioned component: refused while it is online or a
/// machine's replication uses it, with what to do first.
pub async fn remove(store: &dyn Store, bus: &dyn Bus, role: &str, id: &str) -> Result<(), CsError> {
    let role = fleet_role(role)?;
    let key = ComponentKey {
        role,
        id: id.to_string(),
    };
    if store.get_component(role, id).await?.is_none() {
        return Err(CsError::NotFound(format!(
            "no component {key} is known (`rebound components` lists them)"
        )));
    }
    if bus.connection(&key).is_some() {
        return Err(CsError::FailedPrecondition(format!(
            "{key} is online: stop its service first (`systemctl stop rebound-{role}` on its \
             host), then remove it once `rebound components` shows it offline"
        )));
    }
    for m in store.list_machines().await? {
        let Some(r) = store.current_replication(&m.id).await? else {
            continue;
        };
        if r.state == ReplState::Unprotected {
            continue;
        }
        let uses = match role {
            Role::Agent => r.machine == id,
            Role::Ps => r.ps == id,
            _ => r.mt == id,
        };
        if uses {
            return Err(CsError::FailedPrecondition(format!(
                "{key} is used by replication {} of machine {} ({}): unprotect {} first \
                 (`rebound unprotect {}`), or move it to another {role} (fail over, commit and \
                 reprotect through another one)",
                r.id, r.machine, r.state, r.machine, r.machine
            )));
        }
    }
    store.delete_component(role, id).await?;
    Ok(())
}
