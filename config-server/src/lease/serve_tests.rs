//! Two CS processes (in-process) on one PostgreSQL database: the standby
//! does not listen until the active one stops, a holder whose lock
//! session ends stops serving with an error, and a standby whose key
//! cannot open the store's CA refuses to start.

use crate::init::{init_first, join, Layout};
use crate::store::scratch::ScratchDb;
use crate::Config;
use sqlx::Connection;
use std::time::{Duration, Instant};

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn load(path: &std::path::Path) -> Config {
    let mut c: Config = rebound_common::config::load(Some(path)).unwrap();
    c.metrics_listen = String::new();
    c
}

async fn listens(addr: &str) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_ok()
}

async fn until_listening(addr: &str, within: Duration) {
    let start = Instant::now();
    while !listens(addr).await {
        assert!(
            start.elapsed() < within,
            "{addr} not listening within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_standby_listens_only_once_the_active_cs_is_gone() {
    let db = ScratchDb::create().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (addr_a, addr_b) = (free_addr(), free_addr());
    let first = init_first(&Layout::in_dir(&a), &[], Some(&addr_a), &db.url)
        .await
        .unwrap();
    let second = join(
        &Layout::in_dir(&b),
        &[],
        Some(&addr_b),
        &db.url,
        &a.join("store.key"),
    )
    .await
    .unwrap();
    let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
    let active = tokio::spawn(crate::run_with_lease(load(&first.config_file), async {
        let _ = stopped_a.await;
    }));
    until_listening(&addr_a, Duration::from_secs(20)).await;
    let (_stop_b, stopped_b) = tokio::sync::oneshot::channel::<()>();
    let standby = tokio::spawn(crate::run_with_lease(load(&second.config_file), async {
        let _ = stopped_b.await;
    }));
    // Checks only 1.5 s of waiting; it cannot fail spuriously.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!listens(&addr_b).await, "the standby listens");
    assert!(!standby.is_finished());

    let _ = stop_a.send(());
    active.await.unwrap().unwrap();
    until_listening(&addr_b, Duration::from_secs(10)).await;

    // Its lock session ended: the CS stops serving and says why.
    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'rebound-cs lease' AND datname = current_database()",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(n, 1);
    let e = tokio::time::timeout(Duration::from_secs(15), standby)
        .await
        .expect("the CS went on after losing the lease")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("lost the store lease"), "{e}");
    assert!(!listens(&addr_b).await, "still listening after the loss");
}

#[tokio::test]
async fn a_standby_whose_key_does_not_open_the_ca_refuses_to_start() {
    let db = ScratchDb::create().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    init_first(&Layout::in_dir(&a), &[], Some(&free_addr()), &db.url)
        .await
        .unwrap();
    let second = join(
        &Layout::in_dir(&b),
        &[],
        Some(&free_addr()),
        &db.url,
        &a.join("store.key"),
    )
    .await
    .unwrap();
    // Its key file now comes from another deployment.
    let config = load(&second.config_file);
    let other = crate::ca_seal::SealKey::generate(&config.store.secret_key_file).unwrap();
    std::fs::write(&config.store.secret_key_file, other.to_file_text()).unwrap();
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        crate::run_with_lease(config, std::future::pending()),
    )
    .await
    .expect("the standby waited with a key that cannot serve")
    .unwrap_err()
    .to_string();
    assert!(e.contains("does not open"), "{e}");
}
