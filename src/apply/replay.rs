//! Replay: buffered source transactions, in commit order, into the target — batched, folded
//! to their net effect, written set-based, exactly once.
//!
//! Consecutive source transactions form one target transaction (never splitting a source
//! transaction across two target commits). Inside it, changes are folded per key
//! ([`super::fold`]) and flushed as a few set-based statements per table whenever the folder
//! holds `batch_rows` changes — so a single huge source transaction streams through bounded
//! memory while staying one target transaction. The applied end LSN is recorded in the same
//! target transaction ([`super::target`]). Every statement is checked to affect exactly the
//! rows it must (the affected-row guard, [`crate::apply`]). If a batch fails or misses a row,
//! it is rolled back and replayed in strict source order, one statement per change; a change
//! that still fails stops replay naming the table, the source LSN and the server's error, and
//! one that still misses its row stops it with [`ReplayError::Diverged`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

mod mapped;

use super::fold::{BatchFolder, TableBatch};
use super::params::{self, EncodedArray, Wire};
use super::row::{Arena, Change, ColumnValue, RowChange, TableShape, Val, Value};
use super::target::{self, MappedTable, TargetError};
use crate::buffer::{BufferError, BufferMeta, BufferReader, TxnEvent};
use crate::conn::ConnInfo;
use crate::lsn::Lsn;
pub use crate::source::identity::TargetOrigin;
use crate::source::identity::{self, IdentityError};
use crate::source::pgoutput::{self, LogicalMessage, Relation, TypeInfo};
use crate::sql::quote_literal;
use crate::transform::{self, Mapping, SourcePlan, TableName, TransformError};

/// A batch holding this many bytes of values is written as a slice of the open target
/// transaction even before `batch_rows` changes: memory stays bounded when rows are large
/// (TOASTed documents), and the arena's 32-bit offsets are never at risk.
const SLICE_BYTES: usize = 64 << 20;

/// What to replay and how. Every field documents its default and trade-off.
#[derive(Clone, Debug)]
pub struct ReplayConfig {
    /// Buffer written by capture.
    pub buffer_dir: PathBuf,
    /// The target database (the copy).
    pub target: ConnInfo,
    /// Keep applying as capture appends. Default false: stop at the end of the buffer.
    pub follow: bool,
    /// Stop after the transaction ending at or after this LSN. Default: none.
    pub until_lsn: Option<Lsn>,
    /// Changes folded before they are written (and, at a transaction boundary, committed).
    /// Default 50 000. Larger batches fold more and commit less often; they hold more memory
    /// (at most twice this many changes: a huge transaction is written in slices of this
    /// size inside one target transaction) and make a retry in strict order longer.
    pub batch_rows: usize,
    /// Longest a batch stays open before it is committed at the next transaction boundary.
    /// Default 200 ms. Bounds how far the target lags under light load.
    pub batch_time: Duration,
    /// Print a progress line once a second. Default false (the CLI turns it on).
    pub progress: bool,
    /// The migration mapping rows go through. Default none: every table onto the same-named
    /// target table and columns. Tables the mapping does not name map onto themselves.
    pub transform: Option<Arc<Mapping>>,
    /// Target connections a batch is written over, split by a hash of each row's key.
    /// Default 2. More than one uses two-phase commit and needs `max_prepared_transactions`
    /// of at least this on the target (replay falls back to one connection, saying so,
    /// otherwise). Trade-off: the target's work on a batch runs on several backends (and
    /// cores) at once; the parts of a batch become visible a few milliseconds apart (never
    /// the progress row before the rows it covers), and a replay killed between prepare and
    /// commit leaves prepared transactions (holding locks) until replay starts again.
    pub apply_connections: usize,
    /// How the target got its rows. Default [`TargetOrigin::ClonedByWalshift`]: replay
    /// refuses a target without a clone record of this buffer's source and slot (unless this
    /// buffer was replayed into it before). Never relaxed: a target that is the source itself.
    pub target_origin: TargetOrigin,
}

/// [`ReplayConfig::batch_rows`]'s default.
pub const DEFAULT_BATCH_ROWS: usize = 50_000;
/// [`ReplayConfig::batch_time`]'s default.
pub const DEFAULT_BATCH_TIME: Duration = Duration::from_millis(200);
/// [`ReplayConfig::apply_connections`]'s default.
pub const DEFAULT_APPLY_CONNECTIONS: usize = 2;

impl ReplayConfig {
    /// Defaults for everything but the buffer and the target.
    pub fn new(buffer_dir: impl Into<PathBuf>, target: ConnInfo) -> Self {
        ReplayConfig {
            buffer_dir: buffer_dir.into(),
            target,
            follow: false,
            until_lsn: None,
            batch_rows: DEFAULT_BATCH_ROWS,
            batch_time: DEFAULT_BATCH_TIME,
            progress: false,
            transform: None,
            apply_connections: DEFAULT_APPLY_CONNECTIONS,
            target_origin: TargetOrigin::default(),
        }
    }
}

/// Replay failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Connect(#[from] crate::Error),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("buffer {0} has no buffer.json: it was not written by walshift capture")]
    NotABuffer(PathBuf),
    #[error("undecodable message in the buffer at LSN {lsn}: {source}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: pgoutput::DecodeError,
    },
    #[error(
        "a change refers to relation {relid}, but the buffer holds no Relation message for it before LSN {lsn}"
    )]
    UnknownRelation { relid: u32, lsn: Lsn },
    #[error(
        "applying the source change at LSN {lsn} failed on {table} ({what}), even in strict source order: {}. \
         Its transaction was rolled back; the target is consistent up to the previous source transaction. \
         Fix the target (or the transform) and run replay again: it resumes there",
        crate::transform::catalog::db_message(.source)
    )]
    Apply {
        lsn: Lsn,
        table: String,
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "the change at LSN {lsn} to {table} carries a value of column {column:?} that is not UTF-8: \
         walshift replays text values and needs a UTF8 source database (check `SHOW server_encoding`)"
    )]
    Encoding {
        lsn: Lsn,
        table: String,
        column: String,
    },
    #[error(
        "the target has diverged from the source at LSN {lsn}: the {what} on {table} should have \
         affected {expected} row(s) but affected {found}. The target does not hold the row as the \
         source had it before this change (it was changed or removed on the target outside replay, \
         or copied wrong). The transaction was rolled back; the target is consistent up to the \
         previous source transaction. Re-clone the target, or make the row on the target equal to \
         the source's row before this change by hand and run replay again: it resumes here"
    )]
    Diverged {
        lsn: Lsn,
        table: String,
        what: String,
        expected: u64,
        found: u64,
    },
    #[error("cannot fold the change at LSN {lsn}: {source}")]
    Fold {
        lsn: Lsn,
        #[source]
        source: super::fold::FoldError,
    },
    #[error(transparent)]
    Transform(#[from] TransformError),
    #[error("the background writer stopped unexpectedly: {0}")]
    Writer(String),
    #[error(
        "the update at LSN {lsn} to {table} left column {source_column:?} unchanged (a TOASTed value the \
         source does not resend), but {target_column} is computed from it. walshift cannot compute it: \
         set `ALTER TABLE {table} REPLICA IDENTITY FULL` on the source (old rows then carry the value) \
         and capture again, or map the column without reading {source_column:?}"
    )]
    MissingValue {
        lsn: Lsn,
        table: String,
        source_column: String,
        target_column: String,
    },
    #[error(
        "{rows} row(s) of {table} started passing the mapping's filter for {target} in an update that left a \
         TOASTed value unchanged (transactions up to LSN {lsn}): the whole row is not in the stream, so it \
         cannot be inserted. Set `ALTER TABLE {table} REPLICA IDENTITY FULL` on the source and capture again. \
         Nothing of this batch was committed"
    )]
    FilteredRowIncomplete {
        lsn: Lsn,
        table: String,
        target: String,
        rows: i64,
    },
    #[error("{context}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

fn sql(context: &str) -> impl FnOnce(tokio_postgres::Error) -> ReplayError + '_ {
    move |source| ReplayError::Sql {
        context: context.to_owned(),
        source,
    }
}

/// What a replay run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReplayReport {
    /// The target's applied position when replay started.
    pub start_lsn: Lsn,
    /// The target's applied position now.
    pub applied_lsn: Lsn,
    pub transactions: u64,
    pub changes: u64,
    /// Target transactions committed.
    pub batches: u64,
    /// Batches that failed set-based and were applied in strict source order.
    pub retried_in_order: u64,
    /// Batches redone over one connection (a TRUNCATE met rows the other connections wrote).
    pub serial_batches: u64,
    pub elapsed_secs: f64,
    /// Content of the last cutover marker (a `walshift`-prefixed logical message) seen.
    pub last_marker: Option<String>,
    /// Time the target connection spent executing batches (the writer busy).
    pub writer_busy_secs: f64,
    /// Time the applier waited for the writer before it could hand over the next batch: high
    /// means the target is the bottleneck, low means reading and folding is.
    pub applier_wait_secs: f64,
    /// Target connections batches were written over ([`ReplayConfig::apply_connections`],
    /// or 1 when the target does not allow prepared transactions).
    pub apply_connections: usize,
    /// Prepared transactions a previous, interrupted replay left: committed (their batch had
    /// been decided) and rolled back (replayed again).
    pub prepared_committed: usize,
    pub prepared_rolled_back: usize,
}

/// Prefix of the logical messages (`pg_logical_emit_message`) that mark a cutover. A
/// transaction holding one is recorded in `walshift.applied` like any applied transaction.
pub const MARKER_PREFIX: &str = "walshift";

/// A source relation and where it goes.
struct RelEntry {
    rel: Relation,
    dest: Option<Dest>,
    /// `dest`'s shape, kept rather than rebuilt for every change.
    shape: Option<TableShape>,
}

/// Where a source table's rows are written.
#[derive(Clone)]
enum Dest {
    /// The same-named target table and columns (no transform).
    Same(MappedTable),
    /// Through the mapping, onto one or more target tables.
    Mapped(Arc<SourcePlan>),
}

impl Dest {
    fn name(&self) -> String {
        match self {
            Dest::Same(t) => t.name.clone(),
            Dest::Mapped(p) => p.source.name.quoted(),
        }
    }

    fn shape(&self, relid: u32) -> TableShape {
        match self {
            Dest::Same(t) => TableShape {
                relid,
                columns: t.sql.columns.len(),
                key: t.sql.key.clone(),
                identity_full_without_key: t.full_row_identity,
            },
            Dest::Mapped(p) => TableShape {
                relid,
                columns: p.source.columns.len(),
                key: p.key.clone(),
                identity_full_without_key: false,
            },
        }
    }

    /// Target tables, quoted.
    fn targets(&self) -> Vec<String> {
        match self {
            Dest::Same(t) => vec![t.sql.qualified.clone()],
            Dest::Mapped(p) => p.targets.iter().map(|t| t.target.quoted()).collect(),
        }
    }
}

/// A set-based write that failed.
enum WriteError {
    /// The server refused a statement: the batch is retried in strict source order.
    Db(tokio_postgres::Error),
    /// A statement affected another number of rows than the batch says it must (the
    /// affected-row guard, see [`crate::apply`]): the batch is retried in strict source order,
    /// where a single change that still misses is [`ReplayError::Diverged`].
    Mismatch(Mismatch),
    /// The change cannot be written through the mapping, in any order.
    Fatal(ReplayError),
}

impl From<tokio_postgres::Error> for WriteError {
    fn from(e: tokio_postgres::Error) -> Self {
        WriteError::Db(e)
    }
}

/// A statement's row count that is not the one expected.
#[derive(Debug)]
struct Mismatch {
    table: String,
    /// The statement, e.g. `set-based UPDATE`.
    statement: &'static str,
    expected: u64,
    found: u64,
}

/// The affected-row guard: `found` (the command tag's count) must be `expected`.
fn expect_rows(
    table: &str,
    statement: &'static str,
    expected: usize,
    found: u64,
) -> Result<(), WriteError> {
    if found == expected as u64 {
        return Ok(());
    }
    Err(WriteError::Mismatch(Mismatch {
        table: table.to_owned(),
        statement,
        expected: expected as u64,
        found,
    }))
}

impl WriteError {
    /// The error a change applied on its own (strict order) fails with.
    fn for_change(self, dest: &Dest, change: &Change, lsn: Lsn) -> ReplayError {
        match self {
            WriteError::Db(e) => ReplayError::Apply {
                lsn,
                table: dest.name(),
                what: describe_change(dest, change),
                source: e,
            },
            WriteError::Mismatch(m) => ReplayError::Diverged {
                lsn,
                table: match dest {
                    Dest::Same(_) => m.table,
                    Dest::Mapped(_) => format!("{} (mapped from {})", m.table, dest.name()),
                },
                what: describe_change(dest, change),
                expected: m.expected,
                found: m.found,
            },
            WriteError::Fatal(e) => e,
        }
    }
}

/// Where a source relation goes: through the mapping if it names the table, else onto the
/// same-named table.
async fn dest_for(
    client: &Client,
    mapping: &Mapping,
    rel: &Relation,
    types: &HashMap<u32, TypeInfo>,
) -> Result<Dest, ReplayError> {
    let schema = if rel.namespace.is_empty() {
        "pg_catalog"
    } else {
        rel.namespace.as_str()
    };
    if mapping.names(&TableName::new(schema, rel.name.clone())) {
        let source = transform::catalog::source_from_relation(client, rel, types).await?;
        let plan = transform::catalog::compile(client, mapping, &source).await?;
        Ok(Dest::Mapped(Arc::new(plan)))
    } else {
        Ok(Dest::Same(target::map_relation(client, rel).await?))
    }
}

/// Reads the Relation and Type messages of the buffer from `from` until every table the
/// mapping names has been seen (or the end), so the mapping is compiled before anything is
/// written.
pub fn scan_relations(
    dir: &std::path::Path,
    from: Lsn,
    mapping: &Mapping,
) -> Result<(Vec<Relation>, HashMap<u32, TypeInfo>), ReplayError> {
    let mut wanted: std::collections::HashSet<TableName> = mapping
        .tables
        .iter()
        .map(|t| t.source.value.clone())
        .collect();
    let mut rels = Vec::new();
    let mut types = HashMap::new();
    for rec in BufferReader::open(dir)?.records_from(from)? {
        let rec = rec?;
        if !matches!(rec.payload.first(), Some(b'R' | b'Y')) {
            continue;
        }
        match pgoutput::decode(&rec.payload).map_err(|source| ReplayError::Decode {
            lsn: rec.lsn,
            source,
        })? {
            LogicalMessage::Relation(r) => {
                wanted.remove(&TableName::new(
                    if r.namespace.is_empty() {
                        "pg_catalog"
                    } else {
                        &r.namespace
                    },
                    r.name.clone(),
                ));
                rels.push(r);
            }
            LogicalMessage::Type(t) => {
                types.insert(t.oid, t);
            }
            _ => {}
        }
        if wanted.is_empty() {
            break;
        }
    }
    Ok((rels, types))
}

/// Applies the buffer to the target until its end (or `until_lsn`, or forever with `follow`,
/// until `shutdown`).
///
/// One replay of a buffer into a target at a time: callers hold
/// [`crate::cutover::coord::ReplayGuard`] for the buffer while this runs (the `replay`, `run`
/// and `cutover` commands and the demo do), which is also how cutover sees a replay running.
pub async fn run(
    config: ReplayConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<ReplayReport, ReplayError> {
    let meta = BufferMeta::read(&config.buffer_dir)?
        .ok_or_else(|| ReplayError::NotABuffer(config.buffer_dir.clone()))?;
    let buffer_id = target::buffer_id(meta.system_identifier, &meta.slot);
    let writers = config
        .target
        .with_application_name(&target::replay_application_name(&buffer_id));
    let client = Arc::new(writers.connect().await?);
    identity::check_replay_target(
        &client,
        &config.target.redacted(),
        &meta,
        config.target_origin,
        "replay into",
    )
    .await?;
    client
        .batch_execute(SESSION_SETUP)
        .await
        .map_err(sql("preparing the target session"))?;
    target::ensure_progress_table(&client).await?;
    let ended = target::wait_for_previous_replay(&client, &buffer_id).await?;
    if ended > 0 {
        tracing::warn!(
            "ended {ended} session(s) an interrupted replay of this buffer left on the target"
        );
    }
    let resolved = target::resolve_prepared(&client, &buffer_id).await?;
    if resolved != target::Resolved::default() {
        tracing::warn!(
            "settled the prepared transactions an interrupted replay left on the target: \
             {} committed, {} rolled back (replayed again)",
            resolved.committed,
            resolved.rolled_back
        );
    }
    let conns = connect_parts(&config, &writers, client.clone()).await?;
    let start = target::applied_lsn(&client, &buffer_id)
        .await?
        .unwrap_or(Lsn::ZERO);
    let mut types = HashMap::new();
    let mut rels = HashMap::new();
    if let Some(mapping) = &config.transform {
        // Compile up front: a mapping that does not fit the target stops replay before any
        // batch is written.
        transform::plan::check_mapping(mapping)?;
        let (mut seen, t) = scan_relations(&config.buffer_dir, start, mapping)?;
        types = t;
        // Mapped tables first: a mistake in the mapping is reported before identity drift.
        seen.sort_by_key(|r| {
            !mapping.names(&TableName::new(
                if r.namespace.is_empty() {
                    "pg_catalog"
                } else {
                    &r.namespace
                },
                r.name.clone(),
            ))
        });
        for rel in seen {
            let dest = dest_for(&client, mapping, &rel, &types).await?;
            rels.insert(
                rel.relid,
                RelEntry {
                    shape: Some(dest.shape(rel.relid)),
                    rel,
                    dest: Some(dest),
                },
            );
        }
        for entry in &mapping.tables {
            if transform::catalog::target_table(&client, &entry.target.value)
                .await?
                .is_none()
            {
                return Err(TransformError::Mapping {
                    path: mapping.path.clone(),
                    line: entry.target.line,
                    message: format!(
                        "target table {} does not exist on the target: create it in the migration, or fix the name",
                        entry.target.value
                    ),
                }
                .into());
            }
        }
    }
    let started = Instant::now();
    let mut report = ReplayReport {
        start_lsn: start,
        applied_lsn: start,
        apply_connections: conns.len(),
        prepared_committed: resolved.committed,
        prepared_rolled_back: resolved.rolled_back,
        ..Default::default()
    };
    let hold = match config.follow {
        true => Some(super::hold::HoldWatch::start(&config.target, &buffer_id).await?),
        false => None,
    };
    let mut applier = Applier {
        hold,
        connections: conns.len(),
        serial_pass: false,
        scratch: Default::default(),
        spare_arena: None,
        slot: Slot::Idle(Writer {
            open: vec![false; conns.len()],
            conns,
        }),
        client,
        buffer_id,
        rels,
        types,
        transform: config.transform.clone(),
        progress: config.progress.then(|| Progress {
            started,
            last_print: Instant::now(),
            last_changes: 0,
            last_commit_us: None,
            buffered: None,
            tail: None,
        }),
    };
    tokio::pin!(shutdown);
    let mut pending: Option<Pass> = None;
    loop {
        // A pass that redoes one batch stops after it (or at the caller's own limit).
        let redo = |until: Lsn, applied: Lsn| {
            let mut c = config.clone();
            let end = until.max(applied + 1);
            c.until_lsn = Some(config.until_lsn.map_or(end, |u| u.min(end)));
            c.follow = false;
            c
        };
        let outcome = match pending.take() {
            None => {
                applier
                    .apply_from(
                        &config,
                        report.applied_lsn,
                        false,
                        &mut report,
                        &mut shutdown,
                    )
                    .await
            }
            Some(Pass::Retry { until }) => {
                // Strict source order for the failed batch only, then set-based again.
                report.retried_in_order += 1;
                let strict = redo(until, report.applied_lsn);
                applier
                    .apply_from(
                        &strict,
                        report.applied_lsn,
                        true,
                        &mut report,
                        &mut shutdown,
                    )
                    .await
                    .map(|_| Pass::Again)
            }
            Some(Pass::Serial { until }) => {
                // Set-based, but over the main connection only, for the batch that needs it.
                report.serial_batches += 1;
                let serial = redo(until, report.applied_lsn);
                applier.serial_pass = true;
                let outcome = applier
                    .apply_from(
                        &serial,
                        report.applied_lsn,
                        false,
                        &mut report,
                        &mut shutdown,
                    )
                    .await;
                applier.serial_pass = false;
                outcome.map(|p| match p {
                    Pass::Done => Pass::Again,
                    other => other,
                })
            }
            Some(Pass::Again | Pass::Done) => unreachable!("never pending"),
        };
        match outcome {
            Ok(Pass::Done) => break,
            Ok(Pass::Again) => {}
            Ok(p) => pending = Some(p),
            Err(e) => return Err(e),
        }
    }
    if let Err(Pass::Retry { until }) = applier.idle(&config, &mut report).await? {
        return Err(ReplayError::Writer(format!(
            "a batch ending at {until} failed after replay stopped; run replay again"
        )));
    }
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Every target session replay writes through. Generic plans: a custom plan sees the batch's
/// thousands of keys and picks a sequential scan plus hash join over the whole table; the
/// generic plan looks each key up through the primary key index, which is what a batch of
/// changes wants. Values are parsed (and, for columns compared by text, printed) with the
/// output settings capture reads them with.
const SESSION_SETUP: &str = "SET session_replication_role = replica; SET synchronous_commit = on; \
     SET plan_cache_mode = force_generic_plan; SET DateStyle = ISO; SET IntervalStyle = postgres; \
     SET extra_float_digits = 3";

/// How long a part of a parallel batch waits for a row lock. Parts write disjoint keys, so a
/// wait means two parts met on something else (a secondary unique index, a key move, a
/// non-injective mapped key) and may be waiting for each other through walshift, a cycle
/// PostgreSQL cannot see: the wait turns into an error and the batch is retried in strict
/// order on one connection.
const PART_LOCK_TIMEOUT: &str = "SET lock_timeout = '1s'";

/// The main connection plus the helpers [`ReplayConfig::apply_connections`] asks for, if the
/// target allows prepared transactions for them.
async fn connect_parts(
    config: &ReplayConfig,
    writers: &ConnInfo,
    main: Arc<Client>,
) -> Result<Vec<Conn>, ReplayError> {
    let wanted = config.apply_connections.max(1);
    let mut conns = vec![Conn {
        client: main,
        statements: HashMap::new(),
    }];
    if wanted == 1 {
        return Ok(conns);
    }
    let allowed: i64 = conns[0]
        .client
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'max_prepared_transactions'",
            &[],
        )
        .await
        .map_err(sql("reading max_prepared_transactions on the target"))?
        .get(0);
    if allowed < wanted as i64 {
        tracing::warn!(
            "the target allows {allowed} prepared transactions: replaying over one connection. \
             Set max_prepared_transactions = {wanted} (or more) on the target and restart it to \
             write each batch over {wanted} connections"
        );
        return Ok(conns);
    }
    conns[0]
        .client
        .batch_execute(PART_LOCK_TIMEOUT)
        .await
        .map_err(sql("preparing the target session"))?;
    for _ in 1..wanted {
        let client = writers.connect().await?;
        client
            .batch_execute(&format!("{SESSION_SETUP}; {PART_LOCK_TIMEOUT}"))
            .await
            .map_err(sql("preparing a target session"))?;
        conns.push(Conn {
            client: Arc::new(client),
            statements: HashMap::new(),
        });
    }
    Ok(conns)
}

enum Pass {
    Done,
    /// The pass that redid a batch finished it: continue normally.
    Again,
    /// The batch after the applied position needs one connection (a TRUNCATE after other
    /// connections wrote part of it): redo it set-based over the main connection, up to (at
    /// least) this LSN.
    Serial {
        until: Lsn,
    },
    /// The batch after the applied position failed set-based: replay it in strict order up
    /// to (at least) this end LSN.
    Retry {
        until: Lsn,
    },
}

struct Applier {
    /// For catalog lookups, only while the writer is idle.
    client: Arc<Client>,
    /// The target connection's writer: idle, or running a job in the background.
    slot: Slot,
    buffer_id: String,
    rels: HashMap<u32, RelEntry>,
    /// Type messages seen (names of non-built-in column types).
    types: HashMap<u32, TypeInfo>,
    transform: Option<Arc<Mapping>>,
    progress: Option<Progress>,
    /// Target connections of the writer (1: no two-phase commit).
    connections: usize,
    /// The current pass writes over the main connection only ([`Pass::Serial`]).
    serial_pass: bool,
    /// Old and new images of the change being folded.
    scratch: (Vec<Val>, Vec<Val>),
    /// A written batch's arena, emptied and reused by a later batch.
    spare_arena: Option<Arena>,
    /// Holds set by online verify (`--follow` only; see [`super::hold`]).
    hold: Option<super::hold::HoldWatch>,
}

/// The `--follow` status line: rate, applied position, lag behind the buffer and the source.
struct Progress {
    started: Instant,
    last_print: Instant,
    last_changes: u64,
    /// Commit time of the last applied source transaction (µs since 2000-01-01).
    last_commit_us: Option<i64>,
    /// End of the last commit in the buffer, and where to look for the next one.
    buffered: Option<Lsn>,
    tail: Option<crate::buffer::Pos>,
}

impl Progress {
    fn maybe_print(&mut self, config: &ReplayConfig, report: &ReplayReport, force: bool) {
        let now = Instant::now();
        let since = now.duration_since(self.last_print);
        if !force && since < Duration::from_secs(1) {
            return;
        }
        let rate = (report.changes - self.last_changes) as f64 / since.as_secs_f64().max(1e-3);
        self.last_print = now;
        self.last_changes = report.changes;
        match BufferReader::open(&config.buffer_dir).and_then(|r| r.last_commit_since(self.tail)) {
            Ok((commit, next)) => {
                self.buffered = commit.map(|c| c.end_lsn).or(self.buffered);
                self.tail = Some(next);
            }
            Err(_) => self.tail = None,
        }
        let buffered = self.buffered.unwrap_or(report.applied_lsn);
        let behind = self
            .last_commit_us
            .map(crate::buffer::pg_time_to_system_time)
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        eprintln!(
            "replay: {} txns, {} changes, {:.0} changes/s | applied {} | lag {} bytes behind the buffer, {} behind the source commit | up {:.0}s",
            report.transactions,
            report.changes,
            rate,
            report.applied_lsn,
            buffered.bytes_since(report.applied_lsn),
            behind,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// An open target transaction and the folder feeding it.
struct Batch {
    folder: BatchFolder,
    /// The batch has something to commit.
    open: bool,
    /// BEGIN has been sent for it.
    begun: bool,
    opened_at: Instant,
    transactions: u64,
    changes: u64,
    last_end: Lsn,
    last_commit_us: Option<i64>,
    /// Row changes in the open target transaction (counted in the report once committed).
    rows: u64,
    /// The target transaction holds a TRUNCATE on the main connection: its table lock would
    /// block the other connections, so the rest of the batch goes over the main one.
    serial: bool,
}

impl Applier {
    /// One pass over the buffer from `from`. In `strict` mode exactly one batch (the one that
    /// failed) is applied change by change, then the pass returns.
    async fn apply_from(
        &mut self,
        config: &ReplayConfig,
        from: Lsn,
        strict: bool,
        report: &mut ReplayReport,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<Pass, ReplayError> {
        let reader = BufferReader::open(&config.buffer_dir)?;
        let mut events = reader.transactions_from(from)?;
        let mut batch = Batch {
            folder: BatchFolder::new(),
            open: false,
            begun: false,
            opened_at: Instant::now(),
            transactions: 0,
            changes: 0,
            last_end: from,
            last_commit_us: None,
            serial: self.serial_pass,
            rows: 0,
        };
        loop {
            let Some(ev) = events.next() else {
                // End of what is in the buffer now.
                if batch.open
                    && let Err(p) = self.commit(config, &mut batch, strict, report).await?
                {
                    return Ok(p);
                }
                if let Err(p) = self.idle(config, report).await? {
                    return Ok(p);
                }
                if !config.follow {
                    return Ok(Pass::Done);
                }
                if let Some(h) = &mut self.hold {
                    h.at_end(report.applied_lsn).await?;
                }
                if let Some(p) = &mut self.progress {
                    p.maybe_print(config, report, false);
                }
                tokio::select! {
                    _ = shutdown.as_mut() => return Ok(Pass::Done),
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                events.refresh()?;
                continue;
            };
            let ev = ev?;
            let rec = match &ev {
                TxnEvent::Begin(r)
                | TxnEvent::Change(r)
                | TxnEvent::Standalone(r)
                | TxnEvent::Commit { record: r, .. } => r,
            };
            let lsn = rec.lsn;
            match ev {
                // A hold (src/apply/hold.rs): stop before a transaction committed at or after
                // the hold LSN, everything before it committed, until the hold moves on.
                TxnEvent::Begin(r)
                    if !strict && self.hold.as_ref().is_some_and(|h| h.blocks(&r.payload)) =>
                {
                    if batch.open
                        && let Err(p) = self.commit(config, &mut batch, strict, report).await?
                    {
                        return Ok(p);
                    }
                    if let Err(p) = self.idle(config, report).await? {
                        return Ok(p);
                    }
                    let hold = self.hold.as_mut().expect("checked");
                    if !hold
                        .wait_at(report.applied_lsn, &r.payload, shutdown)
                        .await?
                    {
                        return Ok(Pass::Done);
                    }
                }
                TxnEvent::Begin(_) => {}
                TxnEvent::Commit { commit, .. } => {
                    batch.transactions += 1;
                    batch.last_end = commit.end_lsn;
                    batch.last_commit_us = commit.commit_time_us;
                    let until_reached = config.until_lsn.is_some_and(|u| commit.end_lsn >= u);
                    let full = batch.changes as usize >= config.batch_rows
                        || batch.opened_at.elapsed() >= config.batch_time;
                    if batch.open && (strict || full || until_reached) {
                        if let Err(p) = self.commit(config, &mut batch, strict, report).await? {
                            return Ok(p);
                        }
                    } else if !batch.open {
                        // A transaction with no change for us (e.g. other tables): just advance.
                        report.transactions += 1;
                        batch.transactions = 0;
                    }
                    if until_reached {
                        if batch.open
                            && let Err(p) = self.commit(config, &mut batch, strict, report).await?
                        {
                            return Ok(p);
                        }
                        if let Err(p) = self.idle(config, report).await? {
                            return Ok(p);
                        }
                        return Ok(Pass::Done);
                    }
                }
                TxnEvent::Change(rec) | TxnEvent::Standalone(rec) => {
                    // A row change goes from the record's bytes straight into an arena: the
                    // batch's (folded), or a scratch one turned into an owned change (strict
                    // order).
                    let row = pgoutput::decode_row(&rec.payload)
                        .map_err(|source| ReplayError::Decode { lsn, source })?;
                    if let Some(row) = row {
                        self.begin(&mut batch);
                        if self.rels.get(&row.relid).is_none_or(|e| e.dest.is_none())
                            && let Err(p) = self.idle(config, report).await?
                        {
                            // Catalog lookups need the connection to themselves.
                            return Ok(p);
                        }
                        self.dest(row.relid, lsn).await?;
                        if strict {
                            let mut arena = Arena::default();
                            self.intern_row(&row, lsn, &mut arena)?;
                            let change = self.scratch_change(&row);
                            change
                                .check(self.shape(row.relid))
                                .map_err(|source| ReplayError::Fold { lsn, source })?;
                            let change = change.to_change(&arena);
                            if let Err(p) = self.begin_now(config, report, &mut batch).await? {
                                return Ok(p);
                            }
                            let dest = self.rels[&row.relid].dest.clone().expect("mapped");
                            if let Err(e) =
                                self.writer().main().apply_one(&dest, &change, lsn).await
                            {
                                self.writer().rollback().await;
                                return Err(e.for_change(&dest, &change, lsn));
                            }
                        } else {
                            self.intern_row(&row, lsn, batch.folder.arena())?;
                            batch
                                .folder
                                .push_row(self.shape(row.relid), self.scratch_change(&row))
                                .map_err(|source| ReplayError::Fold { lsn, source })?;
                        }
                        if let Err(p) = self.counted(config, &mut batch, report, strict).await? {
                            return Ok(p);
                        }
                        continue;
                    }
                    let msg = pgoutput::decode(&rec.payload)
                        .map_err(|source| ReplayError::Decode { lsn, source })?;
                    match msg {
                        LogicalMessage::Relation(rel) => {
                            let changed = self.rels.get(&rel.relid).is_none_or(|e| e.rel != rel);
                            if changed {
                                // A batch never folds two shapes of a table: write what is
                                // folded under the old one first.
                                if self.rels.contains_key(&rel.relid)
                                    && !strict
                                    && !batch.folder.is_empty()
                                    && let Err(p) = self.flush(config, &mut batch, report).await?
                                {
                                    return Ok(p);
                                }
                                // Drift is checked when the first change for it arrives.
                                self.rels.insert(
                                    rel.relid,
                                    RelEntry {
                                        rel,
                                        dest: None,
                                        shape: None,
                                    },
                                );
                            }
                        }
                        LogicalMessage::Type(t) => {
                            self.types.insert(t.oid, t);
                        }
                        LogicalMessage::Truncate(t) => {
                            self.begin(&mut batch);
                            if !strict
                                && !batch.folder.is_empty()
                                && let Err(p) = self.flush(config, &mut batch, report).await?
                            {
                                return Ok(p);
                            }
                            if let Err(p) = self.begin_now(config, report, &mut batch).await? {
                                return Ok(p);
                            }
                            if self.writer().helpers_open() {
                                // Other connections hold rows of this target transaction: the
                                // TRUNCATE would wait for them while they wait for it. Roll
                                // back and redo the batch, set-based, on the main connection only.
                                self.writer().rollback().await;
                                return Ok(Pass::Serial { until: lsn });
                            }
                            let mut tables = Vec::new();
                            for relid in &t.relids {
                                tables.extend(self.dest(*relid, lsn).await?.targets());
                            }
                            let mut stmt =
                                target::truncate_sql(&tables, t.cascade(), t.restart_identity());
                            if self.connections > 1 {
                                // Only the main connection writes from here to the commit: wait
                                // for other sessions' locks as long as it takes.
                                stmt = format!("SET LOCAL lock_timeout = 0; {stmt}");
                            }
                            batch.serial = true;
                            if let Err(e) = self.writer().main().client.batch_execute(&stmt).await {
                                self.writer().rollback().await;
                                return Err(ReplayError::Apply {
                                    lsn,
                                    table: tables.join(", "),
                                    what: "TRUNCATE".into(),
                                    source: e,
                                });
                            }
                            batch.changes += 1;
                        }
                        LogicalMessage::Message(m) if m.prefix == MARKER_PREFIX => {
                            // A cutover marker: its transaction must be recorded as applied
                            // even though it changes no row, so cutover can see replay
                            // passed it.
                            self.begin(&mut batch);
                            report.last_marker = Some(String::from_utf8_lossy(&m.content).into());
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Accounts for one row change taken into the batch; writes a slice of the open target
    /// transaction when the folder is full.
    async fn counted(
        &mut self,
        config: &ReplayConfig,
        batch: &mut Batch,
        report: &mut ReplayReport,
        strict: bool,
    ) -> Result<Result<(), Pass>, ReplayError> {
        batch.changes += 1;
        batch.rows += 1;
        // A transaction too big for one batch is written in slices inside the open target
        // transaction. Only then: when the batch also holds whole transactions, its commit
        // comes within a transaction's length, so the slice waits up to twice the limit (a
        // slice right before the commit would make the commit wait for it). Large values
        // slice by bytes too, so memory stays bounded whatever the rows hold.
        let slice_at = if batch.transactions == 0 {
            config.batch_rows
        } else {
            config.batch_rows.saturating_mul(2)
        };
        if !strict && (batch.folder.len() >= slice_at || batch.folder.bytes() >= SLICE_BYTES) {
            // Mid-transaction: write what is folded, keep the transaction open.
            if let Err(p) = self.flush(config, batch, report).await? {
                return Ok(Err(p));
            }
        }
        if batch.changes.is_multiple_of(256) && matches!(self.slot, Slot::Busy(_)) {
            // On a single-threaded runtime, let the writer send its next statement while this
            // loop reads ahead.
            tokio::task::yield_now().await;
        }
        Ok(Ok(()))
    }

    /// Copies a row change's values into `arena`, each checked to be UTF-8 (values travel to
    /// the target as text), into the scratch images [`scratch_change`](Self::scratch_change)
    /// reads. Under REPLICA IDENTITY FULL the old row is whole: it supplies the TOASTed values
    /// the new image leaves out, so the update can be written (and transformed) completely.
    fn intern_row(
        &mut self,
        row: &pgoutput::RowRef<'_>,
        lsn: Lsn,
        arena: &mut Arena,
    ) -> Result<(), ReplayError> {
        let entry = &self.rels[&row.relid];
        let (old, new) = (&mut self.scratch.0, &mut self.scratch.1);
        old.clear();
        new.clear();
        let mut intern = |tuple: &pgoutput::TupleRef<'_>, out: &mut Vec<Val>| {
            for (i, v) in tuple.values().enumerate() {
                out.push(match v {
                    pgoutput::ValueRef::Null => Val::NULL,
                    pgoutput::ValueRef::UnchangedToast => Val::UNCHANGED_TOAST,
                    pgoutput::ValueRef::Text(b) | pgoutput::ValueRef::Binary(b) => {
                        if std::str::from_utf8(b).is_err() {
                            return Err(ReplayError::Encoding {
                                lsn,
                                table: entry.dest.as_ref().map(Dest::name).unwrap_or_default(),
                                column: entry
                                    .rel
                                    .columns
                                    .get(i)
                                    .map(|c| c.name.clone())
                                    .unwrap_or_default(),
                            });
                        }
                        arena.push(Some(b))
                    }
                });
            }
            Ok(())
        };
        if let Some((_, t)) = &row.old {
            intern(t, old)?;
        }
        if let Some(t) = &row.new {
            intern(t, new)?;
        }
        if row.kind == pgoutput::RowKind::Update
            && entry.rel.replica_identity == pgoutput::ReplicaIdentity::Full
            && old.len() == new.len()
        {
            for (n, &o) in new.iter_mut().zip(old.iter()) {
                if !n.is_known() {
                    *n = o;
                }
            }
        }
        Ok(())
    }

    /// The change [`intern_row`](Self::intern_row) last took in.
    fn scratch_change(&self, row: &pgoutput::RowRef<'_>) -> RowChange<'_> {
        let (old, new) = (&self.scratch.0, &self.scratch.1);
        match row.kind {
            pgoutput::RowKind::Insert => RowChange::Insert { new },
            pgoutput::RowKind::Delete => RowChange::Delete { old },
            pgoutput::RowKind::Update => RowChange::Update {
                old: row.old.is_some().then_some(old.as_slice()),
                new,
            },
        }
    }

    /// The fold shape of a table whose destination is known.
    fn shape(&self, relid: u32) -> &TableShape {
        self.rels[&relid]
            .shape
            .as_ref()
            .expect("mapped before its changes are taken in")
    }

    /// Opens the batch (BEGIN goes out with its first write).
    fn begin(&mut self, batch: &mut Batch) {
        if !batch.open {
            batch.open = true;
            batch.opened_at = Instant::now();
        }
    }

    async fn dest(&mut self, relid: u32, lsn: Lsn) -> Result<&Dest, ReplayError> {
        let entry = self
            .rels
            .get_mut(&relid)
            .ok_or(ReplayError::UnknownRelation { relid, lsn })?;
        if entry.dest.is_none() {
            let dest = match &self.transform {
                Some(m) => dest_for(&self.client, m, &entry.rel, &self.types).await?,
                None => Dest::Same(target::map_relation(&self.client, &entry.rel).await?),
            };
            entry.shape = Some(dest.shape(relid));
            entry.dest = Some(dest);
        }
        Ok(entry.dest.as_ref().expect("just mapped"))
    }

    /// Ends the batch: its changes, the progress row and COMMIT go to the writer (strict
    /// mode: written here and now). `Err(Pass)` = a batch failed set-based and was rolled back.
    async fn commit(
        &mut self,
        config: &ReplayConfig,
        batch: &mut Batch,
        strict: bool,
        report: &mut ReplayReport,
    ) -> Result<Result<(), Pass>, ReplayError> {
        let done = Committed {
            end: batch.last_end,
            changes: std::mem::take(&mut batch.rows),
            transactions: batch.transactions,
            commit_us: batch.last_commit_us,
        };
        batch.open = false;
        batch.transactions = 0;
        batch.changes = 0;
        if !strict {
            let (arena, parts) = self.take_tables(batch);
            batch.serial = self.serial_pass;
            let job = Job {
                begin: !std::mem::replace(&mut batch.begun, false),
                arena,
                parts,
                commit: Some(done),
                until: done.end,
            };
            return self.submit(config, report, job).await;
        }
        if let Err(p) = self.begin_now(config, report, batch).await? {
            return Ok(Err(p));
        }
        batch.begun = false;
        batch.serial = self.serial_pass;
        let end = done.end.to_string();
        let buffer_id = self.buffer_id.clone();
        let w = self.writer();
        let recorded = w
            .main()
            .client
            .execute(target::RECORD_PROGRESS, &[&buffer_id, &end])
            .await;
        let committed = match recorded {
            Ok(_) => w.main().client.batch_execute("COMMIT").await,
            Err(e) => Err(e),
        };
        if let Err(e) = committed {
            w.rollback().await;
            return Err(sql("committing a batch on the target")(e));
        }
        self.committed(config, report, done);
        Ok(Ok(()))
    }

    /// The folded tables of the batch so far, with where each goes, split over the writer's
    /// connections.
    fn take_tables(&mut self, batch: &mut Batch) -> (Arc<Arena>, Vec<Vec<(Dest, TableBatch)>>) {
        let next = BatchFolder::with_arena(self.spare_arena.take().unwrap_or_default());
        let folder = std::mem::replace(&mut batch.folder, next);
        let connections = if batch.serial { 1 } else { self.connections };
        let folded = folder.finish();
        let tables = folded
            .tables
            .into_iter()
            .map(|tb| {
                let dest = self.rels[&tb.relid]
                    .dest
                    .clone()
                    .expect("mapped before folding");
                (dest, tb)
            })
            .collect();
        let parts = partition(tables, connections, &folded.arena);
        (Arc::new(folded.arena), parts)
    }

    /// Hands what the folder holds to the writer as a slice of the open target transaction.
    async fn flush(
        &mut self,
        config: &ReplayConfig,
        batch: &mut Batch,
        report: &mut ReplayReport,
    ) -> Result<Result<(), Pass>, ReplayError> {
        let (arena, parts) = self.take_tables(batch);
        let job = Job {
            begin: !std::mem::replace(&mut batch.begun, true),
            arena,
            parts,
            commit: None,
            until: batch.last_end,
        };
        self.submit(config, report, job).await
    }

    /// Sends BEGIN now if the batch's transaction has not been started on the server
    /// (strict mode, and before a TRUNCATE). Leaves the writer idle.
    async fn begin_now(
        &mut self,
        config: &ReplayConfig,
        report: &mut ReplayReport,
        batch: &mut Batch,
    ) -> Result<Result<(), Pass>, ReplayError> {
        if let Err(p) = self.idle(config, report).await? {
            return Ok(Err(p));
        }
        if !batch.begun {
            // One connection from here to the commit: no part can wait for another, so no
            // lock timeout either.
            let begin = if self.connections > 1 {
                "BEGIN; SET LOCAL lock_timeout = 0"
            } else {
                "BEGIN"
            };
            self.writer()
                .main()
                .client
                .batch_execute(begin)
                .await
                .map_err(sql("BEGIN on the target"))?;
            batch.begun = true;
        }
        Ok(Ok(()))
    }

    /// Accounts for a batch whose COMMIT the target confirmed.
    fn committed(&mut self, config: &ReplayConfig, report: &mut ReplayReport, c: Committed) {
        report.applied_lsn = c.end;
        report.changes += c.changes;
        report.transactions += c.transactions;
        report.batches += 1;
        if let Some(p) = &mut self.progress {
            p.last_commit_us = c.commit_us.or(p.last_commit_us);
            p.maybe_print(config, report, false);
        }
    }

    fn writer(&mut self) -> &mut Writer {
        match &mut self.slot {
            Slot::Idle(w) => w,
            _ => unreachable!("the writer is used only when idle"),
        }
    }

    /// Waits for the job in flight, if any, and takes its outcome into account. `Err(Pass)`:
    /// it failed and was rolled back; retry from the applied position in strict order.
    async fn idle(
        &mut self,
        config: &ReplayConfig,
        report: &mut ReplayReport,
    ) -> Result<Result<(), Pass>, ReplayError> {
        if !matches!(self.slot, Slot::Busy(_)) {
            return Ok(Ok(()));
        }
        let Slot::Busy(handle) = std::mem::replace(&mut self.slot, Slot::Gone) else {
            unreachable!("checked above")
        };
        let waiting = Instant::now();
        let (writer, outcome, busy, arena) = handle
            .await
            .map_err(|e| ReplayError::Writer(e.to_string()))?;
        if arena.is_some() {
            self.spare_arena = arena;
        }
        report.applier_wait_secs += waiting.elapsed().as_secs_f64();
        report.writer_busy_secs += busy.as_secs_f64();
        self.slot = Slot::Idle(writer);
        match outcome {
            Ok(Some(c)) => self.committed(config, report, c),
            Ok(None) => {}
            Err((WriteError::Db(e), until)) => {
                tracing::warn!("set-based batch failed ({e}); replaying it in strict source order");
                return Ok(Err(Pass::Retry { until }));
            }
            Err((WriteError::Mismatch(m), until)) => {
                tracing::warn!(
                    "a {} on {} affected {} row(s), the batch expected {}; replaying the batch in \
                     strict source order",
                    m.statement,
                    m.table,
                    m.found,
                    m.expected
                );
                return Ok(Err(Pass::Retry { until }));
            }
            Err((WriteError::Fatal(e), _)) => return Err(e),
        }
        Ok(Ok(()))
    }

    /// Starts `job` on the writer in the background (after the previous one finished): the
    /// applier reads and folds the next batch while the target executes this one.
    async fn submit(
        &mut self,
        config: &ReplayConfig,
        report: &mut ReplayReport,
        job: Job,
    ) -> Result<Result<(), Pass>, ReplayError> {
        if let Err(p) = self.idle(config, report).await? {
            return Ok(Err(p));
        }
        let Slot::Idle(mut w) = std::mem::replace(&mut self.slot, Slot::Gone) else {
            unreachable!("idle above")
        };
        let buffer_id = self.buffer_id.clone();
        self.slot = Slot::Busy(tokio::spawn(async move {
            let started = Instant::now();
            let outcome = match w.run(&job, &buffer_id).await {
                Ok(()) => Ok(job.commit),
                Err(e) => {
                    w.rollback().await;
                    Err((e, job.until))
                }
            };
            let busy = started.elapsed();
            // The arena goes back to the applier for a later batch (no fresh pages per batch).
            (w, outcome, busy, Arc::try_unwrap(job.arena).ok())
        }));
        Ok(Ok(()))
    }
}

/// A target connection and its prepared statements (keyed by their text).
struct Conn {
    client: Arc<Client>,
    statements: HashMap<String, tokio_postgres::Statement>,
}

/// The target connections a batch is written over: `conns[0]` is the main one (BEGIN at the
/// batch's start, the progress row, strict order, TRUNCATE); the others take their share of
/// the rows. Owned by the applier when idle, or by the background task running one [`Job`].
struct Writer {
    conns: Vec<Conn>,
    /// Which helper connections (index ≥ 1) have BEGIN in the open target transaction; the
    /// main one's is tracked by the batch, and `open[0]` is unused.
    open: Vec<bool>,
}

/// One slice (or the end) of the open target transaction, written in the background.
///
/// Ordering contract: one job at a time, in submission order; the applier sends nothing else
/// to the target while a job runs. Within a job each connection writes its own share of the
/// keys in the order a synchronous applier would (deletes, updates, upserts per table), and
/// no two connections write the same key; a failure on any connection is noticed before the
/// next job (nothing after a failed job is sent, and the whole target transaction is rolled
/// back on every connection).
struct Job {
    /// Send BEGIN first (the batch's first slice).
    begin: bool,
    /// The bytes the folded tables' values point into.
    arena: Arc<Arena>,
    /// The folded tables, one list per connection ([`partition`]).
    parts: Vec<Vec<(Dest, TableBatch)>>,
    /// Record progress and COMMIT after the tables.
    commit: Option<Committed>,
    /// A failure is retried in strict source order up to here.
    until: Lsn,
}

/// What a committed batch covered; accounted for once the target confirmed the COMMIT.
#[derive(Clone, Copy, Debug)]
struct Committed {
    end: Lsn,
    /// Row changes it held.
    changes: u64,
    transactions: u64,
    commit_us: Option<i64>,
}

type JobOutcome = Result<Option<Committed>, (WriteError, Lsn)>;

enum Slot {
    Idle(Writer),
    Busy(tokio::task::JoinHandle<(Writer, JobOutcome, Duration, Option<Arena>)>),
    /// Only while switching between the two.
    Gone,
}

impl Writer {
    fn main(&mut self) -> &mut Conn {
        &mut self.conns[0]
    }

    /// A connection other than the main one has part of the open target transaction.
    fn helpers_open(&self) -> bool {
        self.open.iter().skip(1).any(|&o| o)
    }

    /// Ends the open target transaction on every connection without committing (a failed
    /// statement already aborted it; the server then only warns).
    async fn rollback(&mut self) {
        for (k, (conn, open)) in self.conns.iter().zip(self.open.iter_mut()).enumerate() {
            if k == 0 || *open {
                let _ = conn.client.batch_execute("ROLLBACK").await;
            }
            *open = false;
        }
    }

    /// Writes one job: every connection's share at once, then (with `commit`) the progress
    /// row and COMMIT — two-phase over every connection that took part, the main one last.
    async fn run(&mut self, job: &Job, buffer_id: &str) -> Result<(), WriteError> {
        if job.begin {
            self.conns[0].client.batch_execute("BEGIN").await?;
        }
        let until = job.until;
        let arena = &*job.arena;
        let mut writes = Vec::new();
        for (k, (conn, tables)) in self.conns.iter_mut().zip(&job.parts).enumerate() {
            if tables.is_empty() {
                continue;
            }
            let begin = k > 0 && !self.open[k];
            if k > 0 {
                self.open[k] = true;
            }
            writes.push(async move {
                if begin {
                    conn.client.batch_execute("BEGIN").await?;
                }
                for (dest, tb) in tables {
                    match dest {
                        Dest::Same(t) => conn.write_table(t, tb, arena).await?,
                        Dest::Mapped(p) => conn.write_mapped(p, tb, arena, until).await?,
                    }
                }
                Ok::<(), WriteError>(())
            });
        }
        first_error(futures_util::future::join_all(writes).await)?;
        let Some(c) = &job.commit else {
            return Ok(());
        };
        let end = c.end.to_string();
        if !self.helpers_open() {
            let main = &self.conns[0].client;
            main.execute(target::RECORD_PROGRESS, &[&buffer_id, &end])
                .await?;
            main.batch_execute("COMMIT").await?;
            return Ok(());
        }
        // Phase one: every part prepared, each with its progress record. The main connection
        // always has the transaction open here (its BEGIN came with the batch's first job or
        // from `begin_now`).
        let parts: Vec<usize> = (0..self.conns.len())
            .filter(|&k| k == 0 || self.open[k])
            .collect();
        let gids: Vec<String> = parts
            .iter()
            .map(|&k| target::prepared_gid(buffer_id, c.end, k, parts.len()))
            .collect();
        let prepares = parts.iter().zip(&gids).map(|(&k, gid)| {
            let client = &self.conns[k].client;
            let end = &end;
            async move {
                if k == 0 {
                    client
                        .execute(target::RECORD_PROGRESS, &[&buffer_id, end])
                        .await?;
                } else {
                    let part = k as i32;
                    client
                        .execute(target::RECORD_PART, &[&buffer_id, &part, end])
                        .await?;
                }
                client
                    .batch_execute(&format!("PREPARE TRANSACTION {}", quote_literal(gid)))
                    .await
            }
        });
        let prepared = futures_util::future::join_all(prepares).await;
        if prepared.iter().any(Result::is_err) {
            for ((&k, gid), outcome) in parts.iter().zip(&gids).zip(&prepared) {
                let client = &self.conns[k].client;
                let _ = match outcome {
                    Ok(()) => {
                        client
                            .batch_execute(&format!("ROLLBACK PREPARED {}", quote_literal(gid)))
                            .await
                    }
                    Err(_) => client.batch_execute("ROLLBACK").await,
                };
                self.open[k] = false;
            }
            let e = prepared
                .into_iter()
                .find_map(Result::err)
                .expect("one failed");
            return Err(WriteError::Db(e));
        }
        self.open.iter_mut().for_each(|o| *o = false);
        // Phase two: decided. Helpers first, the main part (walshift.applied) last.
        let commits = parts
            .iter()
            .zip(&gids)
            .filter(|(k, _)| **k != 0)
            .map(|(&k, gid)| {
                let client = &self.conns[k].client;
                async move {
                    client
                        .batch_execute(&format!("COMMIT PREPARED {}", quote_literal(gid)))
                        .await
                }
            });
        let mut outcomes = futures_util::future::join_all(commits).await;
        outcomes.push(
            self.conns[0]
                .client
                .batch_execute(&format!("COMMIT PREPARED {}", quote_literal(&gids[0])))
                .await,
        );
        if let Some(e) = outcomes.into_iter().find_map(Result::err) {
            return Err(WriteError::Fatal(ReplayError::Sql {
                context: format!(
                    "COMMIT PREPARED of the batch ending at {} failed after every part was \
                     prepared; the batch is decided: start replay again and it commits what is \
                     left (prepared transactions \"walshift … {}\" on the target)",
                    c.end, buffer_id
                ),
                source: e,
            }));
        }
        Ok(())
    }
}

/// The first failure of a set of parts, a fatal one before a server error.
fn first_error(outcomes: Vec<Result<(), WriteError>>) -> Result<(), WriteError> {
    let mut db = None;
    for o in outcomes {
        match o {
            Ok(()) => {}
            Err(WriteError::Fatal(e)) => return Err(WriteError::Fatal(e)),
            Err(e) => db = db.or(Some(e)),
        }
    }
    db.map_or(Ok(()), Err)
}

/// Splits folded tables over `n` connections by a hash of each row's key (a row's delete,
/// update and upsert all land on the same connection, so parts write disjoint keys). Tables
/// replayed in order and tables without a key go whole to the main connection.
fn partition(
    tables: Vec<(Dest, TableBatch)>,
    n: usize,
    arena: &Arena,
) -> Vec<Vec<(Dest, TableBatch)>> {
    let mut parts: Vec<Vec<(Dest, TableBatch)>> = (0..n.max(1)).map(|_| Vec::new()).collect();
    for (dest, tb) in tables {
        let shape = dest.shape(tb.relid);
        if n <= 1 || tb.ordered || shape.identity_full_without_key || shape.key.is_empty() {
            parts[0].push((dest, tb));
            continue;
        }
        let mut split: Vec<TableBatch> = (0..n).map(|_| tb.empty_like()).collect();
        for k in tb.deletes() {
            split[part_of(arena, k.iter().copied(), n)]
                .deletes
                .extend_from_slice(k);
        }
        for (k, row) in tb.updates() {
            let t = &mut split[part_of(arena, k.iter().copied(), n)];
            t.update_keys.extend_from_slice(k);
            t.update_rows.extend_from_slice(row);
        }
        for row in tb.upserts() {
            let t = &mut split[part_of(arena, shape.key.iter().map(|&i| row[i]), n)];
            t.upserts.extend_from_slice(row);
        }
        for (p, t) in split.into_iter().enumerate() {
            if !t.is_empty() {
                parts[p].push((dest.clone(), t));
            }
        }
    }
    parts
}

/// Which of `n` connections writes the row with this key (FNV-1a over the key's values).
fn part_of(arena: &Arena, key: impl Iterator<Item = Val>, n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in key {
        let (tag, bytes): (u8, &[u8]) = match arena.get(v) {
            Some(b) => (1, b),
            None => (0, &[]),
        };
        for &b in std::iter::once(&tag).chain(bytes) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % n as u64) as usize
}

/// One statement parameter: column `col` of `sql`'s table holding `values`, in its binary
/// form ([`super::params`]) when every value has one, else as text. Returns the array type the
/// statement declares for it, and the array.
fn param<'a>(
    sql: &super::sql::TableSql,
    col: usize,
    values: impl Iterator<Item = Option<&'a [u8]>> + Clone,
) -> (&'static str, EncodedArray) {
    let wire = Wire::for_type(&sql.columns[col].type_sql);
    match params::encode_array(wire, values.clone()) {
        Some(a) => (wire.array_type(), a),
        None => (Wire::Text.array_type(), params::encode_text(values)),
    }
}

/// Text parameters (statements through a mapping declare every parameter `text[]`).
fn text_params<'a, I>(columns: impl Iterator<Item = I>) -> Vec<EncodedArray>
where
    I: Iterator<Item = Option<&'a [u8]>> + Clone,
{
    columns.map(params::encode_text).collect()
}

impl Conn {
    async fn statement(
        &mut self,
        text: String,
    ) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.get(&text) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&text).await?;
        self.statements.insert(text, s.clone());
        Ok(s)
    }

    /// Writes a folded table with the fold's statements, each checked to affect exactly the
    /// rows it names (see [`crate::apply`]).
    async fn write_table(
        &mut self,
        table: &MappedTable,
        tb: &TableBatch,
        arena: &Arena,
    ) -> Result<(), WriteError> {
        if tb.ordered {
            for c in &tb.original {
                self.apply_one_same(table, c).await?;
            }
            return Ok(());
        }
        let sql = &table.sql;
        let key_cols = &sql.key;
        if !tb.deletes.is_empty() {
            let rows = in_key_order(sql, arena, (0..tb.delete_count()).collect(), |n| {
                tb.delete(n)[0]
            });
            let params: Vec<(&str, EncodedArray)> = (0..key_cols.len())
                .map(|j| {
                    param(
                        sql,
                        key_cols[j],
                        rows.iter().map(|&n| arena.get(tb.delete(n)[j])),
                    )
                })
                .collect();
            let found = self.write(sql.delete(&types(&params)), &params).await?;
            expect_rows(&table.name, "set-based DELETE", rows.len(), found)?;
        }
        // Partial updates, grouped by which columns they know.
        let mut groups: HashMap<Vec<usize>, Vec<usize>> = HashMap::new();
        let mut set: Vec<usize> = Vec::new();
        for (n, (old_key, row)) in tb.updates().enumerate() {
            // Key columns are set only when the row moves: rewriting an unchanged key would
            // only cost index work.
            let moved = key_cols
                .iter()
                .zip(old_key)
                .any(|(&c, &k)| !(row[c].is_known() && arena.same(row[c], k)));
            set.clear();
            set.extend(
                (0..row.len()).filter(|&i| row[i].is_known() && (moved || !key_cols.contains(&i))),
            );
            match groups.get_mut(set.as_slice()) {
                Some(members) => members.push(n),
                None => {
                    groups.insert(set.clone(), vec![n]);
                }
            }
        }
        for (set, members) in groups {
            // An empty `set` (nothing but an unchanged key) still runs: the row must be there.
            let members = in_key_order(sql, arena, members, |n| tb.update_key(n)[0]);
            let mut params: Vec<(&str, EncodedArray)> = Vec::new();
            for (j, &c) in key_cols.iter().enumerate() {
                let values = members.iter().map(|&n| arena.get(tb.update_key(n)[j]));
                params.push(param(sql, c, values));
            }
            for &c in &set {
                let values = members.iter().map(|&n| arena.get(tb.update_row(n)[c]));
                params.push(param(sql, c, values));
            }
            let found = self
                .write(sql.update(&set, &types(&params)), &params)
                .await?;
            expect_rows(&table.name, "set-based UPDATE", members.len(), found)?;
        }
        // Rows whose key is free at this point: a plain INSERT (no speculative insertion).
        if tb.upsert_count() > 0 {
            let rows = in_key_order(sql, arena, (0..tb.upsert_count()).collect(), |n| {
                tb.upsert(n)[key_cols[0]]
            });
            let params: Vec<(&str, EncodedArray)> = (0..sql.columns.len())
                .map(|c| param(sql, c, rows.iter().map(|&n| arena.get(tb.upsert(n)[c]))))
                .collect();
            let found = self.write(sql.insert(&types(&params)), &params).await?;
            expect_rows(&table.name, "set-based INSERT", rows.len(), found)?;
        }
        Ok(())
    }

    /// Prepares (once per text) and executes a set-based statement.
    async fn write(
        &mut self,
        text: String,
        params: &[(&str, EncodedArray)],
    ) -> Result<u64, tokio_postgres::Error> {
        let stmt = self.statement(text).await?;
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|(_, a)| a as &(dyn ToSql + Sync))
            .collect();
        self.client.execute(&stmt, &refs).await
    }

    /// Executes with every parameter given as an encoded array.
    async fn execute_arrays(
        &self,
        stmt: &tokio_postgres::Statement,
        params: &[EncodedArray],
    ) -> Result<u64, tokio_postgres::Error> {
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        self.client.execute(stmt, &refs).await
    }

    /// One change, in source order (strict mode, and tables that cannot be folded).
    async fn apply_one(
        &mut self,
        dest: &Dest,
        change: &Change,
        lsn: Lsn,
    ) -> Result<(), WriteError> {
        match dest {
            Dest::Same(t) => self.apply_one_same(t, change).await,
            Dest::Mapped(p) => self.apply_one_mapped(p, change, lsn).await,
        }
    }

    /// One change, one statement, onto the same-named table; the statement must affect
    /// exactly one row.
    async fn apply_one_same(
        &mut self,
        table: &MappedTable,
        change: &Change,
    ) -> Result<(), WriteError> {
        let key_of = |row: &[Value]| -> Vec<Option<String>> {
            table
                .sql
                .key
                .iter()
                .map(|&k| text(&row[k]).map(str::to_owned))
                .collect()
        };
        match change {
            Change::Insert { new } => {
                let stmt = self.statement(table.sql.insert_one()).await?;
                let vals: Vec<Option<&str>> = new.iter().map(text).collect();
                let params: Vec<&(dyn ToSql + Sync)> =
                    vals.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                let found = self.client.execute(&stmt, &params).await?;
                expect_rows(&table.name, "INSERT", 1, found)?;
            }
            Change::Delete { old } => {
                let (stmt, vals): (_, Vec<Option<String>>) = if table.full_row_identity {
                    (
                        self.statement(table.sql.delete_one_full_row()).await?,
                        old.iter().map(|v| text(v).map(str::to_owned)).collect(),
                    )
                } else {
                    (self.statement(table.sql.delete_one()).await?, key_of(old))
                };
                let params: Vec<&(dyn ToSql + Sync)> =
                    vals.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                let found = self.client.execute(&stmt, &params).await?;
                expect_rows(&table.name, "DELETE", 1, found)?;
            }
            Change::Update { old, new } => {
                let set: Vec<usize> = new
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| matches!(v, ColumnValue::Known(_)))
                    .map(|(i, _)| i)
                    .collect();
                let mut vals: Vec<Option<String>> = if table.full_row_identity {
                    old.as_ref()
                        .map(|o| o.iter().map(|v| text(v).map(str::to_owned)).collect())
                        .unwrap_or_default()
                } else {
                    match old {
                        Some(o) => key_of(o),
                        None => table
                            .sql
                            .key
                            .iter()
                            .map(|&k| match &new[k] {
                                ColumnValue::Known(v) => text(v).map(str::to_owned),
                                ColumnValue::UnchangedToast => None,
                            })
                            .collect(),
                    }
                };
                vals.extend(set.iter().map(|&c| match &new[c] {
                    ColumnValue::Known(v) => text(v).map(str::to_owned),
                    ColumnValue::UnchangedToast => None,
                }));
                let stmt = if table.full_row_identity {
                    self.statement(table.sql.update_one_full_row(&set)).await?
                } else {
                    self.statement(table.sql.update_one(&set)).await?
                };
                let params: Vec<&(dyn ToSql + Sync)> =
                    vals.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                let found = self.client.execute(&stmt, &params).await?;
                expect_rows(&table.name, "UPDATE", 1, found)?;
            }
        }
        Ok(())
    }
}

/// `rows` (indices into a batch list) in the order a statement should visit them: by key
/// (`key(n)`: row `n`'s key value) when the key is one integer column, so the target walks its index and heap pages in order
/// instead of at random; as folded otherwise. Any order is correct (the fold's contract).
fn in_key_order(
    sql: &super::sql::TableSql,
    arena: &Arena,
    mut rows: Vec<usize>,
    key: impl Fn(usize) -> Val,
) -> Vec<usize> {
    let [k] = sql.key[..] else {
        return rows;
    };
    if !matches!(
        Wire::for_type(&sql.columns[k].type_sql),
        Wire::Int8 | Wire::Int4 | Wire::Int2
    ) {
        return rows;
    }
    let number = |n: usize| {
        arena
            .get(key(n))
            .and_then(params::parse_int)
            .unwrap_or(i64::MAX)
    };
    let mut keyed: Vec<(i64, usize)> = rows.iter().map(|&n| (number(n), n)).collect();
    keyed.sort_unstable();
    rows.clear();
    rows.extend(keyed.into_iter().map(|(_, n)| n));
    rows
}

/// The array types the statement declares, one per parameter.
fn types(params: &[(&'static str, EncodedArray)]) -> Vec<&'static str> {
    params.iter().map(|(t, _)| *t).collect()
}

/// A value as the text parameter it travels as. Checked to be UTF-8 when it was decoded.
fn text(v: &Value) -> Option<&str> {
    v.as_ref()
        .map(|b| std::str::from_utf8(b).expect("checked in intern_row"))
}

fn describe_change(dest: &Dest, change: &Change) -> String {
    let (names, key_cols): (Vec<&str>, &[usize]) = match dest {
        Dest::Same(t) => (
            t.sql.columns.iter().map(|c| c.name.as_str()).collect(),
            &t.sql.key,
        ),
        Dest::Mapped(p) => (
            p.source.columns.iter().map(|c| c.name.as_str()).collect(),
            &p.key,
        ),
    };
    // A table without a key is described by its whole row.
    let all: Vec<usize> = (0..names.len()).collect();
    let (what, key_cols) = if key_cols.is_empty() {
        ("row", &all[..])
    } else {
        ("key", key_cols)
    };
    let key = |row: &[Value]| {
        key_cols
            .iter()
            .map(|&k| format!("{}={}", names[k], text(&row[k]).unwrap_or("NULL")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let new_key = |new: &[ColumnValue]| {
        key_cols
            .iter()
            .map(|&k| match &new[k] {
                ColumnValue::Known(v) => format!("{}={}", names[k], text(v).unwrap_or("NULL")),
                ColumnValue::UnchangedToast => format!("{}=(unchanged)", names[k]),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match change {
        Change::Insert { new } => format!("INSERT of {what} ({})", key(new)),
        Change::Delete { old } => format!("DELETE of {what} ({})", key(old)),
        Change::Update { old: Some(o), .. } => format!("UPDATE of {what} ({})", key(o)),
        Change::Update { old: None, new } => format!("UPDATE of {what} ({})", new_key(new)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::sql::{TableSql, TargetColumn};
    use proptest::prelude::*;

    fn table() -> Dest {
        let col = |name: &str| TargetColumn {
            name: name.into(),
            type_sql: "text".into(),
            always_identity: false,
            compare_as_text: false,
        };
        Dest::Same(MappedTable {
            sql: TableSql {
                qualified: "\"public\".\"t\"".into(),
                columns: vec![col("a"), col("k"), col("v")],
                key: vec![1],
            },
            name: "public.t".into(),
            full_row_identity: false,
        })
    }

    proptest! {
        /// Every row lands on exactly one connection, and a key's delete, update and upsert
        /// land on the same one.
        #[test]
        fn partition_keeps_every_row_and_each_key_on_one_connection(
            deletes in proptest::collection::vec(0u16..300, 0..60),
            updates in proptest::collection::vec(0u16..300, 0..60),
            upserts in proptest::collection::vec(0u16..300, 0..60),
            n in 1usize..4,
        ) {
            let mut arena = Arena::default();
            let mut key = |k: u16| arena.push(Some(k.to_string().as_bytes()));
            let mut tb = TableBatch {
                relid: 1,
                key_width: 1,
                columns: 3,
                ..TableBatch::default()
            };
            for &k in &deletes {
                tb.deletes.push(key(k));
            }
            for &k in &updates {
                let kv = key(k);
                tb.update_keys.push(kv);
                tb.update_rows.extend([Val::NULL, kv, Val::UNCHANGED_TOAST]);
            }
            for &k in &upserts {
                let kv = key(k);
                tb.upserts.extend([Val::NULL, kv, key(7)]);
            }
            let parts = partition(vec![(table(), tb.clone())], n, &arena);
            prop_assert_eq!(parts.len(), n);
            let bytes = |v: Val| arena.get(v).unwrap().to_vec();
            let mut home: HashMap<Vec<u8>, usize> = HashMap::new();
            let (mut d, mut u, mut i) = (0, 0, 0);
            for (p, tables) in parts.iter().enumerate() {
                for (_, t) in tables {
                    prop_assert_eq!(t.update_keys.len(), t.update_count());
                    let keys = t.deletes().map(|k| bytes(k[0]))
                        .chain(t.updates().map(|(k, r)| {
                            assert_eq!(k[0], r[1]);
                            bytes(k[0])
                        }))
                        .chain(t.upserts().map(|r| bytes(r[1])));
                    for k in keys {
                        prop_assert_eq!(*home.entry(k).or_insert(p), p);
                    }
                    d += t.delete_count();
                    u += t.update_count();
                    i += t.upsert_count();
                }
            }
            prop_assert_eq!((d, u, i), (tb.delete_count(), tb.update_count(), tb.upsert_count()));
        }
    }

    #[test]
    fn ordered_and_keyless_tables_stay_on_the_main_connection() {
        let tb = TableBatch {
            relid: 1,
            ordered: true,
            ..TableBatch::default()
        };
        let parts = partition(vec![(table(), tb)], 3, &Arena::default());
        assert_eq!(parts[0].len(), 1);
        assert!(parts[1].is_empty() && parts[2].is_empty());
    }
}
