//! The steps a lifecycle job is made of, as the job engine stores them
//! (JSON), and their names as `rebound jobs` shows them. What each step
//! does is in `steps.rs` and the files of the jobs it belongs to.

use crate::jobs::NewStep;
use serde::{Deserialize, Serialize};

/// One step of a lifecycle job (the job engine stores it as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    Check,
    CreateReplication {
        machine: String,
    },
    WaitAgent {
        machine: String,
    },
    AddToPs {
        machine: String,
    },
    PrepareMt {
        machine: String,
    },
    SetRetention {
        machine: String,
    },
    StartAgent {
        machine: String,
    },
    StopAgent {
        machine: String,
    },
    MarkUnprotected {
        machine: String,
    },
    WaitFirstPoint {
        machine: String,
    },
    BeginFailover,
    Fence {
        machine: String,
    },
    Drain {
        machine: String,
    },
    CatchUp {
        machine: String,
    },
    ChoosePoints,
    Hook {
        name: String,
        label: String,
    },
    Rollback {
        machine: String,
    },
    HandOver {
        machine: String,
    },
    RestorePreImages {
        machine: String,
    },
    EndReplication {
        machine: String,
    },
    RemoveFromPs {
        machine: String,
    },
    RetireSource {
        machine: String,
    },
    PowerOff {
        machine: String,
    },
    StartTestFailover {
        machine: String,
    },
    EndTestFailover {
        machine: String,
    },
    Verify {
        machine: String,
    },
    SetReplicationPs {
        machine: String,
        ps: String,
        /// The move is over: the MT accepts only `ps` from now on.
        #[serde(default)]
        done: bool,
    },
    AddToNewPs {
        machine: String,
        ps: String,
    },
    SwitchAgent {
        machine: String,
        ps: String,
    },
    WaitMoved {
        machine: String,
        ps: String,
    },
    RecordPs {
        machine: String,
        ps: String,
    },
}

impl Step {
    /// The step's name as `rebound jobs` shows it.
    pub fn name(&self) -> String {
        match self {
            Step::Check => "check".into(),
            Step::CreateReplication { machine } => format!("create replication for {machine}"),
            Step::WaitAgent { machine } => format!("wait for agent on {machine} to register"),
            Step::AddToPs { machine } => format!("add {machine} to its process server"),
            Step::PrepareMt { machine } => {
                format!("prepare {machine}'s replica at the master target")
            }
            Step::SetRetention { machine } => {
                format!("set {machine}'s retention at the master target")
            }
            Step::StartAgent { machine } => format!("start replication on {machine}'s agent"),
            Step::StopAgent { machine } => format!("stop replication on {machine}'s agent"),
            Step::MarkUnprotected { machine } => format!("mark {machine} unprotected"),
            Step::WaitFirstPoint { machine } => format!("initial sync of {machine}"),
            Step::BeginFailover => "begin failover".into(),
            Step::Fence { machine } => format!("fence {machine} at the source"),
            Step::Drain { machine } => format!("drain {machine}"),
            Step::CatchUp { machine } => format!("apply everything pending for {machine}"),
            Step::ChoosePoints => "choose recovery points".into(),
            Step::Hook { label, .. } => format!("run {label}"),
            Step::Rollback { machine } => format!("roll {machine} back to its recovery point"),
            Step::HandOver { machine } => format!("hand {machine} over (power on)"),
            Step::RestorePreImages { machine } => format!("undo {machine}'s rollback"),
            Step::EndReplication { machine } => {
                format!("end {machine}'s replication at the master target")
            }
            Step::RemoveFromPs { machine } => format!("remove {machine} from its process server"),
            Step::RetireSource { machine } => format!("retire {machine}'s source copy"),
            Step::PowerOff { machine } => {
                format!("power {machine} off and undo what it wrote")
            }
            Step::StartTestFailover { machine } => format!("start {machine}'s test copy"),
            Step::EndTestFailover { machine } => format!("discard {machine}'s test copy"),
            Step::Verify { machine } => format!("verify {machine}'s replica against its source"),
            Step::SetReplicationPs {
                machine,
                ps,
                done: false,
            } => format!("let the master target accept {machine}'s stream from {ps}"),
            Step::SetReplicationPs { machine, ps, .. } => {
                format!("let the master target accept {machine}'s stream only from {ps}")
            }
            Step::AddToNewPs { machine, ps } => format!("add {machine} to process server {ps}"),
            Step::SwitchAgent { machine, ps } => {
                format!("switch {machine}'s agent to process server {ps}")
            }
            Step::WaitMoved { machine, ps } => {
                format!("wait until {ps} carries {machine} and the old PS is drained")
            }
            Step::RecordPs { machine, ps } => format!("record {ps} as {machine}'s process server"),
        }
    }

    pub(super) fn new_step(&self) -> NewStep {
        NewStep {
            name: self.name(),
            // Serializing our own enum cannot fail.
            action: serde_json::to_string(self).unwrap_or_default(),
        }
    }
}
