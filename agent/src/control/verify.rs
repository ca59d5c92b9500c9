//! `rebound verify` at the agent: hash the source as it was at a verify tag
//! without stopping writes, compare with the MT's view of the same point,
//! and optionally resend the chunks that differ through the change stream.

use super::Runtime;
use rebound_common::control::err_result;
use rebound_proto::control::{CommandResult, Verify};

impl Runtime {
    pub(super) async fn verify(&self, v: &Verify) -> CommandResult {
        err_result(format!(
            "verify of replication {} is not available in this agent yet",
            v.replication_id
        ))
    }
}
