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

/// `<bin> enroll --cs CS --passphrase-file PASS --id ID --out OUT`, the raw
/// output (tests check refusals too).
pub fn enroll_output(
    bins: &Bins,
    bin: &str,
    cs_addr: &str,
    pass: &Path,
    id: &str,
    out: &Path,
) -> Result<Output> {
    std::fs::create_dir_all(out)?;
    Command::new(bins.path(bin)?)
        .args(["enroll", "--cs", cs_addr, "--passphrase-file"])
        .arg(pass)
        .args(["--id", id, "--out"])
        .arg(out)
        .output()
        .with_context(|| format!("cannot run {bin} enroll"))
}

/// Enrolls `id` with `bin`; an error with the binary's output when refused.
pub fn enroll(
    bins: &Bins,
    bin: &str,
    cs_addr: &str,
    pass: &Path,
    id: &str,
    out: &Path,
) -> Result<()> {
    let r = enroll_output(bins, bin, cs_addr, pass, id, out)?;
    if !r.status.success() {
        bail!(
            "{bin} enroll --id {id} at {cs_addr} failed: {}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
    }
    Ok(())
}
