//! The change stream to the process server (DESIGN.md §4 "Frames", §6;
//! INTERFACES.md "Seq, resume, durability").
//!
//! One task owns the `Ingest` stream: it connects with mutual TLS, sends the
//! hello, learns `resume_seq`, re-sends whatever the PS does not hold yet,
//! then seals frames from the change buffer and sends them while reading
//! `durable_seq` answers. Frames stay in memory until the PS says they are
//! durable, so a reconnect loses nothing. While the PS is unreachable for
//! longer than `bitmap_after`, the agent switches to bitmap mode. Why it is
//! unreachable (a certificate without the PS's address, refused, no route)
//! goes to the configuration server as an event with the fix
//! ([`rebound_common::link_error`]), and `link-restored` once it connects.
//!
//! A PS that resumes a fresh stream below the durable seq it acknowledged
//! before (the dirty-extent log's durable mark) has lost records whose dirty
//! bits may already be cleared: the agent resyncs every disk and says so in
//! an error log and a `ps-lost-records` event.
//!
//! A stream moving to another PS of the site (`rebound move`) is different:
//! the old PS acknowledged records the MT has not applied yet and still
//! forwards them, so the new PS (whose empty cache resumes after the MT's
//! applied seq) answers below the acknowledged seq for a while. Until
//! [`MOVE_WAIT`] has passed, such an answer ends the session and the hello
//! is retried, with a status line in the log, until the new PS resumes at or
//! above it; only then does it count as lost (a full resync, with a
//! `move-resync` warning event). Frames the old PS had not acknowledged stay
//! in the outbox, which outlives the pipeline for the same replication, so
//! the new PS gets them. The end of the wait is kept with the
//! assignment ([`crate::control`]), so an agent restarted mid-move waits
//! for the old PS too; [`Moving::over`] records that the move is over.
//!
//! Memory: a sealed frame keeps the body its builder wrote the records into
//! (moved, no copy; a body from the [`crate::frame_pool`] keeps its
//! capacity and goes back to the pool once the PS holds the frame, any
//! other is shrunk to its length). Sending shares the frame with tonic,
//! whose encoder copies it into its buffer once ([`crate::ingest_codec`]),
//! and at most [`SEND_QUEUE`] frames wait in the request channel.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use rebound_common::control::ControlHandle;
use rebound_common::frame::{Frame, FrameBuilder, FrameError};
use rebound_common::link_error::report::LinkReporter;
use rebound_common::link_error::{LinkFailure, Peer};
use rebound_common::pki::Role;
use rebound_common::tls::TlsError;
use rebound_proto::control::Event;
use rebound_proto::ingest_response::Msg as RespMsg;
use rebound_proto::ReplicationInfo;
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tracing::{debug, error, info, warn};

use crate::capture::{Capture, PendingFrame, ResumeOutcome, IDLE_FLUSH};
use crate::config::Settings;
use crate::frame_pool::{FramePool, BODY_CAPACITY};
use crate::ingest_codec::{IngestCodec, Outgoing};
use crate::sleep_unless_stopped;

/// Largest message we accept from the PS (answers are tiny).
const MAX_MESSAGE: usize = 64 << 20;
/// Frames waiting for tonic's encoder (shared with the outbox, no copy).
const SEND_QUEUE: usize = 2;
/// The `Ingest` method of the PS's service (proto/rebound.proto).
const INGEST_PATH: &str = "/rebound.v1.ProcessServer/Ingest";
/// First wait before reconnecting to the PS: short, so a PS restart costs
/// little lag.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(400);
/// Longest wait between attempts while the PS stays unreachable.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
pub use rebound_common::control::MOVE_WAIT;
/// How often the wait of a moving stream is logged.
const MOVE_WAIT_LOG_EVERY: Duration = Duration::from_secs(15);

/// A stream moving to another PS: until when a resume below the
/// acknowledged seq is waited out, and what to do once the move is over
/// (the new PS resumed at or above it, or the wait ran out).
pub struct Moving {
    pub until: Instant,
    pub over: Box<dyn FnOnce() + Send>,
}

/// Why a session with the PS ended; the sender reconnects after each.
#[derive(Debug, Error)]
pub enum SenderError {
    #[error(transparent)]
    Connect(#[from] TlsError),
    #[error("the connection is not ready: {0}")]
    NotReady(tonic::transport::Error),
    #[error("Ingest stream: {}: {}", .0.code(), .0.message())]
    Stream(Box<tonic::Status>),
    #[error("the process server closed the Ingest stream")]
    Closed,
    #[error("the process server broke the protocol: no answer to hello within 60 s")]
    NoResume,
    #[error("the process server broke the protocol: expected resume_seq first, got {0}")]
    NotResumeFirst(String),
    #[error("the process server broke the protocol: unexpected resume_seq {0} mid-stream")]
    ResumeMidStream(u64),
    #[error("re-reading our own frame: {0}")]
    OwnFrame(#[from] FrameError),
    #[error(
        "moving to this process server: it resumes after seq {resume}, but the old one acknowledged up to seq \
         {acknowledged} and still forwards them to the master target; retrying"
    )]
    MoveWait { resume: u64, acknowledged: u64 },
}

impl From<tonic::Status> for SenderError {
    fn from(s: tonic::Status) -> Self {
        SenderError::Stream(Box::new(s))
    }
}

/// The state of the link to the PS, shared with the resync driver.
pub struct Link {
    connected: AtomicBool,
    channel: Mutex<Option<Channel>>,
    /// Since when the PS has been unreachable (the agent's start at first).
    down_since: Mutex<Option<Instant>>,
    /// Tells the configuration server why the PS is unreachable.
    reporter: LinkReporter,
    /// Where other stream events go (the control channel), once it runs.
    events: OnceLock<ControlHandle>,
    /// The outbox of the last stopped sender and its replication: the next
    /// sender of the same replication (a move to another PS) resends it.
    parked: Mutex<Option<(String, Outbox)>>,
    /// Frame bytes handed to the Ingest stream since the agent started
    /// (resent frames count again): what the change stream cost the link.
    /// Also `rebound_agent_sent_bytes_total` ([`crate::metrics`]).
    bytes_sent: Counter,
    /// Why the PS cannot be reached now, as the sentence the configuration
    /// server's event carries ("" while the link works).
    error: Mutex<String>,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            connected: AtomicBool::new(false),
            channel: Mutex::new(None),
            down_since: Mutex::new(Some(Instant::now())),
            reporter: LinkReporter::default(),
            events: OnceLock::new(),
            parked: Mutex::new(None),
            bytes_sent: Counter::default(),
            error: Mutex::new(String::new()),
        }
    }
}

impl Link {
    /// Sends link failures to the configuration server from now on.
    pub fn set_events(&self, h: ControlHandle) {
        self.reporter.set_events(h.clone());
        let _ = self.events.set(h);
    }
    /// Sends an event to the configuration server, when there is one.
    fn event(&self, ev: Event) {
        if let Some(h) = self.events.get() {
            h.event(ev);
        }
    }
    /// Frame bytes sent to the PS since the agent started.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.get()
    }
    /// The counter of frame bytes sent, for the metrics registry.
    pub fn sent_counter(&self) -> &Counter {
        &self.bytes_sent
    }
    /// Why the agent cannot reach its PS now: "" while the link works (or
    /// no stream runs).
    pub fn error(&self) -> String {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn set_error(&self, why: String) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }
    /// The live channel, for unary calls (ChunkHashes).
    pub fn channel(&self) -> Option<Channel> {
        self.channel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    /// Records a working link (`Some`: the stream resumed) or a lost one.
    pub(crate) fn set(&self, ch: Option<Channel>) {
        let mut down = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        if ch.is_some() {
            *down = None;
            self.set_error(String::new());
        } else if down.is_none() {
            *down = Some(Instant::now());
        }
        self.connected.store(ch.is_some(), Ordering::SeqCst);
        *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = ch;
    }
    /// Takes the outbox a stopped sender of replication `rid` left.
    fn unpark(&self, rid: &str) -> Outbox {
        match self.parked.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some((r, o)) if r == rid => o,
            _ => Outbox::default(),
        }
    }
    fn park(&self, rid: &str, outbox: Outbox) {
        *self.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some((rid.to_string(), outbox));
    }
    /// How long the PS has been unreachable (None while connected).
    pub fn down_for(&self) -> Option<Duration> {
        self.down_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
    }
}

/// Switches to bitmap mode once per outage when the PS has been unreachable
/// for `bitmap_after`, until `stop`.
pub async fn outage_watch(
    cap: Arc<Capture>,
    link: Arc<Link>,
    bitmap_after: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut done_for_this_outage = false;
    loop {
        if !sleep_unless_stopped(Duration::from_millis(100), &mut stop).await {
            return;
        }
        match link.down_for() {
            None => done_for_this_outage = false,
            Some(d) if d >= bitmap_after && !done_for_this_outage => {
                done_for_this_outage = true;
                cap.resync().enter_bitmap(&format!(
                    "the process server has been unreachable for {} s",
                    d.as_secs()
                ));
            }
            Some(_) => {}
        }
    }
}

/// A sealed frame kept until the PS holds it.
struct Sealed {
    first: u64,
    last: u64,
    /// Shared with tonic's encoder while a send is in flight.
    frame: Arc<Frame>,
    /// Uncompressed body length = the change-buffer bytes it accounts for.
    body_len: u64,
}

fn seal(b: FrameBuilder) -> Sealed {
    let mut frame = b.finish();
    // A body from the frame pool keeps its capacity, to be reused: in a
    // fresh one the pages past its length were never written, so they are
    // not resident, and what reused ones hold beyond their length is
    // bounded by the pool (see its module doc). Another body
    // grew by doubling: give the slack back (an in-place realloc), so what
    // stays allocated is what the buffer accounts for.
    if frame.body.capacity() < BODY_CAPACITY {
        frame.body.shrink_to_fit();
    }
    Sealed {
        first: frame.header.first_seq,
        last: frame.header.last_seq,
        body_len: frame.header.uncompressed_len as u64,
        frame: Arc::new(frame),
    }
}

/// Re-encodes the records of `s` from `from` on (a reconnect resumed in the
/// middle of a frame), so the PS never sees a frame starting before its
/// resume point.
fn tail(rid: &str, s: &Sealed, from: u64) -> Result<Sealed, SenderError> {
    let recs = s.frame.records()?;
    let mut b = FrameBuilder::new(rid, from);
    for r in recs.iter().skip((from - s.first) as usize) {
        b.push(r);
    }
    Ok(seal(b))
}

/// Frames not yet durable at the PS, oldest first.
#[derive(Default)]
struct Outbox {
    frames: VecDeque<Sealed>,
    /// Index of the first frame not sent on the current stream.
    next: usize,
}

impl Outbox {
    /// Drops what `durable` covers, giving the bodies back to `pool`;
    /// returns the buffer bytes freed.
    fn ack(&mut self, durable: u64, pool: &FramePool) -> u64 {
        let mut freed = 0;
        while self.frames.front().is_some_and(|f| f.last <= durable) {
            if let Some(f) = self.frames.pop_front() {
                freed += f.body_len;
                // tonic encodes a frame before the PS can answer for it,
                // so the outbox holds the last reference; if a dead
                // stream's queue still holds one, the body is just freed.
                if let Ok(frame) = Arc::try_unwrap(f.frame) {
                    pool.give(frame.body);
                }
            }
            self.next = self.next.saturating_sub(1);
        }
        freed
    }
}

/// Runs the stream until `stop`: connect, resume, send, reconnect.
/// `moving`: until when a resume below the acknowledged seq is waited out
/// (a move to another PS), see the module doc.
pub async fn run(
    cap: Arc<Capture>,
    settings: Arc<Settings>,
    link: Arc<Link>,
    info: ReplicationInfo,
    moving: Option<Moving>,
    mut stop: watch::Receiver<bool>,
) {
    let mut outbox = link.unpark(&info.replication_id);
    run_sessions(
        &cap,
        &settings,
        &link,
        &info,
        moving,
        &mut outbox,
        &mut stop,
    )
    .await;
    link.park(&info.replication_id, outbox);
}

async fn run_sessions(
    cap: &Arc<Capture>,
    settings: &Settings,
    link: &Link,
    info: &ReplicationInfo,
    mut moving: Option<Moving>,
    outbox: &mut Outbox,
    stop: &mut watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    let mut backoff = reconnect_backoff();
    let mut move_logged: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let r = session(cap, settings, link, info, &mut moving, outbox, stop).await;
        let was_connected = link.is_connected();
        link.set(None);
        match r {
            Ok(()) => {
                link.set_error(String::new());
                return;
            }
            Err(e @ SenderError::MoveWait { .. }) => {
                // The new PS answers: waiting for the old one is no link failure.
                link.set_error(String::new());
                if move_logged.is_none_or(|t| t.elapsed() >= MOVE_WAIT_LOG_EVERY) {
                    let left = moving.as_ref().map_or(0, |m| {
                        m.until.saturating_duration_since(Instant::now()).as_secs()
                    });
                    info!(addr = %settings.ps.addr, "{e} (the master target has not applied them yet; \
                        a full resync in {left} s if it does not)");
                    move_logged = Some(Instant::now());
                }
            }
            Err(e) => {
                let failure = LinkFailure::from_error(&e);
                let peer = ps_peer(settings);
                link.set_error(failure.message(&peer));
                if !was_connected {
                    link.reporter
                        .report_failure(&peer, &info.replication_id, &failure);
                }
                if was_connected {
                    warn!(addr = %settings.ps.addr, "lost the process server: {e}; reconnecting");
                    failures = 0;
                    backoff = reconnect_backoff();
                } else if failures == 0 || failures.is_multiple_of(30) {
                    warn!(addr = %settings.ps.addr, "cannot reach the process server: {e}; retrying");
                } else {
                    debug!(addr = %settings.ps.addr, "cannot reach the process server: {e}");
                }
                failures += 1;
            }
        }
        let delay = backoff.next().unwrap_or(RECONNECT_MAX_DELAY);
        if !sleep_unless_stopped(delay, stop).await {
            return;
        }
    }
}

/// The PS as link events name it (the agent knows its address, not its id).
fn ps_peer(settings: &Settings) -> Peer {
    Peer {
        role: Role::Ps,
        id: String::new(),
        addr: settings.ps.addr.clone(),
    }
}

/// The delays between attempts to reach the PS: doubling from
/// [`RECONNECT_MIN_DELAY`] to [`RECONNECT_MAX_DELAY`], starting over after
/// a stream that was connected breaks.
fn reconnect_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(RECONNECT_MIN_DELAY)
        .with_max_delay(RECONNECT_MAX_DELAY)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

async fn session(
    cap: &Arc<Capture>,
    settings: &Settings,
    link: &Link,
    info: &ReplicationInfo,
    moving: &mut Option<Moving>,
    outbox: &mut Outbox,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), SenderError> {
    let addr = &settings.ps.addr;
    let channel = settings
        .tls
        .connect(addr, &settings.ps.server_name, Role::Ps)
        .await?;
    let mut client =
        tonic::client::Grpc::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE);
    let (tx, rx) = mpsc::channel::<Outgoing>(SEND_QUEUE);
    tx.send(Outgoing::Hello(info.clone()))
        .await
        .map_err(|_| SenderError::Closed)?;
    client.ready().await.map_err(SenderError::NotReady)?;
    let resp = client
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            PathAndQuery::from_static(INGEST_PATH),
            IngestCodec,
        )
        .await?;
    let mut inbound = resp.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(60), inbound.next())
        .await
        .map_err(|_| SenderError::NoResume)?;
    let resume = match first {
        Some(Ok(m)) => match m.msg {
            Some(RespMsg::ResumeSeq(r)) => r,
            other => return Err(SenderError::NotResumeFirst(format!("{other:?}"))),
        },
        Some(Err(s)) => return Err(s.into()),
        None => return Err(SenderError::Closed),
    };

    if let Some(until) = moving.as_ref().map(|m| m.until) {
        let acknowledged = cap
            .snapshot()
            .durable_seq
            .max(cap.dirty_extents().log().durable_mark());
        if resume < acknowledged {
            if Instant::now() < until {
                return Err(SenderError::MoveWait {
                    resume,
                    acknowledged,
                });
            }
            let message = format!(
                "moving replication {rid} to the process server at {addr}: it still resumes after seq {resume} \
                 after {} s, below seq {acknowledged} the old process server acknowledged (the master target has \
                 not applied those records); resyncing every disk instead",
                MOVE_WAIT.as_secs(),
                rid = info.replication_id,
            );
            warn!("{message}");
            link.event(Event {
                severity: "warning".into(),
                kind: "move-resync".into(),
                message,
                replication_id: info.replication_id.clone(),
                ..Default::default()
            });
        }
        // The move is over: from now on a low resume is a loss again.
        if let Some(m) = moving.take() {
            (m.over)();
        }
    }

    // Fit the PS's resume point to what we hold.
    match cap.stream().on_resume(resume) {
        ResumeOutcome::Fresh => {
            outbox.frames.clear();
            if resume == 0 && settings.initialized_marker().exists() {
                warn!(
                    "the process server has no record of replication {} although this agent finished its initial \
                     replication; running a full resync",
                    info.replication_id
                );
                cap.resync().mark_need_all("initial");
            }
        }
        ResumeOutcome::Lost { acknowledged } => {
            outbox.frames.clear();
            let message = format!(
                "the process server at {addr} resumed replication {rid} after seq {resume}, but it had acknowledged every \
                 record up to seq {acknowledged}: it lost acknowledged records (its cache was damaged, replaced or \
                 wiped), and the dirty bits of their extents may be cleared already; running a full resync \
                 (a hash comparison of every disk with the replica)",
                addr = settings.ps.addr,
                rid = info.replication_id,
            );
            error!(
                resume_seq = resume,
                acknowledged_seq = acknowledged,
                "{message}"
            );
            link.event(Event {
                severity: "error".into(),
                kind: "ps-lost-records".into(),
                message,
                replication_id: info.replication_id.clone(),
                ..Default::default()
            });
        }
        ResumeOutcome::Reset => outbox.frames.clear(),
        ResumeOutcome::Continue => {
            let freed = outbox.ack(resume, cap.stream().frame_pool());
            if let Some(f) = outbox.frames.front() {
                if f.first <= resume {
                    let t = tail(&cap.replication_id(), f, resume + 1)?;
                    let freed_tail = f.body_len - t.body_len;
                    outbox.frames[0] = t;
                    cap.stream().on_durable(resume, freed + freed_tail);
                } else {
                    cap.stream().on_durable(resume, freed);
                }
            } else {
                cap.stream().on_durable(resume, freed);
            }
        }
    }
    outbox.next = 0;
    link.set(Some(channel));
    link.reporter
        .report_restored(&ps_peer(settings), &info.replication_id);
    let snap = cap.snapshot();
    info!(
        addr = %addr,
        resume_seq = resume,
        seq = snap.seq,
        resend_frames = outbox.frames.len(),
        mode = snap.mode.as_str(),
        "connected to the process server; resuming after seq {resume}"
    );

    loop {
        let (frames, open_pending) = cap.stream().take_frames(false);
        for f in frames {
            let PendingFrame { builder, .. } = f;
            if builder.is_empty() {
                continue;
            }
            outbox.frames.push_back(seal(builder));
        }
        let has_unsent = outbox.next < outbox.frames.len();
        tokio::select! {
            biased;
            _ = stop.changed() => {
                if *stop.borrow() {
                    return Ok(());
                }
            }
            m = inbound.next() => match m {
                Some(Ok(m)) => match m.msg {
                    Some(RespMsg::DurableSeq(d)) => {
                        let freed = outbox.ack(d, cap.stream().frame_pool());
                        cap.stream().on_durable(d, freed);
                    }
                    Some(RespMsg::ResumeSeq(r)) => {
                        return Err(SenderError::ResumeMidStream(r));
                    }
                    None => {}
                },
                Some(Err(s)) => return Err(s.into()),
                None => return Err(SenderError::Closed),
            },
            permit = tx.reserve(), if has_unsent => {
                let permit = permit.map_err(|_| SenderError::Closed)?;
                let f = &outbox.frames[outbox.next];
                link.bytes_sent.inc_by(f.frame.encoded_len() as u64);
                permit.send(Outgoing::Frame(Arc::clone(&f.frame)));
                outbox.next += 1;
            }
            _ = cap.stream().wake().notified() => {}
            _ = tokio::time::sleep(IDLE_FLUSH), if open_pending => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rebound_common::frame::Record;

    #[test]
    fn reconnect_delays_double_up_to_the_maximum() {
        let d: Vec<u64> = reconnect_backoff()
            .take(6)
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(d, vec![400, 800, 1600, 2000, 2000, 2000]);
    }

    #[test]
    fn tail_reencodes_from_the_resume_point() {
        let mut b = FrameBuilder::new("m1", 10);
        for i in 0..5u64 {
            b.push_write(0, i * 512, &[i as u8; 512]);
        }
        let s = seal(b);
        assert_eq!((s.first, s.last), (10, 14));
        let t = tail("m1", &s, 13).unwrap();
        assert_eq!((t.first, t.last), (13, 14));
        let recs = Frame::parse(&t.frame.to_bytes())
            .unwrap()
            .records()
            .unwrap();
        assert_eq!(
            recs[0],
            Record::Write {
                disk: 0,
                offset: 3 * 512,
                data: vec![3u8; 512].into()
            }
        );
        let mut o = Outbox {
            frames: VecDeque::from(vec![s, t]),
            next: 2,
        };
        let pool = FramePool::default();
        assert_eq!(o.ack(9, &pool), 0);
        let freed = o.ack(14, &pool);
        assert!(freed > 5 * 512);
        assert_eq!(o.next, 0);
        assert!(o.frames.is_empty());
    }
}
