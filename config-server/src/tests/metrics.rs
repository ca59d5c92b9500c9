//! The served CS's `/metrics`, `/healthz` and gRPC health.

use super::*;

/// The body of `GET http://{addr}{path}` (a 2xx answer).
async fn http_get(addr: &str, path: &str) -> String {
    let url = format!("http://{addr}{path}");
    tokio::task::spawn_blocking(move || {
        ureq::get(&url)
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn metrics_healthz_and_grpc_health_are_served() {
    // A free port for the metrics endpoint.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = free.local_addr().unwrap().to_string();
    drop(free);
    let cs = Cs::start_with(|c| c.metrics_listen = metrics.clone()).await;
    let ps = cs.enrolled(Role::Ps, "ps1").await;
    let (tx, _down) = connect(cs.channel(&ps).await, hello("ps", "ps1", "onprem", "a"))
        .await
        .unwrap();
    let hb = heartbeats(tx);
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        cs.channel(&TlsFiles::in_dir(&cs.dir, "admin")).await,
    );
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    assert_eq!(http_get(&metrics, "/healthz").await, "ready\n");
    eventually("ps1 up in the scrape", || {
        let metrics = metrics.clone();
        async move {
            http_get(&metrics, "/metrics").await.contains(
                "rebound_cs_component_up{role=\"ps\",component=\"ps1\",site=\"onprem\"} 1",
            )
        }
    })
    .await;
    let text = http_get(&metrics, "/metrics").await;
    for name in [
        "rebound_cs_machines{state=\"Protected\"} 0",
        "rebound_cs_alerts{kind=\"rpo-exceeded\"} 0",
        "# TYPE rebound_cs_job_duration_seconds histogram",
        "rebound_cs_job_duration_seconds_count{kind=\"protect\"} 0",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    hb.abort();
    cs.stop().await;
}
