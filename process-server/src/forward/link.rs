//! The link to a master target: its address and mTLS identity, new
//! connections for apply streams, and the proxy for the agents' resync
//! chunk-hash requests over one shared connection (DESIGN.md §6).
//!
//! A connection that fails is reported to the configuration server as an
//! event with its cause and fix ([`rebound_common::link_error`]),
//! rate-limited per link, and `link-restored` once one works again.

use super::error::ForwardError;
use super::MAX_MESSAGE;
use rebound_common::control::ControlHandle;
use rebound_common::link_error::report::LinkReporter;
use rebound_common::link_error::{LinkFailure, Peer};
use rebound_common::pki::Role;
use rebound_common::tls::TlsFiles;
use rebound_proto::master_target_client::MasterTargetClient;
use rebound_proto::{ChunkHashesRequest, ChunkHashesResponse};
use std::sync::Mutex;
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
    /// Tells the configuration server why the MT is unreachable.
    reporter: LinkReporter,
    /// Why the last connection failed, while no later one worked: the
    /// status's `link_error` and the `link_up` gauge.
    failure: Mutex<Option<String>>,
}

impl MtLink {
    pub fn new(tls: TlsFiles, addr: String, server_name: String) -> MtLink {
        MtLink {
            tls,
            addr,
            server_name,
            shared: tokio::sync::Mutex::new(None),
            reporter: LinkReporter::default(),
            failure: Mutex::new(None),
        }
    }

    /// This link, reporting its failures where `other`'s go (the PS's
    /// control channel).
    pub fn reporting_like(mut self, other: &MtLink) -> MtLink {
        self.reporter = other.reporter.sibling();
        self
    }

    /// Sends connection failures to the configuration server from now on.
    pub fn set_events(&self, h: ControlHandle) {
        self.reporter.set_events(h);
    }

    fn peer(&self) -> Peer {
        Peer {
            role: Role::Mt,
            id: String::new(),
            addr: self.addr.clone(),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Why this PS cannot reach the MT now (its cause and what to do),
    /// `None` while connections work.
    pub fn failure(&self) -> Option<String> {
        self.failure_slot().clone()
    }

    fn failure_slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new mTLS connection.
    pub async fn connect(&self) -> Result<Channel, ForwardError> {
        self.connect_for("").await
    }

    /// A new mTLS connection for `replication`'s apply stream; a failure
    /// (or the first success after one) is reported naming it.
    pub async fn connect_for(&self, replication: &str) -> Result<Channel, ForwardError> {
        match self
            .tls
            .connect(&self.addr, &self.server_name, Role::Mt)
            .await
        {
            Ok(channel) => {
                *self.failure_slot() = None;
                self.reporter.report_restored(&self.peer(), replication);
                Ok(channel)
            }
            Err(e) => {
                let failure = LinkFailure::from_error(&e);
                *self.failure_slot() = Some(failure.message(&self.peer()));
                self.reporter
                    .report_failure(&self.peer(), replication, &failure);
                Err(ForwardError::Connect(e))
            }
        }
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
