//! Tables for people.

use rebound_common::time::now_ms;
use rebound_proto::control as pb;

/// `1.2s`, `3m04s`, `2h05m`.
pub fn dur(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

/// How long ago a time was, "-" for none.
pub fn ago(ms: u64) -> String {
    if ms == 0 {
        "-".into()
    } else {
        format!("{} ago", dur(now_ms().saturating_sub(ms)))
    }
}

pub fn bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", U[i])
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// Prints rows as aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    println!("{}", table_text(header, rows));
}

/// Columns two spaces apart, flush left, as `ps` and `kubectl` print them.
/// A listing: one table row per item, or the `none` line when there are no
/// items.
fn listing<T>(items: &[T], none: &str, header: &[&str], row: impl Fn(&T) -> Vec<String>) {
    if items.is_empty() {
        println!("{none}");
        return;
    }
    table_of(header, items, row);
}

/// A table of one row per item.
fn table_of<T>(header: &[&str], items: &[T], row: impl Fn(&T) -> Vec<String>) {
    let rows: Vec<Vec<String>> = items.iter().map(row).collect();
    table(header, &rows);
}

fn table_text(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_header(header.to_vec())
        .add_rows(rows.iter().cloned());
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    let lines: Vec<String> = t.lines().map(|l| l.trim_end().to_string()).collect();
    lines.join("\n")
}

fn point_short(p: &Option<pb::Point>) -> String {
    match p {
        Some(p) if !p.id.is_empty() => format!("{} ({}, {})", p.id, p.kind, ago(p.time_ms)),
        _ => "-".into(),
    }
}

fn component_detail(c: &pb::ComponentInfo) -> String {
    match c.status.as_ref().and_then(|s| s.status.as_ref()) {
        Some(pb::status::Status::Agent(a)) => {
            let mut s = format!(
                "{} buffer {}/{} RPO {}",
                or_dash(&a.mode),
                bytes(a.buffer_bytes),
                bytes(a.buffer_limit),
                dur(a.rpo_ms)
            );
            if a.fenced {
                s.push_str(" fenced");
            }
            if a.resync_bytes_total > 0 {
                s.push_str(&format!(
                    " resync {}/{}",
                    bytes(a.resync_bytes_sent),
                    bytes(a.resync_bytes_total)
                ));
            }
            s
        }
        Some(pb::status::Status::Ps(p)) => format!(
            "cache {}/{} {}/s, {} replications",
            bytes(p.cache_bytes),
            bytes(p.cache_limit),
            bytes(p.throughput_bytes_per_sec),
            p.replications.len()
        ),
        Some(pb::status::Status::Mt(m)) => format!(
            "{} replications, retention {}",
            m.replications.len(),
            bytes(m.retention_bytes)
        ),
        None => String::new(),
    }
}

pub fn status(r: &pb::StatusResponse) {
    println!(
        "configuration server {}: {} sites ({}), {} machines ({} protected), {} running jobs",
        r.cs_version,
        r.sites.len(),
        r.sites.join(", "),
        r.machines,
        r.protected_machines,
        r.running_jobs
    );
    println!();
    let none = NO_COMPONENTS;
    let header = ["ROLE", "ID", "SITE", "HEALTH", "HEARTBEAT", "DETAIL"];
    listing(&r.components, none, &header, |c| {
        vec![
            c.role.clone(),
            c.id.clone(),
            or_dash(&c.site).into(),
            c.health.clone(),
            ago(c.last_heartbeat_ms),
            component_detail(c),
        ]
    });
    if !r.events.is_empty() {
        println!();
        println!("recent events:");
        for e in &r.events {
            println!(
                "  {} {:7} {} {}: {}",
                ago(e.time_ms),
                e.severity,
                or_dash(&e.component),
                e.kind,
                e.message
            );
        }
    }
}

/// "2027-12-04 (364 days left)", "expired 2026-01-01", "-" when unknown.
pub fn expiry(ms: u64, now: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    let date: String = humantime::format_rfc3339_seconds(t)
        .to_string()
        .chars()
        .take(10)
        .collect();
    if ms <= now {
        return format!("expired {date}");
    }
    let days = (ms - now) / 86_400_000;
    format!("{date} ({days} days left)")
}

/// What `status` and `components` say before anything enrolled.
const NO_COMPONENTS: &str = "no components yet: enroll agents with `rebound-agent enroll --cs \
    ADDR --passphrase-file F`, a PS or MT with a token (`rebound token create --role ps --id \
    ID`, then `rebound-ps enroll --cs ADDR --token-file F`)";

pub fn components(r: &pb::ComponentsResponse) {
    let none = NO_COMPONENTS;
    let header = [
        "ROLE",
        "ID",
        "SITE",
        "ADDRESS",
        "VERSION",
        "CERTIFICATE EXPIRES",
        "HEARTBEAT",
        "HEALTH",
    ];
    let now = now_ms();
    listing(&r.components, none, &header, |c| {
        let version = match (c.version.as_str(), c.version_mismatch.is_empty()) {
            ("", _) => "-".to_string(),
            (v, true) => v.to_string(),
            (v, false) => format!("{v} (CS {})", r.cs_version),
        };
        vec![
            c.role.clone(),
            c.id.clone(),
            or_dash(&c.site).into(),
            or_dash(&c.addresses.join(",")).into(),
            version,
            expiry(c.cert_expiry_ms, now),
            ago(c.last_heartbeat_ms),
            c.health.clone(),
        ]
    });
    for c in r
        .components
        .iter()
        .filter(|c| !c.version_mismatch.is_empty())
    {
        println!("warning: {}", c.version_mismatch);
    }
}

/// "300ms", "MT default" for 0.
fn or_default(v: u64, show: impl Fn(u64) -> String, default: &str) -> String {
    if v == 0 {
        default.into()
    } else {
        show(v)
    }
}

/// What an `rpo_alert_ms` of 0 means.
const RPO_ALERT_DEFAULT: &str = "the CS default ([alerts] rpo_threshold, 60s)";

/// A machine's RPO alert threshold: a duration, the CS default or off.
fn rpo_alert(ms: u64) -> String {
    if ms == super::fleet::RPO_ALERT_OFF_MS {
        "off".into()
    } else {
        or_default(ms, dur, RPO_ALERT_DEFAULT)
    }
}

/// A policy on one line: "crash 300ms, app 1h00m, retention 20.0s / the
/// MT's default, RPO alert the CS default".
pub fn policy_line(p: &pb::Policy) -> String {
    let window = or_default(
        p.retention_window_secs,
        |s| dur(s * 1000),
        "the MT's default",
    );
    let size = or_default(p.retention_max_bytes, bytes, "the MT's default");
    format!(
        "crash {}, app {}, retention {window} / {size}, RPO alert {}, verify {}",
        dur(p.crash_interval_ms.into()),
        dur(u64::from(p.app_interval_secs) * 1000),
        rpo_alert(p.rpo_alert_ms),
        or_default(
            p.verify_interval_secs,
            |s| format!("every {}", dur(s * 1000)),
            "off"
        )
    )
}

pub fn policy_set(machine: &str, r: &pb::SetPolicyResponse) {
    let p = r.policy.unwrap_or_default();
    println!("policy of {machine}:");
    println!("  crash points every  {}", dur(p.crash_interval_ms.into()));
    println!(
        "  app points every    {}",
        dur(u64::from(p.app_interval_secs) * 1000)
    );
    let window = or_default(
        p.retention_window_secs,
        |s| dur(s * 1000),
        "the MT's default",
    );
    println!("  retention window    {window}");
    let size = or_default(p.retention_max_bytes, bytes, "the MT's default");
    println!("  retention size cap  {size}");
    println!("  RPO alert above     {}", rpo_alert(p.rpo_alert_ms));
    println!(
        "  verify every        {}",
        or_default(p.verify_interval_secs, |s| dur(s * 1000), "off")
    );
    if !r.pending.is_empty() {
        println!(
            "not told yet (offline; they get it when they reconnect): {}",
            r.pending.join(", ")
        );
    }
}

/// `rebound alerts`: the open alerts (and with `all` the cleared ones, with
/// when they cleared).
pub fn alerts(alerts: &[pb::Alert], all: bool) {
    match alerts_text(alerts, all, now_ms()) {
        Some(t) => println!("{t}"),
        None if all => println!("no alerts raised recently"),
        None => println!("no open alerts (`rebound alerts --all` adds the cleared ones)"),
    }
}

/// The table of [`alerts`] at time `now` (`None` for no alerts).
fn alerts_text(alerts: &[pb::Alert], all: bool, now: u64) -> Option<String> {
    if alerts.is_empty() {
        return None;
    }
    let age = |ms: u64| format!("{} ago", dur(now.saturating_sub(ms)));
    let mut header = vec!["KIND", "SUBJECT", "SITE", "SINCE"];
    if all {
        header.push("CLEARED");
    }
    header.extend(["VALUE/THRESHOLD", "MESSAGE"]);
    let rows: Vec<Vec<String>> = alerts
        .iter()
        .map(|a| {
            let mut row = vec![
                a.kind.clone(),
                a.subject.clone(),
                or_dash(&a.site).into(),
                age(a.raised_ms),
            ];
            if all {
                row.push(match a.cleared_ms {
                    0 => "open".into(),
                    ms => age(ms),
                });
            }
            row.extend([alert_value(a), a.message.clone()]);
            row
        })
        .collect();
    Some(table_text(&header, &rows))
}

/// "12.3s / 2.0s" for the RPO and retention kinds (seconds), "85% / 80%"
/// for a cache (a fraction), "-" for kinds without a value.
fn alert_value(a: &pb::Alert) -> String {
    // A link error or a shrunk retention is there or not: no level to show.
    if matches!(a.kind.as_str(), "link-error" | "retention-shrunk")
        || (a.value == 0.0 && a.threshold == 0.0)
    {
        return "-".into();
    }
    let secs = |s: f64| dur((s.max(0.0) * 1000.0).round() as u64);
    let pct = |f: f64| format!("{:.0}%", f * 100.0);
    let show: &dyn Fn(f64) -> String = match a.kind.as_str() {
        "ps-cache-full" => &pct,
        _ => &secs,
    };
    format!("{} / {}", show(a.value), show(a.threshold))
}

pub fn machines(r: &pb::MachinesResponse) {
    let none = "no machines yet: a machine appears once its agent is enrolled and connected \
                (`rebound-agent enroll --cs ADDR --passphrase-file F`, then `rebound-agent run`)";
    let header = [
        "MACHINE",
        "SITE",
        "STATE",
        "DIRECTION",
        "RPO",
        "LAST POINT",
        "POINTS",
        "AGENT",
        "GROUP",
        "TEST COPY",
        "VERIFIED",
        "JOB",
    ];
    listing(&r.machines, none, &header, |m| {
        let dir = if m.from_site.is_empty() {
            "-".to_string()
        } else {
            format!("{}→{}", m.from_site, m.to_site)
        };
        let agent = if m.agent_mode.is_empty() {
            m.agent_health.clone()
        } else {
            format!("{} {}", m.agent_health, m.agent_mode)
        };
        let rpo = if m.state == "Protected" || m.state == "InitialSync" {
            dur(m.rpo_ms)
        } else {
            "-".into()
        };
        vec![
            m.id.clone(),
            or_dash(&m.site).into(),
            m.state.clone(),
            dir,
            rpo,
            point_short(&m.last_point),
            m.point_count.to_string(),
            agent,
            or_dash(&m.group).into(),
            or_dash(&m.test_point).into(),
            verify_short(&m.last_verify),
            or_dash(&m.job_id).into(),
        ]
    });
    for m in &r.machines {
        if let Some(p) = m.failover_point.as_ref().filter(|p| !p.id.is_empty()) {
            println!("{} runs from point {} ({})", m.id, p.id, p.kind);
        }
        if !m.test_point.is_empty() {
            println!(
                "{} test copy of point {}: {}",
                m.id,
                m.test_point,
                m.test_exports.join(", ")
            );
        }
        if let Some(v) = m.last_verify.as_ref().filter(|v| v.time_ms != 0) {
            if !v.error.is_empty() || v.differing > 0 {
                println!("{} last verify: {}", m.id, verify_line(v));
            }
        }
        if let Some(p) = &m.policy {
            println!("{} policy: {}", m.id, policy_line(p));
        }
    }
}

/// The last verify in a table cell: "ok", "3 differ", "failed", "-".
fn verify_short(v: &Option<pb::VerifyResult>) -> String {
    match v {
        Some(v) if v.time_ms != 0 => {
            let what = if !v.error.is_empty() {
                "failed".to_string()
            } else if v.differing == 0 {
                "ok".to_string()
            } else if v.repaired {
                format!("{} repaired", v.differing)
            } else {
                format!("{} differ", v.differing)
            };
            format!("{what} {}", ago(v.time_ms))
        }
        _ => "-".into(),
    }
}

/// One verify in a sentence.
fn verify_line(v: &pb::VerifyResult) -> String {
    if !v.error.is_empty() {
        return format!("failed at {}: {}", or_dash(&v.point_id), v.error);
    }
    format!(
        "point {}, {} chunks compared, {} differ{}",
        v.point_id,
        v.chunks_compared,
        v.differing,
        if v.repaired && v.differing > 0 {
            " (repaired: the next point is exact)"
        } else {
            ""
        }
    )
}

/// A verify's report: the point, the chunks compared, and each differing
/// chunk as disk/offset.
pub fn verify_result(machine: &str, v: &pb::VerifyResult) {
    println!("{machine} verify: {}", verify_line(v));
    if v.differing_chunks.is_empty() {
        return;
    }
    let size = bytes(v.chunk_size.into());
    println!("differing chunks ({size} each):");
    let header = ["DISK", "OFFSET"];
    table_of(&header, &v.differing_chunks, |c| {
        vec![c.disk.to_string(), c.offset.to_string()]
    });
    if v.differing > v.differing_chunks.len() as u64 {
        println!(
            "... and {} more (the result lists at most {})",
            v.differing - v.differing_chunks.len() as u64,
            v.differing_chunks.len()
        );
    }
}

pub fn points(r: &pb::PointsResponse) {
    println!(
        "{} (replication {}): {} points, applied seq {}{}",
        r.machine,
        r.replication_id,
        r.points.len(),
        r.applied_seq,
        if r.rolled_back_to.is_empty() {
            String::new()
        } else {
            format!(", rolled back to {}", r.rolled_back_to)
        }
    );
    let header = ["POINT", "KIND", "SEQ", "TIME", "GROUP", "EXACT"];
    table_of(&header, &r.points, |p| {
        vec![
            p.id.clone(),
            p.kind.clone(),
            p.seq.to_string(),
            ago(p.time_ms),
            or_dash(&p.group).into(),
            if p.damaged.is_empty() {
                "yes"
            } else {
                "DAMAGED"
            }
            .into(),
        ]
    });
    for p in r.points.iter().filter(|p| !p.damaged.is_empty()) {
        println!("point {} is damaged: {}", p.id, p.damaged);
    }
}

fn job_took(j: &pb::Job) -> String {
    match (j.started_ms, j.ended_ms) {
        (0, _) => "-".into(),
        (s, 0) => dur(now_ms().saturating_sub(s)),
        (s, e) => dur(e.saturating_sub(s)),
    }
}

pub fn jobs(jobs: &[pb::Job]) {
    let header = [
        "JOB", "KIND", "TARGET", "STATE", "PROGRESS", "TOOK", "STATUS",
    ];
    listing(jobs, "no jobs", &header, |j| {
        let what = if j.plan.is_empty() {
            j.machines.join(",")
        } else {
            format!("plan {}", j.plan)
        };
        let line = if j.error.is_empty() {
            j.status.clone()
        } else {
            j.error.clone()
        };
        vec![
            j.id.clone(),
            j.kind.clone(),
            what,
            j.state.clone(),
            format!("{}%", j.progress),
            job_took(j),
            line,
        ]
    });
}

pub fn job_detail(j: &pb::Job) {
    let what = if j.plan.is_empty() {
        j.machines.join(", ")
    } else {
        format!("plan {} ({})", j.plan, j.machines.join(", "))
    };
    println!(
        "job {} {} {}: {} {}% (took {})",
        j.id,
        j.kind,
        what,
        j.state,
        j.progress,
        job_took(j)
    );
    if !j.status.is_empty() {
        println!("  {}", j.status);
    }
    for s in &j.steps {
        let took = match (s.started_ms, s.ended_ms) {
            (0, _) => String::new(),
            (a, 0) => format!(" ({})", dur(now_ms().saturating_sub(a))),
            (a, b) => format!(" ({})", dur(b.saturating_sub(a))),
        };
        println!("  {:>2}. {:8} {}{}", s.index + 1, s.state, s.name, took);
        if !s.detail.is_empty() {
            println!("        {}", s.detail);
        }
        if !s.error.is_empty() {
            println!("        error: {}", s.error);
        }
    }
    for w in &j.warnings {
        println!("  warning: {w}");
    }
    if !j.error.is_empty() {
        println!("  error: {}", j.error);
    }
}

pub fn plan(p: &pb::Plan) {
    println!(
        "plan {}{}",
        p.name,
        if p.consistency_group.is_empty() {
            String::new()
        } else {
            format!(" (consistency group {})", p.consistency_group)
        }
    );
    for (i, g) in p.groups.iter().enumerate() {
        println!("  step {}: {}", i + 1, g.machines.join(", "));
        if !g.pre_hook.is_empty() {
            println!("    pre-hook:  {}", g.pre_hook);
        }
        if !g.post_hook.is_empty() {
            println!("    post-hook: {}", g.post_hook);
        }
    }
}

pub fn groups(gs: &[pb::Group]) {
    let none = "no consistency groups (create one with `rebound group create`)";
    let header = ["GROUP", "MACHINES", "HOLD", "INTERVAL", "KIND"];
    listing(gs, none, &header, |g| {
        vec![
            g.name.clone(),
            g.machines.join(","),
            format!("{}ms", g.hold_ms),
            if g.interval_secs == 0 {
                "on demand".into()
            } else {
                format!("{}s", g.interval_secs)
            },
            if g.app { "app" } else { "crash" }.into(),
        ]
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn certificate_expiry_shows_the_date_and_days_left() {
        let day = 86_400_000;
        let now = 1_764_806_400_000; // 2025-12-04T00:00:00Z
        assert_eq!(super::expiry(0, now), "-");
        assert_eq!(
            super::expiry(now + 365 * day, now),
            "2026-12-04 (365 days left)"
        );
        assert_eq!(super::expiry(now - day, now), "expired 2025-12-03");
    }

    #[test]
    fn table_columns_are_two_spaces_apart() {
        let rows = vec![
            vec!["m1".to_string(), "Protected".to_string(), "x".to_string()],
            vec!["machine-2".to_string(), "-".to_string(), String::new()],
        ];
        assert_eq!(
            super::table_text(&["MACHINE", "STATE", "JOB"], &rows),
            "MACHINE    STATE      JOB\nm1         Protected  x\nmachine-2  -"
        );
    }
}

#[cfg(test)]
mod alert_tests {
    use super::*;

    fn alert(kind: &str, value: f64, threshold: f64, cleared_ms: u64) -> pb::Alert {
        pb::Alert {
            id: format!("{kind}/m1/1000"),
            kind: kind.into(),
            subject: "m1".into(),
            severity: "warning".into(),
            message: "RPO 12.3s is above 2s: the MT is behind".into(),
            raised_ms: 1000,
            cleared_ms,
            value,
            threshold,
            site: "onprem".into(),
        }
    }

    #[test]
    fn the_alerts_table_shows_age_value_and_threshold() {
        let now = 1000 + 65_000;
        let open = [
            alert("rpo-exceeded", 12.34, 2.0, 0),
            pb::Alert {
                subject: "ps:ps-a".into(),
                site: String::new(),
                message: "cache full".into(),
                ..alert("ps-cache-full", 0.853, 0.8, 0)
            },
            pb::Alert {
                subject: "mt:mt-b".into(),
                message: "offline".into(),
                ..alert("component-offline", 0.0, 0.0, 0)
            },
        ];
        assert_eq!(
            alerts_text(&open, false, now).unwrap(),
            [
                "KIND               SUBJECT  SITE    SINCE      VALUE/THRESHOLD  MESSAGE",
                "rpo-exceeded       m1       onprem  1m05s ago  12.3s / 2.0s     \
                 RPO 12.3s is above 2s: the MT is behind",
                "ps-cache-full      ps:ps-a  -       1m05s ago  85% / 80%        cache full",
                "component-offline  mt:mt-b  onprem  1m05s ago  -                offline",
            ]
            .join("\n")
        );
        let cleared = [alert("rpo-exceeded", 1.0, 2.0, now - 1500)];
        let t = alerts_text(&cleared, true, now).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("SINCE      CLEARED"), "{t}");
        assert!(lines[1].contains("1m05s ago  1.5s ago  1.0s / 2.0s"), "{t}");
        assert_eq!(alerts_text(&[], true, now), None);
    }

    #[test]
    fn link_errors_and_shrunk_retention_have_no_value_to_show() {
        for kind in ["link-error", "retention-shrunk"] {
            assert_eq!(alert_value(&alert(kind, 1.0, 0.0, 0)), "-", "{kind}");
        }
        assert_eq!(
            alert_value(&alert("rpo-exceeded", 1.0, 0.5, 0)),
            "1.0s / 500ms"
        );
    }

    #[test]
    fn an_alert_in_json_has_every_field_in_snake_case() {
        let v = super::super::json::alert(&alert("rpo-exceeded", 12.5, 2.0, 0));
        assert_eq!(
            v,
            serde_json::json!({
                "id": "rpo-exceeded/m1/1000", "kind": "rpo-exceeded", "subject": "m1",
                "severity": "warning", "message": "RPO 12.3s is above 2s: the MT is behind",
                "raised_ms": 1000, "cleared_ms": 0, "value": 12.5, "threshold": 2.0,
                "site": "onprem",
            })
        );
        let l = super::super::json::list("alerts", &[], super::super::json::alert);
        assert_eq!(l, serde_json::json!({"alerts": []}));
    }
}

#[cfg(test)]
mod verify_tests {
    use super::*;

    #[test]
    fn a_verify_reads_ok_differ_repaired_or_failed() {
        let now = now_ms();
        let v = |differing, repaired, error: &str| pb::VerifyResult {
            time_ms: now,
            point_id: "verify-1".into(),
            chunks_compared: 25,
            differing,
            repaired,
            error: error.into(),
            ..Default::default()
        };
        assert_eq!(verify_short(&None), "-");
        assert!(verify_short(&Some(v(0, false, ""))).starts_with("ok "));
        assert!(verify_short(&Some(v(2, false, ""))).starts_with("2 differ "));
        assert!(verify_short(&Some(v(2, true, ""))).starts_with("2 repaired "));
        assert!(verify_short(&Some(v(0, false, "agent offline"))).starts_with("failed "));
        assert_eq!(
            verify_line(&v(2, false, "")),
            "point verify-1, 25 chunks compared, 2 differ"
        );
        assert!(verify_line(&v(2, true, "")).ends_with("(repaired: the next point is exact)"));
        assert_eq!(
            verify_line(&v(0, false, "agent offline")),
            "failed at verify-1: agent offline"
        );
    }
}
