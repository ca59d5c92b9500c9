//! The demo's operator connection: the configuration server's Admin
//! service with the admin certificate `rebound-cs init` wrote
//! ([`CsAdmin`]), and the waits the story needs on the demo machine (its
//! state, a job's end, a recovery point listed, a component online). In
//! process rather than through `rebound` child runs, so the measured lags
//! and step durations carry no process start-up.

use super::MACHINE;
use anyhow::{bail, Result};
use rebound_lab::{CsAdmin, Sites};
use rebound_proto::control as pb;
use rebound_proto::control::admin_client::AdminClient;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// How long the machine may take to reach a state.
const STATE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a lifecycle job may run.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Cs {
    inner: CsAdmin,
}

impl Cs {
    /// Connects to the lab's CS with its admin certificate.
    pub async fn connect(sites: &Sites) -> Result<Cs> {
        Ok(Cs {
            inner: CsAdmin::connect(sites).await?,
        })
    }

    /// The Admin client, for the lifecycle commands.
    pub fn admin(&mut self) -> &mut AdminClient<Channel> {
        &mut self.inner.admin
    }

    /// Waits until the CS sees component `role` `id` online.
    pub async fn wait_online(&mut self, role: &str, id: &str) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if let Ok(r) = self.admin().status(pb::StatusRequest {}).await {
                if r.into_inner()
                    .components
                    .iter()
                    .any(|c| c.role == role && c.id == id && c.health == "online")
                {
                    return Ok(());
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("{role} {id} not online at the CS within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The demo machine as the CS lists it.
    pub async fn machine(&mut self) -> Result<pb::MachineInfo> {
        self.inner.machine(MACHINE).await
    }

    /// Follows a started job to its end; the job when it succeeded.
    pub async fn finish(&mut self, job: Option<pb::Job>) -> Result<pb::Job> {
        self.inner.finish(job, JOB_TIMEOUT).await
    }

    /// Follows a lifecycle command's job to its end, then waits until the
    /// demo machine is `state`; the machine then.
    pub async fn settle(&mut self, job: Option<pb::Job>, state: &str) -> Result<pb::MachineInfo> {
        self.finish(job).await?;
        self.inner.wait_state(MACHINE, state, STATE_TIMEOUT).await
    }

    /// Waits until the CS lists point `id` of the demo machine.
    pub async fn wait_point(&mut self, id: &str) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let req = pb::PointsRequest {
                machine: MACHINE.into(),
            };
            if let Ok(r) = self.admin().points(req).await {
                if r.into_inner().points.iter().any(|p| p.id == id) {
                    return Ok(());
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("point {id} of {MACHINE} not listed by the CS within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The demo machine as one lifecycle command's targets.
    pub fn targets() -> Option<pb::Targets> {
        Some(pb::Targets {
            machines: vec![MACHINE.into()],
            plan: String::new(),
        })
    }
}
