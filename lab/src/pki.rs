//! Certificates for a lab: a dev bundle from one generated CA (a lab
//! without a configuration server), or enrollment at the lab's CS with its
//! passphrase (`<binary> enroll`), the way an operator deploys.

use crate::bin::Bins;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Command, Output};

/// `ca.pem`, `ps`, `mt`, `admin` and `agent-<machine>` certificates from one
/// new CA in `dir` (servers valid for `localhost` and 127.0.0.1).
pub fn dev_bundle(dir: &Path, machines: &[String]) -> Result<()> {
    rebound_common::pki::write_dev_bundle(dir, machines)
        .with_context(|| format!("cannot write the lab PKI in {}", dir.display()))
}

/// Enrollment at one configuration server with one passphrase file.
pub struct Enroller<'a> {
    pub bins: &'a Bins,
    pub cs_addr: &'a str,
    pub passphrase_file: &'a Path,
}

impl Enroller<'_> {
    /// `<bin> enroll --cs CS --passphrase-file PASS --id ID --out OUT`, the
    /// raw output (tests check refusals too).
    pub fn output(&self, bin: &str, id: &str, out: &Path) -> Result<Output> {
        std::fs::create_dir_all(out)?;
        Command::new(self.bins.path(bin)?)
            .args(["enroll", "--cs", self.cs_addr, "--passphrase-file"])
            .arg(self.passphrase_file)
            .args(["--id", id, "--out"])
            .arg(out)
            .output()
            .with_context(|| format!("cannot run {bin} enroll"))
    }

    /// Enrolls `id` with `bin`; an error with the binary's output when
    /// refused.
    pub fn enroll(&self, bin: &str, id: &str, out: &Path) -> Result<()> {
        let r = self.output(bin, id, out)?;
        if !r.status.success() {
            bail!(
                "{bin} enroll --id {id} at {} failed: {}{}",
                self.cs_addr,
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            );
        }
        Ok(())
    }
}
