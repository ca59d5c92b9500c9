//! The `MasterTarget` gRPC service (proto/rebound.proto): the PS's apply
//! stream, chunk hashes for resync, point listings and the admin rollback
//! calls. Authorisation goes by the peer certificate's role (DESIGN.md §3).
//! Blocking storage work runs on the blocking pool. The apply stream is
//! read ahead by its own task (bounded in bytes) so that receiving, TLS and
//! decoding overlap the fsyncs of the apply cycle; acknowledgements are sent
//! only after a cycle is durable (see `apply`).

use crate::error::MtError;
use crate::hashes::WAIT_APPLIED;
use crate::replication::{Replication, Store};
use rebound_common::pki::Role;
use rebound_common::tls::require_role;
use rebound_proto::master_target_server::MasterTarget;
use rebound_proto::{
    apply_request, apply_response, ApplyRequest, ApplyResponse, ChunkHashesRequest,
    ChunkHashesResponse, ListPointsRequest, ListPointsResponse, ReplicationSummary,
    ReplicationsRequest, ReplicationsResponse, RestorePreImagesRequest, RestorePreImagesResponse,
    RollbackRequest, RollbackResponse,
};
use std::sync::Arc;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

/// Roles that may read (list points, replications, hashes).
const READERS: &[Role] = &[Role::Ps, Role::Cs, Role::Admin];
/// Roles that may roll back.
const ADMINS: &[Role] = &[Role::Admin, Role::Cs];

pub struct MtService {
    store: Arc<Store>,
    stop: watch::Receiver<bool>,
}

impl MtService {
    pub fn new(store: Arc<Store>, stop: watch::Receiver<bool>) -> MtService {
        MtService { store, stop }
    }

    fn replication(&self, id: &str) -> Result<Arc<Replication>, Status> {
        self.store.get(id).ok_or_else(|| {
            Status::not_found(format!(
                "this MT has no replication {id:?}; it is created by the process server's first Apply hello"
            ))
        })
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MtError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("storage task failed: {e}")))?
        .map_err(Status::from)
}

/// Frame bytes received ahead of apply, at most: receiving, TLS and
/// decoding go on while a cycle is applied. With the 32 MiB HTTP/2
/// connection window and the decoded cycle, this bounds the MT's memory.
const READ_AHEAD_BYTES: usize = 24 << 20;
/// Messages received ahead of apply, at most.
const READ_AHEAD_MSGS: usize = 1024;
/// Frame bytes applied in one durability cycle, at most: the next cycle's
/// frames keep arriving meanwhile.
const CYCLE_BYTES: usize = 16 << 20;

/// A message received ahead, holding its share of the byte budget until
/// it is applied.
type Ahead = Result<(ApplyRequest, Option<OwnedSemaphorePermit>), Status>;

/// Aborts the read-ahead task when the session ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Pulls messages off the stream into `tx` as long as the byte budget
/// allows. A stream error is passed on and ends the task; so does the end
/// of the stream (by dropping `tx`).
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

/// What ended a gathering of frames, besides the budget or an empty queue.
enum Stop {
    /// A message that is not a frame.
    Other(Option<apply_request::Msg>),
    Error(Status),
}

/// One apply stream: hello → resume_seq, then frames → applied_seq, until
/// the PS closes it, an error, or shutdown (between cycles). A task reads
/// ahead; every cycle applies the frames already received (up to
/// [`CYCLE_BYTES`]) and acknowledges the highest seq once.
async fn apply_session(
    store: Arc<Store>,
    mut stream: Streaming<ApplyRequest>,
    tx: mpsc::Sender<Result<ApplyResponse, Status>>,
    mut stop: watch::Receiver<bool>,
    peer: String,
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
        let store = store.clone();
        let hello = hello.clone();
        blocking(move || store.get_or_create(&hello)).await?
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
    let (ahead_tx, mut ahead) = mpsc::channel::<Ahead>(READ_AHEAD_MSGS);
    let budget = Arc::new(Semaphore::new(READ_AHEAD_BYTES));
    let _reader = AbortOnDrop(tokio::spawn(read_ahead(stream, ahead_tx, budget)));
    let mut acked = resume;
    loop {
        let next = tokio::select! {
            m = ahead.recv() => m,
            _ = stop.wait_for(|s| *s) => {
                info!(replication = %repl.id(), "apply stream closed for shutdown");
                return Ok(());
            }
        };
        let Some(next) = next else {
            info!(replication = %repl.id(), peer = %peer, applied_seq = repl.applied_seq(), "apply stream closed by the process server");
            return Ok(());
        };
        // Gather the frames already here.
        let mut frames = Vec::new();
        let mut permits = Vec::new();
        let mut bytes = 0usize;
        let mut stopped = None;
        let mut item = Some(next);
        while let Some(it) = item.take() {
            match it {
                Ok((msg, permit)) => match msg.msg {
                    Some(apply_request::Msg::Frame(b)) => {
                        bytes += b.len();
                        frames.push(b);
                        permits.extend(permit);
                    }
                    other => {
                        stopped = Some(Stop::Other(other));
                        break;
                    }
                },
                Err(s) => {
                    stopped = Some(Stop::Error(s));
                    break;
                }
            }
            if bytes < CYCLE_BYTES {
                item = ahead.try_recv().ok();
            }
        }
        if !frames.is_empty() {
            let r = repl.clone();
            let (applied, result) = tokio::task::spawn_blocking(move || r.apply_frames(frames))
                .await
                .map_err(|e| Status::internal(format!("storage task failed: {e}")))?;
            drop(permits);
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
                warn!(replication = %repl.id(), code = ?s.code(), error = %s.message(), "frame refused");
                return Err(s);
            }
        }
        match stopped {
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

#[tonic::async_trait]
impl MasterTarget for MtService {
    type ApplyStream = ReceiverStream<Result<ApplyResponse, Status>>;

    async fn apply(
        &self,
        request: Request<Streaming<ApplyRequest>>,
    ) -> Result<Response<Self::ApplyStream>, Status> {
        let who = require_role(&request, &[Role::Ps])?;
        let stream = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let store = self.store.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            if let Err(status) =
                apply_session(store, stream, tx.clone(), stop, who.to_string()).await
            {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn chunk_hashes(
        &self,
        request: Request<ChunkHashesRequest>,
    ) -> Result<Response<ChunkHashesResponse>, Status> {
        require_role(&request, READERS)?;
        let req = request.into_inner();
        let repl = match (self.store.get(&req.replication_id), &req.info) {
            (Some(r), _) => r,
            (None, Some(info)) => {
                let mut info = info.clone();
                if info.replication_id.is_empty() {
                    info.replication_id = req.replication_id.clone();
                }
                if info.replication_id != req.replication_id {
                    return Err(Status::invalid_argument(format!(
                        "ChunkHashes for replication {} carries the info of replication {}",
                        req.replication_id, info.replication_id
                    )));
                }
                let store = self.store.clone();
                blocking(move || store.get_or_create(&info)).await?
            }
            (None, None) => {
                return Err(self
                    .replication(&req.replication_id)
                    .err()
                    .expect("missing"))
            }
        };
        let applied = repl.wait_applied(req.min_applied_seq, WAIT_APPLIED).await?;
        let hashes =
            blocking(move || repl.chunk_hashes(req.disk, req.offset, req.chunk_size, req.count))
                .await?;
        Ok(Response::new(ChunkHashesResponse {
            hashes,
            applied_seq: applied,
        }))
    }

    async fn list_points(
        &self,
        request: Request<ListPointsRequest>,
    ) -> Result<Response<ListPointsResponse>, Status> {
        require_role(&request, READERS)?;
        let repl = self.replication(&request.get_ref().replication_id)?;
        // The replication lock may be held by a long rollback: off the runtime.
        let (points, status) = blocking(move || Ok((repl.points(), repl.status()))).await?;
        Ok(Response::new(ListPointsResponse {
            points: points.iter().map(|p| p.to_proto()).collect(),
            applied_seq: status.applied_seq,
            rolled_back_to: status.rolled_back_to.unwrap_or_default(),
        }))
    }

    async fn replications(
        &self,
        request: Request<ReplicationsRequest>,
    ) -> Result<Response<ReplicationsResponse>, Status> {
        require_role(&request, READERS)?;
        let store = self.store.clone();
        let replications = blocking(move || {
            Ok(store
                .list()
                .iter()
                .map(|r| {
                    let s = r.status();
                    ReplicationSummary {
                        info: Some(r.info()),
                        applied_seq: s.applied_seq,
                        points: s.points as u32,
                        rolled_back_to: s.rolled_back_to.unwrap_or_default(),
                    }
                })
                .collect())
        })
        .await?;
        Ok(Response::new(ReplicationsResponse { replications }))
    }

    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<RollbackResponse>, Status> {
        let who = require_role(&request, ADMINS)?;
        let req = request.into_inner();
        let repl = self.replication(&req.replication_id)?;
        info!(replication = %req.replication_id, point = %req.point, by = %who, "rollback requested");
        let report = blocking(move || repl.rollback(&req.point)).await?;
        Ok(Response::new(RollbackResponse {
            point: Some(report.point.to_proto()),
            blocks_restored: report.blocks_restored,
            undo_bytes: report.undo_bytes,
        }))
    }

    async fn restore_pre_images(
        &self,
        request: Request<RestorePreImagesRequest>,
    ) -> Result<Response<RestorePreImagesResponse>, Status> {
        let who = require_role(&request, ADMINS)?;
        let repl = self.replication(&request.get_ref().replication_id)?;
        info!(replication = %repl.id(), by = %who, "restore pre-images requested");
        let blocks_restored = blocking(move || repl.restore_pre_images()).await?;
        Ok(Response::new(RestorePreImagesResponse { blocks_restored }))
    }
}
