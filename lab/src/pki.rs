//! Certificates for a lab: a dev bundle from one generated CA (a lab
//! without a configuration server), or enrollment at the lab's CS the way
//! an operator deploys (`<binary> enroll`): agents with the passphrase, PS
//! and MT with a one-time token the lab's admin creates first (`rebound
//! token create`).

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

/// Enrollment at one configuration server: agents with one passphrase
/// file, servers with a token `admin_certs` creates.
pub struct Enroller<'a> {
    pub bins: &'a Bins,
    pub cs_addr: &'a str,
    pub passphrase_file: &'a Path,
    /// The operator's certificate dir (ca.pem, admin.pem, admin.key) that
    /// creates the servers' tokens; `None`: servers use the passphrase too
    /// (what a test of that refusal wants).
    pub admin_certs: Option<&'a Path>,
}

/// The role a component binary enrolls as.
fn role_of(bin: &str) -> &str {
    bin.strip_prefix("rebound-").unwrap_or(bin)
}

impl Enroller<'_> {
    /// `rebound token create --role ROLE --id ID --quiet` with the admin
    /// certificate: the token text.
    pub fn token(&self, role: &str, id: &str) -> Result<String> {
        let Some(certs) = self.admin_certs else {
            bail!("this lab has no admin certificate to create a token with");
        };
        let args = ["token", "create", "--role", role, "--id", id, "--quiet"];
        let r = crate::cli::run(self.bins, self.cs_addr, certs, &args)?;
        if !r.ok {
            bail!(
                "rebound token create --role {role} --id {id} failed: {}",
                r.text()
            );
        }
        Ok(r.stdout.trim().to_string())
    }

    /// The credential flags of `bin enroll` for `id`: a token file in `out`
    /// for a server when there is an admin certificate, else the
    /// passphrase file.
    fn credential(&self, bin: &str, id: &str, out: &Path) -> Result<Vec<std::ffi::OsString>> {
        if bin == "rebound-agent" || self.admin_certs.is_none() {
            return Ok(vec![
                "--passphrase-file".into(),
                self.passphrase_file.into(),
            ]);
        }
        let token = self.token(role_of(bin), id)?;
        let file = out.join("token");
        rebound_common::durable::write_atomic_mode(&file, token.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", file.display()))?;
        Ok(vec!["--token-file".into(), file.into()])
    }
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

    /// `<bin> enroll --cs CS --passphrase-file PASS | --token-file T --id ID
    /// --out OUT`, the raw output (tests check refusals too); servers are named as
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
        let credential = self.credential(bin, id, out)?;
        self.run(bin, id, out, names, credential)
    }

    /// `<bin> enroll --token-file` with `token` (any text); the raw output.
    pub fn output_token(&self, bin: &str, id: &str, out: &Path, token: &str) -> Result<Output> {
        std::fs::create_dir_all(out)?;
        let file = out.join("token");
        rebound_common::durable::write_atomic_mode(&file, token.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", file.display()))?;
        let credential = vec!["--token-file".into(), file.into()];
        self.run(bin, id, out, &Self::lab_names(bin), credential)
    }

    fn run(
        &self,
        bin: &str,
        id: &str,
        out: &Path,
        names: &[String],
        credential: Vec<std::ffi::OsString>,
    ) -> Result<Output> {
        let mut cmd = Command::new(self.bins.path(bin)?);
        cmd.args(["enroll", "--cs", self.cs_addr])
            .args(credential)
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
