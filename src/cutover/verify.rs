//! Verification at cutover: after the drain, with the source fenced, the target must hold what
//! the source holds. `counts` compares row counts per published table; `checksum` also
//! compares an order-independent checksum per table. [`phase`] is what the orchestrator runs.
//!
//! Without a migration mapping (identity), each source table is compared with the target table
//! the [`TableMap`] names, column by column of the same names; a table the map splits or drops
//! is reported as not comparable. Most of the window goes here, so the two sides are read
//! concurrently, each over sessions of its own opened in preflight (outside the window; the
//! source's are spared by the fence; [`super::CutoverConfig::verify_sessions`], default one):
//! the source's reading starts as soon as the fenced sessions are gone ([`start_source`]) —
//! fenced, the source cannot move — and runs while the marker is written and drained; the
//! target's starts when the drain is done ([`start_target`]) and runs while sequences are set;
//! [`phase`] waits for both. A dry run reads the target only once the source's reading has
//! ended, so each is timed alone (`super::projection::window`). On each side one session exports a `REPEATABLE READ` snapshot and
//! the others import it, so a side is read as of one moment whichever session reads which
//! part; with several sessions a large table is cut into page ranges ([`plan_parts`]), one per
//! session. The sessions leave the servers' parallel workers off: they are the reading's
//! parallelism. Every statement is limited on the server to what is left of the window; the
//! sessions are closed when the phase ends, and on abort.
//!
//! With a mapping, [`verify_mapped`] hands over to [`crate::verify::verify`], which compares
//! every target table with the source *through* the mapping (expressions, filters, split
//! tables; counts only unless `checksum`), on cutover's own two sessions.
//!
//! The checksum is verify's ([`crate::verify::table_summary_sql`]): the sum of the first 64
//! bits of the md5 of each row's text over the source's columns in their order — the same on
//! any PostgreSQL version, so a cutover between major versions compares too — computed on both
//! sides in sessions with the same `TimeZone`, `DateStyle`, `IntervalStyle` and
//! `extra_float_digits` ([`SESSION_SETTINGS`]), so equal rows give equal text.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::try_join_all;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::journal::Step;
use super::report::TableCheck;
use super::sequences::TableMap;
use super::{Ctx, CutoverError};
use crate::sql::{quote_literal, quote_qualified};
use crate::transform::{Mapping, TableName};
use crate::{SqlContext, SqlError};

/// What `--verify` compares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMode {
    /// Nothing.
    None,
    /// Row count per published table (default: cheap, catches lost or doubled rows).
    #[default]
    Counts,
    /// Row count and an order-independent checksum of every row (reads every row on both sides).
    Checksum,
}

impl VerifyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMode::None => "none",
            VerifyMode::Counts => "counts",
            VerifyMode::Checksum => "checksum",
        }
    }
}

impl std::str::FromStr for VerifyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(VerifyMode::None),
            "counts" => Ok(VerifyMode::Counts),
            "checksum" => Ok(VerifyMode::Checksum),
            _ => Err(format!(
                "unknown verify mode {s:?}: use none, counts or checksum"
            )),
        }
    }
}

/// Session settings that make row text identical on both sides.
pub const SESSION_SETTINGS: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 3";

/// The source's published tables and their columns (in attribute order).
pub async fn published_tables(
    source: &Client,
    publication: &str,
) -> Result<Vec<(String, String, Vec<String>)>, tokio_postgres::Error> {
    let rows = source
        .query(
            "SELECT p.schemaname::text, p.tablename::text, \
                    array_agg(a.attname::text ORDER BY a.attnum) \
             FROM pg_publication_tables p \
             JOIN pg_namespace n ON n.nspname = p.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             WHERE p.pubname = $1 GROUP BY 1, 2 ORDER BY 1, 2",
            &[&publication],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// [`super::CutoverConfig::verify_sessions`]'s default: sessions verify opens on each side
/// before the fence. The published tables (large ones cut into page ranges) are spread over
/// them.
pub const SESSIONS_PER_SIDE: usize = 1;

/// `application_name` of verify's sessions.
pub const APPLICATION_NAME: &str = "walshift cutover verify";

/// A published table: schema, name, columns in attribute order.
type Published = (String, String, Vec<String>);

/// Row count and checksum (checksum mode) of one table on one side.
type Summary = (i64, Option<String>);

/// Verification failures (a difference is not one: it is in the checks).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error("verifying the target through the mapping: {0}")]
    Mapped(#[from] crate::verify::VerifyError),
    #[error(
        "verifying the target: the {side} answered {what} unexpectedly ({detail}); \
         run the cutover again, and report it if it repeats"
    )]
    Answer {
        side: &'static str,
        what: String,
        detail: String,
    },
    #[error(
        "verifying the target: reading a side stopped ({0}); run the cutover again, and report \
         it if it repeats"
    )]
    Reading(String),
}

/// Compares every published table of the source with its target table(s) through `mapping`
/// (its expressions evaluated on the source read-only, volatile functions refused:
/// [`crate::verify::refuse_volatile`]): [`crate::verify::verify`], one session per side. Both
/// sessions must have run [`SESSION_SETTINGS`] and be outside a transaction. Returns one check
/// per target table; the caller decides what a difference means.
pub async fn verify_mapped(
    source: &Client,
    target: &Client,
    tables: &[Published],
    mapping: &Mapping,
    mode: VerifyMode,
) -> Result<Vec<TableCheck>, CheckError> {
    if mode == VerifyMode::None {
        return Ok(Vec::new());
    }
    let names: Vec<TableName> = tables
        .iter()
        .map(|(s, t, _)| TableName::new(s.clone(), t.clone()))
        .collect();
    let opts = crate::verify::VerifyOptions {
        max_keys: 0,
        checksums: mode == VerifyMode::Checksum,
        // The caller's session-level statement_timeout (what is left of the window) applies.
        source_statement_timeout: None,
        ..Default::default()
    };
    let report = crate::verify::verify(source, target, mapping, &names, &opts).await?;
    Ok(report
        .tables
        .into_iter()
        .map(|t| TableCheck {
            source: t.source.quoted(),
            target: t.target.quoted(),
            source_rows: t.source_rows,
            target_rows: t.target_rows,
            source_checksum: (!t.source_checksum.is_empty()).then_some(t.source_checksum),
            target_checksum: (!t.target_checksum.is_empty()).then_some(t.target_checksum),
            equal: t.equal,
        })
        .collect())
}

/// The target table a published table is compared with, or `None` when the map sends it to
/// no table or to several (not comparable table by table).
fn target_of(map: &TableMap, schema: &str, table: &str) -> Option<TableName> {
    match map.map(schema, table).as_slice() {
        [(ts, tt)] => Some(TableName::new(ts.clone(), tt.clone())),
        _ => None,
    }
}

/// Each comparable published table's name on one side, with the source's columns.
fn side_tables(tables: &[Published], map: &TableMap, side: Side) -> Vec<(TableName, Vec<String>)> {
    tables
        .iter()
        .filter_map(|(s, t, cols)| {
            let target = target_of(map, s, t)?;
            let name = match side {
                Side::Source => TableName::new(s.clone(), t.clone()),
                Side::Target => target,
            };
            Some((name, cols.clone()))
        })
        .collect()
}

/// Which server a session is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Source,
    Target,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Target => "target",
        }
    }
}

/// Tables of at least this many pages (8 MiB at the default block size) are read in page
/// ranges, one per session, so the largest table does not keep one session busy while the
/// others wait; smaller ones are read whole (a range costs a statement).
pub const SPLIT_PAGES: i64 = 1024;

/// One piece of a side's reading: a table (its index), whole or a range of its pages.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Part {
    table: usize,
    /// First page and end page (exclusive; `None`: to the table's end).
    pages: Option<(u32, Option<u32>)>,
    /// Pages it covers, by the size read at the start (for the order only).
    size: i64,
}

/// How a side's reading is cut: a table of [`SPLIT_PAGES`] or more is cut into `sessions`
/// page ranges — the last one open-ended, so rows on pages beyond the size read are counted
/// too — and the parts are read largest first. Pure: which rows a part covers never depends
/// on `sizes` being exact, only how evenly the work is spread.
fn plan_parts(sizes: &[i64], sessions: usize) -> Vec<Part> {
    let mut parts = Vec::new();
    for (table, &size) in sizes.iter().enumerate() {
        let size = size.max(0);
        if sessions < 2 || size < SPLIT_PAGES || size > i64::from(u32::MAX) {
            parts.push(Part {
                table,
                pages: None,
                size,
            });
            continue;
        }
        let step = (size as u64).div_ceil(sessions as u64) as u32;
        for k in 0..sessions as u32 {
            let first = k * step;
            let end = (k + 1 < sessions as u32).then_some(first + step);
            parts.push(Part {
                table,
                pages: Some((first, end)),
                size: i64::from(step),
            });
        }
    }
    parts.sort_by_key(|p| std::cmp::Reverse(p.size));
    parts
}

/// Adds the parts of one table: counts, and the checksums (sums of 64-bit values, as the
/// server prints a `numeric`) as integers, printed the same way whatever the cut.
fn add_parts(parts: &[(i64, Option<String>)]) -> Option<Summary> {
    let mut rows = 0i64;
    let mut sum: Option<i128> = None;
    for (n, s) in parts {
        rows = rows.checked_add(*n)?;
        if let Some(s) = s {
            sum = Some(
                sum.unwrap_or(0)
                    .checked_add(s.trim().parse::<i128>().ok()?)?,
            );
        }
    }
    Some((rows, sum.map(|s| s.to_string())))
}

/// Count (and checksum) of every table of one side at one snapshot, over `clients`: the first
/// session opens a `REPEATABLE READ READ ONLY` transaction and exports its snapshot, the others
/// import it (`SET TRANSACTION SNAPSHOT`), so the whole side is read as of one moment however
/// the tables are spread; large tables are cut into page ranges ([`plan_parts`]), and each
/// session takes the next part until none is left. Every statement is limited to `timeout` on
/// the server.
async fn summarize(
    side: Side,
    clients: &[Client],
    tables: &[(TableName, Vec<String>)],
    checksum: bool,
    timeout: Duration,
) -> Result<Vec<Summary>, CheckError> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let Some(leader) = clients.first() else {
        return Err(CheckError::Answer {
            side: side.as_str(),
            what: "opening verify's sessions".into(),
            detail: "no session".into(),
        });
    };
    let context = |what: &str| format!("verifying the target: {what} on the {}", side.as_str());
    let sessions = clients.len();
    let begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
    let limit = format!(
        "SET LOCAL statement_timeout = {}",
        timeout.as_millis().clamp(1, i32::MAX as u128)
    );
    let mut snapshot = None;
    let parts = if sessions > 1 {
        // One round trip: the snapshot to share, and each table's size in pages.
        let sizes: Vec<String> = tables
            .iter()
            .map(|(name, _)| {
                format!(
                    "coalesce(pg_relation_size(to_regclass({})) / \
                     current_setting('block_size')::bigint, 0)",
                    quote_literal(&name.quoted())
                )
            })
            .collect();
        let answer = leader
            .simple_query(&format!(
                "{begin}; {limit}; SELECT pg_export_snapshot(), {}",
                sizes.join(", ")
            ))
            .await
            .with_sql_context(|| context("starting the read"))?;
        let row = answer.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        });
        snapshot = row.and_then(|r| r.try_get(0).ok().flatten().map(str::to_owned));
        if snapshot.is_none() {
            return Err(CheckError::Answer {
                side: side.as_str(),
                what: "pg_export_snapshot()".into(),
                detail: "no snapshot id".into(),
            });
        }
        let sizes: Vec<i64> = (0..tables.len())
            .map(|i| {
                row.and_then(|r| r.try_get(i + 1).ok().flatten())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            })
            .collect();
        plan_parts(&sizes, sessions)
    } else {
        leader
            .batch_execute(&format!("{begin}; {limit}"))
            .await
            .with_sql_context(|| context("starting the read"))?;
        plan_parts(&vec![0; tables.len()], 1)
    };
    let workers = sessions.min(parts.len());
    let next = AtomicUsize::new(0);
    let read = clients[..workers].iter().enumerate().map(|(w, client)| {
        let (next, snapshot, limit, parts) = (&next, &snapshot, &limit, &parts);
        async move {
            if w > 0 {
                let id = quote_literal(snapshot.as_deref().unwrap_or_default());
                client
                    .batch_execute(&format!("{begin}; SET TRANSACTION SNAPSHOT {id}; {limit}"))
                    .await
                    .with_sql_context(|| context("sharing the snapshot"))?;
            }
            let mut out: Vec<(usize, (i64, Option<String>))> = Vec::new();
            while let Some(part) = parts.get(next.fetch_add(1, Ordering::Relaxed)) {
                let (name, columns) = &tables[part.table];
                let sql =
                    crate::verify::table_part_summary_sql(name, columns, checksum, part.pages);
                let row = client
                    .simple_query(&sql)
                    .await
                    .with_sql_context(|| context(&format!("reading {}", name.quoted())))?
                    .into_iter()
                    .find_map(|m| match m {
                        SimpleQueryMessage::Row(r) => Some(r),
                        _ => None,
                    });
                let parsed = row.as_ref().and_then(|r| {
                    let n = r.try_get(0).ok()??.parse::<i64>().ok()?;
                    Some((n, r.try_get(1).ok()??.to_owned()))
                });
                let Some((n, sum)) = parsed else {
                    return Err(CheckError::Answer {
                        side: side.as_str(),
                        what: name.quoted(),
                        detail: "no row count".into(),
                    });
                };
                out.push((part.table, (n, checksum.then_some(sum))));
            }
            Ok::<_, CheckError>(out)
        }
    });
    let done = try_join_all(read).await?;
    try_join_all(clients[..workers].iter().map(|c| c.batch_execute("COMMIT")))
        .await
        .with_sql_context(|| context("ending the read"))?;
    let mut by_table: Vec<Vec<(i64, Option<String>)>> = vec![Vec::new(); tables.len()];
    for (table, summary) in done.into_iter().flatten() {
        by_table[table].push(summary);
    }
    by_table
        .iter()
        .zip(tables)
        .map(|(parts, (name, _))| {
            add_parts(parts).ok_or_else(|| CheckError::Answer {
                side: side.as_str(),
                what: name.quoted(),
                detail: "a part's count or checksum does not add up".into(),
            })
        })
        .collect()
}

/// A side's reading, running in a task of its own (aborted, its sessions closed, when
/// [`Sessions`] is dropped).
/// It returns what it read and how long it took.
type Reading<T> = Option<JoinHandle<Result<(T, Duration), CheckError>>>;

/// verify's own sessions on both sides, opened in preflight (outside the window) and closed
/// when the verify phase ends (dropped on abort). The source's are spared by the fence and
/// start reading as soon as it is up ([`start_source`]: fenced, the source cannot move), while
/// the drain waits for the marker; the target's start once the drain is done
/// ([`start_target`]: nothing more reaches the target), while sequences are set.
#[derive(Default)]
pub(super) struct Sessions {
    source: Vec<Client>,
    target: Vec<Client>,
    source_pids: Vec<i32>,
    /// The published tables, sent by the source's reading as soon as it has listed them.
    tables: Option<oneshot::Receiver<Vec<Published>>>,
    /// Closed when the source's reading ends: a dry run's target reading waits for it.
    source_done: Option<oneshot::Receiver<()>>,
    source_reading: Reading<Vec<Summary>>,
    target_reading: Reading<(Vec<Published>, Vec<Summary>)>,
}

impl Drop for Sessions {
    fn drop(&mut self) {
        // An abort: each statement still running stops at its statement_timeout (the window).
        for task in [
            self.source_reading.as_ref().map(|t| t.abort_handle()),
            self.target_reading.as_ref().map(|t| t.abort_handle()),
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
        }
    }
}

impl Sessions {
    /// Opens [`super::CutoverConfig::verify_sessions`] sessions on each side when the comparison without a mapping
    /// will run (`counts` or `checksum`); none otherwise (with a mapping, verify reads through
    /// cutover's own two sessions).
    pub(super) async fn open(config: &super::CutoverConfig) -> Result<Sessions, CutoverError> {
        if config.verify == VerifyMode::None || config.transform.is_some() {
            return Ok(Sessions::default());
        }
        let ((source, source_pids), (target, _)) = tokio::try_join!(
            open_side(&config.source, Side::Source, config.verify_sessions),
            open_side(&config.target, Side::Target, config.verify_sessions)
        )?;
        Ok(Sessions {
            source,
            target,
            source_pids,
            tables: None,
            source_done: None,
            source_reading: None,
            target_reading: None,
        })
    }

    /// Backend pids of the source sessions: the fence must not terminate them.
    pub(super) fn source_pids(&self) -> &[i32] {
        &self.source_pids
    }

    fn is_open(&self) -> bool {
        (!self.source.is_empty() || self.source_reading.is_some())
            && (!self.target.is_empty() || self.target_reading.is_some())
    }
}

async fn open_side(
    conn: &crate::conn::ConnInfo,
    side: Side,
    sessions: usize,
) -> Result<(Vec<Client>, Vec<i32>), CutoverError> {
    let clients = try_join_all((0..sessions.max(1)).map(|_| conn.connect())).await?;
    // The sessions are the reading's parallelism: the server's own workers would compete
    // with them (and with the other side's) for the same cores.
    let setup = format!(
        "SET max_parallel_workers_per_gather = 0; SET application_name = {}; {SESSION_SETTINGS}; SELECT pg_backend_pid()",
        quote_literal(APPLICATION_NAME)
    );
    let answers = try_join_all(clients.iter().map(|c| c.simple_query(&setup)))
        .await
        .with_sql_context(|| format!("opening verify's sessions on the {}", side.as_str()))?;
    let mut pids = Vec::new();
    for m in answers.iter().flatten() {
        if let SimpleQueryMessage::Row(r) = m {
            let pid = r.try_get(0).ok().flatten();
            let Some(pid) = pid.and_then(|p| p.parse::<i32>().ok()) else {
                return Err(CheckError::Answer {
                    side: side.as_str(),
                    what: "pg_backend_pid()".into(),
                    detail: format!("{pid:?}"),
                }
                .into());
            };
            pids.push(pid);
        }
    }
    Ok((clients, pids))
}

/// Starts reading the source's side (a no-op without verify's sessions, or once started):
/// called when the fence is up. Its statements are limited to what is left of the window.
pub(super) fn start_source(ctx: &mut Ctx<'_>) {
    let remaining = ctx.remaining();
    let s = &mut ctx.verify_sessions;
    if s.source.is_empty() || s.source_reading.is_some() {
        return;
    }
    let clients = std::mem::take(&mut s.source);
    let (tx, rx) = oneshot::channel();
    let (done, done_rx) = oneshot::channel::<()>();
    let publication = ctx.config.publication.clone();
    let map = ctx.table_map.clone();
    let checksum = ctx.config.verify == VerifyMode::Checksum;
    s.tables = Some(rx);
    s.source_done = Some(done_rx);
    s.source_reading = Some(tokio::spawn(async move {
        // Dropped when the reading ends, however it ends.
        let _done = done;
        let started = std::time::Instant::now();
        let tables = published_tables(&clients[0], &publication)
            .await
            .sql_context("listing the published tables")?;
        let names = side_tables(&tables, &map, Side::Source);
        let _ = tx.send(tables);
        let summaries = summarize(Side::Source, &clients, &names, checksum, remaining).await?;
        Ok((summaries, started.elapsed()))
    }));
}

/// Starts reading the target's side (the source's first if it has not started): called when
/// the drain is done.
pub(super) fn start_target(ctx: &mut Ctx<'_>) {
    start_source(ctx);
    let remaining = ctx.remaining();
    let s = &mut ctx.verify_sessions;
    let Some(tables) = s.tables.take() else {
        return;
    };
    if s.target.is_empty() || s.target_reading.is_some() {
        return;
    }
    let clients = std::mem::take(&mut s.target);
    let map = ctx.table_map.clone();
    let checksum = ctx.config.verify == VerifyMode::Checksum;
    // A dry run reads the sides one after the other, each timed alone (see
    // `super::projection`): the real window's readings run on a fenced, idle source.
    let source_done = if ctx.config.dry_run {
        s.source_done.take()
    } else {
        None
    };
    s.target_reading = Some(tokio::spawn(async move {
        if let Some(done) = source_done {
            let _ = done.await;
        }
        let started = std::time::Instant::now();
        let Ok(tables) = tables.await else {
            return Err(CheckError::Reading(
                "it ended before listing the published tables".into(),
            ));
        };
        let names = side_tables(&tables, &map, Side::Target);
        let summaries = summarize(Side::Target, &clients, &names, checksum, remaining).await?;
        Ok(((tables, summaries), started.elapsed()))
    }));
}

/// The comparison without a mapping: waits for both sides' readings (started at the fence and
/// at the end of the drain); one check per published table, in the publication's order, and
/// how long each side's reading took.
async fn compare(
    ctx: &mut Ctx<'_>,
) -> Result<(Vec<TableCheck>, Option<(Duration, Duration)>), CutoverError> {
    if !ctx.verify_sessions.is_open() {
        ctx.verify_sessions = Sessions::open(ctx.config).await?;
    }
    start_target(ctx);
    let s = &mut ctx.verify_sessions;
    let (Some(source), Some(target)) = (&mut s.source_reading, &mut s.target_reading) else {
        return Err(CheckError::Reading("it never started".into()).into());
    };
    let (source, target) = tokio::join!(source, target);
    let joined = |e: tokio::task::JoinError| CheckError::Reading(e.to_string());
    // The source's failure first: the target's reading fails with it when it never got the
    // list of tables.
    let (source, source_took) = source.map_err(joined)??;
    let ((tables, target), target_took) = target.map_err(joined)??;
    let (mut source, mut target) = (source.into_iter(), target.into_iter());
    let mut out = Vec::with_capacity(tables.len());
    for (schema, table, _) in &tables {
        let targets = ctx.table_map.map(schema, table);
        let [(ts, tt)] = targets.as_slice() else {
            out.push(TableCheck {
                source: quote_qualified(schema, table),
                target: format!(
                    "{} target tables (not comparable table by table)",
                    targets.len()
                ),
                source_rows: -1,
                target_rows: -1,
                source_checksum: None,
                target_checksum: None,
                equal: false,
            });
            continue;
        };
        let (Some(s), Some(t)) = (source.next(), target.next()) else {
            return Err(CheckError::Reading("a table's summary is missing".into()).into());
        };
        out.push(TableCheck {
            source: quote_qualified(schema, table),
            target: quote_qualified(ts, tt),
            source_rows: s.0,
            target_rows: t.0,
            equal: s == t,
            source_checksum: s.1,
            target_checksum: t.1,
        });
    }
    Ok((out, Some((source_took, target_took))))
}

/// The comparison through a mapping, on cutover's own sessions, every statement on the source
/// limited to `remaining`.
async fn compare_mapped(
    ctx: &mut Ctx<'_>,
    mapping: &Mapping,
    remaining: Duration,
) -> Result<(Vec<TableCheck>, Option<(Duration, Duration)>), CutoverError> {
    let tables = published_tables(&ctx.src, &ctx.config.publication)
        .await
        .sql_context("listing the published tables")?;
    // The server stops with the window too: a query left running would hold this session
    // (and the unfence behind it).
    ctx.src
        .batch_execute(&format!(
            "SET statement_timeout = {}",
            remaining.as_millis().max(1)
        ))
        .await
        .sql_context("limiting verify's statements on the source to the window")?;
    let checks = verify_mapped(&ctx.src, &ctx.tgt, &tables, mapping, ctx.config.verify).await?;
    ctx.src
        .batch_execute("SET statement_timeout = 0")
        .await
        .sql_context("resetting statement_timeout on the source")?;
    Ok((checks, None))
}

/// The verify phase, inside the window: the comparison `config.verify` asks for, limited to
/// what is left of `max_window`; verify's sessions are closed when it ends. A difference
/// aborts (a dry run only warns: the source keeps writing).
pub(super) async fn phase(ctx: &mut Ctx<'_>) -> Result<(), CutoverError> {
    let config = ctx.config;
    ctx.deadline_check("verify")?;
    ctx.tl.begin("verify");
    if config.verify == VerifyMode::None {
        ctx.tl.end(&mut ctx.report, "skipped (--verify none)");
        return Ok(());
    }
    let remaining = ctx.remaining();
    let compared = match config.transform.clone() {
        Some(mapping) => {
            tokio::time::timeout(remaining, compare_mapped(ctx, &mapping, remaining)).await
        }
        None => tokio::time::timeout(remaining, compare(ctx)).await,
    };
    ctx.verify_sessions = Sessions::default();
    if let Ok(Ok((_, took))) = &compared {
        ctx.readings = *took;
    }
    let (checks, took) = match compared {
        Ok(r) => r?,
        Err(_) => {
            return Err(CutoverError::MaxWindow {
                phase: "verify".into(),
                max: config.max_window,
                elapsed: ctx.window_start.map(|s| s.elapsed()).unwrap_or_default(),
            });
        }
    };
    let differing: Vec<String> = checks
        .iter()
        .filter(|c| !c.equal)
        .map(|c| {
            format!(
                "{} → {}: {} vs {} rows{}",
                c.source,
                c.target,
                c.source_rows,
                c.target_rows,
                if c.source_rows == c.target_rows {
                    " (their checksums differ)"
                } else {
                    ""
                }
            )
        })
        .collect();
    ctx.report.verified = checks;
    if !differing.is_empty() {
        if config.dry_run {
            ctx.report.warnings.push(format!(
                "dry run: {} table(s) differ (expected while the source keeps writing): {}",
                differing.len(),
                differing.join("; ")
            ));
        } else {
            ctx.tl.end(&mut ctx.report, "differences found");
            return Err(CutoverError::VerifyFailed { tables: differing });
        }
    }
    let n = ctx.report.verified.len();
    ctx.note(Step::Verified, format!("{n} tables"));
    let mut note = format!("{n} tables");
    if let Some((source, target)) = took {
        note.push_str(&format!(
            "; source read in {:.1} ms from the fence, target in {:.1} ms {}",
            source.as_secs_f64() * 1000.0,
            target.as_secs_f64() * 1000.0,
            if config.dry_run {
                "after it (a dry run reads the sides one after the other)"
            } else {
                "from the drain"
            }
        ));
    }
    ctx.tl.end(&mut ctx.report, note);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_tables_and_one_session_read_whole() {
        let parts = plan_parts(&[10, SPLIT_PAGES - 1, 0], 2);
        assert!(parts.iter().all(|p| p.pages.is_none()));
        let parts = plan_parts(&[SPLIT_PAGES * 10], 1);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].pages, None);
    }

    #[test]
    fn a_large_table_is_cut_into_one_range_per_session_largest_first() {
        let parts = plan_parts(&[3, 3000], 3);
        let ranges: Vec<_> = parts.iter().map(|p| (p.table, p.pages)).collect();
        assert_eq!(
            ranges,
            [
                (1, Some((0, Some(1000)))),
                (1, Some((1000, Some(2000)))),
                (1, Some((2000, None))),
                (0, None)
            ]
        );
    }

    #[test]
    fn parts_add_up_as_the_server_prints_a_numeric() {
        let sum = |v: &[(i64, Option<&str>)]| {
            add_parts(
                &v.iter()
                    .map(|(n, s)| (*n, s.map(str::to_owned)))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            sum(&[
                (2, Some("-9223372036854775808")),
                (3, Some("-9223372036854775808"))
            ]),
            Some((5, Some("-18446744073709551616".into())))
        );
        assert_eq!(
            sum(&[(1, Some("7")), (0, Some("0"))]),
            Some((1, Some("7".into())))
        );
        assert_eq!(sum(&[(4, None), (6, None)]), Some((10, None)));
        assert_eq!(sum(&[(1, Some("x"))]), None);
    }

    proptest! {
        /// Every table's parts cover its pages from 0 on, without gap or overlap, the last
        /// one open-ended, whatever the sizes and the number of sessions.
        #[test]
        fn every_table_is_covered_once(
            sizes in proptest::collection::vec(0i64..50_000, 0..6),
            sessions in 1usize..6,
        ) {
            let parts = plan_parts(&sizes, sessions);
            for (t, &size) in sizes.iter().enumerate() {
                let mut mine: Vec<_> = parts.iter().filter(|p| p.table == t).collect();
                mine.sort_by_key(|p| p.pages.map(|(first, _)| first));
                if mine.len() == 1 {
                    prop_assert_eq!(mine[0].pages, None);
                    continue;
                }
                prop_assert!(sessions > 1 && size >= SPLIT_PAGES);
                prop_assert_eq!(mine.len(), sessions);
                let mut next = 0u32;
                for (i, p) in mine.iter().enumerate() {
                    let (first, end) = p.pages.expect("a range");
                    prop_assert_eq!(first, next);
                    match end {
                        Some(end) => {
                            prop_assert!(i + 1 < mine.len() && end > first);
                            next = end;
                        }
                        None => prop_assert_eq!(i + 1, mine.len()),
                    }
                }
                prop_assert!(i64::from(next) < size);
            }
            prop_assert!(parts.windows(2).all(|w| w[0].size >= w[1].size));
        }
    }
}
