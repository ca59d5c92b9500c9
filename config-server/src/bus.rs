//! The command bus: how CS code sends a command to a component and waits
//! for its answer (DESIGN.md §8 "Control channel").
//!
//! The CS never dials components; each one holds a control stream open
//! (`control.rs`). [`CommandBus::send`] gives the command an id, queues it
//! for the component (delivered at once when connected, otherwise when it
//! connects), and waits for the `CommandResult` with that id, up to a
//! timeout. A command sent on a connection that drops before the answer is
//! delivered again on the next connection, so **components must apply a
//! repeated command id idempotently** (answering it again is fine).
//!
//! The lifecycle code talks to the [`Bus`] trait, so its tests use a fake
//! bus that answers like agents, PSs and MTs would.

use rebound_common::pki::Role;
use rebound_proto::control::command::Cmd;
use rebound_proto::control::command_result::Detail;
use rebound_proto::control::{server_message, Command, CommandResult, ServerMessage};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

/// Who a command goes to: the certificate identity of a component.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ComponentKey {
    pub role: Role,
    pub id: String,
}

impl ComponentKey {
    pub fn agent(machine: &str) -> ComponentKey {
        ComponentKey {
            role: Role::Agent,
            id: machine.to_string(),
        }
    }
    pub fn ps(id: &str) -> ComponentKey {
        ComponentKey {
            role: Role::Ps,
            id: id.to_string(),
        }
    }
    pub fn mt(id: &str) -> ComponentKey {
        ComponentKey {
            role: Role::Mt,
            id: id.to_string(),
        }
    }
}

impl fmt::Display for ComponentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role, self.id)
    }
}

/// A successful answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    /// Non-fatal warning to show on the job.
    pub warning: String,
    pub detail: Option<Detail>,
}

#[derive(Debug, Clone, Error, PartialEq)]
pub enum BusError {
    #[error("{to} did not answer {what} within {} s ({})", .after.as_secs_f64(), if *.connected { "it is connected but busy or stuck: check its log" } else { "it is not connected to the CS: check that it runs and that its config points at this CS" })]
    Timeout {
        to: ComponentKey,
        what: &'static str,
        after: Duration,
        connected: bool,
    },
    #[error("{to} could not {what}: {message}")]
    Failed {
        to: ComponentKey,
        what: &'static str,
        message: String,
    },
}

/// The future [`Bus::send`] returns.
pub type SendFut<'a> = Pin<Box<dyn Future<Output = Result<Reply, BusError>> + Send + 'a>>;

/// What the lifecycle code needs from the bus.
pub trait Bus: Send + Sync {
    /// Sends `cmd` to `to` and waits for its answer, at most `timeout`
    /// (including the time until the component connects).
    fn send(&self, to: ComponentKey, cmd: Cmd, timeout: Duration) -> SendFut<'_>;
    /// The component's live connection, if it has one.
    fn connection(&self, to: &ComponentKey) -> Option<ConnInfo>;
}

/// A human name for a command, for logs and errors.
pub fn cmd_name(cmd: &Cmd) -> &'static str {
    match cmd {
        Cmd::Fence(_) => "fence",
        Cmd::Unfence(_) => "unfence",
        Cmd::Drain(_) => "drain",
        Cmd::Tag(_) => "tag",
        Cmd::GroupPrepare(_) => "group-prepare",
        Cmd::GroupCommit(_) => "group-commit",
        Cmd::GroupAbort(_) => "group-abort",
        Cmd::SetPolicy(_) => "set-policy",
        Cmd::Resync(_) => "resync",
        Cmd::StartReplication(_) => "start-replication",
        Cmd::StopReplication(_) => "stop-replication",
        Cmd::Rollback(_) => "rollback",
        Cmd::RestorePreImages(_) => "restore-pre-images",
        Cmd::HandOver(_) => "hand-over",
        Cmd::EndReplication(_) => "end-replication",
        Cmd::ListPoints(_) => "list-points",
        Cmd::PrepareReplication(_) => "prepare-replication",
        Cmd::SetRetention(_) => "set-retention",
        Cmd::AddReplication(_) => "add-replication",
        Cmd::RemoveReplication(_) => "remove-replication",
        Cmd::SetRevoked(_) => "set-revoked",
        Cmd::Verify(_) => "verify",
        Cmd::PowerOff(_) => "power-off",
        Cmd::StartTestFailover(_) => "start-test-failover",
        Cmd::EndTestFailover(_) => "end-test-failover",
        Cmd::SetReplicationPs(_) => "set-replication-ps",
    }
}

/// A live connection as the bus sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub conn_id: u64,
    pub instance: String,
    pub site: String,
    pub writable: bool,
    pub last_seen: Instant,
}

/// The message sink of one control stream.
pub type Downstream = mpsc::UnboundedSender<Result<ServerMessage, tonic::Status>>;

struct Conn {
    info: ConnInfo,
    tx: Downstream,
    /// Dropped when the connection is kicked; the stream's reader stops.
    _kill: oneshot::Sender<()>,
}

struct InFlight {
    to: ComponentKey,
    command: Command,
    /// The connection it was written to, `None` while queued.
    sent_on: Option<u64>,
    answer: oneshot::Sender<CommandResult>,
}

#[derive(Default)]
struct Inner {
    conns: HashMap<ComponentKey, Conn>,
    /// Unanswered commands by id, in send order per component.
    in_flight: HashMap<String, InFlight>,
    order: VecDeque<String>,
    next_conn: u64,
}

impl Inner {
    /// Writes every unsent command for `to` to its connection.
    fn flush(&mut self, to: &ComponentKey) {
        let Some(conn) = self.conns.get(to) else {
            return;
        };
        for id in &self.order {
            if let Some(f) = self.in_flight.get_mut(id) {
                if &f.to == to && f.sent_on != Some(conn.info.conn_id) {
                    let msg = ServerMessage {
                        msg: Some(server_message::Msg::Command(f.command.clone())),
                    };
                    if conn.tx.send(Ok(msg)).is_ok() {
                        f.sent_on = Some(conn.info.conn_id);
                    }
                }
            }
        }
    }
}

/// The real bus behind the control streams.
#[derive(Default)]
pub struct CommandBus {
    inner: Mutex<Inner>,
}

impl CommandBus {
    pub fn new() -> CommandBus {
        CommandBus::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain maps behind; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection for `key`, replacing any older one (which
    /// is returned so the caller can report it). Pending commands for `key`
    /// are delivered on the new connection. Returns the connection id and a
    /// receiver that fires when the connection is kicked or replaced.
    pub fn attach(
        &self,
        key: &ComponentKey,
        instance: &str,
        site: &str,
        writable: bool,
        tx: Downstream,
    ) -> (u64, oneshot::Receiver<()>, Option<ConnInfo>) {
        let (kill_tx, kill_rx) = oneshot::channel();
        let mut inner = self.lock();
        inner.next_conn += 1;
        let conn_id = inner.next_conn;
        let old = inner.conns.insert(
            key.clone(),
            Conn {
                info: ConnInfo {
                    conn_id,
                    instance: instance.to_string(),
                    site: site.to_string(),
                    writable,
                    last_seen: Instant::now(),
                },
                tx,
                _kill: kill_tx,
            },
        );
        inner.flush(key);
        (conn_id, kill_rx, old.map(|c| c.info))
    }

    /// Forgets connection `conn_id` of `key` (if it is still the current
    /// one); its unanswered commands wait for the next connection. True when
    /// it was the current connection.
    pub fn detach(&self, key: &ComponentKey, conn_id: u64) -> bool {
        let mut inner = self.lock();
        if inner.conns.get(key).map(|c| c.info.conn_id) != Some(conn_id) {
            return false;
        }
        inner.conns.remove(key);
        for f in inner.in_flight.values_mut() {
            if &f.to == key && f.sent_on == Some(conn_id) {
                f.sent_on = None;
            }
        }
        true
    }

    /// Records that `key` is alive (a heartbeat or any message).
    pub fn touch(&self, key: &ComponentKey, conn_id: u64) {
        let mut inner = self.lock();
        if let Some(c) = inner.conns.get_mut(key) {
            if c.info.conn_id == conn_id {
                c.info.last_seen = Instant::now();
            }
        }
    }

    /// Marks the connection writable or not (an agent's fence state).
    pub fn set_writable(&self, key: &ComponentKey, conn_id: u64, writable: bool) {
        let mut inner = self.lock();
        if let Some(c) = inner.conns.get_mut(key) {
            if c.info.conn_id == conn_id {
                c.info.writable = writable;
            }
        }
    }

    /// Connections silent for longer than `max_silence`.
    pub fn stale(&self, max_silence: Duration) -> Vec<(ComponentKey, u64)> {
        let inner = self.lock();
        inner
            .conns
            .iter()
            .filter(|(_, c)| c.info.last_seen.elapsed() > max_silence)
            .map(|(k, c)| (k.clone(), c.info.conn_id))
            .collect()
    }

    /// Drops connection `conn_id` of `key`: its stream ends.
    pub fn kick(&self, key: &ComponentKey, conn_id: u64) -> bool {
        self.detach(key, conn_id)
    }

    /// Writes a command to connection `conn_id` of `key` without waiting for
    /// an answer (fencing an agent that is being replaced). False when that
    /// connection is gone.
    pub fn send_on(&self, key: &ComponentKey, conn_id: u64, cmd: Cmd) -> bool {
        let inner = self.lock();
        match inner.conns.get(key) {
            Some(c) if c.info.conn_id == conn_id => {
                c.tx.send(Ok(ServerMessage {
                    msg: Some(server_message::Msg::Command(Command {
                        id: new_command_id(),
                        timeout_ms: 60_000,
                        cmd: Some(cmd),
                    })),
                }))
                .is_ok()
            }
            _ => false,
        }
    }

    /// Every live connection.
    pub fn connections(&self) -> Vec<(ComponentKey, ConnInfo)> {
        let inner = self.lock();
        inner
            .conns
            .iter()
            .map(|(k, c)| (k.clone(), c.info.clone()))
            .collect()
    }

    /// Hands a result to whoever waits for it. A result for an unknown id
    /// (already timed out) or from another component is ignored; returns
    /// whether it was delivered.
    pub fn complete(&self, from: &ComponentKey, result: CommandResult) -> bool {
        let mut inner = self.lock();
        match inner.in_flight.get(&result.id) {
            Some(f) if &f.to == from => {}
            _ => return false,
        }
        let id = result.id.clone();
        inner.order.retain(|x| x != &id);
        match inner.in_flight.remove(&id) {
            Some(f) => f.answer.send(result).is_ok(),
            None => false,
        }
    }

    /// Sends a command and waits for its result (see the module doc).
    pub async fn send_command(
        &self,
        to: ComponentKey,
        cmd: Cmd,
        timeout: Duration,
    ) -> Result<Reply, BusError> {
        let what = cmd_name(&cmd);
        let id = new_command_id();
        let (answer, wait) = oneshot::channel();
        {
            let mut inner = self.lock();
            inner.in_flight.insert(
                id.clone(),
                InFlight {
                    to: to.clone(),
                    command: Command {
                        id: id.clone(),
                        timeout_ms: timeout.as_millis().min(u32::MAX as u128) as u32,
                        cmd: Some(cmd),
                    },
                    sent_on: None,
                    answer,
                },
            );
            inner.order.push_back(id.clone());
            inner.flush(&to);
        }
        let outcome = tokio::time::timeout(timeout, wait).await;
        let mut inner = self.lock();
        inner.in_flight.remove(&id);
        inner.order.retain(|x| x != &id);
        let connected = inner.conns.contains_key(&to);
        drop(inner);
        match outcome {
            Ok(Ok(r)) if r.ok => Ok(Reply {
                warning: r.warning,
                detail: r.detail,
            }),
            Ok(Ok(r)) => Err(BusError::Failed {
                to,
                what,
                message: if r.error.is_empty() {
                    "it gave no reason".into()
                } else {
                    r.error
                },
            }),
            Ok(Err(_)) | Err(_) => Err(BusError::Timeout {
                to,
                what,
                after: timeout,
                connected,
            }),
        }
    }
}

impl Bus for CommandBus {
    fn send(&self, to: ComponentKey, cmd: Cmd, timeout: Duration) -> SendFut<'_> {
        Box::pin(self.send_command(to, cmd, timeout))
    }
    fn connection(&self, to: &ComponentKey) -> Option<ConnInfo> {
        self.lock().conns.get(to).map(|c| c.info.clone())
    }
}

/// A random command id (128 bits, hex).
pub fn new_command_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rebound_proto::control::{Drain, Drained};

    fn drain() -> Cmd {
        Cmd::Drain(Drain { timeout_ms: 1000 })
    }

    #[tokio::test]
    async fn queued_until_connect_then_answered() {
        let bus = std::sync::Arc::new(CommandBus::new());
        let key = ComponentKey::agent("m1");
        let b = bus.clone();
        let k = key.clone();
        let waiter =
            tokio::spawn(async move { b.send_command(k, drain(), Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (conn, _kill, old) = bus.attach(&key, "i1", "onprem", true, tx);
        assert!(old.is_none());
        let Some(Ok(ServerMessage {
            msg: Some(server_message::Msg::Command(c)),
        })) = rx.recv().await
        else {
            panic!("no command delivered");
        };
        assert!(matches!(c.cmd, Some(Cmd::Drain(_))));
        // A drop before answering: the command comes again on the next connection.
        assert!(bus.detach(&key, conn));
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        bus.attach(&key, "i2", "onprem", true, tx2);
        let Some(Ok(ServerMessage {
            msg: Some(server_message::Msg::Command(again)),
        })) = rx2.recv().await
        else {
            panic!("no command re-delivered");
        };
        assert_eq!(again.id, c.id);
        // Another component cannot answer it.
        assert!(!bus.complete(
            &ComponentKey::agent("m2"),
            CommandResult {
                id: c.id.clone(),
                ok: true,
                ..Default::default()
            }
        ));
        assert!(bus.complete(
            &key,
            CommandResult {
                id: c.id.clone(),
                ok: true,
                detail: Some(Detail::Drained(Drained {
                    durable_seq: 7,
                    shutdown_tag_seq: 7
                })),
                ..Default::default()
            }
        ));
        let reply = waiter.await.unwrap().unwrap();
        assert!(matches!(reply.detail, Some(Detail::Drained(d)) if d.durable_seq == 7));
    }

    #[tokio::test]
    async fn timeout_and_failure_say_who_and_what() {
        let bus = CommandBus::new();
        let e = bus
            .send_command(ComponentKey::mt("mt1"), drain(), Duration::from_millis(30))
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("mt:mt1") && msg.contains("drain") && msg.contains("not connected"),
            "{msg}"
        );
        assert!(
            bus.lock().in_flight.is_empty(),
            "a timed-out command is forgotten"
        );
    }
}
