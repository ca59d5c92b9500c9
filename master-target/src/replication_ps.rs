//! Which PS may carry a replication while it moves (`rebound move`): the MT
//! accepts the new PS's certificate before the agent switches to it, and
//! keeps accepting the PSs that carried the replication before, because
//! the old PS still forwards the records it acknowledged to the agent,
//! until the move job says the move is done (`move_done`).
//!
//! The assigned PS is `ps_id` in the replication's `state.json`; the PSs
//! it was moved away from are listed in `previous_ps.json` next to it
//! (written atomically and synced before the command answers; absent when
//! no move is under way).

use crate::control::MtControl;
use crate::error::{io_err, MtError, Result};
use crate::replication::Replication;
use rebound_proto::control as pb;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Mutex;
use tracing::{info, warn};

/// Serialises the changes of `previous_ps.json` (they are rare).
static CHANGES: Mutex<()> = Mutex::new(());

#[derive(Debug, Default, Serialize, Deserialize)]
struct PreviousPs {
    ps_ids: Vec<String>,
}

impl Replication {
    fn previous_ps_path(&self) -> PathBuf {
        self.root().join("previous_ps.json")
    }

    /// The PSs this replication is being moved away from (still accepted).
    pub fn previous_ps(&self) -> Vec<String> {
        let p = self.previous_ps_path();
        match std::fs::read(&p) {
            Ok(b) => match serde_json::from_slice::<PreviousPs>(&b) {
                Ok(v) => v.ps_ids,
                Err(e) => {
                    warn!(replication = %self.id(), path = %p.display(),
                        "unreadable list of the PSs this replication moves away from ({e}): only the assigned PS is accepted");
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        }
    }

    fn save_previous_ps(&self, ps_ids: Vec<String>) -> Result<()> {
        let p = self.previous_ps_path();
        let what = || format!("replication {}: {}", self.id(), p.display());
        if ps_ids.is_empty() {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(what)(e)),
                _ => {}
            }
            return rebound_common::durable::fsync_dir(self.root()).map_err(io_err(what));
        }
        let bytes = serde_json::to_vec_pretty(&PreviousPs { ps_ids })
            .map_err(|e| io_err(what)(std::io::Error::other(e)))?;
        rebound_common::durable::write_atomic(&p, &bytes).map_err(io_err(what))
    }

    /// Moves the replication to PS `ps_id`. While the move is under way
    /// (`done` false) the PSs that carried it before stay accepted; `done`
    /// forgets them. Idempotent (blocking).
    pub fn move_to_ps(&self, ps_id: &str, done: bool) -> Result<()> {
        let _one = CHANGES.lock().unwrap_or_else(|p| p.into_inner());
        let mut previous = self.previous_ps();
        if done {
            previous.clear();
        } else if let Some(old) = self.assigned_ps() {
            if old != ps_id && !previous.contains(&old) {
                previous.push(old);
            }
        }
        previous.retain(|p| p != ps_id);
        // The old PS is recorded before the new one is assigned, so no
        // crash in between leaves the old one refused.
        self.save_previous_ps(previous.clone())?;
        self.assign_ps(ps_id)?;
        info!(replication = %self.id(), ps = %ps_id, also_accepted = ?previous,
            "process server of the replication set (move {})", if done { "done" } else { "under way" });
        Ok(())
    }
}

impl MtControl {
    pub(crate) fn set_replication_ps(&self, c: &pb::SetReplicationPs) -> Result<pb::CommandResult> {
        if c.ps_id.is_empty() {
            return Err(MtError::InvalidArgument(format!(
                "SetReplicationPs for replication {} names no process server",
                c.replication_id
            )));
        }
        let r = self.replication(&c.replication_id)?;
        r.move_to_ps(&c.ps_id, c.move_done)?;
        Ok(rebound_common::control::ok_result())
    }
}
