//! Who may use which replication at the process server (DESIGN.md §3).
//!
//! An agent's certificate names its machine, and an agent may stream and
//! ask chunk hashes only for its own machine's replication. Which
//! replication that is, is the configuration server's word when the PS has
//! one (managed mode, `[cs] addr` set): the CS routes every replication it
//! creates here with AddReplication, naming its machine, so a replication
//! id the CS did not assign is refused, and an assigned one is bound to its
//! machine. Without a CS (lab mode) nobody assigns ids: the first hello
//! binds a replication to its machine (the cache keeps it) and later use
//! by another machine is refused.

use crate::ingest::IngestContext;
use rebound_common::limits;
use rebound_common::pki::PeerIdentity;
use rebound_proto::{ChunkHashesRequest, ReplicationInfo};
use tonic::Status;

/// The machine the CS routed replication `rid` for, or the machine the
/// cached hello names (a route written before routes named their machine).
fn assigned_machine(ctx: &IngestContext, rid: &str) -> Option<String> {
    match ctx.forwarders.routed_machine(rid) {
        Some(m) if !m.is_empty() => Some(m),
        Some(_) => Some(cached_machine(ctx, rid).unwrap_or_default()),
        None => None,
    }
}

/// The machine of the cached hello of replication `rid`, if any.
fn cached_machine(ctx: &IngestContext, rid: &str) -> Option<String> {
    ctx.cache
        .get(rid)
        .and_then(|r| r.info())
        .map(|i| i.machine_id)
}

/// The refusal of an announcement outside the caps.
fn over_limit(e: limits::LimitError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The refusal of a replication id the CS did not route here.
fn not_assigned(peer: &PeerIdentity, rid: &str) -> Status {
    Status::permission_denied(format!(
        "certificate {peer} named replication {rid:?}, which the configuration server did not assign to this process server; an agent cannot create a replication: protect the machine with `rebound protect {}`",
        peer.id
    ))
}

/// The refusal of another machine's replication.
fn other_machine(peer: &PeerIdentity, what: &str, rid: &str, machine: &str) -> Status {
    Status::permission_denied(format!(
        "certificate {peer} may not {what} replication {rid:?}: it belongs to machine {machine:?}; an agent may use only its own machine's replication"
    ))
}

/// Checks an agent's ingest hello: its disks within the cap, its machine
/// the certificate's, and (managed) its replication assigned by the CS to
/// that machine.
pub fn check_hello(
    ctx: &IngestContext,
    peer: &PeerIdentity,
    hello: &ReplicationInfo,
) -> Result<(), Status> {
    let rid = &hello.replication_id;
    limits::check_disks(rid, &hello.machine_id, hello.disks.len()).map_err(over_limit)?;
    if hello.machine_id != peer.id {
        return Err(Status::permission_denied(format!(
            "certificate {peer} may stream only for machine {}, not for machine {:?} (replication {rid:?})",
            peer.id, hello.machine_id
        )));
    }
    if ctx.managed {
        match assigned_machine(ctx, rid) {
            None => return Err(not_assigned(peer, rid)),
            Some(m) if m != peer.id => return Err(other_machine(peer, "stream for", rid, &m)),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Checks an agent's chunk-hash request: a chunk size the protocol uses,
/// a replication this PS knows (managed: routed by the CS; lab: cached, or
/// described by the info sent along) of the caller's own machine.
pub fn check_chunk_hashes(
    ctx: &IngestContext,
    peer: &PeerIdentity,
    req: &ChunkHashesRequest,
) -> Result<(), Status> {
    let rid = &req.replication_id;
    limits::check_chunk_size(rid, req.chunk_size).map_err(over_limit)?;
    let deny = |machine: &str| Err(other_machine(peer, "ask chunk hashes of", rid, machine));
    if let Some(i) = &req.info {
        if i.replication_id != *rid {
            return Err(Status::invalid_argument(format!(
                "chunk hashes for replication {rid:?} carry the info of replication {:?}",
                i.replication_id
            )));
        }
        if i.machine_id != peer.id {
            return deny(&i.machine_id);
        }
        limits::check_disks(rid, &i.machine_id, i.disks.len()).map_err(over_limit)?;
    }
    let known = if ctx.managed {
        Some(assigned_machine(ctx, rid).ok_or_else(|| not_assigned(peer, rid))?)
    } else {
        cached_machine(ctx, rid)
    };
    match known {
        Some(m) if m != peer.id => deny(&m),
        Some(_) => Ok(()),
        None if req.info.is_some() => Ok(()),
        None => Err(Status::failed_precondition(format!(
            "replication {rid:?} is unknown to this process server: send its info with the request, or say hello on the ingest stream first"
        ))),
    }
}
