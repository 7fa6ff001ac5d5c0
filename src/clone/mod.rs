//! Clone: copy the source into the target exactly as of the slot's exported snapshot.
//!
//! Steps, all while the snapshot is held by the replication connection that exported it:
//! check the target (refuse tables that are already there, detect an earlier clone) →
//! `pg_dump --schema-only --snapshot` of the pre-data and post-data sections → record
//! `walshift.clone_state = 'copying'` → pre-data into the target (`psql`) → rows of every
//! table (`COPY … (FORMAT binary)`, text for columns holding catalog OIDs; streamed, `parallel`
//! tables at a time) → large objects → sequences → post-data (indexes, constraints, triggers)
//! → refresh of the materialized views populated on the source → `clone_state = 'done'`.
//!
//! Replaying the buffer captured from the slot's consistent point on top of the result gives
//! the source. Operator documentation: `docs/clone.md`.
//!
//! Files: `mod.rs` (options, the clone state on the target, the steps in order, sequences and
//! materialized views), `dump.rs` (the schema through `pg_dump` and `psql`, run by
//! [`crate::pgtools`]), `copy.rs` (the rows), `large_objects.rs`, `error.rs`.

mod copy;
mod dump;
mod error;
mod large_objects;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::Client;

pub use error::CloneError;
pub use large_objects::{
    LargeObjectCheck, LargeObjectFingerprint, check_large_objects, large_object_fingerprint,
};

use crate::conn::ConnInfo;
use crate::error::SqlContext;
use crate::identity::{self, ServerIdentity};
use crate::source::preflight::TableRef;
use crate::sql::{quote_literal, quote_qualified};
use dump::Section;

/// How to clone.
#[derive(Debug, Clone)]
pub struct CloneOptions {
    /// The database the snapshot was exported from.
    pub source: ConnInfo,
    /// The database to fill.
    pub target: ConnInfo,
    /// Tables copied at the same time, each on its own pair of sessions. Default
    /// [`DEFAULT_PARALLEL`] (2). More finishes a clone of many tables sooner and loads the
    /// source (and its I/O) harder while the site is live; one large table is copied by one
    /// pair whatever this is.
    pub parallel: usize,
    /// Clone even if the target already holds the tables or an earlier clone (see
    /// [`clone_database`] for exactly what it does).
    pub force: bool,
    /// Draw a progress bar per table on stderr.
    pub progress: bool,
    /// Directory of `pg_dump` and `psql`; refused if its `pg_dump` is older than the source
    /// server. Default: of the installations found (`WALSHIFT_PG_BINDIRS`, `pg_config
    /// --bindir`, `/usr/lib/postgresql/*/bin`, `PATH`), the one of the target's major version,
    /// else the newest older than the target, never one older than the source (see
    /// [`crate::pgtools::ClientTools::for_dump`]; docs/versions.md).
    pub bindir: Option<PathBuf>,
    /// The buffer the clone belongs to, recorded in the clone state (replay and cutover
    /// check it). Capture sets it; `None` records no origin.
    pub origin: Option<CloneOrigin>,
}

/// Which buffer a clone belongs to: the source and slot it was taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneOrigin {
    pub system_identifier: u64,
    pub database: String,
    pub slot: String,
    /// The slot's consistent point: the clone equals the source at this LSN.
    pub consistent_lsn: crate::lsn::Lsn,
}

/// [`CloneOptions::parallel`]'s default.
pub const DEFAULT_PARALLEL: usize = 2;

impl CloneOptions {
    /// Defaults: [`DEFAULT_PARALLEL`] tables in parallel, no force, no progress bars, binaries found automatically.
    pub fn new(source: ConnInfo, target: ConnInfo) -> Self {
        CloneOptions {
            source,
            target,
            parallel: DEFAULT_PARALLEL,
            force: false,
            progress: false,
            bindir: None,
            origin: None,
        }
    }
}

/// What a clone did.
#[derive(Debug, Clone)]
pub struct CloneReport {
    /// `schema.name` and rows copied, in the order the tables were given.
    pub tables: Vec<(String, u64)>,
    /// Rows copied, all tables.
    pub rows: u64,
    /// Bytes of `COPY` binary data streamed.
    pub bytes: u64,
    /// Sequences set on the target.
    pub sequences: usize,
    /// UNLOGGED tables copied as of the snapshot (also in `tables`): logical decoding does not
    /// carry their later changes.
    pub unlogged: Vec<String>,
    /// Tables copied in text format because a column's type holds catalog OIDs (`reg*`):
    /// names resolved on the target instead of the source's OIDs; or has no binary I/O.
    pub text_format: Vec<String>,
    /// Materialized views refreshed on the target (`schema.name`, in the order refreshed): the
    /// ones populated on the source as of the snapshot.
    pub materialized_views: Vec<String>,
    /// Large objects copied (same OIDs); their fingerprint is in the clone state.
    pub large_objects: u64,
    pub elapsed: Duration,
}

/// Progress of a clone as recorded in the target's `walshift.clone_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneStatus {
    /// Started, not finished: the target's tables are incomplete.
    Copying,
    /// Finished: the target equals the source as of `snapshot`.
    Done,
}

/// The target's clone record.
#[derive(Debug, Clone)]
pub struct CloneState {
    pub snapshot: String,
    pub status: CloneStatus,
    pub started_at: SystemTime,
    pub finished_at: Option<SystemTime>,
    /// Tables copied (set when done).
    pub tables: Option<i32>,
    /// Rows copied (set when done).
    pub rows: Option<i64>,
    /// The source's large objects as of the snapshot (set when done).
    pub large_objects: Option<LargeObjectFingerprint>,
    /// The buffer the clone belongs to ([`CloneOptions::origin`]); `None` when the record does
    /// not name one (cloned without an origin, or by a walshift that did not record it).
    pub origin: Option<CloneOrigin>,
}

const STATE_DDL: &str = "CREATE SCHEMA IF NOT EXISTS walshift; \
    CREATE TABLE IF NOT EXISTS walshift.clone_state ( \
      id int PRIMARY KEY CHECK (id = 1), \
      snapshot text NOT NULL, \
      state text NOT NULL CHECK (state IN ('copying', 'done')), \
      started_at timestamptz NOT NULL DEFAULT now(), \
      finished_at timestamptz, \
      tables int, \
      rows bigint); \
    ALTER TABLE walshift.clone_state ADD COLUMN IF NOT EXISTS lo_count bigint, \
      ADD COLUMN IF NOT EXISTS lo_oids_md5 text, ADD COLUMN IF NOT EXISTS lo_data_md5 text, \
      ADD COLUMN IF NOT EXISTS source_system_identifier text, \
      ADD COLUMN IF NOT EXISTS source_database text, ADD COLUMN IF NOT EXISTS source_slot text, \
      ADD COLUMN IF NOT EXISTS consistent_lsn pg_lsn";

async fn connect_target(target: &ConnInfo) -> Result<Client, CloneError> {
    target.connect().await.map_err(|e| CloneError::Connect {
        context: "connecting to the clone target".into(),
        source: e,
    })
}

async fn read_state(client: &Client) -> Result<Option<CloneState>, CloneError> {
    let ctx = "reading walshift.clone_state on the target";
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('walshift.clone_state') IS NOT NULL",
            &[],
        )
        .await
        .sql_context(ctx)?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt(
            // Through jsonb: a record written before the large-object columns existed reads too.
            "SELECT snapshot, state, started_at, finished_at, tables, rows, \
               (to_jsonb(s) ->> 'lo_count')::bigint, to_jsonb(s) ->> 'lo_oids_md5', \
               to_jsonb(s) ->> 'lo_data_md5', to_jsonb(s) ->> 'source_system_identifier', \
               to_jsonb(s) ->> 'source_database', to_jsonb(s) ->> 'source_slot', \
               to_jsonb(s) ->> 'consistent_lsn' \
             FROM walshift.clone_state s WHERE id = 1",
            &[],
        )
        .await
        .sql_context(ctx)?;
    Ok(row.map(|r| CloneState {
        snapshot: r.get(0),
        status: if r.get::<_, &str>(1) == "done" {
            CloneStatus::Done
        } else {
            CloneStatus::Copying
        },
        started_at: r.get(2),
        finished_at: r.get(3),
        tables: r.get(4),
        rows: r.get(5),
        large_objects: r
            .get::<_, Option<i64>>(6)
            .map(|count| LargeObjectFingerprint {
                count,
                oids_md5: r.get::<_, Option<String>>(7).unwrap_or_default(),
                data_md5: r.get(8),
            }),
        origin: (|| {
            Some(CloneOrigin {
                system_identifier: r.get::<_, Option<String>>(9)?.parse().ok()?,
                database: r.get::<_, Option<String>>(10)?,
                slot: r.get::<_, Option<String>>(11)?,
                consistent_lsn: r.get::<_, Option<String>>(12)?.parse().ok()?,
            })
        })(),
    }))
}

/// The target's clone record, or `None` if no clone was ever started there.
pub async fn clone_state(target: &ConnInfo) -> Result<Option<CloneState>, CloneError> {
    read_state(&connect_target(target).await?).await
}

/// The given tables that exist on the target.
async fn existing_tables(
    client: &Client,
    tables: &[TableRef],
) -> Result<Vec<TableRef>, CloneError> {
    let mut found = Vec::new();
    for t in tables {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t.quoted()])
            .await
            .sql_context("looking for the tables on the target")?
            .get(0);
        if exists {
            found.push(t.clone());
        }
    }
    Ok(found)
}

fn display(t: &TableRef) -> String {
    format!("{}.{}", t.schema, t.name)
}

/// Sets every target sequence that also exists on the source to the source's value.
///
/// Sequences are not transactional: the value read is the current one, never lower than at
/// the snapshot. Cutover synchronises sequences again.
async fn sync_sequences(source: &Client, target: &Client) -> Result<usize, CloneError> {
    let seqs = source
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'S' AND n.nspname NOT IN ('walshift', 'pg_catalog', 'information_schema') \
             AND n.nspname !~ '^pg_(temp|toast)' ORDER BY 1, 2",
            &[],
        )
        .await
        .sql_context("listing the source's sequences")?;
    let mut set = 0;
    for s in seqs {
        let q = quote_qualified(s.get(0), s.get(1));
        let row = source
            .query_one(&format!("SELECT last_value, is_called FROM {q}"), &[])
            .await
            .with_sql_context(|| format!("reading sequence {q} on the source"))?;
        let (value, called): (i64, bool) = (row.get(0), row.get(1));
        let n = target
            .execute(
                "SELECT setval(to_regclass($1), $2, $3) WHERE to_regclass($1) IS NOT NULL",
                &[&q, &value, &called],
            )
            .await
            .with_sql_context(|| format!("setting sequence {q} on the target"))?;
        set += n as usize;
    }
    Ok(set)
}

/// Copies the source's schema and the rows of `tables` into the target, as of `snapshot`.
///
/// Contract:
/// - `snapshot` was exported by the replication connection that created the slot; the caller
///   keeps that connection open and idle until this returns (every session here imports it).
/// - A target that is the source database itself (same system identifier and database) is
///   refused whatever `force` says ([`CloneError::Identity`]).
/// - Without `force`, refuses (changing nothing) a target that has any of `tables`
///   ([`CloneError::TargetNotEmpty`]) or a clone record ([`CloneError::Interrupted`] for
///   `'copying'`, [`CloneError::AlreadyCloned`] for `'done'`); the schema is then applied in
///   one transaction, any error fails it.
/// - With `force`: if the target has a clone record, the given tables are dropped
///   (`DROP TABLE … CASCADE`) and recreated; otherwise, tables that already exist are
///   truncated and loaded as they are (their definition, indexes and constraints untouched,
///   not taken from the source). Either way, schema objects that already exist (schemas,
///   types, functions, other tables) are kept: "already exists" errors are ignored.
/// - The pre-data of the whole source database is applied (all schemas, types, functions,
///   sequences and tables, including unpublished tables, which stay empty), without owners,
///   privileges, tablespaces, publications and subscriptions; rows are copied for `tables`
///   and for every UNLOGGED table (never published; copied as of the snapshot, reported in
///   [`CloneReport::unlogged`]); generated columns are recomputed by the target.
/// - Every table's rows stored on the target equal the rows the source sent in the snapshot,
///   or the clone fails with [`CloneError::RowCountMismatch`] (see `copy`'s contract).
/// - A list holding a partitioned table and one of its partitions is refused (double copy).
/// - Tables with a column whose type holds catalog OIDs (`reg*`, also nested) are copied in
///   text format, by name, so they reference the copy's own objects; so are tables with a
///   column type without binary I/O ([`CloneReport::text_format`]).
/// - Materialized views populated on the source are refreshed on the target after the
///   post-data, in dependency order ([`CloneReport::materialized_views`]).
/// - Large objects are copied under the same OIDs (with `force`, target ones of the same OID
///   are replaced) and their fingerprint as of the snapshot is recorded in the clone state
///   ([`check_large_objects`] compares it with the source later).
/// - The clone state records [`CloneOptions::origin`] (the buffer the clone belongs to).
/// - On success `walshift.clone_state` on the target says `'done'`; after any failure it says
///   `'copying'` (once the load started) and the next call refuses without `force`.
pub async fn clone_database(
    opts: &CloneOptions,
    snapshot: &str,
    tables: &[TableRef],
) -> Result<CloneReport, CloneError> {
    let started = Instant::now();
    if opts.parallel == 0 {
        return Err(CloneError::Options("parallel must be at least 1".into()));
    }
    let target_name = opts.target.redacted();
    let target = connect_target(&opts.target).await?;
    // Everything read from the source happens inside the snapshot.
    let source = copy::snapshot_session(&opts.source, snapshot).await?;
    let src = ServerIdentity::probe(&source)
        .await
        .sql_context("reading the source's system identifier")?;
    identity::refuse_source(
        &target,
        &target_name,
        "clone into",
        src.system_identifier,
        &src.database,
    )
    .await?;
    let state = read_state(&target).await?;
    let unlogged = unlogged_tables(&source, tables).await?;
    let all: Vec<TableRef> = tables.iter().chain(&unlogged).cloned().collect();
    check_no_double_copy(&source, &all).await?;
    let existing = existing_tables(&target, &all).await?;
    // Tables to drop and recreate (restart) or to truncate and keep (pre-existing).
    let (drop, keep): (Vec<TableRef>, Vec<TableRef>) = match &state {
        Some(s) if !opts.force => {
            return Err(match s.status {
                CloneStatus::Copying => CloneError::Interrupted {
                    target: target_name,
                    snapshot: s.snapshot.clone(),
                },
                CloneStatus::Done => CloneError::AlreadyCloned {
                    target: target_name,
                    snapshot: s.snapshot.clone(),
                },
            });
        }
        Some(_) => (existing, Vec::new()),
        None if !existing.is_empty() && !opts.force => {
            return Err(CloneError::TargetNotEmpty {
                target: target_name,
                tables: existing.iter().map(display).collect(),
            });
        }
        None => (Vec::new(), existing),
    };

    let mut plans = Vec::with_capacity(all.len());
    for t in &all {
        plans.push(copy::plan_table(&source, &t.schema, &t.name).await?);
    }
    let tools = dump::tools(opts.bindir.as_deref(), src.server_version, &target).await?;
    let (pre, post) = tokio::try_join!(
        dump::dump(&tools, &opts.source, snapshot, Section::PreData, &keep),
        dump::dump(&tools, &opts.source, snapshot, Section::PostData, &keep),
    )?;

    let origin = |f: fn(&CloneOrigin) -> String| {
        opts.origin
            .as_ref()
            .map_or("NULL".to_owned(), |o| quote_literal(&f(o)))
    };
    crate::sql::create_own_objects(&target, STATE_DDL)
        .await
        .sql_context("creating walshift.clone_state on the target")?;
    target
        .batch_execute(&format!(
            "INSERT INTO walshift.clone_state (id, snapshot, state, started_at, \
               source_system_identifier, source_database, source_slot, consistent_lsn) \
             VALUES (1, {snap}, 'copying', now(), {sys}, {db}, {slot}, {lsn}::pg_lsn) \
             ON CONFLICT (id) DO UPDATE SET \
             snapshot = EXCLUDED.snapshot, state = 'copying', started_at = now(), \
             finished_at = NULL, tables = NULL, rows = NULL, \
             source_system_identifier = EXCLUDED.source_system_identifier, \
             source_database = EXCLUDED.source_database, source_slot = EXCLUDED.source_slot, \
             consistent_lsn = EXCLUDED.consistent_lsn",
            snap = quote_literal(snapshot),
            sys = origin(|o| o.system_identifier.to_string()),
            db = origin(|o| o.database.clone()),
            slot = origin(|o| o.slot.clone()),
            lsn = origin(|o| o.consistent_lsn.to_string()),
        ))
        .await
        .sql_context("recording the clone state on the target")?;
    if !drop.is_empty() {
        let list: Vec<String> = drop.iter().map(TableRef::quoted).collect();
        tracing::info!("dropping {} tables of the earlier clone", list.len());
        target
            .batch_execute(&format!("DROP TABLE IF EXISTS {} CASCADE", list.join(", ")))
            .await
            .sql_context("dropping the tables of the earlier clone")?;
    }
    if !keep.is_empty() {
        let list: Vec<String> = keep.iter().map(TableRef::quoted).collect();
        tracing::info!("truncating {} existing tables", list.len());
        target
            .batch_execute(&format!("TRUNCATE {}", list.join(", ")))
            .await
            .sql_context("truncating the existing tables on the target")?;
    }

    dump::apply(&tools, &opts.target, &pre, "pre-data", opts.force).await?;
    let copied = copy::copy_tables(
        &opts.source,
        &opts.target,
        snapshot,
        plans,
        opts.parallel,
        opts.progress,
    )
    .await?;
    let large_objects = large_objects::copy_large_objects(&source, &target, opts.force).await?;
    let fingerprint = large_object_fingerprint(&source).await?;
    let sequences = sync_sequences(&source, &target).await?;
    dump::apply(&tools, &opts.target, &post, "post-data", opts.force).await?;
    let materialized_views = refresh_materialized_views(&source, &opts.target).await?;
    source
        .batch_execute("COMMIT")
        .await
        .sql_context("ending the source snapshot transaction")?;

    let rows: u64 = copied.iter().map(|c| c.rows).sum();
    let text_format: Vec<String> = copied
        .iter()
        .filter(|c| c.text)
        .map(|c| c.display.clone())
        .collect();
    let bytes: u64 = copied.iter().map(|c| c.bytes).sum();
    target
        .execute(
            "UPDATE walshift.clone_state SET state = 'done', finished_at = now(), \
             tables = $1, rows = $2, lo_count = $3, lo_oids_md5 = $4, lo_data_md5 = $5 WHERE id = 1",
            &[
                &(copied.len() as i32),
                &(rows as i64),
                &fingerprint.count,
                &fingerprint.oids_md5,
                &fingerprint.data_md5,
            ],
        )
        .await
        .sql_context("recording the finished clone on the target")?;
    Ok(CloneReport {
        tables: copied.into_iter().map(|c| (c.display, c.rows)).collect(),
        rows,
        bytes,
        sequences,
        unlogged: unlogged.iter().map(display).collect(),
        text_format,
        materialized_views,
        large_objects,
        elapsed: started.elapsed(),
    })
}

/// Refreshes, on the target, every materialized view that is populated on the source (in the
/// snapshot `source` holds), each after the materialized views it reads (also through views). The schema dump
/// creates them `WITH NO DATA` (pg_dump keeps `REFRESH MATERIALIZED VIEW` in its data
/// section); their rows are computed from the copy's own tables, after the post-data (so a
/// unique index on a view exists), with `search_path = ''` as a restore would. Returns them in
/// the order refreshed.
async fn refresh_materialized_views(
    source: &Client,
    target: &ConnInfo,
) -> Result<Vec<String>, CloneError> {
    let rows = source
        .query(
            // deps: the relations a materialized view's query reads, through plain views.
            "WITH RECURSIVE deps(mv, rel) AS ( \
               SELECT r.ev_class, d.refobjid FROM pg_rewrite r \
               JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid \
                 AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class \
               WHERE r.ev_class IN (SELECT oid FROM pg_class WHERE relkind = 'm') \
             UNION \
               SELECT deps.mv, d.refobjid FROM deps \
               JOIN pg_class v ON v.oid = deps.rel AND v.relkind = 'v' \
               JOIN pg_rewrite r ON r.ev_class = v.oid \
               JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid \
                 AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> v.oid) \
             SELECT m.oid, n.nspname::text, m.relname::text, \
               coalesce(array_agg(DISTINCT d.rel) FILTER (WHERE d.rel IS NOT NULL), '{}') \
             FROM pg_class m JOIN pg_namespace n ON n.oid = m.relnamespace \
             LEFT JOIN deps d ON d.mv = m.oid AND d.rel <> m.oid \
               AND d.rel IN (SELECT oid FROM pg_class WHERE relkind = 'm') \
             WHERE m.relkind = 'm' AND m.relispopulated \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'walshift') \
             GROUP BY 1, 2, 3 ORDER BY 2, 3",
            &[],
        )
        .await
        .sql_context("listing the source's materialized views")?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut pending: Vec<(u32, String, String, Vec<u32>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let all: Vec<u32> = pending.iter().map(|p| p.0).collect();
    let mut done: Vec<u32> = Vec::new();
    let mut order = Vec::new();
    while !pending.is_empty() {
        // Ready: every materialized view it reads is refreshed, or is not refreshed at all
        // (unpopulated on the source).
        let ready = pending
            .iter()
            .position(|(_, _, _, deps)| deps.iter().all(|d| done.contains(d) || !all.contains(d)));
        let i = ready.unwrap_or(0);
        let (oid, schema, name, _) = pending.remove(i);
        done.push(oid);
        order.push((schema, name));
    }
    let client = target.connect().await.map_err(|e| CloneError::Connect {
        context: "connecting to the clone target".into(),
        source: e,
    })?;
    client
        .batch_execute("SET search_path = ''")
        .await
        .sql_context("setting search_path on the target")?;
    let mut refreshed = Vec::with_capacity(order.len());
    for (schema, name) in order {
        let q = quote_qualified(&schema, &name);
        client
            .batch_execute(&format!("REFRESH MATERIALIZED VIEW {q}"))
            .await
            .with_sql_context(|| {
                format!(
                    "refreshing materialized view {q} on the target (its query runs on the copy's \
                 tables; fix the error there, then clone again with --force)"
                )
            })?;
        refreshed.push(format!("{schema}.{name}"));
    }
    Ok(refreshed)
}

/// UNLOGGED tables of the source not in `tables`. Logical decoding never sees their changes
/// and PostgreSQL refuses to publish them; they are copied anyway, as of the snapshot, because
/// an empty table on the copy would be a silent divergence while a snapshot copy is what a
/// dump-and-restore would give. Preflight warns that later changes are not replicated.
async fn unlogged_tables(
    source: &Client,
    tables: &[TableRef],
) -> Result<Vec<TableRef>, CloneError> {
    let listed: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let rows = source
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND c.relpersistence = 'u' AND NOT (c.oid = ANY($1)) \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'walshift') \
               AND n.nspname !~ '^pg_(temp|toast)' ORDER BY 2, 3",
            &[&listed],
        )
        .await
        .sql_context("listing the source's unlogged tables")?;
    Ok(rows
        .iter()
        .map(|r| TableRef {
            oid: r.get(0),
            schema: r.get(1),
            name: r.get(2),
        })
        .collect())
}

/// Refuses a table list that holds a partitioned table and one of its partitions: the rows of
/// that partition would be copied twice (once through the root, once on their own).
async fn check_no_double_copy(source: &Client, tables: &[TableRef]) -> Result<(), CloneError> {
    let quoted: Vec<String> = tables.iter().map(TableRef::quoted).collect();
    let overlap = source
        .query(
            "WITH l AS (SELECT to_regclass(q) AS rel FROM unnest($1::text[]) q) \
             SELECT r.rel::text, t.relid::regclass::text FROM l r \
             CROSS JOIN LATERAL pg_partition_tree(r.rel) t \
             WHERE t.relid <> r.rel AND t.relid IN (SELECT rel FROM l) ORDER BY 1, 2",
            &[&quoted],
        )
        .await
        .sql_context("checking the tables for partitions listed with their root")?;
    if let Some(r) = overlap.first() {
        return Err(CloneError::Options(format!(
            "the tables to clone hold the partitioned table {} and its partition {}: its rows would \
             be copied twice. Publish either the partitioned table or its partitions, not both",
            r.get::<_, String>(0),
            r.get::<_, String>(1)
        )));
    }
    Ok(())
}
