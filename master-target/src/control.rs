//! The master target on the control channel (DESIGN.md §8): its hello, its
//! status (a recovery-point summary per replication every heartbeat), and
//! the lifecycle commands the configuration server sends it: Rollback (by a
//! `PointChoice`), RestorePreImages, HandOver, EndReplication, ListPoints,
//! PrepareReplication (which also assigns the replication's PS), SetRetention
//! and SetRevoked. Every command is idempotent, since a command id may
//! arrive twice after a reconnect.

use crate::catalog::PointEntry;
use crate::config::{HooksConfig, ReprotectConfig, RetentionConfig};
use crate::error::MtError;
use crate::replication::{Replication, Store};
use crate::state::RetentionPolicy;
use rebound_common::control::{err_result, ok_result, set_revoked, ControlHandler};
use rebound_common::time::now_ms;
use rebound_common::tls::Revocations;
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use rebound_proto::control::command_result::Detail;
use rebound_proto::control::point_choice::Choice;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tracing::info;

/// Group points reported per replication, newest last.
const MAX_GROUP_POINTS: usize = 256;

pub fn point_to_proto(p: &PointEntry) -> pb::Point {
    pb::Point {
        id: p.id.clone(),
        kind: p.kind.clone(),
        time_ms: p.time_ms,
        seq: p.seq,
        group: p.group.clone(),
        damaged: String::new(),
    }
}

/// What a choice means, for errors.
fn describe(c: &Choice) -> String {
    match c {
        Choice::Latest(_) => "latest".into(),
        Choice::LatestProcessed(_) => "latest-processed".into(),
        Choice::LatestApp(_) => "latest-app".into(),
        Choice::LatestMulti(_) => "latest-multi".into(),
        Choice::LatestMultiApp(_) => "latest-multi-app".into(),
        Choice::Id(id) => format!("point {id:?}"),
        Choice::AtOrBeforeMs(t) => format!("the newest point at or before {t} ms"),
        Choice::GroupTag(g) => format!("group point {g:?}"),
    }
}

/// Picks the point `choice` names among `points` (oldest first). `latest`
/// and `latest-processed` are both the newest applied point: draining what
/// is pending is the CS's job before it asks.
pub fn resolve_point<'a>(points: &'a [PointEntry], choice: &Choice) -> Option<&'a PointEntry> {
    let mut newest = points.iter().rev();
    match choice {
        Choice::Latest(_) | Choice::LatestProcessed(_) => points.last(),
        Choice::LatestApp(_) => newest.find(|p| p.kind == "app"),
        Choice::LatestMulti(_) => newest.find(|p| !p.group.is_empty()),
        Choice::LatestMultiApp(_) => newest.find(|p| !p.group.is_empty() && p.kind == "app"),
        Choice::Id(id) => newest.find(|p| &p.id == id),
        Choice::AtOrBeforeMs(t) => newest.find(|p| p.time_ms <= *t),
        Choice::GroupTag(g) => newest.find(|p| &p.group == g),
    }
}

impl Replication {
    /// Resolves `choice` against the catalog and rolls back to that point.
    pub fn rollback_to(&self, choice: &Choice) -> Result<crate::RollbackReport, MtError> {
        let p = self.resolve_choice(choice)?;
        self.rollback(&p.id)
    }

    /// The retained point `choice` names (Rollback, StartTestFailover), or
    /// an error saying which points there are.
    pub fn resolve_choice(&self, choice: &Choice) -> Result<PointEntry, MtError> {
        let points = self.points();
        let p = resolve_point(&points, choice).ok_or_else(|| {
            let have = match (points.first(), points.last()) {
                (Some(a), Some(b)) => format!(
                    "it has {} points, from {} ({} ms) to {} ({} ms)",
                    points.len(),
                    a.id,
                    a.time_ms,
                    b.id,
                    b.time_ms
                ),
                _ => "it has no recovery point yet".into(),
            };
            MtError::NotFound(format!(
                "machine {} (replication {}) has no recovery point matching {}: {have}",
                self.machine_id(),
                self.id(),
                describe(choice)
            ))
        })?;
        Ok(p.clone())
    }

    /// The state the MT reports: "poisoned" (refusing changes until the MT
    /// restarts), "applying", "rolled-back", "handed-over" or "ended".
    pub fn state_name(&self) -> &'static str {
        if self.poisoned().is_some() {
            return "poisoned";
        }
        let inner = self.read_summary();
        if inner.state().ended.is_some() {
            "ended"
        } else if inner.state().handed_over.is_some() {
            "handed-over"
        } else if inner.rollback_point().is_some() {
            "rolled-back"
        } else {
            "applying"
        }
    }

    /// The recovery-point summary the MT reports to the CS.
    pub fn point_summary(&self) -> pb::PointSummary {
        let inner = self.read_summary();
        let points = inner.points().as_slice();
        let mut group: Vec<pb::Point> = points
            .iter()
            .filter(|p| !p.group.is_empty())
            .map(point_to_proto)
            .collect();
        if group.len() > MAX_GROUP_POINTS {
            group.drain(..group.len() - MAX_GROUP_POINTS);
        }
        pb::PointSummary {
            applied_seq: inner.applied_seq(),
            count: points.len() as u32,
            oldest: points.first().map(point_to_proto),
            latest: points.last().map(point_to_proto),
            latest_app: points
                .iter()
                .rev()
                .find(|p| p.kind == "app")
                .map(point_to_proto),
            rolled_back_to: inner
                .state()
                .rolled_back_to
                .as_ref()
                .map(|p| p.id.clone())
                .unwrap_or_default(),
            group_points: group,
        }
    }
}

/// The MT's status message; each replication's retention is its policy
/// over the MT's `defaults`.
pub fn mt_status(store: &Store, defaults: &RetentionConfig) -> pb::MtStatus {
    let mut retention_bytes = 0;
    let now = now_ms();
    let replications = store
        .list()
        .iter()
        .map(|r| {
            retention_bytes += r.status().journal_bytes;
            let retention = r.retention_policy().resolve(defaults);
            // A running test failover: its point and exports.
            let (test_point, test_exports) = match r.test_failover() {
                Some(t) => (t.point.id, r.test_exports()),
                None => Default::default(),
            };
            pb::MtReplicationStatus {
                replication_id: r.id().to_string(),
                machine_id: r.machine_id().to_string(),
                points: Some(r.point_summary()),
                state: r.state_name().to_string(),
                retention_window_secs: retention.window_secs,
                retention_max_bytes: retention.max_bytes,
                test_point,
                test_exports,
                retention_capped: r.retention_capped(),
                oldest_point_age_secs: r.oldest_point_age_secs(now),
            }
        })
        .collect();
    pb::MtStatus {
        replications,
        retention_bytes,
    }
}

pub use rebound_common::control::Identity;

/// The MT's [`ControlHandler`].
pub struct MtControl {
    pub store: Arc<Store>,
    pub hooks: HooksConfig,
    /// The `[retention]` defaults a replication's policy falls back on.
    pub retention: RetentionConfig,
    /// Where a reprotect's replica may be seeded from.
    pub reprotect: ReprotectConfig,
    pub identity: Identity,
    /// The last status, refreshed by [`status_task`] off the runtime (a long
    /// rollback holds its replication's lock; heartbeats must not wait).
    pub status: std::sync::Mutex<Option<pb::MtStatus>>,
    /// The revocation list the gRPC acceptor enforces; SetRevoked replaces
    /// it and saves it to `revoked_path`.
    pub revocations: Revocations,
    pub revoked_path: std::path::PathBuf,
}

/// Refreshes `control.status` every `period` until `stop` turns true.
pub async fn status_task(
    control: Arc<MtControl>,
    period: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let c = control.clone();
        let status = move || mt_status(&c.store, &c.retention);
        if let Ok(st) = tokio::task::spawn_blocking(status).await {
            *control
                .status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(st);
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn disk_info(d: &pb::Disk) -> rebound_proto::DiskInfo {
    rebound_proto::DiskInfo {
        index: d.index,
        name: d.name.clone(),
        size: d.size,
    }
}

impl MtControl {
    pub(crate) fn replication(&self, id: &str) -> Result<Arc<Replication>, MtError> {
        self.store.get(id).ok_or_else(|| {
            MtError::NotFound(format!(
                "MT {} has no replication {id:?} (it has {})",
                self.identity.id,
                self.store
                    .list()
                    .iter()
                    .map(|r| r.id().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// Runs one command (blocking: storage work and hooks).
    pub fn run(&self, cmd: Cmd) -> Result<pb::CommandResult, MtError> {
        let ok = ok_result();
        match cmd {
            Cmd::Rollback(c) => {
                let r = self.replication(&c.replication_id)?;
                let choice = c.point.and_then(|p| p.choice).ok_or_else(|| {
                    MtError::InvalidArgument(format!(
                        "Rollback of replication {} names no point",
                        c.replication_id
                    ))
                })?;
                let rep = r.rollback_to(&choice)?;
                Ok(pb::CommandResult {
                    detail: Some(Detail::RolledBack(pb::RolledBack {
                        point: Some(point_to_proto(&rep.point)),
                        blocks_restored: rep.blocks_restored,
                    })),
                    ..ok
                })
            }
            Cmd::RestorePreImages(c) => {
                let r = self.replication(&c.replication_id)?;
                let n = r.restore_pre_images()?;
                info!(replication = %c.replication_id, blocks = n, "pre-images restored (control channel)");
                Ok(ok)
            }
            Cmd::HandOver(c) => {
                let r = self.replication(&c.replication_id)?;
                let rep = r.hand_over(c.run_power_on, &self.hooks)?;
                match &rep.power_on {
                    Some(o) if !o.success => Ok(err_result(format!(
                        "{} was handed over at point {}, but its power_on hook `{}` failed ({}): {}",
                        r.machine_id(),
                        rep.point,
                        o.command,
                        o.status,
                        o.output_tail
                    ))),
                    _ => Ok(ok),
                }
            }
            Cmd::EndReplication(c) => {
                self.store
                    .end_replication(&c.replication_id, c.keep_replica)?;
                Ok(ok)
            }
            Cmd::ListPoints(c) => {
                let r = self.replication(&c.replication_id)?;
                let s = r.status();
                Ok(pb::CommandResult {
                    detail: Some(Detail::PointList(pb::PointList {
                        points: r
                            .points_with_damage()
                            .iter()
                            .map(|(p, damaged)| pb::Point {
                                damaged: damaged.clone(),
                                ..point_to_proto(p)
                            })
                            .collect(),
                        applied_seq: s.applied_seq,
                        rolled_back_to: s.rolled_back_to.unwrap_or_default(),
                    })),
                    ..ok
                })
            }
            Cmd::PrepareReplication(c) => {
                let info = rebound_proto::ReplicationInfo {
                    replication_id: c.replication_id.clone(),
                    machine_id: c.machine_id.clone(),
                    disks: c.disks.iter().map(disk_info).collect(),
                };
                let (r, adopted) = self.store.prepare(&info, &c.adopt_from)?;
                if !c.ps_id.is_empty() {
                    r.assign_ps(&c.ps_id)?;
                }
                // Nothing adopted (the earlier replication lived at another
                // MT): the kept source copy seeds the replica, if any.
                let no_seed = c.seed_paths.iter().all(String::is_empty);
                let warning = match (&adopted, c.adopt_from.is_empty() || !no_seed) {
                    (None, false) => format!(
                        "MT {} holds no replica of {} to adopt (from {}): the resync sends the whole disks",
                        self.identity.id, c.machine_id, c.adopt_from
                    ),
                    (None, true) => self.seed_replica(&r, &c.seed_paths)?,
                    _ => String::new(),
                };
                Ok(pb::CommandResult { warning, ..ok })
            }
            Cmd::PowerOff(c) => self.power_off(&c),
            Cmd::StartTestFailover(c) => self.start_test_failover(&c),
            Cmd::EndTestFailover(c) => self.end_test_failover(&c),
            Cmd::SetReplicationPs(c) => self.set_replication_ps(&c),
            Cmd::SetRevoked(c) => Ok(set_revoked(&self.revocations, &self.revoked_path, &c)),
            Cmd::SetRetention(c) => {
                let policy = RetentionPolicy {
                    window_secs: c.window_secs,
                    max_bytes: c.max_bytes,
                };
                self.store.set_retention(&c.replication_id, policy)?;
                Ok(ok)
            }
            other => Err(MtError::InvalidArgument(format!(
                "a master target does not take the command {}",
                cmd_name(&other)
            ))),
        }
    }
}

fn cmd_name(c: &Cmd) -> &'static str {
    match c {
        Cmd::Fence(_) => "Fence",
        Cmd::Unfence(_) => "Unfence",
        Cmd::Drain(_) => "Drain",
        Cmd::Tag(_) => "Tag",
        Cmd::GroupPrepare(_) => "GroupPrepare",
        Cmd::GroupCommit(_) => "GroupCommit",
        Cmd::GroupAbort(_) => "GroupAbort",
        Cmd::SetRevoked(_) => "SetRevoked",
        Cmd::SetPolicy(_) => "SetPolicy",
        Cmd::Resync(_) => "Resync",
        Cmd::StartReplication(_) => "StartReplication",
        Cmd::StopReplication(_) => "StopReplication",
        Cmd::Rollback(_) => "Rollback",
        Cmd::RestorePreImages(_) => "RestorePreImages",
        Cmd::HandOver(_) => "HandOver",
        Cmd::EndReplication(_) => "EndReplication",
        Cmd::ListPoints(_) => "ListPoints",
        Cmd::PrepareReplication(_) => "PrepareReplication",
        Cmd::SetRetention(_) => "SetRetention",
        Cmd::AddReplication(_) => "AddReplication",
        Cmd::RemoveReplication(_) => "RemoveReplication",
        Cmd::Verify(_) => "Verify",
        Cmd::PowerOff(_) => "PowerOff",
        Cmd::StartTestFailover(_) => "StartTestFailover",
        Cmd::EndTestFailover(_) => "EndTestFailover",
        Cmd::SetReplicationPs(_) => "SetReplicationPs",
    }
}

/// Runs a command off the runtime and shapes its result.
pub async fn handle_command(this: Arc<MtControl>, cmd: pb::Command) -> pb::CommandResult {
    let id = cmd.id.clone();
    let mut res = match cmd.cmd {
        None => err_result("empty command: this MT may be older than the CS; upgrade it"),
        Some(c) => match tokio::task::spawn_blocking(move || this.run(c)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => err_result(e.to_string()),
            Err(e) => err_result(format!("the command's task failed: {e}")),
        },
    };
    res.id = id;
    res
}

/// Adapter so the control task can hold the handler as a trait object.
pub struct Handler(pub Arc<MtControl>);

impl ControlHandler for Handler {
    fn hello(&self) -> pb::Hello {
        self.0.identity.hello(rebound_common::pki::Role::Mt)
    }

    fn status(&self) -> Option<pb::Status> {
        rebound_common::control::sampled_status(&self.0.status, pb::status::Status::Mt)
    }

    fn handle(&self, cmd: pb::Command) -> Pin<Box<dyn Future<Output = pb::CommandResult> + Send>> {
        Box::pin(handle_command(self.0.clone(), cmd))
    }
}
