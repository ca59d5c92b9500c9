//! The configuration server's Admin API for a [`crate::Sites`] lab, in
//! process: a client with the admin certificate `rebound-cs init` wrote,
//! as the operator CLI uses it, and the waits on what it answers (a
//! machine's state, a job's end). For callers that time what the CS does
//! (the bench's failover), where a `rebound` child run would add its
//! start-up to the figure.

use anyhow::{anyhow, bail, Context, Result};
use rebound_common::tls::TlsFiles;
use rebound_proto::control as pb;
use rebound_proto::control::admin_client::AdminClient;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// How often the waits ask the CS.
const POLL: Duration = Duration::from_millis(100);

/// An Admin client of a lab's CS.
pub struct CsAdmin {
    pub admin: AdminClient<Channel>,
}

impl CsAdmin {
    /// Connects to the CS of `sites` with its admin certificate (the CS's
    /// TLS name is its address host).
    pub async fn connect(sites: &crate::Sites) -> Result<CsAdmin> {
        let tls = TlsFiles::in_dir(&sites.cs_dir, "admin");
        let addr = &sites.cs_addr;
        let ch = tls
            .connect(addr, "", rebound_common::pki::Role::Cs)
            .await
            .with_context(|| format!("cannot connect to the CS at {addr}"))?;
        Ok(CsAdmin {
            admin: AdminClient::new(ch),
        })
    }

    /// The CS's record of machine `id`.
    pub async fn machine(&mut self, id: &str) -> Result<pb::MachineInfo> {
        let r = self.admin.machines(pb::MachinesRequest {}).await?;
        r.into_inner()
            .machines
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(|| anyhow!("machine {id} unknown to the CS"))
    }

    /// Waits until machine `id` is in `state`.
    pub async fn wait_state(
        &mut self,
        id: &str,
        state: &str,
        timeout: Duration,
    ) -> Result<pb::MachineInfo> {
        let t0 = Instant::now();
        loop {
            let m = self.machine(id).await?;
            if m.state == state {
                return Ok(m);
            }
            if t0.elapsed() > timeout {
                bail!("{id} is {} after {timeout:?}, not {state}", m.state);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Follows a started job to its end; the job when it succeeded.
    pub async fn finish(&mut self, job: Option<pb::Job>, timeout: Duration) -> Result<pb::Job> {
        let id = job.ok_or_else(|| anyhow!("the CS started no job"))?.id;
        let t0 = Instant::now();
        loop {
            let j = self
                .admin
                .get_job(pb::GetJobRequest { id: id.clone() })
                .await?
                .into_inner();
            match j.state.as_str() {
                "succeeded" => return Ok(j),
                "failed" => bail!("job {id} ({}) failed: {}", j.kind, j.error),
                _ => {}
            }
            if t0.elapsed() > timeout {
                bail!(
                    "job {id} ({}) still {} after {timeout:?}: {}",
                    j.kind,
                    j.state,
                    j.status
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
