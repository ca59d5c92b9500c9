//! Which process server may feed and read which replication (DESIGN.md §3).
//!
//! Every replication is carried by one PS. With a configuration server
//! (managed mode, `[cs] addr` set) the CS names it in PrepareReplication,
//! which also creates the replication: a PS's Apply or ChunkHashes for a
//! replication the CS did not prepare is refused, and for a prepared one
//! only the assigned PS is accepted (and, while the replication moves to
//! another PS, the ones it moves away from: see `replication_ps`). Without
//! a CS (lab mode) the first PS
//! that uses a replication creates it and is bound to it. Either way the
//! assignment is kept in the replication's `state.json`, and a chunk-hash
//! request must name the replication's own machine: hashes of one machine's
//! replica are never an answer to a request about another.

use crate::error::{MtError, Result};
use crate::replication::{Replication, Store};
use rebound_common::limits;
use rebound_common::pki::PeerIdentity;
use rebound_proto::ReplicationInfo;
use std::sync::Arc;
use tracing::{info, warn};

impl Replication {
    /// The PS this replication is assigned to, when one is recorded.
    pub fn assigned_ps(&self) -> Option<String> {
        let ps = self.read_summary().state().ps_id.clone();
        (!ps.is_empty()).then_some(ps)
    }

    /// Assigns the replication to PS `ps_id`, saved before it returns
    /// (blocking). Idempotent.
    pub fn assign_ps(&self, ps_id: &str) -> Result<()> {
        if self.change_state(|st| st.ps_id == ps_id, |inner| inner.set_ps(ps_id))? {
            info!(replication = %self.id(), machine = %self.machine_id(), ps = %ps_id,
                "replication assigned to this process server");
        }
        Ok(())
    }

    /// Refuses `peer` unless it is the replication's PS; a replication
    /// with none recorded (lab mode, or prepared by a CS that did not name
    /// one) is bound to `peer` now (blocking).
    fn authorize_ps(&self, peer: &PeerIdentity, what: &str, managed: bool) -> Result<()> {
        match self.assigned_ps() {
            Some(ps) if ps == peer.id => Ok(()),
            // Moving away from it: it still forwards what it holds.
            Some(_) if self.previous_ps().contains(&peer.id) => Ok(()),
            Some(ps) => Err(MtError::PermissionDenied(format!(
                "certificate {peer} may not {what} replication {} of machine {}: it is assigned to process server {ps}; only that PS may carry it (the configuration server assigns it at protect and reprotect)",
                self.id(),
                self.machine_id()
            ))),
            None => {
                if managed {
                    warn!(replication = %self.id(), ps = %peer.id,
                        "no process server recorded for this replication: bound to the first that uses it; reprotect it to have the configuration server assign one");
                }
                self.assign_ps(&peer.id)
            }
        }
    }
}

/// The refusal of an announcement outside the caps.
fn over_limit(e: limits::LimitError) -> MtError {
    MtError::InvalidArgument(e.to_string())
}

/// The refusal of a replication the CS did not prepare at this MT.
fn not_prepared(peer: &PeerIdentity, what: &str, id: &str) -> MtError {
    MtError::PermissionDenied(format!(
        "certificate {peer} may not {what} replication {id:?}: the configuration server did not prepare it at this master target; replications are created by `rebound protect` and `rebound reprotect`"
    ))
}

/// The replication of a PS's Apply hello, created when lab mode allows it,
/// once the PS is found to be the replication's own (blocking).
pub(crate) fn for_apply(
    store: &Store,
    hello: &ReplicationInfo,
    peer: &PeerIdentity,
    managed: bool,
) -> Result<Arc<Replication>> {
    let id = &hello.replication_id;
    limits::check_disks(id, &hello.machine_id, hello.disks.len()).map_err(over_limit)?;
    let repl = match store.get(id) {
        Some(r) => {
            r.check_hello(hello)?;
            r
        }
        None if managed => return Err(not_prepared(peer, "apply to", id)),
        None => store.get_or_create(hello)?,
    };
    repl.authorize_ps(peer, "apply to", managed)?;
    Ok(repl)
}

/// The replication of a ChunkHashes request. A PS must be the one the
/// replication is assigned to; the info sent along (the agent's) must name
/// the replication's machine, and creates the replication only in lab
/// mode. The CS and an operator read any replication (blocking).
pub(crate) fn for_chunk_hashes(
    store: &Store,
    id: &str,
    info: Option<&ReplicationInfo>,
    peer: &PeerIdentity,
    managed: bool,
) -> Result<Arc<Replication>> {
    const WHAT: &str = "ask chunk hashes of";
    if let Some(i) = info {
        if !i.replication_id.is_empty() && i.replication_id != id {
            return Err(MtError::InvalidArgument(format!(
                "ChunkHashes for replication {id} carries the info of replication {}",
                i.replication_id
            )));
        }
        limits::check_disks(id, &i.machine_id, i.disks.len()).map_err(over_limit)?;
    }
    let is_ps = peer.role == rebound_common::pki::Role::Ps;
    let repl = match (store.get(id), info) {
        (Some(r), _) => r,
        (None, Some(_)) if managed => return Err(not_prepared(peer, WHAT, id)),
        (None, Some(i)) => {
            let mut i = i.clone();
            i.replication_id = id.to_string();
            store.get_or_create(&i)?
        }
        (None, None) => {
            return Err(MtError::NotFound(format!(
                "this MT has no replication {id:?}; it is created by the process server's first Apply hello"
            )))
        }
    };
    if let Some(i) = info {
        if i.machine_id != repl.machine_id() {
            return Err(MtError::PermissionDenied(format!(
                "certificate {peer} asked chunk hashes of replication {id} for machine {:?}, but the replication belongs to machine {}; hashes go only to the replication's own machine",
                i.machine_id,
                repl.machine_id()
            )));
        }
    }
    if is_ps {
        repl.authorize_ps(peer, WHAT, managed)?;
    }
    Ok(repl)
}
