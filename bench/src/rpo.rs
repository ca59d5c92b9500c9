//! Section 4, RPO: the write-to-applied lag distribution at fixed churn rates
//! (20 MB/s per disk and 54 MB/s per machine, the ceilings commercial
//! products publish, and 150 MB/s), text-like data.
//!
//! Lag is end to end (a write acknowledged by the agent until the master
//! target has applied it), measured by [`crate::sampler`]; the agent's own
//! `lag_ms` (until the PS holds it) is kept in the JSON details.

use anyhow::Result;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

use crate::measured::MeasuredLab;
use crate::profiles::Profile;
use crate::sampler::{quantile, Sampler};
use crate::sustained::writer_spec;
use crate::writer::Writer;
use crate::{mb, Bench};

pub const RATES_MB: [u32; 3] = [20, 54, 150];

pub fn run(b: &mut Bench, lab: &mut MeasuredLab) -> Result<()> {
    let p = b.plan.clone();
    let pool = Arc::new(Profile::Text.pool(p.pool_bytes));
    for r in RATES_MB {
        let rate = f64::from(r) * 1e6;
        b.progress(&format!(
            "rpo: {r} MB/s of text-like churn for {:.0} s",
            p.rpo_secs
        ));
        lab.wait_settled(p.settle_timeout)?;
        let sampler = Sampler::start(lab)?;
        std::thread::sleep(Duration::from_millis(200));
        let w = Writer::start(writer_spec(b, lab, pool.clone(), rate, u64::from(r)))?;
        let t0 = sampler.now();
        let cpu0 = lab.cpu_all();
        std::thread::sleep(Duration::from_secs_f64(p.rpo_secs));
        let t1 = sampler.now();
        let cpu1 = lab.cpu_all();
        let cpu = [0, 1, 2, 3].map(|i| (cpu1[i] - cpu0[i]) / (t1 - t0));
        let bytes = w.stop()?;
        let settled = lab.wait_settled(p.settle_timeout);
        let s = sampler.stop()?;
        settled?;
        b.track_retained(lab);
        let lags = s.lags_ms(t0, t1);
        let agent_lags: Vec<f64> = s
            .status
            .iter()
            .filter(|x| x.t >= t0 && x.t < t1)
            .map(|x| x.agent_lag_ms as f64)
            .collect();
        let achieved = bytes as f64 / (t1 - t0);
        let consistent = s.all_consistent(t0, t1);
        let (p50, p99, max) = (
            quantile(&lags, 0.5),
            quantile(&lags, 0.99),
            quantile(&lags, 1.0),
        );
        b.progress(&format!(
            "  lag p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms; achieved {:.1} MB/s; data mode throughout: {consistent}",
            mb(achieved)
        ));
        let ctx = format!(
            "{} samples, {:.1} MB/s achieved{}",
            lags.len(),
            mb(achieved),
            if consistent {
                String::new()
            } else {
                format!(
                    "; agent left data mode (max buffer {} MiB)",
                    s.max_buffer(t0, t1) >> 20
                )
            }
        );
        b.set(&format!("rpo.{r}.p50"), p50, &ctx);
        b.set(
            &format!("rpo.{r}.p99"),
            p99,
            format!(
                "agent->PS durable lag p99 {:.0} ms",
                quantile(&agent_lags, 0.99)
            ),
        );
        b.set(&format!("rpo.{r}.max"), max, "");
        b.detail(
            &format!("rpo.{r}"),
            json!({
                "achieved_mb_s": mb(achieved), "samples": lags.len(), "consistent": consistent,
                "cpu_cores": {"agent": cpu[0], "ps": cpu[1], "mt": cpu[2], "bench": cpu[3]},
                "lag_ms": {"p50": p50, "p90": quantile(&lags, 0.9), "p99": p99, "max": max},
                "agent_lag_ms": {"p50": quantile(&agent_lags, 0.5), "p99": quantile(&agent_lags, 0.99),
                                 "max": quantile(&agent_lags, 1.0)},
            }),
        );
    }
    Ok(())
}
