//! The process server (DESIGN.md §6): takes the agents' change streams,
//! caches every frame durably (group commit, torn-tail recovery, a size cap
//! with backpressure), compresses it, and forwards it in order to the master
//! target over one apply stream per replication. It also proxies the agents'
//! resync chunk-hash requests and reports cache use and lag.
//!
//! The binary is a thin `main` over [`run`], which takes a bound listener and
//! a shutdown future so tests can run many instances on port 0.

#![forbid(unsafe_code)]

pub mod authz;
pub mod cache;
pub mod config;
pub mod control;
pub mod forward;
pub mod ingest;
pub mod metrics;
pub mod segment;
pub mod service;
pub mod status;
#[cfg(test)]
mod tests;

pub use config::{Config, ConfigError, MtConfig};

use cache::{Cache, CacheError};
use forward::{Forwarders, MtLink, MAX_MESSAGE};
use ingest::IngestContext;
use rebound_common::metrics::{Endpoint, MetricsError, Readiness, Registry};
use rebound_common::serve;
use rebound_common::tls::{error_chain, ClientAuth, Revocations, TlsError};
use rebound_proto::process_server_server::ProcessServerServer;
use service::PsService;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

/// Period of the per-replication throughput/lag summary.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// How long open connections may take to finish after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the process server could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum PsError {
    #[error("invalid config: {0}")]
    Config(ConfigError),
    #[error("TLS setup failed: {0}")]
    Tls(TlsError),
    #[error("cannot open the cache: {0}")]
    Cache(CacheError),
    #[error("invalid config: [tls] cert {}: cannot read it ({source}); enroll first: rebound-ps enroll --cs ADDR --passphrase-file F --id ID --out DIR", path.display())]
    CertUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: [tls] cert {}: {why}", path.display())]
    CertInvalid { path: PathBuf, why: String },
    #[error("invalid config: [tls] cert {}: it is the certificate of {holder}; a process server needs a ps certificate: enroll with rebound-ps enroll", path.display())]
    NotPsCert { path: PathBuf, holder: String },
    #[error("cannot read the revocation list {}: {source}; fix its permissions, or remove it and let the configuration server send it again", path.display())]
    RevokedUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {}", error_chain(.0))]
    Serve(tonic::transport::Error),
    #[error("{0}")]
    Metrics(MetricsError),
    #[error("internal task failed: {0}")]
    Task(tokio::task::JoinError),
}

/// Runs the process server on `listener` until `shutdown` resolves. Every
/// frame it acknowledged is durable in the cache by then.
pub async fn run<F>(mut config: Config, listener: TcpListener, shutdown: F) -> Result<(), PsError>
where
    F: Future<Output = ()> + Send + 'static,
{
    config.validate().map_err(PsError::Config)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    // The metrics endpoint answers from the start: /healthz says 503 while
    // the cache is recovered below.
    let metrics_listener = rebound_common::metrics::bind(&config.metrics_listen)
        .await
        .map_err(PsError::Metrics)?;
    let (readiness, health) = Readiness::with_grpc_health().await;
    let metrics = Arc::new(metrics::PsMetrics::default());
    let scrape = Arc::new(OnceLock::new());
    if let Some(l) = metrics_listener {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut endpoint = Endpoint::new(registry, readiness.clone());
        endpoint.on_scrape(metrics::on_scrape(scrape.clone()));
        tokio::spawn(endpoint.serve(l, stop_rx.clone()));
    }
    // Renewal keeps the PS's renewed identity next to its cache; the server
    // and every client connection (MT, CS) use it once it exists.
    config.tls = config.tls.with_renewed(&config.cache_dir);
    let root = config.cache_dir.clone();
    let cap = config.cache_max_bytes;
    let cache = Arc::new(
        tokio::task::spawn_blocking(move || Cache::open(&root, cap))
            .await
            .map_err(PsError::Task)?
            .map_err(PsError::Cache)?,
    );
    let link = Arc::new(MtLink::new(
        config.tls.clone(),
        config.mt.addr.clone(),
        config.mt.server_name.clone(),
    ));
    let forwarders = Arc::new(Forwarders::new(link.clone()).counting(metrics));
    for rep in cache.replications() {
        if let Some(route) = forward::load_route(rep.dir()) {
            forwarders.set_route(rep.id(), &route);
        }
        forwarders.ensure(&rep);
    }
    let summary = tokio::spawn(summary_loop(cache.clone()));
    let status = Arc::new(status::StatusCell::default());
    tokio::spawn(status::status_task(
        cache.clone(),
        forwarders.clone(),
        status.clone(),
        stop_rx.clone(),
    ));
    let _ = scrape.set(metrics::Sources {
        cache: cache.clone(),
        forwarders: forwarders.clone(),
        status: status.clone(),
    });
    // The revocation list the CS pushes (SetRevoked), as last saved: the
    // gRPC acceptor refuses and cuts these certificates.
    let revoked_path = revoked_path(&config);
    let revocations =
        Revocations::load(&revoked_path).map_err(|source| PsError::RevokedUnreadable {
            path: revoked_path.clone(),
            source,
        })?;
    let acceptor = config
        .tls
        .acceptor(ClientAuth::Required, &revocations)
        .map_err(PsError::Tls)?;
    let managed = config.cs.enabled();
    if !managed {
        warn!("no configuration server ([cs] addr is empty): this process server is unmanaged (lab mode): an agent's first hello creates its replication and binds it to the agent's machine, and no revocation list arrives");
    }

    let ctx = IngestContext {
        cache: cache.clone(),
        forwarders: forwarders.clone(),
        compression_level: config.compression_level,
        stopping: stop_rx.clone(),
        managed,
    };
    let svc = ProcessServerServer::new(PsService::new(ctx))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);

    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| config.listen.clone());
    info!(
        listen = %local,
        cache_dir = %config.cache_dir.display(),
        cache_bytes = cache.account().total(),
        cache_max_bytes = cap,
        replications = cache.replications().len(),
        mt = %config.mt.addr,
        "process server listening"
    );
    let control = if config.cs.enabled() {
        let id = own_id(&config.tls)?;
        let ctl = Arc::new(control::PsControl {
            cache: cache.clone(),
            forwarders: forwarders.clone(),
            identity: control::Identity {
                id: id.clone(),
                site: config.site.clone(),
                addresses: vec![if config.advertise.is_empty() {
                    local.clone()
                } else {
                    config.advertise.clone()
                }],
                instance: instance_id(),
            },
            status,
            revocations: revocations.clone(),
            revoked_path,
        });
        info!(cs = %config.cs.addr, id = %id, site = %config.site, "control channel to the configuration server starting");
        rebound_common::tls::renewal::spawn_with_cs(
            &config.cs,
            &config.tls,
            &config.cache_dir,
            stop_rx.clone(),
        );
        Some(rebound_common::control::spawn(
            config.cs.clone(),
            config.tls.clone(),
            Arc::new(control::Handler(ctl)),
            stop_rx.clone(),
        ))
    } else {
        None
    };
    if let Some(h) = &control {
        link.set_events(h.clone());
        cache.account().set_events(h.clone());
    }
    let incoming = acceptor.incoming(listener);
    let stopping = readiness.clone();
    let signal = async move {
        shutdown.await;
        info!("process server shutting down");
        stopping.not_ready().await;
        stop_tx.send_replace(true);
    };
    let server = rebound_common::tls::frame_server()
        .add_service(svc)
        .add_service(health)
        .serve_with_incoming_shutdown(incoming, signal);
    // The cache is recovered and the listener bound: connections wait in
    // its backlog until the server below accepts them.
    rebound_common::service_manager::ready(&format!("serving on {local}"));
    readiness.ready().await;
    let result = serve::until_stopped(server, stop_rx.clone(), SHUTDOWN_GRACE, "connections")
        .await
        .map_err(PsError::Serve);

    drop(control);
    forwarders.shutdown();
    summary.abort();
    let c = cache.clone();
    tokio::task::spawn_blocking(move || c.shutdown())
        .await
        .map_err(PsError::Task)?;
    info!("process server stopped");
    result
}

#[derive(Default, Clone, Copy)]
struct Snapshot {
    frames_in: u64,
    bytes_in: u64,
    bytes_stored: u64,
    frames_forwarded: u64,
    bytes_forwarded: u64,
}

/// Logs a throughput/lag line per active replication every
/// `SUMMARY_INTERVAL` (never a line per frame).
async fn summary_loop(cache: Arc<Cache>) {
    let mut last: HashMap<String, Snapshot> = HashMap::new();
    let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
    tick.tick().await;
    let mut at = Instant::now();
    loop {
        tick.tick().await;
        let secs = at.elapsed().as_secs_f64().max(0.001);
        at = Instant::now();
        for rep in cache.replications() {
            let s = rep.stats();
            let now = Snapshot {
                frames_in: s.frames_in.load(Ordering::Relaxed),
                bytes_in: s.bytes_in.load(Ordering::Relaxed),
                bytes_stored: s.bytes_stored.load(Ordering::Relaxed),
                frames_forwarded: s.frames_forwarded.load(Ordering::Relaxed),
                bytes_forwarded: s.bytes_forwarded.load(Ordering::Relaxed),
            };
            let prev = last.insert(rep.id().to_string(), now).unwrap_or_default();
            let frames_in = now.frames_in - prev.frames_in;
            let frames_forwarded = now.frames_forwarded - prev.frames_forwarded;
            if frames_in == 0 && frames_forwarded == 0 {
                continue;
            }
            let mib = |b: u64| b as f64 / (1 << 20) as f64 / secs;
            let bytes_in = now.bytes_in - prev.bytes_in;
            let stored = now.bytes_stored - prev.bytes_stored;
            let (durable, applied) = (rep.durable(), rep.applied());
            info!(
                replication = %rep.id(),
                durable_seq = durable,
                applied_seq = applied,
                lag_seqs = durable.saturating_sub(applied),
                frames_in,
                in_mib_s = format!("{:.1}", mib(bytes_in)),
                stored_ratio = format!("{:.2}", if bytes_in > 0 { stored as f64 / bytes_in as f64 } else { 1.0 }),
                frames_forwarded,
                forwarded_mib_s = format!("{:.1}", mib(now.bytes_forwarded - prev.bytes_forwarded)),
                cache_bytes = rep.cache_bytes(),
                "replication throughput"
            );
        }
    }
}

/// Where the PS keeps the revocation list the CS pushed: next to its cache.
pub fn revoked_path(config: &Config) -> PathBuf {
    config.cache_dir.join("revoked")
}

/// This PS's id, from its certificate (CN `"ps:<id>"`): the hello to the CS
/// must carry the certificate's id.
pub fn own_id(tls: &rebound_common::tls::TlsFiles) -> Result<String, PsError> {
    let path = || tls.cert.clone();
    let pem = std::fs::read_to_string(&tls.cert).map_err(|source| PsError::CertUnreadable {
        path: path(),
        source,
    })?;
    let invalid = |why: String| PsError::CertInvalid { path: path(), why };
    let der =
        rebound_common::enrollment::first_cert_der(&pem).map_err(|e| invalid(e.to_string()))?;
    let who = rebound_common::pki::peer_identity(&der).map_err(|e| invalid(e.to_string()))?;
    if who.role != rebound_common::pki::Role::Ps {
        return Err(PsError::NotPsCert {
            path: path(),
            holder: who.to_string(),
        });
    }
    Ok(who.id)
}

pub use rebound_common::control::instance_id;
