//! Data-side helpers of `rebound demo`: qemu-io writes and qemu-img reads
//! through NBD, blake3 of files and exports, and the agent's admin socket.

use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Runs an NBD client tool; its stdout, or an error that says what to install.
pub fn tool(name: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(name).args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!("{name} is not installed: the demo writes and reads through real NBD clients; install them with `apt-get install -y qemu-utils`")
        } else {
            anyhow!("cannot run {name}: {e}")
        }
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() || stdout.contains("failed") {
        bail!(
            "{name} {} failed: {}{}",
            args.join(" "),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// `qemu-io` with several `-c` commands against an NBD URI.
pub fn qemu_io(uri: &str, cmds: &[String]) -> Result<()> {
    let mut args: Vec<&str> = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    tool("qemu-io", &args).map(|_| ())
}

pub fn hash_file(p: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_mmap(p)
        .with_context(|| format!("hashing {}", p.display()))?;
    Ok(h.finalize().to_hex().to_string())
}

/// blake3 of an NBD export, read with qemu-img into a scratch file.
pub fn hash_export(uri: &str, scratch: &Path) -> Result<String> {
    let _ = std::fs::remove_file(scratch);
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            &scratch.to_string_lossy(),
        ],
    )?;
    let h = hash_file(scratch)?;
    std::fs::remove_file(scratch)?;
    Ok(h)
}

/// One request on an agent's admin socket.
pub fn agent_admin(sock: &Path, req: serde_json::Value) -> Result<serde_json::Value> {
    let mut s = UnixStream::connect(sock)
        .with_context(|| format!("connecting to the agent's admin socket {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    writeln!(s, "{req}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line)
        .with_context(|| format!("agent admin answer {line:?} is not JSON"))?;
    if let Some(e) = v.get("error") {
        bail!("agent refused {req}: {e}");
    }
    Ok(v)
}
