//! `rebound-cs backup` and `restore` for the SQLite deployment: a
//! consistent copy of the database taken while the CS runs, and putting one
//! back while it is stopped.
//!
//! Backup asks SQLite for the copy (`VACUUM INTO` on its own connection to
//! the database): one read transaction, so the copy is the state of one
//! instant even while the CS writes, and it is a single self-contained file
//! (no `-wal`). It is written under a temporary name beside the target,
//! fsynced, checked ([`copy::inspect`]), then linked to the target name
//! (which refuses an existing file) and the directory fsynced: a crash
//! leaves either no backup or a whole one.
//!
//! Restore refuses while the CS runs. The CS holds no lock file of its own,
//! so restore looks two ways, and says so in its refusal:
//! - the CS's addresses (`listen`, `metrics_listen`) must not accept a TCP
//!   connection;
//! - SQLite must let it take the database for itself: it switches the
//!   database out of WAL mode, which SQLite allows only when no other
//!   connection has it open (a running CS keeps connections open), then
//!   holds an exclusive transaction while it swaps the files.
//!
//! A CS that is starting at the very same moment can slip between the two
//! looks; stop it (systemd) before restoring. The copy is checked before the
//! live database is touched; the database it replaces is kept beside it as
//! `cs.db.before-restore-TIME` (complete: the WAL switch folds its log into
//! it, and a `-wal` left anyway moves with it); the new file gets the old
//! one's owner and mode, and lands by fsync, rename, directory fsync.

pub mod copy;

#[cfg(test)]
mod tests;

use crate::config::Config;
use crate::error::CsError;
use crate::store::StoreError;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};
use std::net::ToSocketAddrs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a backup or restore did, as the command prints it.
#[derive(Debug)]
pub struct Report(pub String);

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How long a backup waits for the CS's write lock (the copy is one read).
const BUSY_WAIT: Duration = Duration::from_secs(10);

/// How long restore waits for the live database to be free of others.
const LOCK_WAIT: Duration = Duration::from_millis(200);

/// How long restore waits for an answer at a CS address.
const PROBE_WAIT: Duration = Duration::from_millis(500);

/// Copies the database of `config` to `to`.
pub async fn backup(config: &Config, to: &Path) -> Result<Report, CsError> {
    sqlite_only(config, "pg_dump -Fc -f FILE URL")?;
    let db = &config.db;
    if !db.is_file() {
        return Err(CsError::NotFound(format!(
            "no database at {} (the config key db): nothing to back up",
            db.display()
        )));
    }
    refuse_existing(to)?;
    let tmp = temp_beside(to, "backup")?;
    let _cleanup = RemoveOnDrop(tmp.clone());
    let shown = tmp.to_str().ok_or_else(|| {
        CsError::InvalidArgument(format!(
            "{} is not valid UTF-8: choose another backup path",
            to.display()
        ))
    })?;
    let mut conn = connect(db, BUSY_WAIT).await?;
    let copied = sqlx::query("VACUUM INTO ?")
        .bind(shown)
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    copied.map_err(|e| {
        CsError::Store(StoreError::Query {
            what: format!("copying {} to {shown} (VACUUM INTO)", db.display()),
            message: e.to_string(),
        })
    })?;
    // The copy holds the passphrase verifier and the enrollment tokens.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| CsError::io(format!("cannot set the mode of {shown}"), e))?;
    sync_file(&tmp)?;
    let contents = copy::inspect(&tmp).await?;
    // A hard link never replaces an existing file, unlike rename.
    std::fs::hard_link(&tmp, to).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => already_there(to),
        _ => CsError::io(format!("cannot create the backup {}", to.display()), e),
    })?;
    remove(&tmp)?;
    sync_dir(to)?;
    Ok(Report(format!(
        "Backup of {} written to {}: {contents}; integrity check ok.",
        db.display(),
        to.display()
    )))
}

/// Puts the copy at `from` in place of the database of `config`.
pub async fn restore(config: &Config, from: &Path) -> Result<Report, CsError> {
    sqlite_only(config, "pg_restore -d URL FILE")?;
    let db = &config.db;
    let mut wal = from.as_os_str().to_owned();
    wal.push("-wal");
    if Path::new(&wal).exists() {
        return Err(CsError::FailedPrecondition(format!(
            "{} has a write-ahead log beside it: it is a live database, not a backup \
             (make one with `rebound-cs backup --to FILE`)",
            from.display()
        )));
    }
    let tmp = temp_beside(db, "restore")?;
    let _cleanup = RemoveOnDrop(tmp.clone());
    std::fs::copy(from, &tmp).map_err(|e| {
        CsError::io(
            format!("cannot copy {} to {}", from.display(), tmp.display()),
            e,
        )
    })?;
    let contents = copy::inspect(&tmp).await?;
    cs_not_listening(config).await?;
    let old = std::fs::metadata(db).ok();
    if let Some(old) = &old {
        take_owner_and_mode(&tmp, old)?;
    }
    sync_file(&tmp)?;
    let kept = match old {
        Some(_) => {
            let lock = lock_live(db).await?;
            let kept = keep_old(db);
            let swapped = swap(db, &tmp, &kept);
            let _ = lock.close().await;
            swapped?;
            Some(kept)
        }
        None => {
            rename(&tmp, db)?;
            None
        }
    };
    sync_dir(db)?;
    let kept = match kept {
        Some(k) => format!("; the database it replaced is kept as {}", k.display()),
        None => String::new(),
    };
    Ok(Report(format!(
        "Restored {} into {}: {contents}{kept}. Start the CS.",
        from.display(),
        db.display()
    )))
}

/// Refuses a PostgreSQL deployment, naming the tool that backs it up.
fn sqlite_only(config: &Config, tool: &str) -> Result<(), CsError> {
    if config.store.is_postgres() {
        return Err(CsError::FailedPrecondition(format!(
            "this CS keeps its state in PostgreSQL ([store] url), not in the SQLite file db: \
             use PostgreSQL's tools (`{tool}`, or the server's own backups)"
        )));
    }
    Ok(())
}

fn already_there(to: &Path) -> CsError {
    CsError::AlreadyExists(format!(
        "{} exists: backup never overwrites a file; choose a new name or remove it",
        to.display()
    ))
}

fn refuse_existing(to: &Path) -> Result<(), CsError> {
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(already_there(to));
    }
    Ok(())
}

/// A temporary name in the directory of `path` (so the rename stays on
/// one file system).
fn temp_beside(path: &Path, what: &str) -> Result<PathBuf, CsError> {
    let name = path
        .file_name()
        .ok_or_else(|| CsError::InvalidArgument(format!("{} names no file", path.display())))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{what}-{}.tmp", std::process::id()));
    Ok(path.with_file_name(tmp))
}

/// Removes a temporary file unless it was renamed away.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A connection to the live database (never creating one).
async fn connect(db: &Path, busy: Duration) -> Result<SqliteConnection, CsError> {
    SqliteConnectOptions::new()
        .filename(db)
        .busy_timeout(busy)
        .connect()
        .await
        .map_err(|e| {
            CsError::Store(StoreError::Open {
                path: db.display().to_string(),
                message: e.to_string(),
            })
        })
}

/// Refuses when an address of the CS accepts a connection.
async fn cs_not_listening(config: &Config) -> Result<(), CsError> {
    for addr in [&config.listen, &config.metrics_listen] {
        let Ok(resolved) = addr.to_socket_addrs() else {
            continue;
        };
        for a in resolved {
            let dial = tokio::time::timeout(PROBE_WAIT, tokio::net::TcpStream::connect(a)).await;
            if matches!(dial, Ok(Ok(_))) {
                return Err(CsError::FailedPrecondition(format!(
                    "the CS answers at {addr}: stop it before restoring \
                     (`systemctl stop rebound-cs`)"
                )));
            }
        }
    }
    Ok(())
}

/// Takes the live database for this process alone: out of WAL mode (which
/// SQLite refuses while another connection has it open) and an exclusive
/// transaction held until the connection closes.
async fn lock_live(db: &Path) -> Result<SqliteConnection, CsError> {
    let running = |e: String| {
        CsError::FailedPrecondition(format!(
            "another process has the database {} open ({e}): a CS or a backup is running; \
             stop it before restoring (`systemctl stop rebound-cs`)",
            db.display()
        ))
    };
    let mut conn = connect(db, LOCK_WAIT).await?;
    let taken = async {
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode = DELETE")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if !mode.eq_ignore_ascii_case("delete") {
            return Err(format!("it stays in journal mode {mode}"));
        }
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
    .await;
    match taken {
        Ok(()) => Ok(conn),
        Err(e) => {
            let _ = conn.close().await;
            Err(running(e))
        }
    }
}

/// The name the replaced database is kept under.
fn keep_old(db: &Path) -> PathBuf {
    let time = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let mut name = db.as_os_str().to_owned();
    name.push(format!(".before-restore-{time}"));
    PathBuf::from(name)
}

/// Keeps `db` as `kept` (with its log, if one is left) and puts `tmp` in
/// its place. `db` exists at every instant.
fn swap(db: &Path, tmp: &Path, kept: &Path) -> Result<(), CsError> {
    std::fs::hard_link(db, kept).map_err(|e| {
        CsError::io(
            format!("cannot keep {} as {}", db.display(), kept.display()),
            e,
        )
    })?;
    let side = |p: &Path, suffix: &str| {
        let mut s = p.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    };
    let wal = side(db, "-wal");
    if wal.exists() {
        rename(&wal, &side(kept, "-wal"))?;
    }
    let shm = side(db, "-shm");
    if shm.exists() {
        remove(&shm)?;
    }
    rename(tmp, db)
}

fn rename(from: &Path, to: &Path) -> Result<(), CsError> {
    std::fs::rename(from, to).map_err(|e| {
        CsError::io(
            format!("cannot rename {} to {}", from.display(), to.display()),
            e,
        )
    })
}

fn remove(path: &Path) -> Result<(), CsError> {
    std::fs::remove_file(path)
        .map_err(|e| CsError::io(format!("cannot remove {}", path.display()), e))
}

/// Gives `path` the owner and mode of the database it replaces, so the CS
/// (its own system user) can open it after a restore run as root.
fn take_owner_and_mode(path: &Path, old: &std::fs::Metadata) -> Result<(), CsError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(old.mode() & 0o7777))
        .map_err(|e| CsError::io(format!("cannot set the mode of {}", path.display()), e))?;
    let new = std::fs::metadata(path)
        .map_err(|e| CsError::io(format!("cannot read {}", path.display()), e))?;
    if (new.uid(), new.gid()) != (old.uid(), old.gid()) {
        std::os::unix::fs::chown(path, Some(old.uid()), Some(old.gid())).map_err(|e| {
            CsError::io(
                format!(
                    "cannot give {} the owner of the database it replaces (uid {}, gid {}): \
                     restore as root or as that user",
                    path.display(),
                    old.uid(),
                    old.gid()
                ),
                e,
            )
        })?;
    }
    Ok(())
}

fn sync_file(path: &Path) -> Result<(), CsError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| CsError::io(format!("cannot fsync {}", path.display()), e))
}

/// Makes a rename in the directory of `path` durable.
fn sync_dir(path: &Path) -> Result<(), CsError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    sync_file(dir)
}
