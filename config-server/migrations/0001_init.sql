-- The configuration server's schema (DESIGN.md §8 "State").
-- Timestamps are milliseconds since the Unix epoch; u64 values are stored
-- as INTEGER (i64 bit pattern).

CREATE TABLE settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);

CREATE TABLE sites (
    name       TEXT PRIMARY KEY NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE TABLE components (
    role              TEXT NOT NULL,
    id                TEXT NOT NULL,
    site              TEXT NOT NULL DEFAULT '',
    version           TEXT NOT NULL DEFAULT '',
    addresses         TEXT NOT NULL DEFAULT '[]',
    cert_serial       TEXT NOT NULL DEFAULT '',
    cert_fingerprint  TEXT NOT NULL DEFAULT '',
    enrolled_ms       INTEGER NOT NULL DEFAULT 0,
    last_heartbeat_ms INTEGER NOT NULL DEFAULT 0,
    health            TEXT NOT NULL DEFAULT 'enrolled',
    status            BLOB NOT NULL DEFAULT x'',
    status_ms         INTEGER NOT NULL DEFAULT 0,
    revoked           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (role, id)
);

CREATE TABLE machines (
    id         TEXT PRIMARY KEY NOT NULL,
    site       TEXT NOT NULL,
    policy     TEXT NOT NULL,
    grp        TEXT NOT NULL DEFAULT '',
    created_ms INTEGER NOT NULL
);

CREATE TABLE disks (
    machine TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    idx     INTEGER NOT NULL,
    name    TEXT NOT NULL,
    size    INTEGER NOT NULL,
    PRIMARY KEY (machine, idx)
);

CREATE TABLE replications (
    id             TEXT PRIMARY KEY NOT NULL,
    machine        TEXT NOT NULL REFERENCES machines(id),
    from_site      TEXT NOT NULL,
    to_site        TEXT NOT NULL,
    ps             TEXT NOT NULL,
    mt             TEXT NOT NULL,
    policy         TEXT NOT NULL,
    state          TEXT NOT NULL,
    previous       TEXT NOT NULL DEFAULT '',
    failover_point TEXT,
    created_ms     INTEGER NOT NULL,
    updated_ms     INTEGER NOT NULL,
    -- insertion order breaks ties between replications created in one ms
    ord            INTEGER NOT NULL
);
CREATE INDEX replications_machine ON replications(machine, ord);

CREATE TABLE consistency_groups (
    name          TEXT PRIMARY KEY NOT NULL,
    machines      TEXT NOT NULL,
    hold_ms       INTEGER NOT NULL,
    interval_secs INTEGER NOT NULL,
    app           INTEGER NOT NULL
);

CREATE TABLE plans (
    name TEXT PRIMARY KEY NOT NULL,
    body TEXT NOT NULL
);

CREATE TABLE jobs (
    id         TEXT PRIMARY KEY NOT NULL,
    kind       TEXT NOT NULL,
    machines   TEXT NOT NULL,
    plan       TEXT NOT NULL,
    spec       TEXT NOT NULL,
    data       TEXT NOT NULL,
    state      TEXT NOT NULL,
    progress   INTEGER NOT NULL,
    status     TEXT NOT NULL,
    error      TEXT NOT NULL,
    warnings   TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms   INTEGER NOT NULL,
    ord        INTEGER NOT NULL
);
CREATE INDEX jobs_state ON jobs(state);

CREATE TABLE job_steps (
    job        TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx        INTEGER NOT NULL,
    name       TEXT NOT NULL,
    action     TEXT NOT NULL,
    state      TEXT NOT NULL,
    detail     TEXT NOT NULL,
    error      TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms   INTEGER NOT NULL,
    PRIMARY KEY (job, idx)
);

CREATE TABLE point_summaries (
    replication TEXT PRIMARY KEY NOT NULL,
    body        TEXT NOT NULL
);

CREATE TABLE events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms     INTEGER NOT NULL,
    component   TEXT NOT NULL,
    severity    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    message     TEXT NOT NULL,
    replication TEXT NOT NULL
);
