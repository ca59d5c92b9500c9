//! The master target (DESIGN.md §7): applies the change stream to replica
//! disks, keeps the retention journal, turns tags into recovery points,
//! serves read-only views of any point over NBD, hashes replicas for resync,
//! and rolls a replica back to a point for failover.
//!
//! `main.rs` is a thin wrapper over [`run`]; tests call [`run`] with
//! listeners bound to port 0, or use [`Store`] and [`Replication`] directly.

pub mod apply;
pub mod catalog;
pub mod config;
pub mod error;
pub mod hashes;
pub mod journal;
pub mod layout;
pub mod replication;
pub mod retention;
pub mod rollback;
pub mod service;
pub mod state;
pub mod view;

#[cfg(test)]
mod tests;

pub use catalog::PointEntry;
pub use config::{Config, RetentionConfig};
pub use error::MtError;
pub use replication::{Replication, ReplicationStatus, Store};
pub use rollback::RollbackReport;
pub use view::Views;

use rebound_common::nbd;
use rebound_proto::master_target_server::MasterTargetServer;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

/// Largest gRPC message accepted: a frame body of up to 64 MiB plus header.
const MAX_MESSAGE: usize = (64 << 20) + (1 << 20);
/// How long shutdown waits for gRPC connections to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the master target until `shutdown` completes: gRPC on `listener`
/// (mutual TLS from `config.tls`), NBD views on `nbd_listener`, and the
/// retention task. Everything acknowledged is durable when it was
/// acknowledged, so shutdown only stops between frames.
pub async fn run<F>(
    config: Config,
    listener: tokio::net::TcpListener,
    nbd_listener: std::net::TcpListener,
    shutdown: F,
) -> Result<(), MtError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let tls = config
        .tls
        .server_config()
        .map_err(|e| MtError::InvalidArgument(format!("[tls]: {e}")))?;
    let data_dir = config.data_dir.clone();
    let store = Arc::new(
        tokio::task::spawn_blocking(move || Store::open(&data_dir))
            .await
            .map_err(|e| MtError::Internal(format!("opening the data dir failed: {e}")))??,
    );
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
    let nbd_stop = Arc::new(AtomicBool::new(false));
    let nbd_thread = nbd::serve_tcp(
        nbd_listener,
        Arc::new(Views::new(store.clone())),
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

    let svc = MasterTargetServer::new(service::MtService::new(store.clone(), stop_rx.clone()))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut stop_server = stop_rx.clone();
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .map_err(|e| MtError::InvalidArgument(format!("[tls]: {e}")))?
        .add_service(svc)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            let _ = stop_server.wait_for(|s| *s).await;
        });
    let mut stop_grace = stop_rx.clone();
    let served = tokio::select! {
        r = server => r.map_err(|e| MtError::Internal(format!("gRPC server on {grpc_addr} failed: {e}"))),
        _ = async {
            let _ = stop_grace.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            warn!("gRPC connections did not close within {} s of shutdown; exiting anyway", SHUTDOWN_GRACE.as_secs());
            Ok(())
        }
    };
    info!("master target stopping");
    nbd_stop.store(true, Ordering::SeqCst);
    retention.abort();
    let _ = tokio::task::spawn_blocking(move || nbd_thread.join()).await;
    info!("master target stopped");
    served
}
