//! Child processes of a lab: started with `run --config`, logged to
//! `<lab>/<name>.log`, checked for readiness, SIGKILLed or SIGTERMed, and
//! killed on drop so a failing test leaves no orphans.
//!
//! Signals go through the `kill` command, which keeps the crate free of
//! unsafe code; processes the lab did not spawn itself (agents a power_on
//! hook started detached) are signalled by pid the same way.

use crate::wait::wait_for;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a component may take to listen after its start.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a component may take to exit after SIGTERM (the agent drains).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(150);

/// One running child process and its log.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    reaped: bool,
}

impl Proc {
    /// Starts `bin ARGS` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, bin: &Path, args: &[&std::ffi::OsStr], log: &Path) -> Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open the log {}", log.display()))?;
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {} as {name}", bin.display()))?;
        Ok(Proc {
            name: name.to_string(),
            log: log.to_path_buf(),
            child,
            reaped: false,
        })
    }

    /// `bin run --config CONFIG`, the way every component runs.
    pub fn run(name: &str, bin: &Path, config: &Path, log: &Path) -> Result<Proc> {
        Self::spawn(
            name,
            bin,
            &["run".as_ref(), "--config".as_ref(), config.as_os_str()],
            log,
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails, with the log tail, when the process exited on its own.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            self.reaped = true;
            bail!(
                "{} exited unexpectedly ({st}); log tail:\n{}",
                self.name,
                log_tail(&self.log, 40)
            );
        }
        Ok(())
    }

    /// Waits until `addr` accepts connections and this process (not another
    /// one on a reused port) is still the one running.
    pub fn wait_listening(&mut self, addr: SocketAddr) -> Result<()> {
        let what = format!("{} to listen on {addr}", self.name);
        wait_for(&what, START_TIMEOUT, Duration::from_millis(20), || {
            self.check_alive()?;
            Ok(TcpStream::connect(addr).is_ok())
        })?;
        // A process that failed to bind exits at once.
        std::thread::sleep(Duration::from_millis(100));
        self.check_alive()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) -> Result<()> {
        self.child
            .kill()
            .with_context(|| format!("cannot SIGKILL {}", self.name))?;
        self.child.wait()?;
        self.reaped = true;
        Ok(())
    }

    /// SIGTERM and wait for the exit (SIGKILL after [`STOP_TIMEOUT`]); the
    /// exit status and how long the exit took.
    pub fn stop(mut self) -> Result<(ExitStatus, Duration)> {
        let t = Instant::now();
        signal(self.pid(), "TERM")?;
        loop {
            if let Some(st) = self.child.try_wait()? {
                self.reaped = true;
                return Ok((st, t.elapsed()));
            }
            if t.elapsed() > STOP_TIMEOUT {
                bail!(
                    "{} did not exit within {STOP_TIMEOUT:?} of SIGTERM",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The named children of a lab, each logging to `<dir>/<name>.log`.
#[derive(Debug, Default)]
pub struct Procs {
    dir: PathBuf,
    procs: BTreeMap<String, Proc>,
}

impl Procs {
    pub fn new(dir: &Path) -> Procs {
        Procs {
            dir: dir.to_path_buf(),
            procs: BTreeMap::new(),
        }
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// Starts `bin run --config CONFIG` as `name` and waits until it
    /// listens on `ready`.
    pub fn start(
        &mut self,
        name: &str,
        bin: &Path,
        config: &Path,
        ready: SocketAddr,
    ) -> Result<()> {
        if self.procs.contains_key(name) {
            bail!("{name} is already running");
        }
        let mut p = Proc::run(name, bin, config, &self.log_path(name))?;
        p.wait_listening(ready)?;
        self.procs.insert(name.to_string(), p);
        Ok(())
    }

    pub fn is_running(&self, name: &str) -> bool {
        self.procs.contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.procs.keys().cloned().collect()
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.get(name).map(Proc::pid)
    }

    fn take(&mut self, name: &str) -> Result<Proc> {
        self.procs
            .remove(name)
            .ok_or_else(|| anyhow!("{name} is not running"))
    }

    /// Fails when `name` exited on its own (and forgets it).
    pub fn check_alive(&mut self, name: &str) -> Result<()> {
        let res = match self.procs.get_mut(name) {
            Some(p) => p.check_alive(),
            None => return Ok(()),
        };
        if res.is_err() {
            self.procs.remove(name);
        }
        res
    }

    pub fn kill9(&mut self, name: &str) -> Result<()> {
        self.take(name)?.kill9()
    }

    /// SIGTERM and wait; the exit status and how long the exit took.
    pub fn stop(&mut self, name: &str) -> Result<(ExitStatus, Duration)> {
        self.take(name)?.stop()
    }

    /// SIGTERM and wait; an error with the log tail unless it exits cleanly.
    pub fn stop_clean(&mut self, name: &str) -> Result<Duration> {
        let (st, took) = self.stop(name)?;
        if !st.success() {
            bail!(
                "{name} exited with {st} on SIGTERM; log tail:\n{}",
                log_tail(&self.log_path(name), 30)
            );
        }
        Ok(took)
    }

    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        log_tail(&self.log_path(name), lines)
    }

    /// SIGKILLs everything, in `first` order, the rest after.
    pub fn kill_all(&mut self, first: &[&str]) {
        for n in first {
            if let Some(p) = self.procs.remove(*n) {
                let _ = p.kill9();
            }
        }
        for (_, p) in std::mem::take(&mut self.procs) {
            let _ = p.kill9();
        }
    }
}

/// The last `lines` lines of a log file ("" when there is none).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Sends a signal (`TERM`, `KILL`) to a process with `kill(1)`.
pub fn signal(pid: u32, sig: &str) -> Result<()> {
    let st = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .context("cannot run kill(1)")?;
    if !st.success() {
        bail!("kill -s {sig} {pid} failed ({st}): no such process?");
    }
    Ok(())
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// SIGKILLs a process the lab did not spawn (a hook-started agent) and
/// waits until it is gone, so its listening ports are free again: the
/// kernel delivers the signal at once but tears the process down later.
pub fn kill9_pid(pid: u32, timeout: Duration) -> Result<()> {
    let _ = signal(pid, "KILL");
    let t = Instant::now();
    while alive(pid) {
        if t.elapsed() > timeout {
            bail!("process {pid} is still alive {timeout:?} after SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// SIGTERMs a process the lab did not spawn (a hook-started agent) and
/// waits for it to go; SIGKILL after `timeout`.
pub fn terminate_pid(pid: u32, timeout: Duration) {
    if signal(pid, "TERM").is_err() {
        return;
    }
    let t = Instant::now();
    while alive(pid) {
        if t.elapsed() > timeout {
            let _ = signal(pid, "KILL");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGKILLs every process whose command line names a path under `dir`:
/// power-on hooks start agents detached (setsid), and a hook that ran
/// twice may have left one its pid file no longer names.
pub fn kill_everything_under(dir: &Path) {
    let needle = dir.to_string_lossy().to_string();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if pid != me && String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = signal(pid, "KILL");
        }
    }
}
