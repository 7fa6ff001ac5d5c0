//! The applier: the buffer's transactions in commit order, each row change's values interned
//! into the batch's arena and folded ([`crate::apply::fold`]), the batch handed to the writer
//! as slices and a commit — or, for the one batch being retried, applied change by change in
//! strict source order.
//!
//! Invariant: a source transaction is never split across two target commits. A batch commits
//! only at a transaction boundary (when it is full, old, or at `until_lsn`); a transaction too
//! big for one batch is written in slices inside the still-open target transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::dest::{Dest, RelEntry, dest_for};
use super::error::ReplayError;
use super::statements::WriteError;
use super::writer::{Committed, Job, Slot, Writer, partition};
use super::{MARKER_PREFIX, Pass, ReplayConfig, ReplayReport};
use crate::apply::fold::{BatchFolder, TableBatch};
use crate::apply::row::{Arena, RowChange, TableShape, Val};
use crate::apply::{catalog, progress, sql};
use crate::buffer::{BufferReader, TxnEvent};
use crate::lsn::Lsn;
use crate::source::pgoutput::{self, LogicalMessage, TypeInfo};
use crate::transform::Mapping;
use crate::{SqlContext, SqlError};

/// A batch of fewer changes than this — and than a tenth of [`ReplayConfig::batch_rows`] —
/// written in one go at its commit, uses only the main connection whatever
/// [`ReplayConfig::apply_connections`] says: spreading a trickle of rows over several
/// connections costs more (two-phase commit) than it saves.
const SINGLE_CONNECTION_BELOW: u64 = 1000;
/// A batch holding this many bytes of values is written as a slice of the open target
/// transaction even before `batch_rows` changes: memory stays bounded when rows are large
/// (TOASTed documents), and the arena's 32-bit offsets are never at risk.
const SLICE_BYTES: usize = 64 << 20;

pub(super) struct Applier {
    /// For catalog lookups, only while the writer is idle.
    pub(super) client: Arc<Client>,
    /// The target connection's writer: idle, or running a job in the background.
    pub(super) slot: Slot,
    pub(super) buffer_id: String,
    pub(super) rels: HashMap<u32, RelEntry>,
    /// Type messages seen (names of non-built-in column types).
    pub(super) types: HashMap<u32, TypeInfo>,
    pub(super) transform: Option<Arc<Mapping>>,
    pub(super) progress: Option<Progress>,
    /// Target connections of the writer (1: no two-phase commit).
    pub(super) connections: usize,
    /// The current pass writes over the main connection only ([`Pass::Serial`]).
    pub(super) serial_pass: bool,
    /// Old and new images of the change being folded.
    pub(super) scratch: (Vec<Val>, Vec<Val>),
    /// A written batch's arena, emptied and reused by a later batch.
    pub(super) spare_arena: Option<Arena>,
    /// Holds set by online verify (`--follow` only; see [`crate::apply::hold`]).
    pub(super) hold: Option<crate::apply::hold::HoldWatch>,
}

/// The `--follow` status line: rate, applied position, lag behind the buffer and the source.
pub(super) struct Progress {
    pub(super) started: Instant,
    pub(super) last_print: Instant,
    pub(super) last_changes: u64,
    /// Commit time of the last applied source transaction (µs since 2000-01-01).
    pub(super) last_commit_us: Option<i64>,
    /// End of the last commit in the buffer, and where to look for the next one.
    pub(super) buffered: Option<Lsn>,
    pub(super) tail: Option<crate::buffer::Pos>,
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
    /// The batch holds a cutover marker: a cutover waits for it, so the batch is committed
    /// at the end of the marker's transaction rather than when it is full.
    marker: bool,
}

impl Applier {
    /// One pass over the buffer from `from`. In `strict` mode exactly one batch (the one that
    /// failed) is applied change by change, then the pass returns.
    pub(super) async fn apply_from(
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
            marker: false,
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
                    _ = tokio::time::sleep(config.follow_poll) => {}
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
                        || batch.opened_at.elapsed() >= config.batch_time
                        || batch.marker;
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
                                sql::truncate_sql(&tables, t.cascade(), t.restart_identity());
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
                            batch.marker = true;
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
                None => Dest::Same(catalog::map_relation(&self.client, &entry.rel).await?),
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
        batch.marker = false;
        batch.transactions = 0;
        batch.changes = 0;
        if !strict {
            // A small batch written whole now goes over the main connection alone: a plain
            // COMMIT instead of two-phase commit's extra round trips and fsync, which is most
            // of such a batch's time (and of a cutover's drain).
            let trickle = SINGLE_CONNECTION_BELOW.min(config.batch_rows as u64 / 10);
            if !batch.begun && done.changes < trickle {
                batch.serial = true;
            }
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
            .execute(progress::RECORD_PROGRESS, &[&buffer_id, &end])
            .await;
        let committed = match recorded {
            Ok(_) => w.main().client.batch_execute("COMMIT").await,
            Err(e) => Err(e),
        };
        if let Err(e) = committed {
            w.rollback().await;
            return Err(SqlError::new("committing a batch on the target", e).into());
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
                .sql_context("BEGIN on the target")?;
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
    pub(super) async fn idle(
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
            Err((WriteError::Db(e), _)) if crate::conn::reconnect::is_transient_pg(&e) => {
                // The connection is gone: strict order on it would fail the same way.
                return Err(SqlError::new("writing a batch on the target", e).into());
            }
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
