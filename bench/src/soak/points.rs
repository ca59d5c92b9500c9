//! Recovery points the soak cuts and checks.
//!
//! A point is cut with the writers paused (fio stopped with SIGSTOP) and
//! the agent quiet (its change counters and the source disks' mtimes still
//! for a while), so the blake3 of each source disk right after the tag is
//! exactly what the point must show. The soak cuts its points with kind
//! `app`; points of kind `crash` in the catalog are the agent's own (the
//! one after each resync window), which have no recorded content.
//!
//! At the end every retained point is read back through the master
//! target's NBD view and compared by blake3 with its record.

use anyhow::{anyhow, Context, Result};
use rebound_lab::{blake3_file, Lab};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// The kind of the points the soak cuts.
pub const KIND: &str = "app";
/// How long the agent must look still before a tag.
const QUIET: Duration = Duration::from_millis(100);
const POLL: Duration = Duration::from_millis(25);
/// Longest wait for quiet before the point is skipped.
const QUIET_LIMIT: Duration = Duration::from_secs(2);
/// How long the agent may wait for a resync window before refusing a tag.
const TAG_TIMEOUT_MS: u64 = 1_000;

/// What the source disks held at a point.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    /// blake3 of each source disk, in disk order.
    pub hashes: Vec<String>,
    pub cut_at: Instant,
    /// The agent process that cut it.
    pub agent_pid: Option<u32>,
    /// The PS acknowledged it (the agent's durable seq reached it): from
    /// then on it must reach the MT. A point cut by an agent killed before
    /// that is lost with the agent's memory, as designed.
    pub durable: bool,
}

/// Why no point was recorded this time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// The agent was down or did not answer.
    AgentDown,
    /// Writes went on for the whole quiet wait.
    NotQuiet,
    /// The agent refused the tag (a resync window was open, or similar).
    Refused(String),
    /// A write landed between the tag and the hashes: the point exists
    /// but its content is unknown.
    Raced(String),
}

/// The agent's write counters and the disks' mtimes: equal twice means
/// nothing was written in between.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stillness {
    seq: u64,
    bytes_captured: u64,
    mtimes: Vec<Option<SystemTime>>,
}

fn stillness(lab: &Lab, disks: &[PathBuf]) -> Result<Stillness> {
    let st = lab.agent_status()?;
    let num = |k: &str| {
        st[k]
            .as_u64()
            .ok_or_else(|| anyhow!("the agent status has no number {k}: {st}"))
    };
    Ok(Stillness {
        seq: num("seq")?,
        bytes_captured: num("bytes_captured")?,
        mtimes: disks
            .iter()
            .map(|d| std::fs::metadata(d).and_then(|m| m.modified()).ok())
            .collect(),
    })
}

/// Waits until the agent has been still for [`QUIET`]; `None` if it never
/// was within [`QUIET_LIMIT`].
fn wait_quiet(lab: &Lab, disks: &[PathBuf]) -> Result<Option<Stillness>> {
    let start = Instant::now();
    let mut last = stillness(lab, disks)?;
    let mut since = Instant::now();
    while start.elapsed() < QUIET_LIMIT {
        std::thread::sleep(POLL);
        let now = stillness(lab, disks)?;
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= QUIET {
            return Ok(Some(now));
        }
    }
    Ok(None)
}

/// Cuts a point with the writers already paused and records the source
/// disks' hashes at it: `Ok((id, record))`, or why not.
pub fn cut(lab: &Lab) -> std::result::Result<(String, Record), Skip> {
    let disks: Vec<PathBuf> = (0..lab.opts.disks.len())
        .map(|i| lab.source_disk(i))
        .collect();
    let before = match wait_quiet(lab, &disks) {
        Ok(Some(s)) => s,
        Ok(None) => return Err(Skip::NotQuiet),
        Err(_) => return Err(Skip::AgentDown),
    };
    let answer = lab
        .agent_admin(json!({"cmd": "tag", "kind": KIND, "timeout_ms": TAG_TIMEOUT_MS}))
        .map_err(|e| Skip::Refused(short(&e.to_string())))?;
    let (Some(id), Some(seq)) = (answer["id"].as_str(), answer["seq"].as_u64()) else {
        return Err(Skip::Refused(format!(
            "tag answer without id and seq: {answer}"
        )));
    };
    let hashes = disks
        .iter()
        .map(|d| blake3_file(d))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| Skip::Raced(format!("{id}: {e}")))?;
    match stillness(lab, &disks) {
        Ok(after)
            if after.bytes_captured == before.bytes_captured && after.mtimes == before.mtimes => {}
        Ok(after) => {
            return Err(Skip::Raced(format!(
                "{id}: written during the cut ({before:?} then {after:?})"
            )))
        }
        Err(e) => return Err(Skip::Raced(format!("{id}: {e}"))),
    }
    Ok((
        id.to_string(),
        Record {
            seq,
            hashes,
            cut_at: Instant::now(),
            agent_pid: lab.pid(rebound_lab::Component::Agent),
            durable: false,
        },
    ))
}

/// The agent's error without the request echo.
fn short(e: &str) -> String {
    let e = e.rsplit(" failed: ").next().unwrap_or(e);
    e.chars().take(160).collect()
}

/// What the final comparison found.
#[derive(Debug, Default)]
pub struct Checked {
    /// Soak points compared on every disk and equal.
    pub exact: usize,
    /// Points the agent cut itself (kind `crash`): no record to compare.
    pub agent_points: usize,
    /// Recorded points no longer retained (dropped by retention).
    pub dropped: usize,
    /// Recorded points never retained because the agent was killed
    /// before the PS acknowledged them.
    pub not_durable: usize,
    /// Every difference, point lost or point without a record.
    pub failures: Vec<String>,
}

/// Compares every point the MT retains with `records`; `raced` are soak
/// points whose content is unknown (see [`Skip::Raced`]). A recorded
/// point younger than `keep` that is not retained is lost.
pub fn check_all(
    lab: &Lab,
    records: &BTreeMap<String, Record>,
    raced: &[String],
    keep: Duration,
) -> Result<Checked> {
    let (points, _) = lab.points().context("listing the retained points")?;
    let mut out = Checked::default();
    let disks: Vec<String> = lab.opts.disks.iter().map(|d| d.0.clone()).collect();
    for p in &points {
        if p.kind != KIND {
            out.agent_points += 1;
            continue;
        }
        if raced.contains(&p.id) {
            continue;
        }
        let Some(rec) = records.get(&p.id) else {
            out.failures.push(format!(
                "retained point {} (seq {}) was never recorded by the soak",
                p.id, p.seq
            ));
            continue;
        };
        if p.seq != rec.seq {
            out.failures.push(format!(
                "point {} is at seq {} in the catalog, the agent cut it at {}",
                p.id, p.seq, rec.seq
            ));
        }
        let (mut exact, mut gone) = (true, false);
        for (disk, want) in disks.iter().zip(&rec.hashes) {
            match lab.point_hash(disk, &p.id) {
                Ok(got) if &got == want => {}
                Ok(got) => {
                    exact = false;
                    out.failures.push(format!(
                        "point {} (seq {}) disk {disk}: blake3 {got} at the MT, {want} at the source when cut",
                        p.id, p.seq
                    ));
                }
                Err(e) if still_retained(lab, &p.id) => {
                    exact = false;
                    out.failures.push(format!(
                        "point {} disk {disk}: cannot read its view: {e:#}",
                        p.id
                    ));
                }
                // Retention dropped it while the others were read.
                Err(_) => gone = true,
            }
        }
        if gone {
            out.dropped += 1;
        } else if exact {
            out.exact += 1;
        }
    }
    for (id, rec) in records {
        if points.iter().any(|p| &p.id == id) {
            continue;
        }
        if !rec.durable {
            out.not_durable += 1;
        } else if rec.cut_at.elapsed() < keep {
            out.failures.push(format!(
                "point {id} (seq {}) cut {} s ago and acknowledged by the PS is not retained (the window is {} s)",
                rec.seq,
                rec.cut_at.elapsed().as_secs(),
                keep.as_secs()
            ));
        } else {
            out.dropped += 1;
        }
    }
    Ok(out)
}

fn still_retained(lab: &Lab, id: &str) -> bool {
    lab.points()
        .map(|(ps, _)| ps.iter().any(|p| p.id == id))
        .unwrap_or(true)
}

/// Marks the records the running agent has made durable at the PS.
pub fn mark_durable(lab: &Lab, records: &mut BTreeMap<String, Record>) {
    let pid = lab.pid(rebound_lab::Component::Agent);
    if pid.is_none() || records.values().all(|r| r.durable) {
        return;
    }
    let Ok(durable) = lab.agent_counter("durable_seq") else {
        return;
    };
    for r in records.values_mut() {
        if !r.durable && r.agent_pid == pid && r.seq <= durable {
            r.durable = true;
        }
    }
}

/// The agent's status as one line, for progress reports.
pub fn status_line(lab: &Lab) -> String {
    match lab.agent_status() {
        Ok(v) => {
            let g = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
            format!(
                "mode {} seq {} durable {} connected {}",
                g("mode"),
                g("seq"),
                g("durable_seq"),
                g("connected")
            )
        }
        Err(_) => "agent down".into(),
    }
}
