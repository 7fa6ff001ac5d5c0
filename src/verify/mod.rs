//! Verify: is the target what the source says it should be, *through the mapping*?
//!
//! Per target table, the row count and an order-independent checksum of the target rows are
//! compared with the same computed on the source from the mapping's expressions, evaluated by
//! the source server (`SELECT (expr)::type … FROM source_table WHERE filter`). When they differ,
//! both sides stream `(key, row hash)` ordered by key through a cursor (bounded memory) and
//! the first differing keys are reported: missing on the target, extra on the target, or
//! different.
//!
//! Contracts:
//! - **Same text on both sides.** A row is the text of its compared columns: on the target
//!   `t."col"::text`; on the source `((expr)::type)::text` where `type` is the target column's
//!   type when the source knows it as a built-in type, otherwise `(expr)::text` (a type created
//!   by the migration does not exist on the source). Only the plan's columns (target columns
//!   that receive an expression) are compared; columns left to their defaults are not.
//! - **Checksum** = `sum` over rows of the first 64 bits of `md5(row text)`, as `numeric`, with
//!   the row count. Order-independent, exact (no overflow), the same on any server version.
//! - **The live source is only read.** Expressions and filters that name a volatile function
//!   are refused before anything is read; the source's reads run `READ ONLY` under a
//!   `statement_timeout` (module `safety`: the method and its limits).
//! - **Consistency.** Each side runs in one `REPEATABLE READ READ ONLY` transaction for all
//!   tables, so every table is compared at one snapshot per side. The two snapshots are only
//!   comparable when nothing is being applied: run verify once replay has caught up, or (as
//!   cutover does) after the source is fenced and replay has drained.
//! - **Session settings.** Both transactions use the target's `TimeZone`, `DateStyle`,
//!   `IntervalStyle` and `extra_float_digits` (what replay's sessions evaluate expressions
//!   with) and `bytea_output = hex`, set with `SET LOCAL`: the callers' sessions are unchanged
//!   afterwards.
//! - **Tables without a key.** A table the mapping does not name whose target has no primary
//!   key (a source table with `REPLICA IDENTITY FULL` and no key, which replay copies onto
//!   itself) is compared as a multiset of whole rows: its same-named columns, and differing
//!   rows named by their whole text.
//!
//! - **Online** ([`verify_online`], module `online`): the same comparison chunk by chunk, each
//!   chunk at one source position while capture and replay keep running.
//! - **Not checked.** Every report lists what verify did not compare ([`VerifyReport::not_checked`]).
//!
//! [`verify`] is the library entry point (cutover calls it with a mapping); `walshift verify` is
//! its command. [`table_summary`] is the same count and checksum for one table without a
//! mapping (cutover's window without one). There is no other checksum in walshift.

mod online;
mod safety;

pub use online::{
    DEFAULT_CHUNK_ROWS, DEFAULT_HOLD_TTL_SECS, DEFAULT_STALL_SECS, OnlineOptions, OnlineSummary,
    POINT_MESSAGE_PREFIX, verify_online,
};
pub use safety::refuse_volatile;

use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use serde::Serialize;
use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::source::preflight::{self, PreflightError};
use crate::sql::{quote_ident, quote_literal};
use crate::transform::mapping::{Mapping, TableName};
use crate::transform::plan::{
    PlanColumn, PlanExpr, SourcePlan, SourceTable, TargetPlan, TargetTableInfo,
};
use crate::transform::{TransformError, catalog};
use crate::{SqlContext, SqlError};

/// Differing keys reported per table by default.
pub const DEFAULT_MAX_KEYS: usize = 10;

/// How [`verify`] compares.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Differing keys reported per differing table. Default [`DEFAULT_MAX_KEYS`] (10). `0` skips
    /// the key comparison: counts and checksums only, one pass over each table.
    pub max_keys: usize,
    /// Rows fetched per round trip while comparing keys. Default 5,000: memory stays bounded
    /// by two such batches whatever the table size; larger means fewer round trips.
    pub fetch_rows: usize,
    /// Compare checksums (default `true`). `false` compares row counts only (the source still
    /// applies the mapping's filter): much cheaper, as it evaluates no expression and hashes no
    /// row, for a time-boxed check such as the cutover window.
    pub checksums: bool,
    /// `statement_timeout` of each statement on the source (the source is live: a runaway
    /// expression must not run forever there). Default 1 hour; `None`: no limit. One
    /// statement reads a whole table (offline) or a chunk (online).
    pub source_statement_timeout: Option<std::time::Duration>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            max_keys: DEFAULT_MAX_KEYS,
            fetch_rows: 5_000,
            checksums: true,
            source_statement_timeout: Some(std::time::Duration::from_secs(3600)),
        }
    }
}

impl VerifyOptions {
    /// Whether the mapping's column expressions are evaluated on the source (filters always
    /// are): for checksums, and for the key comparison of a differing table.
    pub fn evaluates_columns(&self) -> bool {
        self.checksums || self.max_keys > 0
    }

    /// `SET LOCAL` of the source's statement timeout (empty without one).
    fn source_limits(&self) -> String {
        match self.source_statement_timeout {
            Some(d) if !d.is_zero() => {
                format!("SET LOCAL statement_timeout = {}; ", d.as_millis().max(1))
            }
            _ => String::new(),
        }
    }
}

/// What [`verify`] found.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// One entry per (source table, target table), in the order of the tables given, a split
    /// source table's targets in mapping order.
    pub tables: Vec<TableReport>,
    pub elapsed_secs: f64,
    /// What this verify did not check, one sentence each (see `not_checked`).
    pub not_checked: Vec<String>,
    /// How the points of an online verify went; `None` offline.
    pub online: Option<OnlineSummary>,
}

impl VerifyReport {
    /// Every table has the same count and checksum on both sides.
    pub fn equal(&self) -> bool {
        self.tables.iter().all(|t| t.equal)
    }

    /// The tables that differ.
    pub fn differing(&self) -> impl Iterator<Item = &TableReport> {
        self.tables.iter().filter(|t| !t.equal)
    }
}

/// One target table compared with what its source table says it should hold.
#[derive(Clone, Debug, Serialize)]
pub struct TableReport {
    #[serde(serialize_with = "display")]
    pub source: TableName,
    #[serde(serialize_with = "display")]
    pub target: TableName,
    /// The compared target columns, in target order.
    pub columns: Vec<String>,
    /// The target's primary key columns (how `differences` name rows). Empty for a table
    /// without a primary key: its differing rows are named by their whole text.
    pub key: Vec<String>,
    /// Source rows passing the mapping's filter.
    pub source_rows: i64,
    pub target_rows: i64,
    /// Sum of the rows' 64-bit hashes, as decimal text (empty when checksums are off).
    pub source_checksum: String,
    pub target_checksum: String,
    pub equal: bool,
    /// The first differing keys in key order (at most [`VerifyOptions::max_keys`]); empty
    /// when equal. Online, in key order within each chunk, chunks in key order.
    pub differences: Vec<KeyDifference>,
    /// Points the table was compared at: 1 offline, one per key range online.
    pub chunks: u64,
}

/// A row that is not the same on both sides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyDifference {
    /// The target key as text: the value for a one-column key, `(a,b)` for a composite one.
    pub key: String,
    pub kind: DifferenceKind,
}

/// How a row differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DifferenceKind {
    /// The source says the row should be on the target; it is not.
    MissingOnTarget,
    /// The target has a row the source does not account for.
    ExtraOnTarget,
    /// Both have the key, with different values.
    Different,
}

impl std::fmt::Display for DifferenceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DifferenceKind::MissingOnTarget => "missing on target",
            DifferenceKind::ExtraOnTarget => "extra on target",
            DifferenceKind::Different => "different",
        })
    }
}

fn display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Why verify could not compare (a difference is not an error: see [`VerifyReport::equal`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The mapping does not compile against the target (or the source table's shape).
    #[error(transparent)]
    Transform(#[from] TransformError),
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(
        "source table {0} does not exist on the source; check the name (schema.table) in --tables \
         or the publication"
    )]
    NoSourceTable(TableName),
    #[error(
        "publication {0:?} does not exist on the source: name the tables with --tables, or the \
         publication capture created with --publication"
    )]
    NoPublication(String),
    #[error(
        "{table} has no primary key on the target, so verify compares it with the same-named source \
         table column by column, but the target has no column {column:?}: add it in the migration, \
         or name the table in the mapping"
    )]
    KeylessColumn { table: TableName, column: String },
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error(
        "verify evaluates the mapping's expressions and filters on the live source, once per row, and these call \
         VOLATILE functions there, which could change or disturb it (terminate sessions, advance sequences) and \
         cannot reproduce the values replay wrote: {found}. Nothing was read. Use stable or immutable functions \
         in them (if a function is in fact stable, ALTER FUNCTION … STABLE on the source), or compare row counts \
         only (cutover --verify counts evaluates the filters only)"
    )]
    VolatileExpression { found: String },
    #[error(transparent)]
    Connect(#[from] crate::Error),
    #[error("online verify: {0}")]
    Online(String),
    #[error(transparent)]
    Hold(#[from] crate::apply::hold::HoldError),
    #[error("online verify: creating the verify point's slot on the source: {0}")]
    Replication(#[from] crate::source::replication::ReplicationError),
    #[error(
        "online verify: replay did not reach the verify point {point} (its applied position {applied} \
         did not move for {secs:.0} s). Is `walshift replay --follow` or `walshift run` running and \
         healthy for this buffer and target? A walshift older than online verify does not honour holds"
    )]
    ReplayStalled { point: Lsn, applied: Lsn, secs: f64 },
    #[error(
        "online verify: capture has made the buffer durable only up to {confirmed} (slot {slot:?}), \
         not past the verify point {point}, and made no progress for {secs:.0} s: start \
         `walshift capture --source … --buffer …` (or `walshift run`) and verify again"
    )]
    CaptureStalled {
        slot: String,
        confirmed: Lsn,
        point: Lsn,
        secs: f64,
    },
    #[error("online verify: the replay it ran itself failed: {0}")]
    ReplayFailed(String),
}

/// The tables of a publication on the source, in name order.
pub async fn published_tables(
    source: &Client,
    publication: &str,
) -> Result<Vec<TableName>, VerifyError> {
    let exists = crate::source::slot::publication_exists(source, publication)
        .await
        .sql_context("looking up the publication on the source")?;
    if !exists {
        return Err(VerifyError::NoPublication(publication.to_owned()));
    }
    Ok(preflight::publication_tables(source, publication)
        .await?
        .into_iter()
        .map(|t| TableName::new(t.schema, t.name))
        .collect())
}

/// The SQL comparing one target table with its source.
#[derive(Clone, Debug)]
struct Check {
    source: TableName,
    target: TableName,
    columns: Vec<String>,
    key: Vec<String>,
    /// `FROM … WHERE …` over the source table, alias `s`.
    source_from: String,
    /// `source_from` has a `WHERE` (the mapping's filter).
    has_filter: bool,
    /// How online verify cuts the table into key ranges (`None`: one chunk).
    chunk: Option<Vec<ChunkKey>>,
    /// Row text and key text over `s`.
    source_row: String,
    source_key: String,
    /// `FROM "schema"."table" AS t`.
    target_from: String,
    target_row: String,
    target_key: String,
}

/// A target key column online verify can range over: a source column passed through unchanged.
#[derive(Clone, Debug)]
struct ChunkKey {
    /// `s."col"`.
    source: String,
    /// `t."col"`.
    target: String,
    type_sql: String,
    /// Collatable: ranges and order use `COLLATE "C"` on both sides.
    collate: bool,
}

impl ChunkKey {
    fn ordered(&self, source: bool) -> String {
        let e = if source { &self.source } else { &self.target };
        if self.collate {
            format!("{e} COLLATE \"C\"")
        } else {
            e.clone()
        }
    }
}

/// `ROW(a, b)::text`: NULL and the empty string stay distinct, separators are quoted.
fn row_text(parts: &[String]) -> String {
    format!("ROW({})::text", parts.join(", "))
}

fn key_text(parts: &[String]) -> String {
    match parts {
        [one] => one.clone(),
        _ => row_text(parts),
    }
}

fn with_preds(from: &str, has_where: bool, preds: &[String]) -> String {
    if preds.is_empty() {
        return from.to_owned();
    }
    let joined = preds
        .iter()
        .map(|p| format!("({p})"))
        .collect::<Vec<_>>()
        .join(" AND ");
    if has_where {
        format!("{from} AND {joined}")
    } else {
        format!("{from} WHERE {joined}")
    }
}

/// The first 64 bits of the row text's md5, as a signed bigint.
fn hash64(row: &str) -> String {
    format!("('x' || left(md5({row}), 16))::bit(64)::bigint")
}

impl Check {
    fn new(plan: &SourcePlan, t: &TargetPlan, builtin: &HashMap<String, bool>) -> Check {
        let source_cols: Vec<String> = plan
            .source
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
        let mut source_from = format!(
            "FROM (SELECT {} FROM {}) AS s",
            source_cols.join(", "),
            plan.source.name.quoted()
        );
        if let Some(f) = &t.filter {
            source_from.push_str(&format!(" WHERE ({})", f.sql));
        }
        let source_parts: Vec<String> = t
            .columns
            .iter()
            .map(|c| {
                if builtin.get(&c.type_sql).copied().unwrap_or(false) {
                    format!("(({})::{})::text", c.expr.sql, c.type_sql)
                } else {
                    format!("({})::text", c.expr.sql)
                }
            })
            .collect();
        let target_parts: Vec<String> = t
            .columns
            .iter()
            .map(|c| format!("t.{}::text", quote_ident(&c.name)))
            .collect();
        // Without a key, a row is named by its whole text: the key pass then compares the two
        // sides as sorted multisets of rows.
        let pick = |parts: &[String]| -> Vec<String> {
            if t.key.is_empty() {
                return parts.to_vec();
            }
            t.key.iter().map(|&k| parts[k].clone()).collect()
        };
        let chunk = (!t.key.is_empty())
            .then(|| {
                t.key
                    .iter()
                    .map(|&k| {
                        let c = &t.columns[k];
                        let i = c.expr.passthrough?;
                        let sc = plan.source.columns.get(i)?;
                        (sc.type_sql == c.type_sql).then(|| ChunkKey {
                            source: format!("s.{}", quote_ident(&sc.name)),
                            target: format!("t.{}", quote_ident(&c.name)),
                            type_sql: c.type_sql.clone(),
                            collate: false,
                        })
                    })
                    .collect::<Option<Vec<_>>>()
            })
            .flatten();
        Check {
            source: plan.source.name.clone(),
            target: t.target.clone(),
            columns: t.columns.iter().map(|c| c.name.clone()).collect(),
            key: t.key.iter().map(|&k| t.columns[k].name.clone()).collect(),
            has_filter: t.filter.is_some(),
            chunk,
            source_from,
            source_row: row_text(&source_parts),
            source_key: key_text(&pick(&source_parts)),
            target_from: format!("FROM {} AS t", t.target.quoted()),
            target_row: row_text(&target_parts),
            target_key: key_text(&pick(&target_parts)),
        }
    }

    /// `source_from` with further conditions.
    fn source_from_with(&self, preds: &[String]) -> String {
        with_preds(&self.source_from, self.has_filter, preds)
    }

    fn target_from_with(&self, preds: &[String]) -> String {
        with_preds(&self.target_from, false, preds)
    }

    fn summary_sql(row: &str, from: &str, checksums: bool) -> String {
        if !checksums {
            return format!("SELECT count(*), ''::text {from}");
        }
        format!(
            "SELECT count(*), coalesce(sum({}), 0)::text FROM (SELECT {row} AS r {from}) AS v",
            hash64("v.r")
        )
    }

    fn keys_sql(key: &str, row: &str, from: &str) -> String {
        format!(
            "SELECT v.k, md5(v.r) FROM (SELECT {key} AS k, {row} AS r {from}) AS v \
             ORDER BY v.k COLLATE \"C\""
        )
    }

    fn what(&self) -> String {
        if self.source == self.target {
            self.source.to_string()
        } else {
            format!("{} → {}", self.source, self.target)
        }
    }
}

/// Compares every target table fed by `tables` (source table names) with what the source and
/// `mapping` say it should hold. Use [`Mapping::identity`] for a release without a mapping.
///
/// Refuses expressions and filters that call a volatile function on the source
/// ([`refuse_volatile`]), compiles the mapping for each source table against the target (an
/// error there is [`VerifyError::Transform`], nothing compared), then runs one `REPEATABLE READ READ ONLY`
/// transaction on each client, ended before returning. The clients must not be inside a
/// transaction. Differences are in the report, not errors: check [`VerifyReport::equal`].
pub async fn verify(
    source: &Client,
    target: &Client,
    mapping: &Mapping,
    tables: &[TableName],
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    refuse_volatile(source, mapping, tables, opts.evaluates_columns()).await?;
    let checks = build_checks(source, target, mapping, tables).await?;

    let settings = session_settings(target).await?;
    begin(
        source,
        "source",
        &format!("{settings} {}", opts.source_limits()),
    )
    .await?;
    if let Err(e) = begin(target, "target", &settings).await {
        let _ = source.batch_execute("ROLLBACK").await;
        return Err(e);
    }
    let result = compare_all(source, target, &checks, opts).await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let (a, b) = tokio::join!(source.batch_execute(end), target.batch_execute(end));
    let tables = result?;
    a.sql_context("ending the verify transaction on the source")?;
    b.sql_context("ending the verify transaction on the target")?;
    let names: Vec<TableName> = checks.iter().map(|c| c.source.clone()).collect();
    Ok(VerifyReport {
        tables,
        elapsed_secs: started.elapsed().as_secs_f64(),
        not_checked: not_checked(source, &checks, names).await?,
        online: None,
    })
}

/// Row count and, with `checksums`, checksum of `table` over `columns` (by name, in that order),
/// with no mapping: for a table compared with a copy that has the same columns, as cutover's
/// window does. Row text and checksum are [`verify`]'s (each column `::text` in a
/// `ROW(…)::text`, the first 64 bits of its md5 summed), so equal tables give equal results on
/// any server version; without `checksums` it is a plain `count(*)` and the checksum `None`.
/// Runs in the caller's session as it is: its settings must make row text the same on both
/// sides.
pub async fn table_summary(
    client: &Client,
    table: &TableName,
    columns: &[String],
    checksums: bool,
) -> Result<(i64, Option<String>), tokio_postgres::Error> {
    let sql = table_summary_sql(table, columns, checksums);
    let row = client.query_one(&sql, &[]).await?;
    Ok((row.get(0), checksums.then(|| row.get(1))))
}

/// The statement behind [`table_summary`]: the row count, then the checksum as text (`''`
/// without `checksums`).
pub fn table_summary_sql(table: &TableName, columns: &[String], checksums: bool) -> String {
    table_part_summary_sql(table, columns, checksums, None)
}

/// [`table_summary_sql`] over the rows stored in a range of the table's pages: from page
/// `first` up to (not including) `end`, or to the table's end when `end` is `None`. Ranges
/// that together cover every page count every row once (a row's `ctid` names its page); the
/// server reads only those pages (a TID range scan, PostgreSQL 14 and later).
pub fn table_part_summary_sql(
    table: &TableName,
    columns: &[String],
    checksums: bool,
    pages: Option<(u32, Option<u32>)>,
) -> String {
    let parts: Vec<String> = columns
        .iter()
        .map(|c| format!("t.{}::text", quote_ident(c)))
        .collect();
    let mut from = format!("FROM {} AS t", table.quoted());
    if let Some((first, end)) = pages {
        from.push_str(&format!(" WHERE t.ctid >= '({first},0)'::tid"));
        if let Some(end) = end {
            from.push_str(&format!(" AND t.ctid < '({end},0)'::tid"));
        }
    }
    Check::summary_sql(&row_text(&parts), &from, checksums)
}

/// Compiles the mapping for each source table against the target and builds the comparison
/// of every target table it feeds.
async fn build_checks(
    source: &Client,
    target: &Client,
    mapping: &Mapping,
    tables: &[TableName],
) -> Result<Vec<Check>, VerifyError> {
    crate::transform::plan::check_mapping(mapping)?;
    let mut plans = Vec::with_capacity(tables.len());
    for name in tables {
        let shape = crate::transform::catalog::source_table(source, name)
            .await?
            .ok_or_else(|| VerifyError::NoSourceTable(name.clone()))?;
        if !mapping.names(name)
            && let Some(t) = catalog::target_table(target, name).await?
            && t.primary_key.is_empty()
        {
            // Replay copies such a table (REPLICA IDENTITY FULL, no key) onto itself without
            // compiling a plan; the mapping's key checks do not apply to it.
            plans.push(keyless_identity(&shape, &t)?);
            continue;
        }
        plans.push(catalog::compile(target, mapping, &shape).await?);
    }
    let builtin = builtin_types(source, &plans).await?;
    let mut checks: Vec<Check> = plans
        .iter()
        .flat_map(|p| p.targets.iter().map(|t| Check::new(p, t, &builtin)))
        .collect();
    let mut types: Vec<String> = checks
        .iter()
        .flat_map(|c| c.chunk.iter().flatten().map(|k| k.type_sql.clone()))
        .collect();
    types.sort();
    types.dedup();
    if !types.is_empty() {
        let rows = target
            .query(
                "SELECT t, coalesce((SELECT typcollation <> 0 FROM pg_type WHERE oid = to_regtype(t)), false) \
                 FROM unnest($1::text[]) AS t",
                &[&types],
            )
            .await
            .sql_context("looking up the key types' collations on the target")?;
        let collatable: HashMap<String, bool> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for k in checks.iter_mut().flat_map(|c| c.chunk.iter_mut().flatten()) {
            k.collate = collatable.get(&k.type_sql).copied().unwrap_or(true);
        }
    }
    Ok(checks)
}

/// What a verify of `checks` (source tables `verified`) leaves unchecked, one sentence each:
/// tables compared as multisets (no key), source tables not verified, unlogged tables and
/// large objects (logical decoding does not carry them), sequences (cutover sets them).
async fn not_checked(
    source: &Client,
    checks: &[Check],
    verified: Vec<TableName>,
) -> Result<Vec<String>, VerifyError> {
    let mut out = Vec::new();
    for c in checks.iter().filter(|c| c.key.is_empty()) {
        out.push(format!(
            "{}: no primary key on the target, compared as a multiset of whole rows \
             (duplicates count, no key names a row)",
            c.what()
        ));
    }
    let (schemas, names): (Vec<String>, Vec<String>) = verified
        .iter()
        .map(|t| (t.schema.clone(), t.name.clone()))
        .unzip();
    let row = source
        .query_one(
            "WITH v AS (SELECT * FROM unnest($1::text[], $2::text[]) AS v(s, n)), \
                  t AS (SELECT c.relname, n.nspname, c.relpersistence, c.relkind \
                          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE c.relkind IN ('r', 'p', 'S') AND NOT c.relispartition \
                           AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'walshift') \
                           AND n.nspname NOT LIKE 'pg\\_%') \
             SELECT (SELECT array_agg(format('%I.%I', nspname, relname) ORDER BY 1) FROM t \
                      WHERE relkind <> 'S' AND relpersistence <> 'u' \
                        AND NOT EXISTS (SELECT 1 FROM v WHERE v.s = t.nspname AND v.n = t.relname)), \
                    (SELECT array_agg(format('%I.%I', nspname, relname) ORDER BY 1) FROM t \
                      WHERE relkind <> 'S' AND relpersistence = 'u'), \
                    (SELECT count(*) FROM t WHERE relkind = 'S'), \
                    (SELECT count(*) FROM pg_largeobject_metadata)",
            &[&schemas, &names],
        )
        .await
        .sql_context("listing what verify does not check on the source")?;
    let list = |v: &[String]| {
        let mut s = v.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
        if v.len() > 10 {
            s.push_str(&format!(" and {} more", v.len() - 10));
        }
        s
    };
    if let Some(skipped) = row.get::<_, Option<Vec<String>>>(0) {
        out.push(format!(
            "{} source table(s) not verified (not in the publication or --tables): {}",
            skipped.len(),
            list(&skipped)
        ));
    }
    if let Some(unlogged) = row.get::<_, Option<Vec<String>>>(1) {
        out.push(format!(
            "{} unlogged table(s) on the source: {} — logical decoding does not carry their \
             changes (replay never updates them) and verify does not compare them",
            unlogged.len(),
            list(&unlogged),
        ));
    }
    let sequences: i64 = row.get(2);
    if sequences > 0 {
        out.push(format!(
            "{sequences} sequence(s) not compared: logical decoding does not carry them; cutover \
             sets every target sequence from the source"
        ));
    }
    let large_objects: i64 = row.get(3);
    if large_objects > 0 {
        out.push(format!(
            "{large_objects} large object(s) on the source not compared: logical decoding does \
             not carry them"
        ));
    }
    Ok(out)
}

/// The plan of a table without a primary key on the target that the mapping does not name:
/// every source column onto the same-named target column, no key.
fn keyless_identity(
    source: &SourceTable,
    target: &TargetTableInfo,
) -> Result<SourcePlan, VerifyError> {
    let columns = source
        .columns
        .iter()
        .enumerate()
        .map(|(i, sc)| {
            let tc = target
                .columns
                .iter()
                .find(|tc| tc.name == sc.name && !tc.generated)
                .ok_or_else(|| VerifyError::KeylessColumn {
                    table: target.name.clone(),
                    column: sc.name.clone(),
                })?;
            Ok(PlanColumn {
                name: tc.name.clone(),
                type_sql: tc.type_sql.clone(),
                expr: PlanExpr {
                    sql: quote_ident(&sc.name),
                    reads: vec![i],
                    passthrough: Some(i),
                    line: None,
                },
                always_identity: tc.always_identity,
            })
        })
        .collect::<Result<Vec<_>, VerifyError>>()?;
    Ok(SourcePlan {
        source: source.clone(),
        targets: vec![TargetPlan {
            target: target.name.clone(),
            columns,
            key: Vec::new(),
            filter: None,
            line: 0,
        }],
        key: Vec::new(),
    })
}

/// For every target column type of the plans: whether the source has it as a built-in type
/// (cast to it there), or not (compare the expression's own text).
async fn builtin_types(
    source: &Client,
    plans: &[SourcePlan],
) -> Result<HashMap<String, bool>, VerifyError> {
    let mut types: Vec<String> = plans
        .iter()
        .flat_map(|p| p.targets.iter())
        .flat_map(|t| t.columns.iter().map(|c| c.type_sql.clone()))
        .collect();
    types.sort();
    types.dedup();
    if types.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = source
        .query(
            "SELECT t, coalesce(to_regtype(t)::oid < 16384, false) FROM unnest($1::text[]) AS t",
            &[&types],
        )
        .await
        .sql_context("looking up the target's column types on the source")?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// `SET LOCAL` statements giving both sides the target's formatting and evaluation settings.
async fn session_settings(target: &Client) -> Result<String, VerifyError> {
    let row = target
        .query_one(
            "SELECT current_setting('TimeZone'), current_setting('DateStyle'), \
                    current_setting('IntervalStyle'), current_setting('extra_float_digits')",
            &[],
        )
        .await
        .sql_context("reading the target's session settings")?;
    let names = [
        "TimeZone",
        "DateStyle",
        "IntervalStyle",
        "extra_float_digits",
    ];
    let mut out = String::new();
    for (i, n) in names.iter().enumerate() {
        let v: String = row.get(i);
        out.push_str(&format!("SET LOCAL {n} = {}; ", quote_literal(&v)));
    }
    out.push_str("SET LOCAL bytea_output = 'hex';");
    Ok(out)
}

async fn begin(client: &Client, side: &str, settings: &str) -> Result<(), VerifyError> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {settings}"
        ))
        .await
        .with_sql_context(|| format!(
            "starting the verify transaction on the {side} (the session must not be inside a transaction)"
        ))?;
    Ok(())
}

async fn compare_all(
    source: &Client,
    target: &Client,
    checks: &[Check],
    opts: &VerifyOptions,
) -> Result<Vec<TableReport>, VerifyError> {
    let mut out = Vec::with_capacity(checks.len());
    for c in checks {
        let s_sql = Check::summary_sql(&c.source_row, &c.source_from, opts.checksums);
        let t_sql = Check::summary_sql(&c.target_row, &c.target_from, opts.checksums);
        let (s, t) = tokio::join!(source.query_one(&s_sql, &[]), target.query_one(&t_sql, &[]));
        let s = s.with_sql_context(|| format!(
            "computing {} on the source (the mapping's expressions and filter run on the source \
             to verify, read-only{}; an expression using a function or type only the target has cannot be verified)",
            c.what(),
            opts.source_statement_timeout
                .filter(|d| !d.is_zero())
                .map(|d| format!(", each statement limited to {}", humantime::format_duration(d)))
                .unwrap_or_default()
        ))?;
        let t = t.with_sql_context(|| format!("computing {} on the target", c.what()))?;
        let (source_rows, source_checksum): (i64, String) = (s.get(0), s.get(1));
        let (target_rows, target_checksum): (i64, String) = (t.get(0), t.get(1));
        let equal = source_rows == target_rows && source_checksum == target_checksum;
        let differences = if equal || opts.max_keys == 0 {
            Vec::new()
        } else {
            first_differences(source, target, c, &c.source_from, &c.target_from, opts).await?
        };
        tracing::info!(table = %c.what(), source_rows, target_rows, equal, "verified");
        out.push(TableReport {
            source: c.source.clone(),
            target: c.target.clone(),
            columns: c.columns.clone(),
            key: c.key.clone(),
            source_rows,
            target_rows,
            source_checksum,
            target_checksum,
            equal,
            differences,
            chunks: 1,
        });
    }
    Ok(out)
}

/// A server-side cursor over `(key text, row md5)` in key order, fetched in batches.
struct KeyCursor<'a> {
    client: &'a Client,
    side: &'static str,
    name: &'static str,
    what: String,
    fetch: usize,
    buf: VecDeque<(Option<String>, String)>,
    done: bool,
}

impl<'a> KeyCursor<'a> {
    async fn open(
        client: &'a Client,
        side: &'static str,
        name: &'static str,
        query: &str,
        what: String,
        fetch: usize,
    ) -> Result<KeyCursor<'a>, VerifyError> {
        client
            .batch_execute(&format!(
                "DECLARE {} NO SCROLL CURSOR FOR {query}",
                quote_ident(name)
            ))
            .await
            .with_sql_context(|| format!("listing the keys of {what} on the {side}"))?;
        Ok(KeyCursor {
            client,
            side,
            name,
            what,
            fetch: fetch.max(1),
            buf: VecDeque::new(),
            done: false,
        })
    }

    async fn peek(&mut self) -> Result<Option<&(Option<String>, String)>, VerifyError> {
        if self.buf.is_empty() && !self.done {
            let rows = self
                .client
                .query(
                    &format!("FETCH {} FROM {}", self.fetch, quote_ident(self.name)),
                    &[],
                )
                .await
                .with_sql_context(|| {
                    format!("reading the keys of {} on the {}", self.what, self.side)
                })?;
            self.done = rows.len() < self.fetch;
            self.buf.extend(
                rows.iter()
                    .map(|r| (r.get::<_, Option<String>>(0), r.get(1))),
            );
        }
        Ok(self.buf.front())
    }

    fn pop(&mut self) -> Option<(Option<String>, String)> {
        self.buf.pop_front()
    }

    async fn close(self) -> Result<(), VerifyError> {
        self.client
            .batch_execute(&format!("CLOSE {}", quote_ident(self.name)))
            .await
            .with_sql_context(|| {
                format!(
                    "closing the key cursor of {} on the {}",
                    self.what, self.side
                )
            })?;
        Ok(())
    }
}

/// Key order of the cursors: `ORDER BY k COLLATE "C"` (bytewise, NULLs last).
fn key_order(a: &Option<String>, b: &Option<String>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.as_bytes().cmp(b.as_bytes()),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

fn shown(key: Option<String>) -> String {
    key.unwrap_or_else(|| "NULL".to_owned())
}

/// Merges both sides' key-ordered streams and returns the first `max_keys` differences.
async fn first_differences(
    source: &Client,
    target: &Client,
    c: &Check,
    source_from: &str,
    target_from: &str,
    opts: &VerifyOptions,
) -> Result<Vec<KeyDifference>, VerifyError> {
    let s_sql = Check::keys_sql(&c.source_key, &c.source_row, source_from);
    let t_sql = Check::keys_sql(&c.target_key, &c.target_row, target_from);
    let mut src = KeyCursor::open(
        source,
        "source",
        "walshift_verify_keys",
        &s_sql,
        c.what(),
        opts.fetch_rows,
    )
    .await?;
    let mut tgt = KeyCursor::open(
        target,
        "target",
        "walshift_verify_keys",
        &t_sql,
        c.what(),
        opts.fetch_rows,
    )
    .await?;
    let mut diffs = Vec::new();
    while diffs.len() < opts.max_keys {
        let (a, b) = (src.peek().await?.cloned(), tgt.peek().await?.cloned());
        let (kind, key) = match (a, b) {
            (None, None) => break,
            (Some(_), None) => (DifferenceKind::MissingOnTarget, src.pop().unwrap().0),
            (None, Some(_)) => (DifferenceKind::ExtraOnTarget, tgt.pop().unwrap().0),
            (Some((ka, ha)), Some((kb, hb))) => match key_order(&ka, &kb) {
                Ordering::Less => (DifferenceKind::MissingOnTarget, src.pop().unwrap().0),
                Ordering::Greater => (DifferenceKind::ExtraOnTarget, tgt.pop().unwrap().0),
                Ordering::Equal => {
                    src.pop();
                    tgt.pop();
                    if ha == hb {
                        continue;
                    }
                    (DifferenceKind::Different, ka)
                }
            },
        };
        diffs.push(KeyDifference {
            key: shown(key),
            kind,
        });
    }
    src.close().await?;
    tgt.close().await?;
    Ok(diffs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_is_bytewise_with_nulls_last() {
        let k = |s: &str| Some(s.to_owned());
        assert_eq!(key_order(&k("10"), &k("9")), Ordering::Less);
        assert_eq!(key_order(&k("B"), &k("a")), Ordering::Less);
        assert_eq!(key_order(&k("a"), &k("ab")), Ordering::Less);
        assert_eq!(key_order(&k("a"), &None), Ordering::Less);
        assert_eq!(key_order(&None, &None), Ordering::Equal);
    }

    #[test]
    fn texts() {
        assert_eq!(key_text(&["a".into()]), "a");
        assert_eq!(key_text(&["a".into(), "b".into()]), "ROW(a, b)::text");
        assert_eq!(hash64("r"), "('x' || left(md5(r), 16))::bit(64)::bigint");
        assert_eq!(
            Check::summary_sql("ROW(t.\"a\"::text)::text", "FROM \"s\".\"t\" AS t", false),
            "SELECT count(*), ''::text FROM \"s\".\"t\" AS t"
        );
    }
}
