//! Verification at cutover: after the drain, with the source fenced, the target must hold what
//! the source holds. `counts` compares row counts per published table; `checksum` also
//! compares an order-independent checksum per table. [`phase`] is what the orchestrator runs.
//!
//! Without a migration mapping (identity), each source table is compared with the target table
//! the [`TableMap`] names, column by column of the same names; a table the map splits or drops
//! is reported as not comparable. Most of the window used to go here, so the two sides are
//! read concurrently, each over [`SESSIONS_PER_SIDE`] sessions of its own opened in preflight
//! (outside the window; the source's are spared by the fence): the source's reading starts as
//! soon as the fence is up ([`start_source`]) — fenced, the source cannot move — and runs while
//! the drain waits for the marker; the target's starts when the drain is done
//! ([`start_target`]) and runs while sequences are set; [`phase`] waits for both. On each side
//! one session exports a `REPEATABLE READ` snapshot and the others import it, so a side is read
//! as of one moment whichever session reads which table. Every statement is limited on the
//! server to what is left of the window; the sessions are closed when the phase ends, and on
//! abort.
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

/// Sessions verify opens on each side before the fence. Default 2: the published tables are
/// spread over them, so the small tables are read while one session reads the largest (which
/// the server may read with parallel workers of its own). More sessions help with many large
/// tables on servers with cores to spare; each is one more backend on each side for the length
/// of the cutover.
pub const SESSIONS_PER_SIDE: usize = 2;

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

/// Count (and checksum) of every table of one side at one snapshot, over `clients`: the first
/// session opens a `REPEATABLE READ READ ONLY` transaction and exports its snapshot, the others
/// import it (`SET TRANSACTION SNAPSHOT`), so the whole side is read as of one moment however
/// the tables are spread; each session takes the next table until none is left. Every
/// statement is limited to `timeout` on the server.
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
    let workers = clients.len().min(tables.len());
    let begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
    let limit = format!(
        "SET LOCAL statement_timeout = {}",
        timeout.as_millis().clamp(1, i32::MAX as u128)
    );
    let mut snapshot = None;
    if workers > 1 {
        let answer = leader
            .simple_query(&format!("{begin}; {limit}; SELECT pg_export_snapshot()"))
            .await
            .with_sql_context(|| context("starting the read"))?;
        snapshot = answer.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.try_get(0).ok().flatten().map(str::to_owned),
            _ => None,
        });
        if snapshot.is_none() {
            return Err(CheckError::Answer {
                side: side.as_str(),
                what: "pg_export_snapshot()".into(),
                detail: "no snapshot id".into(),
            });
        }
    } else {
        leader
            .batch_execute(&format!("{begin}; {limit}"))
            .await
            .with_sql_context(|| context("starting the read"))?;
    }
    let next = AtomicUsize::new(0);
    let read = clients[..workers].iter().enumerate().map(|(w, client)| {
        let (next, snapshot, limit) = (&next, &snapshot, &limit);
        async move {
            if w > 0 {
                let id = quote_literal(snapshot.as_deref().unwrap_or_default());
                client
                    .batch_execute(&format!("{begin}; SET TRANSACTION SNAPSHOT {id}; {limit}"))
                    .await
                    .with_sql_context(|| context("sharing the snapshot"))?;
            }
            let mut out: Vec<(usize, Summary)> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((name, columns)) = tables.get(i) else {
                    break;
                };
                let sql = crate::verify::table_summary_sql(name, columns, checksum);
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
                out.push((i, (n, checksum.then_some(sum))));
            }
            Ok::<_, CheckError>(out)
        }
    });
    let done = try_join_all(read).await?;
    try_join_all(clients[..workers].iter().map(|c| c.batch_execute("COMMIT")))
        .await
        .with_sql_context(|| context("ending the read"))?;
    let mut out: Vec<Option<Summary>> = vec![None; tables.len()];
    for (i, summary) in done.into_iter().flatten() {
        out[i] = Some(summary);
    }
    Ok(out.into_iter().flatten().collect())
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
    /// Opens [`SESSIONS_PER_SIDE`] sessions on each side when the comparison without a mapping
    /// will run (`counts` or `checksum`); none otherwise (with a mapping, verify reads through
    /// cutover's own two sessions).
    pub(super) async fn open(config: &super::CutoverConfig) -> Result<Sessions, CutoverError> {
        if config.verify == VerifyMode::None || config.transform.is_some() {
            return Ok(Sessions::default());
        }
        let ((source, source_pids), (target, _)) = tokio::try_join!(
            open_side(&config.source, Side::Source),
            open_side(&config.target, Side::Target)
        )?;
        Ok(Sessions {
            source,
            target,
            source_pids,
            tables: None,
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
) -> Result<(Vec<Client>, Vec<i32>), CutoverError> {
    let clients = try_join_all((0..SESSIONS_PER_SIDE).map(|_| conn.connect())).await?;
    let setup = format!(
        "SET application_name = {}; {SESSION_SETTINGS}; SELECT pg_backend_pid()",
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
    let publication = ctx.config.publication.clone();
    let map = ctx.table_map.clone();
    let checksum = ctx.config.verify == VerifyMode::Checksum;
    s.tables = Some(rx);
    s.source_reading = Some(tokio::spawn(async move {
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
    s.target_reading = Some(tokio::spawn(async move {
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
                "{} → {}: {} vs {} rows",
                c.source, c.target, c.source_rows, c.target_rows
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
            "; source read in {:.1} ms from the fence, target in {:.1} ms from the drain",
            source.as_secs_f64() * 1000.0,
            target.as_secs_f64() * 1000.0
        ));
    }
    ctx.tl.end(&mut ctx.report, note);
    Ok(())
}
