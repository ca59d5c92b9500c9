//! The shutdown signal every binary waits on (DESIGN.md §2: exit cleanly on
//! SIGTERM, flushing what was acknowledged). One place, so the four mains
//! behave the same, and each tells the service manager it is stopping.

/// Resolves on SIGTERM or ctrl-c (SIGINT).
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
    crate::service_manager::stopping();
}
