-- The configuration server's schema on PostgreSQL (DESIGN.md §8 "State"):
-- the same tables and columns as the SQLite schema in migrations/ (after
-- all of its files), so one row decoder reads both. Timestamps are
-- milliseconds since the Unix epoch; u64 values and flags are BIGINT (u64
-- by its bit pattern, flags 0 or 1); lists, policies and points are JSON
-- text; `ord` and `seq` columns are identities, so rows written by two CS
-- processes still get distinct, increasing numbers.
--
-- Names and ids are `COLLATE "C"`: they compare and sort by bytes, as in
-- SQLite, so every list comes out in the same order on both engines
-- whatever the database's collation (en_US.UTF-8 would ignore case and
-- punctuation).

CREATE TABLE settings (
    key   TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    value BYTEA NOT NULL
);

CREATE TABLE sites (
    name       TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE components (
    role              TEXT COLLATE "C" NOT NULL,
    id                TEXT COLLATE "C" NOT NULL,
    site              TEXT COLLATE "C" NOT NULL DEFAULT '',
    version           TEXT NOT NULL DEFAULT '',
    addresses         TEXT NOT NULL DEFAULT '[]',
    cert_serial       TEXT NOT NULL DEFAULT '',
    cert_fingerprint  TEXT NOT NULL DEFAULT '',
    enrolled_ms       BIGINT NOT NULL DEFAULT 0,
    last_heartbeat_ms BIGINT NOT NULL DEFAULT 0,
    health            TEXT NOT NULL DEFAULT 'enrolled',
    status            BYTEA NOT NULL DEFAULT '\x'::bytea,
    status_ms         BIGINT NOT NULL DEFAULT 0,
    revoked           BIGINT NOT NULL DEFAULT 0,
    cert_expiry_ms    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (role, id)
);

CREATE TABLE machines (
    id         TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    site       TEXT COLLATE "C" NOT NULL,
    policy     TEXT NOT NULL,
    grp        TEXT COLLATE "C" NOT NULL DEFAULT '',
    created_ms BIGINT NOT NULL
);

CREATE TABLE disks (
    machine TEXT COLLATE "C" NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    idx     BIGINT NOT NULL,
    name    TEXT COLLATE "C" NOT NULL,
    size    BIGINT NOT NULL,
    path    TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (machine, idx)
);

CREATE TABLE replications (
    id             TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    machine        TEXT COLLATE "C" NOT NULL REFERENCES machines(id),
    from_site      TEXT COLLATE "C" NOT NULL,
    to_site        TEXT COLLATE "C" NOT NULL,
    ps             TEXT COLLATE "C" NOT NULL,
    mt             TEXT COLLATE "C" NOT NULL,
    policy         TEXT NOT NULL,
    state          TEXT NOT NULL,
    previous       TEXT NOT NULL DEFAULT '',
    failover_point TEXT,
    created_ms     BIGINT NOT NULL,
    updated_ms     BIGINT NOT NULL,
    -- insertion order breaks ties between replications created in one ms
    ord            BIGINT GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX replications_machine ON replications(machine, ord);

CREATE TABLE consistency_groups (
    name          TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    machines      TEXT NOT NULL,
    hold_ms       BIGINT NOT NULL,
    interval_secs BIGINT NOT NULL,
    app           BIGINT NOT NULL
);

CREATE TABLE plans (
    name TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    body TEXT NOT NULL
);

CREATE TABLE jobs (
    id         TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    kind       TEXT COLLATE "C" NOT NULL,
    machines   TEXT NOT NULL,
    plan       TEXT NOT NULL,
    spec       TEXT NOT NULL,
    data       TEXT NOT NULL,
    state      TEXT NOT NULL,
    progress   BIGINT NOT NULL,
    status     TEXT NOT NULL,
    error      TEXT NOT NULL,
    warnings   TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    started_ms BIGINT NOT NULL,
    ended_ms   BIGINT NOT NULL,
    ord        BIGINT GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX jobs_state ON jobs(state);
CREATE INDEX jobs_ord ON jobs(ord);

CREATE TABLE job_steps (
    job        TEXT COLLATE "C" NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx        BIGINT NOT NULL,
    name       TEXT NOT NULL,
    action     TEXT NOT NULL,
    state      TEXT NOT NULL,
    detail     TEXT NOT NULL,
    error      TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    ended_ms   BIGINT NOT NULL,
    PRIMARY KEY (job, idx)
);

CREATE TABLE point_summaries (
    replication TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    body        TEXT NOT NULL
);

CREATE TABLE events (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time_ms     BIGINT NOT NULL,
    component   TEXT COLLATE "C" NOT NULL,
    severity    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    message     TEXT NOT NULL,
    replication TEXT COLLATE "C" NOT NULL
);

-- The trust model's records (DESIGN.md §3): every certificate the CS
-- issued, and the one-time enrollment tokens as verifiers (blake3 of the
-- secret), never the secret itself.
CREATE TABLE issued_certs (
    serial     TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    role       TEXT COLLATE "C" NOT NULL,
    id         TEXT COLLATE "C" NOT NULL,
    issued_ms  BIGINT NOT NULL,
    expiry_ms  BIGINT NOT NULL,
    revoked_ms BIGINT,
    -- insertion order breaks ties between certificates issued in one ms
    ord        BIGINT GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX issued_certs_identity ON issued_certs (role, id, issued_ms);

CREATE TABLE tokens (
    token_id   TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    role       TEXT COLLATE "C" NOT NULL,
    id         TEXT COLLATE "C" NOT NULL,
    verifier   BYTEA NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    used_ms    BIGINT
);
