//! A machine's policy pushed to the components that apply it: the agent
//! (crash and app intervals: `SetPolicy`) and the MT of its replication
//! (retention: `SetRetention`). A component that is offline gets it when
//! it connects again ([`resend_on_hello`]), so a policy change never waits
//! for a restart.

use crate::bus::{Bus, ComponentKey};
use crate::convert;
use crate::error::CsError;
use crate::store::{Policy, ReplState, Replication, Store, RESET_RPO_ALERT};
use rebound_common::pki::Role;
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use std::time::Duration;
use tracing::{info, warn};

/// The policy after `rebound policy set`, and who has not been told yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub policy: Policy,
    /// Components that were offline ("agent:m1"); they get it on reconnect.
    pub pending: Vec<String>,
}

/// Whether the replication streams or is being failed over: its MT keeps
/// its retention journal.
fn running(r: &Replication) -> bool {
    matches!(
        r.state,
        ReplState::InitialSync | ReplState::Protected | ReplState::FailingOver
    )
}

/// The `SetRetention` of a replication under `policy`.
pub fn retention_cmd(replication_id: &str, policy: &Policy) -> Cmd {
    Cmd::SetRetention(pb::SetRetention {
        replication_id: replication_id.to_string(),
        window_secs: policy.retention_window_secs,
        max_bytes: policy.retention_max_bytes,
    })
}

fn agent_cmd(policy: &Policy) -> Cmd {
    Cmd::SetPolicy(pb::SetPolicy {
        policy: Some(convert::policy_to_proto(policy)),
    })
}

/// Sends `cmd` when `to` is connected; `Ok(false)` when it is not (the
/// command is not queued: the component gets the policy on its hello).
async fn push(
    bus: &dyn Bus,
    to: ComponentKey,
    cmd: Cmd,
    timeout: Duration,
) -> Result<bool, CsError> {
    if bus.connection(&to).is_none() {
        return Ok(false);
    }
    bus.send(to, cmd, timeout).await?;
    Ok(true)
}

/// [`push`] once the policy is stored: a component that is offline or did
/// not take the command is pending, not a failure of `policy set` (it gets
/// the stored policy again when it reconnects). `None` when delivered, else
/// the component and why.
async fn deliver(bus: &dyn Bus, to: &ComponentKey, cmd: Cmd, timeout: Duration) -> Option<String> {
    match push(bus, to.clone(), cmd, timeout).await {
        Ok(true) => None,
        Ok(false) => Some(format!("{to} (offline)")),
        Err(e) => {
            warn!(component = %to, error = %e, "policy stored but not delivered");
            Some(format!("{to} ({e})"))
        }
    }
}

/// `rebound policy set`: merges the fields `changes` sets into the machine's
/// policy, stores it with the machine and its current replication, and
/// pushes it to the agent and (when the policy sets a retention, or changed
/// it) the MT of the running replication.
pub async fn set_policy(
    store: &dyn Store,
    bus: &dyn Bus,
    timeout: Duration,
    machine: &str,
    changes: &pb::Policy,
) -> Result<Applied, CsError> {
    set_policy_resetting(store, bus, timeout, machine, changes, &[]).await
}

/// [`set_policy`], then the fields named in `reset` (`SetPolicyRequest.reset`)
/// put back to their default.
pub async fn set_policy_resetting(
    store: &dyn Store,
    bus: &dyn Bus,
    timeout: Duration,
    machine: &str,
    changes: &pb::Policy,
    reset: &[String],
) -> Result<Applied, CsError> {
    // Checked before anything is stored.
    reset_fields(Policy::default(), reset)?;
    let mut m = store.get_machine(machine).await?.ok_or_else(|| {
        CsError::NotFound(format!(
            "machine {machine} is unknown: `rebound machines` lists the machines"
        ))
    })?;
    let before = m.policy;
    m.policy = reset_fields(convert::policy_merge(m.policy, changes), reset)?;
    store.put_machine(&m).await?;
    let current = store.current_replication(machine).await?;
    if let Some(r) = current.as_ref().filter(|r| running(r)) {
        let mut r = r.clone();
        r.policy = m.policy;
        store.put_replication(&r).await?;
    }
    let mut pending = Vec::new();
    let agent = ComponentKey::agent(machine);
    if let Some(why) = deliver(bus, &agent, agent_cmd(&m.policy), timeout).await {
        pending.push(why);
    }
    let retention_changed = before.retention_window_secs != m.policy.retention_window_secs
        || before.retention_max_bytes != m.policy.retention_max_bytes;
    if let Some(r) = current.as_ref().filter(|r| running(r)) {
        if m.policy.has_retention() || retention_changed {
            let mt = ComponentKey::mt(&r.mt);
            if let Some(why) = deliver(bus, &mt, retention_cmd(&r.id, &m.policy), timeout).await {
                pending.push(why);
            }
        }
    }
    info!(machine, policy = ?m.policy, ?pending, "policy set");
    Ok(Applied {
        policy: m.policy,
        pending,
    })
}

/// `policy` with the fields named in `reset` at their default (0); an
/// unknown name is refused.
pub fn reset_fields(mut policy: Policy, reset: &[String]) -> Result<Policy, CsError> {
    for name in reset {
        match name.as_str() {
            RESET_RPO_ALERT => policy.rpo_alert_ms = 0,
            other => {
                return Err(CsError::InvalidArgument(format!(
                    "cannot reset policy field {other:?}: the fields that reset are \
                     {RESET_RPO_ALERT:?}"
                )))
            }
        }
    }
    Ok(policy)
}

/// Re-sends a component its current policy when it connects: an agent its
/// machine's policy (while the machine replicates), an MT the retention of
/// every running replication it holds that sets one. Failures are logged:
/// the component gets it again on its next connect.
pub async fn resend_on_hello(
    store: &dyn Store,
    bus: &dyn Bus,
    key: &ComponentKey,
    timeout: Duration,
) {
    if let Err(e) = resend(store, bus, key, timeout).await {
        warn!(component = %key, error = %e, "policy not re-sent on connect");
    }
}

async fn resend(
    store: &dyn Store,
    bus: &dyn Bus,
    key: &ComponentKey,
    timeout: Duration,
) -> Result<(), CsError> {
    match key.role {
        Role::Agent => {
            let r = store.current_replication(&key.id).await?;
            if let Some(r) = r.filter(running) {
                push(bus, key.clone(), agent_cmd(&r.policy), timeout).await?;
            }
        }
        Role::Mt => {
            for m in store.list_machines().await? {
                let Some(r) = store.current_replication(&m.id).await? else {
                    continue;
                };
                if r.mt == key.id && running(&r) && r.policy.has_retention() {
                    push(bus, key.clone(), retention_cmd(&r.id, &r.policy), timeout).await?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}
