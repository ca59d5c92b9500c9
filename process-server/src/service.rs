//! The `ProcessServer` gRPC service: wires Ingest, the ChunkHashes proxy and
//! Status to the cache and the forwarders, and enforces who may call what.

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

    /// Agents only, and only for their own machine: the replication's stored
    /// info, or the info sent along, must name the caller's machine.
    async fn chunk_hashes(
        &self,
        request: Request<ChunkHashesRequest>,
    ) -> Result<Response<ChunkHashesResponse>, Status> {
        let peer = tls::require_role(&request, &[Role::Agent])?;
        let req = request.into_inner();
        let rid = &req.replication_id;
        let stored = self.cache().get(rid).and_then(|r| r.info());
        let deny = |machine: &str| {
            Err(Status::permission_denied(format!(
                "certificate {peer} may not ask chunk hashes of replication {rid:?}: it belongs to machine {machine:?}"
            )))
        };
        if let Some(s) = &stored {
            if s.machine_id != peer.id {
                return deny(&s.machine_id);
            }
        }
        match &req.info {
            Some(i) if i.machine_id != peer.id => return deny(&i.machine_id),
            Some(i) if i.replication_id != *rid => {
                return Err(Status::invalid_argument(format!(
                    "chunk hashes for replication {rid:?} carry the info of replication {:?}",
                    i.replication_id
                )))
            }
            None if stored.is_none() => {
                return Err(Status::failed_precondition(format!(
                    "replication {rid:?} is unknown to this process server: send its info with the request, or say hello on the ingest stream first"
                )))
            }
            _ => {}
        }
        let link = self.ctx.forwarders.link_for(rid);
        link.chunk_hashes(req).await.map(Response::new)
    }

    async fn status(
        &self,
        _request: Request<PsStatusRequest>,
    ) -> Result<Response<PsStatusResponse>, Status> {
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
