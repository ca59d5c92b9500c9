//! The lifecycle's requests as a job stores them ([`JobSpec`], so a resumed
//! job knows what it was asked), and the recovery point a failover or
//! change-point names ([`PointSpec`], DESIGN.md §8 `--point`).

use crate::store::Policy;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Which recovery point (DESIGN.md §8 `--point`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointSpec {
    Latest,
    LatestProcessed,
    LatestApp,
    LatestMulti,
    LatestMultiApp,
    Id(String),
    AtOrBefore(u64),
    GroupTag(String),
}

impl PointSpec {
    pub(crate) fn multi(&self) -> bool {
        matches!(self, PointSpec::LatestMulti | PointSpec::LatestMultiApp)
    }
}

impl fmt::Display for PointSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PointSpec::Latest => f.write_str("latest"),
            PointSpec::LatestProcessed => f.write_str("latest-processed"),
            PointSpec::LatestApp => f.write_str("latest-app"),
            PointSpec::LatestMulti => f.write_str("latest-multi"),
            PointSpec::LatestMultiApp => f.write_str("latest-multi-app"),
            PointSpec::Id(id) => write!(f, "point {id}"),
            PointSpec::AtOrBefore(ms) => write!(f, "the newest point at or before {ms} ms"),
            PointSpec::GroupTag(t) => write!(f, "group point {t}"),
        }
    }
}

/// A lifecycle request, as stored in its job (so a resumed job knows it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum JobSpec {
    Protect {
        machine: String,
        to_site: String,
        ps: String,
        mt: String,
        group: String,
        policy: Policy,
    },
    Failover {
        machines: Vec<String>,
        plan: String,
        from_site: String,
        to_site: String,
        point: PointSpec,
        unplanned: bool,
    },
    ChangePoint {
        machine: String,
        point: PointSpec,
    },
    Commit {
        machines: Vec<String>,
        plan: String,
        keep_source_copy: bool,
    },
    Reprotect {
        machines: Vec<String>,
        plan: String,
        ps: String,
        mt: String,
        wait_agent_secs: u64,
        /// The fields of the new replication's policy that differ from the
        /// reversed one's (0 = keep); `None` keeps it all.
        #[serde(default)]
        policy: Option<Policy>,
    },
    Unprotect {
        machine: String,
        delete_replica: bool,
    },
    TestFailover {
        machines: Vec<String>,
        plan: String,
        point: PointSpec,
    },
    TestFailoverCleanup {
        machines: Vec<String>,
        plan: String,
    },
    Verify {
        machine: String,
        /// The id of the tag the agent cuts (generated when not asked).
        tag: String,
        repair: bool,
    },
    Move {
        machine: String,
        /// The PS that carries the replication from now on.
        ps: String,
    },
}

impl JobSpec {
    /// Every job kind [`JobSpec::kind`] gives (the metrics list each).
    pub const KINDS: [&'static str; 10] = [
        "protect",
        "failover",
        "change-point",
        "commit",
        "reprotect",
        "unprotect",
        "test-failover",
        "test-failover-cleanup",
        "verify",
        "move",
    ];

    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Protect { .. } => "protect",
            JobSpec::Failover { .. } => "failover",
            JobSpec::ChangePoint { .. } => "change-point",
            JobSpec::Commit { .. } => "commit",
            JobSpec::Reprotect { .. } => "reprotect",
            JobSpec::Unprotect { .. } => "unprotect",
            JobSpec::TestFailover { .. } => "test-failover",
            JobSpec::TestFailoverCleanup { .. } => "test-failover-cleanup",
            JobSpec::Verify { .. } => "verify",
            JobSpec::Move { .. } => "move",
        }
    }
    pub fn machines(&self) -> Vec<String> {
        match self {
            JobSpec::Protect { machine, .. }
            | JobSpec::ChangePoint { machine, .. }
            | JobSpec::Unprotect { machine, .. }
            | JobSpec::Verify { machine, .. }
            | JobSpec::Move { machine, .. } => {
                vec![machine.clone()]
            }
            JobSpec::Failover { machines, .. }
            | JobSpec::Commit { machines, .. }
            | JobSpec::Reprotect { machines, .. }
            | JobSpec::TestFailover { machines, .. }
            | JobSpec::TestFailoverCleanup { machines, .. } => machines.clone(),
        }
    }
    /// How long a reprotect waits for the agent, if the request said.
    pub fn wait_agent(&self) -> Option<Duration> {
        match self {
            JobSpec::Reprotect {
                wait_agent_secs, ..
            } => Some(Duration::from_secs(*wait_agent_secs)),
            _ => None,
        }
    }
    /// Whether a commit keeps the source copy, if the request said.
    pub fn keep_source_copy(&self) -> Option<bool> {
        match self {
            JobSpec::Commit {
                keep_source_copy, ..
            } => Some(*keep_source_copy),
            _ => None,
        }
    }
    /// Whether ending the replication at the MT keeps its replica: only
    /// `unprotect --delete-replica` deletes it.
    pub fn keep_replica(&self) -> bool {
        !matches!(
            self,
            JobSpec::Unprotect {
                delete_replica: true,
                ..
            }
        )
    }
    pub fn plan(&self) -> &str {
        match self {
            JobSpec::Failover { plan, .. }
            | JobSpec::Commit { plan, .. }
            | JobSpec::Reprotect { plan, .. }
            | JobSpec::TestFailover { plan, .. }
            | JobSpec::TestFailoverCleanup { plan, .. } => plan,
            _ => "",
        }
    }
}
