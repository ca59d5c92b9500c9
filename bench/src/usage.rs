//! What a process and the machine use, read from /proc: CPU seconds per
//! process (to diff over a load), busy CPU seconds of the whole machine,
//! and a process's peak resident set (VmHWM).
//!
//! By pid, so the same reads serve the lab's children, `qemu-nbd` and the
//! bench itself ("self").

use anyhow::{bail, Context, Result};

/// CPU seconds (user + system) of /proc/<pid> ("self" for this process).
pub fn cpu_secs_of(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / crate::sys::clock_ticks_per_sec())
}

/// CPU seconds the whole machine has been busy (all CPUs, everything but
/// idle and iowait), from the first line of /proc/stat.
pub fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let busy: f64 = f.iter().take(8).sum::<f64>() - f.get(3)? - f.get(4)?;
    Some(busy / crate::sys::clock_ticks_per_sec())
}

/// VmHWM of a process, bytes.
pub fn vm_hwm(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for l in s.lines() {
        if let Some(rest) = l.strip_prefix("VmHWM:") {
            let kb: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("parsing VmHWM {rest:?} of pid {pid}"))?;
            return Ok(kb * 1024);
        }
    }
    bail!("no VmHWM in /proc/{pid}/status")
}
