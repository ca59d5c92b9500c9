//! A stand-in for the service manager: a `NOTIFY_SOCKET` datagram socket a
//! test listens on, and components started with it (and a watchdog asked
//! for), the way systemd starts a `Type=notify` unit.

use crate::process::{log_tail, signal};
use anyhow::{bail, Context, Result};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The socket a component sends `READY=1`, `STOPPING=1`, `WATCHDOG=1` to.
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    /// Binds a fresh socket in a temp dir (short path: sun_path is small).
    pub fn bind() -> Result<NotifySocket> {
        let dir = tempfile::Builder::new().prefix("rb-notify-").tempdir()?;
        let path = dir.path().join("notify.sock");
        let sock =
            UnixDatagram::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
        Ok(NotifySocket {
            sock,
            path,
            _dir: dir,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receives messages until one has the line `state` (e.g. `READY=1`),
    /// within `timeout`; every message received, that one last.
    pub fn wait_for(&self, state: &str, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no {state} within {timeout:?}; received {seen:?}");
            }
            self.sock.set_read_timeout(Some(left))?;
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let hit = msg.lines().any(|l| l == state);
                    seen.push(msg);
                    if hit {
                        return Ok(seen);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e).context("receiving on the notify socket"),
            }
        }
    }
}

/// A component started as a notify unit: `bin run --config CONFIG` with
/// `NOTIFY_SOCKET`, and `WATCHDOG_USEC`/`WATCHDOG_PID` naming its own pid.
pub struct NotifiedProc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl NotifiedProc {
    pub fn run(
        name: &str,
        bin: &Path,
        config: &Path,
        log: &Path,
        notify: &NotifySocket,
        watchdog: Duration,
    ) -> Result<NotifiedProc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open the log {}", log.display()))?;
        // The shell's pid is the component's pid after `exec`, which is how
        // the watchdog variables can name it before it exists.
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"WATCHDOG_PID=$$ exec "$0" "$@""#)
            .arg(bin)
            .args(["run".as_ref(), "--config".as_ref(), config.as_os_str()])
            .env("NOTIFY_SOCKET", notify.path())
            .env("WATCHDOG_USEC", watchdog.as_micros().to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {} as {name}", bin.display()))?;
        Ok(NotifiedProc {
            name: name.to_string(),
            log: log.to_path_buf(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then the exit status (SIGKILL after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        signal(self.pid(), "TERM")?;
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if t.elapsed() > timeout {
                let _ = self.child.kill();
                bail!(
                    "{} did not exit within {timeout:?} of SIGTERM; log tail:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for NotifiedProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
