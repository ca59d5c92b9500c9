//! Section 6, RTO: a planned failover at `latest` of a protected machine
//! under churn, split into drain, rollback and hand-over, and a rollback to
//! an old point after sustained churn (undo MB/s).
//!
//! The planned failover is the configuration server's real failover job
//! ([`crate::failover`]): asked through the Admin API as `rebound failover
//! --point latest` asks it, timed from the command to the MT's power_on
//! hook and split by the job's step records, in a multi-site lab of child
//! processes (CS, PS + MT per site, agent). "Planned failover excluding drain" is
//! rollback + hand-over, against its goal of 5 s.
//!
//! The old-point rollback runs on the main lab (child processes): a crash
//! point P, churn, then the failover steps driven directly ([`direct_stop`]:
//! stop the churn, cut a shutdown point, wait until it is durable at the PS
//! and applied at the MT, stop the agent, roll back to the shutdown point
//! with the MT's Rollback RPC), then the pre-images restored and a rollback
//! to P, whose undo bytes per second is the figure. Those direct drain and
//! rollback times go to the JSON details beside the job's.

use anyhow::Result;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::failover::{self, JobFailover};
use crate::floor::{self, At};
use crate::measured::MeasuredLab;
use crate::profiles::Profile;
use crate::sustained::writer_spec;
use crate::writer::Writer;
use crate::{mb, Bench};
use rebound_lab::Component;

/// Step times of one planned failover.
#[derive(Debug, Clone)]
pub struct FailoverTimes {
    /// The point the replica was rolled to.
    pub point: String,
    /// From the command until the target holds every write (source fenced,
    /// shutdown point applied).
    pub drain: Duration,
    pub rollback: Duration,
    /// Blocks the rollback undid, when the driver knows.
    pub rollback_blocks: Option<u64>,
    /// Until the power-on hook ran; None when nothing powers the machine on.
    pub hand_over: Option<Duration>,
}

/// The failover steps done directly against the agent and the MT of the
/// main lab (no CS there): stop the churn, cut the shutdown point, wait
/// until it is applied, stop the agent cleanly, roll back to it.
pub fn direct_stop(lab: &mut MeasuredLab, churn: Writer) -> Result<FailoverTimes> {
    let t0 = Instant::now();
    churn.stop()?;
    let (point, seq) = lab.tag("shutdown")?;
    lab.admin()?
        .call(json!({"cmd": "wait_durable", "timeout_ms": 120_000}))?;
    lab.wait_applied(seq, Duration::from_secs(180))?;
    lab.stop(Component::Agent)?;
    let drain = t0.elapsed();
    let t1 = Instant::now();
    let (blocks, _) = lab.rollback(&point)?;
    Ok(FailoverTimes {
        point,
        drain,
        rollback: t1.elapsed(),
        rollback_blocks: Some(blocks),
        hand_over: None,
    })
}

const LATEST_ROWS: [&str; 4] = [
    "rto.drain",
    "rto.rollback_latest",
    "rto.handover",
    "rto.failover_excl_drain",
];

pub fn run(b: &mut Bench, lab: &mut MeasuredLab) -> Result<()> {
    let r = old_point(b, lab);
    b.outcome(&["rto.rollback_old."], r);
    b.progress("rto: planned failover at latest under churn, through the failover job");
    let r = failover::planned_failover_latest(b).map(|f| latest_rows(b, f));
    b.outcome(&LATEST_ROWS, r);
    Ok(())
}

fn latest_rows(b: &mut Bench, f: JobFailover) {
    let t = &f.times;
    let hand = t.hand_over.unwrap_or_default();
    b.progress(&format!(
        "  command → power_on hook {:.2} s: drain {:.2} s, rollback to {} {:.2} s, hand-over {:.2} s",
        f.total.as_secs_f64(),
        t.drain.as_secs_f64(),
        t.point,
        t.rollback.as_secs_f64(),
        hand.as_secs_f64()
    ));
    b.set(
        "rto.drain",
        t.drain.as_secs_f64(),
        format!(
            "command → fenced, drained to the PS, MT applied all (catch-up {:.2} s: waits for the MT's status, CS heartbeat {} s); {:.0} MB/s churn, agent RPO {} ms at the command",
            f.catch_up.as_secs_f64(),
            f.heartbeat_secs,
            mb(f.churn_rate),
            f.rpo_ms
        ),
    );
    b.set(
        "rto.rollback_latest",
        t.rollback.as_secs_f64(),
        format!("choose points + MT rollback to {}", t.point),
    );
    b.set(
        "rto.handover",
        hand.as_secs_f64(),
        "MT hand-over until its power_on hook ran",
    );
    b.set(
        "rto.failover_excl_drain",
        (t.rollback + hand).as_secs_f64(),
        format!(
            "rollback + hand-over; command → power_on {:.2} s; CS failover job, child processes",
            f.total.as_secs_f64()
        ),
    );
    b.detail("rto_failover_job", f.detail);
}

/// Crash point, churn, direct stop, then a rollback to the crash point.
fn old_point(b: &mut Bench, lab: &mut MeasuredLab) -> Result<()> {
    let p = b.plan.clone();
    lab.wait_settled(p.settle_timeout)?;
    let (old_point, old_seq) = lab.tag("crash")?;
    lab.wait_applied(old_seq, Duration::from_secs(60))?;
    let old_at = Instant::now();
    b.progress(&format!(
        "rto: {:.0} MB/s of text-like churn for {:.0} s after point {old_point}",
        mb(p.rto_rate),
        p.rto_churn_secs
    ));
    let pool = Arc::new(Profile::Text.pool(p.pool_bytes));
    let w = Writer::start(writer_spec(b, lab, pool, p.rto_rate, 50))?;
    std::thread::sleep(Duration::from_secs_f64(p.rto_churn_secs));
    let churned = w.bytes();
    let f = direct_stop(lab, w)?;
    let churn_rate = churned as f64 / p.rto_churn_secs;
    b.progress(&format!(
        "  stopped directly: drain {:.2} s, rollback to {} {:.2} s ({} blocks)",
        f.drain.as_secs_f64(),
        f.point,
        f.rollback.as_secs_f64(),
        f.rollback_blocks.unwrap_or_default()
    ));

    let restored = lab.restore_pre_images()?;
    let age = old_at.elapsed().as_secs_f64();
    b.progress(&format!(
        "rto: rollback to {old_point}, {age:.0} s old ({restored} pre-image blocks restored first)"
    ));
    let t = Instant::now();
    let (blocks, undo) = lab.rollback(&old_point)?;
    let secs = t.elapsed().as_secs_f64();
    b.progress(&format!(
        "  {blocks} blocks, {:.0} MB of undo in {secs:.2} s",
        undo as f64 / 1e6
    ));
    b.set(
        "rto.rollback_old.secs",
        secs,
        format!(
            "point {age:.0} s old after {:.0} s of {:.0} MB/s churn; {blocks} blocks",
            p.rto_churn_secs,
            mb(churn_rate)
        ),
    );
    // Every undo byte is written durably twice (its pre-image, then the
    // replica), so the rollback's own durable write rate is set beside the
    // fastest bulk durable write this run measured (section 1, or again
    // after the text-like holds). The bulk write allocates a new file and
    // the rollback overwrites, so this is a comparison, not a bound.
    let writes = 2.0 * mb(undo as f64 / secs.max(1e-6));
    let bound = floor::limit(b, "limits.disk.bulk_write_fsync", At::Best, f64::max)
        .map(|r| {
            format!(
                "; two durable writes per byte (pre-image, replica): {writes:.0} MB/s written durably, \
                 against {r:.0} MB/s for the fastest bulk write this run measured"
            )
        })
        .unwrap_or_default();
    b.set(
        "rto.rollback_old.rate",
        mb(undo as f64 / secs.max(1e-6)),
        format!("{:.0} MB of undo{bound}", undo as f64 / 1e6),
    );
    b.detail(
        "rto",
        json!({
            "direct_stop": {
                "drain_s": f.drain.as_secs_f64(), "rollback_latest_s": f.rollback.as_secs_f64(),
                "rollback_latest_blocks": f.rollback_blocks,
            },
            "old_point_age_s": age, "churn_mb_s": mb(churn_rate),
            "rollback_old": {"blocks": blocks, "undo_bytes": undo, "secs": secs},
        }),
    );
    Ok(())
}
