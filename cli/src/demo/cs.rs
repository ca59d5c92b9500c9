//! The demo's operator connection: the configuration server's Admin
//! service with the admin certificate `rebound-cs init` wrote, as the
//! operator CLI uses it, and the waits the story needs (a machine's state,
//! a job's end, a recovery point listed, a component online). In process
//! rather than through `rebound` child runs, so the measured lags and step
//! durations carry no process start-up.

use super::MACHINE;
use crate::operator::{connect, CsArgs};
use anyhow::{anyhow, bail, Result};
use rebound_proto::control as pb;
use rebound_proto::control::admin_client::AdminClient;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub struct Cs {
    pub admin: AdminClient<Channel>,
}

impl Cs {
    /// Connects to the CS at `addr` with the admin certificate in `certs`;
    /// retries until it answers a status request (30 s).
    pub async fn connect(addr: &str, certs: &Path) -> Result<Cs> {
        let args = CsArgs {
            cs: Some(addr.to_string()),
            certs: Some(certs.to_path_buf()),
        };
        let t0 = Instant::now();
        loop {
            if let Ok(mut admin) = connect(&args).await {
                if admin.status(pb::StatusRequest {}).await.is_ok() {
                    return Ok(Cs { admin });
                }
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the configuration server at {addr} did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the CS sees component `role` `id` online.
    pub async fn wait_online(&mut self, role: &str, id: &str) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if let Ok(r) = self.admin.status(pb::StatusRequest {}).await {
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
        let r = self.admin.machines(pb::MachinesRequest {}).await?;
        r.into_inner()
            .machines
            .into_iter()
            .find(|m| m.id == MACHINE)
            .ok_or_else(|| anyhow!("machine {MACHINE} unknown to the CS"))
    }

    /// Waits until the demo machine's replication state is `state`.
    pub async fn wait_state(&mut self, state: &str) -> Result<pb::MachineInfo> {
        let t0 = Instant::now();
        loop {
            let m = self.machine().await?;
            if m.state == state {
                return Ok(m);
            }
            if t0.elapsed() > Duration::from_secs(90) {
                bail!("{MACHINE} is {} after 90 s, not {state}", m.state);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Follows a started job to its end; the job when it succeeded.
    pub async fn finish(&mut self, job: Option<pb::Job>) -> Result<pb::Job> {
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
            if t0.elapsed() > Duration::from_secs(120) {
                bail!(
                    "job {id} ({}) still {} after 120 s: {}",
                    j.kind,
                    j.state,
                    j.status
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Follows a lifecycle command's job to its end, then waits until the
    /// demo machine is `state`; the machine then.
    pub async fn settle(&mut self, job: Option<pb::Job>, state: &str) -> Result<pb::MachineInfo> {
        self.finish(job).await?;
        self.wait_state(state).await
    }

    /// Waits until the CS lists point `id` of the demo machine.
    pub async fn wait_point(&mut self, id: &str) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let req = pb::PointsRequest {
                machine: MACHINE.into(),
            };
            if let Ok(r) = self.admin.points(req).await {
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
