//! The `MasterTarget` gRPC service (proto/rebound.proto): the PS's apply
//! stream, chunk hashes for resync (of the replica) and verify (of a
//! point's view), point listings and the admin rollback
//! calls. Authorisation goes by the peer certificate's role (DESIGN.md §3).
//! Blocking storage work runs on the blocking pool. The apply stream itself
//! is in `apply_stream`.

use crate::apply_stream::apply_session;
use crate::authz;
use crate::error::MtError;
use crate::hashes::WAIT_APPLIED;
use crate::replication::{Replication, Store};
use rebound_common::limits;
use rebound_common::pki::Role;
use rebound_common::tls::require_role;
use rebound_proto::master_target_server::MasterTarget;
use rebound_proto::{
    ApplyRequest, ApplyResponse, ChunkHashesRequest, ChunkHashesResponse, ListPointsRequest,
    ListPointsResponse, RecoveryPoint, ReplicationSummary, ReplicationsRequest,
    ReplicationsResponse, RestorePreImagesRequest, RestorePreImagesResponse, RollbackRequest,
    RollbackResponse,
};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

/// Roles that may read (list points, replications, hashes).
const READERS: &[Role] = &[Role::Ps, Role::Cs, Role::Admin];
/// Roles that may roll back.
const ADMINS: &[Role] = &[Role::Admin, Role::Cs];

pub struct MtService {
    store: Arc<Store>,
    stop: watch::Receiver<bool>,
    /// A configuration server prepares the replications and assigns their
    /// PS (`[cs] addr` set); see [`crate::authz`].
    managed: bool,
}

impl MtService {
    pub fn new(store: Arc<Store>, stop: watch::Receiver<bool>, managed: bool) -> MtService {
        MtService {
            store,
            stop,
            managed,
        }
    }

    fn replication(&self, id: &str) -> Result<Arc<Replication>, Status> {
        self.store.get(id).ok_or_else(|| {
            Status::not_found(format!(
                "this MT has no replication {id:?}; it is created by the process server's first Apply hello"
            ))
        })
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MtError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("storage task failed: {e}")))?
        .map_err(Status::from)
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
        let (stop, managed) = (self.stop.clone(), self.managed);
        tokio::spawn(async move {
            if let Err(status) = apply_session(store, stream, tx.clone(), stop, who, managed).await
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
        let who = require_role(&request, READERS)?;
        let req = request.into_inner();
        limits::check_chunk_size(&req.replication_id, req.chunk_size)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let repl = {
            let (store, managed) = (self.store.clone(), self.managed);
            let (id, info) = (req.replication_id.clone(), req.info.clone());
            blocking(move || authz::for_chunk_hashes(&store, &id, info.as_ref(), &who, managed))
                .await?
        };
        let applied = repl.wait_applied(req.min_applied_seq, WAIT_APPLIED).await?;
        let hashes = if req.point_id.is_empty() {
            blocking(move || repl.chunk_hashes(req.disk, req.offset, req.chunk_size, req.count))
                .await?
        } else {
            repl.wait_point(&req.point_id, req.min_applied_seq, WAIT_APPLIED)
                .await?;
            blocking(move || {
                repl.chunk_hashes_at_point(
                    &req.point_id,
                    req.disk,
                    req.offset,
                    req.chunk_size,
                    req.count,
                )
            })
            .await?
        };
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
        let (points, status) =
            blocking(move || Ok((repl.points_with_damage(), repl.status()))).await?;
        Ok(Response::new(ListPointsResponse {
            points: points
                .iter()
                .map(|(p, damaged)| RecoveryPoint {
                    damaged: damaged.clone(),
                    ..p.to_proto()
                })
                .collect(),
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
