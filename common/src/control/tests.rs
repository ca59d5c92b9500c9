//! The control client against a tiny in-process Control server over real
//! mutual TLS.

use super::*;
use crate::pki::{write_cert, Ca, Role};
use rebound_proto::control::command::Cmd;
use rebound_proto::control::control_server::{Control, ControlServer};
use rebound_proto::control::{AgentStatus, Tag, TagCut, Welcome};
use std::sync::atomic::AtomicU32;
use tonic::{Request, Response, Streaming};

/// What the fake CS saw.
#[derive(Debug)]
enum Seen {
    Hello(Hello),
    Heartbeat,
    Status,
    Event(Event),
    Result(CommandResult),
}

struct FakeCs {
    seen: mpsc::UnboundedSender<Seen>,
    /// Refuse hellos while true.
    refuse: Arc<AtomicBool>,
    /// Commands to send after the welcome on each stream.
    commands: Vec<Command>,
    /// Close the first stream after this many results (0 = never).
    close_after: usize,
    streams: Arc<AtomicU32>,
    /// Ends every stream when it turns true (a CS that stops).
    stop: watch::Receiver<bool>,
}

impl FakeCs {
    /// A CS that welcomes every hello, reports to `seen` and ends its
    /// streams when `stop` turns true.
    fn plain(seen: mpsc::UnboundedSender<Seen>, stop: watch::Receiver<bool>) -> FakeCs {
        FakeCs {
            seen,
            refuse: Arc::new(AtomicBool::new(false)),
            commands: Vec::new(),
            close_after: 0,
            streams: Arc::new(AtomicU32::new(0)),
            stop,
        }
    }
}

/// Resolves when `stop` turns true; never when its sender is gone.
async fn stopped(mut stop: watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[tonic::async_trait]
impl Control for FakeCs {
    type ChannelStream = UnboundedReceiverStream<Result<ServerMessage, tonic::Status>>;

    async fn renew(
        &self,
        _req: Request<rebound_proto::control::RenewRequest>,
    ) -> Result<Response<rebound_proto::control::RenewResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("this test CS does not renew"))
    }

    async fn channel(
        &self,
        req: Request<Streaming<ComponentMessage>>,
    ) -> Result<Response<Self::ChannelStream>, tonic::Status> {
        let who = crate::tls::require_role(&req, &[Role::Agent])?;
        let mut up = req.into_inner();
        let hello = match up.message().await? {
            Some(ComponentMessage {
                msg: Some(component_message::Msg::Hello(h)),
            }) => h,
            _ => return Err(tonic::Status::invalid_argument("hello first")),
        };
        assert_eq!(hello.id, who.id);
        let _ = self.seen.send(Seen::Hello(hello));
        if self.refuse.load(Ordering::SeqCst) {
            return Err(tonic::Status::permission_denied("second writable agent"));
        }
        let n = self.streams.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(Ok(ServerMessage {
            msg: Some(server_message::Msg::Welcome(Welcome {
                heartbeat_ms: 50,
                cs_version: "test".into(),
            })),
        }));
        for c in &self.commands {
            let _ = tx.send(Ok(ServerMessage {
                msg: Some(server_message::Msg::Command(c.clone())),
            }));
        }
        let seen = self.seen.clone();
        let close_after = if n == 0 { self.close_after } else { 0 };
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let mut results = 0;
            let stop = stopped(stop);
            tokio::pin!(stop);
            loop {
                let m = tokio::select! {
                    m = up.message() => m,
                    _ = &mut stop => break,
                };
                let Ok(Some(m)) = m else { break };
                let s = match m.msg {
                    Some(component_message::Msg::Heartbeat(_)) => Seen::Heartbeat,
                    Some(component_message::Msg::Status(_)) => Seen::Status,
                    Some(component_message::Msg::Event(e)) => Seen::Event(e),
                    Some(component_message::Msg::Result(r)) => {
                        results += 1;
                        Seen::Result(r)
                    }
                    _ => continue,
                };
                let _ = seen.send(s);
                if close_after > 0 && results >= close_after {
                    drop(tx);
                    return;
                }
            }
            drop(tx);
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

struct Pki {
    _dir: tempfile::TempDir,
    server: TlsFiles,
    agent: TlsFiles,
}

fn pki() -> Pki {
    crate::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("test").unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    let cs = ca
        .issue(Role::Cs, "cs", &["127.0.0.1".to_string()])
        .unwrap();
    write_cert(dir.path(), "cs", &cs).unwrap();
    let agent = ca.issue(Role::Agent, "m1", &[]).unwrap();
    write_cert(dir.path(), "agent", &agent).unwrap();
    Pki {
        server: TlsFiles::in_dir(dir.path(), "cs"),
        agent: TlsFiles::in_dir(dir.path(), "agent"),
        _dir: dir,
    }
}

async fn serve(tls: &TlsFiles, cs: FakeCs) -> String {
    let routes = tonic::service::Routes::new(ControlServer::new(cs));
    crate::tls::tests::serve_routes(tls, &crate::tls::Revocations::new(), routes).await
}

/// Serves `cs` at `addr`; aborting the task closes the listener, so new
/// connections are refused as at a CS that stopped.
async fn serve_at(tls: &TlsFiles, addr: &str, cs: FakeCs) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let incoming = tls
        .acceptor(
            crate::tls::ClientAuth::Required,
            &crate::tls::Revocations::new(),
        )
        .unwrap()
        .incoming(listener);
    let server = tonic::transport::Server::builder()
        .add_service(ControlServer::new(cs))
        .serve_with_incoming(incoming);
    tokio::spawn(async move {
        let _ = server.await;
    })
}

/// A loopback address nothing listens on (bound, then closed).
async fn refusing_addr() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().to_string()
}

struct Handler {
    calls: AtomicU32,
}

impl ControlHandler for Handler {
    fn hello(&self) -> Hello {
        Hello {
            role: "agent".into(),
            id: "m1".into(),
            site: "a".into(),
            writable: true,
            ..Default::default()
        }
    }
    fn status(&self) -> Option<Status> {
        Some(Status {
            status: Some(rebound_proto::control::status::Status::Agent(AgentStatus {
                mode: "data".into(),
                ..Default::default()
            })),
        })
    }
    fn handle(&self, cmd: Command) -> Pin<Box<dyn Future<Output = CommandResult> + Send>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            match cmd.cmd {
                Some(Cmd::Tag(t)) => {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    CommandResult {
                        ok: true,
                        detail: Some(rebound_proto::control::command_result::Detail::TagCut(
                            TagCut {
                                id: t.id,
                                seq: u64::from(n),
                                kind: t.kind,
                                warning: String::new(),
                            },
                        )),
                        ..Default::default()
                    }
                }
                Some(Cmd::Unfence(_)) => {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    ok_result()
                }
                _ => err_result("unsupported"),
            }
        })
    }
}

fn tag_cmd(id: &str) -> Command {
    Command {
        id: id.into(),
        timeout_ms: 0,
        cmd: Some(Cmd::Tag(Tag {
            id: format!("tag-{id}"),
            kind: "crash".into(),
            group: String::new(),
        })),
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("fake CS saw nothing in 20 s")
        .expect("fake CS gone")
}

#[tokio::test]
async fn hello_heartbeat_status_commands_dedup_events_and_reconnect() {
    let pki = pki();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let mut timed_out = tag_cmd("c3");
    timed_out.cmd = Some(Cmd::Unfence(Default::default()));
    timed_out.timeout_ms = 100;
    let cs = FakeCs {
        seen: seen_tx,
        refuse: Arc::new(AtomicBool::new(false)),
        // c1 twice (the repeat arrives while the first still runs: one run,
        // one answer), c2 once, c3 times out.
        commands: vec![tag_cmd("c1"), tag_cmd("c1"), tag_cmd("c2"), timed_out],
        close_after: 3,
        streams: Arc::new(AtomicU32::new(0)),
        stop: watch::channel(false).1,
    };
    let streams = cs.streams.clone();
    let addr = serve(&pki.server, cs).await;
    let handler = Arc::new(Handler {
        calls: AtomicU32::new(0),
    });
    let (stop_tx, stop) = watch::channel(false);
    let handle = spawn(
        CsConfig {
            addr,
            standby: Vec::new(),
            server_name: String::new(),
        },
        pki.agent.clone(),
        handler.clone(),
        stop,
    );
    match next(&mut seen).await {
        Seen::Hello(h) => assert_eq!((h.role.as_str(), h.site.as_str()), ("agent", "a")),
        other => panic!("expected hello, got {other:?}"),
    }
    handle.event(Event {
        severity: "warning".into(),
        kind: "freeze-failed".into(),
        message: "freeze exited 1".into(),
        ..Default::default()
    });
    let (mut results, mut hb, mut status, mut events) = (Vec::new(), 0, 0, Vec::new());
    while results.len() < 3 || hb < 2 || status < 2 || events.is_empty() {
        match next(&mut seen).await {
            Seen::Result(r) => results.push(r),
            Seen::Heartbeat => hb += 1,
            Seen::Status => status += 1,
            Seen::Event(e) => events.push(e),
            Seen::Hello(_) => break,
        }
    }
    assert!(handle.connected() || streams.load(Ordering::SeqCst) >= 1);
    assert_eq!(events[0].kind, "freeze-failed");
    assert!(events[0].time_ms > 0);
    let c1: Vec<_> = results.iter().filter(|r| r.id == "c1").collect();
    assert_eq!(c1.len(), 1, "{results:?}");
    assert!(c1[0].ok);
    let c1_first = c1[0].clone();
    assert!(results.iter().any(|r| r.id == "c2" && r.ok));
    let c3 = results.iter().find(|r| r.id == "c3").unwrap();
    assert!(!c3.ok && c3.error.contains("timed out"), "{c3:?}");

    // The fake CS closed the first stream after 3 results: the client comes
    // back with a new hello, and the commands re-sent on the new stream are
    // answered from the cache (nothing runs again).
    loop {
        if let Seen::Hello(_) = next(&mut seen).await {
            break;
        }
    }
    let mut again = Vec::new();
    while again.len() < 4 {
        if let Seen::Result(r) = next(&mut seen).await {
            again.push(r);
        }
    }
    for id in ["c1", "c2"] {
        assert!(again.iter().any(|r| r.id == id && r.ok), "{again:?}");
    }
    assert!(again
        .iter()
        .filter(|r| r.id == "c1")
        .all(|r| *r == c1_first));
    assert!(again.iter().any(|r| r.id == "c3" && !r.ok));
    // c1, c2 and c3 ran exactly once each.
    assert_eq!(handler.calls.load(Ordering::SeqCst), 3);
    assert!(streams.load(Ordering::SeqCst) >= 2);
    let _ = stop_tx.send(true);
}

#[tokio::test]
async fn refused_hello_is_retried_slowly_and_not_connected() {
    let pki = pki();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let refuse = Arc::new(AtomicBool::new(true));
    let cs = FakeCs {
        seen: seen_tx,
        refuse: refuse.clone(),
        commands: Vec::new(),
        close_after: 0,
        streams: Arc::new(AtomicU32::new(0)),
        stop: watch::channel(false).1,
    };
    let addr = serve(&pki.server, cs).await;
    let (stop_tx, stop) = watch::channel(false);
    let handle = spawn(
        CsConfig {
            addr,
            standby: Vec::new(),
            server_name: "127.0.0.1".into(),
        },
        pki.agent.clone(),
        Arc::new(Handler {
            calls: AtomicU32::new(0),
        }),
        stop,
    );
    assert!(matches!(next(&mut seen).await, Seen::Hello(_)));
    // A refusal waits 5 s, not the 200 ms error backoff.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!handle.connected());
    let mut hellos = 0;
    while let Ok(s) = seen.try_recv() {
        if matches!(s, Seen::Hello(_)) {
            hellos += 1;
        }
    }
    assert_eq!(hellos, 0, "a refused hello must not be retried at once");
    // Once the CS accepts, the next retry connects.
    refuse.store(false, Ordering::SeqCst);
    assert!(matches!(next(&mut seen).await, Seen::Hello(_)));
    let t0 = std::time::Instant::now();
    while !handle.connected() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
}

#[tokio::test]
async fn no_cs_configured_is_standalone() {
    let (_tx, stop) = watch::channel(false);
    let h = spawn(
        CsConfig::default(),
        TlsFiles::default(),
        Arc::new(Handler {
            calls: AtomicU32::new(0),
        }),
        stop,
    );
    assert!(!h.connected());
    h.event(Event::default());
}

#[test]
fn cs_config_parses_and_rejects_unknown_keys() {
    let c: CsConfig = toml::from_str("addr = \"cs:7000\"").unwrap();
    // No server name: the CS is checked by the host dialled.
    assert_eq!(c.server_name(), "cs");
    assert!(c.enabled());
    assert!(toml::from_str::<CsConfig>("adr = \"x\"").is_err());
}

fn handler() -> Arc<Handler> {
    Arc::new(Handler {
        calls: AtomicU32::new(0),
    })
}

/// Waits until the control task says it is connected.
async fn until_connected(handle: &ControlHandle, within: Duration) {
    let t0 = std::time::Instant::now();
    while !handle.connected() {
        assert!(t0.elapsed() < within, "not connected within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_refusing_first_address_moves_on_to_the_next_at_once() {
    let pki = pki();
    let refusing = refusing_addr().await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let serving = serve(&pki.server, FakeCs::plain(seen_tx, watch::channel(false).1)).await;
    let (stop_tx, stop) = watch::channel(false);
    let t0 = std::time::Instant::now();
    let handle = spawn(
        CsConfig::from_list(&format!("{refusing},{serving}")),
        pki.agent.clone(),
        handler(),
        stop,
    );
    assert!(matches!(next(&mut seen).await, Seen::Hello(_)));
    until_connected(&handle, Duration::from_secs(10)).await;
    // No backoff between the two addresses of one round.
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let _ = stop_tx.send(true);
}

#[tokio::test]
async fn a_component_follows_the_cs_to_the_standby_and_back() {
    let pki = pki();
    // CS 2 is a standby: it does not listen until CS 1 stops.
    let (addr1, addr2) = (refusing_addr().await, refusing_addr().await);
    let (seen1_tx, mut seen1) = mpsc::unbounded_channel();
    let (stop1_tx, stop1) = watch::channel(false);
    let cs1 = serve_at(&pki.server, &addr1, FakeCs::plain(seen1_tx, stop1)).await;
    let (stop_tx, stop) = watch::channel(false);
    let cs = CsConfig {
        addr: addr1.clone(),
        standby: vec![addr2.clone()],
        server_name: String::new(),
    };
    assert_eq!(cs.addrs(), [addr1.as_str(), addr2.as_str()]);
    let handle = spawn(cs, pki.agent.clone(), handler(), stop);
    assert!(matches!(next(&mut seen1).await, Seen::Hello(_)));
    until_connected(&handle, Duration::from_secs(10)).await;
    // Some rounds of refusals at CS 2 while CS 1 serves change nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(handle.connected());

    // CS 1 stops; CS 2 takes over a moment later.
    cs1.abort();
    let _ = stop1_tx.send(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (seen2_tx, mut seen2) = mpsc::unbounded_channel();
    let (stop2_tx, stop2) = watch::channel(false);
    let cs2 = serve_at(&pki.server, &addr2, FakeCs::plain(seen2_tx, stop2)).await;
    assert!(matches!(next(&mut seen2).await, Seen::Hello(_)));
    until_connected(&handle, Duration::from_secs(10)).await;
    // It stays on CS 2: heartbeats keep coming there.
    let mut beats = 0;
    while beats < 3 {
        if let Seen::Heartbeat = next(&mut seen2).await {
            beats += 1;
        }
    }

    // And back to CS 1 (restarted) when CS 2 stops in turn.
    cs2.abort();
    let _ = stop2_tx.send(true);
    let (seen1_tx, mut seen1) = mpsc::unbounded_channel();
    let _cs1 = serve_at(
        &pki.server,
        &addr1,
        FakeCs::plain(seen1_tx, watch::channel(false).1),
    )
    .await;
    assert!(matches!(next(&mut seen1).await, Seen::Hello(_)));
    until_connected(&handle, Duration::from_secs(10)).await;
    let _ = stop_tx.send(true);
}

#[test]
fn cs_addresses_come_in_order_each_once() {
    let c: CsConfig =
        toml::from_str("addr = \"cs1:7443\"\nstandby = [\"cs2:7443\", \"cs1:7443\", \"cs3:7443\"]")
            .unwrap();
    assert_eq!(c.addrs(), ["cs1:7443", "cs2:7443", "cs3:7443"]);
    // Without server_name each address is checked by its own host.
    assert_eq!(c.server_name_at("cs2:7443"), "cs2");
    let named = CsConfig {
        server_name: "cs.example".into(),
        ..c.clone()
    };
    assert_eq!(named.server_name_at("cs2:7443"), "cs.example");
    assert_eq!(split_addrs(" a:1, ,b:2 ,"), ["a:1", "b:2"]);
    let l = CsConfig::from_list("a:1,b:2");
    assert_eq!(
        (l.addr.as_str(), l.standby.as_slice()),
        ("a:1", &["b:2".to_string()][..])
    );
    assert!(CsConfig::from_list("").addrs().is_empty());
    assert!(!CsConfig::from_list("").enabled());
}

#[test]
fn rounds_back_off_only_after_every_address_failed() {
    let mut r = Rounds::new(2);
    assert_eq!(r.current(), 0);
    assert_eq!(r.failed(), Duration::ZERO);
    assert_eq!(r.current(), 1);
    assert_eq!(r.failed().as_millis(), BACKOFF_MIN.as_millis());
    assert_eq!(r.current(), 0);
    assert_eq!(r.failed(), Duration::ZERO);
    assert_eq!(r.failed().as_millis(), 2 * BACKOFF_MIN.as_millis());
    // A welcome at address 1 keeps it, and starts the backoff over.
    r.failed();
    assert_eq!(r.current(), 1);
    r.connected();
    assert_eq!(r.current(), 1);
    assert_eq!(r.failed(), Duration::ZERO);
    assert_eq!(r.current(), 0);
    assert_eq!(r.failed().as_millis(), BACKOFF_MIN.as_millis());
    // One address: every failure is a whole round.
    let mut one = Rounds::new(1);
    assert_eq!(one.failed().as_millis(), BACKOFF_MIN.as_millis());
    assert_eq!(one.current(), 0);
}

#[tokio::test]
async fn in_turn_stops_at_the_first_answer() {
    let addrs: Vec<String> = ["a:1", "b:2", "c:3"].map(String::from).into();
    let tried = Arc::new(Mutex::new(Vec::new()));
    let attempt = |answer_at: &'static str| {
        let tried = tried.clone();
        move |a: String| {
            let tried = tried.clone();
            async move {
                tried.lock().unwrap().push(a.clone());
                if a == answer_at {
                    Ok(a)
                } else if a == "b:2" {
                    Err(format!("{a} refused"))
                } else {
                    Err(format!("{a} unreachable"))
                }
            }
        }
    };
    let unreachable = |e: &String| e.ends_with("unreachable");
    let r = in_turn(&addrs, attempt("c:3"), unreachable).await;
    // b:2 answered (with an error): c:3 is not tried.
    match r {
        Err(Tried::Answered(e)) => assert_eq!(e, "b:2 refused"),
        other => panic!("{other:?}"),
    }
    assert_eq!(*tried.lock().unwrap(), ["a:1", "b:2"]);
    tried.lock().unwrap().clear();
    assert_eq!(
        in_turn(&addrs, attempt("a:1"), unreachable).await.unwrap(),
        "a:1"
    );
    let none: Vec<String> = ["a:1", "c:3"].map(String::from).into();
    match in_turn(&none, attempt("z:9"), unreachable).await {
        Err(t @ Tried::Unreachable(_)) => {
            assert_eq!(
                t.into_error(|v| v.join("; ")),
                "a:1 unreachable; c:3 unreachable"
            )
        }
        other => panic!("{other:?}"),
    }
}
