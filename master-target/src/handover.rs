//! The end of a replication at this MT (DESIGN.md §7 "Hand-over", §8
//! commit and reprotect):
//!
//! - **Hand-over**: after the rollback (or at latest) apply stops for good,
//!   the replica disks are synced, an empty open hand-over journal is made
//!   per disk (replacing a fenced one; see `handover_journal`), and both
//!   are given to the `power_on` hook, which boots the machine at this site. The mark is durable in
//!   `state.json`, so a restarted MT still refuses changes. PowerOff and
//!   `RestorePreImages` undo it (PowerOff stops the machine and undoes its
//!   writes) so a different point can be chosen.
//! - **End** (commit): the retention journal and the point catalog are
//!   forgotten, the hand-over journals marked committed (what the machine
//!   wrote is the base);
//!   the replica files are kept (a fast reprotect adopts them) or deleted.
//! - **Prepare** (reprotect target): a new replication whose replica files
//!   are adopted from an ended replication of the same machine, so the
//!   reverse resync only sends the chunks that differ.

use crate::config::HooksConfig;
use crate::error::{io_err, MtError, Result};
use crate::replication::{Replication, Store};
use crate::state::{EndedState, HandOverState, HookOutcome};
use rebound_common::durable::fsync_dir;
use rebound_common::handover_journal::JournalState;
use rebound_common::time::now_ms;
use rebound_proto::ReplicationInfo;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Bytes of hook output kept for the reply.
const OUTPUT_TAIL: u64 = 2000;

/// What a hand-over did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandOverReport {
    /// The point id the replica was handed over at ("latest" without one).
    pub point: String,
    /// The power_on hook's run (this call's, or the earlier successful one);
    /// `None` when no hook is configured or it was not asked for.
    pub power_on: Option<HookOutcome>,
    /// The hook ran in this call (false on an idempotent re-run).
    pub hook_ran: bool,
}

/// `REBOUND_DISK_<NAME>`: the disk name upper-cased, other characters `_`.
pub fn disk_env_name(name: &str) -> String {
    env_name("REBOUND_DISK_", name)
}

/// `<prefix><NAME>`: the disk name upper-cased, other characters `_`.
pub fn env_name(prefix: &str, name: &str) -> String {
    let n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}{n}")
}

impl Replication {
    /// The environment of the power_on and power_off hooks for hand-over
    /// at `point`: the machine, replication, point, the replica disks and
    /// their hand-over journals (`REBOUND_JOURNALS` in disk order, and
    /// `REBOUND_JOURNAL_<DISK>`).
    pub fn hook_env(&self, point: &str) -> Vec<(String, String)> {
        let mut disks = self.disks();
        disks.sort_by_key(|d| d.0);
        let mut env = vec![
            ("REBOUND_MACHINE".to_string(), self.machine_id().to_string()),
            ("REBOUND_REPLICATION".to_string(), self.id().to_string()),
            ("REBOUND_POINT".to_string(), point.to_string()),
            (
                "REBOUND_DISKS".to_string(),
                disks
                    .iter()
                    .map(|d| d.3.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        ];
        for d in &disks {
            env.push((disk_env_name(&d.1), d.3.display().to_string()));
        }
        let journals: Vec<String> = (disks.iter())
            .map(|d| self.handover_journal_path(&d.1).display().to_string())
            .collect();
        env.push(("REBOUND_JOURNALS".to_string(), journals.join(" ")));
        for (d, j) in disks.iter().zip(journals) {
            env.push((env_name("REBOUND_JOURNAL_", &d.1), j));
        }
        env
    }

    /// Runs the machine hook `name` (`power_on`, `power_off`) with the
    /// hand-over environment at `point`, its output in
    /// `rollback/<name>.log`, and logs how it went.
    pub(crate) fn run_machine_hook(
        &self,
        name: &str,
        command: &str,
        point: &str,
        hooks: &HooksConfig,
    ) -> HookOutcome {
        let env = self.hook_env(point);
        let log = self.layout().rollback_dir().join(format!("{name}.log"));
        let timeout = Duration::from_secs(hooks.hook_timeout_secs.max(1));
        let o = run_hook(command, &env, timeout, &log);
        let machine = self.machine_id();
        if o.success {
            info!(replication = %self.id(), machine = %machine, hook = name, command = %o.command,
                status = %o.status, "machine hook succeeded");
        } else {
            warn!(replication = %self.id(), machine = %machine, hook = name, command = %o.command,
                status = %o.status, output = %o.output_tail, log = %log.display(), "machine hook failed");
        }
        o
    }

    /// Hands the replica over (DESIGN.md §7): refuses apply from now on,
    /// syncs the replica disks, records the hand-over durably, and runs the
    /// `power_on` hook when `run_power_on` and one is configured. Idempotent:
    /// a re-run reports the first hand-over and runs the hook again only if
    /// it has not yet succeeded. Blocking (runs the hook).
    pub fn hand_over(&self, run_power_on: bool, hooks: &HooksConfig) -> Result<HandOverReport> {
        let mut inner = self.write_for_change()?;
        let machine = self.machine_id().to_string();
        self.check_not_ended(&inner, "it cannot be handed over")?;
        if let Some(r) = &inner.state().rollback {
            return Err(MtError::FailedPrecondition(format!(
                "a rollback of {machine} to {} is unfinished; re-run the rollback (or restore pre-images) before hand-over",
                r.point.id
            )));
        }
        if inner.state().handed_over.is_none() {
            let (point, seq) = match (&inner.state().rolled_back_to, inner.points().last()) {
                (Some(p), _) => (p.id.clone(), p.seq),
                (None, Some(p)) => (p.id.clone(), p.seq),
                (None, None) => ("latest".to_string(), inner.applied_seq()),
            };
            self.sync_all_replicas()?;
            // Fresh journals only here: a re-run must not empty a journal
            // the running machine's agent already saves pre-images into.
            self.create_handover_journals()?;
            inner
                .hand_over(HandOverState {
                    point,
                    seq,
                    time_ms: now_ms(),
                    power_on: None,
                })
                .map_err(|e| self.noting_failed_sync(e))?;
            let h = inner.state().handed_over.as_ref().expect("just set");
            info!(replication = %self.id(), machine = %machine, point = %h.point, seq = h.seq,
                "replica handed over: apply stopped for good, the disks belong to the machine now");
        }
        let h = inner.state().handed_over.clone().expect("handed over");
        let already = h.power_on.as_ref().filter(|o| o.success).cloned();
        if !run_power_on || hooks.power_on.trim().is_empty() || already.is_some() {
            if already.is_some() {
                info!(replication = %self.id(), "power_on hook already succeeded for this hand-over; not running it again");
            }
            return Ok(HandOverReport {
                point: h.point,
                power_on: already,
                hook_ran: false,
            });
        }
        let outcome = self.run_machine_hook("power_on", &hooks.power_on, &h.point, hooks);
        inner
            .power_on_ran(outcome.clone())
            .map_err(|e| self.noting_failed_sync(e))?;
        Ok(HandOverReport {
            point: h.point,
            power_on: Some(outcome),
            hook_ran: true,
        })
    }

    /// The hand-over, if any.
    pub fn handed_over(&self) -> Option<HandOverState> {
        self.read_summary().state().handed_over.clone()
    }

    /// The replication ended (EndReplication).
    pub fn ended(&self) -> bool {
        self.read_summary().state().ended.is_some()
    }

    /// Ends the replication: marks it ended durably, then drops the point
    /// catalog, the retention journal and any rollback pre-images. The
    /// replica files stay (the caller deletes them when not kept).
    fn end(&self, keep_replica: bool) -> Result<()> {
        // Ending is allowed even when poisoned: it gives the replica up.
        let mut inner = self.write_inner()?;
        inner.forget_chunk_hashes();
        if inner.state().ended.is_none() {
            inner
                .end(EndedState {
                    time_ms: now_ms(),
                    keep_replica,
                })
                .map_err(|e| self.noting_failed_sync(e))?;
        }
        self.sync_all_replicas()?;
        inner.forget_retention();
        remove_file(&self.layout().catalog())?;
        for dir in [self.layout().retention_dir(), self.layout().rollback_dir()] {
            clear_dir(&dir)?;
        }
        // What the machine wrote is the base now: its agent sees a
        // committed journal and stops saving (a missing one fails its writes).
        if self.handover_dir().exists() {
            self.mark_handover_journals(JournalState::Committed)?;
        }
        sync(self.layout().root())?;
        info!(replication = %self.id(), machine = %self.machine_id(), keep_replica,
            "replication ended: retention journal and recovery points forgotten");
        Ok(())
    }
}

fn remove_file(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(MtError::io(format!("cannot remove {}", p.display()), e)),
    }
}

/// Removes every file in `dir` (keeps `power_on.log`).
fn clear_dir(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(MtError::io(format!("cannot list {}", dir.display()), e)),
    };
    for e in entries {
        let e = e.map_err(io_err(|| format!("cannot list {}", dir.display())))?;
        if e.file_name() == "power_on.log" {
            continue;
        }
        remove_file(&e.path())?;
    }
    sync(dir)
}

fn sync(dir: &Path) -> Result<()> {
    fsync_dir(dir).map_err(io_err(|| format!("cannot fsync {}", dir.display())))
}

/// Runs `sh -c command` with `env`, its output to `log`, killing its
/// process group after `timeout`.
pub fn run_hook(
    command: &str,
    env: &[(String, String)],
    timeout: Duration,
    log: &Path,
) -> HookOutcome {
    let fail = |status: String, tail: String| HookOutcome {
        command: command.to_string(),
        success: false,
        status,
        output_tail: tail,
    };
    let out = match std::fs::File::create(log) {
        Ok(f) => f,
        Err(e) => {
            return fail(
                format!("cannot create {}: {e}", log.display()),
                String::new(),
            )
        }
    };
    let err = match out.try_clone() {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot open {}: {e}", log.display()), String::new()),
    };
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start sh: {e}"), String::new()),
    };
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if start.elapsed() >= timeout => {
                crate::sys::kill_process_group(child.id());
                let _ = child.wait();
                break Err(format!(
                    "timed out after {} s and was killed",
                    timeout.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(format!("cannot wait for it: {e}")),
        }
    };
    let tail = read_tail(log);
    match status {
        Ok(s) => HookOutcome {
            command: command.to_string(),
            success: s.success(),
            status: match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit status {c}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => s.to_string(),
            },
            output_tail: tail,
        },
        Err(why) => fail(why, tail),
    }
}

fn read_tail(path: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    if len > OUTPUT_TAIL {
        use std::io::Seek;
        let _ = f.seek(std::io::SeekFrom::Start(len - OUTPUT_TAIL));
    }
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

impl Store {
    /// EndReplication: forgets the replication's retention and points; keeps
    /// its replica files (still listed, state "ended", adoptable by a later
    /// PrepareReplication) or deletes the whole replication. Idempotent: an
    /// unknown id is already gone.
    pub fn end_replication(&self, id: &str, keep_replica: bool) -> Result<()> {
        let Some(r) = self.get(id) else {
            self.forget_pending_retention(id);
            info!(replication = %id, "end replication: this MT does not have it (already removed)");
            return Ok(());
        };
        r.end(keep_replica)?;
        if !keep_replica {
            self.delete(&r)?;
            info!(replication = %id, "replication and its replica files deleted");
        }
        Ok(())
    }

    /// Removes a replication from the store and deletes its directory (first
    /// renamed to a dot name, which `open` finishes deleting after a crash).
    pub(crate) fn delete(&self, r: &Arc<Replication>) -> Result<()> {
        self.remove_entry(r.id());
        let root = r.root().to_path_buf();
        let gone = self.data_dir().join(format!(".deleting-{}", r.id()));
        std::fs::rename(&root, &gone).map_err(io_err(|| {
            format!("cannot rename {} for deletion", root.display())
        }))?;
        sync(self.data_dir())?;
        std::fs::remove_dir_all(&gone)
            .map_err(io_err(|| format!("cannot delete {}", gone.display())))?;
        Ok(())
    }

    /// PrepareReplication: makes sure replication `info` exists. When it is
    /// new, its replica files are adopted from `adopt_from` when this MT has
    /// that replication, else from the newest ended replication of the same
    /// machine; without either they start empty (a full resync). Returns the
    /// replication and the id adopted from. Idempotent.
    pub fn prepare(
        &self,
        info: &ReplicationInfo,
        adopt_from: &str,
    ) -> Result<(Arc<Replication>, Option<String>)> {
        if let Some(r) = self.get(&info.replication_id) {
            r.check_hello(info)?;
            return Ok((r, None));
        }
        let source = self.adoption_source(info, adopt_from)?;
        let Some(src) = source else {
            info!(replication = %info.replication_id, machine = %info.machine_id, adopt_from,
                "no replica files to adopt at this MT: the replication starts empty (full resync)");
            return Ok((self.get_or_create(info)?, None));
        };
        let root = self.data_dir().join(&info.replication_id);
        let replica_dir = root.join("replica");
        std::fs::create_dir_all(&replica_dir).map_err(io_err(|| {
            format!("cannot create {}", replica_dir.display())
        }))?;
        let mut moved = Vec::new();
        for d in &info.disks {
            let name = if d.name.is_empty() {
                format!("disk{}", d.index)
            } else {
                d.name.clone()
            };
            let from = src
                .disks()
                .into_iter()
                .find(|x| x.0 == d.index)
                .or_else(|| src.disks().into_iter().find(|x| x.1 == name));
            let Some((_, from_name, _, from_path)) = from else {
                warn!(replication = %info.replication_id, disk = %name, from = %src.id(),
                    "no replica file to adopt for this disk; it starts empty");
                continue;
            };
            let to: PathBuf = replica_dir.join(format!("{name}.img"));
            if from_path.exists() {
                std::fs::rename(&from_path, &to).map_err(io_err(|| {
                    format!(
                        "cannot adopt replica {} as {}",
                        from_path.display(),
                        to.display()
                    )
                }))?;
                moved.push(format!("{from_name} -> {name}"));
            }
        }
        sync(&replica_dir)?;
        let _ = fsync_dir(&src.root().join("replica"));
        info!(replication = %info.replication_id, from = %src.id(), disks = %moved.join(", "),
            "replica files adopted: the resync will send only the chunks that differ");
        let r = self.get_or_create(info)?;
        // The source gave up its replica files: nothing of it is left to keep.
        self.delete(&src)?;
        Ok((r, Some(src.id().to_string())))
    }

    fn adoption_source(
        &self,
        info: &ReplicationInfo,
        adopt_from: &str,
    ) -> Result<Option<Arc<Replication>>> {
        if !adopt_from.is_empty() {
            if let Some(r) = self.get(adopt_from) {
                if r.machine_id() != info.machine_id {
                    return Err(MtError::FailedPrecondition(format!(
                        "cannot adopt the replica of replication {adopt_from}: it belongs to machine {}, not {}",
                        r.machine_id(),
                        info.machine_id
                    )));
                }
                if !r.ended() {
                    return Err(MtError::FailedPrecondition(format!(
                        "cannot adopt the replica of replication {adopt_from} of {}: it has not ended; commit it (EndReplication with keep_replica) first",
                        info.machine_id
                    )));
                }
                return Ok(Some(r));
            }
        }
        Ok(self
            .list()
            .into_iter()
            .filter(|r| r.machine_id() == info.machine_id && r.ended())
            .max_by_key(|r| r.created_ms()))
    }
}
