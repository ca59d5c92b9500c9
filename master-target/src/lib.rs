//! The master target (DESIGN.md §7): applies the change stream to replica
//! disks, keeps the retention journal, turns tags into recovery points,
//! serves read-only views of any point over NBD, hashes replicas for resync,
//! and rolls a replica back to a point for failover.
//!
//! `main.rs` is a thin wrapper over [`run`]; tests call [`run`] with
//! listeners bound to port 0, or use [`Store`] and [`Replication`] directly.

// The few libc calls std does not wrap live in `sys`; nothing else may be
// unsafe.
#![deny(unsafe_code)]

pub mod apply;
mod apply_stream;
pub mod authz;
pub mod catalog;
pub mod config;
pub mod control;
mod copyback;
mod disk_full;
pub mod error;
pub mod events;
pub mod handover;
mod handover_journal;
mod hash_cache;
pub mod hashes;
mod interval;
pub mod journal;
pub mod layout;
pub mod metrics;
mod ordered;
mod points;
mod replica;
pub mod replication;
mod replication_ps;
mod replication_state;
pub mod retention;
pub mod retention_journal;
pub mod retention_policy;
pub mod rollback;
mod seed;
pub mod seqfile;
pub mod service;
pub mod state;
pub mod storage;
mod store;
#[allow(unsafe_code)]
mod sys;
mod test_copy;
pub mod view;

#[cfg(test)]
mod tests;

pub use catalog::PointEntry;
pub use config::{Config, HooksConfig, RetentionConfig};
pub use error::MtError;
pub use handover::HandOverReport;
pub use replication::{Replication, ReplicationStatus};
pub use rollback::RollbackReport;
pub use store::Store;
pub use view::Views;

use rebound_common::metrics::Readiness;
use rebound_common::nbd;
use rebound_common::pki::Role;
use rebound_common::serve;
use rebound_common::tls::{ClientAuth, Revocations, TlsFiles};
use rebound_proto::master_target_server::MasterTargetServer;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// Largest gRPC message accepted: a frame body of up to 64 MiB plus header.
const MAX_MESSAGE: usize = (64 << 20) + (1 << 20);
/// How often the status reported to the CS is refreshed.
const STATUS_PERIOD: Duration = Duration::from_secs(1);
/// How long shutdown waits for gRPC connections to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the master target until `shutdown` completes: gRPC on `listener`
/// (mutual TLS from `config.tls`, with the standard health service), NBD
/// views on `nbd_listener`, `/metrics` and `/healthz` on
/// `config.metrics_listen`, and the retention task. Everything acknowledged is durable when it was
/// acknowledged, so shutdown only stops between frames.
pub async fn run<F>(
    mut config: Config,
    listener: tokio::net::TcpListener,
    nbd_listener: std::net::TcpListener,
    shutdown: F,
) -> Result<(), MtError>
where
    F: Future<Output = ()> + Send + 'static,
{
    // Frames arrive on tokio threads and are applied and freed on blocking
    // threads; see the module for why this matters.
    rebound_common::alloc::tune_allocator();
    // Renewal keeps the MT's renewed identity in its data dir; the servers
    // and every client connection (CS) use it once it exists.
    config.tls = config.tls.with_renewed(&config.data_dir);
    // The endpoint answers (health 503) while the journals are replayed.
    let measured = metrics::MtMetrics::default();
    let (readiness, health) = Readiness::with_grpc_health().await;
    let endpoint = metrics::serve(&config.metrics_listen, &measured, &readiness).await?;
    let data_dir = config.data_dir.clone();
    let store = Arc::new(
        tokio::task::spawn_blocking(move || Store::open_measured(&data_dir, measured))
            .await
            .map_err(|source| MtError::TaskFailed {
                what: "opening the data dir",
                source,
            })??,
    );
    endpoint.show(store.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let grpc_addr = listener
        .local_addr()
        .map_err(|e| MtError::io("cannot read the gRPC listener address", e))?;
    let nbd_addr = nbd_listener
        .local_addr()
        .map_err(|e| MtError::io("cannot read the NBD listener address", e))?;
    // The revocation list the CS pushes (SetRevoked), as last saved: the
    // gRPC acceptor refuses and cuts these certificates.
    let revoked_path = revoked_path(&config);
    let revocations = Revocations::load(&revoked_path).map_err(|e| {
        MtError::io(
            format!(
                "cannot read the revocation list {}; fix its permissions, or remove it and let the configuration server send it again",
                revoked_path.display()
            ),
            e,
        )
    })?;
    let acceptor = config
        .tls
        .acceptor(ClientAuth::Required, &revocations)
        .map_err(|e| MtError::InvalidArgument(format!("[tls]: {e}")))?;
    let managed = config.cs.enabled();
    if !managed {
        warn!("no configuration server ([cs] addr is empty): this master target is unmanaged (lab mode): a process server's first Apply or ChunkHashes creates a replication and binds it to that PS, and no revocation list arrives");
    }
    // Views show every machine's disks: TLS with a client certificate
    // from the CA only, each client seeing what its certificate may.
    let nbd_tls = nbd::NbdTls::new(&config.tls, revocations.clone())
        .map_err(|e| MtError::InvalidArgument(format!("[tls] for the NBD views: {e}")))?;
    let nbd_stop = Arc::new(AtomicBool::new(false));
    let nbd_thread = nbd::serve_tcp_tls(
        nbd_listener,
        Arc::new(Views::new(store.clone())),
        Arc::new(nbd_tls),
        nbd_stop.clone(),
    );
    let retention = tokio::spawn(retention::run_task(
        store.clone(),
        config.retention.clone(),
        stop_rx.clone(),
    ));
    info!(
        listen = %grpc_addr,
        nbd = %nbd_addr,
        data_dir = %config.data_dir.display(),
        replications = store.list().len(),
        "master target started"
    );

    let control = if config.cs.enabled() {
        let id = own_id(&config.tls, Role::Mt)?;
        let grpc = if config.advertise.is_empty() {
            grpc_addr.to_string()
        } else {
            config.advertise.clone()
        };
        let ctl = Arc::new(control::MtControl {
            store: store.clone(),
            hooks: config.hooks.clone(),
            retention: config.retention.clone(),
            reprotect: config.reprotect.clone(),
            identity: control::Identity {
                id: id.clone(),
                site: config.site.clone(),
                addresses: vec![grpc, format!("nbds://{nbd_addr}")],
                instance: instance_id(),
            },
            status: std::sync::Mutex::new(None),
            revocations: revocations.clone(),
            revoked_path,
        });
        tokio::spawn(control::status_task(
            ctl.clone(),
            STATUS_PERIOD,
            stop_rx.clone(),
        ));
        info!(cs = %config.cs.addr, id = %id, site = %config.site, "control channel to the configuration server starting");
        rebound_common::tls::renewal::spawn_with_cs(
            &config.cs,
            &config.tls,
            &config.data_dir,
            stop_rx.clone(),
        );
        let handle = rebound_common::control::spawn(
            config.cs.clone(),
            config.tls.clone(),
            Arc::new(control::Handler(ctl)),
            stop_rx.clone(),
        );
        // Replications raise events (a poisoned replication) through it.
        store.events().connect(handle.clone());
        Some(handle)
    } else {
        None
    };

    let svc = MasterTargetServer::new(service::MtService::new(
        store.clone(),
        stop_rx.clone(),
        managed,
    ))
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    let incoming = acceptor.incoming(listener);
    let server = rebound_common::tls::frame_server()
        .add_service(svc)
        .add_service(health)
        .serve_with_incoming_shutdown(incoming, serve::stopped(stop_rx.clone()));
    // Replications recovered, both listeners bound.
    rebound_common::service_manager::ready(&format!("serving on {grpc_addr}, NBD {nbd_addr}"));
    readiness.ready().await;
    let served = serve::until_stopped(server, stop_rx, SHUTDOWN_GRACE, "gRPC connections")
        .await
        .map_err(|source| MtError::Server {
            addr: grpc_addr.to_string(),
            source,
        });
    drop(control);
    info!("master target stopping");
    readiness.not_ready().await;
    nbd_stop.store(true, Ordering::SeqCst);
    retention.abort();
    let _ = tokio::task::spawn_blocking(move || nbd_thread.join()).await;
    drop(endpoint);
    info!("master target stopped");
    served
}

/// Where the MT keeps the revocation list the CS pushed: in its data dir.
pub fn revoked_path(config: &Config) -> std::path::PathBuf {
    config.data_dir.join("revoked")
}

/// This component's id, from its certificate (CN `"<role>:<id>"`): the
/// hello to the CS must carry the certificate's id.
pub fn own_id(tls: &TlsFiles, role: Role) -> Result<String, MtError> {
    let pem = std::fs::read_to_string(&tls.cert).map_err(|e| {
        MtError::InvalidArgument(format!(
            "[tls] cert {}: cannot read it ({e}); enroll first: rebound-mt enroll --cs ADDR --passphrase-file F --id ID --out DIR",
            tls.cert.display()
        ))
    })?;
    let der = rebound_common::enrollment::first_cert_der(&pem)
        .map_err(|e| MtError::InvalidArgument(format!("[tls] cert {}: {e}", tls.cert.display())))?;
    let who = rebound_common::pki::peer_identity(&der)
        .map_err(|e| MtError::InvalidArgument(format!("[tls] cert {}: {e}", tls.cert.display())))?;
    if who.role != role {
        return Err(MtError::InvalidArgument(format!(
            "[tls] cert {} is a {} certificate ({who}); a master target needs an mt certificate: enroll with rebound-mt enroll",
            tls.cert.display(),
            who.role.as_str()
        )));
    }
    Ok(who.id)
}

pub use rebound_common::control::instance_id;
