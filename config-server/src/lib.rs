//! The configuration server (DESIGN.md §3, §8): enrollment of components,
//! the control channel every component holds, the state of the deployment
//! (SQLite or PostgreSQL behind one storage trait), the job engine, and the DR lifecycle
//! (protect, failover, change-point, commit, reprotect) driven over the
//! control channel.
//!
//! `main.rs` is a thin wrapper over [`init::init`] and [`run_with_lease`]
//! (which waits as a standby on PostgreSQL until this CS holds the store
//! lease); tests call [`run`] with a listener bound to port 0.

#![forbid(unsafe_code)]

pub mod admin_cert;
pub mod alerts;
pub mod backup;
pub mod bus;
pub mod ca_seal;
pub mod config;
pub mod control;
pub mod convert;
pub mod enrollment;
pub mod error;
pub mod fleet;
pub mod hooks;
pub mod init;
pub mod jobs;
pub mod lease;
pub mod lifecycle;
pub mod metrics;
pub mod renew;
pub mod service;
pub mod store;
pub mod tick;
pub mod tokens;

#[cfg(test)]
mod tests;

pub use bus::{Bus, BusError, CommandBus, ComponentKey, Reply};
pub use config::Config;
pub use enrollment::{enroll, enroll_with, EnrollError, EnrollOptions, Enrolled};
pub use error::CsError;
pub use jobs::JobEngine;
pub use lifecycle::{Lifecycle, PointSpec, Settings, Targets};
pub use store::{SqliteStore, Store};

use rebound_common::serve;
use rebound_common::tls::ClientAuth;
use rebound_proto::control::admin_server::AdminServer;
use rebound_proto::control::control_server::ControlServer;
use rebound_proto::control::enrollment_server::EnrollmentServer;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

/// How long shutdown waits for gRPC streams (control channels) to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long shutdown waits for the metrics endpoint's open connections.
const METRICS_STOP_GRACE: Duration = Duration::from_secs(5);

/// How long closing the store waits for connections in use: a statement
/// stuck in a network partition must not keep the CS from exiting.
const STORE_CLOSE_GRACE: Duration = Duration::from_secs(5);

fn read(what: &str, path: &std::path::Path) -> Result<String, CsError> {
    std::fs::read_to_string(path).map_err(|e| {
        CsError::io(
            format!(
                "cannot read the {what} {} (run `rebound-cs init --dir D` and use D/config.toml)",
                path.display()
            ),
            e,
        )
    })
}

/// The lifecycle settings a config gives.
pub fn settings(config: &Config) -> Settings {
    Settings {
        command_timeout: Duration::from_secs(config.command_timeout_secs.max(1)),
        drain_timeout: Duration::from_secs(config.drain_timeout_secs.max(1)),
        initial_sync_timeout: Duration::from_secs(config.initial_sync_timeout_secs.max(1)),
        wait_agent: Duration::from_secs(config.wait_agent_secs.max(1)),
        keep_source_copy: config.keep_source_copy,
        hook_dir: config.hook_dir.clone(),
        ..Settings::default()
    }
}

/// Runs the configuration server on `listener` until `shutdown` completes.
/// Every state change is in the database when it is acknowledged, so
/// stopping at any moment loses nothing; jobs that were running resume at
/// the next start. It serves without taking the store lease: a CS on
/// PostgreSQL that may have standbys runs with [`run_with_lease`].
pub async fn run<F>(config: Config, listener: TcpListener, shutdown: F) -> Result<(), CsError>
where
    F: Future<Output = ()> + Send + 'static,
{
    serve(config, Start::Bound(listener), shutdown).await
}

/// Runs the configuration server as `rebound-cs run` does: on SQLite it
/// binds `listen` and serves ([`run`]); on PostgreSQL it first waits as a
/// standby until it holds the store lease ([`lease`]) — metrics up,
/// `/healthz` 503, `rebound_cs_active` 0, `listen` not bound, so
/// components try the next CS at once — then binds `listen` and serves.
/// A lost lease stops the serving at once and returns
/// [`lease::LeaseError::Lost`], so the service manager restarts the CS as a
/// standby.
pub async fn run_with_lease<F>(config: Config, shutdown: F) -> Result<(), CsError>
where
    F: Future<Output = ()> + Send + 'static,
{
    if !config.store.is_postgres() {
        let listener = bind_listen(&config.listen).await?;
        return run(config, listener, shutdown).await;
    }
    serve(config, Start::Standby, shutdown).await
}

/// How [`serve`] gets its gRPC listener.
enum Start {
    /// Already bound: serve at once.
    Bound(TcpListener),
    /// Wait for the store lease, then bind `listen`.
    Standby,
}

/// Binds the gRPC `listen` address.
async fn bind_listen(addr: &str) -> Result<TcpListener, CsError> {
    TcpListener::bind(addr).await.map_err(|e| {
        CsError::io(
            format!(
                "cannot listen on {addr} (config key listen): is another process using that \
                 address?"
            ),
            e,
        )
    })
}

/// The store a log line names: the SQLite file or the PostgreSQL URL
/// without its password.
fn store_name(config: &Config) -> String {
    if config.store.is_postgres() {
        store::postgres::redact_url(&config.store.url)
    } else {
        config.db.display().to_string()
    }
}

/// Waits as a standby until this CS holds the store lease (or `stop`), then
/// binds `listen`. `None` when stopped first. Before it waits, it checks
/// that its `[store] secret_key_file` opens the CA sealed in the store: a
/// standby that could not serve refuses to start instead of failing at the
/// takeover, when no other CS serves.
async fn standby(
    config: &Config,
    cs_metrics: &metrics::CsMetrics,
    mut stop: watch::Receiver<bool>,
) -> Result<Option<(TcpListener, lease::Held)>, CsError> {
    cs_metrics.set_active(false);
    tokio::select! {
        checked = can_open_the_ca(config) => checked?,
        _ = stop.wait_for(|s| *s) => return Ok(None),
    }
    rebound_common::service_manager::ready("standby: waiting for the lease");
    let held = tokio::select! {
        held = lease::wait_for(&config.store.url, &config.listen) => held,
        _ = stop.wait_for(|s| *s) => return Ok(None),
    };
    // Unbound while waiting: a failed bind lets the lease go (dropped).
    let listener = bind_listen(&config.listen).await?;
    Ok(Some((listener, held)))
}

/// Fails unless `[store] secret_key_file` opens the CA sealed in the
/// store. A database that cannot be reached is retried (a standby outlives
/// a restart of PostgreSQL); a wrong key or a store without a CA is final.
async fn can_open_the_ca(config: &Config) -> Result<(), CsError> {
    ca_seal::SealKey::read(&config.store.secret_key_file)?;
    let store = loop {
        match store::open(&config.store, &config.db).await {
            Ok(s) => break s,
            Err(e @ store::StoreError::Connect { .. }) => {
                warn!("standby: {e}; trying again in {STORE_RETRY:?}");
                tokio::time::sleep(STORE_RETRY).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let checked = ca_seal::ca_key_pem(config, store.as_ref()).await;
    close_store(store.as_ref()).await;
    checked.map(|_| ())
}

/// How long a standby waits before it opens the store again.
const STORE_RETRY: Duration = Duration::from_secs(2);

/// Closes `store`, waiting at most [`STORE_CLOSE_GRACE`] for connections in
/// use.
async fn close_store(store: &dyn Store) {
    if tokio::time::timeout(STORE_CLOSE_GRACE, store.close())
        .await
        .is_err()
    {
        warn!("the store did not close within {STORE_CLOSE_GRACE:?}; leaving its connections");
    }
}

/// Opens the store; under the lease, fenced to its epoch (every write
/// checks that this CS still holds it).
async fn open_store(
    config: &Config,
    held: Option<&lease::Held>,
) -> Result<Arc<dyn Store>, CsError> {
    let Some(held) = held else {
        return Ok(store::open(&config.store, &config.db).await?);
    };
    let pg = store::PgStore::open(&config.store.url).await?;
    pg.fence(held.epoch);
    Ok(Arc::new(pg))
}

async fn serve<F>(mut config: Config, start: Start, shutdown: F) -> Result<(), CsError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let heartbeat = config
        .heartbeat()
        .map_err(|e| CsError::InvalidArgument(e.to_string()))?;
    // The CS renews its own certificate into its state directory; the
    // server presents the renewed one once it exists.
    config.tls.renewed = Some(renew::renewed_path(&config));
    // The CS's own copy of the revocation list (filled from the store
    // below): the acceptor refuses and cuts the revoked certificates.
    let revocations = rebound_common::tls::Revocations::new();
    // Enrollment needs TLS without a client certificate; every other RPC
    // checks the certificate's role itself (require_role).
    let acceptor = config
        .tls
        .acceptor(ClientAuth::Optional, &revocations)
        .map_err(|e| CsError::InvalidArgument(format!("[tls]: {e}")))?;
    let ca_pem = read("CA certificate ([tls] ca)", &config.tls.ca)?;
    let server_cert = read("CS certificate ([tls] cert)", &config.tls.cert)?;

    // A taken or bad metrics address is fatal at start, not found later.
    let metrics_listener = rebound_common::metrics::bind(&config.metrics_listen).await?;
    let (readiness, grpc_health) = rebound_common::metrics::Readiness::with_grpc_health().await;
    let (cs_metrics, registry) = metrics::CsMetrics::new();
    let endpoint = cs_metrics.endpoint(registry, readiness.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let on_signal = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = on_signal.send(true);
    });
    // Served from the start (a standby's too), so /healthz answers 503
    // while the CS waits or recovers and 200 once it serves.
    let metrics_task = metrics_listener.map(|l| tokio::spawn(endpoint.serve(l, stop_rx.clone())));
    let (listener, held) = match start {
        Start::Bound(l) => (l, None),
        Start::Standby => match standby(&config, &cs_metrics, stop_rx.clone()).await {
            Ok(Some((l, held))) => (l, Some(held)),
            stopped_or_failed => {
                let _ = stop_tx.send(true);
                if let Some(t) = metrics_task {
                    wait_or_drop(t, METRICS_STOP_GRACE, "the metrics endpoint").await;
                }
                return stopped_or_failed.map(|_| ());
            }
        },
    };
    cs_metrics.set_active(true);
    let store = open_store(&config, held.as_ref()).await?;
    let ca_key = ca_seal::ca_key_pem(&config, store.as_ref()).await?;
    let bus = Arc::new(CommandBus::new());
    let jobs = JobEngine::new(store.clone());
    let lifecycle = Lifecycle::new(store.clone(), bus.clone(), jobs.clone(), settings(&config));
    // Set when the lease is lost: this CS stops writing at once (its pool
    // closed, its jobs aborted; the fenced store refuses the rest), then
    // stops serving and exits with the error.
    let lost = Arc::new(std::sync::Mutex::new(None::<lease::LeaseError>));
    if let Some(held) = &held {
        let (loss, lost, stop_tx) = (held.loss(), lost.clone(), stop_tx.clone());
        let (store, jobs) = (store.clone(), jobs.clone());
        tokio::spawn(async move {
            let Some(e) = loss.wait().await else {
                return;
            };
            tracing::error!("{e}");
            let aborted = jobs.abort_all();
            close_store(store.as_ref()).await;
            warn!(aborted_jobs = aborted, "store closed after the lease loss");
            if let Ok(mut l) = lost.lock() {
                *l = Some(e);
            }
            let _ = stop_tx.send(true);
        });
    }
    let alerting = alerts::Alerts::new(
        store.clone(),
        bus.clone(),
        &config.alerts,
        heartbeat,
        cs_metrics,
    )
    .await?;

    let bus_at_stop = bus.clone();
    let mut stopping = stop_rx.clone();
    tokio::spawn(async move {
        let _ = stopping.wait_for(|s| *s).await;
        // Control streams never end by themselves: end them so the server
        // can stop. Components reconnect to the next CS process.
        for (key, conn) in bus_at_stop.connections() {
            bus_at_stop.kick(&key, conn.conn_id);
        }
    });

    let addr = listener
        .local_addr()
        .map_err(|e| CsError::io("cannot read the listener address", e))?;
    let resumed = jobs.resume_all().await?;
    let monitor = tokio::spawn(control::health_monitor(
        store.clone(),
        bus.clone(),
        heartbeat,
        stop_rx.clone(),
    ));
    let groups = tokio::spawn(lifecycle::group::scheduler(
        store.clone(),
        bus.clone(),
        lifecycle.settings().command_timeout,
        stop_rx.clone(),
    ));
    let verifies = tokio::spawn(lifecycle::verify::scheduler(
        lifecycle.clone(),
        Duration::from_secs(1),
        stop_rx.clone(),
    ));
    let alerting = tokio::spawn(alerts::run(alerting, stop_rx.clone()));
    info!(listen = %addr, store = %store_name(&config), resumed_jobs = resumed, "configuration server started");

    let signer = Arc::new(renew::Signer {
        ca_cert_pem: ca_pem.clone(),
        ca_key_pem: ca_key.clone(),
        lifetime: config.cert_lifetime,
    });
    let own_renewal = renew::spawn_own(&config, signer.clone(), store.clone(), stop_rx.clone());
    let enrollment =
        enrollment::EnrollmentService::new(store.clone(), ca_pem.clone(), ca_key, &server_cert)?
            .with_cert_lifetime(config.cert_lifetime)
            .with_renewed(renew::renewed_path(&config));
    fleet::revoke::refresh(store.as_ref(), &revocations).await?;
    let control = control::ControlService::new(store.clone(), bus.clone(), heartbeat)
        .with_revocations(revocations.clone())
        .with_signer(signer);
    let admin =
        service::AdminService::new(store.clone(), bus.clone(), jobs.clone(), lifecycle.clone())
            .with_revocations(revocations.clone())
            .with_ca_pem(ca_pem);
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(grpc_health)
        .add_service(EnrollmentServer::new(enrollment))
        .add_service(ControlServer::new(control))
        .add_service(AdminServer::new(admin))
        .serve_with_incoming_shutdown(acceptor.incoming(listener), serve::stopped(stop_rx.clone()));
    // Database open, interrupted jobs resumed, listener bound.
    rebound_common::service_manager::ready(&format!("serving on {addr}"));
    readiness.ready().await;
    let served = serve::until_stopped(server, stop_rx, SHUTDOWN_GRACE, "control streams")
        .await
        .map_err(|e| CsError::Internal(format!("gRPC server on {addr} failed: {e}")));
    readiness.not_ready().await;
    monitor.abort();
    groups.abort();
    verifies.abort();
    own_renewal.abort();
    // Stopped before the database closes: a round may be writing.
    alerting.abort();
    let _ = alerting.await;
    if let Some(t) = metrics_task {
        // A scraper holding its connection open must not keep the database
        // from closing.
        wait_or_drop(t, METRICS_STOP_GRACE, "the metrics endpoint").await;
    }
    close_store(store.as_ref()).await;
    // Let go only once this CS no longer writes: the standby takes over.
    if let Some(held) = held {
        held.release().await;
    }
    if let Some(e) = lost.lock().ok().and_then(|mut l| l.take()) {
        return Err(e.into());
    }
    info!("configuration server stopped");
    served
}

/// Waits at most `grace` for `task` to end, then drops it (logged).
async fn wait_or_drop(mut task: tokio::task::JoinHandle<()>, grace: Duration, what: &str) {
    if tokio::time::timeout(grace, &mut task).await.is_err() {
        warn!("{what} did not stop within {grace:?}; dropping it");
        task.abort();
    }
}

#[cfg(test)]
mod stop_tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_does_not_stop_is_dropped_after_the_grace() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // Holds `tx` until it is dropped: aborting it closes `rx`.
        let hung = tokio::spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        let started = std::time::Instant::now();
        wait_or_drop(hung, Duration::from_millis(50), "a hung task").await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(rx.await.is_err(), "the task still runs");
        // One that ends in time is simply awaited.
        wait_or_drop(tokio::spawn(async {}), Duration::from_secs(5), "a task").await;
    }
}
