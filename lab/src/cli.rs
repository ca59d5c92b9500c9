//! Running the operator CLI (`rebound`) against a lab's configuration
//! server, as an operator would: a child process, stdin not a terminal so
//! long jobs print plain lines.

use crate::bin::Bins;
use anyhow::{Context, Result};
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};

/// What a CLI run gave.
#[derive(Debug)]
pub struct CliRun {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// stdout and stderr together (for error checks).
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// `rebound ARGS` without a configuration server in the environment (help,
/// `bench`, `demo`, `--mt` forms).
pub fn rebound<S: AsRef<OsStr>>(args: &[S]) -> Result<CliRun> {
    let bins = Bins::locate()?;
    let mut cmd = Command::new(bins.path("rebound")?);
    cmd.args(args).env_remove("REBOUND_CS");
    output(cmd, args)
}

/// `rebound ARGS` with `REBOUND_CS` and `REBOUND_CERTS` (a dir holding
/// ca.pem, admin.pem, admin.key).
pub fn run(bins: &Bins, cs_addr: &str, certs: &Path, args: &[&str]) -> Result<CliRun> {
    let mut cmd = Command::new(bins.path("rebound")?);
    cmd.args(args)
        .env("REBOUND_CS", cs_addr)
        .env("REBOUND_CERTS", certs);
    output(cmd, args)
}

/// Runs `cmd` to completion with stdin closed and no backtraces.
fn output<S: AsRef<OsStr>>(mut cmd: Command, args: &[S]) -> Result<CliRun> {
    let out = cmd
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            let a: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
            format!("cannot run rebound {}", a.join(" "))
        })?;
    Ok(CliRun {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
