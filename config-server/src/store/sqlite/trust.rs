//! SQLite queries for the trust records (`store::trust`): issued
//! certificates and enrollment tokens. The `Store` impl in `sqlite.rs`
//! calls these.

use super::rows::{self, ms, CERT, TOKEN};
use super::*;

pub(super) fn put_issued_cert<'a>(s: &'a SqliteStore, c: &'a IssuedCert) -> BoxFut<'a, ()> {
    s.run(
        "recording an issued certificate",
        sqlx::query(
            "INSERT INTO issued_certs (serial, role, id, issued_ms, expiry_ms, revoked_ms)
             VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT(serial) DO UPDATE SET role = excluded.role, id = excluded.id,
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
    s: &'a SqliteStore,
    role: Role,
    id: &'a str,
    now_ms: u64,
) -> BoxFut<'a, Vec<String>> {
    let w = "revoking certificates";
    let sql = sqlx::query(
        "UPDATE issued_certs SET revoked_ms = ?
         WHERE role = ? AND id = ? AND revoked_ms IS NULL AND expiry_ms > ?
         RETURNING serial",
    )
    .bind(ms(now_ms))
    .bind(role.as_str())
    .bind(id)
    .bind(ms(now_ms));
    s.all(w, sql, rows::text("serial", w))
}

pub(super) fn revoked_serials(s: &SqliteStore, now_ms: u64) -> BoxFut<'_, Vec<String>> {
    let w = "listing revoked certificates";
    let sql = sqlx::query(
        "SELECT serial FROM issued_certs
         WHERE revoked_ms IS NOT NULL AND expiry_ms > ? ORDER BY serial",
    )
    .bind(ms(now_ms));
    s.all(w, sql, rows::text("serial", w))
}

pub(super) fn latest_cert<'a>(
    s: &'a SqliteStore,
    role: Role,
    id: &'a str,
) -> BoxFut<'a, Option<IssuedCert>> {
    let sql = sqlx::query(
        "SELECT * FROM issued_certs WHERE role = ? AND id = ?
         ORDER BY issued_ms DESC, rowid DESC LIMIT 1",
    )
    .bind(role.as_str())
    .bind(id);
    s.one(CERT, sql, rows::issued_cert)
}

pub(super) fn live_certs<'a>(
    s: &'a SqliteStore,
    role: Role,
    id: &'a str,
    now_ms: u64,
) -> BoxFut<'a, Vec<IssuedCert>> {
    let sql = sqlx::query(
        "SELECT * FROM issued_certs
         WHERE role = ? AND id = ? AND revoked_ms IS NULL AND expiry_ms > ?
         ORDER BY issued_ms DESC, rowid DESC",
    )
    .bind(role.as_str())
    .bind(id)
    .bind(ms(now_ms));
    s.all(CERT, sql, rows::issued_cert)
}

pub(super) fn get_issued_cert<'a>(
    s: &'a SqliteStore,
    serial: &'a str,
) -> BoxFut<'a, Option<IssuedCert>> {
    let sql = sqlx::query("SELECT * FROM issued_certs WHERE serial = ?").bind(serial);
    s.one(CERT, sql, rows::issued_cert)
}

pub(super) fn put_token<'a>(s: &'a SqliteStore, t: &'a Token) -> BoxFut<'a, ()> {
    s.run(
        "recording an enrollment token",
        sqlx::query(
            "INSERT OR REPLACE INTO tokens (token_id, role, id, verifier, created_ms,
               expires_ms, used_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
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

pub(super) fn get_token<'a>(s: &'a SqliteStore, token_id: &'a str) -> BoxFut<'a, Option<Token>> {
    let sql = sqlx::query("SELECT * FROM tokens WHERE token_id = ?").bind(token_id);
    s.one(TOKEN, sql, rows::token)
}

pub(super) fn redeem_token<'a>(
    s: &'a SqliteStore,
    token_id: &'a str,
    now_ms: u64,
) -> BoxFut<'a, Option<Token>> {
    Box::pin(async move {
        // One statement claims it, so two redeemers cannot both get it.
        let claim = sqlx::query(
            "UPDATE tokens SET used_ms = ? WHERE token_id = ? AND used_ms IS NULL RETURNING *",
        )
        .bind(ms(now_ms))
        .bind(token_id);
        if let Some(mut t) = s
            .one("redeeming an enrollment token", claim, rows::token)
            .await?
        {
            t.used_ms = None;
            return Ok(Some(t));
        }
        get_token(s, token_id).await
    })
}
