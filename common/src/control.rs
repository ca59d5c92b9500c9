//! The component side of the control channel (DESIGN.md §8): the one
//! long-lived `Control.Channel` stream every agent, PS and MT holds open to
//! the configuration server (CS).
//!
//! [`spawn`] runs a task that connects with mutual TLS, sends the component's
//! [`Hello`](rebound_proto::control::Hello), reads the `Welcome` (which sets
//! the heartbeat period), then sends a heartbeat and the current status every
//! period, runs every command it receives concurrently through the
//! [`ControlHandler`] and answers with its `CommandResult`, and forwards the
//! events given to [`ControlHandle::event`]. Commands are deduplicated by
//! id: a repeated id is answered with the cached result (or, while the first
//! run is still going, by that run's result when it ends).
//!
//! Any error ends the stream; the task logs it at warn (once per kind of
//! failure and address, not on every retry) and reconnects: to the next
//! address of the CS at once (`[cs] addr`, then `standby`: a standby CS
//! does not listen until it takes over), with backoff from 200 ms to 5 s
//! only after every address failed in a row (`cs_addrs.rs`). A refusal at
//! hello time (the CS answered the stream with e.g. `PERMISSION_DENIED`
//! from the split-brain guard) is logged at error with the CS's message and
//! retried at the same address every 5 s.

use crate::pki::Role;
use crate::tls::{error_chain, TlsFiles};
use backon::ExponentialBuilder;
use rebound_proto::control::control_client::ControlClient;
use rebound_proto::control::{
    component_message, server_message, Command, CommandResult, ComponentMessage, Event, Heartbeat,
    Hello, ServerMessage, Status,
};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long an agent moving to another PS (`StartReplication.moving`) waits
/// for the MT to apply what the old PS still forwards before it resyncs
/// every disk instead. One constant for both sides: the configuration
/// server's move job waits at least this long before it gives up, and never
/// drops the old PS's cache while the agent may still be waiting.
pub const MOVE_WAIT: Duration = Duration::from_secs(300);

use crate::time::now_ms;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{debug, error, info, warn};

mod cs_addrs;
use cs_addrs::Rounds;
pub use cs_addrs::{in_turn, split_addrs, Tried};

/// `[cs]` section of agent/PS/MT configs. Empty `addr` = no configuration
/// server (standalone).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CsConfig {
    /// The CS, `host:port`.
    pub addr: String,
    /// The other CS processes of the deployment (an active and standby pair
    /// on PostgreSQL), `host:port` each: tried in turn when the one in use
    /// does not answer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub standby: Vec<String>,
    /// TLS server name of the CS; "" means the host of the address dialed.
    /// A name set here is checked at every address.
    pub server_name: String,
}

impl CsConfig {
    pub fn enabled(&self) -> bool {
        !self.addr.is_empty()
    }

    /// The name the certificate of the CS at `addr` (the first address) is
    /// checked against; [`CsConfig::server_name_at`] for any address.
    pub fn server_name(&self) -> &str {
        self.server_name_at(&self.addr)
    }
}

/// Who a PS or MT says it is in every hello.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The id in its certificate.
    pub id: String,
    pub site: String,
    /// Where the other components reach it.
    pub addresses: Vec<String>,
    /// From [`instance_id`]: tells a restart from a duplicate.
    pub instance: String,
}

impl Identity {
    /// The hello of a component of `role` with this identity.
    pub fn hello(&self, role: Role) -> Hello {
        Hello {
            role: role.as_str().into(),
            id: self.id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            site: self.site.clone(),
            addresses: self.addresses.clone(),
            instance: self.instance.clone(),
            ..Default::default()
        }
    }
}

/// Random per process start, so the CS tells a restart from a duplicate.
pub fn instance_id() -> String {
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.update(&now.to_le_bytes());
    h.update(format!("{:p}", &now).as_bytes());
    h.finalize().to_hex()[..16].to_string()
}

/// The last sampled status in `slot`, wrapped as the heartbeat carries it
/// (`wrap` is the component's `status::Status` variant).
pub fn sampled_status<T: Clone>(
    slot: &Mutex<Option<T>>,
    wrap: fn(T) -> rebound_proto::control::status::Status,
) -> Option<Status> {
    let st = slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()?;
    Some(Status {
        status: Some(wrap(st)),
    })
}

/// What a component does on its control channel.
pub trait ControlHandler: Send + Sync + 'static {
    /// Sent on every (re)connect.
    fn hello(&self) -> Hello;
    /// Sent with each heartbeat.
    fn status(&self) -> Option<Status>;
    /// Runs one command. Called at most once per command id by this client
    /// (repeats get the cached result), but should be idempotent anyway.
    fn handle(&self, cmd: Command) -> Pin<Box<dyn Future<Output = CommandResult> + Send>>;
}

/// Talks to the control task.
#[derive(Clone)]
pub struct ControlHandle {
    events: Option<mpsc::Sender<Event>>,
    connected: Arc<AtomicBool>,
}

impl ControlHandle {
    /// A handle with no CS behind it: events are dropped.
    pub fn disabled() -> ControlHandle {
        ControlHandle {
            events: None,
            connected: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Queues an event for the CS (sent when connected; dropped when the
    /// queue of [`EVENT_QUEUE`] events is full). `time_ms` 0 = now.
    pub fn event(&self, mut ev: Event) {
        if ev.time_ms == 0 {
            ev.time_ms = now_ms();
        }
        if let Some(tx) = &self.events {
            if tx.try_send(ev).is_err() {
                debug!("control event dropped: queue full or control task ended");
            }
        }
    }

    /// The stream is up and the CS welcomed us.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// Events kept while the CS is unreachable.
pub const EVENT_QUEUE: usize = 1024;
/// Command results remembered for deduplication.
const RESULT_CACHE: usize = 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Reconnect delays: doubling from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], no
/// jitter, never giving up; started again after every welcome.
const BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(BACKOFF_MIN)
    .with_max_delay(BACKOFF_MAX)
    .with_factor(2.0)
    .without_max_times();
/// Retry period after the CS refused the hello.
const REFUSED_RETRY: Duration = Duration::from_secs(5);
/// How long the CS has to answer the hello with a welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);

/// Starts the control task (nothing when `cs.addr` is empty). It runs until
/// `shutdown` turns true.
pub fn spawn(
    cs: CsConfig,
    tls: TlsFiles,
    handler: Arc<dyn ControlHandler>,
    shutdown: watch::Receiver<bool>,
) -> ControlHandle {
    if !cs.enabled() {
        return ControlHandle::disabled();
    }
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
    let connected = Arc::new(AtomicBool::new(false));
    let task = Task {
        cs,
        tls,
        handler,
        connected: connected.clone(),
        results: Arc::new(Mutex::new(Results::default())),
    };
    tokio::spawn(task.run(ev_rx, shutdown));
    ControlHandle {
        events: Some(ev_tx),
        connected,
    }
}

enum Entry {
    Running,
    Done(Box<CommandResult>),
}

#[derive(Default)]
struct Results {
    map: HashMap<String, Entry>,
    order: VecDeque<String>,
}

impl Results {
    fn finish(&mut self, r: &CommandResult) {
        if let Some(e) = self.map.get_mut(&r.id) {
            *e = Entry::Done(Box::new(r.clone()));
        }
        while self.order.len() > RESULT_CACHE {
            if let Some(old) = self.order.pop_front() {
                if matches!(self.map.get(&old), Some(Entry::Done(_))) {
                    self.map.remove(&old);
                } else {
                    // Still running: keep it, look again later.
                    self.order.push_back(old);
                    break;
                }
            }
        }
    }
}

struct Task {
    cs: CsConfig,
    tls: TlsFiles,
    handler: Arc<dyn ControlHandler>,
    connected: Arc<AtomicBool>,
    results: Arc<Mutex<Results>>,
}

/// Why a session ended.
enum End {
    Shutdown,
    /// The CS refused the hello (its message).
    Refused(String),
    Error(String),
}

impl Task {
    async fn run(self, mut events: mpsc::Receiver<Event>, mut shutdown: watch::Receiver<bool>) {
        let (res_tx, mut res_rx) = mpsc::unbounded_channel::<CommandResult>();
        let addrs: Vec<String> = self.cs.addrs().into_iter().map(String::from).collect();
        let mut rounds = Rounds::new(addrs.len());
        // The last failure logged at warn, per address.
        let mut last_logged = vec![String::new(); addrs.len()];
        loop {
            if *shutdown.borrow() {
                return;
            }
            let at = rounds.current();
            let addr = &addrs[at];
            let end = self
                .session(
                    addr,
                    &mut events,
                    &mut shutdown,
                    &res_tx,
                    &mut res_rx,
                    &mut rounds,
                )
                .await;
            self.connected.store(false, Ordering::Relaxed);
            let wait = match end {
                End::Shutdown => return,
                End::Refused(msg) => {
                    error!(cs = %addr, "the configuration server refused this component: {msg}; retrying every {} s", REFUSED_RETRY.as_secs());
                    last_logged[at].clear();
                    rounds.refused();
                    REFUSED_RETRY
                }
                End::Error(msg) => {
                    let wait = rounds.failed();
                    let next = &addrs[rounds.current()];
                    let then = if wait.is_zero() {
                        format!("trying {next}")
                    } else {
                        format!("trying {next} in {} ms", wait.as_millis())
                    };
                    if msg != last_logged[at] {
                        warn!(cs = %addr, "control channel: {msg}; {then}");
                        last_logged[at] = msg;
                    } else {
                        debug!(cs = %addr, "control channel: {msg}; {then}");
                    }
                    wait
                }
            };
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// One connection to the CS at `addr`, from connect to the end of the
    /// stream.
    async fn session(
        &self,
        addr: &str,
        events: &mut mpsc::Receiver<Event>,
        shutdown: &mut watch::Receiver<bool>,
        res_tx: &mpsc::UnboundedSender<CommandResult>,
        res_rx: &mut mpsc::UnboundedReceiver<CommandResult>,
        rounds: &mut Rounds,
    ) -> End {
        let channel = tokio::select! {
            c = self.tls.connect(addr, self.cs.server_name_at(addr), Role::Cs) => match c {
                Ok(c) => c,
                Err(e) => return End::Error(e.to_string()),
            },
            _ = shutdown.wait_for(|s| *s) => return End::Shutdown,
        };
        let mut client = ControlClient::new(channel);
        let (up, up_rx) = mpsc::unbounded_channel::<ComponentMessage>();
        let send =
            |msg: component_message::Msg| up.send(ComponentMessage { msg: Some(msg) }).is_ok();
        send(component_message::Msg::Hello(self.handler.hello()));
        let call = client.channel(UnboundedReceiverStream::new(up_rx));
        let resp = tokio::select! {
            r = tokio::time::timeout(WELCOME_TIMEOUT, call) => r,
            _ = shutdown.wait_for(|s| *s) => return End::Shutdown,
        };
        let mut down = match resp {
            Err(_) => return End::Error("no answer to the hello".into()),
            Ok(Err(s)) => return classify(s),
            Ok(Ok(r)) => r.into_inner(),
        };
        let first = tokio::select! {
            m = tokio::time::timeout(WELCOME_TIMEOUT, down.message()) => m,
            _ = shutdown.wait_for(|s| *s) => return End::Shutdown,
        };
        let heartbeat = match first {
            Err(_) => return End::Error("no welcome from the configuration server".into()),
            Ok(Err(s)) => return classify(s),
            Ok(Ok(None)) => return End::Error("stream closed before the welcome".into()),
            Ok(Ok(Some(ServerMessage {
                msg: Some(server_message::Msg::Welcome(w)),
            }))) => Duration::from_millis(u64::from(w.heartbeat_ms.max(10))),
            Ok(Ok(Some(_))) => return End::Error("the first message was not a welcome".into()),
        };
        self.connected.store(true, Ordering::Relaxed);
        rounds.connected();
        info!(cs = %addr, heartbeat_ms = heartbeat.as_millis() as u64, "connected to the configuration server");
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return End::Shutdown,
                _ = tick.tick() => {
                    let mut ok = send(component_message::Msg::Heartbeat(Heartbeat { time_ms: now_ms() }));
                    if let Some(s) = self.handler.status() {
                        ok &= send(component_message::Msg::Status(s));
                    }
                    if !ok {
                        return End::Error("control stream closed".into());
                    }
                }
                m = down.message() => match m {
                    Ok(Some(ServerMessage { msg: Some(server_message::Msg::Command(cmd)) })) => {
                        if let Some(cached) = self.dispatch(cmd, res_tx) {
                            send(component_message::Msg::Result(cached));
                        }
                    }
                    Ok(Some(_)) => debug!("unexpected message on the control stream ignored"),
                    Ok(None) => return End::Error("the configuration server closed the control stream".into()),
                    Err(s) => return End::Error(format!("control stream broke: {}", s.message())),
                },
                Some(r) = res_rx.recv() => {
                    if let Ok(mut c) = self.results.lock() {
                        c.finish(&r);
                    }
                    if !send(component_message::Msg::Result(r)) {
                        return End::Error("control stream closed".into());
                    }
                }
                Some(ev) = events.recv() => {
                    if !send(component_message::Msg::Event(ev)) {
                        return End::Error("control stream closed".into());
                    }
                }
            }
        }
    }

    /// Starts a command, or answers a repeat: `Some` = the cached result to
    /// send now.
    fn dispatch(
        &self,
        cmd: Command,
        res_tx: &mpsc::UnboundedSender<CommandResult>,
    ) -> Option<CommandResult> {
        let id = cmd.id.clone();
        {
            let mut c = self.results.lock().ok()?;
            match c.map.get(&id) {
                Some(Entry::Done(r)) => return Some((**r).clone()),
                Some(Entry::Running) => {
                    debug!(%id, "repeated command still running; its result follows");
                    return None;
                }
                None => {
                    c.map.insert(id.clone(), Entry::Running);
                    c.order.push_back(id.clone());
                }
            }
        }
        let timeout = cmd.timeout_ms;
        let fut = self.handler.handle(cmd);
        let tx = res_tx.clone();
        tokio::spawn(async move {
            let mut r = if timeout > 0 {
                match tokio::time::timeout(Duration::from_millis(u64::from(timeout)), fut).await {
                    Ok(r) => r,
                    Err(_) => CommandResult {
                        ok: false,
                        error: format!("command timed out after {timeout} ms"),
                        ..Default::default()
                    },
                }
            } else {
                fut.await
            };
            r.id = id;
            let _ = tx.send(r);
        });
        None
    }
}

fn classify(s: tonic::Status) -> End {
    use tonic::Code;
    match s.code() {
        Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::InvalidArgument
        | Code::Unauthenticated
        | Code::AlreadyExists => End::Refused(format!("{:?}: {}", s.code(), s.message())),
        _ => End::Error(format!(
            "{}{}",
            s.message(),
            std::error::Error::source(&s)
                .map(|e| format!(": {}", error_chain(e)))
                .unwrap_or_default()
        )),
    }
}

/// A successful result with no detail.
pub fn ok_result() -> CommandResult {
    CommandResult {
        ok: true,
        ..Default::default()
    }
}

/// A failed result carrying `error`.
pub fn err_result(error: impl Into<String>) -> CommandResult {
    CommandResult {
        ok: false,
        error: error.into(),
        ..Default::default()
    }
}

/// `SetRevoked` at a PS or MT: replaces the revocation list `list`, which
/// cuts the open connections of every newly revoked certificate at once,
/// and saves it to `path` before answering ok, so a restart before the CS
/// reaches the daemon again still refuses them (blocking).
pub fn set_revoked(
    list: &crate::tls::Revocations,
    path: &std::path::Path,
    c: &rebound_proto::control::SetRevoked,
) -> CommandResult {
    let cut = list.set(c.serials.iter().cloned());
    let n = c.serials.len();
    match list.save(path) {
        Ok(()) => {
            info!(revoked = n, connections_cut = cut, path = %path.display(), "revocation list set");
            ok_result()
        }
        Err(e) => err_result(format!(
            "the revocation list ({n} serials) is enforced, but it cannot be saved to {}: {e}; a restart would forget it until the CS sends it again: check that directory's owner and free space",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests;
