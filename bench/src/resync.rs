//! Section 5, resync: a full initial sync into an empty replica and a
//! differential resync of a disk whose replica differs in 1% of its 1 MiB
//! chunks, beside `cp` and `rsync --inplace --no-whole-file` on the same
//! files in the same run.
//!
//! Both syncs are what a fresh agent install does: initial replication
//! compares every chunk's hash with the replica and sends the differing ones
//! (DESIGN.md §5 "Resync source"). So the full sync is an agent with a fresh
//! state dir over a new MT, and the differential one is another fresh agent
//! over the now-complete replica after 1% of the source's chunks changed.

use anyhow::{anyhow, Context, Result};
use serde_json::json;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::floor::{self, At};
use crate::measured::{AgentStatus, LabSpec, MeasuredLab, DISK};
use crate::{limits, Bench};
use rebound_lab::Component;
use rebound_lab::Rng;

const MIB: u64 = 1 << 20;

/// When the full sync's floor limits are measured again.
const AGAIN_WHEN: &str = "after the full sync";

/// Fills `path` with `size` bytes of random data (the worst case for
/// compression), in 1 MiB chunks.
fn make_source(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    let mut rng = Rng(0x5ca1ab1e);
    let mut buf = vec![0u8; MIB as usize];
    for c in 0..size / MIB {
        rng.fill(&mut buf);
        f.write_all_at(&buf, c * MIB)?;
    }
    f.set_len(size)?;
    f.sync_all()?;
    Ok(())
}

/// A sync's time, bytes and the cores each process used meanwhile.
struct Synced {
    secs: f64,
    bytes: u64,
    /// Agent, PS, MT, bench: CPU seconds over wall seconds.
    cores: [f64; 4],
}

impl Synced {
    fn cores_note(&self) -> String {
        let c = &self.cores;
        format!(
            "cores used: agent {:.2}, PS {:.2}, MT {:.2} (total {:.2} of 2)",
            c[0],
            c[1],
            c[2],
            c[0] + c[1] + c[2] + c[3]
        )
    }
}

/// Starts the agent and waits until its initial replication is complete at
/// the MT.
fn sync_with_fresh_agent(lab: &mut MeasuredLab, timeout: Duration) -> Result<Synced> {
    let _ = std::fs::remove_dir_all(lab.agent_state_dir());
    let cpu0 = lab.cpu_all();
    let t = Instant::now();
    lab.start(Component::Agent)?;
    let (secs, bytes) = wait_synced(lab, t, timeout)?;
    let cpu1 = lab.cpu_all();
    let cores = std::array::from_fn(|i| (cpu1[i] - cpu0[i]) / secs.max(1e-6));
    Ok(Synced { secs, bytes, cores })
}

/// Polls until the agent's initial replication is complete at the MT;
/// (seconds since `t`, resync bytes sent).
fn wait_synced(lab: &mut MeasuredLab, t: Instant, timeout: Duration) -> Result<(f64, u64)> {
    let mut admin = lab.admin()?;
    loop {
        let s = AgentStatus::read(&mut admin)?;
        if s.consistent && s.mode == "data" && !s.last_tag.is_empty() && s.durable_seq >= s.seq {
            let applied = lab.applied_seq()?;
            if applied >= s.seq {
                return Ok((t.elapsed().as_secs_f64(), s.resync_bytes_sent));
            }
        }
        if t.elapsed() > timeout {
            anyhow::bail!(
                "initial replication did not finish within {} s (mode {}, resync bytes sent {})",
                timeout.as_secs(),
                s.mode,
                s.resync_bytes_sent
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// "Total bytes sent: 1,234" from `rsync --stats`.
fn rsync_bytes_sent(stats: &str) -> Result<u64> {
    let line = stats
        .lines()
        .find(|l| l.starts_with("Total bytes sent:"))
        .ok_or_else(|| anyhow!("no 'Total bytes sent' in rsync --stats:\n{stats}"))?;
    let digits: String = line
        .trim_start_matches("Total bytes sent:")
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .with_context(|| format!("parsing rsync's {line:?}"))
}

pub fn run(b: &mut Bench) -> Result<()> {
    let p = b.plan.clone();
    let size = p.resync_disk;
    let dir = b.dir.join("resync");
    std::fs::create_dir_all(&dir)?;
    // The lab's source disk: `<source_dir>/<disk>.img`.
    let src = dir.join(format!("{DISK}.img"));
    let copy = dir.join("copy.img");
    b.progress(&format!(
        "resync: writing a {} MiB source disk of random data",
        size >> 20
    ));
    make_source(&src, size)?;

    // cp of the file, with the copy made durable like the replica is.
    b.progress("resync: cp --reflink=never + fsync of the source");
    let (cp_secs, _) = copy_durably("cp", &["--reflink=never"], &src, &copy)?;

    // Full initial sync into an empty replica.
    let mut lab = MeasuredLab::new(
        &dir.join("lab"),
        LabSpec {
            source_dir: dir.clone(),
            disk_size: size,
            agent_buffer_bytes: 256 * MIB,
            crash_interval_ms: 5000,
            retention_max_bytes: 0,
            metrics: b.metrics.serves(),
        },
        b.rt.clone(),
    )?;
    lab.start(Component::Mt)?;
    lab.start(Component::Ps)?;
    b.progress("resync: full initial sync into an empty replica");
    let full = sync_with_fresh_agent(&mut lab, p.resync_timeout)?;
    let (full_secs, full_bytes) = (full.secs, full.bytes);
    b.progress(&format!(
        "  {full_secs:.1} s, {} MiB sent (cp: {cp_secs:.1} s)",
        full_bytes >> 20
    ));
    lab.stop(Component::Agent)?;
    b.progress(&format!(
        "resync: measuring the floor's limits again, {AGAIN_WHEN}"
    ));
    limits::again(b, AGAIN_WHEN)?;

    // 1% of the chunks change while the agent is not installed.
    let chunks = size / MIB;
    let changed = (chunks / 100).max(1);
    let stride = chunks / changed;
    let f = std::fs::OpenOptions::new().write(true).open(&src)?;
    let mut rng = Rng(0xd1ff);
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..changed {
        rng.fill(&mut buf);
        f.write_all_at(&buf, (i * stride + stride / 2) * MIB)?;
    }
    f.sync_all()?;
    drop(f);

    b.progress(&format!(
        "resync: differential resync ({changed} of {chunks} chunks differ) with a fresh agent"
    ));
    let diff = sync_with_fresh_agent(&mut lab, p.resync_timeout)?;
    let (diff_secs, diff_bytes) = (diff.secs, diff.bytes);
    b.progress(&format!(
        "  {diff_secs:.1} s, {:.1} MiB sent",
        diff_bytes as f64 / MIB as f64
    ));
    lab.stop(Component::Agent)?;
    drop(lab);

    // rsync on the same pair: the source and the replica's old content
    // (the copy made before the change).
    b.progress("resync: rsync --inplace --no-whole-file on the same pair");
    let (rsync_secs, out) = copy_durably(
        "rsync",
        &["--inplace", "--no-whole-file", "--stats"],
        &src,
        &copy,
    )?;
    let rsync_bytes = rsync_bytes_sent(&String::from_utf8_lossy(&out.stdout))?;
    b.progress(&format!(
        "  {rsync_secs:.1} s, {:.1} MiB sent",
        rsync_bytes as f64 / MIB as f64
    ));

    let disk = format!("{} MiB disk, random data", size >> 20);
    b.set(
        "resync.diff.rebound.secs",
        diff_secs,
        format!(
            "{changed} of {chunks} chunks differ; {disk}; {}",
            diff.cores_note()
        ),
    );
    b.set(
        "resync.diff.rebound.bytes",
        diff_bytes as f64 / MIB as f64,
        "resync_bytes_sent",
    );
    b.set(
        "resync.diff.rsync.secs",
        rsync_secs,
        "local delta transfer + fsync",
    );
    b.set(
        "resync.diff.rsync.bytes",
        rsync_bytes as f64 / MIB as f64,
        "Total bytes sent (--stats)",
    );
    b.set(
        "resync.diff.speedup",
        rsync_secs / diff_secs.max(1e-6),
        format!(
            "{rsync_secs:.1} s / {diff_secs:.1} s{}",
            b.value("limits.disk.bulk_read")
                .map(|r| format!(
                    "; reading the whole source from the device would take {:.1} s at the bulk read rate",
                    size as f64 / 1e6 / r
                ))
                .unwrap_or_default()
        ),
    );
    b.set(
        "resync.full.rebound.secs",
        full_secs,
        format!("{disk}; {}", full.cores_note()),
    );
    b.set(
        "resync.full.rebound.bytes",
        full_bytes as f64 / MIB as f64,
        "resync_bytes_sent",
    );
    b.set("resync.full.cp.secs", cp_secs, "");
    b.set(
        "resync.full.ratio",
        cp_secs / full_secs.max(1e-6),
        format!(
            "{:.0} MB/s vs {:.0} MB/s",
            size as f64 / 1e6 / full_secs,
            size as f64 / 1e6 / cp_secs,
        ),
    );
    set_ceiling(
        b,
        size as f64 / full_secs.max(1e-6),
        size as f64 / cp_secs.max(1e-6),
        &full,
    );
    b.detail(
        "resync",
        json!({"disk_bytes": size, "changed_chunks": changed, "chunks": chunks,
               "full": {"secs": full_secs, "bytes": full_bytes, "cores": full.cores},
               "cp": {"secs": cp_secs},
               "diff": {"secs": diff_secs, "bytes": diff_bytes, "cores": diff.cores},
               "rsync": {"secs": rsync_secs, "bytes": rsync_bytes}}),
    );
    b.clean_section(&dir);
    Ok(())
}

/// The row beside the full sync's ratio: the most the design's passes allow
/// on this machine (its cores at [`floor::full_sync`], each limit at the
/// faster of section 1 and its re-measurement after the sync, and its disk
/// writing every byte durably twice), over cp's speed in the same run.
fn set_ceiling(b: &mut Bench, full_rate: f64, cp_rate: f64, full: &Synced) {
    let (Some(f), Some(bulk)) = (
        floor::full_sync(b, At::Best),
        floor::limit(b, "limits.disk.bulk_write_fsync", At::Best, f64::max),
    ) else {
        b.not_run(
            "resync.full.ceiling",
            "needs the machine limits (section 1) in the same run",
        );
        return;
    };
    let cpu = f.ceiling_mb_s();
    let again = floor::full_sync(b, At::Again)
        .map(|a| {
            format!(
                " ({AGAIN_WHEN} alone: {:.3} cores per 100 MB/s, {:.0} MB/s)",
                a.per_100_mb(),
                a.ceiling_mb_s()
            )
        })
        .unwrap_or_default();
    let disk = bulk / 2.0;
    let used: f64 = full.cores.iter().sum();
    b.set(
        "resync.full.ceiling",
        cpu.min(disk) / (cp_rate / 1e6),
        format!(
            "CPU: {} cores / ({}) = {cpu:.0} MB/s, each limit the faster of section 1 and {AGAIN_WHEN}{again}; \
             disk: two durable writes at {bulk:.0} MB/s = {disk:.0} MB/s; \
             cp {:.0} MB/s; the sync used {:.2} cores per 100 MB/s",
            f.machine_cores,
            f.describe(),
            cp_rate / 1e6,
            used / (full_rate / 1e6 / 100.0).max(1e-9)
        ),
    );
}

/// Runs `tool OPTIONS SRC DST`, then makes DST durable (as the replica is
/// when a sync ends): the seconds both took, and the tool's output.
fn copy_durably(
    tool: &str,
    options: &[&str],
    src: &Path,
    dst: &Path,
) -> Result<(f64, std::process::Output)> {
    let t = Instant::now();
    let (src_arg, dst_arg) = (src.to_string_lossy(), dst.to_string_lossy());
    let mut args = options.to_vec();
    args.extend([&*src_arg, &*dst_arg]);
    let out = rebound_lab::run_tool(tool, &args)?;
    std::fs::File::open(dst)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync of {} after {tool}", dst.display()))?;
    Ok((t.elapsed().as_secs_f64(), out))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_rsync_stats() {
        let s = "Number of files: 1\nTotal bytes sent: 43,001,234\nTotal bytes received: 5\n";
        assert_eq!(super::rsync_bytes_sent(s).unwrap(), 43_001_234);
    }
}
