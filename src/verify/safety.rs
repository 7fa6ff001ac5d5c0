//! Mapping expressions run on the live source: verify (offline, online, and cutover's)
//! evaluates the mapping's expressions and filters there, once per row. They must not be able
//! to change or disturb it.
//!
//! Two layers:
//! 1. **Volatile functions are refused** before anything is read ([`refuse_volatile`]): every
//!    function an expression or filter names (`f(` or `schema.f(`, found by
//!    [`crate::transform::expr::function_calls`]) is resolved on the source through `pg_proc`
//!    — by its schema when qualified, else among the schemas of the source session's search
//!    path (`current_schemas(true)`, `pg_catalog` included) — and if any function of that name
//!    there is `VOLATILE` (`provolatile = 'v'`: `pg_terminate_backend`, `nextval`, `random`,
//!    `setval`, `dblink_exec`, …), verify refuses, naming the file line, the target column and
//!    the function. Overloads are not told apart: a name with any volatile overload is refused.
//! 2. **The reads are read-only and time-limited**: each side's comparison runs in a `READ
//!    ONLY` transaction (a write through any function fails, and nothing is written), and the
//!    source's statements under `statement_timeout` ([`super::VerifyOptions::source_statement_timeout`];
//!    cutover: what is left of its window).
//!
//! **Limits.** The lexer sees names, not PostgreSQL's parse tree: functions reached through
//! operators, casts, or from inside another function (a `STABLE` function calling a volatile
//! one) are not seen, and a function mislabelled `STABLE` or `IMMUTABLE` passes. Layer 2 still
//! stops such a function from writing; it does not stop effects outside the transaction
//! (signalling backends, `dblink`, advisory locks) of a function that is not named directly.

use tokio_postgres::Client;

use super::VerifyError;
use crate::SqlContext;
use crate::transform::expr::function_calls;
use crate::transform::{Mapping, TableName};

/// One expression evaluated on the source: where it is and what it says.
struct Evaluated {
    line: usize,
    what: String,
    sql: String,
}

/// Refuses the mapping's expressions (when `columns`) and filters of `tables` that name a
/// volatile function on the source. Reads only `pg_proc`; see the module docs for the method
/// and its limits.
pub async fn refuse_volatile(
    source: &Client,
    mapping: &Mapping,
    tables: &[TableName],
    columns: bool,
) -> Result<(), VerifyError> {
    let mut evaluated = Vec::new();
    for t in tables {
        for e in mapping.for_source(t) {
            let target = &e.target.value;
            if columns {
                for (name, expr) in &e.columns {
                    evaluated.push(Evaluated {
                        line: expr.line,
                        what: format!("column {:?} of {target}", name.value),
                        sql: expr.value.clone(),
                    });
                }
            }
            if let Some(f) = &e.filter {
                evaluated.push(Evaluated {
                    line: f.line,
                    what: format!("the filter of {target}"),
                    sql: f.value.clone(),
                });
            }
        }
    }
    let (mut index, mut schemas, mut names) = (Vec::new(), Vec::new(), Vec::new());
    for (i, e) in evaluated.iter().enumerate() {
        for call in function_calls(&e.sql) {
            index.push(i as i32);
            schemas.push(call.schema.unwrap_or_default());
            names.push(call.name);
        }
    }
    if names.is_empty() {
        return Ok(());
    }
    let rows = source
        .query(
            "SELECT c.i, string_agg(DISTINCT format('%I.%I(%s)', n.nspname, p.proname, \
                        pg_get_function_identity_arguments(p.oid)), ', ') \
             FROM unnest($1::int[], $2::text[], $3::text[]) AS c(i, schema, name) \
             JOIN pg_proc p ON p.proname = c.name \
             JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE p.provolatile = 'v' \
               AND CASE WHEN c.schema = '' THEN n.nspname = ANY (current_schemas(true)) \
                        ELSE n.nspname = c.schema END \
             GROUP BY c.i ORDER BY c.i",
            &[&index, &schemas, &names],
        )
        .await
        .sql_context("looking up on the source the functions the mapping's expressions call")?;
    if rows.is_empty() {
        return Ok(());
    }
    let found: Vec<String> = rows
        .iter()
        .map(|r| {
            let e = &evaluated[r.get::<_, i32>(0) as usize];
            format!(
                "{}:{}: {} ({}) calls {}",
                mapping.path,
                e.line,
                e.what,
                e.sql,
                r.get::<_, String>(1)
            )
        })
        .collect();
    Err(VerifyError::VolatileExpression {
        found: found.join("; "),
    })
}
