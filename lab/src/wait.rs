//! Polling until a condition holds: readiness of processes, replication
//! catching up, jobs finishing.

use anyhow::{bail, Result};
use std::time::{Duration, Instant};

/// Polls `cond` every 50 ms until it is true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    wait_for(what, timeout, Duration::from_millis(50), || Ok(cond()))
}

/// Polls a fallible `cond` every `every` until it is true, it fails, or
/// `timeout` passes.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if cond()? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}
