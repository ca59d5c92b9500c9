//! What the CS knows of its fleet at one moment, read from the store in a
//! few queries: machines with their current replication, and the status
//! each online component last reported, decoded once. The alert readings
//! and the metric snapshot are both computed from it.
//!
//! A component is online when it holds a control stream to this CS process
//! (the bus), as `rebound components` says: the health column in the store
//! is not reset when a CS crashes, so a component that never reconnects
//! would otherwise stay online, and its last status be read as live.

use crate::bus::Bus;
use crate::store::{Component, Health, Machine, ReplState, Replication, Store, StoreError};
use prost::Message;
use rebound_common::pki::Role;
use rebound_proto::control as pb;
use std::collections::HashMap;

/// The fleet as the store has it now.
#[derive(Debug, Default)]
pub struct View {
    pub machines: Vec<Machine>,
    /// Each machine's current (latest) replication.
    pub current: HashMap<String, Replication>,
    /// Agents, PSs and MTs that are not revoked, with their health as the
    /// bus has it now.
    pub components: Vec<Component>,
    agents: HashMap<String, pb::AgentStatus>,
    pss: HashMap<String, pb::PsStatus>,
    mts: HashMap<String, pb::MtStatus>,
}

impl View {
    pub async fn load(store: &dyn Store, bus: &dyn Bus) -> Result<View, StoreError> {
        let machines = store.list_machines().await?;
        let mut current = HashMap::new();
        for r in store.current_replications().await? {
            current.insert(r.machine.clone(), r);
        }
        let components: Vec<Component> = store
            .list_components()
            .await?
            .into_iter()
            .filter(|c| !c.revoked && matches!(c.role, Role::Agent | Role::Ps | Role::Mt))
            .map(|mut c| {
                c.health = crate::fleet::components::health(bus, &c);
                c
            })
            .collect();
        let mut view = View {
            machines,
            current,
            ..View::default()
        };
        for c in &components {
            // A status an offline component sent is stale: not read.
            if c.health != Health::Online || c.status.is_empty() {
                continue;
            }
            let Ok(s) = pb::Status::decode(c.status.as_slice()) else {
                continue;
            };
            match s.status {
                Some(pb::status::Status::Agent(a)) => {
                    view.agents.insert(c.id.clone(), a);
                }
                Some(pb::status::Status::Ps(p)) => {
                    view.pss.insert(c.id.clone(), p);
                }
                Some(pb::status::Status::Mt(m)) => {
                    view.mts.insert(c.id.clone(), m);
                }
                _ => {}
            }
        }
        view.components = components;
        Ok(view)
    }

    /// The replication state of `machine` (Unprotected without one).
    pub fn state(&self, machine: &str) -> ReplState {
        self.current
            .get(machine)
            .map_or(ReplState::Unprotected, |r| r.state)
    }

    /// The RPO of a protected machine in ms: the age of its oldest write
    /// not yet applied at the MT, the larger of what its agent reports (not
    /// yet at the PS) and what its PS reports (not yet at the MT). `None`
    /// when it is not protected or neither reports it now.
    pub fn rpo_ms(&self, machine: &str) -> Option<u64> {
        let r = self.current.get(machine)?;
        if r.state != ReplState::Protected {
            return None;
        }
        let agent = self
            .agents
            .get(machine)
            .filter(|a| a.replication_id.is_empty() || a.replication_id == r.id)
            .map(|a| a.rpo_ms);
        let ps = self.pss.get(&r.ps).and_then(|p| {
            p.replications
                .iter()
                .find(|l| l.replication_id == r.id)
                .map(|l| l.lag_ms)
        });
        agent.into_iter().chain(ps).max()
    }

    pub fn agent(&self, id: &str) -> Option<&pb::AgentStatus> {
        self.agents.get(id)
    }

    pub fn ps(&self, id: &str) -> Option<&pb::PsStatus> {
        self.pss.get(id)
    }

    pub fn mt(&self, id: &str) -> Option<&pb::MtStatus> {
        self.mts.get(id)
    }

    /// The site a component runs at, as it said when it connected.
    pub fn site_of(&self, role: Role, id: &str) -> String {
        self.components
            .iter()
            .find(|c| c.role == role && c.id == id)
            .map(|c| c.site.clone())
            .unwrap_or_default()
    }
}
