//! The error type of the configuration server library and its gRPC mapping.
//!
//! One error for every operation so the gRPC layer maps each failure to the
//! right status code in one place (`From<CsError> for Status`). Messages name
//! the machine, component, job or file involved and say what to do.

use crate::store::StoreError;
use thiserror::Error;
use tonic::Status;

#[derive(Debug, Error)]
pub enum CsError {
    /// An unknown machine, component, job, plan, group or point.
    #[error("{0}")]
    NotFound(String),
    /// A request that can never succeed as sent.
    #[error("{0}")]
    InvalidArgument(String),
    /// The state does not allow this now (wrong replication state, wrong
    /// direction, no recovery point, a second agent).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not do this (wrong certificate role, wrong passphrase).
    #[error("{0}")]
    PermissionDenied(String),
    /// A component did not answer or is offline.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Certificates could not be made or parsed.
    #[error("{0}")]
    Pki(String),
    /// The metrics endpoint could not start (`metrics_listen`).
    #[error(transparent)]
    Metrics(#[from] rebound_common::metrics::MetricsError),
    /// The CA key sealed in the store does not open (`[store]
    /// secret_key_file`).
    #[error(transparent)]
    Seal(#[from] crate::ca_seal::SealError),
    /// The store lease of a CS on PostgreSQL could not be taken, or was lost.
    #[error(transparent)]
    Lease(#[from] crate::lease::LeaseError),
    /// Anything else (a bug, a failed task).
    #[error("{0}")]
    Internal(String),
}

impl CsError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> CsError {
        CsError::Io {
            what: what.into(),
            source,
        }
    }
}

impl CsError {
    /// The gRPC status code this failure is answered with.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            CsError::NotFound(_) => Code::NotFound,
            CsError::InvalidArgument(_) => Code::InvalidArgument,
            CsError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsError::PermissionDenied(_) => Code::PermissionDenied,
            CsError::Unavailable(_) => Code::Unavailable,
            CsError::AlreadyExists(_) => Code::AlreadyExists,
            CsError::Store(_)
            | CsError::Io { .. }
            | CsError::Pki(_)
            | CsError::Metrics(_)
            | CsError::Seal(_)
            | CsError::Lease(_)
            | CsError::Internal(_) => Code::Internal,
        }
    }
}

impl From<CsError> for Status {
    fn from(e: CsError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// Lets a gRPC handler use `?` on a store call: a database failure is
/// answered as `INTERNAL`.
impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        CsError::Store(e).into()
    }
}
