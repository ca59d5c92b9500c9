//! Which PS may carry a replication (`rebound move`): the MT accepts the
//! new PS's certificate before the agent switches to it.

use crate::control::MtControl;
use crate::error::{MtError, Result};
use rebound_proto::control as pb;

impl MtControl {
    pub(crate) fn set_replication_ps(&self, c: &pb::SetReplicationPs) -> Result<pb::CommandResult> {
        Err(MtError::FailedPrecondition(format!(
            "moving {} to PS {} is not available on this MT yet",
            c.replication_id, c.ps_id
        )))
    }
}
