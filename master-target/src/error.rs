//! Errors of the master target library and their gRPC status codes.
//!
//! One error type for every operation so the gRPC layer maps each failure to
//! the right status code in one place (`From<MtError> for Status`). Messages
//! name the replication, disk, offset or point involved and what to do.

use crate::retention_journal::JournalError;
use crate::storage::Target;
use std::path::PathBuf;
use thiserror::Error;
use tonic::Status;

#[derive(Debug, Error)]
pub enum MtError {
    /// An unknown replication, disk or recovery point.
    #[error("{0}")]
    NotFound(String),
    /// A request or frame that can never succeed as sent.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller's certificate may not do this to this replication.
    #[error("{0}")]
    PermissionDenied(String),
    /// The replication is not in a state that allows this (rolled back,
    /// a seq gap, a mismatching hello).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Corrupt data: a frame whose hash does not match, a damaged journal.
    #[error("{0}")]
    DataLoss(String),
    /// Try again later (waiting for applied seq timed out).
    #[error("{0}")]
    Unavailable(String),
    /// A filesystem operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The retention journal failed (see [`JournalError`]).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// An fdatasync failed: what the device holds is unknown, and the
    /// replication is poisoned (see [`MtError::Poisoned`]).
    #[error("fdatasync of {} {path} failed: {source}", target.as_str())]
    Sync {
        target: Target,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An earlier fdatasync of this replication failed, so it applies
    /// nothing more until the MT restarts and recovers it from the disk.
    #[error("replication {replication} refuses to apply: {cause}; what the disk holds is unknown, so nothing more is applied: check the disk (kernel log, SMART), then restart rebound-mt, which recovers the replication from what is on disk")]
    Poisoned { replication: String, cause: String },
    /// A blocking task of the MT panicked or was cancelled.
    #[error("{what} failed: {source}; see the log for the panic, then restart rebound-mt")]
    TaskFailed {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// The gRPC server stopped with an error.
    #[error("gRPC server on {addr} failed: {source}")]
    Server {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// `metrics_listen` cannot be served (a bad address, a port in use).
    #[error(transparent)]
    Metrics(#[from] rebound_common::metrics::MetricsError),
    /// The replication is being closed (the MT shuts down) while a request
    /// waited for it.
    #[error("replication {replication} is shutting down")]
    ShuttingDown { replication: String },
}

impl MtError {
    /// Whether this is a failed fdatasync, after which the replication must
    /// not trust its files until it is reopened.
    pub fn is_failed_sync(&self) -> bool {
        matches!(
            self,
            MtError::Sync { .. } | MtError::Journal(JournalError::Sync { .. })
        )
    }

    /// Whether a write failed for want of space (ENOSPC, or EDQUOT for a
    /// quota): apply waits for space and retries instead of failing. A
    /// failed fdatasync is not one of these even with ENOSPC: what the disk
    /// holds is then unknown (see [`MtError::is_failed_sync`]).
    pub fn is_no_space(&self) -> bool {
        if self.is_failed_sync() {
            return false;
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
                    return true;
                }
            }
            cause = e.source();
        }
        false
    }

    /// Wraps an IO error with a description of what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> MtError {
        MtError::Io {
            what: what.into(),
            source,
        }
    }
}

/// `map_err(io_err(|| format!(...)))` shorthand.
pub(crate) fn io_err<F: FnOnce() -> String>(what: F) -> impl FnOnce(std::io::Error) -> MtError {
    move |source| MtError::Io {
        what: what(),
        source,
    }
}

impl From<MtError> for Status {
    fn from(e: MtError) -> Status {
        let msg = e.to_string();
        match e {
            MtError::NotFound(_) => Status::not_found(msg),
            MtError::InvalidArgument(_) => Status::invalid_argument(msg),
            MtError::PermissionDenied(_) => Status::permission_denied(msg),
            MtError::FailedPrecondition(_) => Status::failed_precondition(msg),
            MtError::DataLoss(_)
            | MtError::Journal(JournalError::Record { .. })
            | MtError::Journal(JournalError::Damaged { .. }) => Status::data_loss(msg),
            MtError::Unavailable(_) | MtError::Poisoned { .. } => Status::unavailable(msg),
            MtError::Io { .. }
            | MtError::Journal(_)
            | MtError::Sync { .. }
            | MtError::TaskFailed { .. }
            | MtError::Server { .. }
            | MtError::Metrics(_)
            | MtError::ShuttingDown { .. } => Status::internal(msg),
        }
    }
}

pub type Result<T, E = MtError> = std::result::Result<T, E>;
