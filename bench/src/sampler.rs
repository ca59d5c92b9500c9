//! Watching replication while a load runs: the agent's status and the master
//! target's applied seq, sampled on a timeline, and what follows from them —
//! write-to-applied lag, applied throughput and backlog.
//!
//! Write-to-applied lag is measured end to end, not taken from the agent's
//! `lag_ms` (which stops at the process server): a status sample at time t
//! says every write acknowledged before t has a seq ≤ `seq`; that write is
//! applied once the MT's `applied_seq` reaches it. While the agent is not
//! consistent (bitmap mode, a resync window) its writes are only in the dirty
//! map, so such a sample resolves at the first later consistent sample's
//! seq, which is when those writes are in the stream again.

use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::measured::{AgentStatus, MeasuredLab, MACHINE};
use rebound_lab::AgentAdmin;
use rebound_proto::ListPointsRequest;

/// The MT is polled this often; the agent every `AGENT_EVERY` polls.
const POLL: Duration = Duration::from_millis(20);
const AGENT_EVERY: u32 = 5;

#[derive(Debug, Clone)]
pub struct StatusSample {
    /// Seconds since the sampler's epoch, taken before the request.
    pub t: f64,
    pub seq: u64,
    pub captured: u64,
    pub consistent: bool,
    pub mode: String,
    pub agent_lag_ms: u64,
    pub buffer_bytes: u64,
}

#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub status: Vec<StatusSample>,
    /// (t after the answer, applied seq).
    pub applied: Vec<(f64, u64)>,
}

pub struct Sampler {
    epoch: Instant,
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Samples>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Sampler {
    pub fn start(lab: &mut MeasuredLab) -> Result<Sampler> {
        let mut admin: AgentAdmin = lab.admin()?;
        let mut mt = lab.mt()?;
        let rt = lab.handle();
        let epoch = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let shared = Arc::new(Mutex::new(Samples::default()));
        let sh = shared.clone();
        let thread = std::thread::spawn(move || -> Result<()> {
            let mut i = 0u32;
            while !st.load(Ordering::Relaxed) {
                let tick = Instant::now();
                if i.is_multiple_of(AGENT_EVERY) {
                    let t = epoch.elapsed().as_secs_f64();
                    let a = AgentStatus::read(&mut admin)?;
                    let mut s = sh.lock().unwrap_or_else(|p| p.into_inner());
                    s.status.push(StatusSample {
                        t,
                        seq: a.seq,
                        captured: a.bytes_captured,
                        consistent: a.consistent && a.mode == "data",
                        mode: a.mode,
                        agent_lag_ms: a.lag_ms,
                        buffer_bytes: a.buffer_bytes,
                    });
                }
                i += 1;
                let r = rt.block_on(mt.list_points(ListPointsRequest {
                    replication_id: MACHINE.into(),
                }));
                if let Ok(r) = r {
                    let t = epoch.elapsed().as_secs_f64();
                    let mut s = sh.lock().unwrap_or_else(|p| p.into_inner());
                    s.applied.push((t, r.into_inner().applied_seq));
                }
                let spent = tick.elapsed();
                if spent < POLL {
                    std::thread::sleep(POLL - spent);
                }
            }
            Ok(())
        });
        Ok(Sampler {
            epoch,
            stop,
            shared,
            thread: Some(thread),
        })
    }

    /// Seconds since the sampler started (the samples' clock).
    pub fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// The samples so far (the sampler keeps running).
    pub fn snapshot(&self) -> Samples {
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn stop(mut self) -> Result<Samples> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r?,
            _ => anyhow::bail!("the sampler thread panicked"),
        }
        Ok(self.snapshot())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Samples {
    /// First time the MT had applied at least `seq`, at or after `t`.
    fn applied_at(&self, seq: u64, t: f64) -> Option<f64> {
        let start = self.applied.partition_point(|&(ta, _)| ta < t);
        self.applied[start..]
            .iter()
            .find(|&&(_, a)| a >= seq)
            .map(|&(ta, _)| ta)
    }

    /// Write-to-applied lags (ms) of the status samples taken in [from, to).
    /// Samples that never resolved count as lasting until the last poll.
    pub fn lags_ms(&self, from: f64, to: f64) -> Vec<f64> {
        let end = self.applied.last().map(|&(t, _)| t).unwrap_or(to);
        let mut out = Vec::new();
        for (i, s) in self.status.iter().enumerate() {
            if s.t < from || s.t >= to {
                continue;
            }
            // The writes behind this sample are in the stream by the first
            // consistent sample at or after it.
            let target = self.status[i..]
                .iter()
                .find(|x| x.consistent)
                .map(|x| x.seq.max(s.seq));
            let done = target.and_then(|seq| self.applied_at(seq, s.t));
            out.push((done.unwrap_or(end) - s.t).max(0.0) * 1000.0);
        }
        out
    }

    /// Bytes captured by the agent up to applied seq `seq` (a lower bound:
    /// the last status sample whose seq the MT had applied).
    fn captured_upto(&self, seq: u64) -> u64 {
        self.status
            .iter()
            .filter(|s| s.seq <= seq && s.consistent)
            .map(|s| s.captured)
            .max()
            .unwrap_or(0)
    }

    fn applied_seq_at(&self, t: f64) -> u64 {
        let i = self.applied.partition_point(|&(ta, _)| ta <= t);
        if i == 0 {
            0
        } else {
            self.applied[i - 1].1
        }
    }

    /// The status samples taken in [from, to].
    fn status_in(&self, from: f64, to: f64) -> impl Iterator<Item = &StatusSample> {
        self.status.iter().filter(move |s| s.t >= from && s.t <= to)
    }

    fn status_at(&self, t: f64) -> Option<&StatusSample> {
        let i = self.status.partition_point(|s| s.t <= t);
        if i == 0 {
            None
        } else {
            Some(&self.status[i - 1])
        }
    }

    /// Bytes applied at the MT per second over [from, to].
    pub fn applied_rate(&self, from: f64, to: f64) -> f64 {
        let a = self.captured_upto(self.applied_seq_at(from));
        let b = self.captured_upto(self.applied_seq_at(to));
        b.saturating_sub(a) as f64 / (to - from).max(1e-3)
    }

    /// (t, bytes captured but not yet applied) over [from, to].
    pub fn backlog(&self, from: f64, to: f64) -> Vec<(f64, f64)> {
        self.status_in(from, to)
            .map(|s| {
                let applied = self.captured_upto(self.applied_seq_at(s.t));
                (s.t, s.captured.saturating_sub(applied) as f64)
            })
            .collect()
    }

    /// Every status sample in [from, to] was consistent (data mode, nothing
    /// waiting for a resync).
    pub fn all_consistent(&self, from: f64, to: f64) -> bool {
        self.status_in(from, to).all(|s| s.consistent)
    }

    /// The agent's mode at time t.
    pub fn mode_at(&self, t: f64) -> String {
        self.status_at(t)
            .map(|s| s.mode.clone())
            .unwrap_or_default()
    }

    /// Largest agent change-buffer fill seen in [from, to].
    pub fn max_buffer(&self, from: f64, to: f64) -> u64 {
        self.status_in(from, to)
            .map(|s| s.buffer_bytes)
            .max()
            .unwrap_or(0)
    }
}

/// The `p`-quantile (0..=1) of `v` (nearest rank); 0 for an empty set.
pub fn quantile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// Least-squares slope of y over x.
pub fn slope(pts: &[(f64, f64)]) -> f64 {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return 0.0;
    }
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(t: f64, seq: u64, consistent: bool) -> StatusSample {
        StatusSample {
            t,
            seq,
            captured: seq * 100,
            consistent,
            mode: if consistent { "data" } else { "bitmap" }.into(),
            agent_lag_ms: 0,
            buffer_bytes: 0,
        }
    }

    #[test]
    fn lag_resolves_at_applied_and_after_inconsistency() {
        let s = Samples {
            status: vec![st(0.0, 10, true), st(1.0, 20, false), st(2.0, 30, true)],
            applied: vec![(0.5, 10), (1.5, 20), (2.5, 25), (3.0, 30)],
        };
        let lags = s.lags_ms(0.0, 10.0);
        assert_eq!(lags.len(), 3);
        assert!((lags[0] - 500.0).abs() < 1e-6);
        // The bitmap-mode sample waits for seq 30 (the next consistent one).
        assert!((lags[1] - 2000.0).abs() < 1e-6);
        assert!((lags[2] - 1000.0).abs() < 1e-6);
        assert_eq!(quantile(&lags, 0.5), 1000.0);
        assert_eq!(quantile(&lags, 1.0), 2000.0);
        assert!((slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) - 2.0).abs() < 1e-9);
    }
}
