//! The control channel (DESIGN.md §8): the `Control.Channel` stream every
//! agent, PS and MT holds open to the CS.
//!
//! On a new stream the CS checks that the hello matches the client
//! certificate (an agent registers only its own machine), applies the
//! **split-brain guard** for agents, records the component (site, version,
//! addresses, health) and hooks the stream to the [`CommandBus`]. Upwards it
//! takes heartbeats, status (stored; an MT's recovery-point summaries are
//! stored per replication), events and command results. The health monitor
//! makes a component offline after three missed heartbeats and drops its
//! stream.
//!
//! Revocation: a peer whose certificate is revoked (by serial, in the
//! store) or whose component is marked revoked is refused at channel open,
//! with what to do. Each PS and MT gets the revocation list (`SetRevoked`)
//! right after its welcome, so one that was offline during a revocation
//! enforces it before the CS asks anything else of it.
//!
//! Split-brain guard: a machine has at most one agent connected. A second
//! agent for the same machine is refused while the first one is alive, and
//! an agent at a site other than where the machine runs is refused unless
//! the machine moved there (its failover hand-over set the machine's site),
//! or the machine is unprotected. When the machine moved, the agent at the
//! new site replaces the one at the old site, which is fenced.

use crate::bus::{CommandBus, ComponentKey};
use crate::convert;
use crate::error::CsError;
use crate::fleet::components::{cert_expiry_ms, version_mismatch};
use crate::fleet::policy;
use crate::fleet::revoke::{self, PUSH_TIMEOUT};
use crate::lifecycle::source_copy;
use crate::store::{now_ms, Component, Event, Health, Machine, Policy, ReplState, Store};
use prost::Message;
use rebound_common::pki::{serial_hex, PeerIdentity, Role};
use rebound_common::tls::{require_role, Revocations};
use rebound_proto::control::command::Cmd;
use rebound_proto::control::control_server::Control;
use rebound_proto::control::{
    component_message, server_message, status, ComponentMessage, Fence, Hello, ServerMessage,
    Welcome,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

/// How long a new stream has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a policy re-sent on connect may take to be acknowledged.
const POLICY_TIMEOUT: Duration = Duration::from_secs(30);
/// Missed heartbeats before a component is offline.
pub const MISSED_HEARTBEATS: u32 = 3;

pub struct ControlService {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) bus: Arc<CommandBus>,
    heartbeat: Duration,
    /// The revocation list the CS's server enforces; refreshed from the
    /// store whenever a PS or MT is sent the list.
    pub(crate) revocations: Revocations,
    /// Signs renewed certificates (`renew.rs`); `None`: Renew is refused.
    pub(crate) signer: Option<Arc<crate::renew::Signer>>,
}

impl ControlService {
    pub fn new(store: Arc<dyn Store>, bus: Arc<CommandBus>, heartbeat: Duration) -> Self {
        ControlService {
            store,
            bus,
            heartbeat,
            revocations: Revocations::new(),
            signer: None,
        }
    }

    /// Shares the revocation list the CS's server enforces.
    pub fn with_revocations(mut self, r: Revocations) -> Self {
        self.revocations = r;
        self
    }

    /// Refuses a peer whose certificate (`serial`, from the TLS session)
    /// the CS revoked.
    async fn check_not_revoked(&self, peer: &PeerIdentity, serial: &str) -> Result<(), CsError> {
        let revoked_ms = match self.store.get_issued_cert(serial).await? {
            Some(c) => c.revoked_ms,
            None => None,
        };
        if revoked_ms.is_some() || self.revocations.is_revoked(serial) {
            return Err(CsError::PermissionDenied(format!(
                "certificate {serial} of {peer} is revoked: it may not connect to the CS, any PS \
                 or MT. To let {peer} back, create a token (`rebound token create --role {} --id \
                 {}`) and enroll it again",
                peer.role, peer.id
            )));
        }
        Ok(())
    }

    fn offline_after(&self) -> Duration {
        self.heartbeat * MISSED_HEARTBEATS
    }

    /// The split-brain guard and the machine record for an agent's hello.
    async fn admit_agent(&self, key: &ComponentKey, hello: &Hello) -> Result<(), CsError> {
        let m_id = &hello.id;
        let existing = self.store.get_machine(m_id).await?;
        let state = self
            .store
            .current_replication(m_id)
            .await?
            .map(|r| (r.state, r.from_site, r.to_site));
        let live = crate::bus::Bus::connection(self.bus.as_ref(), key);
        if hello.site.is_empty() {
            return Err(CsError::InvalidArgument(format!(
                "agent for {m_id} sent no site in its hello: set `site` in the agent config"
            )));
        }
        let mut machine = match existing {
            None => Machine {
                id: m_id.clone(),
                site: hello.site.clone(),
                disks: Vec::new(),
                policy: Policy::default(),
                group: String::new(),
                created_ms: now_ms(),
            },
            Some(m) => m,
        };
        if hello.site != machine.site
            && source_copy::removal_pending(self.store.as_ref(), m_id, &hello.site).await?
        {
            // Let it in only to remove its disks (`remove_on_hello`); the
            // machine's site, disks and the agent running it stay.
            info!(machine = %m_id, site = %hello.site,
                "agent at the old site registered: its source copy removal is pending");
            return Ok(());
        }
        if hello.site != machine.site {
            match &state {
                None | Some((ReplState::Unprotected, _, _)) => {
                    info!(machine = %m_id, from = %machine.site, to = %hello.site,
                        "unprotected machine's agent registered at another site");
                    machine.site = hello.site.clone();
                }
                Some((st, from, to)) if from == &hello.site && to == &machine.site => {
                    return Err(CsError::FailedPrecondition(format!(
                        "machine {m_id} has moved to site {} ({st}); the agent at site {} is fenced \
                         and may not register: stop it. Its disks stay for the reprotect back to {}",
                        machine.site, hello.site, hello.site
                    )));
                }
                Some((st, _, _)) => {
                    return Err(CsError::FailedPrecondition(format!(
                        "machine {m_id} runs at site {} ({st}); an agent at site {} may register \
                         only after a failover to {} (`rebound failover {m_id} --from {} --to {}`). \
                         Stop this agent, or check the `site` in its config",
                        machine.site, hello.site, hello.site, machine.site, hello.site
                    )));
                }
            }
        }
        if let Some(c) = live {
            if c.instance != hello.instance {
                let age = c.last_seen.elapsed();
                if c.site == hello.site && age < self.offline_after() {
                    return Err(CsError::FailedPrecondition(format!(
                        "machine {m_id} already has an agent connected (site {}, last heartbeat \
                         {} ms ago): a machine may have only one writable agent. Stop the other \
                         agent; if it is gone, retry in {} s when it has missed {MISSED_HEARTBEATS} \
                         heartbeats",
                        c.site,
                        age.as_millis(),
                        self.offline_after().as_secs_f64().ceil()
                    )));
                }
                if c.site != hello.site {
                    // The machine moved here: fence the agent at the old site.
                    warn!(machine = %m_id, old_site = %c.site, new_site = %hello.site,
                        "agent registered at the machine's new site; fencing the old one");
                    // Best effort: the old stream ends when the new one attaches.
                    self.bus.send_on(
                        key,
                        c.conn_id,
                        Cmd::Fence(Fence {
                            tag_id: String::new(),
                            run_shutdown_hook: false,
                        }),
                    );
                }
            }
        }
        if hello.disks.len() > rebound_common::limits::MAX_DISKS {
            return Err(CsError::InvalidArgument(format!(
                "the agent of machine {m_id} announces {} disks; at most {} are allowed: \
                 protect the machine with fewer disks",
                hello.disks.len(),
                rebound_common::limits::MAX_DISKS
            )));
        }
        if !hello.disks.is_empty() {
            machine.disks = hello.disks.iter().map(convert::disk_from_proto).collect();
        }
        self.store.put_machine(&machine).await?;
        Ok(())
    }

    /// Checks the hello against the certificate and records the component,
    /// with the expiry of the certificate it connected with (when known).
    async fn register(
        &self,
        peer: &PeerIdentity,
        hello: &Hello,
        cert_expiry: Option<u64>,
    ) -> Result<ComponentKey, CsError> {
        let role = Role::parse(&hello.role).ok_or_else(|| {
            CsError::InvalidArgument(format!("hello with unknown role {:?}", hello.role))
        })?;
        if role != peer.role || hello.id != peer.id {
            return Err(CsError::PermissionDenied(format!(
                "certificate {peer} may not register as {}:{}: a component registers only under \
                 its own certificate's identity (an agent only for its own machine)",
                hello.role, hello.id
            )));
        }
        let key = ComponentKey {
            role,
            id: hello.id.clone(),
        };
        let mut c = self
            .store
            .get_component(role, &hello.id)
            .await?
            .unwrap_or_else(|| Component::new(role, &hello.id));
        if c.revoked {
            return Err(CsError::PermissionDenied(format!(
                "{key} is revoked: to let it back, create a token (`rebound token create --role {role} \
                 --id {}`) and enroll it again",
                hello.id
            )));
        }
        if role == Role::Agent {
            self.admit_agent(&key, hello).await?;
        }
        if !hello.site.is_empty() {
            self.store.add_site(&hello.site).await?;
        }
        c.site = hello.site.clone();
        c.version = hello.version.clone();
        c.addresses = hello.addresses.clone();
        c.health = Health::Online;
        c.last_heartbeat_ms = now_ms();
        if let Some(ms) = cert_expiry {
            c.cert_expiry_ms = ms;
        }
        self.store.put_component(&c).await?;
        if let Some(message) = version_mismatch(&key, &hello.version) {
            warn!(component = %key, "{message}");
            self.store
                .add_event(&Event {
                    time_ms: now_ms(),
                    component: key.to_string(),
                    severity: "warning".into(),
                    kind: "version-mismatch".into(),
                    message,
                    replication: String::new(),
                })
                .await?;
        }
        Ok(key)
    }
}

/// Reads one component's upward messages until the stream ends or the
/// connection is kicked.
struct Reader {
    store: Arc<dyn Store>,
    bus: Arc<CommandBus>,
    key: ComponentKey,
    conn_id: u64,
}

impl Reader {
    async fn run(self, mut up: Streaming<ComponentMessage>, mut kill: oneshot::Receiver<()>) {
        loop {
            let msg = tokio::select! {
                m = up.message() => m,
                _ = &mut kill => {
                    debug!(component = %self.key, "control stream dropped by the CS");
                    return;
                }
            };
            match msg {
                Ok(Some(m)) => {
                    self.bus.touch(&self.key, self.conn_id);
                    if let Err(e) = self.handle(m).await {
                        warn!(component = %self.key, error = %e, "control message not recorded");
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(component = %self.key, error = %e, "control stream broke");
                    break;
                }
            }
        }
        if self.bus.detach(&self.key, self.conn_id) {
            info!(component = %self.key, "control stream closed; component offline");
            let _ = self
                .store
                .set_health(self.key.role, &self.key.id, Health::Offline)
                .await;
        }
    }

    async fn handle(&self, m: ComponentMessage) -> Result<(), CsError> {
        let (role, id) = (self.key.role, self.key.id.as_str());
        match m.msg {
            Some(component_message::Msg::Heartbeat(_)) => {
                self.store.set_heartbeat(role, id, now_ms()).await?;
            }
            Some(component_message::Msg::Status(s)) => {
                let now = now_ms();
                match &s.status {
                    Some(status::Status::Mt(mt)) => {
                        for r in &mt.replications {
                            let mut sum = convert::summary_from_proto(r.points.as_ref());
                            sum.reported_ms = now;
                            sum.mt = id.to_string();
                            self.store
                                .put_point_summary(&r.replication_id, &sum)
                                .await?;
                        }
                    }
                    Some(status::Status::Agent(a)) => {
                        self.bus.set_writable(&self.key, self.conn_id, !a.fenced);
                    }
                    _ => {}
                }
                self.store
                    .set_status(role, id, &s.encode_to_vec(), now)
                    .await?;
            }
            Some(component_message::Msg::Event(e)) => {
                match e.severity.as_str() {
                    "error" | "warning" => {
                        warn!(component = %self.key, kind = %e.kind, "{}", e.message)
                    }
                    _ => info!(component = %self.key, kind = %e.kind, "{}", e.message),
                }
                self.store
                    .add_event(&Event {
                        time_ms: if e.time_ms == 0 { now_ms() } else { e.time_ms },
                        component: self.key.to_string(),
                        severity: e.severity,
                        kind: e.kind,
                        message: e.message,
                        replication: e.replication_id,
                    })
                    .await?;
            }
            Some(component_message::Msg::Result(r)) => {
                let id = r.id.clone();
                let delivered = self.bus.complete(&self.key, r);
                if !delivered {
                    debug!(component = %self.key, %id, "result for a command nobody waits for");
                }
            }
            Some(component_message::Msg::Hello(_)) => {
                warn!(component = %self.key, "second hello on one control stream ignored");
            }
            None => {}
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    type ChannelStream = UnboundedReceiverStream<Result<ServerMessage, Status>>;

    async fn renew(
        &self,
        req: Request<rebound_proto::control::RenewRequest>,
    ) -> Result<Response<rebound_proto::control::RenewResponse>, Status> {
        crate::renew::renew(self, req).await
    }

    async fn channel(
        &self,
        req: Request<Streaming<ComponentMessage>>,
    ) -> Result<Response<Self::ChannelStream>, Status> {
        let peer = require_role(&req, &[Role::Agent, Role::Ps, Role::Mt])?;
        let leaf = req
            .peer_certs()
            .and_then(|certs| certs.first().map(|der| der.as_ref().to_vec()));
        let cert_expiry = leaf.as_deref().and_then(cert_expiry_ms);
        if let Some(serial) = leaf.as_deref().and_then(|der| serial_hex(der).ok()) {
            if let Err(e) = self.check_not_revoked(&peer, &serial).await {
                warn!(component = %peer, error = %e, "control channel refused");
                return Err(e.into());
            }
        }
        let mut up = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, up.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded("no hello within 10 s of opening the control stream")
            })??;
        let hello = match first {
            Some(ComponentMessage {
                msg: Some(component_message::Msg::Hello(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on the control stream must be a hello",
                ))
            }
        };
        let key = match self.register(&peer, &hello, cert_expiry).await {
            Ok(k) => k,
            Err(e) => {
                warn!(component = %peer, site = %hello.site, error = %e, "registration refused");
                return Err(e.into());
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let welcome = ServerMessage {
            msg: Some(server_message::Msg::Welcome(Welcome {
                heartbeat_ms: self.heartbeat.as_millis() as u32,
                cs_version: env!("CARGO_PKG_VERSION").into(),
            })),
        };
        let _ = tx.send(Ok(welcome));
        let (conn_id, kill, old) =
            self.bus
                .attach(&key, &hello.instance, &hello.site, hello.writable, tx);
        info!(component = %key, site = %hello.site, version = %hello.version,
            replaced = old.is_some(), "registered");
        if key.role == Role::Agent {
            let (store, bus, site) = (self.store.clone(), self.bus.clone(), hello.site.clone());
            let id = key.id.clone();
            tokio::spawn(async move {
                let _ = source_copy::remove_on_hello(
                    store.as_ref(),
                    bus.as_ref(),
                    &id,
                    &site,
                    POLICY_TIMEOUT,
                )
                .await;
            });
        }
        let (store, bus, resend_to) = (self.store.clone(), self.bus.clone(), key.clone());
        let own = self.revocations.clone();
        tokio::spawn(async move {
            revoke::push_on_hello(store.as_ref(), bus.as_ref(), &own, &resend_to, PUSH_TIMEOUT)
                .await;
            policy::resend_on_hello(store.as_ref(), bus.as_ref(), &resend_to, POLICY_TIMEOUT).await
        });
        let reader = Reader {
            store: self.store.clone(),
            bus: self.bus.clone(),
            key,
            conn_id,
        };
        tokio::spawn(reader.run(up, kill));
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

/// Marks components offline after three missed heartbeats and drops their
/// streams. Runs until `stop` turns true.
pub async fn health_monitor(
    store: Arc<dyn Store>,
    bus: Arc<CommandBus>,
    heartbeat: Duration,
    stop: watch::Receiver<bool>,
) {
    let limit = heartbeat * MISSED_HEARTBEATS;
    let every = (heartbeat / 2).max(Duration::from_millis(5));
    let mut ticker = crate::tick::Ticker::new(every, stop);
    while ticker.tick().await {
        for (key, conn_id) in bus.stale(limit) {
            if !bus.kick(&key, conn_id) {
                continue;
            }
            let msg = format!(
                "{key} missed {MISSED_HEARTBEATS} heartbeats ({} ms): offline",
                limit.as_millis()
            );
            warn!("{msg}");
            let _ = store.set_health(key.role, &key.id, Health::Offline).await;
            let _ = store
                .add_event(&Event {
                    time_ms: now_ms(),
                    component: key.to_string(),
                    severity: "warning".into(),
                    kind: "offline".into(),
                    message: msg,
                    replication: String::new(),
                })
                .await;
        }
    }
}
