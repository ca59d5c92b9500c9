//! `rebound certs`: a lab PKI on disk, so the binaries can be started by
//! hand with mutual TLS before enrollment exists.

use anyhow::{Context, Result};
use rebound_common::pki::{lifetime, local_server_names, write_dev_bundle_with};
use std::path::Path;
use std::time::Duration;

/// Writes the CA and certificates for a PS, an MT, the admin and one agent
/// per machine into `dir`, valid for `lifetime`, and prints what it wrote.
pub fn write(dir: &Path, machines: &[String], lifetime: Duration) -> Result<()> {
    write_dev_bundle_with(dir, machines, &local_server_names(), lifetime)
        .with_context(|| format!("writing the lab PKI into {}", dir.display()))?;
    println!(
        "wrote a lab PKI into {} (certificates valid for {}, the CA for {}):",
        dir.display(),
        lifetime::format(lifetime),
        lifetime::format(lifetime::CA)
    );
    println!("  ca.pem ca.key          the CA (keep ca.key private)");
    println!("  ps.pem ps.key          process server (server name localhost)");
    println!("  mt.pem mt.key          master target (server name localhost)");
    println!("  admin.pem admin.key    the operator CLI");
    for m in machines {
        println!("  agent-{m}.pem agent-{m}.key  the agent of machine {m}");
    }
    Ok(())
}
