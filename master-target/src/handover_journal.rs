//! The failed-over machine's writes (DESIGN.md §7 "Hand-over"): until
//! commit, the machine's agent saves the pre-image of every block before its
//! first write into the hand-over journal of its disk
//! (`<replication>/handover/<disk>.journal`, made empty at hand-over), so
//! change-point can stop the machine and put the replica back exactly as it
//! was handed over:
//!
//! - **PowerOff** runs the `power_off` hook, then fences the machine (an
//!   exclusive `flock` on every journal: its agent holds one while it
//!   runs), writes every pre-image back into the replica, fdatasyncs it and,
//!   still holding the lock, replaces each journal with a *fenced* one: an
//!   agent started before the next hand-over refuses to run, one still
//!   running fails its writes. Then RestorePreImages, Rollback and HandOver
//!   work as before the machine ran. Not handed over (a retried
//!   change-point after RestorePreImages): nothing to do, 0 blocks.
//! - **RestorePreImages** refuses while a journal holds records or is held
//!   (the machine runs, or its writes were not undone); it leaves fenced
//!   journals.
//! - **HandOver** replaces fenced (or missing) journals with fresh open ones
//!   (see `handover`).
//! - **Views and chunk hashes at a point** are refused while an open
//!   journal holds records, or a journal cannot be read: the replica no
//!   longer shows history.
//! - **EndReplication** (commit) replaces the journals with *committed*
//!   ones: what the machine wrote is the base (see `handover`).
//!
//! The journal files never simply disappear while the replication is handed
//! over: the agent reads their state (`rebound_common::handover_journal`).

use crate::config::HooksConfig;
use crate::control::MtControl;
use crate::error::{MtError, Result};
use crate::replication::Replication;
use crate::replication_state::Inner;
use rebound_common::handover_journal::{
    self as hj, JournalError, JournalFence, JournalState, HEADER_LEN,
};
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

    /// Makes an empty open hand-over journal for every disk, replacing a
    /// fenced, committed or missing one (a new file, so an agent still
    /// holding an old one stops). Refuses to empty an open journal that
    /// holds records: those are a machine's writes not undone.
    pub(crate) fn create_handover_journals(&self) -> Result<()> {
        for (disk, size, path) in self.handover_journals() {
            if hj::has_records(&path).map_err(|e| self.journal_error(&disk, e))? {
                return Err(MtError::FailedPrecondition(format!(
                    "{} (replication {}) disk {disk}: the hand-over journal {} holds writes of an \
                     earlier hand-over that were never undone; run PowerOff (change-point does) first",
                    self.machine_id(),
                    self.id(),
                    path.display()
                )));
            }
            hj::create(&path, size).map_err(|e| self.journal_error(&disk, e))?;
            info!(replication = %self.id(), machine = %self.machine_id(), disk = %disk, path = %path.display(),
                "hand-over journal created: the machine's agent saves pre-images here before it writes");
        }
        Ok(())
    }

    /// Replaces every hand-over journal by an empty one in `state` (a
    /// missing one too: the path never stays empty while it matters).
    pub(crate) fn mark_handover_journals(&self, state: JournalState) -> Result<()> {
        for (disk, size, path) in self.handover_journals() {
            hj::replace(&path, size, state).map_err(|e| self.journal_error(&disk, e))?;
        }
        Ok(())
    }

    /// Refuses reading the replica's history (views, chunk hashes) while
    /// the replica is handed over and an open journal holds the machine's
    /// writes, or a journal cannot be read. Only the header and the length
    /// are looked at: this runs on every read. A missing journal holds no
    /// writes: an agent refuses to run without its journal.
    pub(crate) fn check_no_machine_writes(&self, inner: &Inner) -> Result<()> {
        if inner.state().handed_over.is_none() {
            return Ok(());
        }
        for (disk, _, path) in self.handover_journals() {
            let state = match hj::read_state(&path) {
                Ok((state, _)) => state,
                Err(JournalError::Missing { .. }) => continue,
                Err(e) => {
                    return Err(MtError::FailedPrecondition(format!(
                        "{} (replication {}) runs on its replica since the hand-over and its hand-over \
                         journal of disk {disk} cannot be read ({e}): the replica may no longer show its \
                         history; power the machine off (change-point does) or commit it, then read again",
                        self.machine_id(),
                        self.id()
                    )))
                }
            };
            let len = std::fs::metadata(&path)
                .map_err(|e| self.journal_error(&disk, hj_io("stat", &path, e)))?
                .len();
            if state == JournalState::Open && len > HEADER_LEN {
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
    /// holds records (an unreadable one refuses too). Otherwise every
    /// journal is replaced by a fenced one while its lock is held: the
    /// hand-over they belong to ends, and no agent may run until the next.
    pub(crate) fn check_machine_powered_off(&self) -> Result<()> {
        let machine = self.machine_id();
        let mut fences = Vec::new();
        for (disk, size, path) in self.handover_journals() {
            let fence = match hj::fence(&path, Duration::ZERO) {
                Ok(f) => f,
                Err(JournalError::Missing { .. }) => {
                    hj::replace(&path, size, JournalState::Fenced)
                        .map_err(|e| self.journal_error(&disk, e))?;
                    continue;
                }
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
            fences.push((disk, size, fence));
        }
        for (disk, size, fence) in &fences {
            hj::replace(fence.path(), *size, JournalState::Fenced)
                .map_err(|e| self.journal_error(disk, e))?;
        }
        Ok(())
    }

    /// PowerOff: runs the `power_off` hook, fences the machine (waits up to
    /// the hook timeout for its agent to let go of every journal), writes
    /// every saved pre-image back into the replica (fdatasynced) and
    /// replaces the journals with fenced ones under the lock. Idempotent:
    /// a fenced journal holds nothing to restore, and when the replica is
    /// not handed over (RestorePreImages already ran) there is nothing to
    /// do: 0 blocks, no hook. Refused once ended. Blocking.
    pub fn power_off(&self, hooks: &HooksConfig) -> Result<PowerOffReport> {
        let inner = self.write_for_change()?;
        let machine = self.machine_id().to_string();
        self.check_not_ended(&inner, "its machine's writes are its base now")?;
        let Some(h) = inner.state().handed_over.clone() else {
            info!(replication = %self.id(), machine = %machine,
                "power off: not handed over at this MT (no machine runs on its replica): nothing to do");
            return Ok(PowerOffReport {
                blocks_restored: 0,
                power_off: None,
            });
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
        let mut fences: Vec<(String, u64, JournalFence)> = Vec::new();
        for (disk, size, path) in self.handover_journals() {
            match hj::fence(&path, timeout) {
                Ok(f) => fences.push((disk, size, f)),
                Err(JournalError::Missing { .. }) => hj::replace(&path, size, JournalState::Fenced)
                    .map_err(|e| self.journal_error(&disk, e))?,
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
        for (disk, size, fence) in &fences {
            let Some(d) = self.replica_disks().iter().find(|d| d.name() == disk) else {
                return Err(MtError::FailedPrecondition(format!(
                    "cannot power off {machine} (replication {}): disk {disk} has a hand-over journal \
                     ({}) but no replica file at this MT; the replication's disks are inconsistent: \
                     re-create the replication",
                    self.id(),
                    fence.path().display()
                )));
            };
            let n = hj::restore_into(fence.path(), d.file())
                .map_err(|e| self.journal_error(disk, e))?;
            hj::replace(fence.path(), *size, JournalState::Fenced)
                .map_err(|e| self.journal_error(disk, e))?;
            info!(replication = %self.id(), machine = %machine, disk = %disk, journal = %fence.path().display(),
                replica = %d.path().display(), blocks = n,
                "the machine's writes since the hand-over undone: pre-images written back, journal fenced");
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
            JournalError::Damaged { .. } => MtError::DataLoss(format!(
                "{what}: {e}; the point it was handed over at cannot be restored exactly: commit, \
                 or fail over again from a point of another replication"
            )),
            JournalError::StillHeld { .. } | JournalError::Locked { .. } => {
                MtError::FailedPrecondition(format!("{what}: {e}"))
            }
            e => MtError::DataLoss(format!("{what}: {e}")),
        }
    }
}

/// An IO error on the hand-over journal at `path`.
fn hj_io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> JournalError {
    JournalError::Io {
        op,
        path: path.to_path_buf(),
        source,
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
