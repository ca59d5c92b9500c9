//! The process server on the control channel (DESIGN.md §6, §8): its hello,
//! its status (cache use, throughput, per-replication lag) every heartbeat,
//! and the CS's commands: `AddReplication` (accept a replication and forward
//! it to the MT the CS names, persisted as the replication's route) and
//! `RemoveReplication` (stop forwarding and drop its cache), and
//! `SetRevoked` (the revocation list, enforced and saved). All are
//! idempotent, since a command id may arrive twice after a reconnect.

use crate::cache::{Cache, CacheError};
use crate::forward::{route_path, Forwarders, Route};
use crate::status::StatusCell;
use rebound_common::control::{err_result, ok_result, set_revoked, ControlHandler};
use rebound_common::durable::write_atomic;
use rebound_common::tls::Revocations;
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use tracing::info;

pub use rebound_common::control::Identity;

/// The PS's control-channel state.
pub struct PsControl {
    pub cache: Arc<Cache>,
    pub forwarders: Arc<Forwarders>,
    pub identity: Identity,
    /// The status the sampler ([`crate::status::status_task`]) keeps.
    pub status: Arc<StatusCell>,
    /// The revocation list the gRPC acceptor enforces; SetRevoked replaces
    /// it and saves it to `revoked_path`.
    pub revocations: Revocations,
    pub revoked_path: PathBuf,
}

/// Adds (or re-points) a replication: its cache, its persisted route, and a
/// forwarder to its MT (blocking).
pub fn add_replication(
    cache: &Cache,
    forwarders: &Forwarders,
    c: &pb::AddReplication,
) -> Result<(), String> {
    if c.mt_address.is_empty() {
        return Err(format!(
            "AddReplication of {} names no master target address",
            c.replication_id
        ));
    }
    let rep = cache.ensure(&c.replication_id).map_err(|e| e.to_string())?;
    if let Some(info) = rep.info() {
        if !c.machine_id.is_empty() && info.machine_id != c.machine_id {
            return Err(CacheError::WrongMachine {
                replication: c.replication_id.clone(),
                stored: info.machine_id,
                claimed: c.machine_id.clone(),
            }
            .to_string());
        }
    }
    let route = Route {
        machine_id: c.machine_id.clone(),
        mt_address: c.mt_address.clone(),
        mt_server_name: if c.mt_server_name.is_empty() {
            "localhost".into()
        } else {
            c.mt_server_name.clone()
        },
    };
    let path = route_path(rep.dir());
    let text = serde_json::to_vec_pretty(&route).map_err(|e| e.to_string())?;
    write_atomic(&path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    if forwarders.set_route(&c.replication_id, &route) {
        info!(replication = %c.replication_id, machine = %c.machine_id, mt = %route.mt_address,
            "replication added: forwarding to this master target");
        forwarders.stop(&c.replication_id);
    }
    forwarders.ensure(&rep);
    Ok(())
}

/// Stops forwarding a replication and drops its cache (blocking).
pub fn remove_replication(cache: &Cache, forwarders: &Forwarders, id: &str) -> Result<(), String> {
    forwarders.remove(id);
    let existed = cache.remove(id).map_err(|e| e.to_string())?;
    info!(replication = %id, existed, "replication removed: forwarding stopped, cache dropped");
    Ok(())
}

impl PsControl {
    fn run(&self, cmd: Cmd) -> Result<pb::CommandResult, String> {
        match cmd {
            Cmd::AddReplication(c) => {
                add_replication(&self.cache, &self.forwarders, &c)?;
                Ok(ok_result())
            }
            Cmd::RemoveReplication(c) => {
                remove_replication(&self.cache, &self.forwarders, &c.replication_id)?;
                Ok(ok_result())
            }
            Cmd::SetRevoked(c) => Ok(set_revoked(&self.revocations, &self.revoked_path, &c)),
            _ => Err(
                "a process server takes only AddReplication, RemoveReplication and SetRevoked"
                    .into(),
            ),
        }
    }
}

/// Runs a command off the runtime.
pub async fn handle_command(this: Arc<PsControl>, cmd: pb::Command) -> pb::CommandResult {
    let id = cmd.id.clone();
    let mut res = match cmd.cmd {
        None => err_result("empty command: this PS may be older than the CS; upgrade it"),
        Some(c) => match tokio::task::spawn_blocking(move || this.run(c)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => err_result(e),
            Err(e) => err_result(format!("the command's task failed: {e}")),
        },
    };
    res.id = id;
    res
}

/// Adapter so the control task can hold the handler as a trait object.
pub struct Handler(pub Arc<PsControl>);

impl ControlHandler for Handler {
    fn hello(&self) -> pb::Hello {
        self.0.identity.hello(rebound_common::pki::Role::Ps)
    }

    fn status(&self) -> Option<pb::Status> {
        rebound_common::control::sampled_status(&self.0.status, pb::status::Status::Ps)
    }

    fn handle(&self, cmd: pb::Command) -> Pin<Box<dyn Future<Output = pb::CommandResult> + Send>> {
        Box::pin(handle_command(self.0.clone(), cmd))
    }
}
