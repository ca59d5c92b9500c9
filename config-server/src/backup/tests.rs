//! Backup while a writer writes, and restore: its refusals (a missing,
//! corrupt or foreign file, a running CS, a PostgreSQL config) and the rows
//! it puts back.

use super::*;
use crate::store::{Machine, Replication, SqliteStore, Store};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

struct Deployment {
    dir: tempfile::TempDir,
    config: Config,
}

/// A config in a temp dir whose CS addresses answer nothing, with a
/// database holding machine m1 and its replication r1.
async fn deployment() -> Deployment {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::in_dir(dir.path());
    config.listen = closed_port();
    config.metrics_listen = closed_port();
    put_machine(&config.db, "m1").await;
    let store = SqliteStore::open(&config.db).await.unwrap();
    store
        .put_replication(&Replication::test_protected("r1", 1))
        .await
        .unwrap();
    store.close().await;
    Deployment { dir, config }
}

/// Adds machine `id` to the database at `db` (the store opened and closed).
async fn put_machine(db: &Path, id: &str) {
    let store = SqliteStore::open(db).await.unwrap();
    store
        .put_machine(&Machine::test_at(id, "onprem"))
        .await
        .unwrap();
    store.close().await;
}

/// A backup of the deployment, in its dir.
async fn backed_up(d: &Deployment) -> PathBuf {
    let to = d.dir.path().join("cs.backup");
    backup(&d.config, &to).await.unwrap();
    to
}

/// The names of the files in `dir`.
fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// A loopback address nothing listens on.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

async fn machines(db: &Path) -> Vec<String> {
    let store = SqliteStore::open(db).await.unwrap();
    let ids = store.list_machines().await.unwrap();
    store.close().await;
    ids.into_iter().map(|m| m.id).collect()
}

fn err(r: Result<Report, CsError>) -> String {
    r.expect_err("refused").to_string()
}

#[tokio::test]
async fn backup_while_a_writer_writes_has_the_rows_and_opens_with_the_store() {
    let d = deployment().await;
    let store = Arc::new(SqliteStore::open(&d.config.db).await.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let m = Machine::test_at(&format!("w{n}"), "onprem");
                store.put_machine(&m).await.unwrap();
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let to = d.dir.path().join("cs.backup");
    let report = backup(&d.config, &to).await.unwrap().to_string();
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 1, "the writer wrote during the backup");
    assert!(
        report.contains("replications") && report.contains(&to.display().to_string()),
        "{report}"
    );
    assert!(report.contains("1 replications"), "{report}");
    let found = copy::inspect(&to).await.unwrap();
    assert!(found.machines >= 2, "m1 and the writer's first: {found:?}");
    assert_eq!(found.schema_version, copy::binary_schema_version());
    // A self-contained file: no log beside it, and no temporary left.
    let names = names_in(d.dir.path());
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("cs.backup-") || n.ends_with(".tmp")),
        "{names:?}"
    );
    let copied = machines(&to).await;
    assert!(copied.contains(&"m1".to_string()) && copied.contains(&"w1".to_string()));
    assert_eq!(copied.len() as i64, found.machines);
    let r = SqliteStore::open(&to).await.unwrap();
    assert_eq!(r.list_replications(None).await.unwrap().len(), 1);
    r.close().await;
    store.close().await;

    let again = err(backup(&d.config, &to).await);
    assert!(
        again.contains("exists") && again.contains("never overwrites"),
        "{again}"
    );
}

#[tokio::test]
async fn restore_puts_the_rows_back_and_keeps_the_replaced_database() {
    let d = deployment().await;
    let to = backed_up(&d).await;
    put_machine(&d.config.db, "later").await;

    let report = restore(&d.config, &to).await.unwrap().to_string();
    assert!(report.contains("before-restore-"), "{report}");
    assert_eq!(machines(&d.config.db).await, ["m1"]);
    let kept: Vec<String> = (names_in(d.dir.path()).into_iter())
        .filter(|n| n.starts_with("cs.db.before-restore-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let mut old = machines(&d.dir.path().join(&kept[0])).await;
    old.sort();
    assert_eq!(old, ["later", "m1"], "the kept database is complete");
}

#[tokio::test]
async fn restore_refuses_a_missing_corrupt_or_foreign_file_and_leaves_the_database() {
    let d = deployment().await;
    let dir = d.dir.path();
    let e = err(restore(&d.config, &dir.join("nothing")).await);
    assert!(e.contains("nothing"), "{e}");

    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    let e = err(restore(&d.config, &junk).await);
    assert!(e.contains("not a usable rebound-cs database copy"), "{e}");

    // A backup with pages damaged in the middle.
    let torn = dir.join("torn");
    backup(&d.config, &torn).await.unwrap();
    let mut bytes = std::fs::read(&torn).unwrap();
    let len = bytes.len();
    for b in &mut bytes[4096..len.min(4096 * 4)] {
        *b = 0xff;
    }
    std::fs::set_permissions(&torn, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&torn, &bytes).unwrap();
    let e = err(restore(&d.config, &torn).await);
    assert!(e.contains("not a usable rebound-cs database copy"), "{e}");

    let foreign = dir.join("foreign.db");
    let other = SqliteConnectOptions::new()
        .filename(&foreign)
        .create_if_missing(true);
    let mut c = other.connect().await.unwrap();
    sqlx::query("CREATE TABLE t (x)")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    let e = err(restore(&d.config, &foreign).await);
    assert!(e.contains("not the database of a rebound-cs"), "{e}");

    assert_eq!(machines(&d.config.db).await, ["m1"]);
    let left: Vec<String> = (names_in(dir).into_iter())
        .filter(|n| n.ends_with(".tmp") || n.contains("before-restore"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn restore_refuses_while_the_cs_has_the_database_open_or_listens() {
    let d = deployment().await;
    let to = backed_up(&d).await;

    let running = SqliteStore::open(&d.config.db).await.unwrap();
    running.list_machines().await.unwrap();
    let e = err(restore(&d.config, &to).await);
    assert!(e.contains("another process has the database"), "{e}");
    running.close().await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = d.config.clone();
    config.listen = listener.local_addr().unwrap().to_string();
    let e = err(restore(&config, &to).await);
    assert!(
        e.contains("the CS answers at") && e.contains("stop it"),
        "{e}"
    );
    drop(listener);

    restore(&config, &to).await.unwrap();
}

#[tokio::test]
async fn a_postgresql_deployment_is_pointed_at_its_own_tools() {
    let d = deployment().await;
    let mut config = d.config.clone();
    config.store.url = "postgres://cs@127.0.0.1/rebound".into();
    let e = err(backup(&config, &d.dir.path().join("b")).await);
    assert!(e.contains("pg_dump"), "{e}");
    let e = err(restore(&config, &d.dir.path().join("b")).await);
    assert!(e.contains("pg_restore"), "{e}");
}
