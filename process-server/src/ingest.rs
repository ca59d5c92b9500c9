//! The agent side of the process server: the `Ingest` stream (DESIGN.md §6).
//!
//! An agent says hello with its replication, learns the seq to resume after
//! (never below the master target's applied seq: see [`resume_seq`]) and
//! streams frames from there. Each frame's header is checked (a possible seq
//! range that continues the stream without a gap), its body hash verified
//! and its records counted against its range (so a frame damaged on the way
//! or built wrong is refused here, where the agent can still resend it,
//! instead of poisoning the cache), it is compressed
//! when that pays, and handed to the replication's writer. The check and
//! compression of up to [`PREPARE_DEPTH`] frames of a stream run at once on
//! blocking threads; frames still reach the writer in stream order, and a
//! refused frame is refused after every frame before it is stored. Answers
//! go back in order, each only after the group commit holding the frame is
//! synced.
//! While the cache is at its cap the stream is not read at all, so the
//! agent's buffer fills and it falls back to bitmap mode.

use crate::cache::{Cache, CacheError, Replication, Reservation};
use crate::forward::Forwarders;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prost::bytes::Bytes;
use rebound_common::frame::FrameRef;
use rebound_common::pki::Role;
use rebound_common::tls;
use rebound_proto::{ingest_request, ingest_response, IngestRequest, IngestResponse};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

/// How long a hello for an empty cache waits to learn the MT's applied seq.
const EMPTY_CACHE_MT_WAIT: Duration = Duration::from_secs(5);
/// How long a hello for a cache that holds records waits to learn it: the
/// cache can answer without it, so the wait is short.
const HELD_CACHE_MT_WAIT: Duration = Duration::from_secs(2);
/// How long a new stream may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Frames read from one stream and not yet answered.
const MAX_PENDING: usize = 32;
/// Frames of one stream checked and compressed at once: one per core of
/// the 2-core reference machine, so zstd is not bound to one core.
const PREPARE_DEPTH: usize = 2;
/// After this many frames in a row that did not shrink, compression is
/// skipped ...
const INCOMPRESSIBLE_RUN: u32 = 4;
/// ... for this many frames, then probed again.
const PROBE_EVERY: u32 = 32;

pub type IngestStream = ReceiverStream<Result<IngestResponse, Status>>;

/// What the ingest streams share.
#[derive(Debug, Clone)]
pub struct IngestContext {
    pub cache: Arc<Cache>,
    pub forwarders: Arc<Forwarders>,
    pub compression_level: i32,
    /// Turns true when the process server shuts down.
    pub stopping: watch::Receiver<bool>,
    /// A configuration server assigns the replications (`[cs] addr` set);
    /// see [`crate::authz`].
    pub managed: bool,
}

/// Adaptive compression: skip zstd while recent frames did not shrink,
/// probing again every `PROBE_EVERY` frames.
#[derive(Debug)]
pub struct Compressor {
    level: i32,
    failures: u32,
    skip: u32,
}

impl Compressor {
    pub fn new(level: i32) -> Compressor {
        Compressor {
            level,
            failures: 0,
            skip: 0,
        }
    }
    /// Whether to try compressing the next frame.
    pub fn should_try(&mut self) -> bool {
        if self.level == 0 {
            return false;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }
    /// Records whether a tried frame shrank.
    pub fn record(&mut self, shrank: bool) {
        if shrank {
            self.failures = 0;
        } else {
            self.failures += 1;
            if self.failures >= INCOMPRESSIBLE_RUN {
                self.skip = PROBE_EVERY;
                // One more failed probe skips again at once.
                self.failures = INCOMPRESSIBLE_RUN - 1;
            }
        }
    }
    pub fn level(&self) -> i32 {
        self.level
    }
}

fn cache_status(e: CacheError) -> Status {
    match e {
        CacheError::BadReplicationId { .. } => Status::invalid_argument(e.to_string()),
        CacheError::WrongMachine { .. } => Status::permission_denied(e.to_string()),
        CacheError::Removed { .. } => Status::failed_precondition(e.to_string()),
        CacheError::Io { .. }
        | CacheError::InfoEncoding { .. }
        | CacheError::WriterThread { .. } => Status::internal(e.to_string()),
    }
}

/// The seq the agent resumes after: the cache's durable seq, never below
/// the MT's applied seq when that is known (the MT skips records up to it
/// as already applied, so a stream resumed below it would lose them).
///
/// A cache that holds nothing (a new replication, or a lost or wiped
/// cache) must learn the MT's applied seq first: answering 0 would restart
/// the agent's stream at seq 1 under records the MT already applied. While
/// the MT cannot be asked the hello is refused as unavailable and the agent
/// retries (it keeps its changes, in its buffer or dirty bitmap). A cache
/// that holds records answers its durable seq when the MT stays silent,
/// but only when it is not below the MT's applied seq last stored on disk
/// (a cache that lost a tail the MT applied is refused the same way).
async fn resume_seq(rep: &Replication) -> Result<u64, Status> {
    let empty = rep.durable() == 0;
    let wait = if empty {
        EMPTY_CACHE_MT_WAIT
    } else {
        HELD_CACHE_MT_WAIT
    };
    let caught_up = tokio::time::timeout(wait, caught_up_with_mt(rep))
        .await
        .is_ok();
    let durable = rep.durable();
    if caught_up {
        return Ok(durable);
    }
    let applied = *rep.applied_watch().borrow();
    match applied {
        None if empty => Err(Status::unavailable(format!(
            "replication {}: this process server holds no record of it and the master target's applied seq for it is not known yet (the master target has not answered within {} s), so the stream cannot resume safely; the agent retries",
            rep.id(),
            wait.as_secs()
        ))),
        None if durable >= rep.applied_stored() => {
            info!(replication = %rep.id(), durable_seq = durable, "the master target's applied seq is not known yet; the agent resumes after the cache's durable seq");
            Ok(durable)
        }
        None => Err(Status::unavailable(format!(
            "replication {}: the cache's durable seq {durable} is below the master target's last known applied seq {} (the cache lost records the master target already applied), and the master target has not answered within {} s, so the stream cannot resume safely; the agent retries",
            rep.id(),
            rep.applied_stored(),
            wait.as_secs()
        ))),
        Some(a) if durable >= a => Ok(durable),
        Some(a) => Err(Status::unavailable(format!(
            "replication {}: the cache (durable seq {durable}) has not yet caught up with the master target's applied seq {a}, so the stream cannot resume safely; the agent retries",
            rep.id()
        ))),
    }
}

/// Resolves once the MT's applied seq is known and the cache's durable seq
/// has caught up with it.
async fn caught_up_with_mt(rep: &Replication) {
    let mut applied = rep.applied_watch();
    let Ok(a) = applied
        .wait_for(|a| a.is_some())
        .await
        .map(|a| a.unwrap_or(0))
    else {
        return;
    };
    let _ = rep.durable_watch().wait_for(|d| *d >= a).await;
}

/// Handles `ProcessServer.Ingest`.
pub async fn ingest(
    ctx: IngestContext,
    request: Request<Streaming<IngestRequest>>,
) -> Result<Response<IngestStream>, Status> {
    let peer = tls::require_role(&request, &[Role::Agent])?;
    let mut inbound = request.into_inner();
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no hello within 30 s"))??;
    let hello = match first {
        Some(IngestRequest {
            msg: Some(ingest_request::Msg::Hello(h)),
        }) => h,
        Some(_) => {
            return Err(Status::invalid_argument(
                "the first message of an ingest stream must be the hello (ReplicationInfo)",
            ))
        }
        None => {
            return Err(Status::cancelled(
                "the agent closed the stream before its hello",
            ))
        }
    };
    crate::authz::check_hello(&ctx, &peer, &hello)?;
    let cache = ctx.cache.clone();
    let h = hello.clone();
    let (rep, created) = tokio::task::spawn_blocking(move || cache.hello(&h))
        .await
        .map_err(|e| Status::internal(format!("cache task failed: {e}")))?
        .map_err(cache_status)?;
    if created {
        info!(replication = %rep.id(), machine = %hello.machine_id, disks = hello.disks.len(), "new replication");
    }
    ctx.forwarders.ensure(&rep);
    let resume = match resume_seq(&rep).await {
        Ok(r) => r,
        Err(status) => {
            warn!(replication = %rep.id(), agent = %peer.id, "agent stream refused: {}", status.message());
            return Err(status);
        }
    };
    let (tx, rx) = mpsc::channel(MAX_PENDING * 2);
    tx.send(Ok(IngestResponse {
        msg: Some(ingest_response::Msg::ResumeSeq(resume)),
    }))
    .await
    .map_err(|_| Status::cancelled("the agent went away"))?;
    info!(
        replication = %rep.id(),
        agent = %peer.id,
        resume_seq = resume,
        "agent stream connected"
    );
    let agent = peer.id.clone();
    tokio::spawn(async move {
        let frames = stream_loop(&ctx, &rep, resume, inbound, tx).await;
        info!(
            replication = %rep.id(),
            agent = %agent,
            durable_seq = rep.durable(),
            frames,
            "agent stream disconnected"
        );
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}

type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, Status>> + Send>>;

/// Reads frames until the agent stops, the stream fails, the cache skips
/// ahead past `resume` (see [`skipped_past`]) or the server shuts down.
/// Returns the number of frames read.
async fn stream_loop(
    ctx: &IngestContext,
    rep: &Arc<Replication>,
    resume: u64,
    mut inbound: Streaming<IngestRequest>,
    tx: mpsc::Sender<Result<IngestResponse, Status>>,
) -> u64 {
    let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
    let mut preparing: FuturesOrdered<Preparing> = FuturesOrdered::new();
    let mut compressor = Compressor::new(ctx.compression_level);
    let received = ctx.forwarders.metrics().received(rep.id());
    let mut stopping = ctx.stopping.clone();
    let account = rep.account().clone();
    let mut position = 0u64;
    let mut acked = 0u64;
    // The last seq this stream has handed on (durable, or on its way to
    // the writer): the next frame must start at most one after it.
    let mut held = rep.durable();
    let mut skipped = rep.skipped_watch();
    // A skip between the hello's answer and now counts too.
    skipped.mark_changed();
    loop {
        let room = pending.len() + preparing.len() < MAX_PENDING && preparing.len() < PREPARE_DEPTH;
        let full = account.is_full();
        tokio::select! {
            biased;
            _ = stopped(&mut stopping) => {
                drain(&mut pending, &tx, &mut acked, &skipped, resume).await;
                let _ = tx
                    .send(Err(Status::unavailable("the process server is shutting down; reconnect and resume")))
                    .await;
                return position;
            }
            Ok(()) = skipped.changed() => {
                let to = *skipped.borrow_and_update();
                if to > resume {
                    refuse(rep, &tx, skipped_past(rep, resume)).await;
                    return position;
                }
            }
            Some(r) = preparing.next(), if !preparing.is_empty() => {
                match store(rep, r, &mut compressor).await {
                    Ok(p) => pending.push_back(p),
                    Err(status) => {
                        drain(&mut pending, &tx, &mut acked, &skipped, resume).await;
                        refuse(rep, &tx, status).await;
                        return position;
                    }
                }
            }
            Some(r) = pending.next(), if !pending.is_empty() => match r {
                Ok(seq) => {
                    if tx.send(Ok(ack(&mut acked, seq))).await.is_err() {
                        return position;
                    }
                }
                Err(status) => {
                    refuse(rep, &tx, status).await;
                    return position;
                }
            },
            _ = account.wait_below_cap(), if room && full => {}
            msg = inbound.message(), if room && !full => match msg {
                Ok(Some(req)) => {
                    position += 1;
                    match admit(rep, req, position, &mut held, &mut compressor, &received) {
                        Ok(p) => preparing.push_back(p),
                        Err(status) => {
                            // The frames before this one are still stored
                            // and answered; a refusal among them wins.
                            let stored = store_all(rep, &mut preparing, &mut pending, &mut compressor).await;
                            let status = stored.err().unwrap_or(status);
                            drain(&mut pending, &tx, &mut acked, &skipped, resume).await;
                            refuse(rep, &tx, status).await;
                            return position;
                        }
                    }
                }
                Ok(None) => {
                    let stored = store_all(rep, &mut preparing, &mut pending, &mut compressor).await;
                    drain(&mut pending, &tx, &mut acked, &skipped, resume).await;
                    if let Err(status) = stored {
                        refuse(rep, &tx, status).await;
                    }
                    return position;
                }
                Err(status) => {
                    debug!(replication = %rep.id(), "agent stream broken: {status}");
                    return position;
                }
            },
        }
    }
}

/// Why a stream ends when the cache skipped ahead past the seq it resumed
/// after: the master target applied seqs this stream's agent has not sent
/// (they came from a cache that was lost since), so the agent's frames at
/// those seqs must not be acknowledged as duplicates. The agent reconnects
/// and resumes after the new seq (its reset path).
fn skipped_past(rep: &Replication, resume: u64) -> Status {
    Status::unavailable(format!(
        "replication {}: the master target has applied up to seq {}, beyond seq {resume} this stream resumed after (the cache skipped ahead to it); the stream ends so the agent reconnects and resumes after the master target's seq",
        rep.id(),
        *rep.skipped_watch().borrow()
    ))
}

/// Resolves once the server shuts down (or its stop signal is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The answer for a frame durable up to `seq`; answers never go back, so
/// a frame answered late by an earlier batch does not lower `acked`.
fn ack(acked: &mut u64, seq: u64) -> IngestResponse {
    *acked = (*acked).max(seq);
    IngestResponse {
        msg: Some(ingest_response::Msg::DurableSeq(*acked)),
    }
}

/// Ends the stream with `status`, logged once at warn.
async fn refuse(
    rep: &Replication,
    tx: &mpsc::Sender<Result<IngestResponse, Status>>,
    status: Status,
) {
    warn!(replication = %rep.id(), code = ?status.code(), "agent stream refused: {}", status.message());
    let _ = tx.send(Err(status)).await;
}

/// Answers every pending frame (the stream is about to end), unless the
/// cache skipped ahead past `resume` meanwhile.
async fn drain(
    pending: &mut FuturesOrdered<Pending>,
    tx: &mpsc::Sender<Result<IngestResponse, Status>>,
    acked: &mut u64,
    skipped: &watch::Receiver<u64>,
    resume: u64,
) {
    while let Some(r) = pending.next().await {
        match r {
            // Not after a skip past `resume` (see `skipped_past`).
            Ok(_) if *skipped.borrow() > resume => return,
            Ok(seq) => {
                if tx.send(Ok(ack(acked, seq))).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// A frame checked (and maybe compressed), ready to be stored in order.
enum Ready {
    /// Already held: answered with this durable seq without touching the
    /// disk.
    Duplicate(u64),
    Frame {
        stored: Bytes,
        first: u64,
        last: u64,
        /// Its length with the body uncompressed.
        plain_len: u64,
        reservation: Reservation,
        /// Whether compression shrank it, when it was tried.
        shrank: Option<bool>,
    },
}

type Preparing = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Ready, Status>> + Send>>;

/// Checks one request's header and starts its hash check and compression
/// on a blocking thread; the returned future resolves when the frame is
/// ready to be stored.
fn admit(
    rep: &Arc<Replication>,
    req: IngestRequest,
    position: u64,
    held: &mut u64,
    compressor: &mut Compressor,
    received: &Counter,
) -> Result<Preparing, Status> {
    let bytes = match req.msg {
        Some(ingest_request::Msg::Frame(b)) => b,
        Some(ingest_request::Msg::Hello(_)) => {
            return Err(Status::invalid_argument(format!(
                "replication {}: a second hello at stream position {position}; one stream carries one replication",
                rep.id()
            )))
        }
        None => {
            return Err(Status::invalid_argument(format!(
                "replication {}: empty message at stream position {position}",
                rep.id()
            )))
        }
    };
    let stats = rep.stats();
    stats.frames_in.fetch_add(1, Ordering::Relaxed);
    stats
        .bytes_in
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    received.inc_by(bytes.len() as u64);
    let durable = rep.durable();
    // The header only: the body stays in the received buffer.
    let frame = FrameRef::parse(&bytes).map_err(|e| {
        Status::invalid_argument(format!(
            "replication {}: frame at stream position {position} (after durable seq {durable}) has a corrupt header: {e}; the frame was refused and nothing of it stored (the agent that built it has a bug: report it; it reconnects and resends from seq {})",
            rep.id(),
            durable + 1
        ))
    })?;
    let (first, last) = (frame.header.first_seq, frame.header.last_seq);
    if frame.header.replication_id != rep.id() {
        return Err(Status::invalid_argument(format!(
            "replication {}: frame at stream position {position} (seq {first}..={last}) belongs to replication {:?}",
            rep.id(),
            frame.header.replication_id
        )));
    }
    if last <= durable {
        stats.frames_duplicate.fetch_add(1, Ordering::Relaxed);
        return Ok(Box::pin(async move { Ok(Ready::Duplicate(durable)) }));
    }
    // The cache may have skipped ahead to the MT's applied seq.
    *held = (*held).max(durable);
    if first > *held + 1 {
        return Err(Status::failed_precondition(format!(
            "replication {}: frame at stream position {position} (seq {first}..={last}) leaves a gap: this stream holds seqs only up to {held}; the frame was refused; resend from seq {next}",
            rep.id(),
            held = *held,
            next = *held + 1
        )));
    }
    *held = (*held).max(last);
    let plain_len =
        (bytes.len() - frame.body.len()) as u64 + u64::from(frame.header.uncompressed_len);

    // Counted against the cap from now on, so frames being prepared or
    // queued for the writer cannot overshoot it.
    let reservation = Reservation::new(rep.account(), bytes.len() as u64);
    let try_compress = compressor.should_try() && !frame.is_compressed();
    let level = compressor.level();
    let rid = rep.id().to_string();
    let task = tokio::task::spawn_blocking(move || {
        check_and_pack(&rid, position, bytes, try_compress, level)
    });
    Ok(Box::pin(async move {
        let (stored, shrank) = task
            .await
            .map_err(|e| Status::internal(format!("frame task failed: {e}")))??;
        Ok(Ready::Frame {
            stored,
            first,
            last,
            plain_len,
            reservation,
            shrank,
        })
    }))
}

/// Hands a prepared frame to the writer (in stream order); the returned
/// future answers with the durable seq once it is synced.
async fn store(
    rep: &Arc<Replication>,
    ready: Result<Ready, Status>,
    compressor: &mut Compressor,
) -> Result<Pending, Status> {
    let (stored, first, last, plain_len, reservation) = match ready? {
        Ready::Duplicate(durable) => return Ok(Box::pin(async move { Ok(durable) })),
        Ready::Frame {
            stored,
            first,
            last,
            plain_len,
            reservation,
            shrank,
        } => {
            if let Some(s) = shrank {
                compressor.record(s);
            }
            (stored, first, last, plain_len, reservation)
        }
    };
    let rx = rep
        .append(stored, first, last, plain_len, reservation.into_writer())
        .await
        .map_err(Status::from)?;
    let rid = rep.id().to_string();
    Ok(Box::pin(async move {
        match rx.await {
            Ok(r) => r.map_err(Status::from),
            Err(_) => Err(Status::unavailable(format!(
                "replication {rid}: the cache writer stopped before the frame was durable; reconnect and resume"
            ))),
        }
    }))
}

/// Stores every frame still being prepared, in order (the stream is about
/// to end); stops at the first refused one and returns its refusal.
async fn store_all(
    rep: &Arc<Replication>,
    preparing: &mut FuturesOrdered<Preparing>,
    pending: &mut FuturesOrdered<Pending>,
    compressor: &mut Compressor,
) -> Result<(), Status> {
    while let Some(r) = preparing.next().await {
        pending.push_back(store(rep, r, compressor).await?);
    }
    Ok(())
}

/// Verifies a frame's body hash and that its records match its seq range,
/// and, when `try_compress`, compresses it.
/// Returns the bytes to store (the received ones when the frame stays
/// raw: no copy) and, when compression was tried, whether it shrank.
fn check_and_pack(
    rid: &str,
    position: u64,
    bytes: Bytes,
    try_compress: bool,
    level: i32,
) -> Result<(Bytes, Option<bool>), Status> {
    let frame = FrameRef::parse(&bytes).map_err(|e| {
        Status::internal(format!(
            "replication {rid}: frame at stream position {position} no longer parses: {e}"
        ))
    })?;
    let (first, last) = (frame.header.first_seq, frame.header.last_seq);
    // The hash, and that the records fill the seq range exactly: a frame
    // claiming more seqs than it holds would move the durable seq past
    // records nobody sent (up to u64::MAX, after which every frame looks
    // like a duplicate).
    if let Err(e) = frame.shared_records(&bytes) {
        return Err(Status::invalid_argument(format!(
            "replication {rid}: frame at stream position {position} (seq {first}..={last}) is corrupt: {e}; the frame was refused and nothing of it stored (the agent resends it when it reconnects; if it is refused again, the agent that built it has a bug: report it)"
        )));
    }
    if !try_compress {
        return Ok((bytes, None));
    }
    match frame.compressed(level) {
        Some(packed) => Ok((Bytes::from(packed), Some(true))),
        None => Ok((bytes, Some(false))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_backs_off_and_reprobes() {
        let mut c = Compressor::new(1);
        for _ in 0..INCOMPRESSIBLE_RUN {
            assert!(c.should_try());
            c.record(false);
        }
        for _ in 0..PROBE_EVERY {
            assert!(!c.should_try());
        }
        // The probe fails: skip again straight away.
        assert!(c.should_try());
        c.record(false);
        assert!(!c.should_try());
        for _ in 1..PROBE_EVERY {
            assert!(!c.should_try());
        }
        // The probe succeeds: compress every frame again.
        assert!(c.should_try());
        c.record(true);
        for _ in 0..10 {
            assert!(c.should_try());
            c.record(true);
        }
        assert!(!Compressor::new(0).should_try());
    }
}
