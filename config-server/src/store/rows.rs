//! Decoding the store's rows into records, shared by both engines: the
//! SQLite and the PostgreSQL schema keep the same columns with the same
//! meaning (integers as 64-bit signed, u64 values by their bit pattern;
//! lists, policies and points as JSON text; blobs as bytes), so a row reads
//! the same whichever engine returned it. Each engine only says how to read
//! one column ([`Cols`]).

use super::trust::{IssuedCert, Token};
use super::*;
use sqlx::Row;

/// A `StoreError::Query` naming `what` failed.
pub(crate) fn q(what: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
    move |e| StoreError::Query {
        what: what.to_string(),
        message: e.to_string(),
    }
}

pub(crate) fn corrupt(what: &str, message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: what.to_string(),
        message: message.into(),
    }
}

pub(crate) fn json<T: Serialize>(v: &T) -> String {
    // Serializing our own plain structs cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    what: &str,
    s: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| corrupt(what, format!("{e} in {s:?}")))
}

/// u64 milliseconds as a 64-bit signed column, saturating (a far-future
/// expiry must still compare as later than now).
pub(crate) fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Reading one column of a row, whichever engine returned it.
pub(crate) trait Cols {
    fn text(&self, col: &str, what: &str) -> Result<String, StoreError>;
    fn opt_text(&self, col: &str, what: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, col: &str, what: &str) -> Result<i64, StoreError>;
    fn opt_int(&self, col: &str, what: &str) -> Result<Option<i64>, StoreError>;
    fn bytes(&self, col: &str, what: &str) -> Result<Vec<u8>, StoreError>;

    /// A u64 kept by its bit pattern.
    fn u64(&self, col: &str, what: &str) -> Result<u64, StoreError> {
        Ok(self.int(col, what)? as u64)
    }
    fn opt_u64(&self, col: &str, what: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.opt_int(col, what)?.map(|v| v as u64))
    }
    fn u32(&self, col: &str, what: &str) -> Result<u32, StoreError> {
        Ok(self.int(col, what)? as u32)
    }
    fn flag(&self, col: &str, what: &str) -> Result<bool, StoreError> {
        Ok(self.int(col, what)? != 0)
    }
    /// A JSON text column.
    fn json<T: serde::de::DeserializeOwned>(&self, col: &str, what: &str) -> Result<T, StoreError> {
        from_json(what, &self.text(col, what)?)
    }
}

macro_rules! cols_for {
    ($row:ty) => {
        impl Cols for $row {
            fn text(&self, col: &str, what: &str) -> Result<String, StoreError> {
                get(self, col, what)
            }
            fn opt_text(&self, col: &str, what: &str) -> Result<Option<String>, StoreError> {
                get(self, col, what)
            }
            fn int(&self, col: &str, what: &str) -> Result<i64, StoreError> {
                get(self, col, what)
            }
            fn opt_int(&self, col: &str, what: &str) -> Result<Option<i64>, StoreError> {
                get(self, col, what)
            }
            fn bytes(&self, col: &str, what: &str) -> Result<Vec<u8>, StoreError> {
                get(self, col, what)
            }
        }
    };
}
cols_for!(sqlx::sqlite::SqliteRow);
cols_for!(sqlx::postgres::PgRow);

fn get<'r, R, T>(row: &'r R, col: &str, what: &str) -> Result<T, StoreError>
where
    R: Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    row.try_get(col)
        .map_err(|e| corrupt(what, format!("column {col}: {e}")))
}

fn role_of(s: &str, what: &str) -> Result<Role, StoreError> {
    Role::parse(s).ok_or_else(|| corrupt(what, format!("unknown role {s:?}")))
}

/// A row decoder: the JSON `body` column of the tables that keep one.
pub(crate) fn body<T: serde::de::DeserializeOwned, R: Cols>(
    what: &'static str,
) -> impl Fn(&R) -> Result<T, StoreError> + Send {
    move |r| r.json("body", what)
}

/// A row decoder: the one text column `col`.
pub(crate) fn text<R: Cols>(
    col: &'static str,
    what: &'static str,
) -> impl Fn(&R) -> Result<String, StoreError> + Send {
    move |r| r.text(col, what)
}

pub(crate) fn component(row: &impl Cols) -> Result<Component, StoreError> {
    let w = "reading a component";
    Ok(Component {
        role: role_of(&row.text("role", w)?, w)?,
        id: row.text("id", w)?,
        site: row.text("site", w)?,
        version: row.text("version", w)?,
        addresses: row.json("addresses", w)?,
        cert_serial: row.text("cert_serial", w)?,
        cert_fingerprint: row.text("cert_fingerprint", w)?,
        cert_expiry_ms: row.u64("cert_expiry_ms", w)?,
        enrolled_ms: row.u64("enrolled_ms", w)?,
        last_heartbeat_ms: row.u64("last_heartbeat_ms", w)?,
        health: Health::parse(&row.text("health", w)?)
            .ok_or_else(|| corrupt(w, "unknown health"))?,
        status: row.bytes("status", w)?,
        status_ms: row.u64("status_ms", w)?,
        revoked: row.flag("revoked", w)?,
    })
}

/// A machine without its disks (see [`attach_disks`]).
pub(crate) fn machine_head(row: &impl Cols) -> Result<Machine, StoreError> {
    let w = "reading a machine";
    Ok(Machine {
        id: row.text("id", w)?,
        policy: row.json("policy", w)?,
        site: row.text("site", w)?,
        group: row.text("grp", w)?,
        created_ms: row.u64("created_ms", w)?,
        disks: Vec::new(),
    })
}

/// One disk with the id of its machine.
pub(crate) fn disk(row: &impl Cols) -> Result<(String, Disk), StoreError> {
    let w = "reading a machine's disks";
    Ok((
        row.text("machine", w)?,
        Disk {
            index: row.u32("idx", w)?,
            name: row.text("name", w)?,
            size: row.u64("size", w)?,
            path: row.text("path", w)?,
        },
    ))
}

/// Hands every disk to its machine: `disks` ordered by index, read with
/// one query for all the machines (never one per machine).
pub(crate) fn attach_disks(machines: &mut [Machine], disks: Vec<(String, Disk)>) {
    let mut by_machine: std::collections::HashMap<String, Vec<Disk>> =
        std::collections::HashMap::new();
    for (m, d) in disks {
        by_machine.entry(m).or_default().push(d);
    }
    for m in machines {
        m.disks = by_machine.remove(&m.id).unwrap_or_default();
    }
}

pub(crate) fn replication(row: &impl Cols) -> Result<Replication, StoreError> {
    let w = "reading a replication";
    let state = row.text("state", w)?;
    Ok(Replication {
        id: row.text("id", w)?,
        machine: row.text("machine", w)?,
        from_site: row.text("from_site", w)?,
        to_site: row.text("to_site", w)?,
        ps: row.text("ps", w)?,
        mt: row.text("mt", w)?,
        policy: row.json("policy", w)?,
        state: ReplState::parse(&state)
            .ok_or_else(|| corrupt(w, format!("unknown state {state:?}")))?,
        previous: row.text("previous", w)?,
        failover_point: match row.opt_text("failover_point", w)? {
            Some(s) => Some(from_json(w, &s)?),
            None => None,
        },
        created_ms: row.u64("created_ms", w)?,
        updated_ms: row.u64("updated_ms", w)?,
    })
}

pub(crate) fn group(row: &impl Cols) -> Result<Group, StoreError> {
    let w = "reading a consistency group";
    Ok(Group {
        name: row.text("name", w)?,
        machines: row.json("machines", w)?,
        hold_ms: row.u32("hold_ms", w)?,
        interval_secs: row.u32("interval_secs", w)?,
        app: row.flag("app", w)?,
    })
}

/// One step with the id of its job.
pub(crate) fn step(row: &impl Cols) -> Result<(String, JobStep), StoreError> {
    let w = "reading a job's steps";
    let state = row.text("state", w)?;
    Ok((
        row.text("job", w)?,
        JobStep {
            index: row.u32("idx", w)?,
            name: row.text("name", w)?,
            action: row.text("action", w)?,
            state: StepState::parse(&state)
                .ok_or_else(|| corrupt(w, format!("unknown step state {state:?}")))?,
            detail: row.text("detail", w)?,
            error: row.text("error", w)?,
            started_ms: row.u64("started_ms", w)?,
            ended_ms: row.u64("ended_ms", w)?,
        },
    ))
}

/// Hands every step to its job: `steps` ordered by index, read with one
/// query for all the jobs.
pub(crate) fn attach_steps(jobs: &mut [Job], steps: Vec<(String, JobStep)>) {
    let mut by_job: std::collections::HashMap<String, Vec<JobStep>> =
        std::collections::HashMap::new();
    for (j, s) in steps {
        by_job.entry(j).or_default().push(s);
    }
    for j in jobs {
        j.steps = by_job.remove(&j.id).unwrap_or_default();
    }
}

/// A job without its steps.
pub(crate) fn job_head(row: &impl Cols) -> Result<Job, StoreError> {
    let w = "reading a job";
    let state = row.text("state", w)?;
    Ok(Job {
        id: row.text("id", w)?,
        kind: row.text("kind", w)?,
        machines: row.json("machines", w)?,
        plan: row.text("plan", w)?,
        spec: row.text("spec", w)?,
        data: row.text("data", w)?,
        state: JobState::parse(&state)
            .ok_or_else(|| corrupt(w, format!("unknown job state {state:?}")))?,
        progress: row.u32("progress", w)?,
        status: row.text("status", w)?,
        error: row.text("error", w)?,
        warnings: row.json("warnings", w)?,
        created_ms: row.u64("created_ms", w)?,
        started_ms: row.u64("started_ms", w)?,
        ended_ms: row.u64("ended_ms", w)?,
        steps: Vec::new(),
    })
}

pub(crate) fn event(row: &impl Cols) -> Result<Event, StoreError> {
    let w = "listing events";
    Ok(Event {
        time_ms: row.u64("time_ms", w)?,
        component: row.text("component", w)?,
        severity: row.text("severity", w)?,
        kind: row.text("kind", w)?,
        message: row.text("message", w)?,
        replication: row.text("replication", w)?,
    })
}

pub(crate) const CERT: &str = "reading an issued certificate";
pub(crate) const TOKEN: &str = "reading an enrollment token";

pub(crate) fn issued_cert(row: &impl Cols) -> Result<IssuedCert, StoreError> {
    Ok(IssuedCert {
        serial: row.text("serial", CERT)?,
        role: role_of(&row.text("role", CERT)?, CERT)?,
        id: row.text("id", CERT)?,
        issued_ms: row.u64("issued_ms", CERT)?,
        expiry_ms: row.u64("expiry_ms", CERT)?,
        revoked_ms: row.opt_u64("revoked_ms", CERT)?,
    })
}

pub(crate) fn token(row: &impl Cols) -> Result<Token, StoreError> {
    Ok(Token {
        token_id: row.text("token_id", TOKEN)?,
        role: role_of(&row.text("role", TOKEN)?, TOKEN)?,
        id: row.text("id", TOKEN)?,
        verifier: row.bytes("verifier", TOKEN)?,
        created_ms: row.u64("created_ms", TOKEN)?,
        expires_ms: row.u64("expires_ms", TOKEN)?,
        used_ms: row.opt_u64("used_ms", TOKEN)?,
    })
}
