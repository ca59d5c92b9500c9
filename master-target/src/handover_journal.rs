//! The failed-over machine's writes (DESIGN.md §7 "Hand-over"): until
//! commit, the machine's agent saves the pre-image of every block before its
//! first write into the hand-over journal of its disk
//! (`<replication>/handover/<disk>.journal`, made empty at hand-over), so
//! change-point can stop the machine and put the replica back exactly as it
//! was handed over:
//!
//! - **PowerOff** runs the `power_off` hook, then fences the machine (an
//!   exclusive `flock` on every journal: its agent holds one while it
//!   runs), writes every pre-image back into the replica, fdatasyncs it and
//!   deletes the journals. Then RestorePreImages, Rollback and HandOver work
//!   as before the machine ran.
//! - **RestorePreImages** refuses while a journal holds records or is held
//!   (the machine runs, or its writes were not undone).
//! - **Views and chunk hashes at a point** are refused while a journal holds
//!   records: the replica no longer shows history.
//! - **EndReplication** (commit) deletes the journals: what the machine
//!   wrote is the base (see `handover`).

use crate::config::HooksConfig;
use crate::control::MtControl;
use crate::error::{MtError, Result};
use crate::replication::Replication;
use crate::replication_state::Inner;
use rebound_common::handover_journal::{self as hj, JournalError, JournalFence, HEADER_LEN};
use rebound_proto::control as pb;
use rebound_proto::control::command_result::Detail;
use std::path::PathBuf;
use std::time::Duration;
use tracing::info;

/// What PowerOff did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerOffReport {
    /// Blocks the machine had changed, written back from the journals.
    pub blocks_restored: u64,
    /// The power_off hook's run, when one is configured.
    pub power_off: Option<crate::state::HookOutcome>,
}

impl Replication {
    /// The directory of the hand-over journals.
    pub fn handover_dir(&self) -> PathBuf {
        self.root().join("handover")
    }

    /// The hand-over journal of disk `disk` (its name).
    pub fn handover_journal_path(&self, disk: &str) -> PathBuf {
        self.handover_dir().join(format!("{disk}.journal"))
    }

    /// (disk name, disk size, journal path) of every disk, in disk order.
    fn handover_journals(&self) -> Vec<(String, u64, PathBuf)> {
        let mut disks = self.disks();
        disks.sort_by_key(|d| d.0);
        (disks.into_iter())
            .map(|(_, name, size, _)| {
                let path = self.handover_journal_path(&name);
                (name, size, path)
            })
            .collect()
    }

    /// Makes an empty hand-over journal for every disk (replacing any left
    /// there: a new file, so an agent still holding an old one stops).
    pub(crate) fn create_handover_journals(&self) -> Result<()> {
        for (disk, size, path) in self.handover_journals() {
            hj::create(&path, size).map_err(|e| self.journal_error(&disk, e))?;
            info!(replication = %self.id(), machine = %self.machine_id(), disk = %disk, path = %path.display(),
                "hand-over journal created: the machine's agent saves pre-images here before it writes");
        }
        Ok(())
    }

    /// Deletes every hand-over journal (a missing one is fine).
    fn remove_handover_journals(&self) -> Result<()> {
        for (disk, _, path) in self.handover_journals() {
            hj::remove(&path).map_err(|e| self.journal_error(&disk, e))?;
        }
        Ok(())
    }

    /// Refuses reading the replica's history (views, chunk hashes) while
    /// the replica is handed over and a journal holds the machine's writes.
    /// Only the journal's length is looked at: this runs on every read.
    pub(crate) fn check_no_machine_writes(&self, inner: &Inner) -> Result<()> {
        if inner.state().handed_over.is_none() {
            return Ok(());
        }
        for (disk, _, path) in self.handover_journals() {
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if len > HEADER_LEN {
                return Err(MtError::FailedPrecondition(format!(
                    "{} (replication {}) runs on its replica since the hand-over and has written to disk {disk} \
                     (hand-over journal {}): the replica no longer shows its history; power the machine off \
                     (change-point does) or commit it, then read again",
                    self.machine_id(),
                    self.id(),
                    path.display()
                )));
            }
        }
        Ok(())
    }

    /// Refuses undoing a hand-over while the machine may still write or its
    /// writes are still in the replica: a journal is held by its agent or
    /// holds records. Without journals (or with empty, free ones) the
    /// journals are deleted: the hand-over they belong to ends.
    pub(crate) fn check_machine_powered_off(&self) -> Result<()> {
        let machine = self.machine_id();
        for (disk, _, path) in self.handover_journals() {
            let fence = match hj::fence(&path, Duration::ZERO) {
                Ok(f) => f,
                Err(JournalError::Missing { .. }) => continue,
                Err(JournalError::StillHeld { .. }) => {
                    return Err(MtError::FailedPrecondition(format!(
                        "{machine} (replication {}) still runs on its replica: its agent holds the \
                         hand-over journal {} of disk {disk}; run PowerOff first (change-point does), \
                         or stop the machine",
                        self.id(),
                        path.display()
                    )))
                }
                Err(e) => return Err(self.journal_error(&disk, e)),
            };
            if hj::has_records(&path).map_err(|e| self.journal_error(&disk, e))? {
                return Err(MtError::FailedPrecondition(format!(
                    "{machine} (replication {}) wrote to disk {disk} since the hand-over and those writes \
                     are still in the replica (hand-over journal {}); run PowerOff first (change-point \
                     does): it undoes them",
                    self.id(),
                    fence.path().display()
                )));
            }
        }
        self.remove_handover_journals()
    }

    /// PowerOff: runs the `power_off` hook, fences the machine (waits up to
    /// the hook timeout for its agent to let go of every journal), writes
    /// every saved pre-image back into the replica (fdatasynced) and
    /// deletes the journals. Refused unless handed over. Idempotent: once
    /// the journals are gone there is nothing to restore. Blocking.
    pub fn power_off(&self, hooks: &HooksConfig) -> Result<PowerOffReport> {
        let inner = self.write_for_change()?;
        let machine = self.machine_id().to_string();
        self.check_not_ended(&inner, "its machine's writes are its base now")?;
        let Some(h) = inner.state().handed_over.clone() else {
            return Err(MtError::FailedPrecondition(format!(
                "{machine} (replication {}) is not handed over at this MT: no machine runs on its replica; \
                 nothing to power off",
                self.id()
            )));
        };
        let power_off = (!hooks.power_off.trim().is_empty())
            .then(|| self.run_machine_hook("power_off", &hooks.power_off, &h.point, hooks));
        let hook_note = match &power_off {
            Some(o) if !o.success => format!(
                " (the power_off hook `{}` failed: {}: {})",
                o.command, o.status, o.output_tail
            ),
            Some(_) => " (the power_off hook succeeded)".to_string(),
            None => " (no power_off hook is configured)".to_string(),
        };
        let timeout = Duration::from_secs(hooks.hook_timeout_secs.max(1));
        let mut fences: Vec<(String, JournalFence)> = Vec::new();
        for (disk, _, path) in self.handover_journals() {
            match hj::fence(&path, timeout) {
                Ok(f) => fences.push((disk, f)),
                Err(JournalError::Missing { .. }) => {}
                Err(JournalError::StillHeld { waited, .. }) => {
                    return Err(MtError::FailedPrecondition(format!(
                        "cannot power off {machine} (replication {}): the machine still runs on its replica: \
                         its agent still holds the hand-over journal {} of disk {disk} after {} s{hook_note}; \
                         stop it, or fix the power_off hook, then retry",
                        self.id(),
                        path.display(),
                        waited.as_secs()
                    )))
                }
                Err(e) => return Err(self.journal_error(&disk, e)),
            }
        }
        let mut blocks_restored = 0;
        for (disk, fence) in &fences {
            let d = (self.replica_disks().iter())
                .find(|d| d.name() == disk)
                .expect("a journal per replica disk");
            let n = hj::restore_into(fence.path(), d.file())
                .map_err(|e| self.journal_error(disk, e))?;
            hj::remove(fence.path()).map_err(|e| self.journal_error(disk, e))?;
            info!(replication = %self.id(), machine = %machine, disk = %disk, journal = %fence.path().display(),
                replica = %d.path().display(), blocks = n,
                "the machine's writes since the hand-over undone: pre-images written back, journal deleted");
            blocks_restored += n;
        }
        drop(fences);
        info!(replication = %self.id(), machine = %machine, point = %h.point, blocks = blocks_restored,
            "machine powered off: the replica is as it was handed over");
        Ok(PowerOffReport {
            blocks_restored,
            power_off,
        })
    }

    /// A hand-over journal error of disk `disk`, naming the machine.
    fn journal_error(&self, disk: &str, e: JournalError) -> MtError {
        let what = format!(
            "{} (replication {}) disk {disk}",
            self.machine_id(),
            self.id()
        );
        match e {
            JournalError::Io { op, path, source } => MtError::io(
                format!("{what}: cannot {op} hand-over journal {}", path.display()),
                source,
            ),
            JournalError::ReplicaWrite {
                path,
                offset,
                source,
            } => MtError::io(
                format!(
                    "{what}: cannot write the pre-image at offset {offset} from {} into the replica",
                    path.display()
                ),
                source,
            ),
            JournalError::StillHeld { .. } | JournalError::Locked { .. } => {
                MtError::FailedPrecondition(format!("{what}: {e}"))
            }
            e => MtError::DataLoss(format!("{what}: {e}")),
        }
    }
}

impl MtControl {
    /// `PowerOff`: stop the machine, fence it, restore its writes.
    pub(crate) fn power_off(&self, c: &pb::PowerOff) -> Result<pb::CommandResult> {
        let r = self.replication(&c.replication_id)?;
        let rep = r.power_off(&self.hooks)?;
        let warning = match &rep.power_off {
            Some(o) if !o.success => format!(
                "the power_off hook `{}` of {} failed ({}): {}; the machine was fenced anyway \
                 (its agent let go of the hand-over journals)",
                o.command,
                r.machine_id(),
                o.status,
                o.output_tail
            ),
            _ => String::new(),
        };
        Ok(pb::CommandResult {
            ok: true,
            warning,
            detail: Some(Detail::PoweredOff(pb::PoweredOff {
                blocks_restored: rep.blocks_restored,
            })),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests;
