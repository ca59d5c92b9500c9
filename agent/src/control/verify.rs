//! `rebound verify` at the agent: hash the source as it was at a verify tag
//! without stopping writes, compare with the MT's view of the same point,
//! and optionally resend the chunks that differ through the change stream.
//!
//! The tag and the start of the hash pass share one critical section of the
//! ordering point ([`crate::capture::SnapshotHash`]), so the local hashes are
//! exactly the stream's prefix the point closes. The MT's hashes come
//! through the PS like a resync's (`ChunkHashesRequest.point_id` = the tag,
//! `min_applied_seq` = its seq: the MT answers once the point exists).
//!
//! A repair queues the differing chunks for a resync (the resync path's
//! hash comparison and records, [`crate::resync`]), which sends what the
//! replica lacks and closes with a crash tag: that next point is exact. The
//! MT forgets its cached hashes of every chunk a verify asked, so the
//! resync compares with what the replica holds, not with what the MT last
//! wrote there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rebound_common::chunk::{CHUNK_SIZE, EXTENT_SIZE};
use rebound_common::control::err_result;
use rebound_proto::control::command_result::Detail;
use rebound_proto::control::{ChunkRef, CommandResult, Verified, Verify};
use rebound_proto::ReplicationInfo;
use thiserror::Error;
use tracing::{info, warn};

use super::Runtime;
use crate::capture::{Capture, SnapshotError, SnapshotHash};
use crate::resync::{HashSource, PsHashSource, ResyncError};

/// Chunks per hash request to the MT (64 MiB of disk, as a resync asks).
const HASH_BATCH: u64 = 64;
/// How long a repair waits for its resync to end.
const REPAIR_WAIT: Duration = Duration::from_secs(300);
/// How often a waiting repair logs.
const REPAIR_LOG_EVERY: Duration = Duration::from_secs(10);

// A differing chunk is repaired by resyncing its dirty-log extent.
const _: () = assert!(CHUNK_SIZE == EXTENT_SIZE);

#[derive(Debug, Error)]
enum VerifyError {
    #[error("machine {machine} is not streaming{detail}: protect it first (`rebound protect {machine}`), then verify")]
    NotStreaming { machine: String, detail: String },
    #[error("machine {machine} is not connected to its process server now: check the PS and the network, then verify again")]
    NotConnected { machine: String },
    #[error("machine {machine}: {source}")]
    Snapshot {
        machine: String,
        source: SnapshotError,
    },
    #[error("machine {machine}: the MT's hashes of point {point}: {source}; the point stays, run the verify again")]
    Remote {
        machine: String,
        point: String,
        source: ResyncError,
    },
    #[error("machine {machine}: the hash pass of point {point} failed: {message}")]
    Task {
        machine: String,
        point: String,
        message: String,
    },
    #[error("machine {machine}: point {point} differs in {chunks} chunks; their repair is queued but its resync has not ended within {} s (mode {mode}): the first point after it ends is exact, watch `rebound machines`", REPAIR_WAIT.as_secs())]
    RepairPending {
        machine: String,
        point: String,
        chunks: usize,
        mode: &'static str,
    },
}

/// Ends the snapshot hash however the verify ends.
struct Ending<'a>(&'a Capture, Arc<SnapshotHash>);

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        self.0.end_snapshot_hash(&self.1);
    }
}

impl Runtime {
    pub(super) async fn verify(&self, v: &Verify) -> CommandResult {
        match self.run_verify(v).await {
            Ok(r) => CommandResult {
                ok: true,
                detail: Some(Detail::Verified(r)),
                ..Default::default()
            },
            Err(e) => {
                warn!("verify failed: {e}");
                err_result(e.to_string())
            }
        }
    }

    async fn run_verify(&self, v: &Verify) -> Result<Verified, VerifyError> {
        let machine = self.settings.machine_id.clone();
        let rid = self.replication_id();
        if rid.is_empty() || (!v.replication_id.is_empty() && v.replication_id != rid) {
            let detail = match (rid.is_empty(), v.replication_id.is_empty()) {
                (true, true) => String::new(),
                (true, false) => format!(" (replication {})", v.replication_id),
                _ => format!(" in replication {} (it streams {rid})", v.replication_id),
            };
            return Err(VerifyError::NotStreaming { machine, detail });
        }
        let Some(channel) = self.link.channel().filter(|_| self.link.is_connected()) else {
            return Err(VerifyError::NotConnected { machine });
        };
        let snap = self
            .capture
            .start_snapshot_hash(&v.tag_id)
            .map_err(|source| VerifyError::Snapshot {
                machine: machine.clone(),
                source,
            })?;
        let ending = Ending(&self.capture, snap.clone());
        let point = snap.point().to_string();
        info!(point = %point, seq = snap.seq(), replication = %rid, repair = v.repair,
            "verify: point cut; hashing the source as it was there while writes go on, and asking the MT for its view of the point");
        // The tag must reach the MT before it can answer.
        self.capture.stream().request_flush();

        let info = ReplicationInfo {
            replication_id: rid.clone(),
            machine_id: machine.clone(),
            disks: self.disks.clone(),
        };
        let src = PsHashSource::new(channel, info).at_point(&point);
        let pass = {
            let s = snap.clone();
            tokio::task::spawn_blocking(move || s.hash_rest())
        };
        let remote = async {
            let r = self.remote_hashes(&src, snap.seq()).await;
            if r.is_err() {
                // No use hashing the rest of the source.
                snap.stop();
            }
            r
        };
        let (remote, local) = tokio::join!(remote, pass);
        let remote = remote.map_err(|source| VerifyError::Remote {
            machine: machine.clone(),
            point: point.clone(),
            source,
        })?;
        let task = |message: String| VerifyError::Task {
            machine: machine.clone(),
            point: point.clone(),
            message,
        };
        local
            .map_err(|e| task(e.to_string()))?
            .map_err(|e| task(e.to_string()))?;
        drop(ending);

        let mut differing = Vec::new();
        let mut compared = 0u64;
        for (d, theirs) in self.disks.iter().zip(&remote) {
            let ours = snap.hashes(d.index).map_err(|e| task(e.to_string()))?;
            for (i, (a, b)) in ours.chunks(32).zip(theirs.chunks(32)).enumerate() {
                compared += 1;
                if a != b {
                    differing.push(ChunkRef {
                        disk: d.index,
                        offset: i as u64 * CHUNK_SIZE,
                    });
                }
            }
        }
        let list = differing
            .iter()
            .map(|c| format!("{}@{}", c.disk, c.offset))
            .collect::<Vec<_>>()
            .join(" ");
        if differing.is_empty() {
            info!(point = %point, chunks = compared, "verify: the replica equals the source at the point");
        } else {
            let msg = format!(
                "verify of machine {machine} at point {point}: {} of {compared} chunks differ between the source and the replica (disk@offset: {list})",
                differing.len()
            );
            warn!("{msg}");
            self.event("warning", "verify-differs", msg);
        }
        if v.repair && !differing.is_empty() {
            self.repair(&machine, &point, &differing).await?;
        }
        Ok(Verified {
            point_id: point,
            point_seq: snap.seq(),
            chunk_size: CHUNK_SIZE as u32,
            chunks_compared: compared,
            differing,
            repaired: v.repair,
        })
    }

    /// The MT's hashes of every chunk of every disk at the point, by disk.
    async fn remote_hashes(
        &self,
        src: &PsHashSource,
        seq: u64,
    ) -> Result<Vec<Vec<u8>>, ResyncError> {
        let mut out = Vec::with_capacity(self.disks.len());
        for d in &self.disks {
            let chunks = d.size.div_ceil(CHUNK_SIZE);
            let mut hashes = Vec::with_capacity(chunks as usize * 32);
            let mut first = 0;
            while first < chunks {
                let count = HASH_BATCH.min(chunks - first);
                let offset = first * CHUNK_SIZE;
                let h = src
                    .chunk_hashes(d.index, offset, CHUNK_SIZE as u32, count as u32, seq)
                    .await?;
                if h.len() as u64 != count * 32 {
                    return Err(ResyncError::BadAnswer {
                        disk: d.index,
                        offset,
                        got: h.len(),
                        count,
                    });
                }
                hashes.extend_from_slice(&h);
                first += count;
            }
            out.push(hashes);
        }
        Ok(out)
    }

    /// Queues the differing chunks for a resync and waits until its window
    /// closed with a tag (that point is exact).
    async fn repair(
        &self,
        machine: &str,
        point: &str,
        differing: &[ChunkRef],
    ) -> Result<(), VerifyError> {
        let before = self.capture.snapshot().seq;
        for d in &self.disks {
            let exts: Vec<u64> = differing
                .iter()
                .filter(|c| c.disk == d.index)
                .map(|c| c.offset / EXTENT_SIZE)
                .collect();
            if !exts.is_empty() {
                self.capture
                    .resync()
                    .mark_need(d.index, &exts, "verify-repair");
            }
        }
        info!(point = %point, chunks = differing.len(),
            "verify: repairing the differing chunks through the change stream (a resync of those chunks)");
        let started = Instant::now();
        let mut last_log = Instant::now();
        loop {
            let s = self.capture.snapshot();
            if s.window_end_tag_seq > before {
                info!(point = %point, tag = %s.last_tag, tag_seq = s.window_end_tag_seq,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "verify: repair sent; the point after it is exact");
                return Ok(());
            }
            if started.elapsed() >= REPAIR_WAIT {
                return Err(VerifyError::RepairPending {
                    machine: machine.to_string(),
                    point: point.to_string(),
                    chunks: differing.len(),
                    mode: s.mode.as_str(),
                });
            }
            if last_log.elapsed() >= REPAIR_LOG_EVERY {
                last_log = Instant::now();
                info!(point = %point, mode = s.mode.as_str(), pending_extents = s.resync_pending_extents,
                    "verify: waiting for the repair's resync to end");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
