//! The `ProcessServer` gRPC service: wires Ingest, the ChunkHashes proxy and
//! Status to the cache and the forwarders, and enforces who may call what.

use crate::authz;
use crate::cache::Cache;
use crate::ingest::{self, IngestContext, IngestStream};
use rebound_common::pki::Role;
use rebound_common::tls;
use rebound_proto::process_server_server::ProcessServer;
use rebound_proto::{
    ChunkHashesRequest, ChunkHashesResponse, IngestRequest, PsReplicationStatus, PsStatusRequest,
    PsStatusResponse,
};
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

/// Roles that may read the PS's Status.
const STATUS_READERS: &[Role] = &[Role::Admin, Role::Cs];

#[derive(Debug, Clone)]
pub struct PsService {
    ctx: IngestContext,
}

impl PsService {
    pub fn new(ctx: IngestContext) -> PsService {
        PsService { ctx }
    }
    fn cache(&self) -> &Arc<Cache> {
        &self.ctx.cache
    }
}

#[tonic::async_trait]
impl ProcessServer for PsService {
    type IngestStream = IngestStream;

    async fn ingest(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        ingest::ingest(self.ctx.clone(), request).await
    }

    /// Agents only, for their own machine's replication, at the protocol's
    /// chunk sizes (see [`authz::check_chunk_hashes`]).
    async fn chunk_hashes(
        &self,
        request: Request<ChunkHashesRequest>,
    ) -> Result<Response<ChunkHashesResponse>, Status> {
        let peer = tls::require_role(&request, &[Role::Agent])?;
        let req = request.into_inner();
        authz::check_chunk_hashes(&self.ctx, &peer, &req)?;
        let link = self.ctx.forwarders.link_for(&req.replication_id);
        link.chunk_hashes(req).await.map(Response::new)
    }

    /// The operator's (and the CS's) view of the cache: an agent may not
    /// learn which replications this PS carries.
    async fn status(
        &self,
        request: Request<PsStatusRequest>,
    ) -> Result<Response<PsStatusResponse>, Status> {
        tls::require_role(&request, STATUS_READERS)?;
        let replications = self
            .cache()
            .replications()
            .iter()
            .map(|r| PsReplicationStatus {
                replication_id: r.id().to_string(),
                durable_seq: r.durable(),
                applied_seq: r.applied(),
                cache_bytes: r.cache_bytes(),
            })
            .collect();
        let account = self.cache().account();
        Ok(Response::new(PsStatusResponse {
            replications,
            cache_bytes: account.total(),
            cache_limit: account.cap(),
        }))
    }
}
