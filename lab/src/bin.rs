//! Finding the built binaries a lab starts.
//!
//! They sit next to the running executable (`target/debug/rebound`) or one
//! dir up from it (a test binary runs from `target/debug/deps`);
//! `REBOUND_BIN_DIR` overrides both, so a bench can measure release
//! binaries from anywhere.

use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;

/// The environment variable naming the directory of the binaries.
pub const BIN_DIR_ENV: &str = "REBOUND_BIN_DIR";

/// The directory holding the workspace binaries.
#[derive(Debug, Clone)]
pub struct Bins {
    pub dir: PathBuf,
}

impl Bins {
    /// `REBOUND_BIN_DIR`, else the running executable's dir, or its parent
    /// when that dir is cargo's `deps` (a test binary).
    pub fn locate() -> Result<Bins> {
        if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
            return Ok(Bins {
                dir: PathBuf::from(dir),
            });
        }
        let exe = std::env::current_exe().context("cannot find the running executable")?;
        let here = exe
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
        let dir = match here.parent() {
            Some(up) if here.file_name().is_some_and(|n| n == "deps") => up,
            _ => here,
        };
        Ok(Bins {
            dir: dir.to_path_buf(),
        })
    }

    /// The path of binary `name`; an error saying how to build it when it
    /// is missing.
    pub fn path(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        if !path.is_file() {
            bail!(
                "{} not found: build the binaries first with `cargo build --workspace --bins` \
                 (or set {BIN_DIR_ENV} to the directory holding them)",
                path.display()
            );
        }
        Ok(path)
    }

    /// Whether every named binary is there (an error naming the first
    /// missing one).
    pub fn check(&self, names: &[&str]) -> Result<()> {
        names.iter().try_for_each(|n| self.path(n).map(|_| ()))
    }
}

/// The path of a workspace binary, located as [`Bins::locate`] says.
pub fn binary(name: &str) -> Result<PathBuf> {
    Bins::locate()?.path(name)
}
