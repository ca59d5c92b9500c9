//! Watching the process server and the master target while the ingest
//! scale load runs: every replication's applied seq at the MT on one
//! timeline (one `Replications` call per poll covers every machine), and
//! the daemons' open file descriptors and threads from /proc (peaks), so
//! per-replication threads or files that grow with the number of disks
//! show up as a figure.

use anyhow::{anyhow, Result};
use rebound_proto::master_target_client::MasterTargetClient;
use rebound_proto::ReplicationsRequest;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tonic::transport::Channel;

/// The MT is asked this often.
const POLL: Duration = Duration::from_millis(100);

/// Peaks of one process's open files and threads.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcPeaks {
    pub fds: u64,
    pub threads: u64,
}

#[derive(Debug, Default)]
pub struct Watched {
    /// Per replication: (seconds since the epoch after the answer, applied seq).
    pub applied: HashMap<String, Vec<(f64, u64)>>,
    /// PS, MT.
    pub peaks: [ProcPeaks; 2],
    pub polls: u64,
}

impl Watched {
    /// First time at or after `t` the MT had applied `seq` of `rid`.
    pub fn applied_at(&self, rid: &str, seq: u64, t: f64) -> Option<f64> {
        let v = self.applied.get(rid)?;
        let start = v.partition_point(|&(ta, _)| ta < t);
        v[start..]
            .iter()
            .find(|&&(_, a)| a >= seq)
            .map(|&(ta, _)| ta)
    }

    /// The last time polled (the end of the timeline).
    pub fn end(&self) -> f64 {
        self.applied
            .values()
            .filter_map(|v| v.last().map(|&(t, _)| t))
            .fold(0.0, f64::max)
    }
}

pub struct Watcher {
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Watched>>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Polls the MT through `mt` and /proc of `pids` (PS, MT) until stopped.
    pub fn start(
        rt: Handle,
        mut mt: MasterTargetClient<Channel>,
        pids: [u32; 2],
        epoch: Instant,
    ) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(Watched::default()));
        let (st, sh) = (stop.clone(), shared.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let tick = Instant::now();
                let r = rt.block_on(mt.replications(ReplicationsRequest {}));
                let t = epoch.elapsed().as_secs_f64();
                let peaks = pids.map(proc_now);
                let mut w = sh.lock().unwrap_or_else(|p| p.into_inner());
                if let Ok(r) = r {
                    w.polls += 1;
                    for s in r.into_inner().replications {
                        let rid = s.info.map(|i| i.replication_id).unwrap_or_default();
                        w.applied.entry(rid).or_default().push((t, s.applied_seq));
                    }
                }
                for (i, p) in peaks.iter().enumerate() {
                    w.peaks[i].fds = w.peaks[i].fds.max(p.fds);
                    w.peaks[i].threads = w.peaks[i].threads.max(p.threads);
                }
                drop(w);
                if let Some(rest) = POLL.checked_sub(tick.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        });
        Watcher {
            stop,
            shared,
            thread: Some(thread),
        }
    }

    /// The MT's applied seq of `rid` at the latest poll.
    pub fn applied_now(&self, rid: &str) -> u64 {
        let w = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        w.applied
            .get(rid)
            .and_then(|v| v.last().map(|&(_, a)| a))
            .unwrap_or(0)
    }

    pub fn stop(mut self) -> Result<Watched> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow!("the MT watcher thread panicked"))?;
        }
        let mut w = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        Ok(std::mem::take(&mut *w))
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Open file descriptors and threads of `pid` now (0 when it is gone).
pub fn proc_now(pid: u32) -> ProcPeaks {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0);
    ProcPeaks { fds, threads }
}
