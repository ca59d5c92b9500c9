//! Real NBD clients (qemu-io, qemu-img, nbdcopy, fio) and content hashing.
//!
//! A missing client is a test failure that names the package to install,
//! never a silent skip (DESIGN.md §10).

use anyhow::{bail, Context, Result};
use rebound_common::tls::TlsFiles;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Which Debian package provides each client.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
        "nbdcopy" | "nbdinfo" => "libnbd-bin",
        "fio" => "fio",
        "rsync" => "rsync",
        "cp" => "coreutils",
        _ => "?",
    }
}

/// Runs a client to completion; fails with the install command when absent.
pub fn run_tool(tool: &str, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(tool);
    cmd.args(args);
    run_command(cmd, tool, args)
}

/// Runs `cmd` (the client `tool` with `args`, set up by the caller, e.g.
/// pinned to CPUs) to completion; fails with the install command when the
/// tool is absent and with its output when it fails.
pub fn run_command(mut cmd: Command, tool: &str, args: &[&str]) -> Result<Output> {
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{tool} is not installed; install it with `apt-get install -y {}`",
            package_of(tool)
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot start {tool}")),
    };
    if !out.status.success() {
        bail!(
            "{tool} {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// `nbd://HOST:PORT/EXPORT`.
pub fn nbd_uri(addr: SocketAddr, export: &str) -> String {
    format!("nbd://{addr}/{export}")
}

/// `nbds://HOST:PORT/EXPORT?tls-certificates=DIR`: NBD with STARTTLS and
/// the client certificate in `certs` (see [`nbd_tls_dir`]), as libnbd's
/// tools and Rebound's own NBD client read it.
pub fn nbds_uri(addr: SocketAddr, export: &str, certs: &Path) -> String {
    format!(
        "nbds://{addr}/{export}?tls-certificates={}",
        certs.display()
    )
}

/// Makes `dir` a certificate directory as libnbd (`tls-certificates=DIR`)
/// and qemu (`tls-creds-x509,dir=DIR`) want it: `ca-cert.pem`,
/// `client-cert.pem`, `client-key.pem` (0600) copied from `tls`.
pub fn nbd_tls_dir(tls: &TlsFiles, dir: &Path) -> Result<PathBuf> {
    rebound_common::nbd::tls::write_client_dir(tls, dir).with_context(|| {
        format!(
            "cannot make the NBD certificate directory {}",
            dir.display()
        )
    })?;
    Ok(dir.to_path_buf())
}

/// qemu's arguments for reading `export` at `addr` over TLS with the
/// certificate directory `certs`: `--object tls-creds-x509,...` and an
/// `--image-opts` image, for `qemu-img` subcommands that take both.
pub fn qemu_tls_args(addr: SocketAddr, export: &str, certs: &Path) -> [String; 4] {
    [
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            certs.display()
        ),
        "--image-opts".into(),
        format!(
            "driver=nbd,host={},port={},export={export},tls-creds=tls0",
            addr.ip(),
            addr.port()
        ),
    ]
}

/// Runs qemu-io commands (`-c`) against an NBD export; qemu-io reports
/// pattern mismatches on stdout, so those are failures too.
pub fn qemu_io(uri: &str, cmds: &[String]) -> Result<String> {
    let mut args: Vec<&str> = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let out = run_tool("qemu-io", &args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if stdout.contains("Pattern verification failed") || stdout.contains("failed:") {
        bail!("qemu-io {cmds:?} on {uri} reported a failure:\n{stdout}");
    }
    Ok(stdout)
}

/// Copies a whole NBD export into a local file with nbdcopy.
pub fn nbdcopy_to_file(uri: &str, dest: &Path) -> Result<()> {
    run_tool("nbdcopy", &[uri, &dest.to_string_lossy()])?;
    Ok(())
}

/// blake3 of a whole file, hex.
pub fn blake3_file(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_mmap(path)
        .with_context(|| format!("cannot hash {}", path.display()))?;
    Ok(h.finalize().to_hex().to_string())
}

/// blake3 of a whole NBD export, read with nbdcopy into `scratch`.
pub fn blake3_export(uri: &str, scratch: &Path) -> Result<String> {
    let _ = std::fs::remove_file(scratch);
    nbdcopy_to_file(uri, scratch)?;
    let h = blake3_file(scratch)?;
    let _ = std::fs::remove_file(scratch);
    Ok(h)
}

/// Writes `data` at `offset` of a file (to prepare or damage replicas).
pub fn write_at(path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    f.write_all_at(data, offset).with_context(|| {
        format!(
            "cannot write {} bytes at {offset} of {}",
            data.len(),
            path.display()
        )
    })
}
