//! The I/O half of compiling a mapping: table shapes from the target (and source) catalogs, and
//! PostgreSQL's own check of every expression and generated statement (`PREPARE` on the target,
//! which type-checks without executing anything).

use std::collections::HashMap;

use tokio_postgres::Client;

use super::mapping::{Mapping, TableName};
use super::plan::{self, SourceColumn, SourcePlan, SourceTable, TargetColumnInfo, TargetTableInfo};
use super::{TransformError, sql as tsql};
use crate::error::SqlContext;
use crate::source::pgoutput::{Relation, ReplicaIdentity, TypeInfo};
use crate::sql::{quote_ident, quote_qualified};

/// A table's shape in the target catalog, or `None` if there is no such table. Its key is the
/// primary key's key columns (not INCLUDE columns), else those of its replica identity index.
pub async fn target_table(
    client: &Client,
    name: &TableName,
) -> Result<Option<TargetTableInfo>, TransformError> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                    a.atthasdef OR a.attidentity <> '', a.attgenerated <> '', \
                    coalesce((SELECT k.n FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(a, n) \
                              WHERE k.a = a.attnum AND k.n <= i.indnkeyatts), 0)::int4, \
                    a.attidentity = 'a' \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             LEFT JOIN LATERAL (SELECT x.indkey, x.indnkeyatts FROM pg_index x \
                                WHERE x.indrelid = c.oid AND (x.indisprimary OR (x.indisreplident \
                                  AND x.indisunique AND x.indisvalid AND x.indimmediate \
                                  AND x.indpred IS NULL AND x.indexprs IS NULL)) \
                                ORDER BY x.indisprimary DESC LIMIT 1) i ON true \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') \
             ORDER BY a.attnum",
            &[&name.schema, &name.name],
        )
        .await
        .with_sql_context(|| format!("reading the shape of {name} on the target"))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut pk: Vec<(i32, String)> = Vec::new();
    let columns = rows
        .iter()
        .map(|r| {
            let name: String = r.get(0);
            let pk_pos: i32 = r.get(5);
            if pk_pos > 0 {
                pk.push((pk_pos, name.clone()));
            }
            TargetColumnInfo {
                name,
                type_sql: r.get(1),
                not_null: r.get(2),
                has_default: r.get(3),
                generated: r.get(4),
                always_identity: r.get(6),
                primary_key: pk_pos > 0,
            }
        })
        .collect();
    pk.sort();
    Ok(Some(TargetTableInfo {
        name: name.clone(),
        columns,
        primary_key: pk.into_iter().map(|(_, n)| n).collect(),
    }))
}

/// A table's shape in the *source* catalog (for `transform check --source`): the columns
/// pgoutput sends (generated ones are not) and its replica identity.
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
        .with_sql_context(|| format!("reading the shape of {name} on the source"))?;
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

/// OIDs below this are built into every PostgreSQL: the target names them the same.
const FIRST_NORMAL_OID: u32 = 16384;

/// A source table's shape from its Relation message. Column types: built-in types are named by
/// the target's catalog; others by the Type message pgoutput sent for them (`types`); a type
/// neither knows travels as `text` (expressions can cast it).
pub async fn source_from_relation(
    target: &Client,
    rel: &Relation,
    types: &HashMap<u32, TypeInfo>,
) -> Result<SourceTable, TransformError> {
    let builtin: Vec<i64> = rel
        .columns
        .iter()
        .filter(|c| c.type_oid < FIRST_NORMAL_OID)
        .map(|c| i64::from(c.type_oid))
        .collect();
    let mut names: HashMap<u32, String> = HashMap::new();
    if !builtin.is_empty() {
        for r in target
            .query(
                "SELECT o, format_type(o::oid, NULL) FROM unnest($1::int8[]) AS o",
                &[&builtin],
            )
            .await
            .sql_context("naming the source's column types on the target")?
        {
            let o: i64 = r.get(0);
            let n: Option<String> = r.get(1);
            if let Some(n) = n {
                names.insert(o as u32, n);
            }
        }
    }
    let schema = if rel.namespace.is_empty() {
        "pg_catalog"
    } else {
        rel.namespace.as_str()
    };
    Ok(SourceTable {
        name: TableName::new(schema, rel.name.clone()),
        columns: rel
            .columns
            .iter()
            .map(|c| SourceColumn {
                name: c.name.clone(),
                type_sql: names
                    .get(&c.type_oid)
                    .cloned()
                    .or_else(|| {
                        types.get(&c.type_oid).map(|t| {
                            let ns = if t.namespace.is_empty() {
                                "pg_catalog"
                            } else {
                                &t.namespace
                            };
                            quote_qualified(ns, &t.name)
                        })
                    })
                    .unwrap_or_else(|| "text".into()),
                key: c.is_key() || rel.replica_identity == ReplicaIdentity::Full,
            })
            .collect(),
    })
}

/// Compiles the mapping for one source table against the target catalog, then has PostgreSQL
/// type-check every expression and statement. Nothing is executed.
pub async fn compile(
    client: &Client,
    mapping: &Mapping,
    source: &SourceTable,
) -> Result<SourcePlan, TransformError> {
    let mut targets = HashMap::new();
    for name in mapping.targets_of(&source.name) {
        if let Some(t) = target_table(client, &name).await? {
            targets.insert(name, t);
        }
    }
    let plan = match plan::compile_source(mapping, source, &|n| targets.get(n).cloned()) {
        Ok(plan) => plan,
        // A misspelt column makes the column it meant look unused ("goes nowhere"): name the
        // misspelling instead, when PostgreSQL finds one.
        Err(e) => return Err(unknown_column(client, mapping, source).await.unwrap_or(e)),
    };
    check_plan(client, mapping, &plan).await?;
    Ok(plan)
}

/// The first expression or filter of `source`'s entries that reads a column the source table
/// does not have, as PostgreSQL sees it (`PREPARE` on the target over the source's columns:
/// with their types, and again as `text` when the target lacks one of those types).
async fn unknown_column(
    client: &Client,
    mapping: &Mapping,
    source: &SourceTable,
) -> Option<TransformError> {
    let scope = |typed: bool| {
        let cols: Vec<String> = source
            .columns
            .iter()
            .map(|c| {
                let ty = if typed { c.type_sql.as_str() } else { "text" };
                format!("NULL::{ty} AS {}", quote_ident(&c.name))
            })
            .collect();
        format!("(SELECT {}) AS s", cols.join(", "))
    };
    let (typed, untyped) = (scope(true), scope(false));
    for e in mapping.for_source(&source.name) {
        let exprs = e
            .columns
            .iter()
            .map(|(n, x)| {
                (
                    format!("the expression for {}.{}", e.target.value, n.value),
                    x,
                )
            })
            .chain(
                e.filter
                    .iter()
                    .map(|f| (format!("the filter of {}", e.target.value), f)),
            );
        for (what, x) in exprs {
            for from in [&typed, &untyped] {
                let Err(err) = client
                    .prepare(&format!("SELECT ({}) FROM {from}", x.value))
                    .await
                else {
                    break;
                };
                match err.code() {
                    Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) => {
                        return Some(TransformError::Mapping {
                            path: mapping.path.clone(),
                            line: x.line,
                            message: format!(
                                "{what} ({}) reads a column the source table {} does not have: {}. \
                                 Its columns: {}",
                                x.value,
                                source.name,
                                db_message(&err),
                                source
                                    .columns
                                    .iter()
                                    .map(|c| c.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        });
                    }
                    Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => continue,
                    _ => break,
                }
            }
        }
    }
    None
}

/// `(SELECT NULL::type AS "col", …) AS s` over some source columns.
fn null_rows(plan: &SourcePlan, cols: impl Iterator<Item = usize>) -> String {
    let cols: Vec<String> = cols
        .map(|i| {
            let c = &plan.source.columns[i];
            format!("NULL::{} AS {}", c.type_sql, quote_ident(&c.name))
        })
        .collect();
    format!("(SELECT {}) AS s", cols.join(", "))
}

/// PostgreSQL's verdict on every expression of the plan, then on the generated statements.
pub async fn check_plan(
    client: &Client,
    mapping: &Mapping,
    plan: &SourcePlan,
) -> Result<(), TransformError> {
    let all = null_rows(plan, 0..plan.source.columns.len());
    let keys = null_rows(plan, plan.key.iter().copied());
    let located =
        |line: Option<usize>, t: &plan::TargetPlan, message: String| TransformError::Mapping {
            path: mapping.path.clone(),
            line: line.unwrap_or(t.line),
            message,
        };
    for t in &plan.targets {
        for (i, c) in t.columns.iter().enumerate() {
            let scope = if t.key.contains(&i) { &keys } else { &all };
            let q = format!("SELECT ({})::{} FROM {scope}", c.expr.sql, c.type_sql);
            if let Err(e) = client.prepare(&q).await {
                let what = if c.expr.line.is_some() {
                    format!(
                        "the expression for {}.{} ({})",
                        t.target, c.name, c.expr.sql
                    )
                } else {
                    format!(
                        "source column {}.{} copied into {}.{} ({} to {})",
                        plan.source.name,
                        c.name,
                        t.target,
                        c.name,
                        c.expr
                            .passthrough
                            .map(|s| plan.source.columns[s].type_sql.as_str())
                            .unwrap_or("?"),
                        c.type_sql
                    )
                };
                let hint = if t.key.contains(&i) {
                    " A key column's expression may read only the source's key columns."
                } else {
                    " Expressions see the source row's columns by name and the target's functions and types."
                };
                return Err(located(
                    c.expr.line,
                    t,
                    format!(
                        "{what} does not work on the target: {}.{hint}",
                        db_message(&e)
                    ),
                ));
            }
        }
        if let Some(f) = &t.filter {
            let q = format!("SELECT 1 FROM {all} WHERE ({})", f.sql);
            if let Err(e) = client.prepare(&q).await {
                return Err(located(
                    f.line,
                    t,
                    format!(
                        "the filter of {} ({}) does not work on the target: {}. It must be a boolean \
                         SQL predicate over the source row's columns",
                        t.target,
                        f.sql,
                        db_message(&e)
                    ),
                ));
            }
        }
        let every: Vec<usize> = (0..plan.source.columns.len()).collect();
        let shape = tsql::update_shape(plan, t, &every, true).map_err(|m| {
            located(
                None,
                t,
                format!("{} needs {} ", m.target_column, m.source_column),
            )
        })?;
        for q in [
            tsql::delete(plan, t),
            tsql::upsert(plan, t),
            tsql::insert(plan, t),
            tsql::update(plan, t, &every, &shape, true),
        ] {
            if let Err(e) = client.prepare(&q).await {
                return Err(located(
                    None,
                    t,
                    format!(
                        "the statements writing {} do not work on the target: {}. Statement: {q}",
                        t.target,
                        db_message(&e)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The server's message (and hint) without the client library's wrapping.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.hint() {
            Some(h) => format!("{} (hint: {h})", db.message()),
            None => db.message().to_owned(),
        },
        None => e.to_string(),
    }
}
