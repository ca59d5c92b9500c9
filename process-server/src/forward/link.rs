//! The link to a master target: its address and mTLS identity, new
//! connections for apply streams, and the proxy for the agents' resync
//! chunk-hash requests over one shared connection (DESIGN.md §6).

use super::error::ForwardError;
use super::MAX_MESSAGE;
use rebound_common::tls::TlsFiles;
use rebound_proto::master_target_client::MasterTargetClient;
use rebound_proto::{ChunkHashesRequest, ChunkHashesResponse};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Deadline of a proxied chunk-hash request (the MT may wait 60 s itself).
const CHUNK_HASHES_TIMEOUT: Duration = Duration::from_secs(90);

/// How to reach the master target.
#[derive(Debug)]
pub struct MtLink {
    pub(super) tls: TlsFiles,
    pub(super) addr: String,
    pub(super) server_name: String,
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
            .connect(&self.addr, &self.server_name, rebound_common::pki::Role::Mt)
            .await
            .map_err(ForwardError::Connect)
    }

    pub(super) fn client(channel: Channel) -> MasterTargetClient<Channel> {
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
