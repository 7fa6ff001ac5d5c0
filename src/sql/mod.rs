//! SQL text helpers: every identifier and literal walshift puts into SQL goes through here;
//! the one SQL lexer ([`lexer`]) for what walshift reads out of SQL; and
//! [`create_own_objects`], the one way walshift creates its own tables on a database.

pub mod lexer;

use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

/// Quotes an identifier: `my "table"` → `"my ""table"""`.
pub fn quote_ident(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 2);
    s.push('"');
    for c in name.chars() {
        if c == '"' {
            s.push('"');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// Quotes a schema-qualified name: `("public", "t")` → `"public"."t"`.
pub fn quote_qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// Quotes a string literal: `it's` → `'it''s'`. Standard-conforming strings are assumed
/// (the default since PostgreSQL 9.1).
pub fn quote_literal(value: &str) -> String {
    let mut s = String::with_capacity(value.len() + 2);
    s.push('\'');
    for c in value.chars() {
        if c == '\'' {
            s.push('\'');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

/// Transaction-level advisory lock key every [`create_own_objects`] call takes
/// (`pg_advisory_xact_lock(8607350183625583969)`; the bytes spell `wsschema`).
pub const OWN_OBJECTS_LOCK_KEY: i64 = 0x7773_7363_6865_6d61;

/// Creates walshift's own objects on a database: `ddl` is `CREATE … IF NOT EXISTS`
/// statements (the `walshift` schema and its tables), run so that concurrent creators never
/// fail each other.
///
/// `IF NOT EXISTS` alone does not make that true: two sessions that both find a table missing
/// both create it, and the second to commit fails on a catalog unique index (`23505` on
/// `pg_type_typname_nsp_index`, or `42P07` / `42P06`). A killed walshift's server session can
/// still be running its `CREATE` after the process is gone (the server notices the lost client
/// only when it next talks to it), so the rerun meets it. Hence:
/// - every call takes [`OWN_OBJECTS_LOCK_KEY`] as a transaction-level advisory lock in the same
///   implicit transaction as the DDL, so walshift's creators run one after the other and each
///   sees what the previous one committed;
/// - a creator that does not take the lock (another tool, a person) can still win the race:
///   a duplicate-object error (or a deadlock) is retried after a pause, by when the other
///   creation has committed (`IF NOT EXISTS` then sees it) or rolled back (ours creates).
///
/// Waits as long as a concurrent creator's transaction is open (like any DDL). Must not run
/// inside an explicit transaction (the lock would outlive the DDL, and a retry cannot run in
/// an aborted transaction); `ddl` must not contain `BEGIN` / `COMMIT`.
pub async fn create_own_objects(client: &Client, ddl: &str) -> Result<(), tokio_postgres::Error> {
    const ATTEMPTS: usize = 20;
    let batch = format!("SELECT pg_advisory_xact_lock({OWN_OBJECTS_LOCK_KEY}); {ddl}");
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client.batch_execute(&batch).await {
            Ok(()) => return Ok(()),
            Err(e)
                if attempt < ATTEMPTS
                    && matches!(
                        e.code(),
                        Some(
                            &SqlState::UNIQUE_VIOLATION
                                | &SqlState::DUPLICATE_TABLE
                                | &SqlState::DUPLICATE_SCHEMA
                                | &SqlState::DUPLICATE_OBJECT
                                | &SqlState::T_R_DEADLOCK_DETECTED
                        )
                    ) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("t"), "\"t\"");
        assert_eq!(quote_ident("my \"t\""), "\"my \"\"t\"\"\"");
        assert_eq!(quote_qualified("public", "Order"), "\"public\".\"Order\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
