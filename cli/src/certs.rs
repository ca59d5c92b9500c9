//! `rebound certs`: a lab PKI on disk, so the binaries can be started by
//! hand with mutual TLS before enrollment exists.

use anyhow::{Context, Result};
use std::path::Path;

/// Writes the CA and certificates for a PS, an MT, the admin and one agent per
/// machine into `dir`, and prints what it wrote.
pub fn write(dir: &Path, machines: &[String]) -> Result<()> {
    rebound_common::pki::write_dev_bundle(dir, machines)
        .with_context(|| format!("writing the lab PKI into {}", dir.display()))?;
    println!("wrote a lab PKI into {}:", dir.display());
    println!("  ca.pem ca.key          the CA (keep ca.key private)");
    println!("  ps.pem ps.key          process server (server name localhost)");
    println!("  mt.pem mt.key          master target (server name localhost)");
    println!("  admin.pem admin.key    the operator CLI");
    for m in machines {
        println!("  agent-{m}.pem agent-{m}.key  the agent of machine {m}");
    }
    Ok(())
}
