//! PostgreSQL queries for the trust records (`store::trust`): issued
//! certificates and enrollment tokens. The `Store` impl in `postgres.rs`
//! calls these; rows decode with `store::rows`.

use super::rows::{self, ms, CERT, TOKEN};
use super::*;

pub(super) fn put_issued_cert<'a>(s: &'a PgStore, c: &'a IssuedCert) -> BoxFut<'a, ()> {
    s.run(
        "recording an issued certificate",
        sqlx::query(
            "INSERT INTO issued_certs (serial, role, id, issued_ms, expiry_ms, revoked_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (serial) DO UPDATE SET role = excluded.role, id = excluded.id,
               issued_ms = excluded.issued_ms, expiry_ms = excluded.expiry_ms,
               revoked_ms = COALESCE(issued_certs.revoked_ms, excluded.revoked_ms)",
        )
        .bind(&c.serial)
        .bind(c.role.as_str())
        .bind(&c.id)
        .bind(ms(c.issued_ms))
        .bind(ms(c.expiry_ms))
        .bind(c.revoked_ms.map(ms)),
    )
}

pub(super) fn revoke_certs<'a>(
    s: &'a PgStore,
    role: Role,
    id: &'a str,
    now_ms: u64,
) -> BoxFut<'a, Vec<String>> {
    // One statement: a concurrent revoke of the same identity gets the
    // rows this one did not.
    let w = "revoking certificates";
    let sql = sqlx::query(
        "UPDATE issued_certs SET revoked_ms = $1
         WHERE role = $2 AND id = $3 AND revoked_ms IS NULL AND expiry_ms > $1
         RETURNING serial",
    )
    .bind(ms(now_ms))
    .bind(role.as_str())
    .bind(id);
    s.write_returning(w, sql, rows::text("serial", w))
}

pub(super) fn revoked_serials(s: &PgStore, now_ms: u64) -> BoxFut<'_, Vec<String>> {
    let w = "listing revoked certificates";
    let sql = sqlx::query(
        "SELECT serial FROM issued_certs
         WHERE revoked_ms IS NOT NULL AND expiry_ms > $1 ORDER BY serial",
    )
    .bind(ms(now_ms));
    s.all(w, sql, rows::text("serial", w))
}

pub(super) fn latest_cert<'a>(
    s: &'a PgStore,
    role: Role,
    id: &'a str,
) -> BoxFut<'a, Option<IssuedCert>> {
    let sql = sqlx::query(
        "SELECT * FROM issued_certs WHERE role = $1 AND id = $2
         ORDER BY issued_ms DESC, ord DESC LIMIT 1",
    )
    .bind(role.as_str())
    .bind(id);
    s.one(CERT, sql, rows::issued_cert)
}

pub(super) fn live_certs<'a>(
    s: &'a PgStore,
    role: Role,
    id: &'a str,
    now_ms: u64,
) -> BoxFut<'a, Vec<IssuedCert>> {
    let sql = sqlx::query(
        "SELECT * FROM issued_certs
         WHERE role = $1 AND id = $2 AND revoked_ms IS NULL AND expiry_ms > $3
         ORDER BY issued_ms DESC, ord DESC",
    )
    .bind(role.as_str())
    .bind(id)
    .bind(ms(now_ms));
    s.all(CERT, sql, rows::issued_cert)
}

pub(super) fn get_issued_cert<'a>(
    s: &'a PgStore,
    serial: &'a str,
) -> BoxFut<'a, Option<IssuedCert>> {
    let sql = sqlx::query("SELECT * FROM issued_certs WHERE serial = $1").bind(serial);
    s.one(CERT, sql, rows::issued_cert)
}

pub(super) fn put_token<'a>(s: &'a PgStore, t: &'a Token) -> BoxFut<'a, ()> {
    s.run(
        "recording an enrollment token",
        sqlx::query(
            "INSERT INTO tokens (token_id, role, id, verifier, created_ms, expires_ms, used_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (token_id) DO UPDATE SET role = excluded.role, id = excluded.id,
               verifier = excluded.verifier, created_ms = excluded.created_ms,
               expires_ms = excluded.expires_ms, used_ms = excluded.used_ms",
        )
        .bind(&t.token_id)
        .bind(t.role.as_str())
        .bind(&t.id)
        .bind(&t.verifier)
        .bind(ms(t.created_ms))
        .bind(ms(t.expires_ms))
        .bind(t.used_ms.map(ms)),
    )
}

pub(super) fn get_token<'a>(s: &'a PgStore, token_id: &'a str) -> BoxFut<'a, Option<Token>> {
    let sql = sqlx::query("SELECT * FROM tokens WHERE token_id = $1").bind(token_id);
    s.one(TOKEN, sql, rows::token)
}

pub(super) fn redeem_token<'a>(
    s: &'a PgStore,
    token_id: &'a str,
    now_ms: u64,
) -> BoxFut<'a, Option<Token>> {
    Box::pin(async move {
        // One statement claims it: PostgreSQL re-checks `used_ms IS NULL`
        // on the locked row, so of two redeemers (even on two CS processes)
        // exactly one gets it.
        let claim = sqlx::query(
            "UPDATE tokens SET used_ms = $1 WHERE token_id = $2 AND used_ms IS NULL RETURNING *",
        )
        .bind(ms(now_ms))
        .bind(token_id);
        let claimed = s
            .write_returning("redeeming an enrollment token", claim, rows::token)
            .await?;
        if let Some(mut t) = claimed.into_iter().next() {
            t.used_ms = None;
            return Ok(Some(t));
        }
        get_token(s, token_id).await
    })
}
