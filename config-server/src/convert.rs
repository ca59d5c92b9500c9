//! Conversions between the control-plane protobuf messages and the store's
//! records, in one place so the services and the lifecycle agree on them.

use crate::lifecycle::PointSpec;
use crate::store::{Disk, Group, Job, Plan, PlanGroup, Point, PointSummary, Policy};
use rebound_proto::control as pb;
use rebound_proto::control::point_choice::Choice;

pub fn disk_from_proto(d: &pb::Disk) -> Disk {
    Disk {
        index: d.index,
        name: d.name.clone(),
        size: d.size,
        path: d.path.clone(),
    }
}

pub fn disk_to_proto(d: &Disk) -> pb::Disk {
    pb::Disk {
        index: d.index,
        name: d.name.clone(),
        size: d.size,
        path: d.path.clone(),
    }
}

pub fn point_from_proto(p: &pb::Point) -> Point {
    Point {
        id: p.id.clone(),
        kind: p.kind.clone(),
        time_ms: p.time_ms,
        seq: p.seq,
        group: p.group.clone(),
    }
}

pub fn point_to_proto(p: &Point) -> pb::Point {
    pb::Point {
        id: p.id.clone(),
        kind: p.kind.clone(),
        time_ms: p.time_ms,
        seq: p.seq,
        group: p.group.clone(),
        damaged: String::new(),
    }
}

pub fn summary_from_proto(s: Option<&pb::PointSummary>) -> PointSummary {
    let Some(s) = s else {
        return PointSummary::default();
    };
    PointSummary {
        applied_seq: s.applied_seq,
        count: s.count,
        oldest: s.oldest.as_ref().map(point_from_proto),
        latest: s.latest.as_ref().map(point_from_proto),
        latest_app: s.latest_app.as_ref().map(point_from_proto),
        rolled_back_to: s.rolled_back_to.clone(),
        group_points: s.group_points.iter().map(point_from_proto).collect(),
        reported_ms: 0,
        mt: String::new(),
    }
}

/// Zero fields take the default.
pub fn policy_from_proto(p: Option<&pb::Policy>) -> Policy {
    match p {
        Some(p) => policy_merge(Policy::default(), p),
        None => Policy::default(),
    }
}

/// `base` with every field `p` sets (non-zero) replaced: what
/// `rebound policy set` does to a machine's policy.
pub fn policy_merge(base: Policy, p: &pb::Policy) -> Policy {
    base.overlay(&policy_verbatim(p))
}

/// A policy of type `$to` with every field of `$p` (the store's and the
/// wire's policies have the same fields).
macro_rules! policy_fields {
    ($($to:ident)::+, $p:expr) => {
        $($to)::+ {
            crash_interval_ms: $p.crash_interval_ms,
            app_interval_secs: $p.app_interval_secs,
            freeze_timeout_ms: $p.freeze_timeout_ms,
            retention_window_secs: $p.retention_window_secs,
            retention_max_bytes: $p.retention_max_bytes,
            rpo_alert_ms: $p.rpo_alert_ms,
            verify_interval_secs: $p.verify_interval_secs,
        }
    };
}

/// The fields as sent, 0 kept as "not given" (for a later overlay).
pub fn policy_verbatim(p: &pb::Policy) -> Policy {
    policy_fields!(Policy, p)
}

pub fn policy_to_proto(p: &Policy) -> pb::Policy {
    policy_fields!(pb::Policy, p)
}

/// A point choice that names no point.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("empty point id: name a point (`rebound points M` lists them) or use latest")]
pub struct EmptyPointId;

/// A missing choice means `latest`.
pub fn point_spec_from_proto(c: Option<&pb::PointChoice>) -> Result<PointSpec, EmptyPointId> {
    Ok(match c.and_then(|c| c.choice.as_ref()) {
        None | Some(Choice::Latest(_)) => PointSpec::Latest,
        Some(Choice::LatestProcessed(_)) => PointSpec::LatestProcessed,
        Some(Choice::LatestApp(_)) => PointSpec::LatestApp,
        Some(Choice::LatestMulti(_)) => PointSpec::LatestMulti,
        Some(Choice::LatestMultiApp(_)) => PointSpec::LatestMultiApp,
        Some(Choice::Id(id)) if id.is_empty() => return Err(EmptyPointId),
        Some(Choice::Id(id)) => PointSpec::Id(id.clone()),
        Some(Choice::AtOrBeforeMs(ms)) => PointSpec::AtOrBefore(*ms),
        Some(Choice::GroupTag(t)) => PointSpec::GroupTag(t.clone()),
    })
}

pub fn point_spec_to_proto(p: &PointSpec) -> pb::PointChoice {
    let e = pb::Empty {};
    pb::PointChoice {
        choice: Some(match p {
            PointSpec::Latest => Choice::Latest(e),
            PointSpec::LatestProcessed => Choice::LatestProcessed(e),
            PointSpec::LatestApp => Choice::LatestApp(e),
            PointSpec::LatestMulti => Choice::LatestMulti(e),
            PointSpec::LatestMultiApp => Choice::LatestMultiApp(e),
            PointSpec::Id(id) => Choice::Id(id.clone()),
            PointSpec::AtOrBefore(ms) => Choice::AtOrBeforeMs(*ms),
            PointSpec::GroupTag(t) => Choice::GroupTag(t.clone()),
        }),
    }
}

pub fn job_to_proto(j: &Job) -> pb::Job {
    pb::Job {
        id: j.id.clone(),
        kind: j.kind.clone(),
        machines: j.machines.clone(),
        plan: j.plan.clone(),
        state: j.state.as_str().into(),
        progress: j.progress,
        status: j.status.clone(),
        error: j.error.clone(),
        warnings: j.warnings.clone(),
        created_ms: j.created_ms,
        started_ms: j.started_ms,
        ended_ms: j.ended_ms,
        steps: j
            .steps
            .iter()
            .map(|s| pb::JobStep {
                index: s.index,
                name: s.name.clone(),
                state: s.state.as_str().into(),
                detail: s.detail.clone(),
                error: s.error.clone(),
                started_ms: s.started_ms,
                ended_ms: s.ended_ms,
            })
            .collect(),
    }
}

pub fn plan_from_proto(p: &pb::Plan) -> Plan {
    Plan {
        name: p.name.clone(),
        groups: p
            .groups
            .iter()
            .map(|g| PlanGroup {
                machines: g.machines.clone(),
                pre_hook: g.pre_hook.clone(),
                post_hook: g.post_hook.clone(),
            })
            .collect(),
        consistency_group: p.consistency_group.clone(),
    }
}

pub fn plan_to_proto(p: &Plan) -> pb::Plan {
    pb::Plan {
        name: p.name.clone(),
        groups: p
            .groups
            .iter()
            .map(|g| pb::PlanGroup {
                machines: g.machines.clone(),
                pre_hook: g.pre_hook.clone(),
                post_hook: g.post_hook.clone(),
            })
            .collect(),
        consistency_group: p.consistency_group.clone(),
    }
}

pub fn group_from_proto(g: &pb::Group) -> Group {
    Group {
        name: g.name.clone(),
        machines: g.machines.clone(),
        hold_ms: if g.hold_ms == 0 {
            crate::lifecycle::group::DEFAULT_HOLD_MS
        } else {
            g.hold_ms
        },
        interval_secs: g.interval_secs,
        app: g.app,
    }
}

pub fn group_to_proto(g: &Group) -> pb::Group {
    pb::Group {
        name: g.name.clone(),
        machines: g.machines.clone(),
        hold_ms: g.hold_ms,
        interval_secs: g.interval_secs,
        app: g.app,
    }
}

pub fn alert_to_proto(a: &crate::alerts::evaluate::Alert) -> pb::Alert {
    pb::Alert {
        id: a.id.clone(),
        kind: a.kind.clone(),
        subject: a.subject.clone(),
        severity: a.severity.clone(),
        message: a.message.clone(),
        raised_ms: a.raised_ms,
        cleared_ms: a.cleared_ms,
        value: a.value,
        threshold: a.threshold,
        site: a.site.clone(),
    }
}
