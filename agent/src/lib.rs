//! The protected-machine agent (DESIGN.md §5): NBD front end, write capture,
//! change stream to the process server, resync, recovery-point tags.
//!
//! The binary is a thin `main` over [`run`], which takes an already bound
//! NBD TCP listener and a shutdown future, so tests can run agents on port 0
//! in-process or as child processes.
//!
//! Modules, in the order a write travels:
//! - [`disk`]: backing files and the NBD [`BlockDevice`](rebound_common::nbd::BlockDevice);
//! - [`capture`]: the machine-wide ordering point, seq and change buffer;
//! - [`dirty_log`]: the dirty-extent log synced before acknowledgements;
//! - [`sender`]: the `Ingest` stream to the PS, frames and resume;
//! - [`resync`]: hash-compare resync windows (initial, crash, bitmap);
//! - [`tags`]: recovery points;
//! - [`admin`]: the local admin socket and status.json;
//! - [`metrics`]: `/metrics` and `/healthz` for Prometheus;
//! - [`config`]: the TOML config.
// Unsafe code lives only in `sys`, which allows it.
#![deny(unsafe_code)]

pub mod admin;
pub mod capture;
pub mod config;
pub mod control;
pub mod dirty_log;
pub mod disk;
pub mod frame_pool;
pub mod handover;
pub mod hook;
pub mod ingest_codec;
pub mod metrics;
pub mod page_cache;
pub mod pressure;
pub mod resync;
pub mod sender;
mod sys;
pub mod tags;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rebound_common::chunk::EXTENT_SIZE;
use thiserror::Error;
use tokio::sync::watch;
use tracing::{info, warn};

pub use config::{Config, Settings};

/// The agent's config file (alias of [`config::Config`]).
pub type AgentConfig = Config;

use crate::admin::Admin;
use crate::capture::Capture;
use crate::dirty_log::{DirtyLog, Opened};
use crate::disk::{Disk, Exports};
use crate::sender::Link;

/// Errors that stop the agent.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("invalid config: {0}")]
    Config(#[from] config::ConfigError),
    #[error("disk {name} ({path}): {message}")]
    Disk {
        name: String,
        path: PathBuf,
        message: String,
    },
    #[error("another rebound-agent is running with this state_dir (it holds {0}); stop it first")]
    AlreadyRunning(PathBuf),
    #[error(transparent)]
    Metrics(#[from] rebound_common::metrics::MetricsError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> AgentError + 'a {
    move |source| AgentError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Takes an exclusive lock on `<state_dir>/lock` for the life of the agent,
/// so two agents never share a dirty log (and never both write the disks).
fn lock_state_dir(dir: &Path) -> Result<std::fs::File, AgentError> {
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("cannot open", &path))?;
    if f.try_lock().is_err() {
        return Err(AgentError::AlreadyRunning(path));
    }
    Ok(f)
}

/// Creates `dir` (and its parents) with mode 0700 when missing: it holds
/// the sockets that write the disks and the dirty-extent log. An existing
/// directory others may enter is left as it is, with a warning.
fn create_private_dir(dir: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("cannot create the directory", dir))?;
    let mode = std::fs::metadata(dir)
        .map_err(io_err("cannot read the mode of", dir))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        warn!(dir = %dir.display(), mode = format_args!("{:o}", mode & 0o777), "this directory of the agent's state or sockets is open to other users; `chmod 700` it (the sockets are 0600 either way)");
    }
    Ok(())
}

/// Binds a unix socket at `path` with mode 0600 (only the agent's user may
/// connect), replacing a stale one.
fn bind_unix_std(path: &Path) -> Result<std::os::unix::net::UnixListener, AgentError> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        std::fs::remove_file(path).map_err(io_err("cannot remove the stale socket", path))?;
    }
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let listener =
        std::os::unix::net::UnixListener::bind(path).map_err(io_err("cannot listen on", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("cannot make private the socket", path))?;
    Ok(listener)
}

/// Warns when the TCP export is reachable from other hosts: NBD has no
/// authentication, so whoever reaches it can write this machine's disks.
fn warn_if_not_loopback(addr: Option<std::net::SocketAddr>) {
    if let Some(a) = addr.filter(|a| !a.ip().is_loopback()) {
        warn!(nbd_listen = %a, "the agent's NBD export listens beyond loopback and has no authentication: anyone who reaches {a} can read and write this machine's disks; use the unix socket (leave nbd_listen empty) or a loopback address");
    }
}

/// Runs the agent until `shutdown` completes, then stops cleanly: closes the
/// NBD exports, drains the change buffer (bounded by `shutdown_drain_secs`),
/// persists the dirty-extent log and writes the clean-shutdown marker.
pub async fn run(
    config: Config,
    nbd_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let settings = Arc::new(config.validate()?);
    let s = &settings;
    // Frame bodies are allocated on NBD threads and freed on tokio threads
    // once the PS acknowledges them; `rebound_common::alloc` says why that
    // needs a fixed mmap threshold.
    rebound_common::alloc::tune_allocator();
    create_private_dir(&s.state_dir)?;
    let _lock = lock_state_dir(&s.state_dir)?;
    let metrics_listener = rebound_common::metrics::bind(&config.metrics_listen).await?;

    // Disks and the dirty-extent log.
    let mut disks = Vec::new();
    for (i, d) in s.disks.iter().enumerate() {
        let disk = Disk::open(i as u32, &d.name, &d.path)?
            .with_handover_journal(d.handover_journal.as_deref())?;
        disks.push(Arc::new(disk));
    }
    let extents: Vec<u64> = disks
        .iter()
        .map(|d| d.size().div_ceil(EXTENT_SIZE))
        .collect();
    let dlog_path = s.dirty_log_path();
    let (dlog, opened) = DirtyLog::open(&dlog_path, &extents)
        .map_err(io_err("cannot open the dirty-extent log", &dlog_path))?;
    let dlog = Arc::new(dlog);
    let initialized = s.initialized_marker().exists();
    let clean_marker = s.clean_marker();
    let clean = clean_marker.exists();
    if clean {
        std::fs::remove_file(&clean_marker).map_err(io_err("cannot remove", &clean_marker))?;
        rebound_common::durable::fsync_dir(&s.state_dir)
            .map_err(io_err("cannot sync", &s.state_dir))?;
    }
    // Under a configuration server the agent streams only what the CS
    // assigned (kept across restarts); standalone, the configured replication.
    let assignment = if s.cs.enabled() {
        control::Runtime::load_assignment(s)
    } else {
        Some(control::Runtime::configured(s))
    };
    let capture = Arc::new(Capture::new(
        assignment
            .as_ref()
            .map(|a| a.replication_id.as_str())
            .unwrap_or(&s.replication_id),
        disks.clone(),
        dlog.clone(),
        s.buffer_limit,
    ));

    // What must be resynced before the first recovery point.
    if !initialized {
        info!("no initialized marker: initial replication compares every chunk of every disk with the replica");
        capture.resync().mark_need_all("initial");
    } else if let Opened::GeometryChanged(why) = &opened {
        warn!("{why}: resyncing every disk");
        capture.resync().mark_need_all("disk-layout-changed");
    } else if opened == Opened::Created {
        // Without the log nothing says which extents changed since the
        // process server last held them (a write while the agent was
        // stopped, or records the PS had not acknowledged).
        warn!(
            dirty_log = %dlog_path.display(),
            "the dirty-extent log is missing although this agent finished its initial replication: it cannot tell which \
             extents changed, so it resyncs every disk (a hash comparison with the replica)"
        );
        capture.resync().mark_need_all("dirty-log-missing");
    } else if dlog.count() > 0 {
        let reason = if clean { "undrained" } else { "crash-recovery" };
        info!(
            dirty_extents = dlog.count(),
            reason,
            "{}: {} dirty extents will be resynced before the next recovery point",
            if clean {
                "the last stop left records undrained"
            } else {
                "the agent did not stop cleanly"
            },
            dlog.count()
        );
        for d in 0..disks.len() as u32 {
            capture.resync().mark_need(d, &dlog.set_extents(d), reason);
        }
    }

    // Sockets.
    let admin_path = s.admin_socket();
    let admin_std = bind_unix_std(&admin_path)?;
    admin_std
        .set_nonblocking(true)
        .map_err(io_err("cannot configure", &admin_path))?;
    let admin_listener = tokio::net::UnixListener::from_std(admin_std)
        .map_err(io_err("cannot listen on", &admin_path))?;
    let nbd_unix = bind_unix_std(&s.nbd_socket)?;
    let nbd_tcp = nbd_listener.as_ref().and_then(|l| l.local_addr().ok());
    warn_if_not_loopback(nbd_tcp);
    let nbd_tcp_addr = match (&nbd_listener, nbd_tcp) {
        (None, _) => "no TCP".to_string(),
        (Some(_), Some(a)) => a.to_string(),
        (Some(_), None) => "?".to_string(),
    };

    // Background tasks.
    let (stop_tx, stop_rx) = watch::channel(false);
    let link = Arc::new(Link::default());
    let admin = Arc::new(Admin {
        capture: capture.clone(),
        link: link.clone(),
        settings: settings.clone(),
    });
    let runtime = control::Runtime::new(capture.clone(), link.clone(), settings.clone());
    let metrics = metrics::AgentMetrics::new(&s.machine_id, &runtime);
    let readiness = rebound_common::metrics::Readiness::new();
    if let Some(a) = assignment {
        runtime.start_pipeline(a).await;
    } else {
        info!("no replication assigned yet: waiting for the configuration server");
    }
    let mut tasks = vec![
        tokio::spawn(control::crash_tag_loop(runtime.clone(), stop_rx.clone())),
        tokio::spawn(admin::serve(admin_listener, admin.clone(), stop_rx.clone())),
        tokio::spawn(admin::status_writer(
            admin.clone(),
            s.status_path(),
            stop_rx.clone(),
        )),
        tokio::spawn(sender::outage_watch(
            capture.clone(),
            link.clone(),
            s.bitmap_after,
            stop_rx.clone(),
        )),
        tokio::spawn(clear_loop(
            capture.clone(),
            s.dirty_keep,
            s.dirty_keep_extents,
            stop_rx.clone(),
        )),
        tokio::spawn(summary_loop(admin.clone(), stop_rx.clone())),
    ];
    if s.cs.enabled() || !s.hooks.freeze.is_empty() {
        tasks.push(tokio::spawn(control::app_tag_loop(
            runtime.clone(),
            stop_rx.clone(),
        )));
    }
    if s.cs.enabled() {
        let handle = rebound_common::control::spawn(
            s.cs.clone(),
            s.tls.clone(),
            Arc::new(control::AgentControl(runtime.clone())),
            stop_rx.clone(),
        );
        runtime.set_events(handle);
        info!(cs = %s.cs.addr, site = %s.site, "control channel to the configuration server started");
        tasks.extend(rebound_common::tls::renewal::spawn_with_cs(
            &s.cs,
            &s.tls,
            &s.state_dir,
            stop_rx.clone(),
        ));
    }

    // NBD.
    let nbd_stop = Arc::new(AtomicBool::new(false));
    let exports: Arc<dyn rebound_common::nbd::ExportRegistry> =
        Arc::new(Exports::new(&capture, &metrics));
    if let Some(l) = metrics_listener {
        let endpoint = metrics.endpoint(runtime.clone(), readiness.clone());
        tasks.push(tokio::spawn(endpoint.serve(l, stop_rx.clone())));
    }
    let mut nbd_handles = vec![rebound_common::nbd::serve_unix(
        nbd_unix,
        exports.clone(),
        nbd_stop.clone(),
    )];
    if let Some(l) = nbd_listener {
        nbd_handles.push(rebound_common::nbd::serve_tcp(l, exports, nbd_stop.clone()));
    }

    let disk_desc: Vec<String> = disks
        .iter()
        .map(|d| format!("{}={} ({} bytes)", d.name, d.path.display(), d.size()))
        .collect();
    info!(
        machine_id = %s.machine_id,
        replication_id = %s.replication_id,
        disks = %disk_desc.join(", "),
        nbd_tcp = %nbd_tcp_addr,
        nbd_unix = %s.nbd_socket.display(),
        ps = %s.ps.addr,
        admin = %admin_path.display(),
        "rebound-agent started"
    );
    // Disks open, dirty-extent log recovered, NBD and admin sockets bound.
    rebound_common::service_manager::ready(&format!(
        "serving {} disks over NBD on {nbd_tcp_addr} and {}",
        disks.len(),
        s.nbd_socket.display()
    ));
    readiness.ready().await;

    shutdown.await;

    // Clean stop.
    info!("stopping: closing the NBD exports, then draining the change buffer");
    readiness.not_ready().await;
    nbd_stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let joined = tokio::task::spawn_blocking(move || {
        for h in nbd_handles {
            let _ = h.join();
        }
    });
    if tokio::time::timeout(Duration::from_secs(15), joined)
        .await
        .is_err()
    {
        warn!("NBD connections did not close within 15 s; fencing writes anyway");
    }
    capture.fence();
    let drained = drain(&capture, s.shutdown_drain).await;
    let _ = stop_tx.send(true);
    runtime.stop_pipeline().await;
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let c = capture.clone();
    let persisted = tokio::task::spawn_blocking(move || {
        c.dirty_extents().clear_durable()?;
        c.dirty_extents().log().persist()
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))
    .and_then(|r| r);
    persisted.map_err(io_err("cannot persist the dirty-extent log", &dlog_path))?;
    let snap = capture.snapshot();
    let marker = format!(
        "{{\"seq\":{},\"durable_seq\":{},\"dirty_extents\":{}}}\n",
        snap.seq, snap.durable_seq, snap.dirty_extents
    );
    rebound_common::durable::write_atomic(&clean_marker, marker.as_bytes()).map_err(io_err(
        "cannot write the clean-shutdown marker",
        &clean_marker,
    ))?;
    let mut status = admin.status().to_string();
    status.push('\n');
    let _ = rebound_common::durable::write_atomic(&s.status_path(), status.as_bytes());
    let _ = std::fs::remove_file(&admin_path);
    let _ = std::fs::remove_file(&s.nbd_socket);
    if drained && snap.resync_pending_extents > 0 {
        info!(
            seq = snap.seq,
            durable_seq = snap.durable_seq,
            dirty_extents = snap.dirty_extents,
            resync_pending_extents = snap.resync_pending_extents,
            "stopped cleanly; {} extents still need a resync, which runs at the next start",
            snap.resync_pending_extents
        );
    } else if drained {
        info!(
            seq = snap.seq,
            durable_seq = snap.durable_seq,
            dirty_extents = snap.dirty_extents,
            "stopped cleanly: the process server holds every record"
        );
    } else {
        warn!(
            seq = snap.seq,
            durable_seq = snap.durable_seq,
            dirty_extents = snap.dirty_extents,
            "stopped with records the process server does not hold; their extents stay dirty and are resynced at the next start"
        );
    }
    Ok(())
}

/// Waits until the PS holds every record cut so far, up to `limit`.
pub(crate) async fn drain(capture: &Capture, limit: Duration) -> bool {
    let target = capture.stream().handed_over_seq();
    capture.stream().request_flush();
    let deadline = Instant::now() + limit;
    let mut rx = capture.stream().durable_watch();
    loop {
        if *rx.borrow_and_update() >= target {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let _ = tokio::time::timeout(
            (deadline - now).min(Duration::from_millis(200)),
            rx.changed(),
        )
        .await;
    }
}

/// Sleeps `period`, or less when `stop` turns true; false once it has.
pub(crate) async fn sleep_unless_stopped(
    period: Duration,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(period) => {}
        _ = stop.changed() => {}
    }
    !*stop.borrow()
}

/// Every second, clears from the dirty log the extents whose records the PS
/// holds and that went cold ([`crate::capture::DirtyExtents::clear_cold`]: no write for
/// `keep`, or beyond `keep_extents` hot ones). Clearing every durable extent
/// instead made random writes re-dirty them at once, each paying an
/// fdatasync of the log before its acknowledgement.
async fn clear_loop(
    capture: Arc<Capture>,
    keep: Duration,
    keep_extents: u64,
    mut stop: watch::Receiver<bool>,
) {
    let mut warned = false;
    loop {
        if !sleep_unless_stopped(Duration::from_secs(1), &mut stop).await {
            return;
        }
        let c = capture.clone();
        match tokio::task::spawn_blocking(move || c.dirty_extents().clear_cold(keep, keep_extents))
            .await
        {
            Ok(Err(e)) if !warned => {
                warned = true;
                warn!("cannot update the dirty-extent log: {e}");
            }
            _ => {}
        }
    }
}

/// Logs a replication summary at most every 10 s, when something changed.
async fn summary_loop(admin: Arc<Admin>, mut stop: watch::Receiver<bool>) {
    let mut last = (u64::MAX, u64::MAX, "");
    loop {
        if !sleep_unless_stopped(Duration::from_secs(10), &mut stop).await {
            return;
        }
        let s = admin.capture.snapshot();
        let now = (s.seq, s.durable_seq, s.mode.as_str());
        if now == last && s.lag_ms == 0 {
            continue;
        }
        last = now;
        info!(
            mode = s.mode.as_str(),
            seq = s.seq,
            durable_seq = s.durable_seq,
            lag_ms = s.lag_ms,
            buffer_bytes = s.buffer_bytes,
            dirty_extents = s.dirty_extents,
            resync_pending_extents = s.resync_pending_extents,
            connected = admin.link.is_connected(),
            "replication status"
        );
    }
}

#[cfg(test)]
mod tests {
    /// Embedders (the demo, tests) spawn `run` on a multi-threaded runtime.
    #[test]
    fn run_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = super::Config {
            metrics_listen: String::new(),
            ..super::Config::default()
        };
        let f = super::run(config, Some(l), async {});
        assert_send(&f);
    }
}
