//! `rebound demo`: the data path end to end on loopback, with no setup.
//!
//! It makes a throw-away directory and a lab PKI, starts a master target, a
//! process server and an agent (in this process, each on its own loopback
//! port with mutual TLS), generates a demo machine's disk, writes to it
//! through NBD with qemu-io, cuts recovery points, and checks by blake3 that
//! every point read back from the master target's NBD view equals the source
//! at that point. It then rolls the replica back to an older point, checks it,
//! restores the pre-images and checks latest again, and prints a summary
//! with the lag and timings it measured.

use crate::mt_admin;
use anyhow::{anyhow, bail, Context, Result};
use rebound_common::tls::TlsFiles;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const MACHINE: &str = "demo";
const DISK: &str = "disk0";

pub struct DemoOptions {
    /// Keep the directory (and print where it is) instead of deleting it.
    pub keep: bool,
    /// Size of the demo disk in MiB.
    pub disk_mib: u64,
    /// Recovery points to cut and verify.
    pub points: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            keep: false,
            disk_mib: 64,
            points: 5,
        }
    }
}

struct Running {
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
}

fn step(msg: &str) {
    println!("==> {msg}");
}

fn tool(name: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(name).args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!("{name} is not installed: the demo writes and reads through real NBD clients; install them with `apt-get install -y qemu-utils`")
        } else {
            anyhow!("cannot run {name}: {e}")
        }
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() || stdout.contains("failed") {
        bail!(
            "{name} {} failed: {}{}",
            args.join(" "),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

fn hash_file(p: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_mmap(p)
        .with_context(|| format!("hashing {}", p.display()))?;
    Ok(h.finalize().to_hex().to_string())
}

/// blake3 of an NBD export, read with qemu-img into a scratch file.
fn hash_export(uri: &str, scratch: &Path) -> Result<String> {
    let _ = std::fs::remove_file(scratch);
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            &scratch.to_string_lossy(),
        ],
    )?;
    let h = hash_file(scratch)?;
    std::fs::remove_file(scratch)?;
    Ok(h)
}

fn admin(sock: &Path, req: serde_json::Value) -> Result<serde_json::Value> {
    let mut s = UnixStream::connect(sock)
        .with_context(|| format!("connecting to the agent's admin socket {}", sock.display()))?;
    writeln!(s, "{req}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    if let Some(e) = v.get("error") {
        bail!("agent refused {req}: {e}");
    }
    Ok(v)
}

fn tls_toml(certs: &Path, name: &str) -> String {
    let t = TlsFiles::in_dir(certs, name);
    format!(
        "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        t.ca, t.cert, t.key
    )
}

/// What `start` gives back: the running components and where they listen.
struct Started {
    running: Running,
    agent_port: u16,
    mt_nbd_port: u16,
    mt_addr: String,
    admin_sock: PathBuf,
}

async fn start(dir: &Path, certs: &Path) -> Result<Started> {
    let mt_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mt_nbd = std::net::TcpListener::bind("127.0.0.1:0")?;
    let ps_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let agent_nbd = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mt_addr = mt_listener.local_addr()?;
    let mt_nbd_port = mt_nbd.local_addr()?.port();
    let ps_addr = ps_listener.local_addr()?;
    let agent_port = agent_nbd.local_addr()?.port();
    let origin = Path::new("<demo>");

    let mt_cfg: rebound_mt::config::Config = rebound_common::config::parse(
        &format!(
            "listen = \"{mt_addr}\"\nnbd_listen = \"127.0.0.1:{mt_nbd_port}\"\ndata_dir = {:?}\n{}",
            dir.join("mt"),
            tls_toml(certs, "mt")
        ),
        origin,
    )?;
    let ps_cfg: rebound_ps::config::Config = rebound_common::config::parse(
        &format!(
            "listen = \"{ps_addr}\"\ncache_dir = {:?}\n{}[mt]\naddr = \"{mt_addr}\"\nserver_name = \"localhost\"\n",
            dir.join("ps"),
            tls_toml(certs, "ps")
        ),
        origin,
    )?;
    let state_dir = dir.join("agent");
    let agent_cfg: rebound_agent::config::Config = rebound_common::config::parse(
        &format!(
            "machine_id = \"{MACHINE}\"\nstate_dir = {:?}\nnbd_listen = \"127.0.0.1:{agent_port}\"\ncrash_interval_ms = 5000\n[[disks]]\nname = \"{DISK}\"\npath = {:?}\n[ps]\naddr = \"{ps_addr}\"\nserver_name = \"localhost\"\n{}",
            state_dir,
            dir.join("source").join(format!("{DISK}.img")),
            tls_toml(certs, &format!("agent-{MACHINE}"))
        ),
        origin,
    )?;

    let mut running = Running {
        stops: Vec::new(),
        tasks: Vec::new(),
    };
    let (tx, rx) = oneshot::channel::<()>();
    running.stops.push(tx);
    running.tasks.push(tokio::spawn(async move {
        rebound_mt::run(mt_cfg, mt_listener, mt_nbd, async {
            let _ = rx.await;
        })
        .await
        .map_err(|e| anyhow!("master target: {e}"))
    }));
    let (tx, rx) = oneshot::channel::<()>();
    running.stops.push(tx);
    running.tasks.push(tokio::spawn(async move {
        rebound_ps::run(ps_cfg, ps_listener, async {
            let _ = rx.await;
        })
        .await
        .map_err(|e| anyhow!("process server: {e}"))
    }));
    let (tx, rx) = oneshot::channel::<()>();
    running.stops.push(tx);
    running.tasks.push(tokio::spawn(async move {
        rebound_agent::run(agent_cfg, agent_nbd, async {
            let _ = rx.await;
        })
        .await
        .map_err(|e| anyhow!("agent: {e}"))
    }));
    let sock = state_dir.join("admin.sock");
    let t0 = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!(
                "the agent did not open its admin socket {} within 30 s",
                sock.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Started {
        running,
        agent_port,
        mt_nbd_port,
        mt_addr: mt_addr.to_string(),
        admin_sock: sock,
    })
}

async fn wait_applied(
    mt: &mut rebound_proto::master_target_client::MasterTargetClient<tonic::transport::Channel>,
    seq: u64,
) -> Result<()> {
    let t0 = Instant::now();
    loop {
        if let Ok(r) = mt_admin::points(mt, MACHINE).await {
            if r.applied_seq >= seq {
                return Ok(());
            }
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("the master target did not apply seq {seq} within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the demo; returns an error at the first check that fails.
pub async fn run(opts: DemoOptions) -> Result<()> {
    rebound_common::tls::install_crypto_provider();
    let tmp = tempfile::Builder::new().prefix("rebound-demo-").tempdir()?;
    let dir = tmp.path().to_path_buf();
    let started = Instant::now();
    step(&format!("throw-away directory {}", dir.display()));
    let certs = dir.join("certs");
    rebound_common::pki::write_dev_bundle(&certs, &[MACHINE.to_string()])?;
    std::fs::create_dir_all(dir.join("source"))?;
    let disk_size = opts.disk_mib << 20;
    let src = dir.join("source").join(format!("{DISK}.img"));
    std::fs::File::create(&src)?.set_len(disk_size)?;

    step("starting master target, process server and agent on loopback (mutual TLS)");
    let Started {
        mut running,
        agent_port,
        mt_nbd_port,
        mt_addr,
        admin_sock: sock,
    } = start(&dir, &certs).await?;
    let mut mt = mt_admin::connect(&mt_addr, &certs).await?;

    let agent_uri = format!("nbd://127.0.0.1:{agent_port}/{DISK}");
    step(&format!(
        "writing {} recovery points' worth of data through NBD ({agent_uri})",
        opts.points
    ));
    let mut points = Vec::new();
    let mut lags = Vec::new();
    let mut written = 0u64;
    let mut write_secs = 0.0;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..opts.points {
        let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
        for _ in 0..64 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = ((rng >> 40) % 256 + 1) * 512;
            let off = ((rng >> 8) % ((disk_size - len) / 512)) * 512;
            args.push("-c".into());
            args.push(format!("write -P {} {off} {len}", (rng >> 32) % 255 + 1));
            written += len;
        }
        args.push(agent_uri.clone());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = Instant::now();
        tool("qemu-io", &argv)?;
        write_secs += t.elapsed().as_secs_f64();
        let v = admin(&sock, serde_json::json!({"cmd": "tag", "kind": "crash"}))?;
        let id = v["id"].as_str().unwrap_or_default().to_string();
        let seq = v["seq"].as_u64().unwrap_or_default();
        let tagged = Instant::now();
        let h = hash_file(&src)?;
        wait_applied(&mut mt, seq).await?;
        lags.push(tagged.elapsed());
        println!(
            "    point {} ({id}, seq {seq}) applied {:.0} ms after the tag",
            round + 1,
            tagged.elapsed().as_secs_f64() * 1000.0
        );
        points.push((id, h));
    }

    step("verifying every recovery point by blake3 through the master target's NBD views");
    let scratch = dir.join("scratch.img");
    for (id, h) in &points {
        let uri = format!("nbd://127.0.0.1:{mt_nbd_port}/{MACHINE}/{DISK}@{id}");
        let got = hash_export(&uri, &scratch)?;
        if &got != h {
            bail!("point {id}: the view's blake3 {got} differs from the source's {h} at that tag");
        }
        println!("    {id}: {}… matches the source", &h[..16]);
    }

    step("stopping the agent (clean: drains its buffer), as a failover would");
    if let Some(tx) = running.stops.pop() {
        let _ = tx.send(());
    }
    if let Some(t) = running.tasks.pop() {
        t.await??;
    }
    let latest = hash_file(&src)?;
    let replica = dir
        .join("mt")
        .join(MACHINE)
        .join("replica")
        .join(format!("{DISK}.img"));

    let (target, target_hash) = &points[points.len() / 2];
    step(&format!("rolling the replica back to {target}"));
    let t = Instant::now();
    let rb = mt_admin::rollback(&mut mt, MACHINE, target).await?;
    let rollback_secs = t.elapsed().as_secs_f64();
    let got = hash_file(&replica)?;
    if &got != target_hash {
        bail!("replica after rollback to {target} has blake3 {got}, expected {target_hash}");
    }
    println!(
        "    replica equals {target}: {} blocks restored in {:.0} ms",
        rb.blocks_restored,
        rollback_secs * 1000.0
    );
    step("restoring the pre-images (back to latest)");
    mt_admin::restore_pre_images(&mut mt, MACHINE).await?;
    let got = hash_file(&replica)?;
    if got != latest {
        bail!("replica after restoring pre-images has blake3 {got}, expected latest {latest}");
    }
    println!("    replica equals the source's latest content");

    for tx in running.stops.drain(..) {
        let _ = tx.send(());
    }
    for t in running.tasks.drain(..) {
        t.await??;
    }

    lags.sort();
    let max_lag = lags.last().copied().unwrap_or_default();
    let med_lag = lags.get(lags.len() / 2).copied().unwrap_or_default();
    println!();
    println!("Rebound demo summary");
    println!("  recovery points verified by blake3 : {}", points.len());
    println!(
        "  written through NBD                : {:.1} MiB at {:.1} MiB/s (qemu-io)",
        written as f64 / 1048576.0,
        written as f64 / 1048576.0 / write_secs.max(1e-9)
    );
    println!(
        "  tag-to-applied lag (RPO bound)     : median {:.0} ms, max {:.0} ms",
        med_lag.as_secs_f64() * 1000.0,
        max_lag.as_secs_f64() * 1000.0
    );
    println!(
        "  rollback to {target:<22} : {:.0} ms ({} blocks)",
        rollback_secs * 1000.0,
        rb.blocks_restored
    );
    println!(
        "  total                              : {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if opts.keep {
        let kept = tmp.keep();
        println!("  directory kept at {}", kept.display());
    }
    println!("demo passed");
    Ok(())
}
