//! Why the cache refused a replication or a frame. Kept apart from the code
//! that raises them so the ingest stream and the control channel can map
//! each cause to its gRPC status or command result without reaching into
//! the writer.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;

/// Why the cache could not open, create, describe or remove a replication.
#[derive(Debug, Error)]
pub enum CacheError {
    #[error("cache {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("invalid replication id {id:?}: {why}")]
    BadReplicationId { id: String, why: &'static str },
    #[error("replication {replication} belongs to machine {stored}, not to machine {claimed}")]
    WrongMachine {
        replication: String,
        stored: String,
        claimed: String,
    },
    #[error("cache {path}: cannot encode the agent's hello: {source}")]
    InfoEncoding {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("replication {replication}: cannot start the cache writer thread: {source}")]
    WriterThread {
        replication: String,
        source: io::Error,
    },
    #[error("{}", removed_message(.replication))]
    Removed { replication: String },
}

/// Why a removed replication's frames and hellos are refused, and what to do.
fn removed_message(replication: &str) -> String {
    format!(
        "replication {replication} was removed from this process server (the machine was \
         unprotected or moved to another process server), so its frames are refused: stop \
         streaming it; to protect the machine again, run `rebound protect`"
    )
}

/// The adapter for `map_err` on I/O at `path`.
pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Why a frame was not appended. Every variant means "not acknowledged".
#[derive(Debug, Clone, Error)]
pub enum AppendError {
    #[error("replication {replication}: the frame starts at seq {first_seq} but the cache holds seqs only up to {held}; resend from seq {next}", next = held + 1)]
    Gap {
        replication: String,
        first_seq: u64,
        held: u64,
    },
    #[error("replication {}: cannot write the cache: segment {}: {}", .0.replication, .0.segment.display(), .0.source)]
    Io(SegmentFailure),
    #[error("replication {}: cannot write the cache: a failed write to segment {} could not be undone ({}); restart the process server to recover the cache", .0.replication, .0.segment.display(), .0.source)]
    Broken(SegmentFailure),
    #[error("replication {replication}: the cache writer has stopped (the process server is shutting down)")]
    Closed { replication: String },
    #[error("{}", removed_message(.replication))]
    Removed { replication: String },
}

/// A write or sync of a replication's newest segment that failed.
#[derive(Debug, Clone)]
pub struct SegmentFailure {
    pub replication: String,
    pub segment: PathBuf,
    /// Shared, so every frame of the failed batch gets the same answer.
    pub source: Arc<io::Error>,
}

impl From<AppendError> for tonic::Status {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Gap { .. } => tonic::Status::failed_precondition(e.to_string()),
            AppendError::Io(_) | AppendError::Broken(_) => tonic::Status::internal(e.to_string()),
            AppendError::Closed { .. } => tonic::Status::unavailable(e.to_string()),
            AppendError::Removed { .. } => tonic::Status::failed_precondition(e.to_string()),
        }
    }
}
