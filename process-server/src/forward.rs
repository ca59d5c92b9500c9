//! Forwarding to the master target (DESIGN.md §6): one apply stream per
//! replication, and the proxy for the agents' chunk-hash requests.
//!
//! Each replication has one task. It connects to the MT, says hello with the
//! replication's info, learns the MT's applied seq, and streams every cached
//! frame after it in order, then tails the cache as the writer makes new
//! frames durable (woken by the durable-seq watch, no polling). The MT's
//! `applied_seq` answers let the cache delete whole applied segments. At most
//! `MAX_INFLIGHT` bytes are sent and not yet applied. Any failure is logged
//! once at warn, then the task backs off (200 ms doubling to 5 s), reconnects
//! and resumes from the MT's word. A frame the MT refuses as corrupt is an
//! error that no retry fixes: it is logged at error and retried slowly.

use crate::cache::Replication;
use crate::segment;
use rebound_common::tls::{error_chain, TlsFiles};
use rebound_proto::master_target_client::MasterTargetClient;
use rebound_proto::{
    apply_request, apply_response, ApplyRequest, ApplyResponse, ChunkHashesRequest,
    ChunkHashesResponse, ReplicationInfo,
};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tracing::{debug, error, info, warn};

/// Largest gRPC message exchanged with the MT (one frame plus room).
pub const MAX_MESSAGE: usize = segment::MAX_ENTRY + (1 << 20);
/// Bytes sent to the MT and not yet applied, at most.
pub const MAX_INFLIGHT: u64 = 64 << 20;
/// Bytes read from the cache per step.
const READ_STEP: u64 = 8 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Retry delay after an error that retrying cannot fix (corrupt frame).
const BACKOFF_SEVERE: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// Deadline of a proxied chunk-hash request (the MT may wait 60 s itself).
const CHUNK_HASHES_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, Error)]
pub enum ForwardError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("the master target refused: {0}")]
    Refused(Status),
    #[error("the master target broke the protocol: {0}")]
    Protocol(String),
    #[error("the master target closed the apply stream")]
    Ended,
    #[error("the apply stream broke")]
    Broken,
    #[error("cannot read the cache: {0}")]
    Cache(String),
    #[error("the master target needs seq {need} next, but the cache holds it no longer (the next cached frame starts at seq {have}); the master target lost applied data, so the replication needs a resync")]
    Gap { need: u64, have: u64 },
}

impl ForwardError {
    /// Errors that retrying soon cannot fix.
    fn is_severe(&self) -> bool {
        match self {
            ForwardError::Refused(s) => matches!(s.code(), Code::InvalidArgument | Code::DataLoss),
            ForwardError::Cache(_) | ForwardError::Gap { .. } => true,
            _ => false,
        }
    }
}

// -------------------------------------------------------------------- MT link

/// How to reach the master target.
#[derive(Debug)]
pub struct MtLink {
    tls: TlsFiles,
    addr: String,
    server_name: String,
    /// Channel reused by chunk-hash requests.
    shared: tokio::sync::Mutex<Option<Channel>>,
}

impl MtLink {
    pub fn new(tls: TlsFiles, addr: String, server_name: String) -> MtLink {
        MtLink {
            tls,
            addr,
            server_name,
            shared: tokio::sync::Mutex::new(None),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// A new mTLS connection.
    pub async fn connect(&self) -> Result<Channel, ForwardError> {
        self.tls
            .connect(&self.addr, &self.server_name)
            .await
            .map_err(|e| ForwardError::Connect(error_chain(&e)))
    }

    fn client(channel: Channel) -> MasterTargetClient<Channel> {
        MasterTargetClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// Proxies a chunk-hash request to the MT and returns its answer.
    pub async fn chunk_hashes(
        &self,
        req: ChunkHashesRequest,
    ) -> Result<ChunkHashesResponse, Status> {
        let channel = {
            let mut shared = self.shared.lock().await;
            match shared.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let c = self.connect().await.map_err(|e| {
                        Status::unavailable(format!(
                            "master target {}: {e}; retry later",
                            self.addr
                        ))
                    })?;
                    *shared = Some(c.clone());
                    c
                }
            }
        };
        let mut request = tonic::Request::new(req);
        request.set_timeout(CHUNK_HASHES_TIMEOUT);
        match Self::client(channel).chunk_hashes(request).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => {
                if matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Internal) {
                    *self.shared.lock().await = None;
                }
                Err(Status::new(
                    s.code(),
                    format!("master target {}: {}", self.addr, s.message()),
                ))
            }
        }
    }
}

// ----------------------------------------------------------------- forwarders

/// Where one replication is forwarded to, set by the CS's AddReplication
/// and kept in `<cache_dir>/<replication>/route.json` so a restart forwards
/// to the same MT before the CS says anything.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    pub machine_id: String,
    pub mt_address: String,
    pub mt_server_name: String,
}

/// The route file of a replication's cache directory.
pub fn route_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("route.json")
}

/// Reads a replication's route, if it has one.
pub fn load_route(dir: &std::path::Path) -> Option<Route> {
    let path = route_path(dir);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(file = %path.display(), "route file is invalid ({e}); forwarding to the default [mt] until the CS sends AddReplication again");
            None
        }
    }
}

/// The forwarding tasks, one per replication, each to its replication's
/// MT (its route), or to the default `[mt]` of the config.
#[derive(Debug)]
pub struct Forwarders {
    link: Arc<MtLink>,
    tls: TlsFiles,
    links: Mutex<HashMap<String, Arc<MtLink>>>,
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
    closed: AtomicBool,
}

impl Forwarders {
    pub fn new(link: Arc<MtLink>) -> Forwarders {
        Forwarders {
            tls: link.tls.clone(),
            link,
            links: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// The default link (`[mt]`).
    pub fn link(&self) -> &Arc<MtLink> {
        &self.link
    }

    /// The MT link of replication `id`: its route, else the default.
    pub fn link_for(&self, id: &str) -> Arc<MtLink> {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .unwrap_or_else(|| self.link.clone())
    }

    /// Sets replication `id`'s route. Returns true when it changed (the
    /// caller restarts its forwarder).
    pub fn set_route(&self, id: &str, route: &Route) -> bool {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if links
            .get(id)
            .is_some_and(|l| l.addr == route.mt_address && l.server_name == route.mt_server_name)
        {
            return false;
        }
        links.insert(
            id.to_string(),
            Arc::new(MtLink::new(
                self.tls.clone(),
                route.mt_address.clone(),
                route.mt_server_name.clone(),
            )),
        );
        true
    }

    /// Starts the replication's forwarder unless it runs already.
    pub fn ensure(&self, rep: &Arc<Replication>) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if tasks.get(rep.id()).is_some_and(|h| !h.is_finished()) {
            return;
        }
        let task = tokio::spawn(forward_loop(rep.clone(), self.link_for(rep.id())));
        tasks.insert(rep.id().to_string(), task);
    }

    /// Stops replication `id`'s forwarder (a route change or RemoveReplication).
    pub fn stop(&self, id: &str) {
        let task = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(t) = task {
            t.abort();
        }
    }

    /// Forgets replication `id` entirely.
    pub fn remove(&self, id: &str) {
        self.stop(id);
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Stops every forwarder (nothing they hold needs flushing: the cache
    /// keeps every frame until the MT has applied it).
    pub fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, t) in tasks {
            t.abort();
        }
    }
}

struct Retry {
    backoff: Duration,
    warned: bool,
}

async fn forward_loop(rep: Arc<Replication>, link: Arc<MtLink>) {
    let mut info_rx = rep.info_watch();
    let mut retry = Retry {
        backoff: BACKOFF_MIN,
        warned: false,
    };
    loop {
        let info = match info_rx.wait_for(|i| i.is_some()).await {
            Ok(i) => i.clone(),
            Err(_) => return,
        };
        let Some(info) = info else { continue };
        let started = Instant::now();
        let err = match session(&rep, &link, info, &mut retry).await {
            Ok(()) => ForwardError::Ended,
            Err(e) => e,
        };
        if started.elapsed() >= HEALTHY_SESSION {
            retry.backoff = BACKOFF_MIN;
        }
        if err.is_severe() {
            error!(
                replication = %rep.id(),
                mt = %link.addr(),
                applied_seq = rep.applied(),
                "forwarding stopped: {err}; retrying in {} s",
                BACKOFF_SEVERE.as_secs()
            );
            retry.warned = true;
            tokio::time::sleep(BACKOFF_SEVERE).await;
            continue;
        }
        if retry.warned {
            debug!(replication = %rep.id(), mt = %link.addr(), "forwarding still failing: {err}");
        } else {
            warn!(
                replication = %rep.id(),
                mt = %link.addr(),
                applied_seq = rep.applied(),
                durable_seq = rep.durable(),
                "forwarding to the master target failed: {err}; reconnecting with backoff (repeats are logged at debug)"
            );
            retry.warned = true;
        }
        tokio::time::sleep(retry.backoff).await;
        retry.backoff = (retry.backoff * 2).min(BACKOFF_MAX);
    }
}

/// One apply stream, from hello until it fails.
async fn session(
    rep: &Arc<Replication>,
    link: &MtLink,
    info: ReplicationInfo,
    retry: &mut Retry,
) -> Result<(), ForwardError> {
    let channel = link.connect().await?;
    let (tx, rx) = mpsc::channel::<ApplyRequest>(4);
    tx.send(ApplyRequest {
        msg: Some(apply_request::Msg::Hello(info)),
    })
    .await
    .map_err(|_| ForwardError::Broken)?;
    let mut responses = MtLink::client(channel)
        .apply(ReceiverStream::new(rx))
        .await
        .map_err(ForwardError::Refused)?
        .into_inner();
    let resume = match responses.message().await {
        Ok(Some(ApplyResponse {
            msg: Some(apply_response::Msg::ResumeSeq(n)),
        })) => n,
        Ok(Some(other)) => {
            return Err(ForwardError::Protocol(format!(
                "its first answer must be resume_seq, got {other:?}"
            )))
        }
        Ok(None) => return Err(ForwardError::Ended),
        Err(s) => return Err(ForwardError::Refused(s)),
    };
    info!(
        replication = %rep.id(),
        mt = %link.addr(),
        resume_seq = resume,
        durable_seq = rep.durable(),
        "connected to the master target"
    );
    retry.warned = false;
    rep.set_applied(resume);

    let (applied_tx, applied_rx) = watch::channel(resume);
    let sender = send_loop(rep.clone(), tx, resume, applied_rx);
    let receiver = recv_loop(rep, responses, applied_tx);
    tokio::pin!(sender, receiver);
    tokio::select! {
        r = &mut sender => match r {
            // The request stream is gone; the answer stream says why.
            Err(ForwardError::Broken) => match tokio::time::timeout(Duration::from_secs(2), &mut receiver).await {
                Ok(Err(e)) => Err(e),
                _ => Err(ForwardError::Broken),
            },
            other => other,
        },
        r = &mut receiver => r,
    }
}

/// Streams cached frames after `resume` in order, tailing the cache.
async fn send_loop(
    rep: Arc<Replication>,
    tx: mpsc::Sender<ApplyRequest>,
    resume: u64,
    mut applied: watch::Receiver<u64>,
) -> Result<(), ForwardError> {
    let mut cursor = Some(Cursor::new(rep.clone(), resume.saturating_add(1)));
    let mut inflight: VecDeque<(u64, u64)> = VecDeque::new();
    let mut inflight_bytes = 0u64;
    let mut durable = rep.durable_watch();
    loop {
        let a = *applied.borrow_and_update();
        while let Some(&(last, n)) = inflight.front() {
            if last > a {
                break;
            }
            inflight.pop_front();
            inflight_bytes -= n;
        }
        if inflight_bytes >= MAX_INFLIGHT {
            applied.changed().await.map_err(|_| ForwardError::Broken)?;
            continue;
        }
        durable.borrow_and_update();
        let budget = (MAX_INFLIGHT - inflight_bytes).min(READ_STEP);
        let Some(mut c) = cursor.take() else {
            return Err(ForwardError::Cache("cache reader lost".into()));
        };
        let (c, items) = tokio::task::spawn_blocking(move || {
            let r = c.read(budget);
            (c, r)
        })
        .await
        .map_err(|e| ForwardError::Cache(format!("cache read task failed: {e}")))?;
        cursor = Some(c);
        let items = items?;
        if items.is_empty() {
            durable.changed().await.map_err(|_| ForwardError::Broken)?;
            continue;
        }
        let stats = rep.stats();
        for item in items {
            let n = item.bytes.len() as u64;
            inflight.push_back((item.last_seq, n));
            inflight_bytes += n;
            tx.send(ApplyRequest {
                msg: Some(apply_request::Msg::Frame(item.bytes.into())),
            })
            .await
            .map_err(|_| ForwardError::Broken)?;
            stats.frames_forwarded.fetch_add(1, Ordering::Relaxed);
            stats.bytes_forwarded.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Takes the MT's `applied_seq` answers.
async fn recv_loop(
    rep: &Replication,
    mut responses: Streaming<ApplyResponse>,
    applied: watch::Sender<u64>,
) -> Result<(), ForwardError> {
    loop {
        match responses.message().await {
            Ok(Some(ApplyResponse {
                msg: Some(apply_response::Msg::AppliedSeq(n)),
            })) => {
                rep.set_applied(n);
                applied.send_replace(n);
            }
            Ok(Some(other)) => {
                debug!(replication = %rep.id(), "ignoring unexpected answer from the master target: {other:?}")
            }
            Ok(None) => return Err(ForwardError::Ended),
            Err(s) => return Err(ForwardError::Refused(s)),
        }
    }
}

// --------------------------------------------------------------------- cursor

/// A frame read from the cache for sending.
#[derive(Debug)]
pub struct Item {
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: Vec<u8>,
}

struct OpenSegment {
    name: u64,
    file: File,
    offset: u64,
}

/// Reads a replication's cached frames in seq order, from `next_seq` on.
/// Reads only synced data (the segment table's lengths) and follows the
/// writer's rotations and the trimming of segments.
pub struct Cursor {
    rep: Arc<Replication>,
    next_seq: u64,
    open: Option<OpenSegment>,
}

impl Cursor {
    pub fn new(rep: Arc<Replication>, next_seq: u64) -> Cursor {
        Cursor {
            rep,
            next_seq,
            open: None,
        }
    }

    fn open_segment(&mut self, name: u64) -> Result<bool, ForwardError> {
        let path = self.rep.segments_dir().join(segment::file_name(name));
        match File::open(&path) {
            Ok(file) => {
                self.open = Some(OpenSegment {
                    name,
                    file,
                    offset: 0,
                });
                Ok(true)
            }
            // Trimmed meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ForwardError::Cache(format!("{}: {e}", path.display()))),
        }
    }

    /// Reads up to about `budget` bytes of frames (blocking). Empty when
    /// everything durable has been read.
    pub fn read(&mut self, budget: u64) -> Result<Vec<Item>, ForwardError> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut misses = 0;
        while bytes < budget {
            let Some(seg) = self.open.as_mut() else {
                // The segment holding next_seq, else the oldest one.
                let next = self.next_seq;
                let target = self.rep.with_segments(|s| {
                    s.map
                        .range(..=next)
                        .next_back()
                        .or_else(|| s.map.iter().next())
                        .map(|(n, _)| *n)
                });
                let Some(name) = target else { break };
                if !self.open_segment(name)? {
                    misses += 1;
                    if misses > 3 {
                        break;
                    }
                }
                continue;
            };
            let name = seg.name;
            let (committed, later) = self.rep.with_segments(|s| {
                (
                    s.map.get(&name).map(|m| m.len),
                    s.map.range(name + 1..).next().map(|(n, _)| *n),
                )
            });
            let Some(committed) = committed else {
                // Trimmed: find the segment holding next_seq again.
                self.open = None;
                continue;
            };
            if seg.offset >= committed {
                match later {
                    Some(n) => {
                        self.open = None;
                        if !self.open_segment(n)? {
                            misses += 1;
                            if misses > 3 {
                                break;
                            }
                        }
                        continue;
                    }
                    None => break,
                }
            }
            match segment::read_entry(&seg.file, seg.offset, committed) {
                Ok(Some((meta, frame))) => {
                    seg.offset = meta.end();
                    if meta.last_seq < self.next_seq {
                        continue;
                    }
                    if meta.first_seq > self.next_seq {
                        return Err(ForwardError::Gap {
                            need: self.next_seq,
                            have: meta.first_seq,
                        });
                    }
                    self.next_seq = meta.last_seq + 1;
                    bytes += frame.len() as u64;
                    out.push(Item {
                        first_seq: meta.first_seq,
                        last_seq: meta.last_seq,
                        bytes: frame,
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(ForwardError::Cache(format!(
                        "segment {}: {e}",
                        self.rep
                            .segments_dir()
                            .join(segment::file_name(name))
                            .display()
                    )))
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::segment::tests::frame_bytes;
    use rebound_proto::ReplicationInfo;

    #[tokio::test]
    async fn cursor_follows_rotation_and_trim() {
        let d = tempfile::tempdir().unwrap();
        let entry = frame_bytes("r", 1, 1).len() as u64 + segment::ENTRY_HEADER as u64;
        let root = d.path().to_path_buf();
        let cache = Arc::new(
            tokio::task::spawn_blocking(move || {
                Cache::open_with_segment_max(&root, 1 << 30, entry * 2)
            })
            .await
            .unwrap()
            .unwrap(),
        );
        let c = cache.clone();
        let rep = tokio::task::spawn_blocking(move || {
            c.hello(&ReplicationInfo {
                replication_id: "r".into(),
                machine_id: "m".into(),
                disks: vec![],
            })
        })
        .await
        .unwrap()
        .unwrap()
        .0;
        let put = |first: u64, last: u64| {
            let rep = rep.clone();
            async move {
                rep.append(frame_bytes("r", first, last).into(), first, last, 0)
                    .await
                    .unwrap()
                    .await
                    .unwrap()
                    .unwrap()
            }
        };
        for s in 1..=5 {
            put(s, s).await;
        }
        // From the start, across segments 1, 3, 5.
        let mut cur = Cursor::new(rep.clone(), 1);
        assert_eq!(
            seqs(cur.read(1 << 30)),
            vec![(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]
        );
        assert!(seqs(cur.read(1 << 30)).is_empty());
        // Tailing: new frames, including an overlapping one.
        put(5, 7).await;
        assert_eq!(seqs(cur.read(1 << 30)), vec![(5, 7)]);
        // A resume in the middle of a segment and of a frame.
        let mut mid = Cursor::new(rep.clone(), 6);
        assert_eq!(seqs(mid.read(1 << 30)), vec![(5, 7)]);
        let mut mid = Cursor::new(rep.clone(), 4);
        assert_eq!(seqs(mid.read(1)), vec![(4, 4)]);
        // Trimmed below the reader: it finds its place again.
        rep.set_applied(4);
        let t0 = Instant::now();
        while rep.segments().contains_key(&3) {
            assert!(t0.elapsed() < Duration::from_secs(5));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(seqs(mid.read(1 << 30)), vec![(5, 5), (5, 7)]);
        // The MT needs a seq the cache no longer holds.
        let mut old = Cursor::new(rep.clone(), 2);
        assert!(matches!(
            old.read(1 << 30),
            Err(ForwardError::Gap { need: 2, have: 5 })
        ));
        let c = cache.clone();
        tokio::task::spawn_blocking(move || c.shutdown())
            .await
            .unwrap();
    }

    #[test]
    fn corrupt_refusals_are_not_retried_quickly() {
        assert!(ForwardError::Refused(Status::data_loss("hash")).is_severe());
        assert!(ForwardError::Refused(Status::invalid_argument("header")).is_severe());
        assert!(ForwardError::Gap { need: 1, have: 5 }.is_severe());
        assert!(!ForwardError::Refused(Status::unavailable("down")).is_severe());
        assert!(!ForwardError::Connect("refused".into()).is_severe());
        assert!(!ForwardError::Ended.is_severe());
    }

    fn seqs(items: Result<Vec<Item>, ForwardError>) -> Vec<(u64, u64)> {
        items
            .unwrap()
            .iter()
            .map(|i| (i.first_seq, i.last_seq))
            .collect()
    }
}
