//! The configuration server's state behind one storage trait (DESIGN.md §8
//! "State"): sites, components, machines and disks, replications, consistency
//! groups, recovery plans, jobs with their steps, recovery-point summaries,
//! events, a few settings (the passphrase verifier), and the trust records:
//! issued certificates and enrollment tokens (`trust.rs`).
//!
//! SQLite (`sqlite.rs`) is the default engine; PostgreSQL (`postgres.rs`)
//! implements the same trait for an HA deployment, where an active and a
//! standby CS share one database ([`open`] picks by `[store] url`). The trait is **object safe** — every
//! method returns a boxed future (`BoxFut`) — so the engine is picked at run
//! time from the config and the whole server shares one `Arc<dyn Store>`
//! without making every service generic over it. The cost of one allocation
//! per call is nothing next to a database round trip. (`async fn` in traits
//! would make the trait not object safe, and `#[async_trait]` is the same
//! boxing hidden behind a macro.)
//!
//! Every write is durable when the method returns, so a CS restart loses
//! nothing that was acknowledged.

pub mod postgres;
pub mod records;
pub(crate) mod rows;
pub mod scratch;
pub mod sqlite;
#[cfg(test)]
mod suite;
pub mod trust;

use rebound_common::pki::Role;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use thiserror::Error;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use trust::{IssuedCert, Token};

/// The future every store method returns.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot open the database {path}: {message} (check the config key db and that the directory exists and is writable)")]
    Open { path: String, message: String },
    #[error(
        "cannot open the PostgreSQL database {url}: {message} (check [store] url, that the \
             server runs and accepts this user, and that the database exists)"
    )]
    Connect { url: String, message: String },
    #[error(
        "database migration failed on {path}: {message} (is the database from a newer rebound-cs?)"
    )]
    Migrate { path: String, message: String },
    #[error("database error while {what}: {message}")]
    Query { what: String, message: String },
    #[error("corrupt row in the database while {what}: {message}")]
    Corrupt { what: String, message: String },
    #[error(
        "refused {what}: this CS no longer holds the store lease (it held epoch {epoch}; now \
         {holder} holds it), so it stops serving and the active CS takes over"
    )]
    Fenced {
        what: String,
        epoch: i64,
        holder: String,
    },
}

pub use rebound_common::time::now_ms;

/// Opens the store the config names: PostgreSQL at `store.url`, else the
/// SQLite file `db`. Migrations are applied on open.
pub async fn open(
    store: &crate::config::StoreConfig,
    db: &std::path::Path,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if !store.is_postgres() {
        return Ok(std::sync::Arc::new(SqliteStore::open(db).await?));
    }
    let url = &store.url;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StoreError::Connect {
            url: postgres::redact_url(url),
            message: "[store] url must start with postgres:// (or be empty for the SQLite \
                      file db)"
                .into(),
        });
    }
    Ok(std::sync::Arc::new(PgStore::open(url).await?))
}

/// Health of a component as the CS sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Enrolled, never connected.
    Enrolled,
    Online,
    /// Missed three heartbeats or closed its control channel.
    Offline,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Enrolled => "enrolled",
            Health::Online => "online",
            Health::Offline => "offline",
        }
    }
    pub fn parse(s: &str) -> Option<Health> {
        Some(match s {
            "enrolled" => Health::Enrolled,
            "online" => Health::Online,
            "offline" => Health::Offline,
            _ => return None,
        })
    }
}

/// An agent, PS or MT (or a CS/admin certificate that was issued).
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    pub role: Role,
    pub id: String,
    pub site: String,
    pub version: String,
    pub addresses: Vec<String>,
    /// Serial of the certificate the CS issued at enrollment (hex).
    pub cert_serial: String,
    /// blake3 of the certificate's DER (hex).
    pub cert_fingerprint: String,
    /// When its certificate expires (ms since the epoch; 0 = unknown): the
    /// notAfter of the certificate it last connected with.
    pub cert_expiry_ms: u64,
    pub enrolled_ms: u64,
    pub last_heartbeat_ms: u64,
    pub health: Health,
    /// The last `Status` message it sent, protobuf-encoded (empty = none).
    pub status: Vec<u8>,
    pub status_ms: u64,
    /// Revoked components may not connect.
    pub revoked: bool,
}

impl Component {
    pub fn new(role: Role, id: &str) -> Component {
        Component {
            role,
            id: id.to_string(),
            site: String::new(),
            version: String::new(),
            addresses: Vec::new(),
            cert_serial: String::new(),
            cert_fingerprint: String::new(),
            cert_expiry_ms: 0,
            enrolled_ms: 0,
            last_heartbeat_ms: 0,
            health: Health::Enrolled,
            status: Vec::new(),
            status_ms: 0,
            revoked: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub index: u32,
    pub name: String,
    pub size: u64,
    /// The disk's file or device at the machine's current site, as its
    /// agent reported it; empty when unknown.
    #[serde(default)]
    pub path: String,
}

/// Policy of a machine: its tags (DESIGN.md §5 "Tags"), the retention of
/// its replica at the MT and when its RPO raises an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    pub crash_interval_ms: u32,
    pub app_interval_secs: u32,
    pub freeze_timeout_ms: u32,
    /// Keep recovery points this long at the MT; 0 = the MT's default.
    pub retention_window_secs: u64,
    /// Cap on the replication's retention journal; 0 = the MT's default.
    pub retention_max_bytes: u64,
    /// Raise `rpo-exceeded` when the machine's RPO passes this; 0 = the
    /// CS's `[alerts] rpo_threshold` (60 s by default), [`RPO_ALERT_OFF`] =
    /// never.
    pub rpo_alert_ms: u64,
    /// Run a verify (no repair) this often; 0 = never.
    pub verify_interval_secs: u64,
}

/// `Policy::rpo_alert_ms` of a machine whose RPO never raises an alert.
/// The largest value, so a rule that ignores it still never fires.
pub const RPO_ALERT_OFF: u64 = u64::MAX;

/// The name of `Policy::rpo_alert_ms` in `SetPolicyRequest.reset`.
pub const RESET_RPO_ALERT: &str = "rpo_alert";

impl Policy {
    /// Whether it sets a retention of its own (else the MT's default
    /// applies and the MT need not be told).
    pub fn has_retention(&self) -> bool {
        self.retention_window_secs > 0 || self.retention_max_bytes > 0
    }

    /// This policy with every field `changes` sets (non-zero) replaced.
    pub fn overlay(self, changes: &Policy) -> Policy {
        fn or<T: Default + PartialEq>(v: T, base: T) -> T {
            if v == T::default() {
                base
            } else {
                v
            }
        }
        Policy {
            crash_interval_ms: or(changes.crash_interval_ms, self.crash_interval_ms),
            app_interval_secs: or(changes.app_interval_secs, self.app_interval_secs),
            freeze_timeout_ms: or(changes.freeze_timeout_ms, self.freeze_timeout_ms),
            retention_window_secs: or(changes.retention_window_secs, self.retention_window_secs),
            retention_max_bytes: or(changes.retention_max_bytes, self.retention_max_bytes),
            rpo_alert_ms: or(changes.rpo_alert_ms, self.rpo_alert_ms),
            verify_interval_secs: or(changes.verify_interval_secs, self.verify_interval_secs),
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            crash_interval_ms: 5_000,
            app_interval_secs: 3_600,
            freeze_timeout_ms: 10_000,
            retention_window_secs: 0,
            retention_max_bytes: 0,
            rpo_alert_ms: 0,
            verify_interval_secs: 0,
        }
    }
}

/// A protected (or protectable) machine; the id stays the same across sites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub id: String,
    /// The site the machine runs at now (moves at failover hand-over).
    pub site: String,
    pub disks: Vec<Disk>,
    pub policy: Policy,
    /// Consistency group, empty for none.
    pub group: String,
    pub created_ms: u64,
}

/// Replication states of DESIGN.md §8. A machine without a replication (or
/// whose last one was never started) is `Unprotected`; a replication that
/// `unprotect` ended is stored as `Unprotected` too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplState {
    Unprotected,
    InitialSync,
    Protected,
    FailingOver,
    FailedOver,
    Committed,
    WaitingForAgent,
}

impl ReplState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplState::Unprotected => "Unprotected",
            ReplState::InitialSync => "InitialSync",
            ReplState::Protected => "Protected",
            ReplState::FailingOver => "FailingOver",
            ReplState::FailedOver => "FailedOver",
            ReplState::Committed => "Committed",
            ReplState::WaitingForAgent => "WaitingForAgent",
        }
    }
    pub fn parse(s: &str) -> Option<ReplState> {
        Some(match s {
            "Unprotected" => ReplState::Unprotected,
            "InitialSync" => ReplState::InitialSync,
            "Protected" => ReplState::Protected,
            "FailingOver" => ReplState::FailingOver,
            "FailedOver" => ReplState::FailedOver,
            "Committed" => ReplState::Committed,
            "WaitingForAgent" => ReplState::WaitingForAgent,
            _ => return None,
        })
    }
}

impl fmt::Display for ReplState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A recovery point (as the MT catalog holds it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub id: String,
    pub kind: String,
    pub time_ms: u64,
    pub seq: u64,
    #[serde(default)]
    pub group: String,
}

/// One replication: a machine's change stream in one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    pub id: String,
    pub machine: String,
    pub from_site: String,
    pub to_site: String,
    /// PS id (at `from_site`) and MT id (at `to_site`).
    pub ps: String,
    pub mt: String,
    pub policy: Policy,
    pub state: ReplState,
    /// The replication this one reverses (reprotect), empty for the first.
    pub previous: String,
    /// The point a failover rolled back to.
    pub failover_point: Option<Point>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

#[cfg(test)]
impl Machine {
    /// Machine `id` at `site` with no disks and the default policy: the
    /// fixture tests start from.
    pub(crate) fn test_at(id: &str, site: &str) -> Machine {
        Machine {
            id: id.into(),
            site: site.into(),
            disks: Vec::new(),
            policy: Policy::default(),
            group: String::new(),
            created_ms: 1,
        }
    }
}

#[cfg(test)]
impl Replication {
    /// A protected onprem→azure replication of machine m1 through ps1 and
    /// mt1, created and updated at `time_ms`: the fixture tests start from.
    pub(crate) fn test_protected(id: &str, time_ms: u64) -> Replication {
        Replication {
            id: id.into(),
            machine: "m1".into(),
            from_site: "onprem".into(),
            to_site: "azure".into(),
            ps: "ps1".into(),
            mt: "mt1".into(),
            policy: Policy::default(),
            state: ReplState::Protected,
            previous: String::new(),
            failover_point: None,
            created_ms: time_ms,
            updated_ms: time_ms,
        }
    }
}

#[cfg(test)]
impl Job {
    /// A job of `kind` on `machines` in `state` without steps, created and
    /// started at `time_ms`: the fixture tests start from.
    pub(crate) fn test_of(
        id: &str,
        kind: &str,
        machines: &[&str],
        state: JobState,
        time_ms: u64,
    ) -> Job {
        Job {
            id: id.into(),
            kind: kind.into(),
            machines: machines.iter().map(|m| m.to_string()).collect(),
            plan: String::new(),
            spec: "{}".into(),
            data: "{}".into(),
            state,
            progress: 0,
            status: String::new(),
            error: String::new(),
            warnings: Vec::new(),
            created_ms: time_ms,
            started_ms: time_ms,
            ended_ms: 0,
            steps: Vec::new(),
        }
    }
}

/// The latest recovery-point summary an MT reported for a replication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PointSummary {
    pub applied_seq: u64,
    pub count: u32,
    pub oldest: Option<Point>,
    pub latest: Option<Point>,
    pub latest_app: Option<Point>,
    pub rolled_back_to: String,
    pub group_points: Vec<Point>,
    /// When the MT reported it.
    pub reported_ms: u64,
    /// The MT that reported it.
    pub mt: String,
}

/// A consistency group (DESIGN.md §8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub machines: Vec<String>,
    pub hold_ms: u32,
    pub interval_secs: u32,
    pub app: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlanGroup {
    pub machines: Vec<String>,
    pub pre_hook: String,
    pub post_hook: String,
}

/// A recovery plan: named, ordered groups of machines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Plan {
    pub name: String,
    pub groups: Vec<PlanGroup>,
    pub consistency_group: String,
}

impl Plan {
    /// Every machine of the plan, in plan order.
    pub fn machines(&self) -> Vec<String> {
        self.groups
            .iter()
            .flat_map(|g| g.machines.iter().cloned())
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "pending" => JobState::Pending,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            _ => return None,
        })
    }
    pub fn finished(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    Pending,
    Running,
    Done,
    Failed,
    Skipped,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Done => "done",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
        }
    }
    pub fn parse(s: &str) -> Option<StepState> {
        Some(match s {
            "pending" => StepState::Pending,
            "running" => StepState::Running,
            "done" => StepState::Done,
            "failed" => StepState::Failed,
            "skipped" => StepState::Skipped,
            _ => return None,
        })
    }
}

/// One step of a job. `action` is the serialized step (JSON) the job engine
/// hands back to the lifecycle code when it runs or resumes the step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStep {
    pub index: u32,
    pub name: String,
    pub action: String,
    pub state: StepState,
    pub detail: String,
    pub error: String,
    pub started_ms: u64,
    pub ended_ms: u64,
}

/// A job: one lifecycle transition (protect, failover, ...), persisted with
/// its steps so it survives a CS restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub kind: String,
    pub machines: Vec<String>,
    pub plan: String,
    /// The request (JSON), kept for resuming.
    pub spec: String,
    /// Values steps hand to later steps (JSON object).
    pub data: String,
    pub state: JobState,
    pub progress: u32,
    pub status: String,
    pub error: String,
    pub warnings: Vec<String>,
    pub created_ms: u64,
    pub started_ms: u64,
    pub ended_ms: u64,
    pub steps: Vec<JobStep>,
}

#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub active_only: bool,
    pub machine: Option<String>,
    pub limit: u32,
}

impl JobFilter {
    /// Every pending or running job.
    pub fn all_active() -> Self {
        JobFilter {
            active_only: true,
            machine: None,
            limit: 10_000,
        }
    }

    /// Up to `limit` pending or running jobs of `machine`.
    pub fn active_on(machine: &str, limit: u32) -> Self {
        JobFilter {
            active_only: true,
            machine: Some(machine.to_string()),
            limit,
        }
    }
}

/// Something a component reported (freeze failed, bitmap mode, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub time_ms: u64,
    pub component: String,
    pub severity: String,
    pub kind: String,
    pub message: String,
    pub replication: String,
}

/// The storage trait. See the module doc for why it is object safe.
pub trait Store: Send + Sync {
    /// Closes the connections (at stop); every write was durable already.
    fn close(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>;

    // ---- settings (small named blobs: the passphrase verifier and salt)
    fn get_setting<'a>(&'a self, key: &'a str) -> BoxFut<'a, Option<Vec<u8>>>;
    fn put_setting<'a>(&'a self, key: &'a str, value: &'a [u8]) -> BoxFut<'a, ()>;

    // ---- sites
    fn add_site<'a>(&'a self, name: &'a str) -> BoxFut<'a, ()>;
    fn list_sites(&self) -> BoxFut<'_, Vec<String>>;

    // ---- components
    /// Inserts or replaces the whole row.
    fn put_component<'a>(&'a self, c: &'a Component) -> BoxFut<'a, ()>;
    fn get_component<'a>(&'a self, role: Role, id: &'a str) -> BoxFut<'a, Option<Component>>;
    fn list_components(&self) -> BoxFut<'_, Vec<Component>>;
    fn set_heartbeat<'a>(&'a self, role: Role, id: &'a str, time_ms: u64) -> BoxFut<'a, ()>;
    fn set_health<'a>(&'a self, role: Role, id: &'a str, health: Health) -> BoxFut<'a, ()>;
    fn set_status<'a>(
        &'a self,
        role: Role,
        id: &'a str,
        status: &'a [u8],
        time_ms: u64,
    ) -> BoxFut<'a, ()>;
    /// Forgets a component; true when it existed.
    fn delete_component<'a>(&'a self, role: Role, id: &'a str) -> BoxFut<'a, bool>;

    // ---- machines and disks
    fn put_machine<'a>(&'a self, m: &'a Machine) -> BoxFut<'a, ()>;
    fn get_machine<'a>(&'a self, id: &'a str) -> BoxFut<'a, Option<Machine>>;
    fn list_machines(&self) -> BoxFut<'_, Vec<Machine>>;

    // ---- replications
    fn put_replication<'a>(&'a self, r: &'a Replication) -> BoxFut<'a, ()>;
    fn get_replication<'a>(&'a self, id: &'a str) -> BoxFut<'a, Option<Replication>>;
    /// The machine's newest replication (its lifecycle state), if any.
    fn current_replication<'a>(&'a self, machine: &'a str) -> BoxFut<'a, Option<Replication>>;
    /// All replications, or a machine's, oldest first.
    fn list_replications<'a>(&'a self, machine: Option<&'a str>) -> BoxFut<'a, Vec<Replication>>;
    /// The current (most recent) replication of every machine that has one.
    fn current_replications(&self) -> BoxFut<'_, Vec<Replication>>;

    // ---- consistency groups
    fn put_group<'a>(&'a self, g: &'a Group) -> BoxFut<'a, ()>;
    fn get_group<'a>(&'a self, name: &'a str) -> BoxFut<'a, Option<Group>>;
    fn list_groups(&self) -> BoxFut<'_, Vec<Group>>;
    /// True when it existed.
    fn delete_group<'a>(&'a self, name: &'a str) -> BoxFut<'a, bool>;

    // ---- recovery plans
    fn put_plan<'a>(&'a self, p: &'a Plan) -> BoxFut<'a, ()>;
    fn get_plan<'a>(&'a self, name: &'a str) -> BoxFut<'a, Option<Plan>>;
    fn list_plans(&self) -> BoxFut<'_, Vec<Plan>>;
    fn delete_plan<'a>(&'a self, name: &'a str) -> BoxFut<'a, bool>;

    // ---- jobs
    /// Inserts or replaces the job and all its steps, in one transaction.
    fn put_job<'a>(&'a self, j: &'a Job) -> BoxFut<'a, ()>;
    fn get_job<'a>(&'a self, id: &'a str) -> BoxFut<'a, Option<Job>>;
    /// Newest first.
    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFut<'a, Vec<Job>>;
    /// Like `list_jobs`, without reading the steps (`steps` is empty): for
    /// readers that run every second.
    fn list_job_heads<'a>(&'a self, filter: &'a JobFilter) -> BoxFut<'a, Vec<Job>>;

    // ---- recovery-point summaries (the latest one per replication)
    fn put_point_summary<'a>(&'a self, replication: &'a str, s: &'a PointSummary)
        -> BoxFut<'a, ()>;
    fn get_point_summary<'a>(&'a self, replication: &'a str) -> BoxFut<'a, Option<PointSummary>>;

    // ---- events (kept bounded)
    fn add_event<'a>(&'a self, e: &'a Event) -> BoxFut<'a, ()>;
    /// Newest first.
    fn recent_events(&self, limit: u32) -> BoxFut<'_, Vec<Event>>;

    // ---- issued certificates
    /// Records a certificate the CS issued. Writing a serial again never
    /// clears its revocation.
    fn put_issued_cert<'a>(&'a self, c: &'a IssuedCert) -> BoxFut<'a, ()>;
    /// Revokes every unrevoked, unexpired certificate of `role`:`id` at
    /// `now_ms`: the serials it newly revoked.
    fn revoke_certs<'a>(&'a self, role: Role, id: &'a str, now_ms: u64) -> BoxFut<'a, Vec<String>>;
    /// Serials of every revoked certificate that has not expired at
    /// `now_ms` (the revocation list the CS pushes).
    fn revoked_serials(&self, now_ms: u64) -> BoxFut<'_, Vec<String>>;
    /// The newest certificate issued to `role`:`id`.
    fn latest_cert<'a>(&'a self, role: Role, id: &'a str) -> BoxFut<'a, Option<IssuedCert>>;
    /// Every certificate of `role`:`id` that is neither revoked nor expired
    /// at `now_ms`, newest first.
    fn live_certs<'a>(
        &'a self,
        role: Role,
        id: &'a str,
        now_ms: u64,
    ) -> BoxFut<'a, Vec<IssuedCert>>;
    /// The certificate with this serial.
    fn get_issued_cert<'a>(&'a self, serial: &'a str) -> BoxFut<'a, Option<IssuedCert>>;

    // ---- enrollment tokens
    fn put_token<'a>(&'a self, t: &'a Token) -> BoxFut<'a, ()>;
    /// The token as stored, without using it.
    fn get_token<'a>(&'a self, token_id: &'a str) -> BoxFut<'a, Option<Token>>;
    /// Marks the token used at `now_ms` if it was not, atomically, and
    /// returns it as it was before: `used_ms` is `Some` when it had been
    /// used already (so this call did not get it). The caller checks the
    /// expiry, role and id.
    fn redeem_token<'a>(&'a self, token_id: &'a str, now_ms: u64) -> BoxFut<'a, Option<Token>>;
}
