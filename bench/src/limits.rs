//! Section 1, the machine's own limits measured in the same run: blake3 on
//! one core, zstd level 1 on the bench's data profiles, the data directory's
//! sequential write + fdatasync rate and fsync latency, and loopback mutual
//! TLS (raw rustls, and a tonic gRPC stream as the components use it).
//!
//! Every replication figure is bounded by these (the agent hashes, the
//! process server compresses and fsyncs, every hop is mTLS), so they are
//! what the bottleneck analysis compares against. The host's speed moves
//! within a run, so the rows a floor needs can be measured again beside the
//! figure the floor stands by ([`again`]).

use anyhow::{anyhow, Context, Result};
use rebound_common::tls::TlsFiles;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::profiles::Profile;
use crate::sampler::quantile;
use crate::usage::machine_busy_secs;
use crate::{mb, Bench};

pub fn run(b: &mut Bench) -> Result<()> {
    let p = b.plan.clone();
    b.set(
        "limits.blake3",
        mb(blake3_rate(p.limit_secs)),
        "16 MiB buffers, Hasher::update (no rayon)",
    );

    // zstd level 1 on 2 MiB frames of each profile (the PS's frame size).
    for prof in Profile::ALL {
        let (c_rate, d_rate, ratio) = zstd_rates(prof, p.limit_secs)?;
        let note = format!("2 MiB frames, ratio {ratio:.2}");
        b.set(
            &format!("limits.zstd.{}.compress", prof.id()),
            mb(c_rate),
            &note,
        );
        b.set(
            &format!("limits.zstd.{}.decompress", prof.id()),
            mb(d_rate),
            "MB/s of uncompressed output",
        );
    }

    // The data directory: sequential write with an fdatasync every 4 MiB,
    // then 4 KiB write + fdatasync latency.
    let path = b.dir.join("limits-disk.tmp");
    let (rate, lat) = disk(&path, p.disk_write_bytes, p.fsync_samples)?;
    let _ = std::fs::remove_file(&path);
    b.set(
        "limits.disk.seq_write_fsync",
        mb(rate),
        format!(
            "{} MiB in 1 MiB writes, fdatasync every 4 MiB, {}",
            p.disk_write_bytes >> 20,
            b.dir.display()
        ),
    );
    // Bulk: what a rollback, a cp or an MT batch does (write a lot, then
    // one fdatasync), so the device's sustained rate, not its cache.
    let (rate, write_cores) = machine_cores(|| bulk_write(&path, p.disk_bulk_bytes))?;
    let read_rate = bulk_read(&path, p.disk_bulk_bytes)?;
    let _ = std::fs::remove_file(&path);
    b.set(
        "limits.disk.bulk_write_fsync",
        mb(rate),
        format!(
            "{} MiB in 1 MiB writes, then one fdatasync",
            p.disk_bulk_bytes >> 20
        ),
    );
    b.set(
        "limits.cpu.durable_write",
        per_100_mb(write_cores, rate),
        format!("machine CPU ({write_cores:.2} cores) while the bulk write ran: page cache, writeback, fdatasync"),
    );
    b.set(
        "limits.disk.bulk_read",
        mb(read_rate),
        format!(
            "the same {} MiB dropped from the page cache, read back in 4 MiB reads",
            p.disk_bulk_bytes >> 20
        ),
    );
    b.set(
        "limits.disk.fsync_p50",
        quantile(&lat, 0.5),
        format!("{} samples", lat.len()),
    );
    b.set(
        "limits.disk.fsync_p99",
        quantile(&lat, 0.99),
        format!("max {:.1} ms", quantile(&lat, 1.0)),
    );

    // TLS record encryption alone, one core: what a stream costs per byte at
    // least, beside hashing (the 1 MiB cost note and the text-like
    // sustained note use it).
    let rate = seal_rate(p.limit_secs)?;
    b.set(
        "limits.tls.seal",
        mb(rate),
        "16 KiB records, TLS 1.3 AES-256-GCM, one output record allocated per record as rustls does",
    );

    // Loopback mTLS.
    let certs = b.dir.join("limits-certs");
    rebound_common::pki::write_dev_bundle(&certs, &["bench".to_string()])?;
    let (rate, rustls_cores) = machine_cores(|| rustls_rate(&certs, p.tls_bytes))?;
    b.set(
        "limits.tls.rustls",
        mb(rate),
        format!(
            "{} MiB, 1 MiB writes, AES-GCM (ring), client certificate",
            p.tls_bytes >> 20
        ),
    );
    let rustls_cpu = per_100_mb(rustls_cores, rate);
    let (rate, hop) = grpc_hop(b, &certs, p.tls_bytes)?;
    // The same with hyper's server defaults (1 MiB windows, 16 KiB frames),
    // which is what a server gets that does not set them.
    let default_windows =
        b.rt.block_on(grpc_rate(certs.clone(), p.tls_bytes / 16, false))
            .context("gRPC loopback, hyper defaults")?;
    b.set(
        "limits.tls.grpc",
        mb(rate),
        format!(
            "Ingest stream, 16/32 MiB HTTP/2 windows and {} KiB frames as the PS sets them ({:.0} MB/s with hyper's defaults: 1 MiB windows, 16 KiB frames)",
            rebound_common::tls::HTTP2_MAX_FRAME >> 10,
            mb(default_windows)
        ),
    );
    b.set(
        "limits.cpu.grpc_hop",
        hop,
        format!(
            "machine CPU ({:.2} cores) while the gRPC stream ran: both ends, TLS, HTTP/2, TCP ({rustls_cpu:.2} for the raw rustls stream)",
            hop * mb(rate) / 100.0
        ),
    );
    b.detail(
        "limits.grpc",
        serde_json::json!({"big_windows_mb_s": mb(rate), "default_windows_mb_s": mb(default_windows)}),
    );
    let _ = std::fs::remove_dir_all(&certs);
    Ok(())
}

/// Encrypts 16 KiB TLS 1.3 records with the suite the agent's stream
/// negotiates first (rustls with ring); bytes of plaintext/s on one core.
fn seal_rate(secs: f64) -> Result<f64> {
    use rustls::crypto::cipher::{AeadKey, Iv, OutboundChunks, OutboundPlainMessage};
    use rustls::{ContentType, ProtocolVersion, SupportedCipherSuite};
    let SupportedCipherSuite::Tls13(suite) =
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384
    else {
        return Err(anyhow!("TLS13_AES_256_GCM_SHA384 is not a TLS 1.3 suite"));
    };
    let mut enc = suite
        .aead_alg
        .encrypter(AeadKey::from([7u8; 32]), Iv::new([1u8; 12]));
    let data = Profile::Random.pool(1 << 20);
    let mut seq = 0u64;
    let mut err = None;
    let rate = repeat_rate(secs, data.len(), || {
        for rec in data.chunks(16 << 10) {
            let msg = OutboundPlainMessage {
                typ: ContentType::ApplicationData,
                version: ProtocolVersion::TLSv1_3,
                payload: OutboundChunks::Single(rec),
            };
            match enc.encrypt(msg, seq) {
                Ok(m) => {
                    std::hint::black_box(m);
                }
                Err(e) => err = Some(e),
            }
            seq += 1;
        }
    });
    match err {
        Some(e) => Err(anyhow!("TLS record encryption failed: {e}")),
        None => Ok(rate),
    }
}

/// Every limit row a floor is built from (blake3, zstd-1 both ways on
/// text-like frames, a gRPC mTLS hop's cost, a durable write's cost and
/// rate), measured again `when` in the run, the same way as in section 1
/// (see [`Bench::set_again`]). About 10 s on an otherwise idle machine.
pub fn again(b: &mut Bench, when: &str) -> Result<()> {
    let p = b.plan.clone();
    b.set_again("limits.blake3", mb(blake3_rate(p.limit_secs)), when);
    let (c_rate, d_rate, _) = zstd_rates(Profile::Text, p.limit_secs)?;
    b.set_again("limits.zstd.text.compress", mb(c_rate), when);
    b.set_again("limits.zstd.text.decompress", mb(d_rate), when);

    let path = b.dir.join("again-disk.tmp");
    let write = machine_cores(|| bulk_write(&path, p.disk_bulk_bytes));
    let _ = std::fs::remove_file(&path);
    let (rate, cores) = write?;
    b.set_again("limits.disk.bulk_write_fsync", mb(rate), when);
    b.set_again("limits.cpu.durable_write", per_100_mb(cores, rate), when);

    let certs = b.dir.join("again-certs");
    rebound_common::pki::write_dev_bundle(&certs, &["bench".to_string()])?;
    let hop = grpc_hop(b, &certs, p.tls_bytes);
    let _ = std::fs::remove_dir_all(&certs);
    b.set_again("limits.cpu.grpc_hop", hop?.1, when);
    Ok(())
}

/// blake3 on one core over 16 MiB buffers for about `secs`; bytes/s.
fn blake3_rate(secs: f64) -> f64 {
    let data = Profile::Random.pool(16 << 20);
    repeat_rate(secs, data.len(), || {
        let mut h = blake3::Hasher::new();
        h.update(&data);
        std::hint::black_box(h.finalize());
    })
}

/// zstd level 1 on a 2 MiB frame of `prof` (the PS's frame size), each way
/// for about `secs`: compress and decompress bytes/s of uncompressed data,
/// and the ratio.
fn zstd_rates(prof: Profile, secs: f64) -> Result<(f64, f64, f64)> {
    let frame = prof.pool(2 << 20);
    let comp = zstd::bulk::compress(&frame, 1).context("zstd compress")?;
    let c_rate = repeat_rate(secs, frame.len(), || {
        std::hint::black_box(zstd::bulk::compress(&frame, 1).map(|v| v.len()).ok());
    });
    let d_rate = repeat_rate(secs, frame.len(), || {
        std::hint::black_box(
            zstd::bulk::decompress(&comp, frame.len())
                .map(|v| v.len())
                .ok(),
        );
    });
    Ok((c_rate, d_rate, frame.len() as f64 / comp.len() as f64))
}

/// A tonic `Ingest` stream of `total` bytes set up as the PS sets it:
/// bytes/s, and the whole machine's cores per 100 MB/s meanwhile (both
/// ends, TLS, HTTP/2, TCP).
fn grpc_hop(b: &Bench, certs: &Path, total: u64) -> Result<(f64, f64)> {
    let (rate, cores) = machine_cores(|| {
        b.rt.block_on(grpc_rate(certs.to_path_buf(), total, true))
            .context("gRPC loopback")
    })?;
    Ok((rate, per_100_mb(cores, rate)))
}

/// Runs `f` and returns its result with the cores the whole machine was
/// busy meanwhile (all processes and the kernel: TCP, page cache,
/// writeback), so a limit row can say what its bytes cost, not only how
/// fast they went. The machine is otherwise idle while the limits run.
fn machine_cores<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let busy0 = machine_busy_secs().ok_or_else(|| anyhow!("cannot read /proc/stat"))?;
    let t = Instant::now();
    let out = f()?;
    let secs = t.elapsed().as_secs_f64();
    let busy1 = machine_busy_secs().ok_or_else(|| anyhow!("cannot read /proc/stat"))?;
    Ok((out, (busy1 - busy0) / secs.max(1e-6)))
}

/// Cores at `bytes_per_sec` → cores per 100 MB/s.
fn per_100_mb(cores: f64, bytes_per_sec: f64) -> f64 {
    cores / (mb(bytes_per_sec) / 100.0).max(1e-9)
}

/// Runs `f` (which processes `bytes`) repeatedly for about `secs`; bytes/s.
fn repeat_rate(secs: f64, bytes: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm up
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed().as_secs_f64() < secs || n == 0 {
        f();
        n += 1;
    }
    (n * bytes as u64) as f64 / t.elapsed().as_secs_f64()
}

/// `total` bytes of sequential 1 MiB writes of random data into a new
/// `path`, an fdatasync every `sync_every` bytes (if any) and one at the
/// end; the file and bytes/s.
fn sequential_write(
    path: &Path,
    total: u64,
    sync_every: Option<u64>,
) -> Result<(std::fs::File, f64)> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let buf = Profile::Random.pool(1 << 20);
    let t = Instant::now();
    let mut off = 0u64;
    while off < total {
        f.write_all_at(&buf, off)?;
        off += buf.len() as u64;
        if sync_every.is_some_and(|n| off.is_multiple_of(n)) {
            f.sync_data()?;
        }
    }
    f.sync_data()?;
    Ok((f, total as f64 / t.elapsed().as_secs_f64()))
}

/// `total` bytes of sequential 1 MiB writes, then one fdatasync (bytes/s).
fn bulk_write(path: &Path, total: u64) -> Result<f64> {
    Ok(sequential_write(path, total, None)?.1)
}

/// Reads `total` bytes of `path` from the device (its cached pages dropped
/// first with `posix_fadvise(DONTNEED)`) in 4 MiB reads (bytes/s): what a
/// scan of a disk that is not in the page cache gets.
fn bulk_read(path: &Path, total: u64) -> Result<f64> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    crate::sys::drop_from_page_cache(&f)
        .with_context(|| format!("posix_fadvise(DONTNEED) on {}", path.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    let t = Instant::now();
    let mut off = 0u64;
    while off < total {
        let n = (total - off).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off)?;
        off += n as u64;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

/// Sequential write + fdatasync every 4 MiB (bytes/s) and 4 KiB write +
/// fdatasync latencies (ms).
fn disk(path: &Path, total: u64, samples: usize) -> Result<(f64, Vec<f64>)> {
    let (f, rate) = sequential_write(path, total, Some(4 << 20))?;
    let buf = Profile::Random.pool(4096);
    let block = &buf[..];
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples as u64 {
        let t = Instant::now();
        f.write_all_at(block, (i % 256) * 4096)?;
        f.sync_data()?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((rate, lat))
}

fn load_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))
}

/// The certificate chain and key of one lab identity (`NAME.pem`, `NAME.key`).
fn identity(
    certs: &Path,
    name: &str,
) -> Result<(
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    use rustls::pki_types::pem::PemObject;
    let t = TlsFiles::in_dir(certs, name);
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&t.key)
        .with_context(|| format!("reading {}", t.key.display()))?;
    Ok((load_certs(&t.cert)?, key))
}

/// One mTLS stream over loopback with rustls (server thread + client); bytes/s.
fn rustls_rate(certs: &Path, total: u64) -> Result<f64> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&certs.join("ca.pem"))? {
        roots.add(c)?;
    }
    let roots = Arc::new(roots);
    let verifier = rustls::server::WebPkiClientVerifier::builder(roots.clone()).build()?;
    let (chain, key) = identity(certs, "ps")?;
    let server = Arc::new(
        rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?,
    );
    let (chain, key) = identity(certs, "agent-bench")?;
    let client = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?,
    );
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let srv = std::thread::spawn(move || -> Result<u64> {
        let (s, _) = listener.accept()?;
        let conn = rustls::ServerConnection::new(server)?;
        let mut tls = rustls::StreamOwned::new(conn, s);
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            match tls.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            }
            if got >= total {
                break;
            }
        }
        tls.write_all(b"k")?;
        tls.flush()?;
        Ok(got)
    });
    let s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let conn = rustls::ClientConnection::new(client, name)?;
    let mut tls = rustls::StreamOwned::new(conn, s);
    let buf = Profile::Random.pool(1 << 20);
    // Handshake first, so the rate is the data rate.
    tls.write_all(&buf[..1])?;
    tls.flush()?;
    let t = Instant::now();
    let mut sent = 1u64;
    while sent < total {
        let n = (total - sent).min(buf.len() as u64) as usize;
        tls.write_all(&buf[..n])?;
        sent += n as u64;
    }
    tls.flush()?;
    let mut ack = [0u8; 1];
    tls.read_exact(&mut ack)?;
    let secs = t.elapsed().as_secs_f64();
    let got = srv
        .join()
        .map_err(|_| anyhow!("the TLS server thread panicked"))??;
    if got < total {
        anyhow::bail!("the TLS server received {got} of {total} bytes");
    }
    Ok((total - 1) as f64 / secs)
}

/// A gRPC `Ingest` stream with mutual TLS to an in-process ProcessServer that
/// only counts bytes and acknowledges every frame; bytes/s. The client is
/// the project's (`TlsFiles::connect`: 16/32 MiB windows, `HTTP2_MAX_FRAME`);
/// `big_windows` builds the server as rebound-ps does
/// (`rebound_common::tls::frame_server`).
async fn grpc_rate(certs: std::path::PathBuf, total: u64, big_windows: bool) -> Result<f64> {
    use futures::StreamExt;
    use rebound_proto::ingest_request::Msg as ReqMsg;
    use rebound_proto::ingest_response::Msg as RespMsg;
    use rebound_proto::process_server_client::ProcessServerClient;
    use rebound_proto::process_server_server::ProcessServerServer;
    use rebound_proto::IngestRequest;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = TlsFiles::in_dir(&certs, "ps").acceptor(
        rebound_common::tls::ClientAuth::Required,
        &rebound_common::tls::Revocations::new(),
    )?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = if big_windows {
        rebound_common::tls::frame_server()
    } else {
        tonic::transport::Server::builder()
    };
    let server = tokio::spawn(
        builder
            .add_service(ProcessServerServer::new(CountingPs).max_decoding_message_size(64 << 20))
            .serve_with_incoming_shutdown(acceptor.incoming(listener), async {
                let _ = stop_rx.await;
            }),
    );
    let ch = TlsFiles::in_dir(&certs, "agent-bench")
        .connect(
            &addr.to_string(),
            "localhost",
            rebound_common::pki::Role::Ps,
        )
        .await?;
    let mut client = ProcessServerClient::new(ch).max_decoding_message_size(64 << 20);
    // Shared, not copied per message: the row measures the transport.
    let frame = tonic::codegen::Bytes::from(Profile::Random.pool(2 << 20));
    let n = total.div_ceil(frame.len() as u64);
    let (tx, rx) = tokio::sync::mpsc::channel::<IngestRequest>(4);
    let t = Instant::now();
    let feeder = tokio::spawn(async move {
        for _ in 0..n {
            if tx
                .send(IngestRequest {
                    msg: Some(ReqMsg::Frame(frame.clone())),
                })
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut answers = client
        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut acked = 0u64;
    while acked < n {
        match tokio::time::timeout(Duration::from_secs(60), answers.next()).await {
            Ok(Some(Ok(m))) => {
                if let Some(RespMsg::DurableSeq(d)) = m.msg {
                    acked = d;
                }
            }
            Ok(Some(Err(s))) => return Err(anyhow!("Ingest: {s}")),
            Ok(None) => break,
            Err(_) => return Err(anyhow!("Ingest: no answer within 60 s")),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let _ = feeder.await;
    let _ = stop_tx.send(());
    let _ = server.await;
    if acked < n {
        anyhow::bail!("the stream ended after {acked} of {n} frames");
    }
    Ok((n * (2 << 20)) as f64 / secs)
}

/// A ProcessServer that acknowledges frames without storing them.
struct CountingPs;

#[tonic::async_trait]
impl rebound_proto::process_server_server::ProcessServer for CountingPs {
    type IngestStream = std::pin::Pin<
        Box<
            dyn futures::Stream<Item = Result<rebound_proto::IngestResponse, tonic::Status>> + Send,
        >,
    >;

    async fn ingest(
        &self,
        request: tonic::Request<tonic::Streaming<rebound_proto::IngestRequest>>,
    ) -> Result<tonic::Response<Self::IngestStream>, tonic::Status> {
        use futures::StreamExt;
        use rebound_proto::ingest_response::Msg as RespMsg;
        let mut inbound = request.into_inner();
        let out = async_stream_acks(move |tx| async move {
            let mut seq = 0u64;
            while let Some(Ok(_m)) = inbound.next().await {
                seq += 1;
                if tx
                    .send(Ok(rebound_proto::IngestResponse {
                        msg: Some(RespMsg::DurableSeq(seq)),
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(out))
    }

    async fn chunk_hashes(
        &self,
        _r: tonic::Request<rebound_proto::ChunkHashesRequest>,
    ) -> Result<tonic::Response<rebound_proto::ChunkHashesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("bench server"))
    }

    async fn status(
        &self,
        _r: tonic::Request<rebound_proto::PsStatusRequest>,
    ) -> Result<tonic::Response<rebound_proto::PsStatusResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("bench server"))
    }
}

type Ack = Result<rebound_proto::IngestResponse, tonic::Status>;

/// Runs `f` with the sending half of a channel and streams what it sends.
fn async_stream_acks<F, Fut>(f: F) -> std::pin::Pin<Box<dyn futures::Stream<Item = Ack> + Send>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Ack>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
