//! Resync by hash comparison (DESIGN.md §4 "ResyncBegin … ResyncEnd",
//! §5 "Resync source").
//!
//! Used for initial replication (every chunk), after a crash (the dirty
//! extents) and after bitmap mode (the extents written meanwhile). For each
//! run of extents the agent asks the replica's 1 MiB chunk hashes (through
//! the PS, which proxies to the MT), compares them with its own, asks 64 KiB
//! sub-chunk hashes for the chunks that differ, and sends only the differing
//! sub-chunks: read and appended under the ordering point, `Zero` when all
//! zero. A chunk the replica holds as all zeroes needs no second round trip,
//! and a batch it holds as all zeroes (an initial replication) no local
//! hashing: the copy sends the sub-chunks that are not zero.
//!
//! The hash requests of a batch carry `min_applied_seq` = the last seq in
//! the stream when the batch's extents were taken, and local hashes are
//! computed after the answer. Every change missing from the stream is older
//! than that seq, so every record the replica has not applied yet is newer
//! than all of them: equal hashes then mean the replica, once it applies the
//! records in flight, equals the source there. (Waiting only for the batch
//! start, not for the resync records just sent, keeps the pipeline full.)
//!
//! The comparison is pipelined, because each side's blake3 is the work: the
//! replica's hashes of the next batches are asked while the agent hashes the
//! current one, and the comparisons run ahead of the sub-chunk round trips
//! and the records. Each batch is still hashed locally only after its own
//! answer, and records are appended batch by batch in disk order, so a
//! failure knows which extents are done. Local hashing is in [`hash`].
//!
//! The driver runs windows while the link is up and the buffer has room; a
//! failure gives the unfinished extents back and retries, the window stays
//! open (no tag) until everything is through.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::Either;
use futures::StreamExt;
use rebound_common::chunk::{chunk_hashes, zero_hash, CHUNK_SIZE, SUB_CHUNK_SIZE};
use rebound_proto::process_server_client::ProcessServerClient;
use rebound_proto::{ChunkHashesRequest, ReplicationInfo};
use thiserror::Error;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::capture::{Capture, CaptureError};
use crate::page_cache::Residency;
use crate::sender::Link;

/// Chunks per first-level hash request (64 MiB of disk).
const HASH_BATCH: u64 = 64;
/// First-level batches in comparison at once: the replica hashes the next
/// ones while the agent hashes this one (each side on its own core).
const PIPELINE_DEPTH: usize = 3;
/// Chunks per sub-chunk hash request.
const SUB_BATCH_CHUNKS: u64 = 16;
/// How often the idle driver checks whether a resync is wanted (a hello or
/// an acknowledgement wakes it sooner).
const IDLE_POLL: Duration = Duration::from_millis(100);
/// How often it checks for the link and buffer room once work is pending.
const WANTED_POLL: Duration = Duration::from_millis(5);
/// How often a long resync logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ResyncError {
    #[error("chunk hashes of disk {disk} at offset {offset} from the process server: {message}")]
    Rpc {
        disk: u32,
        offset: u64,
        message: String,
    },
    #[error("the replica answered {got} bytes of hashes for {count} chunks of disk {disk} at offset {offset}")]
    BadAnswer {
        disk: u32,
        offset: u64,
        got: usize,
        count: u64,
    },
    #[error("hashing disk {disk} at offset {offset}: {source}")]
    LocalHash {
        disk: String,
        offset: u64,
        source: std::io::Error,
    },
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("not connected to the process server")]
    NotConnected,
    #[error("stopping")]
    Stopped,
}

/// Where the replica's chunk hashes come from (the PS in production, a local
/// file in tests).
pub trait HashSource {
    /// `count * 32` bytes of blake3 hashes of the replica's chunks, once it
    /// has applied at least `min_applied_seq`.
    fn chunk_hashes(
        &self,
        disk: u32,
        offset: u64,
        chunk_size: u32,
        count: u32,
        min_applied_seq: u64,
    ) -> impl Future<Output = Result<Vec<u8>, ResyncError>> + Send;
}

/// The replica's hashes through the process server's `ChunkHashes`.
pub struct PsHashSource {
    client: ProcessServerClient<Channel>,
    info: ReplicationInfo,
    /// Hash the MT's view of this recovery point, not its replica now.
    point_id: String,
}

impl PsHashSource {
    pub fn new(channel: Channel, info: ReplicationInfo) -> Self {
        PsHashSource {
            client: ProcessServerClient::new(channel),
            info,
            point_id: String::new(),
        }
    }

    /// Asks the hashes of the MT's view of recovery point `id` instead
    /// (`rebound verify`).
    pub fn at_point(mut self, id: &str) -> Self {
        self.point_id = id.to_string();
        self
    }
}

impl HashSource for PsHashSource {
    fn chunk_hashes(
        &self,
        disk: u32,
        offset: u64,
        chunk_size: u32,
        count: u32,
        min_applied_seq: u64,
    ) -> impl Future<Output = Result<Vec<u8>, ResyncError>> + Send {
        let mut client = self.client.clone();
        let mut req = tonic::Request::new(ChunkHashesRequest {
            replication_id: self.info.replication_id.clone(),
            disk,
            offset,
            chunk_size,
            count,
            min_applied_seq,
            info: Some(self.info.clone()),
            point_id: self.point_id.clone(),
        });
        req.set_timeout(Duration::from_secs(120));
        async move {
            let resp = client
                .chunk_hashes(req)
                .await
                .map_err(|s| ResyncError::Rpc {
                    disk,
                    offset,
                    message: format!("{}: {}", s.code(), s.message()),
                })?;
            Ok(resp.into_inner().hashes)
        }
    }
}

/// Running totals of one driver, for progress lines.
#[derive(Debug)]
pub struct Progress {
    pub compared: u64,
    pub total: u64,
    last_log: Instant,
}

impl Progress {
    pub fn new(total: u64) -> Self {
        Progress {
            compared: 0,
            total,
            last_log: Instant::now(),
        }
    }
    fn advance(&mut self, cap: &Capture, bytes: u64) {
        self.compared += bytes;
        if self.last_log.elapsed() >= PROGRESS_EVERY {
            self.last_log = Instant::now();
            let s = cap.snapshot();
            info!(
                compared_mib = self.compared >> 20,
                total_mib = self.total >> 20,
                resync_bytes_sent = s.resync_bytes_sent,
                "resync progress: {} of {} MiB compared",
                self.compared >> 20,
                self.total >> 20
            );
        }
    }
}

/// The local disk's hashes of `count` chunks from `offset` (none unless
/// `hash`), and which of those pages were cached before they were read (see
/// [`Residency`]).
async fn local_hashes(
    cap: &Arc<Capture>,
    disk: u32,
    offset: u64,
    chunk: u64,
    count: u64,
    hash: bool,
) -> Result<(Vec<u8>, Option<Residency>), ResyncError> {
    let d = cap.disks()[disk as usize].clone();
    tokio::task::spawn_blocking(move || {
        let len = (chunk * count).min(d.size() - offset);
        let residency = Residency::take(d.file(), offset, len);
        if !hash {
            return Ok((Vec::new(), residency));
        }
        chunk_hashes(d.file(), d.size(), offset, chunk as u32, count as u32)
            .map(|h| (h, residency))
            .map_err(|source| ResyncError::LocalHash {
                disk: d.name.clone(),
                offset,
                source,
            })
    })
    .await
    .map_err(|e| ResyncError::LocalHash {
        disk: disk.to_string(),
        offset,
        source: std::io::Error::other(e.to_string()),
    })?
}

async fn remote_hashes<H: HashSource>(
    cap: &Capture,
    src: &H,
    target: &Target,
    offset: u64,
    chunk: u64,
    count: u64,
) -> Result<Vec<u8>, ResyncError> {
    let (disk, min) = (target.disk, target.min_seq);
    // Hand the partial frame over now: the replica may wait for its records.
    cap.stream().request_flush();
    let h = src
        .chunk_hashes(disk, offset, chunk as u32, count as u32, min)
        .await?;
    if h.len() as u64 != count * 32 {
        return Err(ResyncError::BadAnswer {
            disk,
            offset,
            got: h.len(),
            count,
        });
    }
    Ok(h)
}

/// Waits until the buffer has room for `bytes` of resync records (resync
/// never pushes the agent into bitmap mode; it waits for the link).
async fn wait_for_space(cap: &Capture, bytes: u64) {
    let mut rx = cap.stream().durable_watch();
    loop {
        let b = cap.stream().buffer_bytes();
        if b == 0 || b + bytes <= cap.stream().buffer_limit() * 3 / 4 {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
    }
}

async fn copy(
    cap: &Arc<Capture>,
    disk: u32,
    offset: u64,
    len: u64,
    skip_zero: bool,
) -> Result<(), ResyncError> {
    wait_for_space(cap, len + 64).await;
    let c = cap.clone();
    tokio::task::spawn_blocking(move || c.resync().copy(disk, offset, len, skip_zero))
        .await
        .map_err(|e| ResyncError::LocalHash {
            disk: disk.to_string(),
            offset,
            source: std::io::Error::other(e.to_string()),
        })??;
    Ok(())
}

/// Splits ascending `items` into runs of consecutive values, at most `max`
/// long: (first, length).
fn runs(items: &[u64], max: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &i in items {
        match out.last_mut() {
            Some((s, n)) if *s + *n == i && *n < max => *n += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

/// What a hash request is about: the disk, and the seq the replica must
/// have applied before it answers.
struct Target {
    disk: u32,
    min_seq: u64,
}

/// Compares `exts` (ascending extent numbers) of `disk` with the replica and
/// appends resync records for what differs. `min_seq` is the seq handed to
/// the stream when the extents were taken ([`crate::capture::Batch`]): the
/// replica's hashes must include every record up to it, so that every
/// change missing from the stream is older than the records it has not
/// applied yet. On error, says how many of `exts` were completely done.
///
/// Pipelined: up to [`PIPELINE_DEPTH`] batches are compared at once (the
/// replica's hashes of the next batches are asked while this one is hashed
/// locally), and the comparisons run ahead of the records being appended.
/// Each batch still hashes locally only after its replica answer, and the
/// records of the batches are appended in order.
pub async fn resync_extents<H: HashSource>(
    cap: &Arc<Capture>,
    src: &H,
    disk: u32,
    min_seq: u64,
    exts: &[u64],
    progress: &mut Progress,
    stop: &watch::Receiver<bool>,
) -> Result<(), (usize, ResyncError)> {
    let size = cap.disks()[disk as usize].size();
    let t = Target { disk, min_seq };
    let batches = runs(exts, HASH_BATCH);
    let (tx, mut rx) = tokio::sync::mpsc::channel(PIPELINE_DEPTH);
    let t = &t;
    let compare = async move {
        let mut compared = futures::stream::iter(batches.iter().copied())
            .map(|(first, count)| compare_batch(cap, src, t, size, first, count))
            .buffered(PIPELINE_DEPTH);
        while let Some(r) = compared.next().await {
            let failed = r.is_err();
            if tx.send(r).await.is_err() || failed {
                break;
            }
        }
    };
    let act = async {
        let mut done = 0usize;
        loop {
            if *stop.borrow() {
                return Err((done, ResyncError::Stopped));
            }
            let c = match rx.recv().await {
                None => return Ok(()),
                Some(Err(e)) => return Err((done, e)),
                Some(Ok(c)) => c,
            };
            send_differences(cap, src, t, size, &c)
                .await
                .map_err(|e| (done, e))?;
            // The batch is hashed and what differs is read into the buffer:
            // the pages the scan brought into the cache go (`page_cache`).
            if let Some(r) = &c.residency {
                r.restore(cap.disks()[disk as usize].file());
            }
            done += c.count as usize;
            progress.advance(cap, c.count * CHUNK_SIZE);
        }
    };
    let (compare, act) = (std::pin::pin!(compare), std::pin::pin!(act));
    match futures::future::select(act, compare).await {
        Either::Left((r, _)) => r,
        Either::Right(((), act)) => act.await,
    }
}

/// One first-level batch, compared.
struct Compared {
    /// Which of the batch's pages were cached before it was hashed.
    residency: Option<Residency>,
    /// Extents the batch covers (some may be past the end of the disk).
    count: u64,
    /// Chunks the replica holds as all zeroes: (offset, length).
    zero: Vec<(u64, u64)>,
    /// Other differing chunks, ascending.
    differing: Vec<u64>,
}

/// Asks the replica's hashes of `count` chunks from chunk `first`, then
/// hashes them locally, and says which differ.
async fn compare_batch<H: HashSource>(
    cap: &Arc<Capture>,
    src: &H,
    t: &Target,
    size: u64,
    first: u64,
    count: u64,
) -> Result<Compared, ResyncError> {
    let mut c = Compared {
        residency: None,
        count,
        zero: Vec::new(),
        differing: Vec::new(),
    };
    let offset = first * CHUNK_SIZE;
    if offset >= size {
        return Ok(c);
    }
    let n = count.min((size - offset).div_ceil(CHUNK_SIZE));
    let remote = remote_hashes(cap, src, t, offset, CHUNK_SIZE, n).await?;
    let chunk = |i: u64| {
        let c_off = offset + i * CHUNK_SIZE;
        (c_off, CHUNK_SIZE.min(size - c_off))
    };
    let zero_replica = (0..n).all(|i| remote[i as usize * 32..][..32] == zero_hash(chunk(i).1));
    // A chunk the replica holds as zeroes differs exactly where the source
    // is not all zero, which the copy checks sub-chunk by sub-chunk anyway:
    // a batch the replica holds as zeroes (an initial replication) needs no
    // local hashes.
    let (local, residency) =
        local_hashes(cap, t.disk, offset, CHUNK_SIZE, n, !zero_replica).await?;
    c.residency = residency;
    for i in 0..n {
        let r = &remote[i as usize * 32..i as usize * 32 + 32];
        if !zero_replica && r == &local[i as usize * 32..i as usize * 32 + 32] {
            continue;
        }
        let (c_off, c_len) = chunk(i);
        if r == zero_hash(c_len) {
            c.zero.push((c_off, c_len));
        } else {
            c.differing.push(first + i);
        }
    }
    Ok(c)
}

/// Appends the records for a compared batch: the non-zero sub-chunks of the
/// chunks the replica holds as zeroes (no second round trip), and for the
/// other differing chunks the sub-chunks whose 64 KiB hashes differ.
async fn send_differences<H: HashSource>(
    cap: &Arc<Capture>,
    src: &H,
    t: &Target,
    size: u64,
    c: &Compared,
) -> Result<(), ResyncError> {
    let disk = t.disk;
    for &(c_off, c_len) in &c.zero {
        copy(cap, disk, c_off, c_len, true).await?;
    }
    for (g_first, g_count) in runs(&c.differing, SUB_BATCH_CHUNKS) {
        let g_off = g_first * CHUNK_SIZE;
        let g_len = (g_count * CHUNK_SIZE).min(size - g_off);
        let n_sub = g_len.div_ceil(SUB_CHUNK_SIZE);
        let remote = remote_hashes(cap, src, t, g_off, SUB_CHUNK_SIZE, n_sub).await?;
        let (local, _) = local_hashes(cap, disk, g_off, SUB_CHUNK_SIZE, n_sub, true).await?;
        let subs: Vec<u64> = (0..n_sub)
            .filter(|&j| {
                remote[j as usize * 32..j as usize * 32 + 32]
                    != local[j as usize * 32..j as usize * 32 + 32]
            })
            .collect();
        for (s_first, s_count) in runs(&subs, CHUNK_SIZE / SUB_CHUNK_SIZE) {
            let s_off = g_off + s_first * SUB_CHUNK_SIZE;
            let s_len = (s_count * SUB_CHUNK_SIZE).min(size - s_off);
            copy(cap, disk, s_off, s_len, false).await?;
        }
    }
    Ok(())
}

/// Writes the `initialized` marker once the PS holds the end of the initial
/// replication (`seq`); until then a restart runs the initial resync again.
async fn mark_initialized(
    cap: Arc<Capture>,
    marker: PathBuf,
    seq: u64,
    mut stop: watch::Receiver<bool>,
) {
    let mut rx = cap.stream().durable_watch();
    loop {
        if *rx.borrow_and_update() >= seq {
            break;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = stop.changed() => if *stop.borrow() { return },
        }
    }
    let r = tokio::task::spawn_blocking(move || {
        rebound_common::durable::write_atomic(&marker, format!("{{\"seq\":{seq}}}\n").as_bytes())
            .map_err(|e| format!("{}: {e}", marker.display()))
    })
    .await;
    match r {
        Ok(Ok(())) => info!(seq, "initial replication is durable at the process server"),
        Ok(Err(e)) => warn!("cannot write the initialized marker {e}; the next start will compare every chunk again"),
        Err(e) => warn!("cannot write the initialized marker: {e}"),
    }
}

/// Runs resync windows whenever the stream needs one, until `stop`.
pub async fn driver(
    cap: Arc<Capture>,
    link: Arc<Link>,
    info: ReplicationInfo,
    initialized_marker: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    let mut progress = Progress::new(0);
    let mut durable = cap.stream().durable_watch();
    loop {
        // Wait for work, a live link and room in the buffer. A hello (the
        // resume point) and every acknowledgement move the durable seq, so
        // the wait ends as soon as they come, not at the next poll; the
        // link is marked up just after the hello, hence the short poll
        // while work is pending.
        loop {
            if *stop.borrow() {
                return;
            }
            let wanted = cap.resync().wanted();
            if wanted
                && link.is_connected()
                && cap.stream().buffer_bytes() < cap.stream().buffer_limit() / 2
            {
                break;
            }
            let poll = if wanted { WANTED_POLL } else { IDLE_POLL };
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = durable.changed() => {}
                _ = stop.changed() => {}
            }
        }
        if let Some(batch) = cap.resync().next_batch() {
            if batch.full {
                let m = initialized_marker.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if m.exists() {
                        let _ = std::fs::remove_file(&m);
                        if let Some(dir) = m.parent() {
                            let _ = rebound_common::durable::fsync_dir(dir);
                        }
                    }
                })
                .await;
            }
            let total: u64 = batch
                .disks
                .iter()
                .map(|(_, e)| e.len() as u64 * CHUNK_SIZE)
                .sum();
            if batch.opened {
                progress = Progress::new(total);
            } else {
                progress.total += total;
            }
            let failed = match link.channel() {
                None => Some((0, ResyncError::NotConnected)),
                Some(ch) => {
                    let src = PsHashSource::new(ch, info.clone());
                    let mut failed = None;
                    for (i, (disk, exts)) in batch.disks.iter().enumerate() {
                        if let Err((done, e)) = resync_extents(
                            &cap,
                            &src,
                            *disk,
                            batch.min_seq,
                            exts,
                            &mut progress,
                            &stop,
                        )
                        .await
                        {
                            cap.resync().requeue(*disk, &exts[done..]);
                            failed = Some((i + 1, e));
                            break;
                        }
                    }
                    failed
                }
            };
            if let Some((from, e)) = failed {
                for (disk, exts) in &batch.disks[from..] {
                    cap.resync().requeue(*disk, exts);
                }
                if matches!(e, ResyncError::Stopped) {
                    return;
                }
                if matches!(e, ResyncError::Capture(CaptureError::NotStreaming)) {
                    // Fenced (stopping): nothing more may enter the stream.
                    debug!("resync stopped: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
                warn!("resync paused: {e}; retrying in 2 s (the window stays open, no recovery point until it ends)");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        }
        if let Some(end) = cap.resync().finish() {
            info!(
                mode = "data",
                reason = %end.reason,
                resync_bytes = end.bytes,
                resync_chunks = end.chunks,
                elapsed_ms = end.elapsed.as_millis() as u64,
                end_seq = end.end_seq,
                tag = %end.tag,
                "resync end: {} bytes in {} sub-chunks sent; back to data mode",
                end.bytes,
                end.chunks
            );
            if end.full {
                tokio::spawn(mark_initialized(
                    cap.clone(),
                    initialized_marker.clone(),
                    end.tag_seq,
                    stop.clone(),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::tests::{drain, make_capture};
    use rebound_common::frame::Record;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    /// The "replica": a local file hashed like the MT would.
    struct LocalReplica {
        file: File,
        size: u64,
    }

    impl HashSource for LocalReplica {
        fn chunk_hashes(
            &self,
            _disk: u32,
            offset: u64,
            chunk_size: u32,
            count: u32,
            _min: u64,
        ) -> impl Future<Output = Result<Vec<u8>, ResyncError>> + Send {
            let r = rebound_common::chunk::chunk_hashes(
                &self.file, self.size, offset, chunk_size, count,
            )
            .map_err(|source| ResyncError::LocalHash {
                disk: "replica".into(),
                offset,
                source,
            });
            async move { r }
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    /// Runs one full window against `replica` and applies its records to it.
    async fn resync_once(cap: &Arc<Capture>, replica: &File, size: u64) -> (u64, u64) {
        let src = LocalReplica {
            file: replica.try_clone().unwrap(),
            size,
        };
        let (_tx, stop) = watch::channel(false);
        let b = cap.resync().next_batch().unwrap();
        let mut p = Progress::new(0);
        for (d, exts) in &b.disks {
            resync_extents(cap, &src, *d, b.min_seq, exts, &mut p, &stop)
                .await
                .map_err(|e| e.1)
                .unwrap();
        }
        let end = cap.resync().finish().unwrap();
        let recs = drain(cap);
        assert!(matches!(recs[0].1, Record::ResyncBegin { .. }));
        for (_, r) in recs {
            match r {
                Record::Write { offset, data, .. } => replica.write_all_at(&data, offset).unwrap(),
                Record::Zero { offset, len, .. } => replica
                    .write_all_at(&vec![0u8; len as usize], offset)
                    .unwrap(),
                _ => {}
            }
        }
        (end.bytes, end.chunks)
    }

    fn read_all(f: &File, size: u64) -> Vec<u8> {
        let mut v = vec![0u8; size as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[tokio::test]
    async fn empty_replica_gets_a_full_copy_then_only_differences() {
        let dir = tempfile::tempdir().unwrap();
        let size = (5 << 20) + 3 * 4096; // short last chunk
        let cap = make_capture(dir.path(), &[size], 64 << 20);
        let disk = cap.disks()[0].clone();
        // Source: data in chunk 0 and in the short tail chunk, chunk 2 half.
        disk.write_at(&pattern(1 << 20, 1), 0).unwrap();
        disk.write_at(&pattern(512 << 10, 2), 2 << 20).unwrap();
        disk.write_at(&pattern(3 * 4096, 3), 5 << 20).unwrap();
        let replica = tempfile::tempfile().unwrap();
        replica.set_len(size).unwrap();

        assert_eq!(
            cap.stream().on_resume(0),
            crate::capture::ResumeOutcome::Fresh
        );
        cap.resync().mark_need_all("initial");
        let (bytes, _) = resync_once(&cap, &replica, size).await;
        // Only non-zero data travelled: 1 MiB + 512 KiB + the 12 KiB tail.
        assert_eq!(bytes, (1 << 20) + (512 << 10) + 3 * 4096);
        assert_eq!(read_all(&replica, size), read_all(disk.file(), size));

        // Now near-identical: a few bytes differ in two sub-chunks.
        replica
            .write_all_at(&[0xee; 100], (2 << 20) + 70_000)
            .unwrap();
        replica.write_all_at(&[0xee; 1], 17).unwrap();
        cap.resync()
            .mark_need(0, &[0, 1, 2, 3, 4, 5], "crash-recovery");
        let (bytes, chunks) = resync_once(&cap, &replica, size).await;
        assert_eq!(chunks, 2);
        assert_eq!(bytes, 2 * SUB_CHUNK_SIZE);
        assert_eq!(read_all(&replica, size), read_all(disk.file(), size));

        // The replica holds data where the source is zero: sent as Zero.
        replica.write_all_at(&pattern(8192, 9), 4 << 20).unwrap();
        cap.resync().mark_need(0, &[4], "crash-recovery");
        let (bytes, chunks) = resync_once(&cap, &replica, size).await;
        assert_eq!((bytes, chunks), (0, 1));
        assert_eq!(read_all(&replica, size), read_all(disk.file(), size));
    }

    #[test]
    fn runs_split() {
        assert_eq!(
            runs(&[1, 2, 3, 7, 8, 10], 2),
            vec![(1, 2), (3, 1), (7, 2), (10, 1)]
        );
    }
}
