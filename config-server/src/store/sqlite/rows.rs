//! Decoding the SQLite rows of the store's records (components, disks,
//! replications, groups, jobs and their steps), apart from the queries.

use super::*;

impl SqliteStore {
    pub(super) fn component_row(row: &SqliteRow) -> Result<Component, StoreError> {
        let w = "reading a component";
        let addresses: String = get(row, "addresses", w)?;
        Ok(Component {
            role: role_of(&get::<String>(row, "role", w)?, w)?,
            id: get(row, "id", w)?,
            site: get(row, "site", w)?,
            version: get(row, "version", w)?,
            addresses: from_json(w, &addresses)?,
            cert_serial: get(row, "cert_serial", w)?,
            cert_fingerprint: get(row, "cert_fingerprint", w)?,
            cert_expiry_ms: get_u64(row, "cert_expiry_ms", w)?,
            enrolled_ms: get_u64(row, "enrolled_ms", w)?,
            last_heartbeat_ms: get_u64(row, "last_heartbeat_ms", w)?,
            health: Health::parse(&get::<String>(row, "health", w)?)
                .ok_or_else(|| corrupt(w, "unknown health"))?,
            status: get(row, "status", w)?,
            status_ms: get_u64(row, "status_ms", w)?,
            revoked: get::<i64>(row, "revoked", w)? != 0,
        })
    }

    pub(super) fn disk_row(row: &SqliteRow) -> Result<Disk, StoreError> {
        let w = "reading a machine's disks";
        Ok(Disk {
            index: get::<i64>(row, "idx", w)? as u32,
            name: get(row, "name", w)?,
            size: get_u64(row, "size", w)?,
            path: get(row, "path", w)?,
        })
    }

    pub(super) fn replication_row(row: &SqliteRow) -> Result<Replication, StoreError> {
        let w = "reading a replication";
        let state: String = get(row, "state", w)?;
        let fp: Option<String> = get(row, "failover_point", w)?;
        Ok(Replication {
            id: get(row, "id", w)?,
            machine: get(row, "machine", w)?,
            from_site: get(row, "from_site", w)?,
            to_site: get(row, "to_site", w)?,
            ps: get(row, "ps", w)?,
            mt: get(row, "mt", w)?,
            policy: from_json(w, &get::<String>(row, "policy", w)?)?,
            state: ReplState::parse(&state)
                .ok_or_else(|| corrupt(w, format!("unknown state {state:?}")))?,
            previous: get(row, "previous", w)?,
            failover_point: match fp {
                Some(s) => Some(from_json(w, &s)?),
                None => None,
            },
            created_ms: get_u64(row, "created_ms", w)?,
            updated_ms: get_u64(row, "updated_ms", w)?,
        })
    }

    pub(super) fn group_row(row: &SqliteRow) -> Result<Group, StoreError> {
        let w = "reading a consistency group";
        Ok(Group {
            name: get(row, "name", w)?,
            machines: from_json(w, &get::<String>(row, "machines", w)?)?,
            hold_ms: get::<i64>(row, "hold_ms", w)? as u32,
            interval_secs: get::<i64>(row, "interval_secs", w)? as u32,
            app: get::<i64>(row, "app", w)? != 0,
        })
    }

    pub(super) fn step_row(row: &SqliteRow) -> Result<JobStep, StoreError> {
        let w = "reading a job's steps";
        let state: String = get(row, "state", w)?;
        Ok(JobStep {
            index: get::<i64>(row, "idx", w)? as u32,
            name: get(row, "name", w)?,
            action: get(row, "action", w)?,
            state: StepState::parse(&state)
                .ok_or_else(|| corrupt(w, format!("unknown step state {state:?}")))?,
            detail: get(row, "detail", w)?,
            error: get(row, "error", w)?,
            started_ms: get_u64(row, "started_ms", w)?,
            ended_ms: get_u64(row, "ended_ms", w)?,
        })
    }

    /// A job without its steps.
    pub(super) fn job_head_row(row: &SqliteRow) -> Result<Job, StoreError> {
        let w = "reading a job";
        let state: String = get(row, "state", w)?;
        Ok(Job {
            id: get(row, "id", w)?,
            kind: get(row, "kind", w)?,
            machines: from_json(w, &get::<String>(row, "machines", w)?)?,
            plan: get(row, "plan", w)?,
            spec: get(row, "spec", w)?,
            data: get(row, "data", w)?,
            state: JobState::parse(&state)
                .ok_or_else(|| corrupt(w, format!("unknown job state {state:?}")))?,
            progress: get::<i64>(row, "progress", w)? as u32,
            status: get(row, "status", w)?,
            error: get(row, "error", w)?,
            warnings: from_json(w, &get::<String>(row, "warnings", w)?)?,
            created_ms: get_u64(row, "created_ms", w)?,
            started_ms: get_u64(row, "started_ms", w)?,
            ended_ms: get_u64(row, "ended_ms", w)?,
            steps: Vec::new(),
        })
    }
}
