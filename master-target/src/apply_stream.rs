//! One `Apply` stream from the PS (DESIGN.md §6-7), as three stages that
//! overlap, so the CPU work of one cycle runs during the fsyncs of another:
//! 1. **read ahead** (a task): messages come off the stream while the byte
//!    budget allows, so receiving and TLS go on meanwhile;
//! 2. **prepare** (a task, each frame on a blocking thread): every frame is
//!    parsed, its hash verified and its body decompressed into records
//!    (`Replication::prepare_frame`), in batches of at most
//!    [`CYCLE_BYTES`] of record data;
//! 3. **apply** (the session): the prepared batches ready so far go through
//!    one durability cycle (`Replication::apply_prepared`), and only then is
//!    the highest applied seq acknowledged. A cycle that runs out of disk
//!    space waits for space and is retried (`disk_full`) with the stream
//!    open and nothing more acknowledged.
//!
//! Frames keep their stream order through every stage, and a refused frame
//! stops the stream where it is: the frames before it are applied and
//! acknowledged, nothing of it or after it is.

use crate::apply::Prepared;
use crate::error::MtError;
use crate::replication::{Replication, Store};
use crate::service::blocking;
use rebound_common::pki::PeerIdentity;
use rebound_proto::{apply_request, apply_response, ApplyRequest, ApplyResponse};
use std::sync::Arc;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tonic::{Status, Streaming};
use tracing::{info, warn};

/// Frame bytes received and not yet prepared, at most: with the 32 MiB
/// HTTP/2 connection window and the prepared batches, this bounds the
/// stream's memory.
const READ_AHEAD_BYTES: usize = 24 << 20;
/// Messages received and not yet prepared, at most.
const READ_AHEAD_MSGS: usize = 1024;
/// Record data of one prepared batch, at most (one frame more). One batch
/// is applied, one waits and one is prepared, at most: their decoded data
/// is bounded by three times this.
const CYCLE_BYTES: usize = 16 << 20;

/// A message received ahead, holding its share of the byte budget until
/// it is prepared.
type Ahead = Result<(ApplyRequest, Option<OwnedSemaphorePermit>), Status>;

/// What ended a stream, besides the PS closing it.
enum Stop {
    /// A message that is not a frame.
    Other(Option<apply_request::Msg>),
    Error(Status),
}

/// Frames prepared in stream order, and what came after them if it ends
/// the stream.
#[derive(Default)]
struct Batch {
    frames: Vec<Result<Prepared, MtError>>,
    data_bytes: usize,
    stop: Option<Stop>,
}

/// Aborts a stage's task when the session ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Stage 1: pulls messages off the stream into `tx` as long as the byte
/// budget allows. A stream error is passed on and ends the task; so does
/// the end of the stream (by dropping `tx`).
async fn read_ahead(
    mut stream: Streaming<ApplyRequest>,
    tx: mpsc::Sender<Ahead>,
    budget: Arc<Semaphore>,
) {
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(s) => {
                let _ = tx.send(Err(s)).await;
                return;
            }
        };
        let n = match &msg.msg {
            Some(apply_request::Msg::Frame(b)) => b.len().clamp(1, READ_AHEAD_BYTES),
            _ => 0,
        };
        let permit = if n > 0 {
            match budget.clone().acquire_many_owned(n as u32).await {
                Ok(p) => Some(p),
                Err(_) => return,
            }
        } else {
            None
        };
        if tx.send(Ok((msg, permit))).await.is_err() {
            return;
        }
    }
}

/// Stage 2: prepares the frames already received, one batch at a time, and
/// hands each batch on in order. A batch that ends the stream (a refused
/// frame, an error, a message that is not a frame) is the last; the end of
/// the stream drops `tx`.
async fn prepare_ahead(
    repl: Arc<Replication>,
    mut ahead: mpsc::Receiver<Ahead>,
    tx: mpsc::Sender<Batch>,
) {
    while let Some(first) = ahead.recv().await {
        let mut batch = Batch::default();
        // A refused frame or a stop ends the stream: nothing after it is
        // prepared.
        let mut end = false;
        let mut item = Some(first);
        while let Some(it) = item.take() {
            match it {
                Ok((msg, permit)) => match msg.msg {
                    Some(apply_request::Msg::Frame(bytes)) => {
                        let r = repl.clone();
                        let p = tokio::task::spawn_blocking(move || r.prepare_frame(&bytes)).await;
                        drop(permit);
                        match p {
                            Ok(p) => {
                                end = p.is_err();
                                batch.data_bytes += p.as_ref().map_or(0, Prepared::data_bytes);
                                batch.frames.push(p);
                            }
                            Err(e) => {
                                end = true;
                                batch.stop = Some(Stop::Error(Status::internal(format!(
                                    "replication {}: the task verifying a frame failed ({e}); nothing of it was applied, and the process server resends it on its next stream",
                                    repl.id()
                                ))))
                            }
                        }
                    }
                    other => {
                        end = true;
                        batch.stop = Some(Stop::Other(other));
                    }
                },
                Err(s) => {
                    end = true;
                    batch.stop = Some(Stop::Error(s));
                }
            }
            if !end && batch.data_bytes < CYCLE_BYTES {
                item = ahead.try_recv().ok();
            }
        }
        if tx.send(batch).await.is_err() || end {
            return;
        }
    }
}

/// The frames before the first refused one, and that refusal (nothing
/// after it is applied).
fn split_at_refusal(frames: Vec<Result<Prepared, MtError>>) -> (Vec<Prepared>, Option<MtError>) {
    let mut ok = Vec::with_capacity(frames.len());
    for f in frames {
        match f {
            Ok(p) => ok.push(p),
            Err(e) => return (ok, Some(e)),
        }
    }
    (ok, None)
}

/// One apply stream: hello → resume_seq, then frames → applied_seq, until
/// the PS closes it, an error, or shutdown (between cycles). Every cycle
/// applies the batches prepared so far (each up to [`CYCLE_BYTES`]) and
/// acknowledges the highest seq once.
pub(crate) async fn apply_session(
    store: Arc<Store>,
    mut stream: Streaming<ApplyRequest>,
    tx: mpsc::Sender<Result<ApplyResponse, Status>>,
    mut stop: watch::Receiver<bool>,
    peer: PeerIdentity,
    managed: bool,
) -> Result<(), Status> {
    let first = tokio::select! {
        m = stream.message() => m?,
        _ = stop.wait_for(|s| *s) => return Ok(()),
    };
    let Some(first) = first else {
        return Ok(());
    };
    let Some(apply_request::Msg::Hello(hello)) = first.msg else {
        return Err(Status::invalid_argument(
            "the first message of an Apply stream must be a hello naming the replication",
        ));
    };
    let repl = {
        let (store, hello, peer) = (store.clone(), hello.clone(), peer.clone());
        blocking(move || crate::authz::for_apply(&store, &hello, &peer, managed)).await?
    };
    let resume = repl.applied_seq();
    info!(replication = %repl.id(), peer = %peer, resume_seq = resume, "apply stream opened");
    let send = |m| ApplyResponse { msg: Some(m) };
    if tx
        .send(Ok(send(apply_response::Msg::ResumeSeq(resume))))
        .await
        .is_err()
    {
        return Ok(());
    }
    let (ahead_tx, ahead) = mpsc::channel::<Ahead>(READ_AHEAD_MSGS);
    let budget = Arc::new(Semaphore::new(READ_AHEAD_BYTES));
    let _reader = AbortOnDrop(tokio::spawn(read_ahead(stream, ahead_tx, budget)));
    let (prepared_tx, mut prepared) = mpsc::channel::<Batch>(1);
    let _preparer = AbortOnDrop(tokio::spawn(prepare_ahead(
        repl.clone(),
        ahead,
        prepared_tx,
    )));
    let mut acked = resume;
    // Another PS's stream may apply this replication too (`rebound move`):
    // its progress is acknowledged here as well, so this PS's cache skips
    // ahead and its agent can resume after it.
    let mut elsewhere = repl.subscribe_applied();
    loop {
        let next = tokio::select! {
            m = prepared.recv() => Ok(m),
            _ = stop.wait_for(|s| *s) => {
                info!(replication = %repl.id(), "apply stream closed for shutdown");
                return Ok(());
            }
            Ok(()) = elsewhere.changed() => Err(*elsewhere.borrow_and_update()),
        };
        let next = match next {
            Ok(n) => n,
            Err(applied) => {
                if applied > acked {
                    acked = applied;
                    let m = send(apply_response::Msg::AppliedSeq(applied));
                    if tx.send(Ok(m)).await.is_err() {
                        return Ok(());
                    }
                }
                continue;
            }
        };
        let Some(mut batch) = next else {
            info!(replication = %repl.id(), peer = %peer, applied_seq = repl.applied_seq(), "apply stream closed by the process server");
            return Ok(());
        };
        // One cycle for every batch already prepared.
        while batch.stop.is_none() {
            let Ok(more) = prepared.try_recv() else {
                break;
            };
            batch.frames.extend(more.frames);
            batch.stop = more.stop;
        }
        if !batch.frames.is_empty() {
            let r = repl.clone();
            let (frames, refused) = split_at_refusal(std::mem::take(&mut batch.frames));
            let ended = {
                let (stop, tx) = (stop.clone(), tx.clone());
                move || *stop.borrow() || tx.is_closed()
            };
            let (applied, result) = tokio::task::spawn_blocking(move || {
                let (applied, r) = r.apply_waiting_for_space(frames, &ended);
                (applied, r.and(refused.map_or(Ok(()), Err)))
            })
            .await
            .map_err(|e| {
                Status::internal(format!(
                    "replication {}: the storage task applying frames failed ({e}); nothing more was acknowledged, and the process server resends from the applied seq on its next stream",
                    repl.id()
                ))
            })?;
            if result.is_ok() || applied > acked {
                acked = acked.max(applied);
                if tx
                    .send(Ok(send(apply_response::Msg::AppliedSeq(applied))))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            if let Err(e) = result {
                let s = Status::from(e);
                warn!(replication = %repl.id(), peer = %peer, code = ?s.code(), error = %s.message(), "frame refused");
                return Err(s);
            }
        }
        match batch.stop {
            None => {}
            Some(Stop::Error(s)) => return Err(s),
            Some(Stop::Other(Some(apply_request::Msg::Hello(_)))) => {
                return Err(Status::invalid_argument(format!(
                    "replication {}: a second hello on one Apply stream; open a new stream instead",
                    repl.id()
                )))
            }
            Some(Stop::Other(_)) => return Err(Status::invalid_argument("empty Apply message")),
        }
    }
}
