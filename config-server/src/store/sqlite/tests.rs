//! What only the SQLite engine has: a database file in a directory, and
//! databases written by older releases. The engine-independent cases run
//! on both engines in `store::suite`.

use super::*;

#[tokio::test]
async fn open_in_a_missing_dir_says_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let Err(e) = SqliteStore::open(&dir.path().join("no/such/dir/cs.db")).await else {
        panic!("opened a database in a missing directory");
    };
    let msg = e.to_string();
    assert!(
        msg.contains("no/such/dir/cs.db") && msg.contains("config key db"),
        "{msg}"
    );
}

#[test]
fn a_policy_stored_before_retention_existed_reads_with_defaults() {
    let old = r#"{"crash_interval_ms":250,"app_interval_secs":60,"freeze_timeout_ms":1000}"#;
    let p: Policy = serde_json::from_str(old).unwrap();
    assert_eq!(p.crash_interval_ms, 250);
    assert_eq!(p.retention_window_secs, 0);
    assert_eq!(p.rpo_alert_ms, 0);
    assert!(!p.has_retention());
}

#[tokio::test]
async fn certificates_enrolled_before_the_trust_records_count_as_issued() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cs.db");
    // A database as 0002 left it, with one enrolled agent.
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    let migrator = sqlx::migrate!("./migrations");
    for m in migrator.iter().filter(|m| m.version < 3) {
        sqlx::raw_sql(&m.sql).execute(&pool).await.unwrap();
    }
    sqlx::query(
        "INSERT INTO components (role, id, cert_serial, enrolled_ms) VALUES ('agent', 'm1', '7f', 5)",
    )
    .execute(&pool)
    .await
    .unwrap();
    // Pretend the migrator applied them, so open runs only 0003.
    sqlx::query(
        "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL,
           installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL,
           checksum BLOB NOT NULL, execution_time BIGINT NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    for m in migrator.iter().filter(|m| m.version < 3) {
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (?, ?, 1, ?, 0)",
        )
        .bind(m.version)
        .bind(&*m.description)
        .bind(&*m.checksum)
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;

    let s = SqliteStore::open(&path).await.unwrap();
    let c = s.latest_cert(Role::Agent, "m1").await.unwrap().unwrap();
    assert_eq!(c.serial, "7f");
    assert!(
        c.is_live(now_ms()),
        "an old certificate of unknown expiry is live"
    );
}
