//! The store lease: which CS of a PostgreSQL deployment serves.
//!
//! Every CS on one PostgreSQL database is one deployment; exactly one of
//! them (the active CS) may serve, the others wait as standbys. The lease
//! is a session-level advisory lock ([`LOCK_KEY`]) taken on a connection of
//! its own, outside the store's pool: PostgreSQL itself guarantees at most
//! one session holds it, and releases it when that session ends — when the
//! CS exits, is killed, or its backend is cut off. A `cs_lease` row (holder
//! = listen address, epoch, since) says who holds it, for the standbys' log
//! and for operators; the lock, not the row, decides.
//!
//! Fencing: the lock connection has server-side TCP keepalives
//! ([`KEEPALIVES`]), so the backend of a holder partitioned from the
//! database dies (and the lock frees) about 10 s after the last packet.
//! The holder checks its connection every [`CHECK_EVERY`] with a
//! [`CHECK_TIMEOUT`]: a partitioned holder therefore gives up serving
//! within about 4 s, before the database lets a standby take the lease.
//! The held epoch is also a fencing token: the serving CS's store checks it
//! in every write transaction (`PgStore::fence`), so a holder that lost the
//! lease cannot commit a write after the new holder took it, whatever its
//! own tasks still try. On the loss the CS closes its store pool and aborts
//! its jobs before it stops serving.
//!
//! The lease is a session-level lock: between the CS and PostgreSQL there
//! must be no pooler in transaction mode (PgBouncer `pool_mode =
//! transaction`), which hands the session to other clients and breaks it.
//! The lease watches the lock connection only: a holder whose pool cannot
//! work (connections exhausted, rights revoked) keeps the lease and answers
//! with store errors (logged) until an operator stops it.
//!
//! URLs appear in errors and logs only through
//! [`crate::store::postgres::redact_url`].

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, Row};
use std::str::FromStr;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::store::postgres::redact_url;

/// The advisory lock every CS of a deployment contends for (advisory
/// locks are per database, so deployments on other databases do not
/// contend). "RBNDCS01".
pub const LOCK_KEY: i64 = 0x5242_4e44_4353_3031;

/// How often a standby tries to take the lease.
pub const TRY_EVERY: Duration = Duration::from_millis(500);
/// How often the holder checks its lock connection.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long one check may take before the lease counts as lost.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a CS waits before it connects again after the database failed.
const RECONNECT_AFTER: Duration = Duration::from_secs(2);

/// The server-side TCP settings of the lock connection: a dead or
/// partitioned peer is detected after 4 s idle + 3 probes 2 s apart, and
/// unacknowledged data times out after 10 s.
pub const KEEPALIVES: [(&str, &str); 4] = [
    ("tcp_keepalives_idle", "4"),
    ("tcp_keepalives_interval", "2"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "10000"),
];

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS cs_lease (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    since_ms BIGINT NOT NULL
)";

#[derive(Debug, Error)]
pub enum LeaseError {
    #[error(
        "cannot connect to the store {url} for the lease: {message} (check [store] url and \
         that PostgreSQL runs)"
    )]
    Connect { url: String, message: String },
    #[error("the store lease on {url} failed while {what}: {message}")]
    Query {
        url: String,
        what: &'static str,
        message: String,
    },
    #[error("lost the store lease: {reason}; the standby serves now")]
    Lost { reason: String },
}

/// Who holds (or last held) the lease, as the `cs_lease` row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The listen address of that CS.
    pub holder: String,
    /// How many times the lease was taken.
    pub epoch: i64,
    /// When it took the lease (ms since the epoch).
    pub since_ms: i64,
}

/// A CS's lock connection, not yet holding the lease.
pub struct Lease {
    /// The URL without its password, for messages.
    url: String,
    holder: String,
    conn: PgConnection,
}

impl Lease {
    /// Opens the lock connection to `url` for the CS listening at `holder`.
    pub async fn connect(url: &str, holder: &str) -> Result<Lease, LeaseError> {
        let shown = redact_url(url);
        let connect = |message: String| LeaseError::Connect {
            url: shown.clone(),
            message,
        };
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| connect(e.to_string()))?
            .application_name("rebound-cs lease")
            .options(KEEPALIVES);
        let conn = options
            .connect()
            .await
            .map_err(|e| connect(e.to_string()))?;
        Ok(Lease {
            url: shown.clone(),
            holder: holder.to_string(),
            conn,
        })
    }

    /// Who holds (or last held) the lease; `None` before any CS took it.
    pub async fn holder(&mut self) -> Result<Option<Holder>, LeaseError> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('cs_lease') IS NOT NULL")
            .fetch_one(&mut self.conn)
            .await
            .map_err(query_err(&self.url, "reading who holds it"))?;
        if !exists {
            return Ok(None);
        }
        let row = sqlx::query("SELECT holder, epoch, since_ms FROM cs_lease WHERE id = 1")
            .fetch_optional(&mut self.conn)
            .await
            .map_err(query_err(&self.url, "reading who holds it"))?;
        Ok(row.map(|r| Holder {
            holder: r.get(0),
            epoch: r.get(1),
            since_ms: r.get(2),
        }))
    }

    /// Takes the lease if no other session holds it.
    pub async fn try_take(mut self) -> Result<Result<Held, Lease>, LeaseError> {
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK_KEY)
            .fetch_one(&mut self.conn)
            .await
            .map_err(query_err(&self.url, "trying to take it"))?;
        if !got {
            return Ok(Err(self));
        }
        // Under the lock: no other CS creates or writes the row meanwhile.
        sqlx::query(CREATE_TABLE)
            .execute(&mut self.conn)
            .await
            .map_err(query_err(&self.url, "creating the cs_lease table"))?;
        let epoch: i64 = sqlx::query_scalar(
            "INSERT INTO cs_lease (id, holder, epoch, since_ms) VALUES (1, $1, 1, $2)
             ON CONFLICT (id) DO UPDATE
               SET holder = EXCLUDED.holder, epoch = cs_lease.epoch + 1,
                   since_ms = EXCLUDED.since_ms
             RETURNING epoch",
        )
        .bind(&self.holder)
        .bind(rebound_common::time::now_ms() as i64)
        .fetch_one(&mut self.conn)
        .await
        .map_err(query_err(&self.url, "recording the holder"))?;
        let backend_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut self.conn)
            .await
            .map_err(query_err(&self.url, "reading its backend"))?;
        let (lost_tx, lost) = watch::channel(None);
        let (release, release_rx) = oneshot::channel();
        let task = tokio::spawn(keep(self.conn, self.url, lost_tx, release_rx));
        Ok(Ok(Held {
            epoch,
            backend_pid,
            lost,
            release: Some(release),
            task,
        }))
    }

    /// Waits until the lease is free and takes it, trying every
    /// [`TRY_EVERY`]; `on_wait` is called with the holder when the first
    /// try fails and whenever the holder changes.
    pub async fn take(
        mut self,
        mut on_wait: impl FnMut(Option<&Holder>),
    ) -> Result<Held, LeaseError> {
        let mut seen: Option<Option<Holder>> = None;
        loop {
            match self.try_take().await? {
                Ok(held) => return Ok(held),
                Err(back) => self = back,
            }
            let now = self.holder().await?;
            if seen.as_ref() != Some(&now) {
                on_wait(now.as_ref());
                seen = Some(now);
            }
            tokio::time::sleep(TRY_EVERY).await;
        }
    }
}

/// Waits (as a standby) until the CS listening at `holder` holds the
/// lease on `url`, logging who holds it meanwhile. A database that cannot
/// be reached is retried every few seconds: a standby outlives a restart
/// of PostgreSQL.
pub async fn wait_for(url: &str, holder: &str) -> Held {
    loop {
        let attempt = async {
            Lease::connect(url, holder)
                .await?
                .take(|h| {
                    let by = h.map_or("no CS yet", |h| h.holder.as_str());
                    info!("standby: waiting for the lease (held by {by})");
                })
                .await
        };
        match attempt.await {
            Ok(held) => {
                info!(
                    epoch = held.epoch,
                    "holding the store lease: this CS serves"
                );
                return held;
            }
            Err(e) => {
                warn!("{e}; trying again in {RECONNECT_AFTER:?}");
                tokio::time::sleep(RECONNECT_AFTER).await;
            }
        }
    }
}

fn query_err<'a>(url: &'a str, what: &'static str) -> impl FnOnce(sqlx::Error) -> LeaseError + 'a {
    move |e| LeaseError::Query {
        url: url.to_string(),
        what,
        message: e.to_string(),
    }
}

/// The held lease. Dropping it (or [`Held::release`]) gives it up.
pub struct Held {
    /// How many times the lease was taken, this time included.
    pub epoch: i64,
    /// The PostgreSQL backend of the lock connection.
    pub backend_pid: i32,
    lost: watch::Receiver<Option<String>>,
    release: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// Resolves when the lease is lost.
pub struct Loss(watch::Receiver<Option<String>>);

impl Loss {
    /// Waits for the loss; the error says why. `None` once the lease was
    /// given up ([`Held::release`] or dropped) instead.
    pub async fn wait(mut self) -> Option<LeaseError> {
        let reason = self.0.wait_for(Option::is_some).await.ok()?.clone()?;
        Some(LeaseError::Lost { reason })
    }
}

impl Held {
    /// A future resolving when the lease is lost.
    pub fn loss(&self) -> Loss {
        Loss(self.lost.clone())
    }

    /// Unlocks and closes the lock connection, so a standby takes the lease
    /// at once.
    pub async fn release(mut self) {
        if let Some(r) = self.release.take() {
            let _ = r.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// The holder's check: `SELECT 1` on the lock connection every
/// [`CHECK_EVERY`]; a failure or a check slower than [`CHECK_TIMEOUT`]
/// is the loss, reported on `lost`.
async fn keep(
    mut conn: PgConnection,
    url: String,
    lost: watch::Sender<Option<String>>,
    mut release: oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Released, or the `Held` dropped.
            _ = &mut release => {
                let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(LOCK_KEY)
                    .execute(&mut conn)
                    .await;
                let _ = conn.close().await;
                return;
            }
            _ = tick.tick() => {}
        }
        let reason =
            match tokio::time::timeout(CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(&mut conn))
                .await
            {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => format!("the lock connection to {url} failed: {e}"),
                Err(_) => {
                    format!("the lock connection to {url} did not answer within {CHECK_TIMEOUT:?}")
                }
            };
        warn!("{reason}");
        let _ = lost.send(Some(reason));
        return;
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod serve_tests;
