//! The agent under a configuration server (DESIGN.md §5, §8): the commands
//! of the control channel, the replication pipeline the CS can switch at run
//! time, recovery-point policy (crash and app intervals) and hooks.
//!
//! [`Runtime`] owns what the commands act on; [`AgentControl`] is its
//! [`ControlHandler`] for `rebound_common::control::spawn`. In standalone
//! mode (no `[cs]`) the same runtime runs the configured replication and
//! the crash-tag timer, exactly as before.
//!
//! - `Fence`: writes get EPERM from then on; a `shutdown` tag with the given
//!   id is cut as the last record. `Drain` then waits until the PS holds
//!   everything and runs the shutdown hook when the fence asked for it.
//! - `Tag` (app): freeze hook → hold writes → tag → release → thaw hook,
//!   each hook bounded by the hook timeout. A failed freeze cuts a crash tag
//!   instead, with a warning on the result and a `freeze-failed` event.
//! - `GroupPrepare` holds new writes at the ordering point (NBD writes wait
//!   before they are ordered) and releases them on its own after `hold_ms`
//!   (default 100 ms), which aborts the barrier; `GroupCommit` cuts the tag
//!   whose id and group are both the barrier's `tag_id`, then releases.
//!   For kind "app" the freeze hook runs before the hold and the thaw hook
//!   after the commit, the abort or the expiry; the tag is then an app
//!   point (a failed freeze makes this member's point crash-consistent,
//!   with a warning, as for `Tag`).
//! - `StartReplication` switches the sender to another replication/PS: the
//!   change buffer is dropped and every disk is resynced differentially
//!   against the new target replica. The assignment is kept in
//!   `<state_dir>/replication.json` across restarts. With `moving`, the
//!   same replication moves to another PS of the site: the change buffer
//!   and the frames the old PS has not acknowledged are kept, and the
//!   stream continues at the new PS without a resync (see
//!   [`crate::sender`] for the wait while the old PS still forwards). The
//!   end of that wait is kept in `replication.json` with the assignment, so
//!   an agent restarted mid-move still waits for the old PS instead of
//!   taking its records as lost; it is removed once the new PS resumes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rebound_common::chunk::EXTENT_SIZE;
use rebound_common::control::{err_result, ok_result, ControlHandle, ControlHandler};
use rebound_common::frame::TagKind;
use rebound_common::time::now_ms;
use rebound_proto::control::command::Cmd;
use rebound_proto::control::command_result::Detail;
use rebound_proto::control::{
    self as pb, AgentStatus, Command, CommandResult, Drained, Event, Hello, TagCut,
};
use rebound_proto::{DiskInfo, ReplicationInfo};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::capture::{Capture, TagError};
use crate::config::{PsConfig, Settings};
use crate::hook::{run_hook, HookError};
use crate::sender::Link;

/// Default write hold of a consistency-group barrier.
pub const DEFAULT_HOLD_MS: u32 = 100;

#[derive(Default)]
struct FenceState {
    tag_id: String,
    shutdown_tag_seq: u64,
    run_shutdown_hook: bool,
    hook_done: bool,
}

struct Pipeline {
    assignment: Assignment,
    /// Until when the stream waits for the old PS of a move.
    moving_until_ms: Option<u64>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// What the control commands act on.
pub struct Runtime {
    pub capture: Arc<Capture>,
    pub link: Arc<Link>,
    pub settings: Arc<Settings>,
    disks: Vec<DiskInfo>,
    pipeline: tokio::sync::Mutex<Option<Pipeline>>,
    /// The assignment of the running pipeline ("" = not streaming).
    current: Mutex<Option<Assignment>>,
    /// `replication.json`: the assignment, kept across restarts.
    assigned_file: Arc<AssignmentFile>,
    pub crash_interval_ms: AtomicU64,
    pub app_interval_secs: AtomicU64,
    pub hook_timeout_ms: AtomicU64,
    /// Wakes the recovery-point timers when `SetPolicy` changes an interval.
    policy_changed: tokio::sync::Notify,
    fence: Mutex<FenceState>,
    app_lock: tokio::sync::Mutex<()>,
    /// The group point whose freeze hook ran, until its thaw.
    group_frozen: Mutex<Option<String>>,
    instance: String,
    events: OnceLock<ControlHandle>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Runtime {
    pub fn new(capture: Arc<Capture>, link: Arc<Link>, settings: Arc<Settings>) -> Arc<Runtime> {
        let disks = capture
            .disks()
            .iter()
            .map(|d| DiskInfo {
                index: d.index,
                name: d.name.clone(),
                size: d.size(),
            })
            .collect();
        let instance: String = (0..8)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        Arc::new(Runtime {
            crash_interval_ms: AtomicU64::new(settings.crash_interval.as_millis() as u64),
            app_interval_secs: AtomicU64::new(settings.app_interval.as_secs()),
            hook_timeout_ms: AtomicU64::new(settings.hook_timeout.as_millis() as u64),
            policy_changed: tokio::sync::Notify::new(),
            assigned_file: Arc::new(AssignmentFile::new(settings.assigned_path())),
            capture,
            link,
            settings,
            disks,
            pipeline: tokio::sync::Mutex::new(None),
            current: Mutex::new(None),
            fence: Mutex::new(FenceState::default()),
            app_lock: tokio::sync::Mutex::new(()),
            group_frozen: Mutex::new(None),
            instance,
            events: OnceLock::new(),
        })
    }

    /// Where to send events (the control channel), once it runs.
    pub fn set_events(&self, h: ControlHandle) {
        self.link.set_events(h.clone());
        let _ = self.events.set(h);
    }

    fn event(&self, severity: &str, kind: &str, message: String) {
        if let Some(h) = self.events.get() {
            h.event(Event {
                severity: severity.into(),
                kind: kind.into(),
                message,
                replication_id: self.replication_id(),
                ..Default::default()
            });
        }
    }

    /// The replication being streamed, "" when none.
    pub fn replication_id(&self) -> String {
        lock(&self.current)
            .as_ref()
            .map(|a| a.replication_id.clone())
            .unwrap_or_default()
    }

    /// The configured replication (standalone mode).
    pub fn configured(settings: &Settings) -> Assignment {
        Assignment {
            replication_id: settings.replication_id.clone(),
            ps_addr: settings.ps.addr.clone(),
            ps_server_name: settings.ps.server_name.clone(),
        }
    }

    /// The assignment the CS made earlier, if any.
    pub fn load_assignment(settings: &Settings) -> Option<Assignment> {
        AssignmentFile::new(settings.assigned_path()).load()
    }

    /// Until when (ms since the epoch) the stream of the recorded
    /// assignment waits for the old PS of a move, if it is moving.
    pub fn recorded_move(settings: &Settings) -> Option<u64> {
        AssignmentFile::new(settings.assigned_path()).recorded_move()
    }

    /// Until when the running pipeline waits for the old PS of a move.
    pub async fn moving_until_ms(&self) -> Option<u64> {
        self.pipeline.lock().await.as_ref()?.moving_until_ms
    }

    /// Starts the sender and resync driver for `a` (stopping any running).
    /// A move recorded with `a` that has not timed out goes on: the stream
    /// still waits for the old PS until the recorded end.
    pub async fn start_pipeline(&self, a: Assignment) {
        let moving = self.assigned_file.pending_move(&a);
        if let Some(until) = moving {
            info!(replication_id = %a.replication_id, ps = %a.ps_addr,
                "a move to this process server was under way: still waiting {} s for the old one to \
                 forward what it acknowledged", until.saturating_sub(now_ms()) / 1000);
        }
        self.launch(a, moving).await
    }

    /// [`Runtime::start_pipeline`]; `moving_until_ms` is the deadline until
    /// which the stream waits for a new PS that resumes below the
    /// acknowledged seq, instead of resyncing (the old PS still forwards
    /// those records).
    async fn launch(&self, a: Assignment, moving_until_ms: Option<u64>) {
        let moving = moving_until_ms.map(|until| self.assigned_file.moving(&a, until));
        let mut p = self.pipeline.lock().await;
        if let Some(old) = p.take() {
            stop(old).await;
        }
        let mut s = (*self.settings).clone();
        s.replication_id = a.replication_id.clone();
        s.ps = PsConfig {
            addr: a.ps_addr.clone(),
            server_name: if a.ps_server_name.is_empty() {
                "localhost".into()
            } else {
                a.ps_server_name.clone()
            },
        };
        let s = Arc::new(s);
        let info = ReplicationInfo {
            replication_id: a.replication_id.clone(),
            machine_id: s.machine_id.clone(),
            disks: self.disks.clone(),
        };
        let (tx, rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(crate::sender::run(
                self.capture.clone(),
                s.clone(),
                self.link.clone(),
                info.clone(),
                moving,
                rx.clone(),
            )),
            tokio::spawn(crate::resync::driver(
                self.capture.clone(),
                self.link.clone(),
                info,
                s.initialized_marker(),
                rx,
            )),
        ];
        *lock(&self.current) = Some(a.clone());
        *p = Some(Pipeline {
            assignment: a,
            moving_until_ms,
            stop: tx,
            tasks,
        });
    }

    /// Stops streaming.
    pub async fn stop_pipeline(&self) {
        let old = self.pipeline.lock().await.take();
        *lock(&self.current) = None;
        if let Some(old) = old {
            stop(old).await;
        }
    }

    fn hook_env(&self, name: &str) -> Vec<(String, String)> {
        vec![
            ("REBOUND_HOOK".into(), name.into()),
            ("REBOUND_MACHINE".into(), self.settings.machine_id.clone()),
            ("REBOUND_SITE".into(), self.settings.site.clone()),
            ("REBOUND_REPLICATION".into(), self.replication_id()),
        ]
    }

    /// Runs a hook; Ok when none is configured.
    pub async fn hook(&self, name: &str, command: &str) -> Result<(), HookError> {
        if command.trim().is_empty() {
            return Ok(());
        }
        let timeout = Duration::from_millis(self.hook_timeout_ms.load(Ordering::Relaxed).max(1));
        run_hook(name, command, &self.hook_env(name), timeout).await
    }

    // ------------------------------------------------------------ commands

    fn fence(&self, f: &pb::Fence) -> CommandResult {
        let mut st = lock(&self.fence);
        if self.capture.is_fenced() && !f.tag_id.is_empty() && st.tag_id == f.tag_id {
            return ok_result();
        }
        self.capture.fence();
        let mut r = ok_result();
        let mut seq = 0;
        if !f.tag_id.is_empty() {
            match self.capture.cut_named_tag(TagKind::Shutdown, &f.tag_id, "") {
                Ok((id, s)) => {
                    info!(tag = %id, seq = s, "fenced: writes get EPERM; shutdown point cut");
                    seq = s;
                }
                Err(e) => {
                    r.warning = format!("fenced, but no shutdown point was cut: {e}");
                    warn!("{}", r.warning);
                }
            }
        } else {
            info!("fenced by the configuration server: writes get EPERM");
        }
        self.capture.stream().request_flush();
        *st = FenceState {
            tag_id: f.tag_id.clone(),
            shutdown_tag_seq: seq,
            run_shutdown_hook: f.run_shutdown_hook,
            hook_done: false,
        };
        r
    }

    fn unfence(&self) -> CommandResult {
        self.capture.unfence();
        *lock(&self.fence) = FenceState::default();
        info!("unfenced: writes accepted again");
        ok_result()
    }

    async fn drain(&self, d: &pb::Drain) -> CommandResult {
        let limit = Duration::from_millis(if d.timeout_ms == 0 {
            30_000
        } else {
            u64::from(d.timeout_ms)
        });
        if !crate::drain(&self.capture, limit).await {
            let s = self.capture.snapshot();
            return err_result(format!(
                "not drained within {} ms: the process server holds seq {} of {} (is it reachable?)",
                limit.as_millis(),
                s.durable_seq,
                s.seq
            ));
        }
        let (tag_seq, run_hook) = {
            let st = lock(&self.fence);
            (st.shutdown_tag_seq, st.run_shutdown_hook && !st.hook_done)
        };
        let mut r = ok_result();
        if run_hook {
            if let Err(e) = self.hook("shutdown", &self.settings.hooks.shutdown).await {
                r.warning = format!("shutdown hook failed: {e}");
                self.event("warning", "shutdown-hook-failed", r.warning.clone());
            }
            lock(&self.fence).hook_done = true;
        }
        let s = self.capture.snapshot();
        r.detail = Some(Detail::Drained(Drained {
            durable_seq: s.durable_seq,
            shutdown_tag_seq: tag_seq,
        }));
        r
    }

    /// Cuts an app-consistent point: freeze → hold → tag → release → thaw.
    /// A failed freeze cuts a crash point with a warning.
    pub async fn app_tag(&self, id: &str, group: &str) -> Result<TagCut, TagError> {
        let _one = self.app_lock.lock().await;
        if let Err(e) = self.hook("freeze", &self.settings.hooks.freeze).await {
            // Best effort: whatever part of the freeze ran is undone.
            let _ = self.hook("thaw", &self.settings.hooks.thaw).await;
            let warning = format!("freeze failed ({e}); cut a crash-consistent point instead");
            warn!("{warning}");
            self.event("warning", "freeze-failed", warning.clone());
            let (id, seq) = self.capture.cut_named_tag(TagKind::Crash, id, group)?;
            return Ok(TagCut {
                id,
                seq,
                kind: "crash".into(),
                warning,
            });
        }
        let token = format!("app:{id}");
        let held = self.capture.hold().hold(&token);
        let cut = self.capture.cut_named_tag(TagKind::App, id, group);
        if held {
            self.capture.hold().release(&token);
        }
        let thaw = self.hook("thaw", &self.settings.hooks.thaw).await;
        let (id, seq) = cut?;
        let mut warning = String::new();
        if let Err(e) = thaw {
            warning = format!("thaw failed: {e}");
            self.event("warning", "thaw-failed", warning.clone());
        }
        Ok(TagCut {
            id,
            seq,
            kind: "app".into(),
            warning,
        })
    }

    async fn tag(&self, t: &pb::Tag) -> CommandResult {
        let cut = match t.kind.as_str() {
            "app" => self.app_tag(&t.id, &t.group).await,
            "" | "crash" => self
                .capture
                .cut_named_tag(TagKind::Crash, &t.id, &t.group)
                .map(|(id, seq)| TagCut {
                    id,
                    seq,
                    kind: "crash".into(),
                    warning: String::new(),
                }),
            k => {
                return err_result(format!(
                    "no recovery point cut: unknown tag kind {k:?}: use crash or app"
                ))
            }
        };
        tag_result(cut)
    }

    /// Phase 1 of a group barrier: (freeze for "app") hold new writes,
    /// release (and thaw) after `hold_ms`.
    pub async fn group_prepare(self: &Arc<Self>, g: &pb::GroupPrepare) -> CommandResult {
        let app = match g.kind.as_str() {
            "app" => true,
            "" | "crash" => false,
            k => {
                return err_result(format!(
                    "no group point prepared: unknown kind {k:?}: use crash or app"
                ))
            }
        };
        if self.capture.is_fenced() {
            return err_result("this agent is fenced: no group point");
        }
        if !self.capture.is_consistent() {
            return err_result(format!(
                "no consistent point possible now (mode {})",
                self.capture.mode().as_str()
            ));
        }
        let mut r = ok_result();
        if app {
            match self.hook("freeze", &self.settings.hooks.freeze).await {
                Ok(()) => *lock(&self.group_frozen) = Some(g.tag_id.clone()),
                Err(e) => {
                    // Best effort: whatever part of the freeze ran is undone.
                    let _ = self.hook("thaw", &self.settings.hooks.thaw).await;
                    r.warning = format!(
                        "freeze failed ({e}); this machine's point of group point {} will be crash-consistent",
                        g.tag_id
                    );
                    warn!("{}", r.warning);
                    self.event("warning", "freeze-failed", r.warning.clone());
                }
            }
        }
        if !self.capture.hold().hold(&g.tag_id) {
            let _ = self.thaw_group(&g.tag_id).await;
            return err_result(format!(
                "another write hold is in force ({})",
                self.capture.hold().held_by().unwrap_or_default()
            ));
        }
        let hold = Duration::from_millis(u64::from(if g.hold_ms == 0 {
            DEFAULT_HOLD_MS
        } else {
            g.hold_ms
        }));
        let me = self.clone();
        let token = g.tag_id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            if me.capture.hold().release(&token) {
                let msg = format!(
                    "write hold for group point {token} released after {} ms without a commit (aborted)",
                    hold.as_millis()
                );
                debug!("{msg}");
                me.event("info", "group-hold-expired", msg);
                let _ = me.thaw_group(&token).await;
            }
        });
        r
    }

    /// Runs the thaw hook when the freeze ran for group point `tag_id`;
    /// the warning when the thaw failed.
    async fn thaw_group(&self, tag_id: &str) -> Option<String> {
        {
            let mut frozen = lock(&self.group_frozen);
            if frozen.as_deref() != Some(tag_id) {
                return None;
            }
            *frozen = None;
        }
        let e = self.hook("thaw", &self.settings.hooks.thaw).await.err()?;
        let warning = format!("thaw failed: {e}");
        warn!("{warning}");
        self.event("warning", "thaw-failed", warning.clone());
        Some(warning)
    }

    /// Phase 2: cut the group tag (id = group = `tag_id`), release, thaw.
    /// The tag is an app point when the freeze ran at prepare.
    pub async fn group_commit(&self, g: &pb::GroupCommit) -> CommandResult {
        if self.capture.hold().held_by().as_deref() != Some(g.tag_id.as_str()) {
            return err_result(format!(
                "the write hold for group point {} is not in force (it expired or was never taken): \
                 the barrier must be retried",
                g.tag_id
            ));
        }
        let frozen = lock(&self.group_frozen).as_deref() == Some(g.tag_id.as_str());
        let kind = match g.kind.as_str() {
            "app" if frozen => TagKind::App,
            _ => TagKind::Crash,
        };
        let cut = self.capture.cut_named_tag(kind, &g.tag_id, &g.tag_id);
        self.capture.hold().release(&g.tag_id);
        let mut warning = self.thaw_group(&g.tag_id).await.unwrap_or_default();
        if g.kind == "app" && !frozen {
            warning = format!(
                "no freeze ran for group point {} (it failed at prepare): this machine's point is crash-consistent",
                g.tag_id
            );
        }
        tag_result(cut.map(|(id, seq)| TagCut {
            id,
            seq,
            kind: kind.as_str().into(),
            warning,
        }))
    }

    pub async fn group_abort(&self, g: &pb::GroupAbort) -> CommandResult {
        self.capture.hold().release(&g.tag_id);
        let mut r = ok_result();
        r.warning = self.thaw_group(&g.tag_id).await.unwrap_or_default();
        r
    }

    fn set_policy(&self, p: Option<&pb::Policy>) {
        let Some(p) = p else { return };
        if p.crash_interval_ms > 0 {
            self.crash_interval_ms
                .store(u64::from(p.crash_interval_ms), Ordering::Relaxed);
        }
        self.app_interval_secs
            .store(u64::from(p.app_interval_secs), Ordering::Relaxed);
        if p.freeze_timeout_ms > 0 {
            self.hook_timeout_ms
                .store(u64::from(p.freeze_timeout_ms), Ordering::Relaxed);
        }
        self.policy_changed.notify_waiters();
    }

    fn resync(&self, r: &pb::Resync) -> CommandResult {
        let reason = if r.reason.is_empty() {
            "requested"
        } else {
            r.reason.as_str()
        };
        if r.disks.is_empty() {
            self.capture.resync().mark_need_all(reason);
        } else {
            for &d in &r.disks {
                let Some(disk) = self.capture.disks().get(d as usize) else {
                    return err_result(format!("no disk {d}"));
                };
                let exts: Vec<u64> = (0..disk.size().div_ceil(EXTENT_SIZE)).collect();
                self.capture.resync().mark_need(d, &exts, reason);
            }
        }
        ok_result()
    }

    async fn start_replication(&self, s: &pb::StartReplication) -> CommandResult {
        if s.replication_id.is_empty() || s.ps_address.is_empty() {
            return err_result("StartReplication needs replication_id and ps_address");
        }
        self.set_policy(s.policy.as_ref());
        let a = Assignment {
            replication_id: s.replication_id.clone(),
            ps_addr: s.ps_address.clone(),
            ps_server_name: s.ps_server_name.clone(),
        };
        // The machine is protected from here: it is the writable copy.
        if self.capture.is_fenced() {
            self.unfence();
        }
        let running = self
            .pipeline
            .lock()
            .await
            .as_ref()
            .map(|p| p.assignment.clone());
        if running.as_ref() == Some(&a) {
            return ok_result();
        }
        let same_stream = running
            .as_ref()
            .is_some_and(|r| r.replication_id == a.replication_id)
            && !s.resync;
        let moving = (same_stream && s.moving)
            .then(|| now_ms() + crate::sender::MOVE_WAIT.as_millis() as u64);
        if let Err(e) = self.assigned_file.save(Some(&a), moving) {
            return err_result(format!(
                "cannot record the replication in {}: {e}",
                self.settings.assigned_path().display()
            ));
        }
        self.stop_pipeline().await;
        if !same_stream {
            let m = self.settings.initialized_marker();
            if m.exists() {
                let _ = std::fs::remove_file(&m);
            }
            self.capture.switch_replication(&a.replication_id);
        }
        info!(replication_id = %a.replication_id, ps = %a.ps_addr, resync = !same_stream,
            moving = moving.is_some(), "streaming to the process server the configuration server chose");
        self.launch(a, moving).await;
        ok_result()
    }

    async fn stop_replication(&self, s: &pb::StopReplication) -> CommandResult {
        let cur = self.replication_id();
        if !s.replication_id.is_empty() && !cur.is_empty() && cur != s.replication_id {
            return ok_result();
        }
        self.stop_pipeline().await;
        if !s.keep_running {
            // The machine runs elsewhere now: this copy must not take writes.
            self.capture.fence();
        }
        if let Err(e) = self.assigned_file.save(None, None) {
            warn!(
                "cannot remove {}: {e}",
                self.settings.assigned_path().display()
            );
        }
        let mut r = ok_result();
        if s.remove_source_copy {
            let mut kept = Vec::new();
            for d in &self.settings.disks {
                match std::fs::metadata(&d.path) {
                    Ok(m) if m.is_file() => {
                        if let Err(e) = std::fs::remove_file(&d.path) {
                            kept.push(format!("{}: {e}", d.path.display()));
                        }
                    }
                    Ok(_) => kept.push(format!("{} is not a regular file", d.path.display())),
                    Err(_) => {}
                }
            }
            if !kept.is_empty() {
                r.warning = format!("source copy not removed: {}", kept.join("; "));
            }
        }
        info!(replication_id = %cur, keep_running = s.keep_running, "replication stopped by the configuration server");
        r
    }

    pub async fn handle_cmd(self: &Arc<Self>, cmd: Command) -> CommandResult {
        match cmd.cmd {
            Some(Cmd::Fence(f)) => self.fence(&f),
            Some(Cmd::Unfence(_)) => self.unfence(),
            Some(Cmd::Drain(d)) => self.drain(&d).await,
            Some(Cmd::Tag(t)) => self.tag(&t).await,
            Some(Cmd::GroupPrepare(g)) => self.group_prepare(&g).await,
            Some(Cmd::GroupCommit(g)) => self.group_commit(&g).await,
            Some(Cmd::GroupAbort(g)) => self.group_abort(&g).await,
            Some(Cmd::SetPolicy(p)) => {
                self.set_policy(p.policy.as_ref());
                ok_result()
            }
            Some(Cmd::Resync(r)) => self.resync(&r),
            Some(Cmd::StartReplication(s)) => self.start_replication(&s).await,
            Some(Cmd::StopReplication(s)) => self.stop_replication(&s).await,
            Some(Cmd::Verify(v)) => self.verify(&v).await,
            Some(other) => err_result(format!("an agent does not run this command: {other:?}")),
            None => err_result("empty command"),
        }
    }

    pub fn status(&self) -> AgentStatus {
        let s = self.capture.snapshot();
        let resync_total = if s.resync_pending_extents > 0 {
            s.resync_bytes_sent + s.resync_pending_extents * EXTENT_SIZE
        } else {
            0
        };
        AgentStatus {
            mode: s.mode.as_str().into(),
            buffer_bytes: s.buffer_bytes,
            buffer_limit: s.buffer_limit,
            rpo_ms: s.lag_ms,
            seq: s.seq,
            durable_seq: s.durable_seq,
            dirty_extents: s.dirty_extents,
            last_tag: s.last_tag,
            fenced: self.capture.is_fenced(),
            replication_id: self.replication_id(),
            resync_bytes_sent: if resync_total > 0 {
                s.resync_bytes_sent
            } else {
                0
            },
            resync_bytes_total: resync_total,
            link_error: self.link.error(),
        }
    }

    pub fn hello(&self) -> Hello {
        Hello {
            role: "agent".into(),
            id: self.settings.machine_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            site: self.settings.site.clone(),
            addresses: Vec::new(),
            disks: self
                .disks
                .iter()
                .map(|d| pb::Disk {
                    index: d.index,
                    name: d.name.clone(),
                    size: d.size,
                    path: (self.capture.disks().get(d.index as usize))
                        .map(|x| x.path.display().to_string())
                        .unwrap_or_default(),
                })
                .collect(),
            writable: !self.capture.is_fenced(),
            replication_id: self.replication_id(),
            instance: self.instance.clone(),
        }
    }
}

async fn stop(p: Pipeline) {
    let _ = p.stop.send(true);
    for t in p.tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
}

fn tag_result(cut: Result<TagCut, TagError>) -> CommandResult {
    match cut {
        Ok(t) => CommandResult {
            ok: true,
            warning: t.warning.clone(),
            detail: Some(Detail::TagCut(t)),
            ..Default::default()
        },
        Err(e) => err_result(format!("no recovery point cut: {e}")),
    }
}

/// The [`ControlHandler`] of the agent.
pub struct AgentControl(pub Arc<Runtime>);

impl ControlHandler for AgentControl {
    fn hello(&self) -> Hello {
        self.0.hello()
    }
    fn status(&self) -> Option<pb::Status> {
        Some(pb::Status {
            status: Some(pb::status::Status::Agent(self.0.status())),
        })
    }
    fn handle(&self, cmd: Command) -> Pin<Box<dyn Future<Output = CommandResult> + Send>> {
        let rt = self.0.clone();
        Box::pin(async move { rt.handle_cmd(cmd).await })
    }
}

mod assignment;
mod schedule;
mod verify;
pub use assignment::Assignment;
use assignment::AssignmentFile;
pub use schedule::{app_tag_loop, crash_tag_loop};

#[cfg(test)]
pub(crate) mod tests;
