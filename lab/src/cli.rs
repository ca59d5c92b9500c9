//! Running the operator CLI (`rebound`) against a lab's configuration
//! server, as an operator would: a child process, stdin not a terminal so
//! long jobs print plain lines.

use crate::bin::Bins;
use anyhow::{Context, Result};
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

/// `rebound ARGS` with `REBOUND_CS` and `REBOUND_CERTS` (a dir holding
/// ca.pem, admin.pem, admin.key).
pub fn run(bins: &Bins, cs_addr: &str, certs: &Path, args: &[&str]) -> Result<CliRun> {
    let out = Command::new(bins.path("rebound")?)
        .args(args)
        .env("REBOUND_CS", cs_addr)
        .env("REBOUND_CERTS", certs)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run rebound {}", args.join(" ")))?;
    Ok(CliRun {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
