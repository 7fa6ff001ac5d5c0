//! A source table's shape read from the source catalog, for verify.
//!
//! Same result as `transform::catalog::source_table` (the columns pgoutput sends, in order,
//! with their replica identity flags); kept here because that query currently fails on
//! PostgreSQL 15 (`smallint = smallint[]` from `attnum = ANY((SELECT indkey::int2[] …))`).
//! Replace with the transform's once it is fixed.

use tokio_postgres::Client;

use crate::transform::TransformError;
use crate::transform::mapping::TableName;
use crate::transform::plan::{SourceColumn, SourceTable};

/// The shape of `name` on the source, or `None` if there is no such table.
pub async fn source_table(
    client: &Client,
    name: &TableName,
) -> Result<Option<SourceTable>, TransformError> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, NULL), \
                    CASE c.relreplident \
                      WHEN 'f' THEN true \
                      WHEN 'n' THEN false \
                      WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_index x WHERE x.indrelid = c.oid \
                                    AND x.indisreplident AND a.attnum = ANY(x.indkey::int2[])) \
                      ELSE EXISTS (SELECT 1 FROM pg_index x WHERE x.indrelid = c.oid \
                                    AND x.indisprimary AND a.attnum = ANY(x.indkey::int2[])) END \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                               AND a.attgenerated = '' \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') \
             ORDER BY a.attnum",
            &[&name.schema, &name.name],
        )
        .await
        .map_err(|source| TransformError::Sql {
            context: format!("reading the shape of {name} on the source"),
            source,
        })?;
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(SourceTable {
        name: name.clone(),
        columns: rows
            .iter()
            .map(|r| SourceColumn {
                name: r.get(0),
                type_sql: r.get(1),
                key: r.get(2),
            })
            .collect(),
    }))
}
