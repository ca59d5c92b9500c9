//! Every machine as `rebound machines` shows it: its replication, agent
//! health and status, recovery points, running job, test failover and last
//! verify.
//!
//! The listing reads each table once for the whole fleet (replications,
//! components, active jobs) and decodes each MT's status once, instead of
//! asking the store per machine: with a thousand machines a per-machine
//! read of each would be thousands of queries per call, and the active-job
//! lookup per machine scans the job table each time.

use crate::bus::{Bus, ComponentKey};
use crate::convert;
use crate::error::CsError;
use crate::lifecycle;
use crate::store::records::{self, Record, VerifyRecord};
use crate::store::{Component, JobFilter, Machine, ReplState, Replication, Store};
use prost::Message;
use rebound_common::pki::Role;
use rebound_proto::control as pb;
use std::collections::HashMap;

/// What the listing reads once for all machines.
struct Fleet {
    /// The current replication of each machine, by machine.
    replications: HashMap<String, Replication>,
    /// Agents by machine id.
    agents: HashMap<String, Component>,
    /// The newest active job of each machine it runs on.
    jobs: HashMap<String, String>,
    /// What each MT last reported per replication, by replication id.
    mt_replications: HashMap<(String, String), pb::MtReplicationStatus>,
}

impl Fleet {
    async fn read(store: &dyn Store) -> Result<Fleet, CsError> {
        let replications = store
            .current_replications()
            .await?
            .into_iter()
            .map(|r| (r.machine.clone(), r))
            .collect();
        let mut agents = HashMap::new();
        let mut mt_replications = HashMap::new();
        for c in store.list_components().await? {
            match c.role {
                Role::Agent => {
                    agents.insert(c.id.clone(), c);
                }
                Role::Mt => {
                    let Ok(pb::Status {
                        status: Some(pb::status::Status::Mt(st)),
                    }) = pb::Status::decode(c.status.as_slice())
                    else {
                        continue;
                    };
                    for r in st.replications {
                        mt_replications.insert((c.id.clone(), r.replication_id.clone()), r);
                    }
                }
                _ => {}
            }
        }
        // Newest first: the first job seen for a machine is its newest.
        let mut jobs = HashMap::new();
        for j in store.list_job_heads(&JobFilter::all_active()).await? {
            for m in &j.machines {
                jobs.entry(m.clone()).or_insert_with(|| j.id.clone());
            }
        }
        Ok(Fleet {
            replications,
            agents,
            jobs,
            mt_replications,
        })
    }
}

/// Every machine the CS knows, in the store's order.
pub async fn list(store: &dyn Store, bus: &dyn Bus) -> Result<Vec<pb::MachineInfo>, CsError> {
    let fleet = Fleet::read(store).await?;
    let mut out = Vec::new();
    for m in store.list_machines().await? {
        out.push(info(store, bus, &fleet, &m).await?);
    }
    Ok(out)
}

/// How many of `machines` are Protected, by their current replications
/// (read once, not per machine).
pub fn protected_count(machines: &[Machine], current: &[Replication]) -> u32 {
    let protected: std::collections::HashSet<&str> = current
        .iter()
        .filter(|r| r.state == ReplState::Protected)
        .map(|r| r.machine.as_str())
        .collect();
    machines
        .iter()
        .filter(|m| protected.contains(m.id.as_str()))
        .count() as u32
}

async fn info(
    store: &dyn Store,
    bus: &dyn Bus,
    fleet: &Fleet,
    m: &Machine,
) -> Result<pb::MachineInfo, CsError> {
    // An unprotected machine shows no replication (its ended one stays in
    // the store for the record).
    let r = fleet
        .replications
        .get(&m.id)
        .filter(|r| r.state != ReplState::Unprotected);
    let summary = match r {
        Some(r) => store.get_point_summary(&r.id).await?,
        None => None,
    };
    let agent = fleet.agents.get(&m.id);
    let connected = bus.connection(&ComponentKey::agent(&m.id)).is_some();
    let status = agent
        .and_then(|a| pb::Status::decode(a.status.as_slice()).ok())
        .and_then(|s| match s.status {
            Some(pb::status::Status::Agent(a)) => Some(a),
            _ => None,
        })
        .unwrap_or_default();
    let test = r
        .and_then(|r| fleet.mt_replications.get(&(r.mt.clone(), r.id.clone())))
        .cloned()
        .unwrap_or_default();
    let last_verify: Option<VerifyRecord> = records::get(store, Record::LastVerify, &m.id).await?;
    let health = match (agent, connected) {
        (_, true) => "online",
        (Some(_), false) => "offline",
        (None, false) => "unknown",
    };
    Ok(pb::MachineInfo {
        id: m.id.clone(),
        site: m.site.clone(),
        state: r
            .map(|r| r.state)
            .unwrap_or(ReplState::Unprotected)
            .as_str()
            .into(),
        replication_id: r.map(|r| r.id.clone()).unwrap_or_default(),
        from_site: r.map(|r| r.from_site.clone()).unwrap_or_default(),
        to_site: r.map(|r| r.to_site.clone()).unwrap_or_default(),
        ps: r.map(|r| r.ps.clone()).unwrap_or_default(),
        mt: r.map(|r| r.mt.clone()).unwrap_or_default(),
        disks: m.disks.iter().map(convert::disk_to_proto).collect(),
        agent_health: health.into(),
        agent_mode: status.mode.clone(),
        rpo_ms: status.rpo_ms,
        buffer_bytes: status.buffer_bytes,
        buffer_limit: status.buffer_limit,
        last_point: summary
            .as_ref()
            .and_then(|s| s.latest.as_ref())
            .map(convert::point_to_proto),
        last_app_point: summary
            .as_ref()
            .and_then(|s| s.latest_app.as_ref())
            .map(convert::point_to_proto),
        point_count: summary.as_ref().map(|s| s.count).unwrap_or(0),
        group: m.group.clone(),
        failover_point: r
            .and_then(|r| r.failover_point.as_ref())
            .map(convert::point_to_proto),
        job_id: fleet.jobs.get(&m.id).cloned().unwrap_or_default(),
        policy: Some(convert::policy_to_proto(&m.policy)),
        test_point: test.test_point,
        test_exports: test.test_exports,
        last_verify: last_verify.as_ref().map(lifecycle::verify::verify_to_proto),
    })
}
