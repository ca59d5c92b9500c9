//! `--output json` documents (field names as in control.proto).

use rebound_proto::control as pb;
use serde_json::{json, Value};

pub fn print(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// A listing as one document: `{"<key>": [one(item), ...]}`.
pub fn list<T>(key: &str, items: &[T], one: fn(&T) -> Value) -> Value {
    let items = items.iter().map(one).collect();
    Value::Object(serde_json::Map::from_iter([(
        key.to_string(),
        Value::Array(items),
    )]))
}

pub fn point(p: &pb::Point) -> Value {
    json!({"id": p.id, "kind": p.kind, "time_ms": p.time_ms, "seq": p.seq, "group": p.group,
           "damaged": p.damaged})
}

fn opt_point(p: &Option<pb::Point>) -> Value {
    p.as_ref().map(point).unwrap_or(Value::Null)
}

fn disk(d: &pb::Disk) -> Value {
    json!({"index": d.index, "name": d.name, "size": d.size, "path": d.path})
}

pub fn status_detail(s: &Option<pb::Status>) -> Value {
    match s.as_ref().and_then(|s| s.status.as_ref()) {
        Some(pb::status::Status::Agent(a)) => json!({"agent": {
            "mode": a.mode, "buffer_bytes": a.buffer_bytes, "buffer_limit": a.buffer_limit,
            "rpo_ms": a.rpo_ms, "seq": a.seq, "durable_seq": a.durable_seq,
            "dirty_extents": a.dirty_extents, "last_tag": a.last_tag, "fenced": a.fenced,
            "replication_id": a.replication_id, "resync_bytes_sent": a.resync_bytes_sent,
            "resync_bytes_total": a.resync_bytes_total,
        }}),
        Some(pb::status::Status::Ps(p)) => json!({"ps": {
            "cache_bytes": p.cache_bytes, "cache_limit": p.cache_limit,
            "throughput_bytes_per_sec": p.throughput_bytes_per_sec,
            "replications": p.replications.iter().map(|r| json!({
                "replication_id": r.replication_id, "durable_seq": r.durable_seq,
                "applied_seq": r.applied_seq, "cache_bytes": r.cache_bytes, "lag_ms": r.lag_ms,
            })).collect::<Vec<_>>(),
        }}),
        Some(pb::status::Status::Mt(m)) => json!({"mt": {
            "retention_bytes": m.retention_bytes,
            "replications": m.replications.iter().map(|r| json!({
                "replication_id": r.replication_id, "machine_id": r.machine_id,
                "state": r.state, "points": r.points.as_ref().map(summary),
                "retention_window_secs": r.retention_window_secs,
                "retention_max_bytes": r.retention_max_bytes,
            })).collect::<Vec<_>>(),
        }}),
        None => Value::Null,
    }
}

fn summary(s: &pb::PointSummary) -> Value {
    json!({
        "applied_seq": s.applied_seq, "count": s.count, "oldest": opt_point(&s.oldest),
        "latest": opt_point(&s.latest), "latest_app": opt_point(&s.latest_app),
        "rolled_back_to": s.rolled_back_to,
        "group_points": s.group_points.iter().map(point).collect::<Vec<_>>(),
    })
}

pub fn event(e: &pb::Event) -> Value {
    json!({"severity": e.severity, "kind": e.kind, "message": e.message,
           "replication_id": e.replication_id, "time_ms": e.time_ms, "component": e.component})
}

/// An alert as `rebound alerts -o json` lists it and the CS's webhooks
/// post it under `"alert"`.
pub fn alert(a: &pb::Alert) -> Value {
    json!({
        "id": a.id, "kind": a.kind, "subject": a.subject, "severity": a.severity,
        "message": a.message, "raised_ms": a.raised_ms, "cleared_ms": a.cleared_ms,
        "value": a.value, "threshold": a.threshold, "site": a.site,
    })
}

pub fn component(c: &pb::ComponentInfo) -> Value {
    json!({
        "role": c.role, "id": c.id, "site": c.site, "version": c.version,
        "addresses": c.addresses, "health": c.health,
        "last_heartbeat_ms": c.last_heartbeat_ms, "cert_fingerprint": c.cert_fingerprint,
        "cert_expiry_ms": c.cert_expiry_ms, "version_mismatch": c.version_mismatch,
        "status": status_detail(&c.status),
    })
}

pub fn components(r: &pb::ComponentsResponse) -> Value {
    json!({
        "cs_version": r.cs_version,
        "components": r.components.iter().map(component).collect::<Vec<_>>(),
    })
}

pub fn policy(p: &pb::Policy) -> Value {
    json!({
        "crash_interval_ms": p.crash_interval_ms, "app_interval_secs": p.app_interval_secs,
        "freeze_timeout_ms": p.freeze_timeout_ms,
        "retention_window_secs": p.retention_window_secs,
        "retention_max_bytes": p.retention_max_bytes, "rpo_alert_ms": p.rpo_alert_ms,
        "verify_interval_secs": p.verify_interval_secs,
    })
}

pub fn verify_result(v: &pb::VerifyResult) -> Value {
    json!({
        "time_ms": v.time_ms, "point_id": v.point_id, "chunks_compared": v.chunks_compared,
        "differing": v.differing, "repaired": v.repaired, "error": v.error, "job_id": v.job_id,
        "chunk_size": v.chunk_size,
        "differing_chunks": v.differing_chunks.iter()
            .map(|c| json!({"disk": c.disk, "offset": c.offset})).collect::<Vec<_>>(),
    })
}

pub fn policy_set(r: &pb::SetPolicyResponse) -> Value {
    json!({
        "policy": r.policy.as_ref().map(policy).unwrap_or(Value::Null),
        "pending": r.pending,
    })
}

pub fn status(r: &pb::StatusResponse) -> Value {
    json!({
        "cs_version": r.cs_version,
        "sites": r.sites,
        "machines": r.machines,
        "protected_machines": r.protected_machines,
        "running_jobs": r.running_jobs,
        "components": r.components.iter().map(component).collect::<Vec<_>>(),
        "events": r.events.iter().map(event).collect::<Vec<_>>(),
    })
}

pub fn machine(m: &pb::MachineInfo) -> Value {
    json!({
        "id": m.id, "site": m.site, "state": m.state, "replication_id": m.replication_id,
        "from_site": m.from_site, "to_site": m.to_site, "ps": m.ps, "mt": m.mt,
        "disks": m.disks.iter().map(disk).collect::<Vec<_>>(),
        "agent_health": m.agent_health, "agent_mode": m.agent_mode, "rpo_ms": m.rpo_ms,
        "buffer_bytes": m.buffer_bytes, "buffer_limit": m.buffer_limit,
        "last_point": opt_point(&m.last_point), "last_app_point": opt_point(&m.last_app_point),
        "point_count": m.point_count, "group": m.group,
        "failover_point": opt_point(&m.failover_point), "job_id": m.job_id,
        "policy": m.policy.as_ref().map(policy).unwrap_or(Value::Null),
        "test_point": m.test_point, "test_exports": m.test_exports,
        "last_verify": m.last_verify.as_ref().map(verify_result).unwrap_or(Value::Null),
    })
}

pub fn machines(r: &pb::MachinesResponse) -> Value {
    json!({"machines": r.machines.iter().map(machine).collect::<Vec<_>>()})
}

pub fn points(r: &pb::PointsResponse) -> Value {
    json!({
        "machine": r.machine, "replication_id": r.replication_id,
        "points": r.points.iter().map(point).collect::<Vec<_>>(),
        "applied_seq": r.applied_seq, "rolled_back_to": r.rolled_back_to,
    })
}

pub fn job(j: &pb::Job) -> Value {
    json!({
        "id": j.id, "kind": j.kind, "machines": j.machines, "plan": j.plan, "state": j.state,
        "progress": j.progress, "status": j.status, "error": j.error, "warnings": j.warnings,
        "created_ms": j.created_ms, "started_ms": j.started_ms, "ended_ms": j.ended_ms,
        "steps": j.steps.iter().map(|s| json!({
            "index": s.index, "name": s.name, "state": s.state, "detail": s.detail,
            "error": s.error, "started_ms": s.started_ms, "ended_ms": s.ended_ms,
        })).collect::<Vec<_>>(),
    })
}

pub fn plan(p: &pb::Plan) -> Value {
    json!({
        "name": p.name, "consistency_group": p.consistency_group,
        "groups": p.groups.iter().map(|g| json!({
            "machines": g.machines, "pre_hook": g.pre_hook, "post_hook": g.post_hook,
        })).collect::<Vec<_>>(),
    })
}

pub fn group(g: &pb::Group) -> Value {
    json!({"name": g.name, "machines": g.machines, "hold_ms": g.hold_ms,
           "interval_secs": g.interval_secs, "app": g.app})
}
