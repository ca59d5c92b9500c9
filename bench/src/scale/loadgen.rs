//! The load generator of the ingest scale section: many machines' agents
//! from one process, speaking the agent's `Ingest` protocol to a real
//! process server, so hundreds of disks can be driven on two cores without
//! hundreds of agent processes competing with the PS and MT for the CPU.
//!
//! What each simulated machine does is what an agent does on the wire:
//! - its own mTLS connection with its own agent certificate (the PS binds a
//!   replication to the certificate's machine);
//! - a hello with its `ReplicationInfo` (replication id = machine id, as a
//!   standalone agent sends), then frames from the PS's `resume_seq + 1`;
//! - the first frame is the initial resync window an agent opens for new
//!   disks (`ResyncBegin` over every disk, reason "initial", then
//!   `ResyncEnd`: every chunk of the zero source disks equals the zero
//!   replica, so nothing is copied between them);
//! - then, every [`TICK`], the writes due at its share of the churn (write
//!   size [`WRITE_SIZE`], 4 KiB aligned, random disk and offset, data cut
//!   from a text-like pool so the PS's compression does real work) sealed
//!   into one frame (blake3 over the body, the real frame format), and a
//!   crash tag every `tag_every` as the agent's crash-consistency interval;
//! - frames in flight are bounded ([`MAX_IN_FLIGHT`]) and a frame counts as
//!   handed over only when the PS's `durable_seq` covers it; frames waiting
//!   to be sent sit in a buffer of [`BUFFER_BYTES`] (an agent's change
//!   buffer); when it is full the machine stops writing and counts the
//!   overflow (an agent would fall back to its dirty bitmap).
//!
//! Each frame's capture time (when its writes were made) and last seq are
//! kept, for the section's capture-to-applied lag. Verified machines also
//! write every write to a local source image, so the replica can be
//! compared with it by blake3 afterwards.

use anyhow::{anyhow, bail, Context, Result};
use rebound_common::frame::{Frame, FrameBuilder, Record, Tag, TagKind};
use rebound_common::pki::Role;
use rebound_common::tls::TlsFiles;
use rebound_lab::Rng;
use rebound_proto::ingest_request::Msg as ReqMsg;
use rebound_proto::ingest_response::Msg as RespMsg;
use rebound_proto::process_server_client::ProcessServerClient;
use rebound_proto::{DiskInfo, IngestRequest, ReplicationInfo};
use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;

/// How often a machine seals the writes due into a frame.
pub const TICK: Duration = Duration::from_millis(100);
/// The size of each simulated write.
pub const WRITE_SIZE: usize = 64 << 10;
/// Frames sent and not yet durable at the PS, per machine.
const MAX_IN_FLIGHT: u64 = 16;
/// Frames built and not yet sent, per machine (an agent's change buffer).
const BUFFER_BYTES: usize = 32 << 20;

/// One simulated machine.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    pub id: String,
    /// Disk names and sizes.
    pub disks: Vec<(String, u64)>,
    /// Where its writes are also written (one `<disk>.img` each), for a
    /// blake3 comparison with the replica; `None`: not verified.
    pub source_dir: Option<PathBuf>,
    pub seed: u64,
}

/// What every machine of a run shares.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub ps_addr: String,
    pub server_name: String,
    /// The lab's certificates (`agent-<machine>` for each machine).
    pub certs: PathBuf,
    /// Churn per machine, bytes/s.
    pub rate: f64,
    pub duration: Duration,
    pub tag_every: Duration,
    pub pool: Arc<Vec<u8>>,
}

/// What one machine did.
#[derive(Debug, Clone, Default)]
pub struct MachineRun {
    pub id: String,
    /// (last seq of a frame, seconds since the run's epoch its writes were made).
    pub captured: Vec<(u64, f64)>,
    pub bytes_written: u64,
    pub frames: u64,
    /// Bytes of writes not made because the buffer was full.
    pub overflow_bytes: u64,
    /// Seconds since the run's epoch of the first tick whose writes were
    /// not made (buffer full); `None`: the machine never overflowed.
    pub first_overflow: Option<f64>,
    /// The last seq sent (and durable at the PS once the run returns).
    pub last_seq: u64,
    /// Last seqs of the frames sent and not yet durable, oldest first.
    sent_last: VecDeque<u64>,
    acked_frames: u64,
}

/// Runs every machine for `spec.duration`, then waits until the PS holds
/// every frame durably; the machines' runs in input order.
pub async fn run(
    spec: LoadSpec,
    machines: Vec<MachineSpec>,
    epoch: Instant,
) -> Result<Vec<MachineRun>> {
    for m in &machines {
        if let Some((disk, size)) = m.disks.iter().find(|(_, s)| *s < WRITE_SIZE as u64) {
            bail!(
                "simulated machine {}: disk {disk} has {size} bytes, smaller than one write \
                 ({WRITE_SIZE} bytes); give every disk at least {WRITE_SIZE} bytes",
                m.id
            );
        }
    }
    let spec = Arc::new(spec);
    let tasks: Vec<_> = machines
        .into_iter()
        .map(|m| {
            let spec = spec.clone();
            tokio::spawn(async move {
                let id = m.id.clone();
                run_machine(&spec, m, epoch)
                    .await
                    .with_context(|| format!("simulated machine {id}"))
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(
            t.await
                .map_err(|e| anyhow!("a simulated machine's task failed: {e}"))??,
        );
    }
    Ok(out)
}

/// The hello of a machine: its replication and disks.
fn hello(m: &MachineSpec) -> ReplicationInfo {
    ReplicationInfo {
        replication_id: m.id.clone(),
        machine_id: m.id.clone(),
        disks: m
            .disks
            .iter()
            .enumerate()
            .map(|(i, (name, size))| DiskInfo {
                index: i as u32,
                name: name.clone(),
                size: *size,
            })
            .collect(),
    }
}

/// The source images of a verified machine, created sparse at their sizes.
fn open_sources(m: &MachineSpec) -> Result<Vec<std::fs::File>> {
    let Some(dir) = &m.source_dir else {
        return Ok(Vec::new());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    m.disks
        .iter()
        .map(|(name, size)| {
            let path = source_path(dir, name);
            let f = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            f.set_len(*size)?;
            Ok(f)
        })
        .collect()
}

/// The source image of `disk` in a verified machine's `dir`.
pub fn source_path(dir: &Path, disk: &str) -> PathBuf {
    dir.join(format!("{disk}.img"))
}

/// The durable seq the PS reported last, and a wake-up for each answer.
struct Acks {
    durable: AtomicU64,
    changed: Notify,
}

async fn run_machine(spec: &LoadSpec, m: MachineSpec, epoch: Instant) -> Result<MachineRun> {
    let tls = TlsFiles::in_dir(&spec.certs, &format!("agent-{}", m.id));
    let ch = tls
        .connect(&spec.ps_addr, &spec.server_name, Role::Ps)
        .await
        .with_context(|| format!("connecting to the PS at {}", spec.ps_addr))?;
    let mut client = ProcessServerClient::new(ch).max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<IngestRequest>(4);
    tx.send(IngestRequest {
        msg: Some(ReqMsg::Hello(hello(&m))),
    })
    .await
    .map_err(|_| anyhow!("the ingest stream closed before the hello"))?;
    let mut answers = client
        .ingest(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow!("Ingest at the PS: {s}"))?
        .into_inner();
    let resume = match answers.message().await {
        Ok(Some(r)) => match r.msg {
            Some(RespMsg::ResumeSeq(n)) => n,
            other => bail!("the PS answered the hello with {other:?}, not a resume seq"),
        },
        Ok(None) => bail!("the PS closed the stream after the hello"),
        Err(s) => bail!("the PS refused the hello: {s}"),
    };
    let acks = Arc::new(Acks {
        durable: AtomicU64::new(resume),
        changed: Notify::new(),
    });
    let reader = {
        let acks = acks.clone();
        tokio::spawn(async move {
            loop {
                match answers.message().await {
                    Ok(Some(r)) => {
                        if let Some(RespMsg::DurableSeq(n)) = r.msg {
                            acks.durable.fetch_max(n, Ordering::Relaxed);
                            acks.changed.notify_waiters();
                        }
                    }
                    Ok(None) => return Ok(()),
                    Err(s) => {
                        acks.changed.notify_waiters();
                        return Err(anyhow!("the PS ended the ingest stream: {s}"));
                    }
                }
            }
        })
    };

    let sources = open_sources(&m)?;
    let mut rng = Rng::new(m.seed);
    let mut run = MachineRun {
        id: m.id.clone(),
        ..MachineRun::default()
    };
    let mut next_seq = resume + 1;
    let mut queue: VecDeque<Frame> = VecDeque::new();

    // The initial resync window: nothing differs between zero disks.
    let mut b = FrameBuilder::new(&m.id, next_seq);
    b.push(&Record::ResyncBegin {
        disks: (0..m.disks.len() as u32).collect(),
        reason: "initial".into(),
    });
    b.push(&Record::ResyncEnd);
    next_seq = b.next_seq();
    let f = b.finish();
    let mut queued_bytes = f.body.len();
    queue.push_back(f);

    let start = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tag = Instant::now();
    while start.elapsed() < spec.duration {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                let due = spec.rate * now.duration_since(start).as_secs_f64() - run.bytes_written as f64
                    - run.overflow_bytes as f64;
                let n = (due / WRITE_SIZE as f64).floor() as usize;
                let tag = now.duration_since(last_tag) >= spec.tag_every;
                if n == 0 && !tag {
                    continue;
                }
                if queued_bytes >= BUFFER_BYTES {
                    run.overflow_bytes += (n * WRITE_SIZE) as u64;
                    if n > 0 && run.first_overflow.is_none() {
                        run.first_overflow = Some(now.duration_since(epoch).as_secs_f64());
                    }
                } else {
                    let mut b = FrameBuilder::new(&m.id, next_seq);
                    for _ in 0..n {
                        let (disk, off, data) = one_write(&mut rng, &m, &spec.pool);
                        b.push_write(disk, off, data);
                        if let Some(f) = sources.get(disk as usize) {
                            f.write_all_at(data, off).context("writing a verified machine's source image")?;
                        }
                    }
                    run.bytes_written += (n * WRITE_SIZE) as u64;
                    if tag {
                        last_tag = now;
                        b.push(&Record::Tag(Tag {
                            id: format!("crash-{}", b.next_seq()),
                            kind: TagKind::Crash,
                            time_ms: rebound_common::time::now_ms(),
                            group: String::new(),
                        }));
                    }
                    next_seq = b.next_seq();
                    let f = b.finish();
                    run.captured.push((f.header.last_seq, now.duration_since(epoch).as_secs_f64()));
                    queued_bytes += f.body.len();
                    queue.push_back(f);
                }
            }
            _ = acks.changed.notified() => {}
        }
        send_ready(&tx, &acks, &mut queue, &mut queued_bytes, &mut run).await?;
        if reader.is_finished() {
            break;
        }
    }
    // Hand over what is buffered, then wait until the PS holds all of it.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !queue.is_empty() || acks.durable.load(Ordering::Relaxed) < run.last_seq {
        if reader.is_finished() || Instant::now() > deadline {
            break;
        }
        send_ready(&tx, &acks, &mut queue, &mut queued_bytes, &mut run).await?;
        let _ = tokio::time::timeout(Duration::from_millis(100), acks.changed.notified()).await;
    }
    let durable = acks.durable.load(Ordering::Relaxed);
    drop(tx);
    if durable < run.last_seq || !queue.is_empty() {
        let why = match tokio::time::timeout(Duration::from_secs(5), reader).await {
            Ok(Ok(Err(e))) => format!("{e:#}"),
            _ => "no answer within 300 s".into(),
        };
        bail!(
            "the PS holds only up to seq {durable} of {} ({} frames unsent): {why}",
            run.last_seq,
            queue.len()
        );
    }
    Ok(run)
}

/// Sends queued frames while fewer than [`MAX_IN_FLIGHT`] are not durable.
async fn send_ready(
    tx: &mpsc::Sender<IngestRequest>,
    acks: &Acks,
    queue: &mut VecDeque<Frame>,
    queued_bytes: &mut usize,
    run: &mut MachineRun,
) -> Result<()> {
    while let Some(f) = queue.front() {
        let in_flight_frames = run.frames.saturating_sub(frames_durable(acks, run));
        if in_flight_frames >= MAX_IN_FLIGHT {
            break;
        }
        let last = f.header.last_seq;
        let Some(f) = queue.pop_front() else { break };
        *queued_bytes -= f.body.len();
        tx.send(IngestRequest {
            msg: Some(ReqMsg::Frame(f.to_bytes().into())),
        })
        .await
        .map_err(|_| anyhow!("the ingest stream closed"))?;
        run.frames += 1;
        run.last_seq = last;
        run.sent_last.push_back(last);
    }
    Ok(())
}

/// Frames whose last seq the PS holds durably.
fn frames_durable(acks: &Acks, run: &mut MachineRun) -> u64 {
    let durable = acks.durable.load(Ordering::Relaxed);
    while run.sent_last.front().is_some_and(|&s| s <= durable) {
        run.sent_last.pop_front();
        run.acked_frames += 1;
    }
    run.acked_frames
}

/// One write: a disk, a 4 KiB aligned offset and data cut from the pool.
/// Every disk holds at least one write ([`run`] refuses smaller ones).
fn one_write<'a>(rng: &mut Rng, m: &MachineSpec, pool: &'a [u8]) -> (u32, u64, &'a [u8]) {
    let disk = rng.below(m.disks.len() as u64) as usize;
    let size = m.disks[disk].1;
    let blocks = size.saturating_sub(WRITE_SIZE as u64) / 4096;
    let off = rng.below(blocks + 1) * 4096;
    let at = rng.below((pool.len() - WRITE_SIZE) as u64 / 4096 + 1) as usize * 4096;
    (disk as u32, off, &pool[at..at + WRITE_SIZE])
}
