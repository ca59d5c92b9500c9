//! Every daemon's window for an operator's monitoring: `/metrics` in the
//! Prometheus text format and `/healthz`, on the daemon's `metrics_listen`
//! address, plus the standard gRPC health service for the gRPC servers.
//!
//! A daemon builds a [`Registry`] of its own metric families (no global
//! registry: two daemons in one test process keep their numbers apart),
//! adds [`Endpoint::on_scrape`] closures that copy status it already keeps
//! (buffer use, cache bytes, lag) into gauges just before each scrape, so
//! the data path pays nothing for gauges, and counts events (bytes, writes,
//! errors) in counters where they happen.
//!
//! Health: `/healthz` answers 503 until the daemon calls
//! [`Readiness::ready`] after its recovery (journals replayed, cache
//! scanned, listeners bound), then 200; the gRPC health service reports
//! NOT_SERVING and SERVING at the same moments.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
pub use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

/// How long open scrapes may run once the daemon stops.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// The content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "metrics_listen {addr:?} is not an address: {source}; write host:port \
         (for example 127.0.0.1:9473), or \"\" to turn the metrics endpoint off"
    )]
    BadAddress {
        addr: String,
        source: std::net::AddrParseError,
    },
    #[error(
        "cannot listen for metrics on {addr}: {source}; another process (or a second \
         daemon on this host) holds it: set metrics_listen to a free address, or \"\" to \
         turn the metrics endpoint off"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds `metrics_listen` (a daemon config key): `None` when it is empty
/// (the endpoint is off).
pub async fn bind(addr: &str) -> Result<Option<TcpListener>, MetricsError> {
    let addr = addr.trim();
    if addr.is_empty() {
        return Ok(None);
    }
    let parsed: SocketAddr = addr.parse().map_err(|source| MetricsError::BadAddress {
        addr: addr.to_string(),
        source,
    })?;
    TcpListener::bind(parsed)
        .await
        .map(Some)
        .map_err(|source| MetricsError::Bind {
            addr: parsed,
            source,
        })
}

/// Whether the daemon has finished recovering: read by `/healthz` and
/// mirrored into the gRPC health service.
#[derive(Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    grpc: Option<tonic_health::server::HealthReporter>,
}

impl Readiness {
    /// Readiness without a gRPC server (the agent).
    pub fn new() -> Readiness {
        Readiness::default()
    }

    /// Readiness that also drives the standard gRPC health service; add
    /// the returned service to the daemon's tonic router. It answers
    /// NOT_SERVING for the whole server ("") until [`Readiness::ready`].
    pub async fn with_grpc_health() -> (
        Readiness,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        (
            Readiness {
                ready: Arc::default(),
                grpc: Some(reporter),
            },
            service,
        )
    }

    /// Marks the daemon ready: `/healthz` answers 200 and gRPC health
    /// SERVING from now on.
    pub async fn ready(&self) {
        self.ready.store(true, Ordering::Release);
        if let Some(r) = &self.grpc {
            r.set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
        }
    }

    /// Marks the daemon not ready (shutting down).
    pub async fn not_ready(&self) {
        self.ready.store(false, Ordering::Release);
        if let Some(r) = &self.grpc {
            r.set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

type Refresh = Box<dyn Fn() + Send + Sync>;

/// A daemon's `/metrics` and `/healthz`.
pub struct Endpoint {
    registry: Registry,
    refresh: Vec<Refresh>,
    readiness: Readiness,
}

struct Shared {
    registry: Registry,
    refresh: Vec<Refresh>,
    readiness: Readiness,
    /// One scrape at a time: a refresh that removes and re-adds series must
    /// not interleave with another scrape's encode (an HA Prometheus pair
    /// scrapes concurrently), or that scrape misses series.
    scrape: std::sync::Mutex<()>,
}

impl Endpoint {
    /// An endpoint over `registry` (its families registered already),
    /// reporting `readiness` on `/healthz`.
    pub fn new(registry: Registry, readiness: Readiness) -> Endpoint {
        Endpoint {
            registry,
            refresh: Vec::new(),
            readiness,
        }
    }

    /// Runs `f` before every scrape, to copy state the daemon keeps anyway
    /// into gauges.
    pub fn on_scrape(&mut self, f: impl Fn() + Send + Sync + 'static) {
        self.refresh.push(Box::new(f));
    }

    /// The text a scrape returns now (refreshing the gauges first).
    pub fn render(&self) -> String {
        render(&self.registry, &self.refresh)
    }

    /// Serves `/metrics` and `/healthz` on `listener` until `stop` turns
    /// true, then lets open scrapes finish for at most [`SHUTDOWN_GRACE`]
    /// (a hung scraper must not hold the daemon's stop up). Errors of
    /// single connections are the client's; a failed accept loop is
    /// logged, never fatal: the data path does not depend on the metrics
    /// endpoint.
    pub async fn serve(self, listener: TcpListener, stop: watch::Receiver<bool>) {
        let local = listener.local_addr().ok();
        let shared = Arc::new(Shared {
            registry: self.registry,
            refresh: self.refresh,
            readiness: self.readiness,
            scrape: std::sync::Mutex::new(()),
        });
        let metrics = {
            let shared = shared.clone();
            move || {
                let shared = shared.clone();
                async move {
                    let text = {
                        let _one = shared.scrape.lock().unwrap_or_else(|p| p.into_inner());
                        render(&shared.registry, &shared.refresh)
                    };
                    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text)
                }
            }
        };
        let healthz = move || {
            let shared = shared.clone();
            async move {
                if shared.readiness.is_ready() {
                    (StatusCode::OK, "ready\n").into_response()
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "starting: recovering state, not serving yet\n",
                    )
                        .into_response()
                }
            }
        };
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz));
        if let Some(a) = local {
            info!("metrics on http://{a}/metrics, health on http://{a}/healthz");
        }
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(crate::serve::stopped(stop.clone()))
            .into_future();
        if let Err(e) =
            crate::serve::until_stopped(server, stop, SHUTDOWN_GRACE, "a metrics scrape").await
        {
            warn!("the metrics endpoint stopped: {e}; replication goes on without it");
        }
    }
}

fn render(registry: &Registry, refresh: &[Refresh]) -> String {
    for f in refresh {
        f();
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

/// Buckets for latencies from 50 µs to about 3 s (fsync, apply).
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_health_that_turns_ready() {
        let mut registry = Registry::default();
        let bytes = Family::<Vec<(String, String)>, Counter>::default();
        registry.register("rebound_test_written_bytes", "bytes written", bytes.clone());
        let level = Gauge::<i64>::default();
        registry.register("rebound_test_level", "a level", level.clone());
        bytes
            .get_or_create(&vec![("machine".into(), "m1".into())])
            .inc_by(4096);
        let readiness = Readiness::new();
        let mut ep = Endpoint::new(registry, readiness.clone());
        ep.on_scrape(move || {
            level.set(7);
        });
        let l = bind("127.0.0.1:0").await.unwrap().unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(ep.serve(l, rx));
        let h = get(addr, "/healthz").await;
        assert!(h.starts_with("HTTP/1.1 503"), "{h}");
        readiness.ready().await;
        let h = get(addr, "/healthz").await;
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        let m = get(addr, "/metrics").await;
        assert!(
            m.contains("rebound_test_written_bytes_total{machine=\"m1\"} 4096"),
            "{m}"
        );
        assert!(m.contains("rebound_test_level 7"), "{m}");
        tx.send_replace(true);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn empty_address_is_off_and_bad_ones_say_what_to_do() {
        assert!(bind("").await.unwrap().is_none());
        let e = bind("nonsense").await.unwrap_err().to_string();
        assert!(e.contains("metrics_listen") && e.contains("\"\""), "{e}");
        let held = bind("127.0.0.1:0").await.unwrap().unwrap();
        let addr = held.local_addr().unwrap().to_string();
        let e = bind(&addr).await.unwrap_err().to_string();
        assert!(e.contains(&addr) && e.contains("free address"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_scrape_does_not_hold_the_stop_up() {
        let l = bind("127.0.0.1:0").await.unwrap().unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let ep = Endpoint::new(Registry::default(), Readiness::new());
        let task = tokio::spawn(ep.serve(l, rx));
        // A scraper that sends half a request and never the rest.
        let mut hung = tokio::net::TcpStream::connect(addr).await.unwrap();
        hung.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        tokio::task::yield_now().await;
        tx.send_replace(true);
        // With time paused the clock jumps to the next timer whenever
        // nothing can run: the grace ends the endpoint, long before an
        // hour (an unbounded wait would reach the hour and fail here).
        tokio::time::timeout(std::time::Duration::from_secs(3600), task)
            .await
            .expect("the endpoint waited for the hung scrape")
            .unwrap();
        drop(hung);
    }
}
