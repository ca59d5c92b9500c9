//! Judging a copy of the CS database before anyone relies on it: a backup
//! just written, or a file about to be restored. A copy is good when SQLite
//! finds no damage in it (`PRAGMA integrity_check`), it holds the rebound
//! schema, and its schema is not newer than this binary knows.
//!
//! Copies are opened read-only and immutable: SQLite neither locks them nor
//! creates a `-wal`/`-shm` beside them, and reads the main file alone. A copy
//! `VACUUM INTO` wrote is complete in that one file.

use crate::error::CsError;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection, Row};
use std::fmt;
use std::path::Path;

/// What a good copy holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    /// Size of the file (bytes).
    pub size: u64,
    /// The newest migration applied to it.
    pub schema_version: i64,
    pub machines: i64,
    pub replications: i64,
    pub jobs: i64,
}

impl fmt::Display for Contents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes, schema version {}, {} machines, {} replications, {} jobs",
            self.size, self.schema_version, self.machines, self.replications, self.jobs
        )
    }
}

/// The newest schema version this binary's migrations make.
pub fn binary_schema_version() -> i64 {
    sqlx::migrate!("./migrations")
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0)
}

/// The tables every rebound database has.
const TABLES: [&str; 4] = ["_sqlx_migrations", "machines", "replications", "jobs"];

fn bad(path: &Path, why: impl fmt::Display) -> CsError {
    CsError::FailedPrecondition(format!(
        "{} is not a usable rebound-cs database copy: {why}",
        path.display()
    ))
}

/// Checks the copy at `path` and says what it holds.
pub async fn inspect(path: &Path) -> Result<Contents, CsError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| CsError::io(format!("cannot read the copy {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(bad(path, "not a regular file"));
    }
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .immutable(true);
    let mut conn = opts
        .connect()
        .await
        .map_err(|e| bad(path, format!("SQLite cannot open it ({e})")))?;
    let found = check(&mut conn, path).await;
    // Read-only: nothing to flush, a failed close loses nothing.
    let _ = conn.close().await;
    let (schema_version, machines, replications, jobs) = found?;
    Ok(Contents {
        size: meta.len(),
        schema_version,
        machines,
        replications,
        jobs,
    })
}

async fn check(conn: &mut SqliteConnection, path: &Path) -> Result<(i64, i64, i64, i64), CsError> {
    let damage: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| bad(path, format!("SQLite cannot read it ({e})")))?;
    if damage != ["ok"] {
        let shown: Vec<&str> = damage.iter().take(5).map(String::as_str).collect();
        return Err(bad(
            path,
            format!("SQLite's integrity check fails: {}", shown.join("; ")),
        ));
    }
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| bad(path, format!("SQLite cannot list its tables ({e})")))?;
    let missing: Vec<&str> = TABLES
        .into_iter()
        .filter(|t| !tables.iter().any(|have| have == t))
        .collect();
    if !missing.is_empty() {
        return Err(bad(
            path,
            format!(
                "it has no {} table (a SQLite file, but not the database of a rebound-cs)",
                missing.join(", ")
            ),
        ));
    }
    let version: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success = 1",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| bad(path, format!("cannot read its schema version ({e})")))?;
    let ours = binary_schema_version();
    if version > ours {
        return Err(bad(
            path,
            format!(
                "its schema version {version} is newer than this rebound-cs knows ({ours}): \
                 use the rebound-cs version that made it"
            ),
        ));
    }
    let row = sqlx::query(
        "SELECT (SELECT COUNT(*) FROM machines) AS machines, \
                (SELECT COUNT(*) FROM replications) AS replications, \
                (SELECT COUNT(*) FROM jobs) AS jobs",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| bad(path, format!("cannot count its rows ({e})")))?;
    let count = |col: &str| {
        row.try_get::<i64, _>(col)
            .map_err(|e| bad(path, format!("cannot count its {col} ({e})")))
    };
    Ok((
        version,
        count("machines")?,
        count("replications")?,
        count("jobs")?,
    ))
}
