//! The lease on a real PostgreSQL (a scratch database per test).

use super::*;
use crate::store::scratch::ScratchDb;

async fn taken(db: &ScratchDb, holder: &str) -> Held {
    match Lease::connect(&db.url, holder)
        .await
        .unwrap()
        .try_take()
        .await
        .unwrap()
    {
        Ok(h) => h,
        Err(_) => panic!("{holder} could not take a free lease"),
    }
}

/// Waits at most `within` for `lease` to take the lease.
async fn takes_within(lease: Lease, within: Duration) -> Held {
    tokio::time::timeout(within, lease.take(|_| {}))
        .await
        .expect("the lease was not taken in time")
        .unwrap()
}

#[tokio::test]
async fn only_one_holds_and_the_other_takes_over_when_it_lets_go() {
    let db = ScratchDb::create().await.unwrap();
    let first = taken(&db, "127.0.0.1:7443").await;
    assert_eq!(first.epoch, 1);
    let mut second = Lease::connect(&db.url, "127.0.0.2:7443").await.unwrap();
    assert_eq!(
        second.holder().await.unwrap().map(|h| (h.holder, h.epoch)),
        Some(("127.0.0.1:7443".to_string(), 1))
    );
    second = match second.try_take().await.unwrap() {
        Ok(_) => panic!("two CS hold the lease"),
        Err(back) => back,
    };
    // The standby reports who holds it, then takes it once it is let go.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let waiting = tokio::spawn(second.take(move |h| {
        let _ = tx.send(h.map(|h| h.holder.clone()));
    }));
    assert_eq!(rx.recv().await.unwrap().as_deref(), Some("127.0.0.1:7443"));
    // Checks only 0.8 s of waiting; it cannot fail spuriously.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!waiting.is_finished(), "taken while held");
    first.release().await;
    let second = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("not taken within 3 s of the release")
        .unwrap()
        .unwrap();
    assert_eq!(second.epoch, 2);
    let mut look = Lease::connect(&db.url, "x").await.unwrap();
    let h = look.holder().await.unwrap().unwrap();
    assert_eq!((h.holder.as_str(), h.epoch), ("127.0.0.2:7443", 2));
    assert!(h.since_ms > 0);
    // Dropping the held lease (a CS that exits) lets it go too.
    drop(second);
    let third = takes_within(look, Duration::from_secs(5)).await;
    assert_eq!(third.epoch, 3);
    third.release().await;
}

#[tokio::test]
async fn a_terminated_backend_is_a_lost_lease_and_frees_it() {
    let db = ScratchDb::create().await.unwrap();
    let held = taken(&db, "127.0.0.1:7443").await;
    let loss = held.loss();
    let mut admin = PgConnection::connect(&db.url).await.unwrap();
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(held.backend_pid)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(killed);
    let e = tokio::time::timeout(Duration::from_secs(5), loss.wait())
        .await
        .expect("the loss was not signalled within 5 s")
        .expect("a loss, not a release");
    let text = e.to_string();
    assert!(
        text.starts_with("lost the store lease: ") && text.ends_with("the standby serves now"),
        "{text}"
    );
    // The lock went with the backend: another CS takes it at once.
    let other = takes_within(
        Lease::connect(&db.url, "127.0.0.2:7443").await.unwrap(),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(other.epoch, 2);
    // A lease given up is no loss.
    let other_loss = other.loss();
    other.release().await;
    assert!(other_loss.wait().await.is_none());
    drop(held);
}

#[tokio::test]
async fn the_lock_connection_has_server_side_keepalives() {
    let db = ScratchDb::create().await.unwrap();
    let mut lease = Lease::connect(&db.url, "127.0.0.1:7443").await.unwrap();
    for (name, value) in KEEPALIVES {
        let shown: String = sqlx::query_scalar(&format!("SHOW {name}"))
            .fetch_one(&mut lease.conn)
            .await
            .unwrap();
        let want = if name == "tcp_user_timeout" {
            "10s"
        } else {
            value
        };
        assert!(
            shown == value || shown == want || shown == format!("{value}s"),
            "{name} = {shown}"
        );
    }
}

#[tokio::test]
async fn a_bad_url_is_a_clear_error() {
    let e = Lease::connect("postgres://u:secret@127.0.0.1:1/none?password=other", "a")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("cannot connect to the store") && e.contains("[store] url"),
        "{e}"
    );
    // Named without its password.
    assert!(e.contains("postgres://u:***@127.0.0.1:1/none"), "{e}");
    assert!(!e.contains("secret") && !e.contains("other"), "{e}");
}
