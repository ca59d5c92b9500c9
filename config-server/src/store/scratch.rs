//! A fresh, empty PostgreSQL database for one test, on the server named by
//! `PG_SCRATCH_URL` (`scripts/test` starts a throw-away cluster and
//! sets it; `scripts/pg-scratch` starts one by hand). The store suite and
//! the lab's standby CS each get their own database, so tests run in
//! parallel without seeing each other's rows, and the database is dropped
//! when the test ends.
//!
//! A test that needs PostgreSQL fails (never skips) when the variable is
//! unset: a skipped engine would read as a passing one.

use super::StoreError;
use sqlx::{Connection, Executor, PgConnection};

/// The variable naming the PostgreSQL server tests may create databases on.
/// Not `REBOUND_*`: hooks inherit the environment, and tests compare the
/// `REBOUND_*` variables a hook is given.
pub const ENV: &str = "PG_SCRATCH_URL";

/// A database created for one test; dropped (with its connections) on drop.
pub struct ScratchDb {
    /// The URL of the new database.
    pub url: String,
    admin_url: String,
    name: String,
}

fn err(what: &str, url: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: url.to_string(),
        message: format!("{what}: {e}"),
    }
}

/// `url` with its database (the path) replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    let mut out = format!("{}/{db}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

impl ScratchDb {
    /// Creates `rebound_<random>` on the server of `PG_SCRATCH_URL`.
    pub async fn create() -> Result<ScratchDb, StoreError> {
        let admin_url = std::env::var(ENV).map_err(|_| StoreError::Open {
            path: ENV.into(),
            message: format!(
                "{ENV} is not set: the PostgreSQL tests need a server they may create databases \
                 on. Run the suite with scripts/test (it starts a throw-away cluster), or start \
                 one with `scripts/pg-scratch start DIR` and export {ENV}=<the URL it prints>"
            ),
        })?;
        let name = format!("rebound_{:016x}", rand::random::<u64>());
        let mut conn = PgConnection::connect(&admin_url)
            .await
            .map_err(|e| err("cannot connect to the test server", &admin_url, e))?;
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .map_err(|e| err("cannot create a scratch database", &admin_url, e))?;
        let _ = conn.close().await;
        Ok(ScratchDb {
            url: with_database(&admin_url, &name),
            admin_url,
            name,
        })
    }

    /// Drops the database now (its open connections are ended).
    pub async fn drop_now(&self) -> Result<(), StoreError> {
        let mut conn = PgConnection::connect(&self.admin_url)
            .await
            .map_err(|e| err("cannot connect to the test server", &self.admin_url, e))?;
        conn.execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
            .await
            .map_err(|e| err("cannot drop a scratch database", &self.admin_url, e))?;
        let _ = conn.close().await;
        Ok(())
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        // Drop runs inside or outside a runtime: do the async work on a
        // thread of its own (with room for sqlx's connect future) and wait.
        let me = ScratchDb {
            url: std::mem::take(&mut self.url),
            admin_url: std::mem::take(&mut self.admin_url),
            name: std::mem::take(&mut self.name),
        };
        let done = std::thread::Builder::new()
            .stack_size(16 << 20)
            .spawn(move || {
                let mut me = me;
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        if let Err(e) = rt.block_on(me.drop_now()) {
                            eprintln!("scratch database {} left behind: {e}", me.name);
                        }
                    }
                    Err(e) => eprintln!("scratch database {} left behind: {e}", me.name),
                }
                // Emptied, so its own drop does nothing.
                me.name.clear();
            });
        if let Ok(t) = done {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_of_a_url_is_replaced() {
        assert_eq!(
            with_database("postgres://rebound@127.0.0.1:5432/postgres", "x"),
            "postgres://rebound@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h:1/postgres?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
    }

    #[tokio::test]
    async fn a_scratch_database_is_created_and_dropped() {
        let db = ScratchDb::create().await.unwrap();
        let mut c = PgConnection::connect(&db.url).await.unwrap();
        let one: (i32,) = sqlx::query_as("SELECT 1").fetch_one(&mut c).await.unwrap();
        assert_eq!(one.0, 1);
        c.close().await.unwrap();
        let name = db.name.clone();
        drop(db);
        let mut admin = PgConnection::connect(&std::env::var(ENV).unwrap())
            .await
            .unwrap();
        let left: Option<(String,)> =
            sqlx::query_as("SELECT datname::text FROM pg_database WHERE datname = $1")
                .bind(&name)
                .fetch_optional(&mut admin)
                .await
                .unwrap();
        assert!(left.is_none(), "{name} was not dropped");
    }
}
