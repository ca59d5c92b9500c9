//! The external tools the bench compares with or drives (fio, qemu-nbd,
//! rsync, cp), checked before anything runs: a missing tool is an error that
//! names the package to install, never a skipped row.

use anyhow::{bail, Result};
use std::process::{Command, Output};

use crate::placement::Cpus;

/// (tool, Debian package).
pub const TOOLS: &[(&str, &str)] = &[
    ("fio", "fio"),
    ("qemu-nbd", "qemu-utils"),
    ("rsync", "rsync"),
    ("cp", "coreutils"),
];

/// Fails when a tool is missing, naming every missing one and the command
/// that installs them.
pub fn check_all() -> Result<()> {
    let mut missing = Vec::new();
    for (t, p) in TOOLS {
        let found = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).any(|d| d.join(t).is_file()))
            .unwrap_or(false);
        if !found {
            missing.push((*t, *p));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let tools: Vec<&str> = missing.iter().map(|m| m.0).collect();
    let mut pkgs: Vec<&str> = missing.iter().map(|m| m.1).collect();
    pkgs.dedup();
    bail!(
        "the bench needs {} which {} not installed; install with `apt-get install -y {}`",
        tools.join(", "),
        if tools.len() == 1 { "is" } else { "are" },
        pkgs.join(" ")
    )
}

/// Runs a tool to completion bound to `cpus` when given (unbound, it is
/// [`rebound_lab::run_tool`]); a failure shows its output.
pub fn run_on(tool: &str, args: &[&str], cpus: Option<&Cpus>) -> Result<Output> {
    let Some(cpus) = cpus else {
        return rebound_lab::run_tool(tool, args);
    };
    let mut cmd = Command::new(tool);
    cmd.args(args);
    cpus.pin_command(&mut cmd);
    rebound_lab::run_command(cmd, tool, args)
}
