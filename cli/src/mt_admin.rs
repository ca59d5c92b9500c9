//! Admin calls on a master target: recovery points, rollback, pre-images.

use anyhow::{Context, Result};
use rebound_common::tls::TlsFiles;
use rebound_proto::master_target_client::MasterTargetClient;
use rebound_proto::{
    ListPointsRequest, ListPointsResponse, RestorePreImagesRequest, RollbackRequest,
    RollbackResponse,
};
use std::path::Path;
use tonic::transport::Channel;

/// Connects to the MT at `addr` with `<certs>/admin.pem`.
pub async fn connect(addr: &str, certs: &Path) -> Result<MasterTargetClient<Channel>> {
    let tls = TlsFiles::in_dir(certs, "admin");
    let ch = tls
        .connect(addr, "", rebound_common::pki::Role::Mt)
        .await
        .with_context(|| format!("connecting to the master target at {addr}"))?;
    Ok(MasterTargetClient::new(ch))
}

/// The answer of an MT RPC, or an error naming what was being done.
fn answer<T>(
    r: Result<tonic::Response<T>, tonic::Status>,
    doing: impl FnOnce() -> String,
) -> Result<T> {
    Ok(r.with_context(doing)?.into_inner())
}

pub async fn points(
    c: &mut MasterTargetClient<Channel>,
    replication: &str,
) -> Result<ListPointsResponse> {
    answer(
        c.list_points(ListPointsRequest {
            replication_id: replication.into(),
        })
        .await,
        || format!("listing the recovery points of {replication}"),
    )
}

pub async fn rollback(
    c: &mut MasterTargetClient<Channel>,
    replication: &str,
    point: &str,
) -> Result<RollbackResponse> {
    answer(
        c.rollback(RollbackRequest {
            replication_id: replication.into(),
            point: point.into(),
        })
        .await,
        || format!("rolling {replication} back to {point}"),
    )
}

pub async fn restore_pre_images(
    c: &mut MasterTargetClient<Channel>,
    replication: &str,
) -> Result<u64> {
    Ok(answer(
        c.restore_pre_images(RestorePreImagesRequest {
            replication_id: replication.into(),
        })
        .await,
        || format!("restoring the pre-images of {replication}"),
    )?
    .blocks_restored)
}

/// Prints points as a table or as JSON.
pub fn print_points(r: &ListPointsResponse, json: bool) {
    if json {
        let pts: Vec<_> = r
            .points
            .iter()
            .map(|p| {
                serde_json::json!({"id": p.id, "kind": p.kind, "time_ms": p.time_ms, "seq": p.seq, "group": p.group, "damaged": p.damaged})
            })
            .collect();
        let v = serde_json::json!({"points": pts, "applied_seq": r.applied_seq, "rolled_back_to": r.rolled_back_to});
        println!("{v}");
        return;
    }
    println!(
        "{:<24} {:<9} {:<24} {:>12} GROUP",
        "ID", "KIND", "TIME (UTC)", "SEQ"
    );
    for p in &r.points {
        println!(
            "{:<24} {:<9} {:<24} {:>12} {}",
            p.id,
            p.kind,
            format_time(p.time_ms),
            p.seq,
            p.group
        );
        if !p.damaged.is_empty() {
            println!("  DAMAGED: {}", p.damaged);
        }
    }
    println!("applied seq {}", r.applied_seq);
    if !r.rolled_back_to.is_empty() {
        println!("replica is rolled back to {}", r.rolled_back_to);
    }
}

/// `YYYY-MM-DD HH:MM:SS.mmm` from ms since the epoch (UTC).
pub fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_epoch_times() {
        assert_eq!(super::format_time(0), "1970-01-01 00:00:00.000");
        assert_eq!(
            super::format_time(1_795_000_000_123),
            "2026-11-18 11:06:40.123"
        );
    }
}
