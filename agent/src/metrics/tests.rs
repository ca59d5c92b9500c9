//! The agent's metrics as a scrape shows them, driven through the NBD face
//! of a real capture and the sender's link (no PS, no CS).

use super::*;
use crate::config::HooksConfig;
use crate::control::tests::fixture;
use crate::disk::Exports;
use rebound_common::nbd::ExportRegistry;
use rebound_proto::ReplicationInfo;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The value of the sample whose name and labels are exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn counters_follow_the_writes_tags_and_errors_of_the_nbd_face() {
    let f = fixture(HooksConfig::default());
    let rt = f.rt.clone();
    let metrics = AgentMetrics::new("m1", &rt);
    let exports = Exports::new(&rt.capture, &metrics);
    let dev = exports.open("disk0").unwrap();
    let endpoint = metrics.endpoint(rt.clone(), Readiness::new());
    let before = endpoint.render();
    for series in [
        r#"rebound_agent_written_bytes_total{machine="m1",disk="disk0"}"#,
        r#"rebound_agent_writes_total{machine="m1",disk="disk0"}"#,
        r#"rebound_agent_points_total{machine="m1",kind="app"}"#,
        r#"rebound_agent_nbd_errors_total{machine="m1"}"#,
        r#"rebound_agent_sent_bytes_total{machine="m1"}"#,
    ] {
        assert_eq!(sample(&before, series), Some(0.0), "{series} in\n{before}");
    }

    dev.write(0, &[1u8; 4096], false).unwrap();
    dev.write(1 << 20, &[2u8; 512], true).unwrap();
    dev.write_zeroes(8192, 8192, false).unwrap();
    // A trim is captured too, but it is no write request.
    dev.trim(65536, 4096, false).unwrap();
    rt.capture
        .cut_named_tag(TagKind::Crash, "", "")
        .expect("streaming, so a point can be cut");
    rt.capture.fence();
    assert!(dev.write(0, &[3u8; 4096], false).is_err());
    assert!(dev.write_zeroes(0, 4096, false).is_err());

    let text = endpoint.render();
    let m = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    assert_eq!(
        m(r#"rebound_agent_written_bytes_total{machine="m1",disk="disk0"}"#),
        (4096 + 512 + 8192) as f64
    );
    assert_eq!(
        m(r#"rebound_agent_writes_total{machine="m1",disk="disk0"}"#),
        3.0
    );
    assert_eq!(
        m(r#"rebound_agent_points_total{machine="m1",kind="crash"}"#),
        1.0
    );
    assert_eq!(m(r#"rebound_agent_nbd_errors_total{machine="m1"}"#), 2.0);
    assert_eq!(m(r#"rebound_agent_mode{machine="m1",mode="data"}"#), 1.0);
    assert_eq!(m(r#"rebound_agent_mode{machine="m1",mode="bitmap"}"#), 0.0);
    assert_eq!(m(r#"rebound_agent_mode{machine="m1",mode="resync"}"#), 0.0);
    let status = rt.status();
    assert_eq!(
        m(r#"rebound_agent_buffer_bytes{machine="m1"}"#),
        status.buffer_bytes as f64
    );
    assert!(status.buffer_bytes > 4096 + 512, "{status:?}");
    assert_eq!(
        m(r#"rebound_agent_buffer_capacity_bytes{machine="m1"}"#),
        (64 << 20) as f64
    );
    assert!(m(r#"rebound_agent_dirty_extents{machine="m1"}"#) >= 2.0);
    assert!(m(r#"rebound_agent_lag_seconds{machine="m1"}"#) >= 0.0);
    assert_eq!(m(r#"rebound_agent_resync_done_bytes{machine="m1"}"#), 0.0);
    assert_eq!(m(r#"rebound_agent_resync_total_bytes{machine="m1"}"#), 0.0);
    assert_eq!(m(r#"rebound_agent_link_up{machine="m1"}"#), 0.0);
}

/// Polls `f` every 20 ms for up to 10 s.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn link_error_says_why_the_ps_is_unreachable_until_the_link_works() {
    let f = fixture(HooksConfig::default());
    let rt = f.rt.clone();
    let endpoint = AgentMetrics::new("m1", &rt).endpoint(rt.clone(), Readiness::new());
    let up = r#"rebound_agent_link_up{machine="m1"}"#;
    assert_eq!(rt.status().link_error, "", "no stream tried yet");

    // Nothing listens on a port just freed: every attempt fails.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut settings = (*rt.settings).clone();
    settings.ps.addr = addr.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let sender = tokio::spawn(crate::sender::run(
        rt.capture.clone(),
        Arc::new(settings),
        rt.link.clone(),
        ReplicationInfo::default(),
        None,
        stop_rx,
    ));
    eventually("a link error", || !rt.status().link_error.is_empty()).await;
    let why = rt.status().link_error;
    assert!(why.starts_with("cannot reach ps at "), "{why}");
    assert!(why.contains(&addr), "{why}");
    assert_eq!(sample(&endpoint.render(), up), Some(0.0));

    // The stream resumes at a PS: the link works, the reason is gone.
    let channel = tonic::transport::Channel::from_static("http://127.0.0.1:1").connect_lazy();
    stop_tx.send_replace(true);
    sender.await.unwrap();
    rt.link.set(Some(channel));
    assert_eq!(rt.status().link_error, "");
    assert_eq!(sample(&endpoint.render(), up), Some(1.0));
}

/// An agent config over one 4 MiB disk file in `dir`, its PS unreachable.
fn agent_config(dir: &std::path::Path, metrics_listen: String) -> crate::Config {
    let disk = dir.join("d0.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    crate::Config {
        machine_id: "m7".into(),
        state_dir: dir.join("state"),
        nbd_listen: String::new(),
        metrics_listen,
        shutdown_drain_secs: 1,
        disks: vec![crate::config::DiskConfig {
            name: "disk0".into(),
            path: disk,
            ..Default::default()
        }],
        ps: crate::config::PsConfig {
            addr: free_addr(),
            server_name: String::new(),
        },
        ..crate::Config::default()
    }
}

/// An address nothing listens on (a port just freed).
fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

/// `GET path` on `addr`: the whole HTTP answer, or "" while nothing listens.
async fn get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_metrics_and_turns_healthy_once_the_disks_serve() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let cfg = agent_config(dir.path(), addr.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(crate::run(cfg, None, async {
        let _ = stop_rx.await;
    }));
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !last.starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "not healthy: {last:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        last = get(&addr, "/healthz").await;
    }
    let m = get(&addr, "/metrics").await;
    assert!(
        m.contains(r#"rebound_agent_writes_total{machine="m7",disk="disk0"} 0"#),
        "{m}"
    );
    assert!(
        m.contains(r#"rebound_agent_link_up{machine="m7"} 0"#),
        "{m}"
    );
    stop_tx.send(()).unwrap();
    agent.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_metrics_address_in_use_stops_the_agent_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let cfg = agent_config(dir.path(), addr.clone());
    let e = crate::run(cfg, None, async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&addr) && e.contains("metrics_listen"), "{e}");
}
