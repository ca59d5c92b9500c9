//! Section 2, the cost of protection: what replication costs the protected
//! machine's I/O. fio (nbd engine) runs 4 KiB random writes at QD1 and QD32
//! and 1 MiB sequential writes against the agent's export while replication
//! runs, and against `qemu-nbd` serving the same kind of file with no
//! replication; the ratio is the figure.

use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::lab::{free_port, wait_for, Lab, DISK};
use super::{mb, tools, Bench};

/// One fio line.
struct Job {
    id: &'static str,
    rw: &'static str,
    bs: &'static str,
    qd: u32,
    /// Report MB/s instead of IOPS.
    bandwidth: bool,
}

const JOBS: &[Job] = &[
    Job {
        id: "randwrite4k_qd1",
        rw: "randwrite",
        bs: "4k",
        qd: 1,
        bandwidth: false,
    },
    Job {
        id: "randwrite4k_qd32",
        rw: "randwrite",
        bs: "4k",
        qd: 32,
        bandwidth: false,
    },
    Job {
        id: "seqwrite1m",
        rw: "write",
        bs: "1M",
        qd: 4,
        bandwidth: true,
    },
];

/// Runs fio against `uri`; returns (IOPS, bytes/s).
fn fio(uri: &str, job: &Job, size: u64, secs: u64) -> Result<(f64, f64)> {
    let args = [
        "--name=bench".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.bs),
        format!("--iodepth={}", job.qd),
        format!("--size={size}"),
        "--time_based".into(),
        format!("--runtime={secs}"),
        "--ramp_time=1".into(),
        "--refill_buffers".into(),
        "--buffer_compress_percentage=50".into(),
        "--output-format=json".into(),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tools::run("fio", &argv)?;
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let start = text
        .find('{')
        .ok_or_else(|| anyhow!("fio printed no JSON: {text}"))?;
    let v: Value = serde_json::from_str(&text[start..]).context("parsing fio's JSON output")?;
    let w = &v["jobs"][0]["write"];
    let iops = w["iops"]
        .as_f64()
        .ok_or_else(|| anyhow!("no write.iops in fio's output"))?;
    let bw = w["bw_bytes"]
        .as_f64()
        .ok_or_else(|| anyhow!("no write.bw_bytes in fio's output"))?;
    Ok((iops, bw))
}

/// `qemu-nbd` serving a file, killed on drop.
struct QemuNbd {
    child: Child,
    port: u16,
}

impl QemuNbd {
    fn start(file: &std::path::Path, export: &str) -> Result<QemuNbd> {
        let port = free_port()?;
        let child = Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-x", export, "--bind", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    anyhow!("qemu-nbd is not installed; install it with `apt-get install -y qemu-utils`")
                } else {
                    anyhow!("cannot start qemu-nbd: {e}")
                }
            })?;
        let q = QemuNbd { child, port };
        wait_for(
            "qemu-nbd to listen",
            Duration::from_secs(20),
            Duration::from_millis(20),
            || Ok(TcpStream::connect(("127.0.0.1", port)).is_ok()),
        )?;
        Ok(q)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

pub fn run(b: &mut Bench, lab: &mut Lab) -> Result<()> {
    let p = b.plan.clone();
    let size = lab.spec.disk_size;
    let file = b.dir.join("qemu-nbd-disk.img");
    std::fs::File::create(&file)?.set_len(size)?;
    let qemu = QemuNbd::start(&file, DISK)?;
    let agent_uri = format!("nbd://127.0.0.1:{}/{DISK}", lab.agent_nbd_port);
    let qemu_uri = format!("nbd://127.0.0.1:{}/{DISK}", qemu.port);
    for job in JOBS {
        b.progress(&format!(
            "cost: fio {} {} QD{} for {} s against the agent, then qemu-nbd",
            job.rw, job.bs, job.qd, p.fio_secs
        ));
        // Between jobs the replication catches up, so every agent job starts
        // from an idle pipeline like the qemu-nbd one.
        lab.wait_settled(p.settle_timeout)?;
        let (a_iops, a_bw) = fio(&agent_uri, job, size, p.fio_secs)
            .with_context(|| format!("fio {} against the agent", job.id))?;
        let mode = lab.agent_status()?.mode;
        let (q_iops, q_bw) = fio(&qemu_uri, job, size, p.fio_secs)
            .with_context(|| format!("fio {} against qemu-nbd", job.id))?;
        let (a, q) = if job.bandwidth {
            (mb(a_bw), mb(q_bw))
        } else {
            (a_iops, q_iops)
        };
        let what = if job.bandwidth { "MB/s" } else { "IOPS" };
        b.set(
            &format!("cost.{}.agent", job.id),
            a,
            format!("{:.1} MB/s; agent mode after: {mode}", mb(a_bw)),
        );
        b.set(
            &format!("cost.{}.qemu", job.id),
            q,
            format!("{:.1} MB/s", mb(q_bw)),
        );
        b.set(
            &format!("cost.{}.ratio", job.id),
            a / q.max(1e-9),
            format!("{a:.0} / {q:.0} {what}"),
        );
    }
    drop(qemu);
    let _ = std::fs::remove_file(&file);
    b.progress("cost: waiting for replication to catch up after fio");
    lab.wait_settled(p.settle_timeout)?;
    Ok(())
}
