//! Section 6, RTO: a planned failover at `latest` of the protected machine
//! under churn, split into drain, rollback and hand-over, and a rollback to
//! an old point after sustained churn (undo MB/s).
//!
//! The failover job (configuration server, issue 3) does not exist yet, so
//! the steps are driven through a [`FailoverDriver`]: today [`MtDirect`]
//! does what the job will do with what exists (stop the churn, cut the
//! shutdown tag, wait until it is applied, stop the agent cleanly, roll back
//! through the MT's Rollback RPC) and has no hand-over to time. When issue 3
//! lands, a driver that runs `rebound failover --point latest` and reads the
//! job's step times replaces it without touching the rest of the section.

use anyhow::Result;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lab::{Comp, Lab};
use super::profiles::Profile;
use super::sustained::writer_spec;
use super::writer::Writer;
use super::{mb, Bench};

/// Step times of one planned failover.
#[derive(Debug, Clone)]
pub struct FailoverTimes {
    /// The point the replica was rolled to.
    pub point: String,
    /// From the command until the target holds every write (source fenced,
    /// shutdown point applied, agent stopped).
    pub drain: Duration,
    pub rollback: Duration,
    pub rollback_blocks: u64,
    /// Until the power-on hook ran; None while there is no failover job.
    pub hand_over: Option<Duration>,
}

/// Runs a planned failover at `latest` of the lab's machine while `churn`
/// writes to it.
pub trait FailoverDriver {
    /// What runs the failover, for the notes.
    fn describe(&self) -> &'static str;
    fn planned_failover_latest(&mut self, lab: &mut Lab, churn: Writer) -> Result<FailoverTimes>;
}

/// The failover steps done directly against the agent and the MT.
pub struct MtDirect;

impl FailoverDriver for MtDirect {
    fn describe(&self) -> &'static str {
        "steps driven directly (agent admin socket, SIGTERM, MT Rollback RPC); no failover job yet"
    }

    fn planned_failover_latest(&mut self, lab: &mut Lab, churn: Writer) -> Result<FailoverTimes> {
        let t0 = Instant::now();
        // Fence: the workload stops, then the final point is cut.
        churn.stop()?;
        let (point, seq) = lab.tag("shutdown")?;
        lab.admin()?
            .call(json!({"cmd": "wait_durable", "timeout_ms": 120_000}))?;
        lab.wait_applied(seq, Duration::from_secs(180))?;
        lab.stop(Comp::Agent)?;
        let drain = t0.elapsed();
        let t1 = Instant::now();
        let (blocks, _) = lab.rollback(&point)?;
        let rollback = t1.elapsed();
        Ok(FailoverTimes {
            point,
            drain,
            rollback,
            rollback_blocks: blocks,
            hand_over: None,
        })
    }
}

pub fn run(b: &mut Bench, lab: &mut Lab, driver: &mut dyn FailoverDriver) -> Result<()> {
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
    b.progress("rto: planned failover at latest under churn");
    let f = driver.planned_failover_latest(lab, w)?;
    let churn_rate = churned as f64 / p.rto_churn_secs;
    b.progress(&format!(
        "  drain {:.2} s, rollback to {} {:.2} s ({} blocks), hand-over n/a",
        f.drain.as_secs_f64(),
        f.point,
        f.rollback.as_secs_f64(),
        f.rollback_blocks
    ));
    b.set(
        "rto.drain",
        f.drain.as_secs_f64(),
        "churn stopped, shutdown point cut, durable at PS, applied at MT, agent stopped",
    );
    b.set(
        "rto.rollback_latest",
        f.rollback.as_secs_f64(),
        format!("to {} ({} blocks)", f.point, f.rollback_blocks),
    );
    match f.hand_over {
        Some(h) => {
            b.set("rto.handover", h.as_secs_f64(), driver.describe());
            b.set(
                "rto.failover_excl_drain",
                (f.rollback + h).as_secs_f64(),
                "rollback + hand-over",
            );
        }
        None => {
            b.not_available("rto.handover", None, "n/a (issue 3): no failover job yet");
            let rb = f.rollback.as_secs_f64();
            if rb > 5.0 {
                b.set(
                    "rto.failover_excl_drain",
                    rb,
                    "rollback alone (hand-over n/a, issue 3)",
                );
            } else {
                b.not_available(
                    "rto.failover_excl_drain",
                    Some(rb),
                    "rollback only; hand-over n/a (issue 3)",
                );
            }
        }
    }

    // Roll back to the old point: undo rate.
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
    b.set(
        "rto.rollback_old.rate",
        mb(undo as f64 / secs.max(1e-6)),
        format!("{:.0} MB of undo", undo as f64 / 1e6),
    );
    b.detail(
        "rto",
        json!({
            "driver": driver.describe(),
            "drain_s": f.drain.as_secs_f64(), "rollback_latest_s": f.rollback.as_secs_f64(),
            "hand_over_s": f.hand_over.map(|h| h.as_secs_f64()),
            "old_point_age_s": age, "churn_mb_s": mb(churn_rate),
            "rollback_old": {"blocks": blocks, "undo_bytes": undo, "secs": secs},
        }),
    );
    Ok(())
}
