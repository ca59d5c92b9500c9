//! The PostgreSQL engine of [`Store`], for an HA deployment: an active and
//! a standby CS share one database (DESIGN.md §8 "State"; the lease that
//! says which one serves is not the store's business).
//!
//! Durability: every write is one statement or one transaction committed
//! before the call returns, and PostgreSQL's default `synchronous_commit =
//! on` makes a commit wait for its WAL flush, so a crash of the CS or of the
//! database host loses nothing acknowledged (a server configured with
//! `synchronous_commit = off` gives that up; leave the default). The schema
//! lives in `migrations_pg/`, embedded with `sqlx::migrate!` and applied at
//! open; sqlx takes an advisory lock while migrating, so two CS processes
//! opening one database at once apply it once. Rows decode with the same
//! code as SQLite's (`store::rows`); queries are plain runtime SQL, so
//! building the crate needs no database.
//!
//! Fencing: a CS serving under the store lease ([`crate::lease`]) tells its
//! store the lease's epoch ([`PgStore::fence`]). Every write then runs in a
//! transaction that first reads the `cs_lease` row `FOR SHARE` and fails
//! with [`StoreError::Fenced`] unless the epoch is still this CS's: the new
//! holder's `UPDATE … epoch + 1` waits for a write in flight, and no write
//! of the old holder commits after it. Reads are not fenced. Pool
//! connections carry the lease's server-side keepalives and a
//! [`STATEMENT_TIMEOUT`], so a write stuck in a partition dies on the
//! server instead of landing after a takeover.

mod trust;

use super::rows::{self, json, q, Cols};
use super::*;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The longest one statement of the store may run on the server.
pub const STATEMENT_TIMEOUT: (&str, &str) = ("statement_timeout", "30000");

/// The PostgreSQL store. Cheap to clone (a connection pool).
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The URL without its password, for messages.
    shown: String,
    /// The lease epoch writes must still hold; 0 = not fenced (tools such
    /// as `init` and `admin-cert`, and a CS without standbys).
    epoch: Arc<AtomicI64>,
}

/// A statement with its bound values, as the helpers below take it.
type Sql<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// `url` with the password (if any, in the user part or as a `password=`
/// query parameter) replaced, fit for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let url = &redact_query(url);
    let rest = &url[scheme_end..];
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..auth_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..scheme_end],
                &rest[..colon],
                &rest[at..]
            ),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// `url` with the value of a `password=` query parameter replaced.
fn redact_query(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => p.to_string(),
        })
        .collect();
    format!("{base}?{}", params.join("&"))
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user[:password]@host
    /// [:port]/database[?sslmode=…]`) and migrates it.
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        let shown = redact_url(url);
        let connect = |e: &dyn std::fmt::Display| StoreError::Connect {
            url: shown.clone(),
            message: e.to_string(),
        };
        let opts = PgConnectOptions::from_str(url)
            .map_err(|e| connect(&e))?
            .options(crate::lease::KEEPALIVES)
            .options([STATEMENT_TIMEOUT]);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|e| connect(&e))?;
        sqlx::migrate!("./migrations_pg")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migrate {
                path: shown.clone(),
                message: e.to_string(),
            })?;
        Ok(PgStore {
            pool,
            shown,
            epoch: Arc::new(AtomicI64::new(0)),
        })
    }

    /// Fences every later write (of this store and its clones) to the store
    /// lease `epoch`: once another CS took the lease, writes fail with
    /// [`StoreError::Fenced`].
    pub fn fence(&self, epoch: i64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// Begins a write transaction; when fenced, it first checks (and holds,
    /// `FOR SHARE`) that the lease still has this store's epoch.
    async fn begin_write(
        &self,
        what: &'static str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(q(what))?;
        let mine = self.epoch.load(Ordering::SeqCst);
        if mine != 0 {
            let now: Option<(i64, String)> =
                sqlx::query_as("SELECT epoch, holder FROM cs_lease WHERE id = 1 FOR SHARE")
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(q(what))?;
            match now {
                Some((epoch, _)) if epoch == mine => {}
                other => {
                    let holder = other
                        .map_or_else(|| "no CS".to_string(), |(e, h)| format!("{h} (epoch {e})"));
                    return Err(StoreError::Fenced {
                        what: what.to_string(),
                        epoch: mine,
                        holder,
                    });
                }
            }
        }
        Ok(tx)
    }

    /// The database URL without its password.
    pub fn url(&self) -> &str {
        &self.shown
    }

    /// The connection pool (for the few readers that need more than the
    /// trait, such as a health check).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes the pool: new acquires fail at once; waits for connections
    /// in use to return.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Runs a statement that returns no rows; `what` names it in errors.
    fn run<'a>(&'a self, what: &'static str, sql: Sql<'a>) -> BoxFut<'a, ()> {
        self.run_all(what, vec![sql])
    }

    /// Runs a statement that returns no rows: whether it touched any.
    fn run_counted<'a>(&'a self, what: &'static str, sql: Sql<'a>) -> BoxFut<'a, bool> {
        Box::pin(async move { Ok(self.write(what, vec![sql]).await? > 0) })
    }

    /// Runs `statements` in one fenced transaction: how many rows they
    /// touched.
    async fn write<'a>(
        &'a self,
        what: &'static str,
        statements: Vec<Sql<'a>>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_write(what).await?;
        let mut touched = 0;
        for sql in statements {
            touched += sql
                .execute(&mut *tx)
                .await
                .map_err(q(what))?
                .rows_affected();
        }
        tx.commit().await.map_err(q(what))?;
        Ok(touched)
    }

    /// The rows a writing statement (`… RETURNING`) returns, decoded by
    /// `row`, in one fenced transaction.
    fn write_returning<'a, T: Send + 'a>(
        &'a self,
        what: &'static str,
        sql: Sql<'a>,
        row: impl Fn(&PgRow) -> Result<T, StoreError> + Send + 'a,
    ) -> BoxFut<'a, Vec<T>> {
        Box::pin(async move {
            let mut tx = self.begin_write(what).await?;
            let rows = sql.fetch_all(&mut *tx).await.map_err(q(what))?;
            tx.commit().await.map_err(q(what))?;
            rows.iter().map(row).collect()
        })
    }

    /// The first row of a query, decoded by `row`.
    fn one<'a, T: Send + 'a>(
        &'a self,
        what: &'static str,
        sql: Sql<'a>,
        row: impl Fn(&PgRow) -> Result<T, StoreError> + Send + 'a,
    ) -> BoxFut<'a, Option<T>> {
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
        row: impl Fn(&PgRow) -> Result<T, StoreError> + Send + 'a,
    ) -> BoxFut<'a, Vec<T>> {
        Box::pin(async move {
            let rows = sql.fetch_all(&self.pool).await.map_err(q(what))?;
            rows.iter().map(row).collect()
        })
    }

    /// Runs `statements` in one transaction: all of them take effect or none.
    fn run_all<'a>(&'a self, what: &'static str, statements: Vec<Sql<'a>>) -> BoxFut<'a, ()> {
        Box::pin(async move { self.write(what, statements).await.map(|_| ()) })
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

    /// The jobs `filter` selects, newest first, without their steps.
    fn job_heads<'a>(&'a self, filter: &'a JobFilter) -> BoxFut<'a, Vec<Job>> {
        let limit = if filter.limit == 0 { 100 } else { filter.limit };
        let sql = sqlx::query(
            "SELECT * FROM jobs
             WHERE (NOT $1 OR state IN ('pending', 'running'))
               AND ($2::text IS NULL OR machines::jsonb @> jsonb_build_array($2::text))
             ORDER BY ord DESC LIMIT $3",
        )
        .bind(filter.active_only)
        .bind(filter.machine.as_deref())
        .bind(limit as i64);
        self.all("listing jobs", sql, rows::job_head)
    }

    /// `jobs` with their steps, read with one query.
    async fn with_steps(&self, mut jobs: Vec<Job>) -> Result<Vec<Job>, StoreError> {
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        let sql =
            sqlx::query("SELECT * FROM job_steps WHERE job = ANY($1) ORDER BY job, idx").bind(ids);
        let steps = self.all("reading jobs' steps", sql, rows::step).await?;
        rows::attach_steps(&mut jobs, steps);
        Ok(jobs)
    }
}

impl Store for PgStore {
    fn close(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(PgStore::close(self))
    }

    fn get_setting<'a>(&'a self, key: &'a str) -> BoxFut<'a, Option<Vec<u8>>> {
        let w = "reading a setting";
        let sql = sqlx::query("SELECT value FROM settings WHERE key = $1").bind(key);
        self.one(w, sql, move |r| r.bytes("value", w))
    }

    fn put_setting<'a>(&'a self, key: &'a str, value: &'a [u8]) -> BoxFut<'a, ()> {
        self.run(
            "writing a setting",
            sqlx::query(
                "INSERT INTO settings (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value),
        )
    }

    fn add_site<'a>(&'a self, name: &'a str) -> BoxFut<'a, ()> {
        self.run(
            "adding a site",
            sqlx::query(
                "INSERT INTO sites (name, created_ms) VALUES ($1, $2)
                 ON CONFLICT (name) DO NOTHING",
            )
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
                "INSERT INTO components (role, id, site, version, addresses,
                   cert_serial, cert_fingerprint, enrolled_ms, last_heartbeat_ms, health,
                   status, status_ms, revoked, cert_expiry_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                 ON CONFLICT (role, id) DO UPDATE SET site = excluded.site,
                   version = excluded.version, addresses = excluded.addresses,
                   cert_serial = excluded.cert_serial,
                   cert_fingerprint = excluded.cert_fingerprint,
                   enrolled_ms = excluded.enrolled_ms,
                   last_heartbeat_ms = excluded.last_heartbeat_ms, health = excluded.health,
                   status = excluded.status, status_ms = excluded.status_ms,
                   revoked = excluded.revoked, cert_expiry_ms = excluded.cert_expiry_ms",
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
            sqlx::query("SELECT * FROM components WHERE role = $1 AND id = $2")
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
            sqlx::query("UPDATE components SET last_heartbeat_ms = $1 WHERE role = $2 AND id = $3")
                .bind(time_ms as i64)
                .bind(role.as_str())
                .bind(id),
        )
    }

    fn set_health<'a>(&'a self, role: Role, id: &'a str, health: Health) -> BoxFut<'a, ()> {
        self.run(
            "recording a component's health",
            sqlx::query("UPDATE components SET health = $1 WHERE role = $2 AND id = $3")
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
                "UPDATE components SET status = $1, status_ms = $2, last_heartbeat_ms = $2
                 WHERE role = $3 AND id = $4",
            )
            .bind(status)
            .bind(time_ms as i64)
            .bind(role.as_str())
            .bind(id),
        )
    }

    fn delete_component<'a>(&'a self, role: Role, id: &'a str) -> BoxFut<'a, bool> {
        self.run_counted(
            "forgetting a component",
            sqlx::query("DELETE FROM components WHERE role = $1 AND id = $2")
                .bind(role.as_str())
                .bind(id),
        )
    }

    fn put_machine<'a>(&'a self, m: &'a Machine) -> BoxFut<'a, ()> {
        let machine = sqlx::query(
            "INSERT INTO machines (id, site, policy, grp, created_ms) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO UPDATE SET site = excluded.site, policy = excluded.policy,
               grp = excluded.grp",
        )
        .bind(&m.id)
        .bind(&m.site)
        .bind(json(&m.policy))
        .bind(&m.group)
        .bind(m.created_ms as i64);
        let old_disks = sqlx::query("DELETE FROM disks WHERE machine = $1").bind(&m.id);
        // Every disk in one statement, from parallel arrays.
        let disks = sqlx::query(
            "INSERT INTO disks (machine, idx, name, size, path)
             SELECT $1::text, * FROM UNNEST($2::bigint[], $3::text[], $4::bigint[], $5::text[])",
        )
        .bind(&m.id)
        .bind(m.disks.iter().map(|d| d.index as i64).collect::<Vec<_>>())
        .bind(m.disks.iter().map(|d| d.name.clone()).collect::<Vec<_>>())
        .bind(m.disks.iter().map(|d| d.size as i64).collect::<Vec<_>>())
        .bind(m.disks.iter().map(|d| d.path.clone()).collect::<Vec<_>>());
        self.run_all("writing a machine", vec![machine, old_disks, disks])
    }

    fn get_machine<'a>(&'a self, id: &'a str) -> BoxFut<'a, Option<Machine>> {
        Box::pin(async move {
            let sql = sqlx::query("SELECT * FROM machines WHERE id = $1").bind(id);
            let disks = sqlx::query("SELECT * FROM disks WHERE machine = $1 ORDER BY idx").bind(id);
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
                   previous, failover_point, created_ms, updated_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT (id) DO UPDATE SET from_site = excluded.from_site,
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
            sqlx::query("SELECT * FROM replications WHERE id = $1").bind(id),
            rows::replication,
        )
    }

    fn current_replication<'a>(&'a self, machine: &'a str) -> BoxFut<'a, Option<Replication>> {
        self.one(
            "reading a machine's replication",
            sqlx::query("SELECT * FROM replications WHERE machine = $1 ORDER BY ord DESC LIMIT 1")
                .bind(machine),
            rows::replication,
        )
    }

    fn list_replications<'a>(&'a self, machine: Option<&'a str>) -> BoxFut<'a, Vec<Replication>> {
        self.all(
            "listing replications",
            sqlx::query(
                "SELECT * FROM replications WHERE ($1::text IS NULL OR machine = $1) ORDER BY ord",
            )
            .bind(machine),
            rows::replication,
        )
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
        self.run(
            "writing a consistency group",
            sqlx::query(
                "INSERT INTO consistency_groups (name, machines, hold_ms, interval_secs, app)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO UPDATE SET machines = excluded.machines,
                   hold_ms = excluded.hold_ms, interval_secs = excluded.interval_secs,
                   app = excluded.app",
            )
            .bind(&g.name)
            .bind(json(&g.machines))
            .bind(g.hold_ms as i64)
            .bind(g.interval_secs as i64)
            .bind(g.app as i64),
        )
    }

    fn get_group<'a>(&'a self, name: &'a str) -> BoxFut<'a, Option<Group>> {
        self.one(
            "reading a consistency group",
            sqlx::query("SELECT * FROM consistency_groups WHERE name = $1").bind(name),
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
            sqlx::query("DELETE FROM consistency_groups WHERE name = $1").bind(name),
        )
    }

    fn put_plan<'a>(&'a self, p: &'a Plan) -> BoxFut<'a, ()> {
        self.run(
            "writing a recovery plan",
            sqlx::query(
                "INSERT INTO plans (name, body) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET body = excluded.body",
            )
            .bind(&p.name)
            .bind(json(p)),
        )
    }

    fn get_plan<'a>(&'a self, name: &'a str) -> BoxFut<'a, Option<Plan>> {
        let w = "reading a recovery plan";
        let sql = sqlx::query("SELECT body FROM plans WHERE name = $1").bind(name);
        self.one(w, sql, rows::body(w))
    }

    fn list_plans(&self) -> BoxFut<'_, Vec<Plan>> {
        let w = "listing recovery plans";
        let sql = sqlx::query("SELECT body FROM plans ORDER BY name");
        self.all(w, sql, rows::body(w))
    }

    fn delete_plan<'a>(&'a self, name: &'a str) -> BoxFut<'a, bool> {
        self.run_counted(
            "deleting a recovery plan",
            sqlx::query("DELETE FROM plans WHERE name = $1").bind(name),
        )
    }

    fn put_job<'a>(&'a self, j: &'a Job) -> BoxFut<'a, ()> {
        let job = sqlx::query(
            "INSERT INTO jobs (id, kind, machines, plan, spec, data, state, progress, status,
               error, warnings, created_ms, started_ms, ended_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
             ON CONFLICT (id) DO UPDATE SET data = excluded.data, state = excluded.state,
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
        let old_steps = sqlx::query("DELETE FROM job_steps WHERE job = $1").bind(&j.id);
        // Every step in one statement, from parallel arrays.
        let s = &j.steps;
        let steps = sqlx::query(
            "INSERT INTO job_steps (job, idx, name, action, state, detail, error,
               started_ms, ended_ms)
             SELECT $1::text, * FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::text[],
               $6::text[], $7::text[], $8::bigint[], $9::bigint[])",
        )
        .bind(&j.id)
        .bind(s.iter().map(|s| s.index as i64).collect::<Vec<_>>())
        .bind(s.iter().map(|s| s.name.clone()).collect::<Vec<_>>())
        .bind(s.iter().map(|s| s.action.clone()).collect::<Vec<_>>())
        .bind(s.iter().map(|s| s.state.as_str()).collect::<Vec<_>>())
        .bind(s.iter().map(|s| s.detail.clone()).collect::<Vec<_>>())
        .bind(s.iter().map(|s| s.error.clone()).collect::<Vec<_>>())
        .bind(s.iter().map(|s| s.started_ms as i64).collect::<Vec<_>>())
        .bind(s.iter().map(|s| s.ended_ms as i64).collect::<Vec<_>>());
        self.run_all("writing a job", vec![job, old_steps, steps])
    }

    fn get_job<'a>(&'a self, id: &'a str) -> BoxFut<'a, Option<Job>> {
        Box::pin(async move {
            let sql = sqlx::query("SELECT * FROM jobs WHERE id = $1").bind(id);
            let head = self.one("reading a job", sql, rows::job_head).await?;
            match head {
                Some(j) => Ok(self.with_steps(vec![j]).await?.pop()),
                None => Ok(None),
            }
        })
    }

    fn list_jobs<'a>(&'a self, filter: &'a JobFilter) -> BoxFut<'a, Vec<Job>> {
        Box::pin(async move {
            let jobs = self.job_heads(filter).await?;
            self.with_steps(jobs).await
        })
    }

    fn list_job_heads<'a>(&'a self, filter: &'a JobFilter) -> BoxFut<'a, Vec<Job>> {
        self.job_heads(filter)
    }

    fn put_point_summary<'a>(
        &'a self,
        replication: &'a str,
        s: &'a PointSummary,
    ) -> BoxFut<'a, ()> {
        self.run(
            "writing a recovery-point summary",
            sqlx::query(
                "INSERT INTO point_summaries (replication, body) VALUES ($1, $2)
                 ON CONFLICT (replication) DO UPDATE SET body = excluded.body",
            )
            .bind(replication)
            .bind(json(s)),
        )
    }

    fn get_point_summary<'a>(&'a self, replication: &'a str) -> BoxFut<'a, Option<PointSummary>> {
        let w = "reading a recovery-point summary";
        let sql = sqlx::query("SELECT body FROM point_summaries WHERE replication = $1");
        self.one(w, sql.bind(replication), rows::body(w))
    }

    fn add_event<'a>(&'a self, e: &'a Event) -> BoxFut<'a, ()> {
        let event = sqlx::query(
            "INSERT INTO events (time_ms, component, severity, kind, message, replication)
             VALUES ($1, $2, $3, $4, $5, $6)",
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
        let sql = sqlx::query("SELECT * FROM events ORDER BY seq DESC LIMIT $1");
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
