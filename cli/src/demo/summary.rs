//! What `rebound demo` measured along the story, and the summary it prints
//! at the end (the integration test reads its lines).

use super::{A, B, MACHINE};
use std::time::Duration;

/// What the story measured.
#[derive(Default)]
pub struct Measured {
    pub verified: usize,
    pub replicas: usize,
    pub written: u64,
    pub lags: Vec<Duration>,
    pub rpo_ms: Vec<(String, u64)>,
    pub rto: Vec<(String, u64)>,
    pub steps: Vec<(String, Duration)>,
    /// Points verified while protected onprem→azure: id and blake3.
    pub first: Vec<(String, String)>,
    /// Change-point (rollback at the MT) checks passed.
    pub rollbacks: usize,
}

impl Measured {
    /// Prints the summary of a demo on a `disk_size` disk that took `total`.
    pub fn print(&self, disk_size: u64, total: Duration) {
        let m = self;
        let mut lags = m.lags.clone();
        lags.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!();
        println!("Rebound demo summary");
        println!(
            "  sites                              : {A} and {B}, machine {MACHINE} ({} MiB disk)",
            disk_size >> 20
        );
        println!("  recovery points verified by blake3 : {}", m.verified);
        println!(
            "  hand-overs verified by blake3      : {} (nothing lost at latest)",
            m.replicas
        );
        println!(
            "  change-point checks by blake3      : {} (rollback to an older point and back)",
            m.rollbacks
        );
        println!(
            "  written through NBD                : {:.1} MiB",
            m.written as f64 / 1048576.0
        );
        println!(
            "  tag-to-applied lag (RPO bound)     : median {:.0} ms, max {:.0} ms",
            lags.get(lags.len() / 2)
                .copied()
                .map(ms)
                .unwrap_or_default(),
            lags.last().copied().map(ms).unwrap_or_default()
        );
        // RPO as the agent reported it to the CS just before each failover.
        for (d, r) in &m.rpo_ms {
            let label = format!("RPO before failover {d}");
            println!("  {label:<35}: {r} ms");
        }
        for (d, r) in &m.rto {
            let label = format!("RTO failover {d}");
            println!("  {label:<35}: {r} ms (command → power_on hook)");
        }
        for (name, d) in &m.steps {
            println!("  {name:<35}: {:.1} s", d.as_secs_f64());
        }
        println!(
            "  total                              : {:.1} s",
            total.as_secs_f64()
        );
    }
}
