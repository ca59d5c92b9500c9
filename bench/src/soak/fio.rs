//! fio rounds through the agent's NBD export: random reads and writes with
//! a zipf distribution (a few hot blocks written over and over, as real
//! workloads do), each written block carrying a crc32c that fio checks
//! when it reads it back. A round is short, so a round broken by an agent
//! kill loses little, and the soak starts the next round on its own.
//!
//! A round runs as its own fio process (`--thread`, so SIGSTOP pauses all
//! of it) with its output in files; the soak pauses it while it cuts a
//! recovery point.

use anyhow::{Context, Result};
use rebound_lab::process::signal;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// What one round asks of fio.
#[derive(Debug, Clone)]
pub struct RoundSpec {
    pub name: String,
    pub uri: String,
    pub size: u64,
    pub runtime: Duration,
    pub seed: u64,
}

impl RoundSpec {
    fn args(&self) -> Vec<String> {
        vec![
            format!("--name={}", self.name),
            "--thread".into(),
            "--ioengine=nbd".into(),
            format!("--uri={}", self.uri),
            "--rw=randrw".into(),
            "--bsrange=4k-64k".into(),
            "--iodepth=8".into(),
            format!("--size={}", self.size),
            "--time_based".into(),
            format!("--runtime={}ms", self.runtime.as_millis()),
            "--random_distribution=zipf:1.2".into(),
            "--verify=crc32c".into(),
            // Verify as it goes: with a time-based mixed workload fio's
            // final verify pass trips over its own overwrites.
            "--verify_backlog=1024".into(),
            // No `<name>-<job>-verify.state` files left in the working
            // directory: a round's verify state is of no use afterwards.
            "--verify_state_save=0".into(),
            format!("--randseed={}", self.seed),
            "--output-format=json".into(),
        ]
    }
}

/// A running round.
pub struct Round {
    pub spec: RoundSpec,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    /// How many agent kills the soak had done when the round started.
    pub agent_kills_at_start: u64,
}

/// How a round ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub success: bool,
    pub written: u64,
    pub read: u64,
    /// fio's `verify:` lines: data read back differs from what was written.
    pub verify_errors: Vec<String>,
    /// The end of fio's stderr, for a report.
    pub stderr_tail: String,
}

impl Round {
    /// Starts fio with its output in `dir/<name>.{json,err}`.
    pub fn start(spec: RoundSpec, dir: &Path, agent_kills_at_start: u64) -> Result<Round> {
        let stdout = dir.join(format!("{}.json", spec.name));
        let stderr = dir.join(format!("{}.err", spec.name));
        let file = |p: &Path| {
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))
        };
        let child = Command::new("fio")
            .args(spec.args())
            .stdin(Stdio::null())
            .stdout(file(&stdout)?)
            .stderr(file(&stderr)?)
            .spawn()
            .context("cannot start fio (apt-get install -y fio)")?;
        Ok(Round {
            spec,
            child,
            stdout,
            stderr,
            agent_kills_at_start,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGSTOP: no new I/O until [`Round::resume`].
    pub fn pause(&self) -> Result<()> {
        signal(self.pid(), "STOP")
    }

    pub fn resume(&self) -> Result<()> {
        signal(self.pid(), "CONT")
    }

    /// The outcome once fio exited, `None` while it runs.
    pub fn poll(&mut self) -> Result<Option<Outcome>> {
        let Some(status) = self.child.try_wait().context("waiting for fio")? else {
            return Ok(None);
        };
        Ok(Some(self.outcome(status.success())))
    }

    /// Waits for the round to end by itself (its runtime), or kills it
    /// after `limit`.
    pub fn finish(&mut self, limit: Duration) -> Result<Outcome> {
        let end = std::time::Instant::now() + limit;
        loop {
            if let Some(o) = self.poll()? {
                return Ok(o);
            }
            if std::time::Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let mut o = self.outcome(false);
                o.stderr_tail = format!(
                    "fio did not end within {} s of its runtime; killed. {}",
                    limit.as_secs(),
                    o.stderr_tail
                );
                return Ok(o);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn outcome(&self, success: bool) -> Outcome {
        let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let (written, read) = io_bytes(&out);
        let verify_errors = err
            .lines()
            .filter(|l| l.contains("verify:") || l.contains("bad magic") || l.contains("crc32c"))
            .map(str::to_string)
            .collect();
        let lines: Vec<&str> = err.lines().collect();
        Outcome {
            success,
            written,
            read,
            verify_errors,
            stderr_tail: lines[lines.len().saturating_sub(5)..].join("\n"),
        }
    }
}

impl Drop for Round {
    /// A round still running when the soak ends early (an error) is killed.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.resume();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Bytes written and read from fio's JSON report (fio prints notes such as
/// "connected to NBD server" before it); 0 when there is none (fio died).
fn io_bytes(stdout: &str) -> (u64, u64) {
    let Some(start) = stdout.find('{') else {
        return (0, 0);
    };
    let Ok(v) = serde_json::from_str::<Value>(&stdout[start..]) else {
        return (0, 0);
    };
    let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
    jobs.iter().fold((0, 0), |(w, r), j| {
        (
            w + j["write"]["io_bytes"].as_u64().unwrap_or(0),
            r + j["read"]["io_bytes"].as_u64().unwrap_or(0),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_bytes_reads_the_report_after_fio_notes() {
        let out = "fio: connected to NBD server\n{\"jobs\":[{\"write\":{\"io_bytes\":4096},\"read\":{\"io_bytes\":8192}}]}";
        assert_eq!(io_bytes(out), (4096, 8192));
        assert_eq!(io_bytes("fio: error"), (0, 0));
        assert_eq!(io_bytes("{\"jobs\": [truncated"), (0, 0));
    }

    #[test]
    fn a_round_asks_for_zipf_randrw_with_crc32c_verify() {
        let spec = RoundSpec {
            name: "r".into(),
            uri: "nbd://127.0.0.1:1/disk0".into(),
            size: 1 << 20,
            runtime: Duration::from_secs(3),
            seed: 9,
        };
        let a = spec.args();
        for want in [
            "--ioengine=nbd",
            "--uri=nbd://127.0.0.1:1/disk0",
            "--rw=randrw",
            "--random_distribution=zipf:1.2",
            "--verify=crc32c",
            "--thread",
            "--runtime=3000ms",
            "--randseed=9",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
    }
}
