//! Section 2, the cost of protection: what replication costs the protected
//! machine's I/O. fio (nbd engine) runs 4 KiB random writes at QD1 and QD32
//! and 1 MiB sequential writes against the agent's export while replication
//! runs, and against `qemu-nbd` serving the same kind of file with no
//! replication; the ratio is the figure. The protected machine (fio and the
//! server) and the replication sites (PS, MT) run on separate CPUs, as they
//! are deployed ([`crate::placement`]).

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::measured::{MeasuredLab, DISK};
use crate::placement::{Cpus, Placement};
use crate::usage::{cpu_secs_of, machine_busy_secs};
use crate::{mb, tools, Bench};
use rebound_lab::{free_port, wait_for, Component};

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

/// What one fio run measured.
struct FioRun {
    iops: f64,
    bw: f64,
    /// fio's own CPU (usr + sys), cores.
    fio_cores: f64,
    /// Wall seconds of the run, for the cores of the other processes.
    secs: f64,
}

/// Runs fio against `uri`, on `cpus` when given.
fn fio(uri: &str, job: &Job, size: u64, secs: u64, cpus: Option<&Cpus>) -> Result<FioRun> {
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
    let t = std::time::Instant::now();
    let out = tools::run_on("fio", &argv, cpus)?;
    let wall = t.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let start = text
        .find('{')
        .ok_or_else(|| anyhow!("fio printed no JSON: {text}"))?;
    let v: Value = serde_json::from_str(&text[start..]).context("parsing fio's JSON output")?;
    let w = &v["jobs"][0]["write"];
    let (Some(iops), Some(bw)) = (w["iops"].as_f64(), w["bw_bytes"].as_f64()) else {
        bail!("fio's JSON output has no jobs[0].write.iops or .bw_bytes: {w}");
    };
    let job0 = &v["jobs"][0];
    let fio_pct = job0["usr_cpu"].as_f64().unwrap_or(0.0) + job0["sys_cpu"].as_f64().unwrap_or(0.0);
    Ok(FioRun {
        iops,
        bw,
        fio_cores: fio_pct / 100.0,
        secs: wall,
    })
}

/// Cores used over `secs`, from two CPU-seconds readings.
fn cores(before: f64, after: f64, secs: f64) -> f64 {
    (after - before) / secs.max(1e-6)
}

/// `qemu-nbd` serving a file, killed on drop.
struct QemuNbd {
    child: Child,
    port: u16,
}

impl QemuNbd {
    fn start(file: &std::path::Path, export: &str, cpus: Option<&Cpus>) -> Result<QemuNbd> {
        let port = free_port();
        let mut cmd = Command::new("qemu-nbd");
        if let Some(c) = cpus {
            c.pin_command(&mut cmd);
        }
        let child = cmd
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
        crate::sys::terminate(self.child.id());
        let _ = self.child.wait();
    }
}

/// For a bandwidth job with the protected machine on one CPU: the CPU each
/// server and fio spent per MB, and the least that the frame's blake3 and
/// the stream's TLS sealing add per MB at the limits rows' one-core rates.
/// qemu-nbd's own figure moves with how idle the CPU is (3.5 ms/MB with
/// the CPU to itself, about 1 ms/MB on a loaded machine), so it is not a
/// floor for the receive-and-write work. Returns a note to append.
fn cpu_per_mb_note(b: &Bench, q_mb_s: f64, q_cores: f64, a_cores: f64, a_mb_s: f64) -> String {
    let (Some(hash), Some(seal)) = (b.value("limits.blake3"), b.value("limits.tls.seal")) else {
        return String::new();
    };
    format!(
        "; CPU per MB: agent + fio {:.2} ms, qemu-nbd + fio {:.2} ms; of the agent's extra, blake3 needs {:.2} and TLS sealing {:.2} ms at this run's limits",
        a_cores / a_mb_s.max(1e-9) * 1e3,
        q_cores / q_mb_s.max(1e-9) * 1e3,
        1e3 / hash.max(1e-9),
        1e3 / seal.max(1e-9),
    )
}

/// Binds the lab's processes as [`Placement`] says for the section, and
/// lets them run anywhere again afterwards (also on an error).
struct Pinned {
    pids: Vec<(Component, u32)>,
    place: Option<Placement>,
}

impl Pinned {
    fn new(lab: &MeasuredLab) -> Result<Pinned> {
        let place = Placement::split()?;
        let pids = [Component::Agent, Component::Ps, Component::Mt]
            .into_iter()
            .filter_map(|c| lab.pid(c).map(|pid| (c, pid)))
            .collect();
        let pinned = Pinned { pids, place };
        if let Some(p) = &pinned.place {
            pinned.bind(&p.protected, &p.recovery)?;
        }
        Ok(pinned)
    }

    fn bind(&self, protected: &Cpus, recovery: &Cpus) -> Result<()> {
        for &(c, pid) in &self.pids {
            let cpus = if c == Component::Agent {
                protected
            } else {
                recovery
            };
            cpus.pin_process(pid)
                .with_context(|| format!("binding {} to {}", c.name(), cpus.describe()))?;
        }
        Ok(())
    }

    fn protected(&self) -> Option<&Cpus> {
        self.place.as_ref().map(|p| &p.protected)
    }

    fn describe(&self) -> String {
        match &self.place {
            Some(p) => p.describe(),
            None => "one CPU: not split".into(),
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(p) = &self.place {
            let _ = self.bind(&p.all, &p.all);
        }
    }
}

pub fn run(b: &mut Bench, lab: &mut MeasuredLab) -> Result<()> {
    let p = b.plan.clone();
    let size = lab.disk_size();
    let file = b.dir.join("qemu-nbd-disk.img");
    std::fs::File::create(&file)?.set_len(size)?;
    let pinned = Pinned::new(lab)?;
    let placement = pinned.describe();
    let qemu = QemuNbd::start(&file, DISK, pinned.protected())?;
    let agent_uri = rebound_lab::nbd_uri(lab.agent_nbd(), DISK);
    let qemu_uri = format!("nbd://127.0.0.1:{}/{DISK}", qemu.port);
    for job in JOBS {
        b.progress(&format!(
            "cost: fio {} {} QD{} for {} s against the agent, then qemu-nbd",
            job.rw, job.bs, job.qd, p.fio_secs
        ));
        // Between jobs the replication catches up, so every agent job starts
        // from an idle pipeline like the qemu-nbd one.
        lab.wait_settled(p.settle_timeout)?;
        // Cores of every process during each run: fio and the server share
        // the protected machine's CPU; the PS and MT have the others.
        let (cpu0, m0) = (lab.cpu_all(), machine_busy_secs().unwrap_or(0.0));
        let a = fio(&agent_uri, job, size, p.fio_secs, pinned.protected())
            .with_context(|| format!("fio {} against the agent", job.id))?;
        let (cpu1, m1) = (lab.cpu_all(), machine_busy_secs().unwrap_or(0.0));
        let a_cores: Vec<f64> = (0..3).map(|i| cores(cpu0[i], cpu1[i], a.secs)).collect();
        let a_machine = cores(m0, m1, a.secs);
        let mode = lab.agent_status()?.mode;
        // The qemu-nbd job also starts on an idle machine: without this it
        // ran while the PS and MT were still applying the agent job's
        // writes (up to 0.9 of the 2 cores), which flattered the ratio.
        lab.wait_settled(p.settle_timeout)?;
        let qpid = qemu.child.id().to_string();
        let (q0, m0) = (
            cpu_secs_of(&qpid).unwrap_or(0.0),
            machine_busy_secs().unwrap_or(0.0),
        );
        let q = fio(&qemu_uri, job, size, p.fio_secs, pinned.protected())
            .with_context(|| format!("fio {} against qemu-nbd", job.id))?;
        let q_server = cores(q0, cpu_secs_of(&qpid).unwrap_or(0.0), q.secs);
        let q_machine = cores(m0, machine_busy_secs().unwrap_or(0.0), q.secs);
        b.detail(
            &format!("cost.{}", job.id),
            json!({
                "agent": {"iops": a.iops, "bw": a.bw, "secs": a.secs, "cores": {
                    "fio": a.fio_cores, "agent": a_cores[0], "ps": a_cores[1], "mt": a_cores[2],
                    "machine": a_machine}},
                "qemu": {"iops": q.iops, "bw": q.bw, "secs": q.secs, "cores": {
                    "fio": q.fio_cores, "qemu_nbd": q_server, "machine": q_machine}},
            }),
        );
        let (a_iops, a_bw, q_iops, q_bw) = (a.iops, a.bw, q.iops, q.bw);
        let (a_val, q_val) = if job.bandwidth {
            (mb(a_bw), mb(q_bw))
        } else {
            (a_iops, q_iops)
        };
        let what = if job.bandwidth { "MB/s" } else { "IOPS" };
        b.set(
            &format!("cost.{}.agent", job.id),
            a_val,
            format!(
                "{:.1} MB/s; agent mode after: {mode}; cores: fio {:.2}, agent {:.2}, PS {:.2}, MT {:.2}, machine {a_machine:.2} of 2",
                mb(a_bw),
                a.fio_cores,
                a_cores[0],
                a_cores[1],
                a_cores[2]
            ),
        );
        b.set(
            &format!("cost.{}.qemu", job.id),
            q_val,
            format!(
                "{:.1} MB/s; cores: fio {:.2}, qemu-nbd {q_server:.2}, machine {q_machine:.2} of 2",
                mb(q_bw),
                q.fio_cores
            ),
        );
        let per_mb = if job.bandwidth && pinned.protected().is_some() {
            cpu_per_mb_note(
                b,
                mb(q_bw),
                q.fio_cores + q_server,
                a.fio_cores + a_cores[0],
                mb(a_bw),
            )
        } else {
            String::new()
        };
        b.set(
            &format!("cost.{}.ratio", job.id),
            a_val / q_val.max(1e-9),
            format!("{a_val:.0} / {q_val:.0} {what}; {placement}{per_mb}"),
        );
    }
    drop(qemu);
    drop(pinned);
    let _ = std::fs::remove_file(&file);
    b.progress("cost: waiting for replication to catch up after fio");
    lab.wait_settled(p.settle_timeout)?;
    Ok(())
}
