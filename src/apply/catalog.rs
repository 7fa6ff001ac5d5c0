//! The target's table shapes, matched against the source's Relation messages: which target
//! table and columns a source relation's rows land in, and which of its unique indexes serves
//! as the key the fold and the statements use. Schema drift is an error here, before anything
//! is written.

use tokio_postgres::Client;

use super::sql::{TableSql, TargetColumn};
use crate::source::pgoutput::Relation;
use crate::sql::quote_qualified;
use crate::{SqlContext, SqlError};

/// The target's tables do not fit the source's relations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    #[error(
        "table {table} is in the source's changes but not on the target. If it was created on the \
         source after the clone (FOR ALL TABLES publishes new tables at once), create it on the copy \
         with the same definition (pg_dump --schema-only --table='{table}' <source> | psql <target>) \
         and run replay again: its rows arrive through the stream (if it was added to the \
         publication with rows already in it, copy those rows too). Or stop publishing it"
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
        "table {table} on the target has no primary key or unique index on exactly the source's key \
         columns ({key:?}), and the source sends no full old rows for it; add a primary key (or a \
         unique, non-partial index) on those columns on the target"
    )]
    NoKey { table: String, key: Vec<String> },

    #[error(transparent)]
    Sql(#[from] SqlError),
}

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

/// A unique index of a target table that can serve as its key.
struct KeyIndex {
    primary: bool,
    /// Key columns (not INCLUDE columns), in index order.
    columns: Vec<String>,
    not_null: bool,
}

/// Whether a column of type `a.atttypid` can be compared with `=`: its type (or, for an array,
/// its element type; domains by their base type) has a default btree operator class, or is an
/// enum or a range. Otherwise (`json`, `point`, `xml`, composites, …) it is compared by text.
const HAS_EQUALITY: &str = "EXISTS (SELECT 1 FROM pg_type t \
       JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
       JOIN pg_type et ON et.oid = CASE WHEN bt.typcategory = 'A' AND bt.typelem <> 0 THEN bt.typelem ELSE bt.oid END \
       JOIN pg_type x ON x.oid = CASE WHEN et.typtype = 'd' THEN et.typbasetype ELSE et.oid END \
       WHERE t.oid = a.atttypid AND (x.typtype IN ('e', 'r', 'm') OR EXISTS ( \
         SELECT 1 FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod \
         WHERE am.amname = 'btree' AND oc.opcdefault AND oc.opcintype = x.oid)))";

/// Looks a source relation up on the target and checks the columns match (schema drift is an
/// error before anything is written). Column order follows the source's tuples.
///
/// The target key: for a source sending a key (primary key or `REPLICA IDENTITY USING
/// INDEX`), a unique, valid, immediate, non-partial, non-expression index of the target whose
/// key columns (INCLUDE columns are not part of it) are exactly the source's key columns, the
/// primary key preferred. For `REPLICA IDENTITY FULL`, the target's primary key, else such a
/// unique index on NOT NULL columns, else none (rows are matched by their whole old image).
pub async fn map_relation(client: &Client, rel: &Relation) -> Result<MappedTable, CatalogError> {
    let schema = if rel.namespace.is_empty() {
        "pg_catalog"
    } else {
        rel.namespace.as_str()
    };
    let name = quote_qualified(schema, &rel.name);
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &rel.name],
        )
        .await
        .with_sql_context(|| format!("looking up {name} on the target"))?;
    if exists.is_none() {
        return Err(CatalogError::MissingTable { table: name });
    }
    let rows = client
        .query(
            &format!(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                        a.attidentity = 'a', {HAS_EQUALITY} \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') \
                 ORDER BY a.attnum"
            ),
            &[&schema, &rel.name],
        )
        .await
        .with_sql_context(|| format!("reading the shape of {name} on the target"))?;
    let target: Vec<(String, String, bool, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let mut columns = Vec::with_capacity(rel.columns.len());
    for c in &rel.columns {
        let Some((_, ty, always, eq)) = target.iter().find(|t| t.0 == c.name) else {
            return Err(CatalogError::MissingColumn {
                table: name,
                column: c.name.clone(),
                target: target.iter().map(|t| t.0.clone()).collect(),
            });
        };
        columns.push(TargetColumn {
            name: c.name.clone(),
            type_sql: ty.clone(),
            always_identity: *always,
            compare_as_text: !*eq,
        });
    }
    let indexes: Vec<KeyIndex> = client
        .query(
            "SELECT i.indisprimary, \
                    array(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n) \
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                          WHERE k.n <= i.indnkeyatts ORDER BY k.n), \
                    NOT EXISTS (SELECT 1 FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n) \
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                          WHERE k.n <= i.indnkeyatts AND NOT a.attnotnull) \
             FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique AND i.indisvalid \
               AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL \
             ORDER BY i.indisprimary DESC, i.indisreplident DESC, i.indexrelid",
            &[&schema, &rel.name],
        )
        .await
        .with_sql_context(|| format!("reading the unique indexes of {name} on the target"))?
        .iter()
        .map(|r| KeyIndex {
            primary: r.get(0),
            columns: r.get(1),
            not_null: r.get(2),
        })
        .collect();
    let source_key: Vec<&str> = rel
        .columns
        .iter()
        .filter(|c| c.is_key())
        .map(|c| c.name.as_str())
        .collect();
    let full_identity = rel.replica_identity == crate::source::pgoutput::ReplicaIdentity::Full;
    let position = |col: &String| rel.columns.iter().position(|c| c.name == *col);
    let chosen = indexes.iter().find(|ix| {
        let sent = ix.columns.iter().all(|c| position(c).is_some());
        if full_identity {
            sent && (ix.primary || ix.not_null)
        } else {
            sent && ix.columns.len() == source_key.len()
                && ix.columns.iter().all(|c| source_key.contains(&c.as_str()))
        }
    });
    let Some(index) = chosen else {
        if full_identity {
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
        return Err(CatalogError::NoKey {
            table: name,
            key: source_key.iter().map(|s| s.to_string()).collect(),
        });
    };
    let mut key: Vec<usize> = index.columns.iter().filter_map(position).collect();
    key.sort_unstable();
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
