//! `<state_dir>/replication.json`: where the CS told the agent to stream,
//! kept across restarts, and, during a move to another PS, until when the
//! stream waits for the old PS to forward what it acknowledged. Keeping
//! that end with the assignment is what lets an agent restarted mid-move
//! still wait instead of taking the old PS's records as lost.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rebound_common::time::now_ms;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::sender::Moving;

/// Where the agent streams: the replication and its PS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub replication_id: String,
    pub ps_addr: String,
    pub ps_server_name: String,
}

/// The file's content: the assignment and, during a move, until when
/// (ms since the epoch) the stream waits for the old PS.
#[derive(Serialize, Deserialize)]
struct Assigned {
    #[serde(flatten)]
    assignment: Assignment,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    moving_until_ms: Option<u64>,
}

/// `replication.json`, written by one writer at a time (the sender ends a
/// move in it while a command may record a new assignment).
pub(super) struct AssignmentFile {
    path: PathBuf,
    write: Mutex<()>,
}

impl AssignmentFile {
    pub(super) fn new(path: PathBuf) -> AssignmentFile {
        AssignmentFile {
            path,
            write: Mutex::new(()),
        }
    }

    /// The recorded assignment, if any.
    pub(super) fn load(&self) -> Option<Assignment> {
        read(&self.path).map(|a| a.assignment)
    }

    /// The end of the recorded move, if one is recorded.
    pub(super) fn recorded_move(&self) -> Option<u64> {
        read(&self.path)?.moving_until_ms
    }

    /// The end of a move recorded with `a` that has not run out yet.
    pub(super) fn pending_move(&self, a: &Assignment) -> Option<u64> {
        read(&self.path)
            .filter(|r| &r.assignment == a)
            .and_then(|r| r.moving_until_ms)
            .filter(|&until| until > now_ms())
    }

    /// Records `a` (moving until `moving_until_ms`), or removes the file.
    pub(super) fn save(
        &self,
        a: Option<&Assignment>,
        moving_until_ms: Option<u64>,
    ) -> std::io::Result<()> {
        let _one = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let a = a.map(|a| Assigned {
            assignment: a.clone(),
            moving_until_ms,
        });
        write(&self.path, a.as_ref())
    }

    /// The sender's side of a move of `a` ending at `until_ms`: its
    /// deadline, and the end of the move recorded once the new PS resumes
    /// (unless another assignment was recorded meanwhile).
    pub(super) fn moving(self: &std::sync::Arc<Self>, a: &Assignment, until_ms: u64) -> Moving {
        let file = self.clone();
        let a = a.clone();
        let left = Duration::from_millis(until_ms.saturating_sub(now_ms()));
        Moving {
            until: Instant::now() + left,
            over: Box::new(move || {
                let _one = file.write.lock().unwrap_or_else(|p| p.into_inner());
                let Some(r) = read(&file.path) else { return };
                if r.assignment != a || r.moving_until_ms.is_none() {
                    return;
                }
                let done = Assigned {
                    assignment: a,
                    moving_until_ms: None,
                };
                if let Err(e) = write(&file.path, Some(&done)) {
                    warn!(
                        "cannot record the end of the move in {}: {e}",
                        file.path.display()
                    );
                }
            }),
        }
    }
}

/// Reads the file; None when missing or unreadable (logged).
fn read(path: &Path) -> Option<Assigned> {
    let text = std::fs::read(path).ok()?;
    match serde_json::from_slice(&text) {
        Ok(a) => Some(a),
        Err(e) => {
            warn!("ignoring {}: {e}", path.display());
            None
        }
    }
}

/// Writes (or, for None, removes) the file durably.
fn write(path: &Path, a: Option<&Assigned>) -> std::io::Result<()> {
    match a {
        Some(a) => {
            let text = serde_json::to_vec_pretty(a).map_err(std::io::Error::other)?;
            rebound_common::durable::write_atomic(path, &text)
        }
        None => match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}
