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
