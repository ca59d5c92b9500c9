//! The retention step of protect and reprotect: the MT learns the
//! replication's retention (its policy) before the agent starts streaming,
//! so the first recovery points are already kept as the operator asked.

use super::Lifecycle;
use crate::bus::ComponentKey;
use crate::error::CsError;
use crate::fleet::policy::retention_cmd;

impl Lifecycle {
    /// Sends the MT the retention of the machine's current replication; a
    /// policy without a retention of its own leaves the MT's default and
    /// sends nothing.
    pub(super) async fn set_retention(&self, machine: &str) -> Result<(), CsError> {
        let (_, r) = self.state_of(machine).await?;
        let Some(r) = r.filter(|r| r.policy.has_retention()) else {
            return Ok(());
        };
        let cmd = retention_cmd(&r.id, &r.policy);
        self.bus
            .send(ComponentKey::mt(&r.mt), cmd, self.settings.command_timeout)
            .await?;
        Ok(())
    }
}
