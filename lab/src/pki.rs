//! Certificates for a lab: a dev bundle from one generated CA (a lab
//! without a configuration server), or enrollment at the lab's CS with its
//! passphrase (`<binary> enroll`), the way an operator deploys.

use crate::bin::Bins;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Command, Output};

/// `ca.pem`, `ps`, `mt`, `admin` and `agent-<machine>` certificates from one
/// new CA in `dir`, the servers valid for every loopback host a lab hands
/// out ([`lab_hosts`]), so a PS or MT may run on any of them and be dialled
/// by its address.
pub fn dev_bundle(dir: &Path, machines: &[String]) -> Result<()> {
    rebound_common::pki::write_dev_bundle_for(dir, machines, &lab_hosts())
        .with_context(|| format!("cannot write the lab PKI in {}", dir.display()))
}

/// `localhost` and 127.0.0.1 to 127.0.0.254: the names of every simulated
/// host (`net::Host`).
pub fn lab_hosts() -> Vec<String> {
    std::iter::once("localhost".to_string())
        .chain((1..=254).map(|n| format!("127.0.0.{n}")))
        .collect()
}

/// Enrollment at one configuration server with one passphrase file.
pub struct Enroller<'a> {
    pub bins: &'a Bins,
    pub cs_addr: &'a str,
    pub passphrase_file: &'a Path,
}

impl Enroller<'_> {
    /// The names a lab server gets when none are given: `localhost` and
    /// 127.0.0.1, where a one-host lab reaches it (agents get none).
    fn lab_names(bin: &str) -> Vec<String> {
        if bin == "rebound-agent" {
            Vec::new()
        } else {
            rebound_common::pki::local_server_names()
        }
    }

    /// `<bin> enroll --cs CS --passphrase-file PASS --id ID --out OUT`, the
    /// raw output (tests check refusals too); servers are named as
    /// [`Enroller::lab_names`] says.
    pub fn output(&self, bin: &str, id: &str, out: &Path) -> Result<Output> {
        self.output_named(bin, id, out, &Self::lab_names(bin))
    }

    /// The same with `--name N` for each of `names`.
    pub fn output_named(
        &self,
        bin: &str,
        id: &str,
        out: &Path,
        names: &[String],
    ) -> Result<Output> {
        std::fs::create_dir_all(out)?;
        let mut cmd = Command::new(self.bins.path(bin)?);
        cmd.args(["enroll", "--cs", self.cs_addr, "--passphrase-file"])
            .arg(self.passphrase_file)
            .args(["--id", id, "--out"])
            .arg(out);
        for n in names {
            cmd.args(["--name", n]);
        }
        // A config that does not exist: default names never come from the
        // host's /etc/rebound, which is not the lab's.
        cmd.arg("--config").arg(out.join("no-config.toml"));
        cmd.output()
            .with_context(|| format!("cannot run {bin} enroll"))
    }

    /// Enrolls `id` with `bin` (servers for `localhost` and 127.0.0.1); an
    /// error with the binary's output when refused.
    pub fn enroll(&self, bin: &str, id: &str, out: &Path) -> Result<()> {
        self.enroll_named(bin, id, out, &Self::lab_names(bin))
    }

    /// Enrolls `id` with `bin`, its certificate valid as a server for
    /// exactly `names` (none for an agent).
    pub fn enroll_named(&self, bin: &str, id: &str, out: &Path, names: &[String]) -> Result<()> {
        let r = self.output_named(bin, id, out, names)?;
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
