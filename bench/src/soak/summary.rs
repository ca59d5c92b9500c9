//! What a soak did and found, printed at the end of `rebound soak`: the
//! kills per component, the network faults per kind and link, the fio
//! rounds and their verify result, the points cut, retained and checked,
//! and every failure. A run with any failure exits non-zero.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The tallies of one run.
#[derive(Debug, Default)]
pub struct Summary {
    pub seed: u64,
    pub planned: Duration,
    pub ran: Duration,
    pub disks: Vec<(String, u64)>,
    /// Kills per component name.
    pub kills: BTreeMap<&'static str, u64>,
    /// Network faults injected, per link then kind.
    pub faults: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// What the proxies saw, one line per link.
    pub proxy_effect: Vec<String>,
    pub fio_clean: u64,
    pub fio_broken_by_kill: u64,
    pub fio_failed: u64,
    pub fio_verify_errors: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub points_cut: u64,
    /// Points not cut this second, per reason.
    pub points_skipped: BTreeMap<String, u64>,
    pub points_raced: u64,
    pub retained_exact: usize,
    pub retained_agent: usize,
    pub dropped_by_retention: usize,
    /// Points the agent was killed before the PS acknowledged.
    pub lost_with_agent: usize,
    pub latest_exact: bool,
    pub failures: Vec<String>,
}

impl Summary {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// `agent 3, mt 2, ps 3`.
    pub fn kills_line(&self) -> String {
        counts(self.kills.iter().map(|(c, n)| (*n, c.to_string())), false)
    }
}

/// `name n` (or `n name` with `count_first`) pairs, comma separated.
fn counts(items: impl Iterator<Item = (u64, String)>, count_first: bool) -> String {
    let parts: Vec<String> = items
        .map(|(n, name)| {
            if count_first {
                format!("{n} {name}")
            } else {
                format!("{name} {n}")
            }
        })
        .collect();
    parts.join(", ")
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let disks: Vec<String> = self
            .disks
            .iter()
            .map(|(n, s)| format!("{n} {} MiB", s >> 20))
            .collect();
        writeln!(
            f,
            "rebound soak --seed {} --minutes {}: ran {:.1} min on {}",
            self.seed,
            self.planned.as_secs_f64() / 60.0,
            self.ran.as_secs_f64() / 60.0,
            disks.join(", ")
        )?;
        writeln!(f, "kill -9:         {}", self.kills_line())?;
        if self.faults.is_empty() {
            writeln!(f, "network faults:  none")?;
        }
        for (link, kinds) in &self.faults {
            let k = counts(kinds.iter().map(|(k, n)| (*n, k.to_string())), false);
            writeln!(f, "network {link:<8} {k}")?;
        }
        for line in &self.proxy_effect {
            writeln!(f, "  proxy {line}")?;
        }
        writeln!(
            f,
            "fio rounds:      {} clean, {} broken by an agent kill, {} failed; verify errors: {}",
            self.fio_clean, self.fio_broken_by_kill, self.fio_failed, self.fio_verify_errors
        )?;
        writeln!(
            f,
            "fio bytes:       {:.1} MiB written, {:.1} MiB read (rounds that reported)",
            mib(self.bytes_written),
            mib(self.bytes_read)
        )?;
        let skipped = counts(
            self.points_skipped.iter().map(|(r, n)| (*n, r.clone())),
            true,
        );
        writeln!(
            f,
            "points cut:      {} recorded, {} raced by a write (not compared), skipped: {}",
            self.points_cut,
            self.points_raced,
            if skipped.is_empty() {
                "none".to_string()
            } else {
                skipped
            }
        )?;
        writeln!(
            f,
            "points checked:  {} retained soak points exact by blake3 on every disk, {} agent-cut points (no record), {} dropped by retention",
            self.retained_exact, self.retained_agent, self.dropped_by_retention
        )?;
        writeln!(
            f,
            "points lost:     {} cut but not yet acknowledged by the PS when the agent was killed (allowed: they die with the agent; an acknowledged point lost is a failure)",
            self.lost_with_agent
        )?;
        writeln!(
            f,
            "latest:          {}",
            if self.latest_exact {
                "the replica equals the source on every disk"
            } else {
                "NOT equal to the source"
            }
        )?;
        for e in &self.failures {
            writeln!(f, "FAILURE: {e}")?;
        }
        write!(
            f,
            "result:          {}",
            if self.passed() {
                "PASS".to_string()
            } else {
                format!("FAIL ({} failures)", self.failures.len())
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_printed_and_fails_the_run() {
        let mut s = Summary {
            seed: 4,
            kills: [("agent", 3), ("mt", 2), ("ps", 1)].into_iter().collect(),
            latest_exact: true,
            ..Summary::default()
        };
        s.faults
            .entry("agent-ps".into())
            .or_default()
            .insert("cut", 5);
        let text = s.to_string();
        assert!(
            text.contains("kill -9:         agent 3, mt 2, ps 1"),
            "{text}"
        );
        assert!(text.contains("network agent-ps cut 5"), "{text}");
        assert!(text.ends_with("result:          PASS"), "{text}");
        s.failures
            .push("point app-9 disk disk0: blake3 a at the MT, b at the source".into());
        let text = s.to_string();
        assert!(!s.passed());
        assert!(text.contains("FAILURE: point app-9"), "{text}");
        assert!(text.ends_with("FAIL (1 failures)"), "{text}");
    }
}
