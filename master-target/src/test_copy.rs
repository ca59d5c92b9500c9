//! Test failover (DESIGN.md §7 views, §9 `rebound test-failover`): a
//! writable copy-on-write view of a recovery point, served over NBD as
//! `<machine>/<disk>@test` while replication and retention go on.
//!
//! StartTestFailover resolves the point like Rollback, creates the
//! overlays (`<data>/<rid>/test/<disk>.overlay` and its `.map`, see
//! `overlay`), pins the point durably in `state.json` (retention keeps it
//! and every journal it needs), and runs the `test_power_on` hook with the
//! exports. The replica and the retention journal are never written: a
//! test copy reads the point where its overlay holds nothing.
//! EndTestFailover runs `test_power_off`, stops serving (open connections
//! get errors, new opens are refused), deletes the test dir and unpins.
//! Both are idempotent; a restarted MT serves a running copy again from
//! its state and overlay files.
//!
//! The overlays open for NBD are shared by every connection to an export
//! and closed by EndTestFailover; the NBD server and the control channel
//! share nothing but the store, so they meet in a process-wide table of
//! open overlays keyed by file path.

mod overlay;
#[cfg(test)]
mod tests;

use crate::config::HooksConfig;
use crate::control::MtControl;
use crate::error::{io_err, MtError, Result};
use crate::handover::{disk_env_name, run_hook};
use crate::replication::Replication;
use crate::state::{HookOutcome, PointRef, TestFailoverState};
use overlay::Overlay;
use rebound_common::durable::fsync_dir;
use rebound_common::nbd::{BlockDevice, NbdError};
use rebound_common::time::now_ms;
use rebound_proto::control as pb;
use rebound_proto::control::command_result::Detail;
use rebound_proto::control::point_choice::Choice;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;
use tracing::{info, warn};

/// The point an export name asks for to get the test copy.
pub(crate) const TEST_POINT: &str = "test";

/// What StartTestFailover did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestCopyReport {
    pub point: crate::PointEntry,
    /// Export names by disk index.
    pub exports: Vec<String>,
    /// The test_power_on hook's run (this call's, or the earlier
    /// successful one); `None` when none is configured or asked for.
    pub test_power_on: Option<HookOutcome>,
}

/// The overlays open for NBD, by overlay file path (see the module doc).
fn open_overlays() -> &'static Mutex<HashMap<PathBuf, Arc<Overlay>>> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, Arc<Overlay>>>> = OnceLock::new();
    OPEN.get_or_init(Default::default)
}

impl Replication {
    /// The directory of the test copy's overlays.
    pub fn test_dir(&self) -> PathBuf {
        self.root().join("test")
    }

    /// The running test failover, if any.
    pub fn test_failover(&self) -> Option<TestFailoverState> {
        self.read_summary().state().test_failover.clone()
    }

    /// The test copy's export names, by disk index.
    pub fn test_exports(&self) -> Vec<String> {
        let mut disks = self.disks();
        disks.sort_by_key(|d| d.0);
        disks
            .iter()
            .map(|d| format!("{}/{}@{TEST_POINT}", self.machine_id(), d.1))
            .collect()
    }

    /// Starts a test failover at the point `choice` names (see the module
    /// doc). A re-sent start naming the running copy's point answers with
    /// that copy; any other start while one runs is refused, naming it.
    /// Blocking (runs the hook).
    pub fn start_test_failover(
        &self,
        choice: &Choice,
        run_test_power_on: bool,
        hooks: &HooksConfig,
        nbd_address: &str,
    ) -> Result<TestCopyReport> {
        let p = self.resolve_choice(choice)?;
        let running = {
            let mut inner = self.write_inner()?;
            self.check_not_poisoned()?;
            self.check_not_ended(&inner, "there is no point left to test")?;
            match inner.state().test_failover.clone() {
                Some(t) if t.point.id == p.id && t.point.interval == p.interval => t,
                Some(t) => {
                    return Err(MtError::FailedPrecondition(format!(
                        "a test failover of {} (replication {}) at point {} is running since {} ms; end it with `rebound test-failover-cleanup {}` before testing point {}",
                        self.machine_id(), self.id(), t.point.id, t.started_ms, self.machine_id(), p.id
                    )));
                }
                None => {
                    if inner.points().by_interval(p.interval).map(|q| &q.id) != Some(&p.id) {
                        return Err(MtError::NotFound(format!(
                            "recovery point {} of {} expired from retention just now; choose a newer point",
                            p.id,
                            self.machine_id()
                        )));
                    }
                    self.create_overlays()?;
                    let t = TestFailoverState {
                        point: PointRef {
                            id: p.id.clone(),
                            seq: p.seq,
                            interval: p.interval,
                        },
                        started_ms: now_ms(),
                        test_power_on: None,
                    };
                    inner
                        .set_test_failover(Some(t.clone()))
                        .map_err(|e| self.noting_failed_sync(e))?;
                    info!(replication = %self.id(), machine = %self.machine_id(), point = %p.id,
                        exports = %self.test_exports().join(" "),
                        "test failover started: point pinned, test copy served over NBD");
                    t
                }
            }
        };
        let exports = self.test_exports();
        let already = running.test_power_on.filter(|o| o.success);
        if !run_test_power_on || hooks.test_power_on.trim().is_empty() || already.is_some() {
            return Ok(TestCopyReport {
                point: p,
                exports,
                test_power_on: already,
            });
        }
        // Not under the lock: the hook may read the exports.
        let outcome = self.run_test_hook(
            &hooks.test_power_on,
            "test_power_on",
            &p.id,
            nbd_address,
            hooks,
        );
        let done = outcome.clone();
        self.change_state(
            |_| false,
            move |inner| {
                let mut t = inner.state().test_failover.clone();
                if let Some(t) = t.as_mut() {
                    t.test_power_on = Some(done);
                }
                inner.set_test_failover(t)
            },
        )?;
        Ok(TestCopyReport {
            point: p,
            exports,
            test_power_on: Some(outcome),
        })
    }

    /// Ends the test failover (see the module doc); returns the
    /// test_power_off hook's run, if one ran. Idempotent: without a running
    /// copy it only removes what a crash may have left.
    pub fn end_test_failover(
        &self,
        hooks: &HooksConfig,
        nbd_address: &str,
    ) -> Result<Option<HookOutcome>> {
        let mut outcome = None;
        if let Some(t) = self.test_failover() {
            if !hooks.test_power_off.trim().is_empty() {
                outcome = Some(self.run_test_hook(
                    &hooks.test_power_off,
                    "test_power_off",
                    &t.point.id,
                    nbd_address,
                    hooks,
                ));
            }
        }
        let mut inner = self.write_inner()?;
        self.close_overlays();
        remove_dir(&self.test_dir())?;
        fsync_dir(self.root())
            .map_err(io_err(|| format!("cannot fsync {}", self.root().display())))?;
        if let Some(t) = inner.state().test_failover.clone() {
            inner
                .set_test_failover(None)
                .map_err(|e| self.noting_failed_sync(e))?;
            info!(replication = %self.id(), machine = %self.machine_id(), point = %t.point.id,
                "test failover ended: exports closed, overlays deleted, point unpinned");
        }
        Ok(outcome)
    }

    /// Runs a test hook with the test copy's environment, logged to
    /// `<test dir>/<what>.log`.
    fn run_test_hook(
        &self,
        command: &str,
        what: &str,
        point: &str,
        nbd_address: &str,
        hooks: &HooksConfig,
    ) -> HookOutcome {
        let exports = self.test_exports();
        let mut env = vec![
            ("REBOUND_MACHINE".to_string(), self.machine_id().to_string()),
            ("REBOUND_REPLICATION".to_string(), self.id().to_string()),
            ("REBOUND_POINT".to_string(), point.to_string()),
            ("REBOUND_NBD_ADDRESS".to_string(), nbd_address.to_string()),
            ("REBOUND_TEST_EXPORTS".to_string(), exports.join(" ")),
        ];
        let mut disks = self.disks();
        disks.sort_by_key(|d| d.0);
        for (d, export) in disks.iter().zip(&exports) {
            let key = disk_env_name(&d.1).replacen("REBOUND_DISK_", "REBOUND_TEST_EXPORT_", 1);
            env.push((key, export.clone()));
        }
        let log = self.test_dir().join(format!("{what}.log"));
        let timeout = Duration::from_secs(hooks.hook_timeout_secs.max(1));
        let outcome = run_hook(command, &env, timeout, &log);
        if outcome.success {
            info!(replication = %self.id(), machine = %self.machine_id(), command = %outcome.command,
                status = %outcome.status, "{what} hook succeeded");
        } else {
            warn!(replication = %self.id(), machine = %self.machine_id(), command = %outcome.command,
                status = %outcome.status, output = %outcome.output_tail, "{what} hook failed");
        }
        outcome
    }

    /// Creates the test dir with an empty overlay per disk (after removing
    /// what an earlier copy may have left).
    fn create_overlays(&self) -> Result<()> {
        let dir = self.test_dir();
        self.close_overlays();
        remove_dir(&dir)?;
        std::fs::create_dir_all(&dir)
            .map_err(io_err(|| format!("cannot create {}", dir.display())))?;
        for d in self.disks() {
            Overlay::create(&dir, &d.1)?;
        }
        fsync_dir(&dir).map_err(io_err(|| format!("cannot fsync {}", dir.display())))?;
        fsync_dir(self.root()).map_err(io_err(|| format!("cannot fsync {}", self.root().display())))
    }

    /// Closes this replication's overlays open for NBD: their connections
    /// get errors from now on.
    fn close_overlays(&self) {
        let dir = self.test_dir();
        let mut open = open_overlays()
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.retain(|path, o| {
            let mine = path.starts_with(&dir);
            if mine {
                o.close();
            }
            !mine
        });
    }

    /// Opens disk `disk`'s export of the running test copy for one NBD
    /// connection (`name`: the export name, for errors).
    pub(crate) fn open_test_copy(
        self: &Arc<Self>,
        disk: &str,
        name: &str,
    ) -> Result<TestCopyDevice> {
        let inner = self.read_inner()?;
        let t = inner.state().test_failover.clone().ok_or_else(|| {
            MtError::NotFound(format!(
                "no export {name:?}: {} has no test failover running (start one with `rebound test-failover {}`)",
                self.machine_id(),
                self.machine_id()
            ))
        })?;
        let d = self.disk_by_name(disk).ok_or_else(|| {
            MtError::NotFound(format!(
                "no export {name:?}: machine {} has no disk {disk:?}",
                self.machine_id()
            ))
        })?;
        let (index, size) = (d.index(), d.size());
        let dir = self.test_dir();
        let (path, _) = overlay::paths(&dir, disk);
        let mut open = open_overlays()
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let o = match open.get(&path) {
            Some(o) => o.clone(),
            None => {
                let o = Arc::new(Overlay::open(&dir, disk, size, name)?);
                open.insert(path, o.clone());
                o
            }
        };
        drop(inner);
        Ok(TestCopyDevice {
            repl: self.clone(),
            disk: index,
            point: (t.point.id, t.point.interval),
            overlay: o,
            name: name.to_string(),
        })
    }
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(MtError::io(format!("cannot delete {}", dir.display()), e)),
    }
}

/// One NBD connection's writable test copy of a disk.
pub(crate) struct TestCopyDevice {
    repl: Arc<Replication>,
    disk: u32,
    point: (String, u64),
    overlay: Arc<Overlay>,
    name: String,
}

impl TestCopyDevice {
    fn base(&self) -> impl Fn(u64, &mut [u8]) -> Result<()> + '_ {
        move |offset, buf| {
            self.repl
                .read_view(self.disk, offset, buf, Some(&self.point))
        }
    }

    fn nbd(&self, e: MtError) -> NbdError {
        let msg = format!("test copy {}: {e}", self.name);
        match e {
            MtError::NotFound(_) => NbdError::eshutdown(msg),
            MtError::InvalidArgument(_) => NbdError::einval(msg),
            MtError::Io { source, .. } => {
                NbdError::from_io(&source, format!("test copy {}", self.name))
            }
            _ => NbdError::eio(msg),
        }
    }
}

impl BlockDevice for TestCopyDevice {
    fn size(&self) -> u64 {
        self.overlay.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), NbdError> {
        self.overlay
            .read(offset, buf, &self.base())
            .map_err(|e| self.nbd(e))
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> std::result::Result<(), NbdError> {
        self.overlay
            .write(offset, data, fua, &self.base())
            .map_err(|e| self.nbd(e))
    }
    fn flush(&self) -> std::result::Result<(), NbdError> {
        self.overlay.flush().map_err(|e| self.nbd(e))
    }
    /// Trimmed blocks may read as anything: they keep what they hold.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> std::result::Result<(), NbdError> {
        let _ = (offset, len);
        if fua {
            self.flush()?;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> std::result::Result<(), NbdError> {
        self.overlay
            .write_zeroes(offset, len, fua, &self.base())
            .map_err(|e| self.nbd(e))
    }
}

impl MtControl {
    /// Where this MT serves NBD (its `nbds://` address, without the scheme).
    fn nbd_address(&self) -> String {
        self.identity
            .addresses
            .iter()
            .find_map(|a| a.strip_prefix("nbds://"))
            .unwrap_or_default()
            .to_string()
    }

    pub(crate) fn start_test_failover(
        &self,
        c: &pb::StartTestFailover,
    ) -> Result<pb::CommandResult> {
        let r = self.replication(&c.replication_id)?;
        let choice = c.point.clone().and_then(|p| p.choice).ok_or_else(|| {
            MtError::InvalidArgument(format!(
                "StartTestFailover of replication {} names no point",
                c.replication_id
            ))
        })?;
        let nbd_address = self.nbd_address();
        let rep = r.start_test_failover(&choice, c.run_test_power_on, &self.hooks, &nbd_address)?;
        let warning = match &rep.test_power_on {
            Some(o) if !o.success => format!(
                "the test copy of {} at point {} is served, but its test_power_on hook `{}` failed ({}): {}",
                r.machine_id(),
                rep.point.id,
                o.command,
                o.status,
                o.output_tail
            ),
            _ => String::new(),
        };
        Ok(pb::CommandResult {
            warning,
            detail: Some(Detail::TestCopy(pb::TestCopy {
                point: Some(crate::control::point_to_proto(&rep.point)),
                exports: rep.exports,
                nbd_address,
            })),
            ..rebound_common::control::ok_result()
        })
    }

    pub(crate) fn end_test_failover(&self, c: &pb::EndTestFailover) -> Result<pb::CommandResult> {
        let ok = rebound_common::control::ok_result();
        let Some(r) = self.store.get(&c.replication_id) else {
            info!(replication = %c.replication_id, "end test failover: this MT does not have the replication (nothing to clean up)");
            return Ok(ok);
        };
        let warning = match r.end_test_failover(&self.hooks, &self.nbd_address())? {
            Some(o) if !o.success => format!(
                "the test copy of {} is gone, but its test_power_off hook `{}` failed ({}): {}",
                r.machine_id(),
                o.command,
                o.status,
                o.output_tail
            ),
            _ => String::new(),
        };
        Ok(pb::CommandResult { warning, ..ok })
    }
}
