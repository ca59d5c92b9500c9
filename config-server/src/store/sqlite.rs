//! The SQLite engine of [`Store`] (the default; DESIGN.md §8 "State").
//!
//! One database file opened in WAL mode with `synchronous=FULL`, so every
//! committed write has reached the disk before the call returns and a CS
//! crash or power loss loses nothing it acknowledged. The schema lives in
//! `migrations/` and is embedded with `sqlx::migrate!`, applied at open.
//! Queries are plain runtime SQL (no compile-time checking), so building the
//! crate needs no database.

mod trust;

use super::rows::{self, json, q, Cols};
use super::*;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The SQLite store. Cheap to clone (a connection pool).
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
}

/// A statement with its bound values, as the helpers below take it.
type Sql<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Turns one row into a value.
trait Decode<T>: Fn(&SqliteRow) -> Result<T, StoreError> + Send {}
impl<T, F: Fn(&SqliteRow) -> Result<T, StoreError> + Send> Decode<T> for F {}

impl SqliteStore {
    /// Runs a statement that returns no rows; `what` names it in errors.
    fn run<'a>(&'a self, what: &'static str, sql: Sql<'a>) -> BoxFut<'a, ()> {
        Box::pin(async move {
            sql.execute(&self.pool).await.map_err(q(what))?;
            Ok(())
        })
    }

    /// Runs a statement that returns no rows: whether it touched any.
    fn run_counted<'a>(&'a self, what: &'static str, sql: Sql<'a>) -> BoxFut<'a, bool> {
        Box::pin(async move {
            let r = sql.execute(&self.pool).await.map_err(q(what))?;
            Ok(r.rows_affected() > 0)
        })
    }

    /// The first row of a query, decoded by `row`.
    fn one<'a, T>(
        &'a self,
        what: &'static str,
        sql: Sql<'a>,
        row: impl Decode<T> + 'a,
    ) -> BoxFut<'a, Option<T>>
    where
        T: Send + 'a,
    {
        Box::pin(async move {
            match sql.fetch_optional(&self.pool).await.map_err(q(what))? {
                Some(r) => row(&r).map(Some),
                None => Ok(None),
            }
        })
    }

    /// Every row of a query, decoded by `row`.
    fn all<'a, T: Send + 'a>(
        &'a self,
        what: &'static str,
        sql: Sql<'a>,
        row: impl Decode<T> + 'a,
    ) -> BoxFut<'a, Vec<T>> {
        Box::pin(async move {
            let rows = sql.fetch_all(&self.pool).await.map_err(q(what))?;
            rows.iter().map(row).collect()
        })
    }

    /// Runs `statements` in one transaction: all of them take effect or none.
    fn run_all<'a>(&'a self, what: &'static str, statements: Vec<Sql<'a>>) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(q(what))?;
            for sql in statements {
                sql.execute(&mut *tx).await.map_err(q(what))?;
            }
            tx.commit().await.map_err(q(what))
        })
    }

    /// Opens (creating when missing) the database at `path` and migrates it.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let shown = path.display().to_string();
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|e| StoreError::Open {
                path: shown.clone(),
                message: e.to_string(),
            })?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migrate {
                path: shown,
                message: e.to_string(),
            })?;
        Ok(SqliteStore {
            pool,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the pool (waits for connections to return).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The machines `sql` selects, with their disks: two queries whatever
    /// the number of machines. `disks` selects the disks of those machines.
    async fn machines<'a>(
        &'a self,
        sql: Sql<'a>,
        disks: Sql<'a>,
    ) -> Result<Vec<Machine>, StoreError> {
        let w = "reading machines";
        let mut machines = self.all(w, sql, rows::machine_head).await?;
        let disks = self.all(w, disks, rows::disk).await?;
        rows::attach_disks(&mut machines, disks);
        Ok(machines)
    }

    /// `jobs` with their steps, read with one query.
    async fn with_steps(&self, mut jobs: Vec<Job>) -> Result<Vec<Job>, StoreError> {
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        let sql = sqlx::query(
            "SELECT * FROM job_steps WHERE job IN (SELECT value FROM json_each(?))
             ORDER BY job, idx",
        )
        .bind(json(&ids));
        let steps = self.all("reading jobs' steps", sql, rows::step).await?;
        rows::attach_steps(&mut jobs, steps);
        Ok(jobs)
    }

    /// The query of `list_jobs` and `list_job_heads`.
    fn jobs_query(filter: &JobFilter) -> Sql<'_> {
        let limit = if filter.limit == 0 { 100 } else { filter.limit };
        sqlx::query(
            "SELECT * FROM jobs
             WHERE (? = 0 OR state IN ('pending', 'running'))
               AND (? IS NULL OR EXISTS (SELECT 1 FROM json_each(jobs.machines) WHERE value = ?))
             ORDER BY ord DESC LIMIT ?",
        )
        .bind(filter.active_only as i64)
        .bind(filter.machine.as_deref())
        .bind(filter.machine.as_deref())
        .bind(limit as i64)
    }
}

impl Store for SqliteStore {
    fn close(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(SqliteStore::close(self))
    }

    fn get_setting<'a>(&'a self, key: &'a str) -> BoxFut<'a, Option<Vec<u8>>> {
        let w = "reading a setting";
        let sql = sqlx::query("SELECT value FROM settings WHERE key = ?").bind(key);
        self.one(w, sql, move |r| r.bytes("value", w))
    }

    fn put_setting<'a>(&'a self, key: &'a str, value: &'a [u8]) -> BoxFut<'a, ()> {
        self.run(
            "writing a setting",
            sqlx::query(
                "INSERT INTO settings (key, value) VALUES (?, ?)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value),
        )
    }

    fn add_site<'a>(&'a self, name: &'a str) -> BoxFut<'a, ()> {
        self.run(
            "adding a site",
            sqlx::query("INSERT OR IGNORE INTO sites (name, created_ms) VALUES (?, ?)")
                .bind(name)
                .bind(now_ms() as i64),
        )
    }

    fn list_sites(&self) -> BoxFut<'_, Vec<String>> {
        let sql = sqlx::query("SELECT name FROM sites ORDER BY name");
        self.all("listing sites", sql, rows::text("name", "listing sites"))
    }

    fn put_component<'a>(&'a self, c: &'a Component) -> BoxFut<'a, ()> {
        self.run(
            "writing a component",
            sqlx::query(
                "INSERT OR REPLACE INTO components (role, id, site, version, addresses,
                   cert_serial, cert_fingerprint, enrolled_ms, last_heartbeat_ms, health,
                   status, status_ms, revoked, cert_expiry_ms)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(c.role.as_str())
            .bind(&c.id)
            .bind(&c.site)
            .bind(&c.version)
            .bind(json(&c.addresses))
            .bind(&c.cert_serial)
            .bind(&c.cert_fingerprint)
            .bind(c.enrolled_ms as i64)
            .bind(c.last_heartbeat_ms as i64)
            .bind(c.health.as_str())
            .bind(&c.status)
            .bind(c.status_ms as i64)
            .bind(c.revoked as i64)
            .bind(c.cert_expiry_ms as i64),
        )
    }

    fn get_component<'a>(&'a self, role: Role, id: &'a str) -> BoxFut<'a, Option<Component>> {
        self.one(
            "reading a component",
            sqlx::query("SELECT * FROM components WHERE role = ? AND id = ?")
                .bind(role.as_str())
                .bind(id),
            rows::component,
        )
    }

    fn list_components(&self) -> BoxFut<'_, Vec<Component>> {
        self.all(
            "listing components",
            sqlx::query("SELECT * FROM components ORDER BY role, id"),
            rows::component,
        )
    }

    fn set_heartbeat<'a>(&'a self, role: Role, id: &'a str, time_ms: u64) -> BoxFut<'a, ()> {
        self.run(
            "recording a heartbeat",
            sqlx::query("UPDATE components SET last_heartbeat_ms = ? WHERE role = ? AND id = ?")
                .bind(time_ms as i64)
                .bind(role.as_str())
                .bind(id),
        )
    }

    fn set_health<'a>(&'a self, role: Role, id: &'a str, health: Health) -> BoxFut<'a, ()> {
        self.run(
            "recording a component's health",
            sqlx::query("UPDATE components SET health = ? WHERE role = ? AND id = ?")
                .bind(health.as_str())
                .bind(role.as_str())
                .bind(id),
        )
    }

    fn set_status<'a>(
        &'a self,
        role: Role,
        id: &'a str,
        status: &'a [u8],
        time_ms: u64,
    ) -> BoxFut<'a, ()> {
        self.run(
            "recording a component's status",
            sqlx::query(
                "UPDATE components SET status = ?, status_ms = ?, last_heartbeat_ms = ?
                 WHERE role = ? AND id = ?",
            )
            .bind(status)
            .bind(time_ms as i64)
            .bind(time_ms as i64)
            .bind(role.as_str())
            .bind(id),
        )
    }

    fn delete_component<'a>(&'a self, role: Role, id: &'a str) -> BoxFut<'a, bool> {
        self.run_counted(
            "forgetting a component",
            sqlx::query("DELETE FROM components WHERE role = ? AND id = ?")
                .bind(role.as_str())
                .bind(id),
        )
    }

    fn put_machine<'a>(&'a self, m: &'a Machine) -> BoxFut<'a, ()> {
        let machine = sqlx::query(
            "INSERT INTO machines (id, site, policy, grp, created_ms) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT(id) DO UPDATE SET site = excluded.site, policy = excluded.policy,
               grp = excluded.grp",
        )
        .bind(&m.id)
        .bind(&m.site)
        .bind(json(&m.policy))
        .bind(&m.group)
        .bind(m.created_ms as i64);
        let old_disks = sqlx::query("DELETE FROM disks WHERE machine = ?").bind(&m.id);
        let disks = m.disks.iter().map(|d| {
            sqlx::query("INSERT INTO disks (machine, idx, name, size, path) VALUES (?, ?, ?, ?, ?)")
                .bind(&m.id)
                .bind(d.index as i64)
                .bind(&d.name)
                .bind(d.size as i64)
                .bind(&d.path)
        });
        let statements = [machine, old_disks].into_iter().chain(disks).collect();
        self.run_all("writing a machine", statements)
    }

    fn get_machine<'a>(&'a self, id: &'a str) -> BoxFut<'a, Option<Machine>> {
        Box::pin(async move {
            let sql = sqlx::query("SELECT * FROM machines WHERE id = ?").bind(id);
            let disks = sqlx::query("SELECT * FROM disks WHERE machine = ? ORDER BY idx").bind(id);
            // `id` is the primary key: at most one row.
            Ok(self.machines(sql, disks).await?.pop())
        })
    }

    fn list_machines(&self) -> BoxFut<'_, Vec<Machine>> {
        Box::pin(async move {
            let sql = sqlx::query("SELECT * FROM machines ORDER BY id");
            let disks = sqlx::query("SELECT * FROM disks ORDER BY machine, idx");
            self.machines(sql, disks).await
        })
    }

    fn put_replication<'a>(&'a self, r: &'a Replication) -> BoxFut<'a, ()> {
        self.run(
            "writing a replication",
            sqlx::query(
                "INSERT INTO replications (id, machine, from_site, to_site, ps, mt, policy, state,
                   previous, failover_point, created_ms, updated_ms, ord)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,
                   (SELECT COALESCE(MAX(ord), 0) + 1 FROM replications))
                 ON CONFLICT(id) DO UPDATE SET from_site = excluded.from_site,
                   to_site = excluded.to_site, ps = excluded.ps, mt = excluded.mt,
                   policy = excluded.policy, state = excluded.state,
                   previous = excluded.previous, failover_point = excluded.failover_point,
                   updated_ms = excluded.updated_ms",
            )
            .bind(&r.id)
            .bind(&r.machine)
            .bind(&r.from_site)
            .bind(&r.to_site)
            .bind(&r.ps)
            .bind(&r.mt)
            .bind(json(&r.policy))
            .bind(r.state.as_str())
            .bind(&r.previous)
            .bind(r.failover_point.as_ref().map(json))
            .bind(r.created_ms as i64)
            .bind(r.updated_ms as i64),
        )
    }

    fn get_replication<'a>(&'a self, id: &'a str) -> BoxFut<'a, Option<Replication>> {
        self.one(
            "reading a replication",
            sqlx::query("SELECT * FROM replications WHERE id = ?").bind(id),
            rows::replication,
        )
    }

    fn current_replication<'a>(&'a self, machine: &'a str) -> BoxFut<'a, Option<Replication>> {
        self.one(
            "reading a machine's replication",
            sqlx::query("SELECT * FROM replications WHERE machine = ? ORDER BY ord DESC LIMIT 1")
                .bind(machine),
            rows::replication,
        )
    }

    fn list_replications<'a>(&'a self, machine: Option<&'a str>) -> BoxFut<'a, Vec<Replication>> {
        Box::pin(async move {
            let rows = match machine {
                Some(m) => {
                    sqlx::query("SELECT * FROM replications WHERE machine = ? ORDER BY ord")
                        .bind(m)
                        .fetch_all(&self.pool)
                        .await
                }
                None => {
                    sqlx::query("SELECT * FROM replications ORDER BY ord")
                        .fetch_all(&self.pool)
                        .await
                }
            }
            .map_err(q("listing replications"))?;
            rows.iter().map(rows::replication).collect()
        })
    }

    fn current_replications(&self) -> BoxFut<'_, Vec<Replication>> {
        self.all(
            "listing current replications",
            sqlx::query(
                "SELECT * FROM replications WHERE ord IN
                   (SELECT MAX(ord) FROM replications GROUP BY machine)
                 ORDER BY ord",
            ),
            rows::replication,
        )
    }

    fn put_group<'a>(&'a self, g: &'a Group) -> BoxFut<'a, ()> {
        self.run("writing a consistency group", sqlx::query(
                "INSERT OR REPLACE INTO consistency_groups (name, machines, hold_ms, interval_secs, app)
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(&g.name)
            .bind(json(&g.machines))
            .bind(g.hold_ms as i64)
            .bind(g.interval_secs as i64)
            .bind(g.app as i64))
    }

    fn get_group<'a>(&'a self, name: &'a str) -> BoxFut<'a, Option<Group>> {
        self.one(
            "reading a consistency group",
            sqlx::query("SELECT * FROM consistency_groups WHERE name = ?").bind(name),
            rows::group,
        )
    }

    fn list_groups(&self) -> BoxFut<'_, Vec<Group>> {
        self.all(
            "listing consistency groups",
            sqlx::query("SELECT * FROM consistency_groups ORDER BY name"),
            rows::group,
        )
    }

    fn delete_group<'a>(&'a self, name: &'a str) -> BoxFut<'a, bool> {
        self.run_counted(
            "deleting a consistency group",
            sqlx::query("DELETE FROM consistency_groups WHERE name = ?").bind(name),
        )
    }

    fn put_plan<'a>(&'a self, p: &'a Plan) -> BoxFut<'a, ()> {
        self.run(
            "writing a recovery plan",
            sqlx::query("INSERT OR REPLACE INTO plans (name, body) VALUES (?, ?)")
                .bind(&p.name)
                .bind(json(p)),
        )
    }

    fn get_plan<'a>(&'a self, name: &'a str) -> BoxFut<'a, Option<Plan>> {
        let w = "reading a recovery plan";
        let sql = sqlx::query("SELECT body FROM plans WHERE name = ?").bind(name);
        self.one(w, sql, rows::body(w))
    }

    fn list_plans(&self) -> BoxFut<'_, Vec<Plan>> {
        let w = "listing recovery plans";
        self.all(
            w,
            sqlx::query("SELECT body FROM plans ORDER BY name"),
            rows::body(w),
        )
    }

    fn delete_plan<'a>(&'a self, name: &'a str) -> BoxFut<'a, bool> {
        self.run_counted(
            "deleting a recovery plan",
            sqlx::query("DELETE FROM plans WHERE name = ?").bind(name),
        )
    }

    fn put_job<'a>(&'a self, j: &'a Job) -> BoxFut<'a, ()> {
        let job = sqlx::query(
            "INSERT INTO jobs (id, kind, machines, plan, spec, data, state, progress, status,
               error, warnings, created_ms, started_ms, ended_ms, ord)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,
               (SELECT COALESCE(MAX(ord), 0) + 1 FROM jobs))
             ON CONFLICT(id) DO UPDATE SET data = excluded.data, state = excluded.state,
               progress = excluded.progress, status = excluded.status,
               error = excluded.error, warnings = excluded.warnings,
               started_ms = excluded.started_ms, ended_ms = excluded.ended_ms",
        )
        .bind(&j.id)
        .bind(&j.kind)
        .bind(json(&j.machines))
        .bind(&j.plan)
        .bind(&j.spec)
        .bind(&j.data)
        .bind(j.state.as_str())
        .bind(j.progress as i64)
        .bind(&j.status)
        .bind(&j.error)
        .bind(json(&j.warnings))
        .bind(j.created_ms as i64)
        .bind(j.started_ms as i64)
        .bind(j.ended_ms as i64);
        let old_steps = sqlx::query("DELETE FROM job_steps WHERE job = ?").bind(&j.id);
        let steps = j.steps.iter().map(|s| {
            sqlx::query(
                "INSERT INTO job_steps (job, idx, name, action, state, detail, error,
                   started_ms, ended_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&j.id)
            .bind(s.index as i64)
            .bind(&s.name)
            .bind(&s.action)
            .bind(s.state.as_str())
            .bind(&s.detail)
            .bind(&s.error)
            .bind(s.started_ms as i64)
            .bind(s.ended_ms as i64)
        });
        let statements = [job, old_steps].into_iter().chain(steps).collect();
        self.run_all("writing a job", statements)
    }

    fn get_job<'a>(&'a self, id: &'a str) -> BoxFut<'a, Option<Job>> {
        Box::pin(async move {
            let sql = sqlx::query("SELECT * FROM jobs WHERE id = ?").bind(id);
            let head = self.one("reading a job", sql, rows::job_head).await?;
            match head {
                Some(j) => Ok(self.with_steps(vec![j]).await?.pop()),
                None => Ok(None),
            }
        })
    }

    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFut<'a, Vec<Job>> {
        Box::pin(async move {
            let jobs = self.list_job_heads(filter).await?;
            self.with_steps(jobs).await
        })
    }

    fn list_job_heads<'a>(&'a self, filter: &'a JobFilter) -> BoxFut<'a, Vec<Job>> {
        self.all("listing jobs", Self::jobs_query(filter), |r| {
            rows::job_head(r)
        })
    }

    fn put_point_summary<'a>(
        &'a self,
        replication: &'a str,
        s: &'a PointSummary,
    ) -> BoxFut<'a, ()> {
        self.run(
            "writing a recovery-point summary",
            sqlx::query("INSERT OR REPLACE INTO point_summaries (replication, body) VALUES (?, ?)")
                .bind(replication)
                .bind(json(s)),
        )
    }

    fn get_point_summary<'a>(&'a self, replication: &'a str) -> BoxFut<'a, Option<PointSummary>> {
        let w = "reading a recovery-point summary";
        let sql = sqlx::query("SELECT body FROM point_summaries WHERE replication = ?");
        self.one(w, sql.bind(replication), rows::body(w))
    }

    fn add_event<'a>(&'a self, e: &'a Event) -> BoxFut<'a, ()> {
        let event = sqlx::query(
            "INSERT INTO events (time_ms, component, severity, kind, message, replication)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(e.time_ms as i64)
        .bind(&e.component)
        .bind(&e.severity)
        .bind(&e.kind)
        .bind(&e.message)
        .bind(&e.replication);
        // Keep the newest 10 000 events.
        let trim =
            sqlx::query("DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - 10000");
        self.run_all("recording an event", vec![event, trim])
    }

    fn recent_events(&self, limit: u32) -> BoxFut<'_, Vec<Event>> {
        let sql = sqlx::query("SELECT * FROM events ORDER BY seq DESC LIMIT ?");
        self.all("listing events", sql.bind(limit as i64), rows::event)
    }

    fn put_issued_cert<'a>(&'a self, c: &'a IssuedCert) -> BoxFut<'a, ()> {
        trust::put_issued_cert(self, c)
    }

    fn revoke_certs<'a>(&'a self, role: Role, id: &'a str, now_ms: u64) -> BoxFut<'a, Vec<String>> {
        trust::revoke_certs(self, role, id, now_ms)
    }

    fn revoked_serials(&self, now_ms: u64) -> BoxFut<'_, Vec<String>> {
        trust::revoked_serials(self, now_ms)
    }

    fn latest_cert<'a>(&'a self, role: Role, id: &'a str) -> BoxFut<'a, Option<IssuedCert>> {
        trust::latest_cert(self, role, id)
    }

    fn live_certs<'a>(
        &'a self,
        role: Role,
        id: &'a str,
        now_ms: u64,
    ) -> BoxFut<'a, Vec<IssuedCert>> {
        trust::live_certs(self, role, id, now_ms)
    }

    fn get_issued_cert<'a>(&'a self, serial: &'a str) -> BoxFut<'a, Option<IssuedCert>> {
        trust::get_issued_cert(self, serial)
    }

    fn put_token<'a>(&'a self, t: &'a Token) -> BoxFut<'a, ()> {
        trust::put_token(self, t)
    }

    fn get_token<'a>(&'a self, token_id: &'a str) -> BoxFut<'a, Option<Token>> {
        trust::get_token(self, token_id)
    }

    fn redeem_token<'a>(&'a self, token_id: &'a str, now_ms: u64) -> BoxFut<'a, Option<Token>> {
        trust::redeem_token(self, token_id, now_ms)
    }
}

#[cfg(test)]
mod tests;
