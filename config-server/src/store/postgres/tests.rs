//! What only the PostgreSQL engine has: two CS processes on one database
//! (an active and a standby), migrations applied by both, and a URL's
//! password kept out of messages. The engine-independent cases run on both
//! engines in `store::suite`.

use super::*;
use crate::store::scratch::ScratchDb;

#[tokio::test]
async fn two_stores_on_one_database_see_each_others_writes() {
    let db = ScratchDb::create().await.unwrap();
    // Both open at once: the migration runs once, under sqlx's lock.
    let (a, b) = tokio::join!(PgStore::open(&db.url), PgStore::open(&db.url));
    let (a, b) = (a.unwrap(), b.unwrap());
    a.add_site("onprem").await.unwrap();
    a.put_machine(&Machine::test_at("m1", "onprem"))
        .await
        .unwrap();
    b.put_replication(&Replication::test_protected("r1", 5))
        .await
        .unwrap();
    assert_eq!(b.list_sites().await.unwrap(), vec!["onprem"]);
    assert_eq!(b.list_machines().await.unwrap().len(), 1);
    let r = a.current_replication("m1").await.unwrap().unwrap();
    assert_eq!(r, Replication::test_protected("r1", 5));
    // Replications written by either get increasing order.
    a.put_replication(&Replication::test_protected("r2", 5))
        .await
        .unwrap();
    assert_eq!(b.current_replication("m1").await.unwrap().unwrap().id, "r2");
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn migrations_run_again_are_harmless() {
    let db = ScratchDb::create().await.unwrap();
    let s = PgStore::open(&db.url).await.unwrap();
    s.put_setting("k", b"v").await.unwrap();
    s.close().await;
    for _ in 0..2 {
        let s = PgStore::open(&db.url).await.unwrap();
        assert_eq!(s.get_setting("k").await.unwrap().unwrap(), b"v");
        s.close().await;
    }
}

#[tokio::test]
async fn a_bad_url_names_the_url_without_its_password() {
    let Err(e) = PgStore::open("postgres://u:secret@127.0.0.1:1/db").await else {
        panic!("connected to port 1");
    };
    let msg = e.to_string();
    assert!(
        msg.contains("postgres://u:***@127.0.0.1:1/db") && msg.contains("[store] url"),
        "{msg}"
    );
    assert!(!msg.contains("secret"), "{msg}");
}

#[test]
fn a_password_is_redacted() {
    assert_eq!(
        redact_url("postgres://u:p@w@h:5/db?sslmode=require"),
        "postgres://u:***@h:5/db?sslmode=require"
    );
    assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
}

#[test]
fn a_password_query_parameter_is_redacted() {
    assert_eq!(
        redact_url("postgres://u@h/db?sslmode=require&password=secret&x=1"),
        "postgres://u@h/db?sslmode=require&password=***&x=1"
    );
    assert_eq!(
        redact_url("postgres://u:a@h/db?PASSWORD=b"),
        "postgres://u:***@h/db?PASSWORD=***"
    );
    assert_eq!(
        redact_url("postgres://h/db?password"),
        "postgres://h/db?password"
    );
}

/// Takes the lease for `holder`, which must be free.
async fn lease(url: &str, holder: &str) -> crate::lease::Held {
    let lease = crate::lease::Lease::connect(url, holder).await.unwrap();
    match lease.try_take().await.unwrap() {
        Ok(held) => held,
        Err(_) => panic!("the lease is not free"),
    }
}

#[tokio::test]
async fn a_store_fenced_to_a_lost_lease_refuses_writes_but_reads() {
    let db = ScratchDb::create().await.unwrap();
    let first = lease(&db.url, "127.0.0.1:7443").await;
    let s = PgStore::open(&db.url).await.unwrap();
    s.fence(first.epoch);
    assert_eq!(first.epoch, 1);
    s.put_setting("k", b"v").await.unwrap();
    let token = Token::test_for("t1");
    s.put_token(&token).await.unwrap();
    // Another CS takes the lease: epoch 2.
    drop(first);
    let second = loop {
        match crate::lease::Lease::connect(&db.url, "127.0.0.2:7443")
            .await
            .unwrap()
            .try_take()
            .await
            .unwrap()
        {
            Ok(held) => break held,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(second.epoch, 2);
    let fenced = |e: StoreError| match e {
        StoreError::Fenced { epoch, holder, .. } => {
            assert_eq!(epoch, 1);
            assert!(holder.contains("127.0.0.2:7443"), "{holder}");
        }
        other => panic!("not fenced: {other}"),
    };
    fenced(s.put_setting("k", b"w").await.unwrap_err());
    fenced(s.add_site("onprem").await.unwrap_err());
    fenced(s.delete_plan("p").await.unwrap_err());
    fenced(s.redeem_token("t1", 5).await.unwrap_err());
    fenced(s.revoke_certs(Role::Agent, "a", 5).await.unwrap_err());
    let e = s.put_setting("k", b"w").await.unwrap_err().to_string();
    assert!(e.contains("no longer holds the store lease"), "{e}");
    // Reads still work, and nothing was written.
    assert_eq!(s.get_setting("k").await.unwrap().unwrap(), b"v");
    assert!(s.get_token("t1").await.unwrap().unwrap().used_ms.is_none());
    // The new holder's store (and an unfenced tool's) writes.
    let t = PgStore::open(&db.url).await.unwrap();
    t.fence(second.epoch);
    t.put_setting("k", b"x").await.unwrap();
    let tool = PgStore::open(&db.url).await.unwrap();
    tool.add_site("onprem").await.unwrap();
    second.release().await;
    for s in [s, t, tool] {
        s.close().await;
    }
}

#[tokio::test]
async fn pool_connections_have_keepalives_and_a_statement_timeout() {
    let db = ScratchDb::create().await.unwrap();
    let s = PgStore::open(&db.url).await.unwrap();
    let show = |name: &'static str| {
        let pool = s.pool().clone();
        async move {
            sqlx::query_scalar::<_, String>(&format!("SHOW {name}"))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(show("statement_timeout").await, "30s");
    assert_eq!(show("tcp_keepalives_idle").await, "4");
    let user_timeout = show("tcp_user_timeout").await;
    assert!(
        ["10s", "10000"].contains(&user_timeout.as_str()),
        "{user_timeout}"
    );
    s.close().await;
}
