//! A stand-in for the service manager: a `NOTIFY_SOCKET` datagram socket a
//! test listens on, and components started with it (and a watchdog asked
//! for), the way systemd starts a `Type=notify` unit.

use crate::process::Proc;
use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
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

/// Starts `bin run --config CONFIG` as a notify unit: with
/// `NOTIFY_SOCKET`, and `WATCHDOG_USEC`/`WATCHDOG_PID` naming its own pid.
/// The shell's pid is the component's after `exec`, which is how the
/// watchdog variables can name it before it exists.
pub fn run_notified(
    name: &str,
    bin: &Path,
    config: &Path,
    log: &Path,
    notify: &NotifySocket,
    watchdog: Duration,
) -> Result<Proc> {
    let usec = watchdog.as_micros().to_string();
    let args: [&OsStr; 8] = [
        "-c".as_ref(),
        r#"export NOTIFY_SOCKET="$1" WATCHDOG_USEC="$2" WATCHDOG_PID=$$; shift 2; exec "$0" "$@""#
            .as_ref(),
        bin.as_os_str(),
        notify.path().as_os_str(),
        usec.as_ref(),
        "run".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ];
    Proc::spawn(name, Path::new("sh"), &args, log)
}
