//! A replication's route: the master target the configuration server's
//! AddReplication named for it, kept beside its cache so a restarted
//! process server forwards to the same MT before the CS says anything.

use std::path::{Path, PathBuf};
use tracing::warn;

/// Where one replication is forwarded to, set by the CS's AddReplication
/// and kept in `<cache_dir>/<replication>/route.json` so a restart forwards
/// to the same MT before the CS says anything.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    pub machine_id: String,
    pub mt_address: String,
    pub mt_server_name: String,
}

/// The route file of a replication's cache directory.
pub fn route_path(dir: &Path) -> PathBuf {
    dir.join("route.json")
}

/// Reads a replication's route, if it has one.
pub fn load_route(dir: &Path) -> Option<Route> {
    let path = route_path(dir);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(file = %path.display(), "route file is invalid ({e}); forwarding to the default [mt] until the CS sends AddReplication again");
            None
        }
    }
}
