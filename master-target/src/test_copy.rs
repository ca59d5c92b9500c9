//! Test failover (DESIGN.md §7 views): a writable copy-on-write view of a
//! pinned point, served over NBD, while replication goes on.

use crate::control::MtControl;
use crate::error::{MtError, Result};
use rebound_proto::control as pb;

impl MtControl {
    pub(crate) fn start_test_failover(
        &self,
        c: &pb::StartTestFailover,
    ) -> Result<pb::CommandResult> {
        Err(MtError::FailedPrecondition(format!(
            "test failover of {} is not available on this MT yet",
            c.replication_id
        )))
    }

    pub(crate) fn end_test_failover(&self, c: &pb::EndTestFailover) -> Result<pb::CommandResult> {
        Err(MtError::FailedPrecondition(format!(
            "test failover cleanup of {} is not available on this MT yet",
            c.replication_id
        )))
    }
}
