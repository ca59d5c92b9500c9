//! The process server's status, sampled twice a second from the cache and
//! the MT links: what the control channel sends the configuration server
//! every heartbeat (cache use, throughput, per-replication lag, why the MT
//! cannot be reached) and what the metrics' gauges show at a scrape. The
//! lag needs history (when each durable seq was first seen), so it is kept
//! here rather than computed at each reader. That history starts from the
//! segments' modification times when a replication is first sampled (after
//! a restart the cache may hold a backlog much older than the process), and
//! is kept in wall-clock milliseconds so a host reboot does not reset it.

use crate::cache::{Cache, Replication};
use crate::forward::Forwarders;
use rebound_common::time::now_ms;
use rebound_proto::control as pb;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};
use tokio::sync::watch;

/// How often the status is sampled.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(500);
/// Throughput is averaged over this many samples.
const THROUGHPUT_SAMPLES: usize = 10;

/// The last sampled status (`None` before the first sample).
pub type StatusCell = Mutex<Option<pb::PsStatus>>;

/// The last sampled status, if any.
pub fn last(cell: &StatusCell) -> Option<pb::PsStatus> {
    cell.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Per-replication lag tracking: durable seqs with when they were first
/// seen (wall clock, ms), dropped once applied.
#[derive(Default)]
struct Lag {
    pending: VecDeque<(u64, u64)>,
    last_durable: u64,
}

impl Lag {
    /// The history of a replication seen for the first time: each segment
    /// holding records not applied yet, by its last seq and the time it was
    /// last written (when that seq became durable, at the latest), so the
    /// lag of a backlog recovered from disk counts from when it was received
    /// rather than from this start.
    fn recovered(rep: &Replication) -> Lag {
        let mut lag = Lag::default();
        for (last_seq, written) in rep.unapplied_segment_times() {
            let ms = written
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            lag.pending.push_back((last_seq, ms));
            lag.last_durable = lag.last_durable.max(last_seq);
        }
        lag
    }
}

/// Samples the cache every [`SAMPLE_PERIOD`] into `cell` until `stop`
/// turns true: cache use, input throughput, why the MT cannot be reached
/// (if so), and per replication the durable and applied seqs and the age
/// of the oldest record not applied.
pub async fn status_task(
    cache: Arc<Cache>,
    forwarders: Arc<Forwarders>,
    cell: Arc<StatusCell>,
    mut stop: watch::Receiver<bool>,
) {
    let mut lags: HashMap<String, Lag> = HashMap::new();
    let mut bytes: VecDeque<(u64, Instant)> = VecDeque::new();
    loop {
        let now = Instant::now();
        let now_ms = now_ms();
        let mut total_in = 0u64;
        let mut reps = Vec::new();
        let current = cache.replications();
        lags.retain(|id, _| current.iter().any(|r| r.id() == id));
        for r in current {
            total_in += r.stats().bytes_in.load(Ordering::Relaxed);
            let (durable, applied) = (r.durable(), r.applied());
            let lag = match lags.entry(r.id().to_string()) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let rep = r.clone();
                    let seeded = tokio::task::spawn_blocking(move || Lag::recovered(&rep))
                        .await
                        .unwrap_or_default();
                    e.insert(seeded)
                }
            };
            if durable > lag.last_durable {
                lag.pending.push_back((durable, now_ms));
                lag.last_durable = durable;
            }
            while lag.pending.front().is_some_and(|&(s, _)| s <= applied) {
                lag.pending.pop_front();
            }
            let lag_ms = lag
                .pending
                .front()
                .map(|&(_, t)| now_ms.saturating_sub(t))
                .unwrap_or(0);
            reps.push(pb::PsReplicationLag {
                replication_id: r.id().to_string(),
                durable_seq: durable,
                applied_seq: applied,
                cache_bytes: r.cache_bytes(),
                lag_ms,
            });
        }
        bytes.push_back((total_in, now));
        while bytes.len() > THROUGHPUT_SAMPLES {
            bytes.pop_front();
        }
        let throughput = match (bytes.front(), bytes.back()) {
            (Some(&(b0, t0)), Some(&(b1, t1))) if t1 > t0 => {
                (b1.saturating_sub(b0) as f64 / t1.duration_since(t0).as_secs_f64()) as u64
            }
            _ => 0,
        };
        let account = cache.account();
        let st = pb::PsStatus {
            cache_bytes: account.total(),
            cache_limit: account.cap(),
            throughput_bytes_per_sec: throughput,
            replications: reps,
            link_error: forwarders.link_errors().join("; "),
        };
        *cell.lock().unwrap_or_else(|p| p.into_inner()) = Some(st);
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_PERIOD) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
