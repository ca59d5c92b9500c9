//! `rebound verify` (DESIGN.md §7 views): the agent cuts a crash tag and,
//! without stopping writes, hashes its source as it was at that tag, asks
//! the MT for the hashes of the same point's view, compares them and (with
//! `--repair`) resends the differing chunks through the change stream. The
//! CS keeps the last result per machine (`rebound machines`) and runs a
//! verify on every machine whose policy sets `verify_interval_secs`
//! ([`scheduler`]).

use super::{JobSpec, Lifecycle};
use crate::bus::ComponentKey;
use crate::error::CsError;
use crate::jobs::JobCtx;
use crate::store::records::{self, ChunkAt, Record, VerifyRecord, MAX_CHUNKS_KEPT};
use crate::store::{now_ms, ReplState};
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use rebound_proto::control::command_result::Detail;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, info};

/// How many differing chunks a job's status line names.
const CHUNKS_NAMED: usize = 5;

impl Lifecycle {
    /// The machine replicates (Protected) and its agent is connected: the
    /// agent hashes the source.
    pub(super) async fn check_verify(&self, machine: &str, tag: &str) -> Result<(), CsError> {
        self.machine(machine).await?;
        let (st, _) = self.state_of(machine).await?;
        if st != ReplState::Protected {
            return Err(CsError::FailedPrecondition(format!(
                "cannot verify {machine}: it is {st}; verify compares a replicating machine \
                 (Protected) with its replica (`rebound machines` shows the state)"
            )));
        }
        if tag.is_empty() || tag.chars().any(char::is_whitespace) {
            return Err(CsError::InvalidArgument(format!(
                "verify tag id {tag:?} of {machine} must be a non-empty word without spaces"
            )));
        }
        if self.bus.connection(&Self::agent(machine)).is_none() {
            return Err(CsError::FailedPrecondition(format!(
                "the agent on {machine} is not connected: verify hashes the source at the agent; \
                 start it (`rebound status` shows the components) and retry"
            )));
        }
        Ok(())
    }

    /// Sends `Verify` to the agent and stores the result (also when it
    /// fails, with the error) as the machine's last verify.
    pub(super) async fn run_verify(
        &self,
        ctx: &mut JobCtx,
        spec: &JobSpec,
        machine: &str,
    ) -> Result<(), CsError> {
        let JobSpec::Verify { tag, repair, .. } = spec else {
            return Err(CsError::Internal(format!(
                "verify in a {} job",
                spec.kind()
            )));
        };
        let r = self.repl(machine).await?;
        let cmd = Cmd::Verify(pb::Verify {
            replication_id: r.id.clone(),
            tag_id: tag.clone(),
            repair: *repair,
        });
        ctx.status(format!("{machine}: hashing the source at tag {tag}"))
            .await?;
        // A whole-disk hash pass: bounded like an initial sync.
        let limit = self.settings.initial_sync_timeout + self.settings.command_timeout;
        let mut rec = VerifyRecord {
            job_id: ctx.job_id().to_string(),
            point_id: tag.clone(),
            ..Default::default()
        };
        let reply = match self.bus.send(Self::agent(machine), cmd, limit).await {
            Ok(reply) => reply,
            Err(e) => {
                rec.time_ms = now_ms();
                rec.error = e.to_string();
                records::put(self.store.as_ref(), Record::LastVerify, machine, &rec).await?;
                return Err(e.into());
            }
        };
        ctx.warn(reply.warning).await?;
        let Some(Detail::Verified(v)) = reply.detail else {
            return Err(CsError::Internal(format!(
                "the agent on {machine} answered verify without a result"
            )));
        };
        let rec = record(ctx.job_id(), &v);
        records::put(self.store.as_ref(), Record::LastVerify, machine, &rec).await?;
        let names = self.machine(machine).await?.disks;
        let name = |d: u32| {
            names
                .iter()
                .find(|x| x.index == d)
                .map(|x| x.name.clone())
                .unwrap_or_else(|| format!("disk{d}"))
        };
        ctx.status(summary(&rec, name)).await?;
        if rec.differing > 0 && !rec.repaired {
            ctx.warn(format!(
                "{} chunks of {machine} differ from the source at point {}: \
                 `rebound verify {machine} --repair` resends them",
                rec.differing, rec.point_id
            ))
            .await?;
        }
        Ok(())
    }
}

/// The stored record of a verify's result.
fn record(job_id: &str, v: &pb::Verified) -> VerifyRecord {
    VerifyRecord {
        time_ms: now_ms(),
        job_id: job_id.to_string(),
        point_id: v.point_id.clone(),
        point_seq: v.point_seq,
        chunk_size: v.chunk_size,
        chunks_compared: v.chunks_compared,
        differing: v.differing.len() as u64,
        differing_chunks: v
            .differing
            .iter()
            .take(MAX_CHUNKS_KEPT)
            .map(|c| ChunkAt {
                disk: c.disk,
                offset: c.offset,
            })
            .collect(),
        repaired: v.repaired,
        error: String::new(),
    }
}

/// "compared 64 chunks at point t: 2 differ (disk0@1048576, disk0@3145728)".
fn summary(r: &VerifyRecord, disk_name: impl Fn(u32) -> String) -> String {
    let mut s = format!(
        "compared {} chunks at point {}: {} differ",
        r.chunks_compared, r.point_id, r.differing
    );
    if r.differing > 0 {
        let named: Vec<String> = r
            .differing_chunks
            .iter()
            .take(CHUNKS_NAMED)
            .map(|c| format!("{}@{}", disk_name(c.disk), c.offset))
            .collect();
        let more = if r.differing as usize > named.len() {
            ", …"
        } else {
            ""
        };
        s.push_str(&format!(" ({}{more})", named.join(", ")));
        if r.repaired {
            s.push_str("; repaired through the change stream");
        }
    }
    s
}

/// The last verify of a machine as `rebound machines` shows it.
pub fn verify_to_proto(r: &VerifyRecord) -> pb::VerifyResult {
    pb::VerifyResult {
        time_ms: r.time_ms,
        point_id: r.point_id.clone(),
        chunks_compared: r.chunks_compared,
        differing: r.differing,
        repaired: r.repaired,
        error: r.error.clone(),
        job_id: r.job_id.clone(),
        differing_chunks: r
            .differing_chunks
            .iter()
            .map(|c| pb::ChunkRef {
                disk: c.disk,
                offset: c.offset,
            })
            .collect(),
        chunk_size: r.chunk_size,
    }
}

/// Starts a verify (no repair) of every Protected machine whose policy's
/// `verify_interval_secs` has passed since its last verify (or since the
/// scheduler first saw it), looking every `tick`. Runs until `stop`.
pub async fn scheduler(lc: Arc<Lifecycle>, tick: Duration, stop: watch::Receiver<bool>) {
    // When each machine's interval started: its last verify or start.
    let mut since: HashMap<String, u64> = HashMap::new();
    let mut ticker = crate::tick::Ticker::new(tick, stop);
    while ticker.tick().await {
        if let Err(e) = verify_due(&lc, &mut since).await {
            debug!(error = %e, "verify schedule not checked");
        }
    }
}

/// One pass of [`scheduler`].
async fn verify_due(lc: &Lifecycle, since: &mut HashMap<String, u64>) -> Result<(), CsError> {
    let now = now_ms();
    for m in lc.store.list_machines().await? {
        let every = m.policy.verify_interval_secs.saturating_mul(1000);
        if every == 0 {
            since.remove(&m.id);
            continue;
        }
        let last: Option<VerifyRecord> =
            records::get(lc.store.as_ref(), Record::LastVerify, &m.id).await?;
        let start = since.entry(m.id.clone()).or_insert(now);
        if let Some(l) = last {
            *start = (*start).max(l.time_ms);
        }
        if now.saturating_sub(*start) < every {
            continue;
        }
        let (st, _) = lc.state_of(&m.id).await?;
        let agent = ComponentKey::agent(&m.id);
        if st != ReplState::Protected || lc.bus.connection(&agent).is_none() {
            continue;
        }
        *start = now;
        match lc.verify(&m.id, "", false).await {
            Ok(job) => info!(machine = %m.id, job = %job.id, "scheduled verify started"),
            Err(e) => debug!(machine = %m.id, error = %e, "scheduled verify not started"),
        }
    }
    Ok(())
}
