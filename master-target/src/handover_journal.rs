//! The failed-over machine's writes (DESIGN.md §7 "Hand-over"): until
//! commit, the machine's agent saves the pre-image of every block before its
//! first write into the hand-over journal, so change-point can stop the
//! machine and put the replica back exactly at the point it was handed over.

use crate::control::MtControl;
use crate::error::{MtError, Result};
use rebound_proto::control as pb;

impl MtControl {
    /// `PowerOff`: stop the machine, fence it, restore its writes.
    pub(crate) fn power_off(&self, c: &pb::PowerOff) -> Result<pb::CommandResult> {
        Err(MtError::FailedPrecondition(format!(
            "PowerOff of {} is not available on this MT yet",
            c.replication_id
        )))
    }
}
