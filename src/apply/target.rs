//! The target database as replay sees it: table shapes from its catalog, matched against the
//! source's Relation messages, and the progress row that makes apply exactly-once.
//!
//! **Exactly-once contract:** `walshift.applied` holds, per buffer (source system + slot), the
//! end LSN of the last source transaction applied. It is updated in the same target
//! transaction as the data it covers, so after any crash the target's data and its recorded
//! position agree, and replay resumes right after that transaction.

use tokio_postgres::Client;

use super::sql::{TableSql, TargetColumn};
use crate::lsn::Lsn;
use crate::source::pgoutput::Relation;
use crate::sql::{quote_ident, quote_qualified};

/// Target-side failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error(
        "table {table} is in the source's changes but not on the target; create it on the target \
         (clone copies it) or stop publishing it"
    )]
    MissingTable { table: String },

    #[error(
        "schema drift on {table}: source column {column:?} does not exist on the target (target columns: {target:?}). \
         Add the column on the target, or map it with a transform"
    )]
    MissingColumn {
        table: String,
        column: String,
        target: Vec<String>,
    },

    #[error(
        "table {table} on the target has no primary key and the source sends no full old rows for it; \
         add a primary key on the target matching the source's key ({key:?})"
    )]
    NoKey { table: String, key: Vec<String> },

    #[error("{context}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

fn sql(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> TargetError {
    let context = context.into();
    move |source| TargetError::Sql { context, source }
}

/// Creates `walshift.applied` if needed.
pub async fn ensure_progress_table(client: &Client) -> Result<(), TargetError> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS walshift;
             CREATE TABLE IF NOT EXISTS walshift.applied (
               buffer_id  text PRIMARY KEY,
               end_lsn    pg_lsn NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await
        .map_err(sql("creating walshift.applied on the target"))
}

/// The end LSN of the last transaction applied from `buffer_id`, if any.
pub async fn applied_lsn(client: &Client, buffer_id: &str) -> Result<Option<Lsn>, TargetError> {
    let row = client
        .query_opt(
            "SELECT end_lsn::text FROM walshift.applied WHERE buffer_id = $1",
            &[&buffer_id],
        )
        .await
        .map_err(sql("reading walshift.applied"))?;
    Ok(row.map(|r| r.get::<_, String>(0).parse().unwrap_or(Lsn::ZERO)))
}

/// The statement recording progress; run inside the batch's transaction. Parameters:
/// buffer id, end LSN as text.
pub const RECORD_PROGRESS: &str = "INSERT INTO walshift.applied (buffer_id, end_lsn, applied_at) \
     VALUES ($1, $2::text::pg_lsn, now()) \
     ON CONFLICT (buffer_id) DO UPDATE SET end_lsn = EXCLUDED.end_lsn, applied_at = EXCLUDED.applied_at";

/// How a source relation lands on the target (identity mapping: same schema, table and column
/// names).
#[derive(Clone, Debug)]
pub struct MappedTable {
    pub sql: TableSql,
    /// Display name.
    pub name: String,
    /// No key on either side: rows are matched by their whole old image (REPLICA IDENTITY FULL).
    pub full_row_identity: bool,
}

/// Looks a source relation up on the target and checks the columns match (schema drift is an
/// error before anything is written). Column order follows the source's tuples.
pub async fn map_relation(client: &Client, rel: &Relation) -> Result<MappedTable, TargetError> {
    let schema = if rel.namespace.is_empty() {
        "pg_catalog"
    } else {
        rel.namespace.as_str()
    };
    let name = quote_qualified(schema, &rel.name);
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                    coalesce(a.attnum = ANY(i.indkey), false) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') \
             ORDER BY a.attnum",
            &[&schema, &rel.name],
        )
        .await
        .map_err(sql(format!("reading the shape of {name} on the target")))?;
    if rows.is_empty() {
        return Err(TargetError::MissingTable { table: name });
    }
    let target: Vec<(String, String, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut columns = Vec::with_capacity(rel.columns.len());
    let mut key = Vec::new();
    for (i, c) in rel.columns.iter().enumerate() {
        let Some((_, ty, is_pk)) = target.iter().find(|(n, _, _)| *n == c.name) else {
            return Err(TargetError::MissingColumn {
                table: name,
                column: c.name.clone(),
                target: target.iter().map(|t| t.0.clone()).collect(),
            });
        };
        if *is_pk {
            key.push(i);
        }
        columns.push(TargetColumn {
            name: c.name.clone(),
            type_sql: ty.clone(),
        });
    }
    let target_pk = target.iter().filter(|t| t.2).count();
    let full_identity = rel.replica_identity == crate::source::pgoutput::ReplicaIdentity::Full;
    if key.is_empty() || key.len() != target_pk {
        if full_identity && target_pk == 0 {
            return Ok(MappedTable {
                sql: TableSql {
                    qualified: name.clone(),
                    columns,
                    key: Vec::new(),
                },
                name,
                full_row_identity: true,
            });
        }
        return Err(TargetError::NoKey {
            table: name,
            key: rel
                .columns
                .iter()
                .filter(|c| c.is_key())
                .map(|c| c.name.clone())
                .collect(),
        });
    }
    Ok(MappedTable {
        sql: TableSql {
            qualified: name.clone(),
            columns,
            key,
        },
        name,
        full_row_identity: false,
    })
}

/// `TRUNCATE` of target tables (already quoted).
pub fn truncate_sql(tables: &[String], cascade: bool, restart_identity: bool) -> String {
    format!(
        "TRUNCATE {}{}{}",
        tables.join(", "),
        if restart_identity {
            " RESTART IDENTITY"
        } else {
            ""
        },
        if cascade { " CASCADE" } else { "" }
    )
}

/// Identifier of a buffer in `walshift.applied`: source system and slot.
pub fn buffer_id(system_identifier: u64, slot: &str) -> String {
    format!("{system_identifier}/{}", quote_ident(slot))
}
