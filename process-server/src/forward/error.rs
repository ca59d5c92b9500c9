//! Why an apply stream to the master target ended. The forwarder logs it
//! and reconnects; [`ForwardError::is_severe`] tells the errors that a quick
//! retry cannot fix.

use crate::cache::ReadError;
use rebound_common::tls::{error_chain, TlsError};
use rebound_proto::ApplyResponse;
use thiserror::Error;
use tonic::{Code, Status};

#[derive(Debug, Error)]
pub enum ForwardError {
    #[error("cannot connect: {}", error_chain(.0))]
    Connect(TlsError),
    #[error("the master target refused: {0}")]
    Refused(Status),
    #[error(
        "the master target broke the protocol: its first answer must be resume_seq, got {0:?}"
    )]
    NoResumeSeq(Box<ApplyResponse>),
    #[error("the master target closed the apply stream")]
    Ended,
    #[error("the apply stream broke")]
    Broken,
    #[error("cannot read the cache: {0}")]
    Cache(#[from] ReadError),
    #[error("cannot read the cache: its read task failed: {0}")]
    ReadTask(tokio::task::JoinError),
}

impl ForwardError {
    /// Errors that retrying soon cannot fix.
    pub fn is_severe(&self) -> bool {
        match self {
            ForwardError::Refused(s) => matches!(s.code(), Code::InvalidArgument | Code::DataLoss),
            ForwardError::Cache(_) | ForwardError::ReadTask(_) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_refusals_are_not_retried_quickly() {
        assert!(ForwardError::Refused(Status::data_loss("hash")).is_severe());
        assert!(ForwardError::Refused(Status::invalid_argument("header")).is_severe());
        assert!(ForwardError::Cache(ReadError::Gap { need: 1, have: 5 }).is_severe());
        assert!(!ForwardError::Refused(Status::unavailable("down")).is_severe());
        let refused = TlsError::Connect {
            addr: "mt:1".into(),
            message: "refused".into(),
        };
        assert!(!ForwardError::Connect(refused).is_severe());
        assert!(!ForwardError::Ended.is_severe());
    }
}
