//! Multi-machine consistent points: the two-phase barrier of DESIGN.md §8.
//!
//! 1. `GroupPrepare(tag)` to every member agent; each holds new writes (for
//!    at most `hold_ms`) and answers.
//! 2. When all answered within `hold_ms`, `GroupCommit(tag)`: each cuts a
//!    tag whose id and group are the common tag and releases its writes.
//! 3. Otherwise `GroupAbort(tag)` releases the writes and no point is cut.
//!
//! Because every member held its writes while all of them cut the tag, no
//! member's point contains a write that was issued after a write missing
//! from another member's point: the points form one consistent cut.
//! [`scheduler`] runs the barrier every `interval_secs` of each group.

use crate::bus::{Bus, BusError, ComponentKey, Reply};
use crate::error::CsError;
use crate::store::{now_ms, Group, Store};
use futures::future::join_all;
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// The default longest write hold of a barrier.
pub const DEFAULT_HOLD_MS: u32 = 100;

/// How much longer than the write hold an app-consistent prepare may take:
/// the members' freeze hooks run first.
pub const APP_FREEZE_ALLOWANCE: Duration = Duration::from_secs(60);

/// A group point that was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPoint {
    pub tag: String,
    pub members: u32,
    pub warnings: Vec<String>,
}

/// Runs one barrier over the group's members.
pub async fn cut_group_point(
    bus: &dyn Bus,
    group: &Group,
    commit_timeout: Duration,
) -> Result<GroupPoint, CsError> {
    if group.machines.is_empty() {
        return Err(CsError::FailedPrecondition(format!(
            "consistency group {} has no machines",
            group.name
        )));
    }
    let hold_ms = if group.hold_ms == 0 {
        DEFAULT_HOLD_MS
    } else {
        group.hold_ms
    };
    let tag = format!("{}@{}", group.name, now_ms());
    // For "app" the agents run their freeze hook before holding (and thaw
    // at commit or abort), so the prepare may take the freeze as well; each
    // agent bounds its own hold to `hold_ms`.
    let (kind, hold) = if group.app {
        (
            "app",
            Duration::from_millis(hold_ms as u64) + APP_FREEZE_ALLOWANCE,
        )
    } else {
        ("crash", Duration::from_millis(hold_ms as u64))
    };
    let started = Instant::now();
    let answers = to_members(bus, group, hold, || {
        Cmd::GroupPrepare(pb::GroupPrepare {
            group: group.name.clone(),
            tag_id: tag.clone(),
            hold_ms,
            kind: kind.into(),
        })
    })
    .await;
    let failed: Vec<String> = group
        .machines
        .iter()
        .zip(&answers)
        .filter_map(|(m, a)| a.as_ref().err().map(|e| format!("{m}: {e}")))
        .collect();
    if !failed.is_empty() || started.elapsed() > hold {
        to_members(bus, group, commit_timeout, || {
            Cmd::GroupAbort(pb::GroupAbort {
                group: group.name.clone(),
                tag_id: tag.clone(),
            })
        })
        .await;
        let why = if failed.is_empty() {
            format!(
                "the members took longer than the {} ms write hold",
                hold.as_millis()
            )
        } else {
            failed.join("; ")
        };
        return Err(CsError::Unavailable(format!(
            "group point {tag} of consistency group {} aborted, writes released: {why}",
            group.name
        )));
    }
    let results = to_members(bus, group, commit_timeout, || {
        Cmd::GroupCommit(pb::GroupCommit {
            group: group.name.clone(),
            tag_id: tag.clone(),
            kind: kind.into(),
        })
    })
    .await;
    let mut warnings = Vec::new();
    let mut errors = Vec::new();
    for (m, r) in group.machines.iter().zip(results) {
        match r {
            Ok(reply) if !reply.warning.is_empty() => {
                warnings.push(format!("{m}: {}", reply.warning))
            }
            Ok(_) => {}
            Err(e) => errors.push(format!("{m}: {e}")),
        }
    }
    if !errors.is_empty() {
        return Err(CsError::Unavailable(format!(
            "group point {tag} of consistency group {} is incomplete (not every member cut it, so \
             latest-multi will not choose it): {}",
            group.name,
            errors.join("; ")
        )));
    }
    Ok(GroupPoint {
        tag,
        members: group.machines.len() as u32,
        warnings,
    })
}

/// Sends `cmd()` to every member's agent at once: the answers in member
/// order.
async fn to_members(
    bus: &dyn Bus,
    group: &Group,
    timeout: Duration,
    cmd: impl Fn() -> Cmd,
) -> Vec<Result<Reply, BusError>> {
    let sends = group
        .machines
        .iter()
        .map(|m| bus.send(ComponentKey::agent(m), cmd(), timeout));
    join_all(sends).await
}

/// Cuts a group point for every group whose `interval_secs` has passed.
pub async fn scheduler(
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    commit_timeout: Duration,
    stop: watch::Receiver<bool>,
) {
    let mut last: HashMap<String, Instant> = HashMap::new();
    let mut ticker = crate::tick::Ticker::new(Duration::from_secs(1), stop);
    while ticker.tick().await {
        let groups = match store.list_groups().await {
            Ok(g) => g,
            Err(e) => {
                warn!(error = %e, "cannot list consistency groups");
                continue;
            }
        };
        for g in groups {
            if g.interval_secs == 0 || g.machines.is_empty() {
                continue;
            }
            let due = last
                .get(&g.name)
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(g.interval_secs as u64));
            if !due {
                continue;
            }
            last.insert(g.name.clone(), Instant::now());
            // Only when every member is connected; otherwise it would abort.
            if g.machines
                .iter()
                .any(|m| bus.connection(&ComponentKey::agent(m)).is_none())
            {
                continue;
            }
            match cut_group_point(bus.as_ref(), &g, commit_timeout).await {
                Ok(p) => info!(group = %g.name, tag = %p.tag, "group point cut"),
                Err(e) => warn!(group = %g.name, error = %e, "group point not cut"),
            }
        }
    }
}
