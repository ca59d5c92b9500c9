//! The PS's metrics and health: counters that move with the frames received
//! and forwarded, gauges of the cache and the MT link, `/healthz`, the
//! standard gRPC health service, and the status's `link_error`.

use super::support::*;
use rebound_common::pki::Role;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};

/// A free port on loopback for `metrics_listen` (the PS binds it itself).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `GET path` over plain HTTP/1.1: the status line's code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, body.to_string())
}

/// The value of the sample `series` (name and labels, as the text format
/// writes them) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

async fn scrape(addr: SocketAddr) -> String {
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    body
}

/// Waits until a PS just started listens on its metrics address.
async fn wait_for_endpoint(addr: SocketAddr) {
    let t0 = std::time::Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "nothing listens on {addr}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn wait_for_sample(addr: SocketAddr, series: &str, ok: impl Fn(f64) -> bool) -> String {
    let t0 = std::time::Instant::now();
    loop {
        let text = scrape(addr).await;
        if sample(&text, series).is_some_and(&ok) {
            return text;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "timed out waiting for {series}:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A fake MT and a PS forwarding to it, its metrics endpoint on a free
/// port (returned last).
async fn start_with_metrics(lab: &Lab) -> (FakeMt, MtRun, Ps, SocketAddr) {
    let (mt, mt_addr, mt_run) = spawn_mt(&lab.tls("mt")).await;
    let metrics = free_addr();
    let mut config = lab.ps_config(mt_addr, 1 << 30, 1);
    config.metrics_listen = metrics.to_string();
    (mt, mt_run, start_ps(config).await, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_with_frames_received_and_forwarded() {
    let lab = Lab::new();
    let (mt, mt_run, ps, metrics) = start_with_metrics(&lab).await;

    let mut s = ps.stream(&lab.tls("agent-m1"), "r1", "m1").await;
    let mut sent = 0u64;
    for i in 0..5 {
        let f = frame("r1", 1 + i * 4, 4);
        sent += f.len() as u64;
        s.send(f).await;
    }
    s.wait_durable(20).await.unwrap();
    wait_for("MT applied 20", || mt.applied("r1") == 20).await;

    let r1 = "{replication=\"r1\"}";
    let received = format!("rebound_ps_received_bytes_total{r1}");
    let text = wait_for_sample(metrics, &received, |v| v == sent as f64).await;
    let forwarded = sample(&text, &format!("rebound_ps_forwarded_bytes_total{r1}")).unwrap();
    assert!(forwarded > 0.0 && forwarded < sent as f64, "{text}");
    let ratio = sample(&text, &format!("rebound_ps_compression_ratio{r1}")).unwrap();
    assert!(ratio > 1.5, "compressible frames: {text}");
    assert_eq!(
        sample(&text, "rebound_ps_cache_capacity_bytes"),
        Some((1u64 << 30) as f64)
    );
    assert!(sample(&text, &format!("rebound_ps_cache_bytes{r1}")).is_some());
    assert_eq!(sample(&text, "rebound_ps_link_up"), Some(1.0), "{text}");
    let text = wait_for_sample(metrics, &format!("rebound_ps_backlog_bytes{r1}"), |v| {
        v == 0.0
    })
    .await;
    assert_eq!(
        sample(&text, &format!("rebound_ps_backlog_seconds{r1}")),
        Some(0.0),
        "{text}"
    );
    let errors = format!("rebound_ps_forward_errors_total{r1}");
    assert_eq!(sample(&text, &errors), Some(0.0), "{text}");

    // The MT goes away: the stream fails, reconnects fail, the link is down,
    // and what arrives meanwhile is backlog.
    mt_run.stop().await;
    wait_for_sample(metrics, &errors, |v| v >= 1.0).await;
    wait_for_sample(metrics, "rebound_ps_link_up", |v| v == 0.0).await;
    let f = frame("r1", 21, 4);
    sent += f.len() as u64;
    s.send(f).await;
    s.wait_durable(24).await.unwrap();
    let text = wait_for_sample(metrics, &received, |v| v == sent as f64).await;
    assert!(
        sample(&text, &format!("rebound_ps_backlog_bytes{r1}")).unwrap() > 0.0,
        "{text}"
    );
    wait_for_sample(metrics, &format!("rebound_ps_backlog_seconds{r1}"), |v| {
        v > 0.0
    })
    .await;
    drop(s);
    ps.stop().await;
    // The endpoint stops with the PS.
    assert!(tokio::net::TcpStream::connect(metrics).await.is_err());
}

/// A restarted PS holding a backlog its MT never applied reports the
/// backlog's age from when it was received, not from the restart: the
/// CS's RPO (and its rpo-exceeded alert) rests on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_age_survives_a_restart() {
    let lab = Lab::new();
    let (mt, mt_addr, mt_run) = spawn_mt(&lab.tls("mt")).await;
    let mut config = lab.ps_config(mt_addr, 1 << 30, 1);
    config.metrics_listen = free_addr().to_string();
    let metrics: SocketAddr = config.metrics_listen.parse().unwrap();
    let ps = start_ps(config.clone()).await;
    let mut s = ps.stream(&lab.tls("agent-m1"), "r1", "m1").await;
    // The MT answered the stream's hello, then goes away: nothing sent
    // from now on is applied.
    mt_run.stop().await;
    s.send(frame("r1", 1, 4)).await;
    s.wait_durable(4).await.unwrap();
    let durable_at = std::time::Instant::now();
    drop(s);
    ps.stop().await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    // Every sample of the restarted PS is taken after this.
    let floor = durable_at.elapsed();
    let ps = start_ps(config).await;
    wait_for_endpoint(metrics).await;
    let series = "rebound_ps_backlog_seconds{replication=\"r1\"}";
    let text = wait_for_sample(metrics, series, |v| v > 0.0).await;
    let age = sample(&text, series).unwrap();
    assert!(
        age * 1000.0 + 1.0 >= floor.as_millis() as f64,
        "backlog age {age} s after a restart, held for at least {floor:?}:\n{text}"
    );
    assert_eq!(mt.applied("r1"), 0);
    ps.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_after_start() {
    let lab = Lab::new();
    let (_mt, mt_run, ps, metrics) = start_with_metrics(&lab).await;

    let ch = lab
        .tls("admin")
        .connect(&ps.addr.to_string(), "localhost", Role::Ps)
        .await
        .unwrap();
    let mut health = HealthClient::new(ch);
    let t0 = std::time::Instant::now();
    loop {
        let st = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if st == ServingStatus::Serving as i32 {
            break;
        }
        assert_eq!(st, ServingStatus::NotServing as i32);
        assert!(t0.elapsed().as_secs() < 20, "never SERVING");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(get(metrics, "/healthz").await, (200, "ready\n".into()));
    ps.stop().await;
    mt_run.stop().await;
}

#[test]
fn a_bad_metrics_listen_is_fatal_at_start() {
    let lab = Lab::new();
    let mut config = lab.ps_config("127.0.0.1:1".parse().unwrap(), 1 << 30, 1);
    config.metrics_listen = "nonsense".into();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        crate::run(config, l, std::future::pending()).await
    });
    let e = e.unwrap_err().to_string();
    assert!(e.contains("metrics_listen"), "{e}");
}

/// The status says why the MT cannot be reached while it cannot, in the
/// words of `rebound_common::link_error`, and nothing once it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_link_error_names_the_unreachable_mt() {
    use crate::cache::Cache;
    use crate::forward::{Forwarders, MtLink};
    use crate::status::{last, StatusCell};
    use std::sync::Arc;

    let lab = Lab::new();
    let mt_addr = free_addr();
    let cache = Arc::new(Cache::open(&lab.dir.path().join("cache"), 1 << 30).unwrap());
    let fw = Arc::new(Forwarders::new(Arc::new(MtLink::new(
        lab.tls("ps"),
        mt_addr.to_string(),
        "localhost".into(),
    ))));
    let c = cache.clone();
    let (rep, _) = tokio::task::spawn_blocking(move || c.hello(&info("r1", "m1")))
        .await
        .unwrap()
        .unwrap();
    fw.ensure(&rep);
    let sampler = Sampler::start(cache, fw, Arc::new(StatusCell::default()));
    let link_error = || {
        last(&sampler.cell)
            .map(|s| s.link_error)
            .unwrap_or_default()
    };
    wait_for("a link error", || !link_error().is_empty()).await;
    let e = link_error();
    assert!(
        e.contains(&mt_addr.to_string()) && e.contains("connection refused"),
        "{e}"
    );
    // The MT starts: the forwarder reconnects and the error clears.
    let mt_run = start_mt_at(&FakeMt::default(), &lab.tls("mt"), mt_addr).await;
    wait_for("the link error to clear", || link_error().is_empty()).await;

    sampler.stop().await;
    mt_run.stop().await;
}
