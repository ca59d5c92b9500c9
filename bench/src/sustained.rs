//! Section 3, sustained replication: the highest churn the whole path
//! (agent → PS → MT with mTLS, compression, fsyncs and the retention journal)
//! keeps up with for the hold duration without the lag growing, per data
//! profile.
//!
//! A search, not a single run, because the answer is a rate: a ramp of short
//! steps finds where the backlog starts to build or the applied rate falls
//! behind (a failing step is repeated once per ramp, as the start of a
//! profile can hit a stall left by the previous one; the applied rate in
//! the step that fails again estimates the capacity), then a constant-rate
//! hold at 90% of it must keep the backlog flat for the whole hold; if it
//! does, a second hold tries the estimate itself (the figure is the highest
//! rate that held), and if it does not, one retry at a lower rate. "Kept
//! up" means: the writer reached
//! the rate, the agent stayed in data mode (never fell back to bitmap), and
//! the backlog (captured but not applied bytes) grew by less than one second
//! of churn over the second half of the hold.

use anyhow::Result;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

use crate::floor::{self, At};
use crate::limits;
use crate::measured::{MeasuredLab, DISK};
use crate::profiles::Profile;
use crate::report::GOAL_TEXT_MB_S;
use crate::sampler::{quantile, slope, Sampler};
use crate::usage::machine_busy_secs;
use crate::writer::{Writer, WriterSpec};
use crate::{mb, Bench};

/// Writer settings shared by the churn sections.
pub fn writer_spec(
    b: &Bench,
    lab: &MeasuredLab,
    pool: Arc<Vec<u8>>,
    rate: f64,
    seed: u64,
) -> WriterSpec {
    WriterSpec {
        addr: lab.agent_nbd(),
        export: DISK.into(),
        write_size: b.plan.write_size,
        conns: b.plan.writer_conns,
        rate: rate as u64,
        pool,
        seed,
    }
}

/// One constant-rate hold and what it showed.
struct Hold {
    rate: f64,
    achieved: f64,
    applied: f64,
    consistent: bool,
    growth: f64,
    lag_p99_ms: f64,
    kept_up: bool,
    /// CPU use of agent, PS, MT and the bench (writer + sampler) during the
    /// hold, in cores.
    cpu: [f64; 4],
    /// The whole machine's busy cores during the hold (`/proc/stat`: the
    /// kernel's writeback and TCP work too), if it could be read.
    machine: Option<f64>,
}

fn hold(
    b: &Bench,
    lab: &mut MeasuredLab,
    pool: &Arc<Vec<u8>>,
    rate: f64,
    secs: f64,
) -> Result<Hold> {
    lab.wait_settled(b.plan.settle_timeout)?;
    let sampler = Sampler::start(lab)?;
    std::thread::sleep(Duration::from_millis(200));
    let w = Writer::start(writer_spec(b, lab, pool.clone(), rate, rate as u64))?;
    let t0 = sampler.now();
    let cpu0 = lab.cpu_all();
    let busy0 = machine_busy_secs();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let t1 = sampler.now();
    let cpu1 = lab.cpu_all();
    let busy1 = machine_busy_secs();
    let bytes = w.stop()?;
    // Let the tail drain so the lags of the last samples resolve.
    let settled = lab.wait_settled(b.plan.settle_timeout);
    let s = sampler.stop()?;
    settled?;
    let achieved = bytes as f64 / (t1 - t0);
    let consistent = s.all_consistent(t0, t1);
    let half = t0 + (t1 - t0) / 2.0;
    let growth = slope(&s.backlog(half, t1)) * (t1 - half);
    let lags = s.lags_ms(t0, t1);
    let kept_up = achieved >= 0.95 * rate && consistent && growth <= rate.max(32e6);
    Ok(Hold {
        rate,
        achieved,
        applied: s.applied_rate(t0 + 1.0, t1),
        consistent,
        growth,
        lag_p99_ms: quantile(&lags, 0.99),
        kept_up,
        cpu: [0, 1, 2, 3].map(|i| (cpu1[i] - cpu0[i]) / (t1 - t0)),
        machine: busy0.zip(busy1).map(|(a, z)| (z - a) / (t1 - t0).max(1e-6)),
    })
}

/// Ramps the rate in steps until the backlog builds; returns the capacity
/// estimate in bytes/s and the steps for the JSON details.
fn ramp(
    b: &Bench,
    lab: &mut MeasuredLab,
    pool: &Arc<Vec<u8>>,
) -> Result<(f64, Vec<serde_json::Value>)> {
    let p = &b.plan;
    lab.wait_settled(p.settle_timeout)?;
    let sampler = Sampler::start(lab)?;
    std::thread::sleep(Duration::from_millis(200));
    let mut rate = p.ramp_start;
    let w = Writer::start(writer_spec(b, lab, pool.clone(), rate, 7))?;
    let mut steps = Vec::new();
    let mut last_good = 0.0f64;
    // A step that fails is repeated once per ramp: the start of a profile
    // can hit a stall left by the previous one (write-back of its holds),
    // which a second step at the same rate does not.
    let mut repeated = false;
    let estimate = loop {
        w.set_rate(rate as u64);
        let (t0, b0) = (sampler.now(), w.bytes());
        std::thread::sleep(p.ramp_step);
        let (t1, b1) = (sampler.now(), w.bytes());
        let s = sampler.snapshot();
        let offered = (b1 - b0) as f64 / (t1 - t0);
        let backlog = s.backlog(t0, t1);
        let grew = match (backlog.first(), backlog.last()) {
            (Some(a), Some(z)) => z.1 - a.1,
            _ => 0.0,
        };
        let applied = s.applied_rate(t0, t1);
        let consistent = s.all_consistent(t0, t1);
        // The agent's buffer absorbs a short step's excess, so the backlog
        // alone lets a step pass well past the capacity: the applied rate
        // must keep up too.
        let ok = offered >= 0.9 * rate
            && consistent
            && grew <= 0.25 * offered * (t1 - t0)
            && applied >= 0.8 * offered;
        steps.push(json!({
            "rate_mb_s": mb(rate), "offered_mb_s": mb(offered), "applied_mb_s": mb(applied),
            "backlog_growth_mb": grew / 1e6, "consistent": consistent, "ok": ok,
        }));
        b.progress(&format!(
            "  ramp {:.0} MB/s: offered {:.0}, applied {:.0}, backlog {:+.0} MB{}",
            mb(rate),
            mb(offered),
            mb(applied),
            grew / 1e6,
            match (ok, repeated) {
                (true, _) => "",
                (false, false) => " -> repeated once",
                (false, true) => " -> capacity found",
            }
        ));
        if !ok && !repeated {
            repeated = true;
            continue;
        }
        if !ok {
            // Saturated: what got applied is the capacity; if the writer
            // itself could not reach the rate, what it reached is.
            let cap = if offered < 0.9 * rate && consistent {
                offered
            } else {
                applied.max(last_good)
            };
            break cap;
        }
        last_good = offered.min(applied);
        if rate >= p.ramp_max {
            break offered;
        }
        rate = (rate * p.ramp_factor).min(p.ramp_max);
    };
    w.stop()?;
    let settled = lab.wait_settled(p.settle_timeout);
    sampler.stop()?;
    settled?;
    Ok((estimate, steps))
}

/// When the floor's limits are measured again: right after the
/// text-like holds, before the next profile's ramp.
const AGAIN_WHEN: &str = "after the text-like holds";

/// For the compressible profile (the one with a goal): the cores the hold
/// used per 100 MB/s, beside the floor of the passes the design makes every
/// byte take ([`floor::text_churn`]) with the limits measured again right
/// after the holds, and at section 1's limits. Returns a note to append.
fn cpu_note(b: &Bench, prof: Profile, h: &Hold) -> String {
    if prof != Profile::Text {
        return String::new();
    }
    let Some(floor) = floor::text_churn(b, At::Again) else {
        return String::new();
    };
    let used: f64 = h.cpu.iter().sum();
    let machine = h
        .machine
        .map(|m| format!(" (machine {m:.2} of {} busy)", floor.machine_cores))
        .unwrap_or_default();
    let first = floor::text_churn(b, At::Limits)
        .map(|f| format!(" ({:.2} at section 1's limits)", f.per_100_mb()))
        .unwrap_or_default();
    format!(
        "; used {used:.2} cores = {:.2} per 100 MB/s{machine}, against a floor of {:.2} {AGAIN_WHEN}{first}",
        used / (mb(h.rate) / 100.0).max(1e-9),
        floor.per_100_mb(),
    )
}

/// The row beside the text-like figure: the most the design's passes allow
/// on this machine's cores, with each limit at the faster of its two
/// measurements in this run (section 1 and right after the holds), so the
/// machine was never faster than this ceiling assumes.
fn set_ceiling(b: &mut Bench) {
    let again = floor::text_churn(b, At::Again);
    match floor::text_churn(b, At::Best) {
        Some(f) => b.set(
            "sustained.text.ceiling",
            f.ceiling_mb_s(),
            format!(
                "{} cores / ({}), each limit the faster of section 1 and {AGAIN_WHEN}{}; {GOAL_TEXT_MB_S:.0} MB/s needs at most {:.3}",
                f.machine_cores,
                f.describe(),
                again
                    .map(|a| format!(" ({AGAIN_WHEN} alone: {:.0} MB/s)", a.ceiling_mb_s()))
                    .unwrap_or_default(),
                f.machine_cores / GOAL_TEXT_MB_S * 100.0
            ),
        ),
        None => b.not_run(
            "sustained.text.ceiling",
            "needs the machine limits (section 1) in the same run",
        ),
    }
}

pub fn run(b: &mut Bench, lab: &mut MeasuredLab) -> Result<()> {
    let p = b.plan.clone();
    let started = std::time::Instant::now();
    for prof in Profile::ALL {
        b.progress(&format!(
            "sustained: {prof} profile: ramp in {:.0} s steps from {:.0} MB/s",
            p.ramp_step.as_secs_f64(),
            mb(p.ramp_start)
        ));
        let pool = Arc::new(prof.pool(p.pool_bytes));
        let (estimate, steps) = ramp(b, lab, &pool)?;
        let mut rate = (estimate * 0.9).max(1e6);
        let mut holds = Vec::new();
        let mut tried = Vec::new();
        let mut best: Option<Hold> = None;
        let mut last: Option<Hold> = None;
        let mut lower_tries = 0;
        loop {
            b.progress(&format!(
                "sustained: {prof}: holding {:.0} MB/s for {:.0} s (hold {})",
                mb(rate),
                p.sustain_secs,
                holds.len() + 1
            ));
            let h = hold(b, lab, &pool, rate, p.sustain_secs)?;
            b.progress(&format!(
                "  achieved {:.0} MB/s, applied {:.0} MB/s, backlog growth {:+.0} MB, lag p99 {:.0} ms, \
                 data mode throughout: {}, CPU agent/ps/mt/bench {:.0}/{:.0}/{:.0}/{:.0}% -> {}",
                mb(h.achieved),
                mb(h.applied),
                h.growth / 1e6,
                h.lag_p99_ms,
                h.consistent,
                h.cpu[0] * 100.0,
                h.cpu[1] * 100.0,
                h.cpu[2] * 100.0,
                h.cpu[3] * 100.0,
                if h.kept_up { "kept up" } else { "fell behind" }
            ));
            holds.push(json!({
                "rate_mb_s": mb(h.rate), "achieved_mb_s": mb(h.achieved), "applied_mb_s": mb(h.applied),
                "backlog_growth_mb": h.growth / 1e6, "lag_p99_ms": h.lag_p99_ms,
                "consistent": h.consistent, "kept_up": h.kept_up,
                "cpu_cores": {"agent": h.cpu[0], "ps": h.cpu[1], "mt": h.cpu[2], "bench": h.cpu[3]},
                "machine_cores": h.machine,
            }));
            tried.push(format!(
                "{:.0} {}",
                mb(h.rate),
                if h.kept_up { "kept up" } else { "fell behind" }
            ));
            b.track_retained(lab);
            let out_of_time = started.elapsed() > p.sustain_budget;
            if h.kept_up {
                // The first hold is at 90% of the ramp's estimate, so that
                // it holds on the first try; the figure is the highest rate
                // kept up with, so one more hold tries the estimate itself.
                let up = estimate.max(h.rate);
                let again = holds.len() == 1 && up > h.rate * 1.02 && !out_of_time;
                best = Some(h);
                if !again {
                    break;
                }
                rate = up;
                continue;
            }
            if best.is_some() {
                break; // the upward hold fell behind: the lower one stands
            }
            // What a hold applied says what the path can take only while the
            // agent streamed data: once it fell back to bitmap mode the
            // applied rate collapses (seen: 41 MB/s applied of 187 offered,
            // on a path that then held 173), so the next try is 80%.
            rate = if h.consistent {
                (h.applied.min(h.rate) * 0.9).min(h.rate * 0.8)
            } else {
                h.rate * 0.8
            }
            .max(1e6);
            last = Some(h);
            if lower_tries == p.sustain_retries {
                break;
            }
            if out_of_time {
                b.progress("  no time left in this section for a retry at a lower rate");
                break;
            }
            lower_tries += 1;
        }
        if prof == Profile::Text {
            b.progress(&format!(
                "sustained: measuring the floor's limits again, {AGAIN_WHEN}"
            ));
            limits::again(b, AGAIN_WHEN)?;
        }
        b.detail(
            &format!("sustained.{}", prof.id()),
            json!({"ramp": steps, "estimate_mb_s": mb(estimate), "holds": holds}),
        );
        let id = format!("sustained.{}", prof.id());
        match (best, last) {
            (Some(h), _) => {
                let cpu_note = cpu_note(b, prof, &h);
                b.set(
                    &id,
                    mb(h.rate),
                    format!(
                        "held {:.0} s, lag p99 {:.0} ms (ramp estimate {:.0} MB/s; holds: {}){cpu_note}",
                        p.sustain_secs,
                        h.lag_p99_ms,
                        mb(estimate),
                        tried.join(", ")
                    ),
                )
            }
            (None, Some(h)) => b.set(
                &id,
                mb(h.applied),
                format!(
                    "no tried rate held for {:.0} s; figure = applied rate while {:.0} MB/s was offered",
                    p.sustain_secs,
                    mb(h.rate)
                ),
            ),
            (None, None) => anyhow::bail!("no hold ran"),
        }
    }
    set_ceiling(b);
    Ok(())
}
