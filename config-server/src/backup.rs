//! `rebound-cs backup` and `restore` for the SQLite deployment: a
//! consistent copy of the database taken while the CS runs, and putting one
//! back while it is stopped.

use crate::config::Config;
use crate::error::CsError;
use std::path::Path;

/// What a backup or restore did, as the command prints it.
#[derive(Debug)]
pub struct Report(pub String);

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Copies the database of `config` to `to`.
pub async fn backup(config: &Config, to: &Path) -> Result<Report, CsError> {
    let _ = (config, to);
    Err(CsError::Internal("backup is not built yet".into()))
}

/// Puts the copy at `from` in place of the database of `config`.
pub async fn restore(config: &Config, from: &Path) -> Result<Report, CsError> {
    let _ = (config, from);
    Err(CsError::Internal("restore is not built yet".into()))
}
