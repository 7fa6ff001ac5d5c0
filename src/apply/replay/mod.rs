//! Replay: buffered source transactions, in commit order, into the target — batched, folded
//! to their net effect, written set-based, exactly once.
//!
//! Consecutive source transactions form one target transaction (never splitting a source
//! transaction across two target commits). Inside it, changes are folded per key
//! ([`super::fold`]) and flushed as a few set-based statements per table whenever the folder
//! holds `batch_rows` changes — so a single huge source transaction streams through bounded
//! memory while staying one target transaction. The applied end LSN is recorded in the same
//! target transaction ([`super::progress`]). Every statement is checked to affect exactly the
//! rows it must (the affected-row guard, [`crate::apply`]). If a batch fails or misses a row,
//! it is rolled back and replayed in strict source order, one statement per change; a change
//! that still fails stops replay naming the table, the source LSN and the server's error, and
//! one that still misses its row stops it with [`ReplayError::Diverged`].
//!
//! **Reconnecting** ([`ReplayConfig::reconnect`]). Once replay has started applying, a target
//! that restarts, fails over or drops a connection ([`ReplayError::is_transient`]) is not the
//! end: every target session is dropped, and after a backoff replay starts again exactly as a
//! new `walshift replay` does — the caller's lock is taken again ([`TargetLock`]), sessions of
//! the lost run still on the target are waited out, prepared transactions it left are settled,
//! and applying resumes after `walshift.applied`, so every transaction is applied exactly
//! once. A failure that waiting cannot fix stops replay at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod applier;
mod dest;
mod error;
pub mod lock;
mod mapped;
pub mod sessions;
mod statements;
mod writer;

use crate::SqlContext;
use applier::{Applier, Progress};
pub use dest::scan_relations;
use dest::{RelEntry, dest_for};
pub use error::ReplayError;
use writer::{SESSION_SETUP, Slot, Writer, connect_parts};

use super::progress;
use crate::buffer::BufferMeta;
use crate::conn::ConnInfo;
use crate::conn::reconnect::{self, Reconnect, Reconnector};
use crate::identity;
pub use crate::identity::TargetOrigin;
use crate::lsn::Lsn;
use crate::transform::{self, Mapping, TableName, TransformError};

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
    /// size inside one target transaction) and make a retry in strict order longer. 0 behaves
    /// as 1.
    pub batch_rows: usize,
    /// Longest a batch stays open before it is committed at the next transaction boundary.
    /// Default 200 ms. Bounds how far the target lags under light load.
    pub batch_time: Duration,
    /// With `follow`, how long replay sleeps at the end of the buffer before looking for more.
    /// Default 2 ms. Each look reads the segment's end (a few syscalls), so a shorter pause
    /// costs a little CPU while idle; a longer one adds up to that much to how far the target
    /// lags — and to a cutover's drain, which waits for replay to apply its marker.
    pub follow_poll: Duration,
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
    /// commit leaves prepared transactions (holding locks) until replay starts again. 0
    /// behaves as 1.
    pub apply_connections: usize,
    /// How the target got its rows. Default [`TargetOrigin::ClonedByWalshift`]: replay
    /// refuses a target without a clone record of this buffer's source and slot (unless this
    /// buffer was replayed into it before). Never relaxed: a target that is the source itself.
    pub target_origin: TargetOrigin,
    /// Reconnecting after the target restarts, fails over or drops a connection, once replay
    /// has started applying (a target unreachable at the start is an error at once). Default
    /// [`Reconnect::never`] (the `replay` command's default is
    /// [`reconnect::DEFAULT_ATTEMPTS`] attempts): embedding callers that must not wait keep
    /// failing fast. See the module docs for what a reconnect does.
    pub reconnect: Reconnect,
    /// What the caller holds on the target for the replay's lifetime (the replay lock), taken
    /// again before each reconnect attempt: the session that held it died with the target.
    /// Default none.
    pub lock: Option<Arc<dyn TargetLock>>,
}

/// Something a caller holds on the target while replay runs — the advisory lock of
/// [`lock::ReplayGuard`]; [`lock::RetakenLock`] is the one walshift uses — that a reconnect must take again before replay
/// resumes, so that no other replay of the buffer starts while the target was away.
pub trait TargetLock: Send + Sync {
    /// Takes it again (dropping what is left of the old one first). An error stops replay
    /// unless it is transient ([`ReplayError::is_transient`]); [`ReplayError::LockTaken`]
    /// says another replay got it meanwhile.
    fn retake(&self) -> futures_util::future::BoxFuture<'_, Result<(), ReplayError>>;
}

impl std::fmt::Debug for dyn TargetLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TargetLock")
    }
}

/// [`ReplayConfig::batch_rows`]'s default.
pub const DEFAULT_BATCH_ROWS: usize = 50_000;

/// [`ReplayConfig::batch_time`]'s default.
pub const DEFAULT_BATCH_TIME: Duration = Duration::from_millis(200);

/// [`ReplayConfig::follow_poll`]'s default.
pub const DEFAULT_FOLLOW_POLL: Duration = Duration::from_millis(2);

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
            follow_poll: DEFAULT_FOLLOW_POLL,
            progress: false,
            transform: None,
            apply_connections: DEFAULT_APPLY_CONNECTIONS,
            target_origin: TargetOrigin::default(),
            reconnect: Reconnect::never(),
            lock: None,
        }
    }

    /// The settings as replay runs with them: the one place they are checked, so callers
    /// pass what the operator gave. A batch of 0 rows and 0 connections behave as 1.
    fn normalised(mut self) -> Self {
        self.batch_rows = self.batch_rows.max(1);
        self.apply_connections = self.apply_connections.max(1);
        self
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
    /// Times the target was lost and replay got going again ([`ReplayConfig::reconnect`]).
    pub reconnects: u32,
}

/// Prefix of the logical messages (`pg_logical_emit_message`) that mark a cutover. A
/// transaction holding one is recorded in `walshift.applied` like any applied transaction.
pub const MARKER_PREFIX: &str = "walshift";

/// Applies the buffer to the target until its end (or `until_lsn`, or forever with `follow`,
/// until `shutdown`).
///
/// One replay of a buffer into a target at a time: callers hold
/// [`crate::apply::replay::lock::ReplayGuard`] for the buffer while this runs (the `replay`, `run`
/// and `cutover` commands and the demo do), which is also how cutover sees a replay running.
///
/// After a lost target it starts again as [`ReplayConfig::reconnect`] says (see the module
/// docs).
pub async fn run(
    config: ReplayConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<ReplayReport, ReplayError> {
    let config = config.normalised();
    tokio::pin!(shutdown);
    let mut reconnector =
        Reconnector::new(config.reconnect, "replay", "the target", "lost the target");
    let mut report: Option<ReplayReport> = None;
    loop {
        let mut applying_since = None;
        let reconnecting = reconnector.reconnecting();
        let retaken = match (&config.lock, reconnecting) {
            (Some(lock), Some(_)) => tokio::select! {
                r = lock.retake() => r,
                _ = shutdown.as_mut() => break,
            },
            _ => Ok(()),
        };
        let outcome = match retaken {
            Ok(()) => {
                run_once(
                    &config,
                    &mut shutdown,
                    &mut report,
                    &mut applying_since,
                    reconnecting,
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let (Some(r), Some(since)) = (report.as_mut(), applying_since) {
            r.elapsed_secs += since.elapsed().as_secs_f64();
        }
        let error = match outcome {
            Ok(()) => break,
            Err(e) => e,
        };
        let again = reconnector
            .wait_to_retry(
                report.is_some(),
                applying_since,
                error,
                ReplayError::is_transient,
                |attempts, over, last| ReplayError::GaveUp {
                    attempts,
                    over,
                    last: Box::new(last),
                },
                shutdown.as_mut(),
            )
            .await?;
        if !again {
            break;
        }
    }
    Ok(report.expect("replay ran"))
}

/// One start of replay: what a new `walshift replay` does. Adds what it applied to `total`
/// (created once the applier first starts); `applying_since` is set when the applier starts;
/// `reconnecting` is when the target was lost and the attempts made since.
async fn run_once<F: std::future::Future<Output = ()>>(
    config: &ReplayConfig,
    shutdown: &mut std::pin::Pin<&mut F>,
    total: &mut Option<ReplayReport>,
    applying_since: &mut Option<Instant>,
    reconnecting: Option<(Instant, u32)>,
) -> Result<(), ReplayError> {
    let meta = BufferMeta::read(&config.buffer_dir)?
        .ok_or_else(|| ReplayError::NotABuffer(config.buffer_dir.clone()))?;
    let buffer_id = progress::buffer_id(meta.system_identifier, &meta.slot);
    let writers = config
        .target
        .with_application_name(&sessions::replay_application_name(&buffer_id));
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
        .sql_context("preparing the target session")?;
    progress::ensure_progress_table(&client).await?;
    let ended = sessions::wait_for_previous_replay(&client, &buffer_id).await?;
    if ended > 0 {
        tracing::warn!(
            "ended {ended} session(s) an interrupted replay of this buffer left on the target"
        );
    }
    let resolved = progress::resolve_prepared(&client, &buffer_id).await?;
    if resolved != progress::Resolved::default() {
        tracing::warn!(
            "settled the prepared transactions an interrupted replay left on the target: \
             {} committed, {} rolled back (replayed again)",
            resolved.committed,
            resolved.rolled_back
        );
    }
    let conns = connect_parts(config, &writers, client.clone()).await?;
    let start = progress::read_applied(&client, &buffer_id)
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
    let report = match total {
        Some(r) => {
            r.reconnects += 1;
            r.prepared_committed += resolved.committed;
            r.prepared_rolled_back += resolved.rolled_back;
            r
        }
        None => total.insert(ReplayReport {
            start_lsn: start,
            prepared_committed: resolved.committed,
            prepared_rolled_back: resolved.rolled_back,
            ..Default::default()
        }),
    };
    report.applied_lsn = start;
    report.apply_connections = conns.len();
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
    *applying_since = Some(Instant::now());
    if let Some((lost_at, attempts)) = reconnecting {
        tracing::warn!(
            "replay: reconnected to {} after {attempts} attempt(s), {} after the target was lost; \
             resuming after {start}",
            config.target,
            reconnect::human(lost_at.elapsed()),
        );
    }
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
                    .apply_from(config, report.applied_lsn, false, report, shutdown)
                    .await
            }
            Some(Pass::Retry { until }) => {
                // Strict source order for the failed batch only, then set-based again.
                report.retried_in_order += 1;
                let strict = redo(until, report.applied_lsn);
                applier
                    .apply_from(&strict, report.applied_lsn, true, report, shutdown)
                    .await
                    .map(|_| Pass::Again)
            }
            Some(Pass::Serial { until }) => {
                // Set-based, but over the main connection only, for the batch that needs it.
                report.serial_batches += 1;
                let serial = redo(until, report.applied_lsn);
                applier.serial_pass = true;
                let outcome = applier
                    .apply_from(&serial, report.applied_lsn, false, report, shutdown)
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
    if let Err(Pass::Retry { until }) = applier.idle(config, report).await? {
        return Err(ReplayError::Writer(format!(
            "a batch ending at {until} failed after replay stopped; run replay again"
        )));
    }
    Ok(())
}

pub(super) enum Pass {
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
