-- The trust model's records (DESIGN.md §3): every certificate the CS
-- issued, so a revocation names exact serials and enrollment can tell a
-- machine id that has a live identity; and the one-time enrollment tokens
-- an operator creates, kept as verifiers (blake3 of the secret), never the
-- secret itself.

CREATE TABLE issued_certs (
    serial     TEXT PRIMARY KEY NOT NULL,
    role       TEXT NOT NULL,
    id         TEXT NOT NULL,
    issued_ms  INTEGER NOT NULL,
    expiry_ms  INTEGER NOT NULL,
    revoked_ms INTEGER
);

CREATE INDEX issued_certs_identity ON issued_certs (role, id, issued_ms);

-- Certificates issued before these records existed: the serial the
-- components table kept. Their lifetime is unknown when the component never
-- connected since, so they count as live until an operator revokes them.
INSERT OR IGNORE INTO issued_certs (serial, role, id, issued_ms, expiry_ms, revoked_ms)
    SELECT cert_serial, role, id, enrolled_ms,
           CASE WHEN cert_expiry_ms > 0 THEN cert_expiry_ms ELSE 9223372036854775807 END,
           CASE WHEN revoked != 0 THEN enrolled_ms ELSE NULL END
    FROM components WHERE cert_serial != '';

CREATE TABLE tokens (
    token_id   TEXT PRIMARY KEY NOT NULL,
    role       TEXT NOT NULL,
    id         TEXT NOT NULL,
    verifier   BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_ms    INTEGER
);
