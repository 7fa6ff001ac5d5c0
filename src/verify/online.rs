//! Online verify: source and target compared at one source position while writes continue.
//!
//! Per chunk (a key range of at most `chunk_rows` source rows, or a whole table that cannot
//! be cut):
//! 1. **Freeze.** A hold at the source's current WAL position `P` ([`crate::apply::hold`]);
//!    once replay reports it, it applies nothing committed at or after `P`.
//! 2. **Source point.** A temporary logical slot is created with an exported snapshot; its
//!    consistent point is `L` (≥ `P`, as the slot is created after the freeze). The chunk's
//!    source side is read in a `REPEATABLE READ` transaction that imports that snapshot, the
//!    slot is dropped right after the import.
//!
//!    **The rule.** A source transaction is in that snapshot exactly when its commit record
//!    starts before `L`: logical decoding skips a commit whose record starts (`origptr`) before
//!    the slot's start point, and pgoutput's Begin (`final_lsn`) and Commit (`commit_lsn`)
//!    carry that start. As `L` is a record boundary, that is also "the commit record ends at or
//!    before `L`" (the buffer's end LSN).
//! 3. **Durable.** A transactional logical message (prefix `walshift-verify`) committed after
//!    `L` is waited for in the capture slot's `confirmed_flush_lsn`: then every transaction
//!    committed before `L` is in the buffer.
//! 4. **Target point.** The hold moves to `L`; once replay reports it (every transaction
//!    committed before `L` applied, none after), the target transaction takes its snapshot and
//!    the hold is released: replay resumes at once, the comparison reads the snapshot.
//! 5. **Compare** the chunk as the offline verify compares a table (count and checksum, then
//!    the differing keys).
//!
//! A table is cut into key ranges when every target key column is a source column passed
//! through unchanged with the same type (`chunk_rows` rows per range, ranges by the source's
//! key order, text keys in `COLLATE "C"`); otherwise it is one chunk.
//!
//! With a replay running (`walshift replay --follow` or `walshift run`, seen through the
//! replay lock), verify holds that one; without, it runs replay itself (in this process,
//! `--follow`, with holds) for the duration, which needs capture running.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{
    Check, ChunkKey, KeyDifference, TableReport, VerifyError, VerifyOptions, VerifyReport,
    build_checks, first_differences, not_checked, session_settings,
};
use crate::SqlContext;
use crate::apply::replay::lock::ReplayGuard;
use crate::apply::replay::{self, ReplayConfig, ReplayError, ReplayReport};
use crate::apply::{hold, progress};
use crate::buffer::BufferMeta;
use crate::conn::ConnInfo;
use crate::lsn::Lsn;
use crate::source::replication::{ReplicationConnection, SlotOptions, SnapshotAction};
use crate::source::slot;
use crate::sql::quote_literal;
use crate::transform::mapping::{Mapping, TableName};

/// Prefix of the logical message online verify commits after each point.
pub const POINT_MESSAGE_PREFIX: &str = "walshift-verify";

/// How [`verify_online`] compares. Every field documents its default.
#[derive(Clone, Debug)]
pub struct OnlineOptions {
    /// Keys reported, fetch size, checksums: as the offline verify.
    pub base: VerifyOptions,
    /// Source rows per chunk. Default 50 000: each chunk holds a snapshot on both sides (and
    /// replay, briefly) only for that many rows; smaller means more points (each a slot
    /// creation, which waits for the source's running transactions to finish).
    pub chunk_rows: usize,
    /// A hold not refreshed for this long stops holding (a killed verify never blocks replay
    /// longer). Default 30 s.
    pub hold_ttl: Duration,
    /// Longest capture or replay may make no progress towards a point before verify gives up
    /// with an error. Default 60 s.
    pub stall: Duration,
}

/// [`OnlineOptions::chunk_rows`]'s default.
pub const DEFAULT_CHUNK_ROWS: usize = 50_000;
/// [`OnlineOptions::hold_ttl`]'s default, in seconds.
pub const DEFAULT_HOLD_TTL_SECS: u64 = 30;
/// [`OnlineOptions::stall`]'s default, in seconds.
pub const DEFAULT_STALL_SECS: u64 = 60;

impl Default for OnlineOptions {
    fn default() -> Self {
        OnlineOptions {
            base: VerifyOptions::default(),
            chunk_rows: DEFAULT_CHUNK_ROWS,
            hold_ttl: Duration::from_secs(DEFAULT_HOLD_TTL_SECS),
            stall: Duration::from_secs(DEFAULT_STALL_SECS),
        }
    }
}

/// How the online comparison went (in [`VerifyReport::online`]).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct OnlineSummary {
    /// Consistent points taken (one per chunk).
    pub points: u64,
    pub first_point: Option<String>,
    pub last_point: Option<String>,
    /// `external` (a running `replay --follow` / `run` was held) or `in-process`.
    pub replay: &'static str,
}

/// A replay this verify runs itself.
struct OwnReplay {
    task: tokio::task::JoinHandle<Result<ReplayReport, ReplayError>>,
    stop: tokio::sync::watch::Sender<bool>,
    _guard: ReplayGuard,
}

struct Ctx<'a> {
    source_info: &'a ConnInfo,
    /// The comparison's source session (inside a chunk's snapshot while comparing).
    source: Client,
    /// Catalog lookups, the slot's position and the point messages on the source.
    source_aux: Client,
    /// The comparison's target session.
    target: Client,
    /// The hold and replay's position on the target (never inside the comparison's transaction).
    target_aux: Client,
    buffer_id: String,
    slot: String,
    holder: String,
    settings: String,
    opts: &'a OnlineOptions,
    own: Option<OwnReplay>,
    slots: u64,
    summary: OnlineSummary,
}

/// Compares the target tables fed by `tables` with the source through `transform` (identity
/// when `None`), chunk by chunk, each chunk at one source position, while capture and replay
/// keep running. `buffer_dir` is the buffer replay applies (its id names the hold and the
/// capture slot). Differences are in the report, not errors.
pub async fn verify_online(
    source_info: &ConnInfo,
    target_info: &ConnInfo,
    buffer_dir: &Path,
    transform: Option<Arc<Mapping>>,
    tables: &[TableName],
    opts: &OnlineOptions,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let identity = Mapping::identity();
    let mapping = transform.as_deref().unwrap_or(&identity);
    let meta = BufferMeta::read(buffer_dir)
        .map_err(|e| VerifyError::Online(format!("reading the buffer: {e}")))?
        .ok_or_else(|| {
            VerifyError::Online(format!(
                "{} is not a walshift buffer (no buffer.json): give --buffer the directory capture writes",
                buffer_dir.display()
            ))
        })?;
    let buffer_id = progress::buffer_id(meta.system_identifier, &meta.slot);
    let (source, source_aux, target, target_aux) = (
        source_info.connect().await?,
        source_info.connect().await?,
        target_info.connect().await?,
        target_info.connect().await?,
    );
    crate::identity::refuse_source(
        &target,
        &target_info.redacted(),
        "verify --online (it writes a hold row) on",
        meta.system_identifier,
        &meta.database,
    )
    .await
    .map_err(|e| VerifyError::Online(e.to_string()))?;
    super::refuse_volatile(&source, mapping, tables, opts.base.evaluates_columns()).await?;
    let checks = build_checks(&source, &target, mapping, tables).await?;
    hold::ensure_table(&target)
        .await
        .map_err(|e| VerifyError::Online(e.to_string()))?;
    progress::ensure_progress_table(&target)
        .await
        .map_err(|e| VerifyError::Online(e.to_string()))?;
    let settings = session_settings(&target).await?;
    let own = match ReplayGuard::try_acquire(target_info, &buffer_id).await? {
        None => None,
        Some(guard) => {
            let mut cfg = ReplayConfig::new(buffer_dir, target_info.clone());
            cfg.follow = true;
            cfg.transform = transform.clone();
            let (stop, mut rx) = tokio::sync::watch::channel(false);
            let task = tokio::spawn(replay::run(cfg, async move {
                let _ = rx.wait_for(|s| *s).await;
            }));
            Some(OwnReplay {
                task,
                stop,
                _guard: guard,
            })
        }
    };
    let mut ctx = Ctx {
        source_info,
        source,
        source_aux,
        target,
        target_aux,
        holder: format!(
            "walshift verify --online (pid {}, started {:?})",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
        ),
        buffer_id,
        slot: meta.slot.clone(),
        settings,
        opts,
        summary: OnlineSummary {
            replay: if own.is_some() {
                "in-process"
            } else {
                "external"
            },
            ..Default::default()
        },
        own,
        slots: 0,
    };
    let mut result = Ok(Vec::new());
    for c in &checks {
        match ctx.table(c).await {
            Ok(t) => {
                if let Ok(v) = &mut result {
                    v.push(t);
                }
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let _ = hold::release(&ctx.target_aux, &ctx.buffer_id, &ctx.holder).await;
    if let Some(own) = ctx.own.take() {
        let _ = own.stop.send(true);
        match own.task.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if result.is_ok() => result = Err(VerifyError::ReplayFailed(e.to_string())),
            Err(e) if result.is_ok() => result = Err(VerifyError::ReplayFailed(e.to_string())),
            _ => {}
        }
    }
    let tables = result?;
    let not_checked = not_checked(&ctx.source_aux, &checks, tables_of(&checks)).await?;
    Ok(VerifyReport {
        tables,
        elapsed_secs: started.elapsed().as_secs_f64(),
        not_checked,
        online: Some(ctx.summary),
    })
}

fn tables_of(checks: &[Check]) -> Vec<TableName> {
    checks.iter().map(|c| c.source.clone()).collect()
}

/// One chunk's outcome.
struct ChunkOut {
    source_rows: i64,
    target_rows: i64,
    source_sum: String,
    target_sum: String,
    differences: Vec<KeyDifference>,
}

fn add_sums(a: &str, b: &str) -> String {
    match (a.parse::<i128>(), b.parse::<i128>()) {
        (Ok(x), Ok(y)) => (x + y).to_string(),
        _ => String::new(),
    }
}

impl Ctx<'_> {
    async fn table(&mut self, c: &Check) -> Result<TableReport, VerifyError> {
        let mut report = TableReport {
            source: c.source.clone(),
            target: c.target.clone(),
            columns: c.columns.clone(),
            key: c.key.clone(),
            source_rows: 0,
            target_rows: 0,
            source_checksum: if self.opts.base.checksums { "0" } else { "" }.into(),
            target_checksum: if self.opts.base.checksums { "0" } else { "" }.into(),
            equal: true,
            differences: Vec::new(),
            chunks: 0,
        };
        let mut lower: Option<Vec<Option<String>>> = None;
        loop {
            let (out, upper) = self.chunk(c, lower.as_deref()).await?;
            report.chunks += 1;
            let equal = out.source_rows == out.target_rows && out.source_sum == out.target_sum;
            report.equal &= equal;
            report.source_rows += out.source_rows;
            report.target_rows += out.target_rows;
            if self.opts.base.checksums {
                report.source_checksum = add_sums(&report.source_checksum, &out.source_sum);
                report.target_checksum = add_sums(&report.target_checksum, &out.target_sum);
            }
            let room = self
                .opts
                .base
                .max_keys
                .saturating_sub(report.differences.len());
            report
                .differences
                .extend(out.differences.into_iter().take(room));
            tracing::info!(table = %c.what(), chunk = report.chunks, equal, "verified a chunk");
            match upper {
                Some(u) => lower = Some(u),
                None => break,
            }
        }
        Ok(report)
    }

    /// One chunk at its own point. Returns the chunk's upper key bound (`None`: last chunk).
    async fn chunk(
        &mut self,
        c: &Check,
        lower: Option<&[Option<String>]>,
    ) -> Result<(ChunkOut, Option<Vec<Option<String>>>), VerifyError> {
        let r = match self.point().await {
            Ok(()) => self.compare(c, lower).await,
            Err(e) => Err(e),
        };
        let end = if r.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let (a, b) = tokio::join!(
            self.source.batch_execute(end),
            self.target.batch_execute(end)
        );
        let r = r?;
        a.sql_context("ending the verify transaction on the source")?;
        b.sql_context("ending the verify transaction on the target")?;
        Ok(r)
    }

    /// Opens the chunk's transactions on both sides at one source position.
    async fn point(&mut self) -> Result<(), VerifyError> {
        let (source_id, holder) = (self.buffer_id.clone(), self.holder.clone());
        // 1. Freeze replay no later than the source's current position.
        let now: String = self
            .source_aux
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .sql_context("reading the source's WAL position")?
            .get(0);
        let p: Lsn = now.parse().unwrap_or_default();
        let g = hold::set(&self.target_aux, &source_id, &holder, p, self.opts.hold_ttl).await?;
        self.wait_reached(g, p).await?;
        // 2. The source's point: a temporary slot's exported snapshot.
        let mut repl = ReplicationConnection::connect(self.source_info).await?;
        self.slots += 1;
        let name = format!("walshift_verify_{}_{}", std::process::id(), self.slots);
        let slot = repl
            .create_logical_slot(
                &name,
                SlotOptions {
                    temporary: true,
                    snapshot: SnapshotAction::Export,
                },
            )
            .await?;
        let snapshot = slot.snapshot_name.clone().unwrap_or_default();
        let l = slot.consistent_point;
        let begun = self
            .source
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; {} {}",
                quote_literal(&snapshot),
                self.settings,
                self.opts.base.source_limits()
            ))
            .await
            .sql_context("starting the verify transaction on the source at the slot's snapshot",);
        let _ = repl.close().await;
        begun?;
        // 3. Everything committed before L durable in the buffer.
        self.source_aux
            .query_one(
                "SELECT pg_logical_emit_message(true, $1, $2)::text",
                &[&POINT_MESSAGE_PREFIX, &l.to_string()],
            )
            .await
            .sql_context("writing the verify point's message on the source")?;
        self.wait_durable(l).await?;
        // 4. The target at L.
        let g = hold::set(&self.target_aux, &source_id, &holder, l, self.opts.hold_ttl).await?;
        let reached = self.wait_reached(g, l).await?;
        if reached > l {
            return Err(VerifyError::Online(format!(
                "replay reports {reached}, past the verify point {l}: the target cannot be \
                 compared at {l}"
            )));
        }
        self.target
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {}; SELECT 1",
                self.settings
            ))
            .await
            .sql_context("starting the verify transaction on the target")?;
        hold::release(&self.target_aux, &source_id, &holder).await?;
        self.summary.points += 1;
        if self.summary.first_point.is_none() {
            self.summary.first_point = Some(l.to_string());
        }
        self.summary.last_point = Some(l.to_string());
        tracing::debug!(point = %l, "verify point");
        Ok(())
    }

    /// Fails if the replay this verify runs itself has stopped.
    async fn check_own(&mut self) -> Result<(), VerifyError> {
        if let Some(own) = &self.own
            && own.task.is_finished()
        {
            let own = self.own.take().expect("checked");
            let why = match own.task.await {
                Ok(Ok(_)) => "it stopped".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            return Err(VerifyError::ReplayFailed(why));
        }
        Ok(())
    }

    /// Waits until replay reports hold generation `g` (set at `point`); returns its applied
    /// position.
    async fn wait_reached(&mut self, g: i64, point: Lsn) -> Result<Lsn, VerifyError> {
        let mut last = None;
        let mut since = Instant::now();
        loop {
            if let Some((reached, lsn)) = hold::poll(
                &self.target,
                &self.buffer_id,
                &self.holder,
                self.opts.hold_ttl,
            )
            .await?
                && reached == g
            {
                return Ok(lsn);
            }
            self.check_own().await?;
            let applied = progress::read_applied(&self.target_aux, &self.buffer_id)
                .await
                .map_err(|e| {
                    crate::SqlError::new("reading walshift.applied on the target", e.source)
                })?;
            if applied != last {
                last = applied;
                since = Instant::now();
            } else if since.elapsed() >= self.opts.stall {
                return Err(VerifyError::ReplayStalled {
                    point,
                    applied: last.unwrap_or_default(),
                    secs: self.opts.stall.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the capture slot's confirmed position passes `point`.
    async fn wait_durable(&mut self, point: Lsn) -> Result<(), VerifyError> {
        let mut last = None;
        let mut since = Instant::now();
        loop {
            let confirmed = slot::confirmed_flush_lsn(&self.source_aux, &self.slot)
                .await
                .sql_context("reading the capture slot's position on the source")?;
            let Some(confirmed) = confirmed else {
                return Err(VerifyError::Online(format!(
                    "the capture slot {:?} does not exist on the source: online verify compares \
                     what capture and replay carry; start `walshift capture` (or `walshift run`) first",
                    self.slot
                )));
            };
            if confirmed > point {
                return Ok(());
            }
            self.check_own().await?;
            if Some(confirmed) != last {
                last = Some(confirmed);
                since = Instant::now();
            } else if since.elapsed() >= self.opts.stall {
                return Err(VerifyError::CaptureStalled {
                    slot: self.slot.clone(),
                    confirmed,
                    point,
                    secs: self.opts.stall.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Compares one chunk inside the open transactions. Returns its upper bound.
    async fn compare(
        &mut self,
        c: &Check,
        lower: Option<&[Option<String>]>,
    ) -> Result<(ChunkOut, Option<Vec<Option<String>>>), VerifyError> {
        let mut s_preds = Vec::new();
        let mut t_preds = Vec::new();
        let mut upper = None;
        if let Some(keys) = &c.chunk {
            if let Some(lo) = lower {
                s_preds.push(range(keys, true, ">", lo));
                t_preds.push(range(keys, false, ">", lo));
            }
            let from = c.source_from_with(&s_preds);
            let cols: Vec<String> = keys
                .iter()
                .map(|k| format!("({})::text", k.source))
                .collect();
            let order: Vec<String> = keys.iter().map(|k| k.ordered(true)).collect();
            let sql = format!(
                "SELECT {} {from} ORDER BY {} OFFSET {} LIMIT 1",
                cols.join(", "),
                order.join(", "),
                self.opts.chunk_rows.max(1) - 1
            );
            let row = self
                .source
                .query_opt(&sql, &[])
                .await
                .with_sql_context(|| {
                    format!("finding the next key range of {} on the source", c.what())
                })?;
            if let Some(row) = row {
                let hi: Vec<Option<String>> = (0..keys.len()).map(|i| row.get(i)).collect();
                s_preds.push(range(keys, true, "<=", &hi));
                t_preds.push(range(keys, false, "<=", &hi));
                upper = Some(hi);
            }
        }
        let s_from = c.source_from_with(&s_preds);
        let t_from = c.target_from_with(&t_preds);
        let checksums = self.opts.base.checksums;
        let s_sql = Check::summary_sql(&c.source_row, &s_from, checksums);
        let t_sql = Check::summary_sql(&c.target_row, &t_from, checksums);
        let (s, t) = tokio::join!(
            self.source.query_one(&s_sql, &[]),
            self.target.query_one(&t_sql, &[])
        );
        let s = s.with_sql_context(|| format!("computing {} on the source", c.what()))?;
        let t = t.with_sql_context(|| format!("computing {} on the target", c.what()))?;
        let mut out = ChunkOut {
            source_rows: s.get(0),
            target_rows: t.get(0),
            source_sum: s.get(1),
            target_sum: t.get(1),
            differences: Vec::new(),
        };
        if (out.source_rows != out.target_rows || out.source_sum != out.target_sum)
            && self.opts.base.max_keys > 0
        {
            out.differences = first_differences(
                &self.source,
                &self.target,
                c,
                &s_from,
                &t_from,
                &self.opts.base,
            )
            .await?;
        }
        Ok((out, upper))
    }
}

/// `(k1, k2) op (v1, v2)` over the chunk key, on the source (`s`) or the target (`t`) side.
fn range(keys: &[ChunkKey], source: bool, op: &str, values: &[Option<String>]) -> String {
    let cols: Vec<String> = keys.iter().map(|k| k.ordered(source)).collect();
    let vals: Vec<String> = keys
        .iter()
        .zip(values)
        .map(|(k, v)| match v {
            Some(v) => format!("{}::{}", quote_literal(v), k.type_sql),
            None => "NULL".to_owned(),
        })
        .collect();
    if cols.len() == 1 {
        format!("{} {op} {}", cols[0], vals[0])
    } else {
        format!("({}) {op} ({})", cols.join(", "), vals.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let k = |s: &str, t: &str, ty: &str, collate| ChunkKey {
            source: s.into(),
            target: t.into(),
            type_sql: ty.into(),
            collate,
        };
        assert_eq!(
            range(
                &[k("s.\"id\"", "t.\"id\"", "bigint", false)],
                true,
                ">",
                &[Some("7".into())]
            ),
            "s.\"id\" > '7'::bigint"
        );
        assert_eq!(
            range(
                &[
                    k("s.\"a\"", "t.\"a\"", "text", true),
                    k("s.\"b\"", "t.\"b\"", "integer", false)
                ],
                false,
                "<=",
                &[Some("x'y".into()), Some("2".into())]
            ),
            "(t.\"a\" COLLATE \"C\", t.\"b\") <= ('x''y'::text, '2'::integer)"
        );
        assert_eq!(add_sums("-5", "12"), "7");
    }
}
