//! Cutover: the release-night moment. The source stops taking writes, the last changes reach
//! the migrated target, sequences follow, the copy is checked, and traffic moves — every phase
//! timed, and nothing lost if anything goes wrong.
//!
//! [`run`] is the orchestrator and runs the phases in a straight line:
//!
//! 1. **postpone** — while `<buffer>/postpone-cutover` exists, wait (nothing is touched).
//! 2. **preflight** — every setting is valid ([`CutoverConfig::validate`]); the journal allows
//!    a cutover; the buffer belongs to the source, the slot exists, the role may fence;
//!    capture and replay are running elsewhere or are started here ([`coord`]); wait until the
//!    lag (WAL not yet durable included) is under `max_lag` and no prepared transaction of
//!    the source database is pending. Nothing is fenced yet.
//! 3. **fence** — the `--before` hook, then [`fence`] (read-only mode) — the window starts.
//! 4. **marker** — `pg_logical_emit_message(true, 'walshift', <cutover id>)` on the source.
//! 5. **drain** — find the marker's transaction in the buffer; wait until the slot's confirmed
//!    (durable) position and the target's `walshift.applied` both pass its end.
//! 6. **sequences** — [`sequences::sync`].
//! 7. **verify** — [`verify::verify_tables`] as `verify` asks.
//! 8. **switch** — the `--switch` hook — the window ends when it returns.
//! 9. **after** — the `--after` hook; then the report.
//!
//! **Abort contract:** any failure before the switch is done, `max_window` running out before
//! the switch starts, or an interrupt, aborts: the fence is lifted (the database's previous
//! `default_transaction_read_only` restored exactly), and [`CutoverError::Aborted`] carries the
//! cause and the report. Nothing captured is lost: capture and replay only ever move forward
//! (the buffer, the slot and `walshift.applied` are untouched by an abort), so cutover can be
//! run again.
//!
//! **Switch contract:** once the switch has started, walshift never unfences the source on its
//! own. A `--switch` hook that fails — exits non-zero, is killed by its timeout, or dies with
//! walshift — may have moved part of the traffic (DNS changed, then a later step failed), so
//! the switch is in doubt: the source stays fenced, the journal says so, and the operator
//! decides (see the journal contract).
//!
//! **Journal contract** ([`journal`]): every step from the fence on is recorded durably in
//! `<buffer>/cutover-journal.json`, read first by the next cutover. Once the switch has
//! started, nothing is undone: the fence stays, sequences only move forward (also in the
//! normal path: a target sequence is never set below its current value), and a switch whose
//! end was not recorded (walshift killed, the hook killed by its timeout) makes every later
//! cutover of the buffer refuse until the operator checks where traffic points and runs
//! `--resume-after-switch` (it reached the target) or `--unfence-after-failed-switch` (none of
//! it ever left the source: the fence is lifted exactly as recorded, role settings included,
//! and that is journaled). A switch that was recorded done is not repeated: a rerun runs only
//! the `--after` hook again when it failed or never recorded a result (walshift died before or
//! while it ran — after hooks must be safe to run twice; without `--after` such a rerun exits
//! 4 and says so), or says there is nothing left to do.
//!
//! A dry run does everything except fencing, the hooks and the switch, and reports the
//! projected window (fence → verify done).

pub mod coord;
pub mod fence;
pub mod hooks;
pub mod journal;
pub mod report;
pub mod sequences;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_postgres::Client;

pub use fence::FenceMode;
pub use report::{CutoverReport, Outcome};
pub use sequences::TableMap;
pub use verify::VerifyMode;

use crate::apply::replay::{self, ReplayConfig, ReplayError, ReplayReport};
use crate::apply::target;
use crate::buffer::{BufferError, BufferMeta};
use crate::capture::{self, CaptureConfig, CaptureError, CaptureReport};
use crate::conn::ConnInfo;
use crate::lsn::Lsn;
use fence::{FenceError, FenceState};
use hooks::{HookContext, HookError};
use journal::{Journal, State, Step};
use report::Timeline;

/// Name of the file that holds a cutover back while it exists.
pub const POSTPONE_FILE: &str = "postpone-cutover";

/// A callback for progress lines.
pub type Say = Arc<dyn Fn(&str) + Send + Sync>;

/// What to cut over and how. Every field documents its default and trade-off.
#[derive(Clone)]
pub struct CutoverConfig {
    /// The live database (fenced, then left read-only after a successful cutover).
    pub source: ConnInfo,
    /// The migrated copy that replay fills.
    pub target: ConnInfo,
    /// The buffer capture writes.
    pub buffer_dir: PathBuf,
    /// Replication slot. Default `walshift` (as capture's). Must be the buffer's slot.
    pub slot: String,
    /// Publication. Default `walshift` (as capture's). Its tables are the ones verified.
    pub publication: String,
    /// How the source is fenced. Default read-only.
    pub fence: FenceMode,
    /// Run before the fence (required in hook mode, where it is the fence). Default none.
    pub before: Option<String>,
    /// Repoints traffic (pooler, DNS, VIP). Default none (the window then ends after verify).
    pub switch: Option<String>,
    /// Run after the switch (e.g. take the maintenance page down). Default none.
    pub after: Option<String>,
    /// Longest each hook may run before it is killed. Default 60 s.
    pub hook_timeout: Duration,
    /// Fence only once the target is at most this far behind. Default 5 s. Lower means a
    /// shorter drain inside the window; too low may never be reached under heavy load.
    pub max_lag: Duration,
    /// Abort (and unfence) if the switch has not started this long after the fence went up.
    /// Default 10 s. The cap on how long the site can be read-only because of walshift.
    pub max_window: Duration,
    /// What to compare after the drain. Default counts (cheap); checksum reads every row on
    /// both sides, inside the window.
    pub verify: VerifyMode,
    /// Rehearse: no fence, no hooks, no switch; report the projected window. Default false.
    pub dry_run: bool,
    /// The migration mapping the target was built with. Default none (identity). When set, a
    /// replay cutover starts itself applies through it, sequences follow its table renames,
    /// and verify compares through it ([`crate::verify::verify`]); `table_map` is ignored.
    pub transform: Option<Arc<crate::transform::Mapping>>,
    /// Source table → target tables, for sequences and verify without a `transform`. Default
    /// identity.
    pub table_map: TableMap,
    /// Give up (nothing fenced) if the lag is not under `max_lag` within this time. Default
    /// none: wait until it is, or until interrupted.
    pub preflight_timeout: Option<Duration>,
    /// How long to wait for each terminated session to exit. Default 5 s (capped by
    /// `max_window`).
    pub terminate_timeout: Duration,
    /// How often the drain checks the slot, the buffer and the target. Default 2 ms: each
    /// check is a small query; shorter adds load, longer adds up to that much to the window.
    pub poll_interval: Duration,
    /// Fsync interval of a capture cutover starts itself. Default 10 ms (capture's own default
    /// is 20 ms): part of the drain time.
    pub capture_flush_interval: Duration,
    /// Batch time of a replay cutover starts itself. Default 50 ms.
    pub replay_batch_time: Duration,
    /// The operator checked that traffic points to the target after a cutover whose switch
    /// started but whose end was not recorded: record the switch as done, set sequences
    /// (never backwards), run `after`. Default false (such a cutover is refused).
    pub resume_after_switch: bool,
    /// The operator checked that none of the application's traffic left the source after a
    /// cutover whose switch started but did not complete (the hook failed or was killed,
    /// walshift died): lift the fence exactly as the journal recorded it (the database's
    /// setting and the role settings the fence removed) and record that in the journal, so a
    /// new cutover may run. Default false. Refused when the journal records the switch done.
    pub unfence_after_failed_switch: bool,
    /// How long preflight waits for prepared transactions of the source database
    /// (`pg_prepared_xacts`) to be committed or rolled back before refusing. Default 5 s. A
    /// prepared transaction survives the fence and could be committed on the source after the
    /// switch, never reaching the copy.
    pub max_prepared_wait: Duration,
    /// Progress lines (waiting, lag). Default none.
    pub say: Option<Say>,
}

impl CutoverConfig {
    /// Defaults for everything but the databases and the buffer.
    pub fn new(source: ConnInfo, target: ConnInfo, buffer_dir: impl Into<PathBuf>) -> Self {
        CutoverConfig {
            source,
            target,
            buffer_dir: buffer_dir.into(),
            slot: "walshift".into(),
            publication: "walshift".into(),
            fence: FenceMode::ReadOnly,
            before: None,
            switch: None,
            after: None,
            hook_timeout: Duration::from_secs(60),
            max_lag: Duration::from_secs(5),
            max_window: Duration::from_secs(10),
            verify: VerifyMode::Counts,
            dry_run: false,
            transform: None,
            table_map: TableMap::identity(),
            preflight_timeout: None,
            terminate_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_millis(2),
            capture_flush_interval: Duration::from_millis(10),
            replay_batch_time: Duration::from_millis(50),
            resume_after_switch: false,
            unfence_after_failed_switch: false,
            max_prepared_wait: Duration::from_secs(5),
            say: None,
        }
    }

    /// Refuses impossible settings, before anything is connected to or touched.
    pub fn validate(&self) -> Result<(), CutoverError> {
        let bad =
            |flag: &str, why: &str| Err(CutoverError::InvalidConfig(format!("{flag}: {why}")));
        let positive = [
            (
                "--max-window",
                self.max_window,
                "the fence would be up with no time to drain: it would only ever fence, terminate every session and abort",
            ),
            (
                "--max-lag",
                self.max_lag,
                "preflight would wait for a lag of exactly zero, which a source taking writes never reaches",
            ),
            (
                "--hook-timeout",
                self.hook_timeout,
                "every hook would be killed at once",
            ),
            (
                "terminate timeout",
                self.terminate_timeout,
                "terminated sessions would never be waited for",
            ),
            (
                "poll interval",
                self.poll_interval,
                "the drain would poll without pause",
            ),
        ];
        for (flag, d, why) in positive {
            if d.is_zero() {
                return bad(flag, &format!("must be more than 0 ({why})"));
            }
        }
        if !crate::source::valid_slot_name(&self.slot) {
            return bad(
                "--slot",
                &format!(
                    "{:?} is not a replication slot name (lower-case letters, digits and underscores, at most 63)",
                    self.slot
                ),
            );
        }
        if self.publication.is_empty() || self.publication.len() > 63 {
            return bad("--publication", "must be 1 to 63 bytes");
        }
        if self.fence == FenceMode::Hook && self.before.is_none() && !self.dry_run {
            return Err(CutoverError::HookModeWithoutBefore);
        }
        if self.dry_run && self.resume_after_switch {
            return bad("--resume-after-switch", "cannot be combined with --dry-run");
        }
        if self.unfence_after_failed_switch && (self.dry_run || self.resume_after_switch) {
            return bad(
                "--unfence-after-failed-switch",
                "cannot be combined with --dry-run or --resume-after-switch (traffic either reached the target or it did not)",
            );
        }
        Ok(())
    }

    fn say(&self, line: &str) {
        if let Some(s) = &self.say {
            s(line);
        }
    }
}

impl std::fmt::Debug for CutoverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CutoverConfig")
            .field("source", &self.source)
            .field("target", &self.target)
            .field("buffer_dir", &self.buffer_dir)
            .field("fence", &self.fence)
            .field("dry_run", &self.dry_run)
            .finish_non_exhaustive()
    }
}

/// Cutover failures. Before the fence they are returned as they are; after it, wrapped in
/// [`CutoverError::Aborted`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CutoverError {
    #[error(
        "buffer {0} has no buffer.json: run walshift capture --clone-to first (cutover needs a captured, cloned release)"
    )]
    NotABuffer(PathBuf),

    #[error(
        "buffer {dir} was captured through slot {buffer_slot:?}, not {slot:?}: pass --slot {buffer_slot}"
    )]
    SlotMismatch {
        dir: PathBuf,
        buffer_slot: String,
        slot: String,
    },

    #[error(
        "--source is system {found}, but buffer {dir} was captured from system {expected}: wrong --source or --buffer"
    )]
    WrongSource {
        dir: PathBuf,
        expected: u64,
        found: u64,
    },

    #[error(
        "slot {slot:?} does not exist on the source: changes since it was dropped are lost to this buffer; start over with a fresh clone"
    )]
    SlotMissing { slot: String },

    #[error(
        "the target's clone is not finished (its clone state says copying): wait for capture --clone-to or \
         walshift run to finish it, then run cutover"
    )]
    CloneUnfinished,

    #[error(
        "refusing to cut over (nothing fenced): {} partition(s) of a publish_via_partition_root \
         publication changed since capture recorded them, in a way the stream cannot carry \
         (a TRUNCATE of the partitioned table itself is accepted by capture once it receives it: \
         if that is what happened, let capture run — start it if it is not running — and retry):\n{}",
        .0.len(),
        .0.iter().map(|d| format!("  - {d}")).collect::<Vec<_>>().join("\n")
    )]
    PartitionChanged(Vec<crate::capture::partitions::Difference>),

    #[error("invalid cutover setting {0}; nothing was touched")]
    InvalidConfig(String),

    #[error("--fence hook needs a --before command that stops the application's writes")]
    HookModeWithoutBefore,

    #[error(
        "the target is still {lag_secs:.1} s behind the source after {waited:?} (--max-lag {max:?}): \
         {unconfirmed_bytes} bytes of source WAL not yet durable in the buffer, capture last replied {reply_age}; \
         nothing was fenced. If capture is stalled (stopped, hung, its walsender stuck), restart it; otherwise let \
         replay catch up (or raise --max-lag), then run cutover again"
    )]
    LagTimeout {
        lag_secs: f64,
        max: Duration,
        waited: Duration,
        unconfirmed_bytes: u64,
        reply_age: String,
    },

    #[error("--max-window {max:?} ran out during {phase} ({elapsed:?} after the fence went up)")]
    MaxWindow {
        phase: String,
        max: Duration,
        elapsed: Duration,
    },

    #[error("verification failed: {} table(s) differ between source and target: {}", .tables.len(), .tables.join("; "))]
    VerifyFailed { tables: Vec<String> },

    #[error("interrupted")]
    Interrupted,

    #[error("the in-process {what} stopped before the marker was reached")]
    TaskEnded { what: &'static str },

    #[error("in-process capture failed: {0}")]
    Capture(#[source] CaptureError),

    #[error("in-process replay failed: {0}")]
    Replay(#[source] ReplayError),

    #[error(transparent)]
    Fence(#[from] FenceError),

    #[error(transparent)]
    Hook(#[from] HookError),

    #[error(transparent)]
    Buffer(#[from] BufferError),

    #[error(transparent)]
    Lag(#[from] coord::LagError),

    #[error(transparent)]
    Verify(#[from] verify::CheckError),

    #[error(transparent)]
    Connect(#[from] crate::Error),

    #[error("{context}: {source}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error(transparent)]
    Aborted(Box<Aborted>),

    #[error(transparent)]
    SwitchInDoubt(Box<SwitchInDoubt>),

    #[error(
        "--resume-after-switch: the journal ({}) records no switch waiting to be confirmed; nothing to resume. \
         Run walshift cutover without it",
        .0.display()
    )]
    NothingToResume(PathBuf),

    #[error(
        "--unfence-after-failed-switch: the journal ({}) records no switch left in doubt; nothing to unfence{}",
        .journal.display(),
        if *.switched {
            ". It records the switch DONE: traffic moved to the target, and walshift will not reopen the old \
             database for writes (if you really move back, lift the fence by hand, knowing the target has \
             taken writes the source does not have)"
        } else {
            ". Run walshift cutover without it"
        }
    )]
    NothingToUnfence { journal: PathBuf, switched: bool },

    #[error(transparent)]
    Journal(#[from] journal::JournalError),

    #[error(
        "{when}: prepared transaction(s) of the source database are pending: {list}. One could be committed on \
         the source after the switch (COMMIT PREPARED works on a fenced database) and never reach the copy. \
         Have their owner finish them (COMMIT PREPARED / ROLLBACK PREPARED 'gid'), then run cutover again"
    )]
    PreparedTransactions { when: String, list: String },
}

fn sql(context: &str) -> impl FnOnce(tokio_postgres::Error) -> CutoverError + '_ {
    move |source| CutoverError::Sql {
        context: context.to_owned(),
        source,
    }
}

/// A cutover whose switch started but whose end is not known: the source stays fenced, and
/// every later cutover of the buffer refuses until the operator confirms where traffic points.
#[derive(Debug, thiserror::Error)]
#[error(
    "cutover {cutover_id}: the switch started{started} but did not complete ({cause}). Traffic may point to either \
     database (a switch that failed part-way may have moved some of it), so walshift leaves the source fenced \
     and sets nothing back. Check where the application's traffic points now. If it reaches the target (or \
     once you finish the switch by hand): walshift cutover --resume-after-switch … (records the switch as \
     done, sets sequences forward only, runs --after). If none of it ever left the source: walshift cutover \
     --unfence-after-failed-switch … (lifts the fence exactly as it was before the cutover, role settings \
     included, and records that in {journal}); then fix the switch and run cutover again",
    started = self.started_at.as_deref().map(|t| format!(" at {t}")).unwrap_or_default(),
    journal = self.journal.display()
)]
pub struct SwitchInDoubt {
    pub cutover_id: String,
    pub cause: String,
    /// When the switch started (UTC, RFC 3339), from the journal.
    pub started_at: Option<String>,
    pub journal: PathBuf,
    /// The report, when this run is the one whose switch was interrupted.
    pub report: Option<CutoverReport>,
}

/// A cutover that stopped after the fence went up, before the switch.
#[derive(Debug, thiserror::Error)]
#[error(
    "cutover {} aborted before the switch: {cause}. {unfence}. Nothing captured is lost (the buffer, the slot and \
     the target's applied position are intact); {advice}, then run walshift cutover again",
    report.cutover_id,
    unfence = self.unfence_text(),
    advice = self.advice()
)]
pub struct Aborted {
    pub cause: CutoverError,
    /// The report up to the abort (outcome [`Outcome::Aborted`]).
    pub report: CutoverReport,
    /// `Ok` if the fence was lifted (or there was none); the error text if lifting failed.
    pub unfenced: Result<(), String>,
    fence: FenceMode,
}

impl Aborted {
    fn unfence_text(&self) -> String {
        match (&self.unfenced, self.fence) {
            (Err(e), _) => format!(
                "UNFENCING FAILED ({e}): the source is still read-only; restore it by hand with the value in {} \
                 (ALTER DATABASE … RESET default_transaction_read_only if it was not set)",
                fence::STATE_FILE
            ),
            (Ok(()), FenceMode::ReadOnly) => match &self.report.fence_previous_setting {
                Some(v) => format!("The source is writable again (default_transaction_read_only restored to {v:?})"),
                None => "The source is writable again (default_transaction_read_only reset)".into(),
            },
            (Ok(()), FenceMode::Hook) => {
                "The --before hook stopped the application: restart it (walshift has no hook to undo --before)".into()
            }
            (Ok(()), FenceMode::None) => "walshift fenced nothing".into(),
        }
    }

    fn advice(&self) -> &'static str {
        match &self.cause {
            CutoverError::MaxWindow { .. } => {
                "the backlog at the fence took longer than --max-window: lower --max-lag so the fence goes up closer \
                 to caught up, or raise --max-window"
            }
            CutoverError::VerifyFailed { .. } => {
                "find why the target differs (writes on the target, a table outside the publication, a transform) and fix it"
            }
            CutoverError::Hook(_) => "fix the hook",
            CutoverError::Interrupted => "when ready",
            _ => "fix the cause above",
        }
    }
}

type CaptureTask = JoinHandle<Result<CaptureReport, CaptureError>>;
type ReplayTask = JoinHandle<Result<ReplayReport, ReplayError>>;
type StopSender = tokio::sync::oneshot::Sender<()>;

/// Capture and replay tasks started by cutover, and how to stop them.
struct Helpers {
    capture: Option<(CaptureTask, StopSender)>,
    replay: Option<(ReplayTask, StopSender, coord::ReplayGuard)>,
}

impl Helpers {
    /// An error if an in-process task has ended (they only end on their own by failing).
    async fn check(&mut self) -> Result<(), CutoverError> {
        if self.capture.as_ref().is_some_and(|c| c.0.is_finished()) {
            let (h, _) = self.capture.take().expect("checked");
            return Err(match h.await {
                Ok(Err(e)) => CutoverError::Capture(e),
                _ => CutoverError::TaskEnded { what: "capture" },
            });
        }
        if self.replay.as_ref().is_some_and(|r| r.0.is_finished()) {
            let (h, _, _) = self.replay.take().expect("checked");
            return Err(match h.await {
                Ok(Err(e)) => CutoverError::Replay(e),
                _ => CutoverError::TaskEnded { what: "replay" },
            });
        }
        Ok(())
    }

    /// Stops the tasks cleanly (capture flushes and confirms what it received).
    async fn stop(&mut self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some((h, tx, guard)) = self.replay.take() {
            let _ = tx.send(());
            match tokio::time::timeout(Duration::from_secs(60), h).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => warnings.push(format!("in-process replay: {e}")),
                _ => warnings.push("in-process replay did not stop in time".into()),
            }
            drop(guard);
        }
        if let Some((h, tx)) = self.capture.take() {
            let _ = tx.send(());
            match tokio::time::timeout(Duration::from_secs(60), h).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => warnings.push(format!("in-process capture: {e}")),
                _ => warnings.push("in-process capture did not stop in time".into()),
            }
        }
        warnings
    }
}

/// Everything the phases share.
struct Ctx<'a> {
    config: &'a CutoverConfig,
    report: CutoverReport,
    tl: Timeline,
    src: Client,
    tgt: Client,
    buffer_id: String,
    helpers: Helpers,
    interrupted: Arc<AtomicBool>,
    fence_state: Option<FenceState>,
    leftover: Option<FenceState>,
    window_start: Option<Instant>,
    hook_ctx: HookContext,
    /// `config.table_map`, or the transform's tables.
    table_map: TableMap,
    /// Follows the buffer for the marker; positioned before the fence.
    scan: Option<coord::MarkerScan>,
    /// This cutover's journal (none in a dry run).
    journal: Option<Journal>,
    /// The switch started: nothing may be undone.
    switch_started: bool,
}

impl Ctx<'_> {
    fn deadline_check(&self, phase: &str) -> Result<(), CutoverError> {
        let Some(start) = self.window_start else {
            return Ok(());
        };
        let elapsed = start.elapsed();
        if elapsed > self.config.max_window {
            return Err(CutoverError::MaxWindow {
                phase: phase.to_owned(),
                max: self.config.max_window,
                elapsed,
            });
        }
        if self.interrupted.load(Ordering::Relaxed) {
            return Err(CutoverError::Interrupted);
        }
        Ok(())
    }

    /// Records a step in the journal (durable before it returns).
    fn record(&mut self, step: Step, note: impl Into<String>) -> Result<(), CutoverError> {
        match &mut self.journal {
            Some(j) => Ok(j.record(step, note)?),
            None => Ok(()),
        }
    }

    fn remaining(&self) -> Duration {
        self.window_start
            .map(|s| self.config.max_window.saturating_sub(s.elapsed()))
            .unwrap_or(self.config.max_window)
    }
}

/// A fresh cutover id: `cutover-<unix seconds>-<pid>`.
fn new_cutover_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("cutover-{secs}-{}", std::process::id())
}

/// Waits while `<buffer>/postpone-cutover` exists, saying so every few seconds.
async fn wait_postponed(
    config: &CutoverConfig,
    interrupted: &AtomicBool,
) -> Result<bool, CutoverError> {
    let path = config.buffer_dir.join(POSTPONE_FILE);
    let mut waited = false;
    let mut last_said: Option<Instant> = None;
    while path.exists() {
        if interrupted.load(Ordering::Relaxed) {
            return Err(CutoverError::Interrupted);
        }
        if last_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            config.say(&format!(
                "cutover postponed: {} exists; waiting (remove it to proceed)",
                path.display()
            ));
            last_said = Some(Instant::now());
        }
        waited = true;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(waited)
}

async fn prepare_session(client: &Client) -> Result<i32, CutoverError> {
    client
        .batch_execute(&format!(
            "SET default_transaction_read_only = off; SET synchronous_commit = on; \
             SET application_name = 'walshift cutover'; {}",
            verify::SESSION_SETTINGS
        ))
        .await
        .map_err(sql("preparing a session"))?;
    Ok(client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(sql("preparing a session"))?
        .get(0))
}

/// Runs a cutover. `interrupt` resolving (Ctrl-C) stops it: before the fence with
/// [`CutoverError::Interrupted`], after it with an abort (unfenced). See the module docs.
/// With a `publish_via_partition_root` publication (a partition record in the buffer):
/// refuses when a leaf partition was truncated, rewritten, detached or dropped on its own since
/// capture last accepted it (see [`crate::capture::partitions`]); warns about leaves attached
/// after the clone.
async fn check_partitions(
    src: &tokio_postgres::Client,
    dir: &std::path::Path,
    warnings: &mut Vec<String>,
) -> Result<(), CutoverError> {
    use crate::capture::partitions::{self, PartitionRecord, Verdict};
    let record = match PartitionRecord::read(dir) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            warnings.push(format!("could not read the partition record: {e}"));
            return Ok(());
        }
    };
    let seen = partitions::observe(src, &record)
        .await
        .map_err(sql("comparing the leaf partitions with capture's record"))?;
    let changed: Vec<_> = seen
        .differences
        .into_iter()
        .filter(|d| {
            partitions::judge(d, seen.lsn, &record.truncates, crate::lsn::Lsn(u64::MAX))
                != Verdict::Explained
        })
        .collect();
    if !changed.is_empty() {
        return Err(CutoverError::PartitionChanged(changed));
    }
    let later: Vec<String> = record
        .leaves
        .iter()
        .filter(|l| l.attached_later)
        .chain(&seen.new_leaves)
        .map(|l| l.name.clone())
        .collect();
    if !later.is_empty() {
        warnings.push(format!(
            "partition(s) {} were attached after the clone: rows they held before ATTACH PARTITION \
             never passed through the stream; compare their partitioned tables with walshift verify",
            later.join(", ")
        ));
    }
    Ok(())
}

pub async fn run(
    config: CutoverConfig,
    interrupt: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<CutoverReport, CutoverError> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    let watcher = tokio::spawn(async move {
        interrupt.await;
        flag.store(true, Ordering::Relaxed);
    });
    let result = run_inner(&config, interrupted).await;
    watcher.abort();
    result
}

async fn run_inner(
    config: &CutoverConfig,
    interrupted: Arc<AtomicBool>,
) -> Result<CutoverReport, CutoverError> {
    let id = new_cutover_id();
    let mut report = CutoverReport::new(
        id.clone(),
        config.dry_run,
        config.fence.as_str().into(),
        config.verify.as_str().into(),
    );
    let mut tl = Timeline::new();
    config.validate()?;
    // What the last cutover of this buffer left: a switch is never repeated or undone.
    if let Some(previous) = Journal::read(&config.buffer_dir)? {
        match previous.state() {
            State::Open => {}
            State::SwitchInDoubt if config.unfence_after_failed_switch => {
                return unfence_after_failed_switch(config, previous, report, tl).await;
            }
            state if config.unfence_after_failed_switch => {
                return Err(CutoverError::NothingToUnfence {
                    journal: previous.file().to_path_buf(),
                    switched: state != State::Open,
                });
            }
            State::SwitchInDoubt if !config.resume_after_switch => {
                return Err(in_doubt(
                    &previous,
                    "a previous run did not finish".into(),
                    None,
                ));
            }
            state => return after_switch(config, previous, state, report, tl).await,
        }
    }
    if config.resume_after_switch {
        return Err(CutoverError::NothingToResume(Journal::path(
            &config.buffer_dir,
        )));
    }
    if config.unfence_after_failed_switch {
        return Err(CutoverError::NothingToUnfence {
            journal: Journal::path(&config.buffer_dir),
            switched: false,
        });
    }

    if config.buffer_dir.join(POSTPONE_FILE).exists() {
        tl.begin("postpone");
        wait_postponed(config, &interrupted).await?;
        tl.end(&mut report, "waited for the postpone file to go");
    }

    // Preflight: nothing is fenced until it passes.
    tl.begin("preflight");
    let dir = &config.buffer_dir;
    let meta = BufferMeta::read(dir)?.ok_or_else(|| CutoverError::NotABuffer(dir.clone()))?;
    if meta.slot != config.slot {
        return Err(CutoverError::SlotMismatch {
            dir: dir.clone(),
            buffer_slot: meta.slot.clone(),
            slot: config.slot.clone(),
        });
    }
    let buffer_id = target::buffer_id(meta.system_identifier, &meta.slot);
    let src = config.source.connect().await?;
    let own_pid = prepare_session(&src).await?;
    match src
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
    {
        Ok(r) => {
            let found: u64 = r.get::<_, String>(0).parse().unwrap_or(0);
            if found != meta.system_identifier {
                return Err(CutoverError::WrongSource {
                    dir: dir.clone(),
                    expected: meta.system_identifier,
                    found,
                });
            }
        }
        Err(e) => report.warnings.push(format!(
            "could not check the source's system identifier: {e}"
        )),
    }
    let slot_exists = src
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await
        .map_err(sql("looking up the slot"))?
        .is_some();
    if !slot_exists {
        return Err(CutoverError::SlotMissing {
            slot: config.slot.clone(),
        });
    }
    if config.fence == FenceMode::ReadOnly && !config.dry_run {
        fence::check_privileges(&src).await?;
    }
    // Verify evaluates the mapping on the live source: refuse a volatile function now, with
    // nothing fenced, rather than inside the window.
    if let Some(mapping) = &config.transform
        && config.verify != VerifyMode::None
    {
        let tables: Vec<crate::transform::TableName> =
            verify::published_tables(&src, &config.publication)
                .await
                .map_err(sql("listing the published tables"))?
                .into_iter()
                .map(|(s, t, _)| crate::transform::TableName::new(s, t))
                .collect();
        crate::verify::refuse_volatile(
            &src,
            mapping,
            &tables,
            config.verify == VerifyMode::Checksum,
        )
        .await
        .map_err(|e| CutoverError::Verify(verify::CheckError::Mapped(e)))?;
    }
    let leftover = FenceState::read_leftover(dir)?;
    if let Some(l) = &leftover {
        report.warnings.push(format!(
            "cutover {} left the source fenced ({} exists); its recorded previous setting ({:?}) is what unfencing restores",
            l.cutover_id,
            fence::STATE_FILE,
            l.previous
        ));
    }
    // A clone still being copied (by `walshift run` or `capture --clone-to`) is not a target
    // to replay into yet.
    match crate::clone::clone_state(&config.target).await {
        Ok(Some(state)) if state.status != crate::clone::CloneStatus::Done => {
            return Err(CutoverError::CloneUnfinished);
        }
        Ok(_) => {}
        Err(e) => report
            .warnings
            .push(format!("could not read the target's clone state: {e}")),
    }
    // Logical decoding does not carry large objects; the clone copied them and recorded a
    // fingerprint. A moved fingerprint means the copy's large objects are stale.
    match crate::clone::check_large_objects(&config.source, &config.target).await {
        Ok(c) if !c.unchanged() => report.warnings.push(format!(
            "LARGE OBJECTS CHANGED on the source since the clone (recorded: {}, now: {} large objects{}): \
             logical decoding does not carry them, so the copy's are stale. Copy them again before \
             switching the application over",
            c.at_clone.as_ref().map_or("none".to_string(), |f| f.count.to_string()),
            c.now.count,
            if c.now.data_md5.is_none() { "; content not checked: the role cannot read pg_largeobject" } else { "" }
        )),
        Ok(_) => {}
        Err(e) => report
            .warnings
            .push(format!("could not check the source's large objects: {e}")),
    }
    check_partitions(&src, dir, &mut report.warnings).await?;
    let tgt = config.target.connect().await?;
    prepare_session(&tgt).await?;
    let origin = crate::source::identity::TargetOrigin::ClonedByWalshift;
    crate::source::identity::check_replay_target(
        &tgt,
        &config.target.redacted(),
        &meta,
        origin,
        "cut over to",
    )
    .await
    .map_err(|e| CutoverError::Replay(e.into()))?;
    target::ensure_progress_table(&tgt)
        .await
        .map_err(|e| CutoverError::Replay(ReplayError::Target(e)))?;

    let mut helpers = Helpers {
        capture: None,
        replay: None,
    };
    let capture_external = coord::capture_running(dir).map_err(|e| {
        CutoverError::Connect(crate::Error::io(dir.join(crate::buffer::LOCK_FILE), e))
    })?;
    if capture_external {
        report.capture = "external".into();
    } else {
        report.capture = "in-process".into();
        let mut cfg = CaptureConfig::new(config.source.clone(), dir.clone());
        cfg.slot = config.slot.clone();
        cfg.publication = config.publication.clone();
        cfg.flush_interval = config.capture_flush_interval;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let h = tokio::spawn(capture::run(cfg, async move {
            let _ = rx.await;
        }));
        helpers.capture = Some((h, tx));
    }
    let guard = match coord::ReplayGuard::try_acquire(&config.target, &buffer_id).await {
        Ok(g) => g,
        Err(e) => {
            helpers.stop().await; // never leave a capture running behind an error
            return Err(e.into());
        }
    };
    match guard {
        None => report.replay = "external".into(),
        Some(guard) => {
            report.replay = "in-process".into();
            let mut cfg = ReplayConfig::new(dir.clone(), config.target.clone());
            cfg.transform = config.transform.clone();
            cfg.follow = true;
            cfg.batch_time = config.replay_batch_time;
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let h = tokio::spawn(replay::run(cfg, async move {
                let _ = rx.await;
            }));
            helpers.replay = Some((h, tx, guard));
        }
    }

    let hook_ctx = HookContext {
        cutover_id: id.clone(),
        source: config.source.clone(),
        target: config.target.clone(),
        buffer_dir: dir.clone(),
        marker: None,
    };
    let mut ctx = Ctx {
        config,
        report,
        tl,
        src,
        tgt,
        buffer_id,
        helpers,
        interrupted,
        fence_state: None,
        leftover,
        window_start: None,
        hook_ctx,
        table_map: match &config.transform {
            Some(m) => TableMap::from_mapping(m.clone()),
            None => config.table_map.clone(),
        },
        scan: None,
        journal: (!config.dry_run).then(|| {
            let mut j = Journal::new(dir, &id);
            j.after_hook = config.after.is_some();
            j
        }),
        switch_started: false,
    };
    // The marker scan is positioned now, outside the window: finding a position in the buffer
    // reads up to a segment; following it afterwards reads only what is appended.
    let positioned = match wait_for_lag(&mut ctx).await {
        Ok(()) => match wait_prepared(&ctx).await {
            Ok(()) => start_marker_scan(&ctx).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match positioned {
        Ok(scan) => ctx.scan = Some(scan),
        Err(e) => {
            let warnings = ctx.helpers.stop().await;
            ctx.report.warnings.extend(warnings);
            return Err(e);
        }
    }

    // From here on, every failure before the switch aborts and unfences.
    match fenced(&mut ctx, own_pid).await {
        Ok(()) => {}
        Err(cause) => return Err(abort(ctx, cause).await),
    }
    // What the window had to drain, counted now that it is over.
    if let (Some(from), Some(to)) = (ctx.report.applied_at_fence, ctx.report.marker_commit_end) {
        match coord::count_between(dir, from, to) {
            Ok((txns, changes)) => {
                // The marker's own transaction is not a drained change.
                ctx.report.transactions_drained = txns.saturating_sub(1);
                ctx.report.changes_drained = changes;
            }
            Err(e) => ctx
                .report
                .warnings
                .push(format!("could not count the drained changes: {e}")),
        }
    }
    if !config.dry_run {
        if let Some(cmd) = &config.after {
            ctx.tl.begin("after");
            if let Err(e) = ctx.record(Step::AfterHookStarted, cmd.clone()) {
                ctx.report.warnings.push(e.to_string());
            }
            let (run, r) = hooks::run_hook("after", cmd, &ctx.hook_ctx, config.hook_timeout).await;
            ctx.report.hooks.push(run);
            let recorded = match r {
                Ok(()) => {
                    ctx.tl.end(&mut ctx.report, "");
                    ctx.record(Step::AfterHookOk, "")
                }
                Err(e) => {
                    ctx.tl.end(&mut ctx.report, "failed");
                    ctx.report.outcome = Outcome::SwitchedAfterHookFailed;
                    ctx.report.error = Some(e.to_string());
                    ctx.record(Step::AfterHookFailed, e.to_string())
                }
            };
            if let Err(e) = recorded {
                ctx.report.warnings.push(e.to_string());
            }
        }
        if ctx.report.outcome == Outcome::InProgress {
            ctx.report.outcome = Outcome::Switched;
        }
        // The fence stays up on purpose: the source must not take writes any more.
        if let Err(e) = FenceState::remove(dir) {
            ctx.report.warnings.push(e.to_string());
        }
    } else {
        ctx.report.outcome = Outcome::DryRun;
    }
    let warnings = ctx.helpers.stop().await;
    ctx.report.warnings.extend(warnings);
    Ok(ctx.report)
}

/// A marker scan from the target's current applied position, read up to the buffer's end.
async fn start_marker_scan(ctx: &Ctx<'_>) -> Result<coord::MarkerScan, CutoverError> {
    let applied = coord::applied(&ctx.tgt, &ctx.buffer_id)
        .await
        .map_err(sql("reading the target's applied LSN"))?
        .unwrap_or(Lsn::ZERO);
    let mut scan = coord::MarkerScan::new(&ctx.config.buffer_dir, applied, &ctx.report.cutover_id)?;
    scan.poll()?;
    Ok(scan)
}

/// The source database's prepared transactions, described (gid, owner, age).
async fn prepared_xacts(src: &Client) -> Result<Vec<String>, CutoverError> {
    Ok(src
        .query(
            "SELECT format('%L (owner %s, prepared %s ago)', gid, owner, \
                    date_trunc('second', now() - prepared)) \
             FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared",
            &[],
        )
        .await
        .map_err(sql("listing the source's prepared transactions"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Preflight: waits up to `max_prepared_wait` for the source's prepared transactions to end.
async fn wait_prepared(ctx: &Ctx<'_>) -> Result<(), CutoverError> {
    if ctx.config.dry_run {
        return Ok(());
    }
    let started = Instant::now();
    let mut said = false;
    loop {
        let pending = prepared_xacts(&ctx.src).await?;
        if pending.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= ctx.config.max_prepared_wait {
            return Err(CutoverError::PreparedTransactions {
                when: format!(
                    "preflight (waited {:?}); nothing was fenced",
                    ctx.config.max_prepared_wait
                ),
                list: pending.join(", "),
            });
        }
        if ctx.interrupted.load(Ordering::Relaxed) {
            return Err(CutoverError::Interrupted);
        }
        if !said {
            ctx.config.say(&format!(
                "cutover waiting up to {:?} for prepared transactions on the source: {}",
                ctx.config.max_prepared_wait,
                pending.join(", ")
            ));
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Preflight's wait: lag under `max_lag` and no postpone file.
async fn wait_for_lag(ctx: &mut Ctx<'_>) -> Result<(), CutoverError> {
    let config = ctx.config;
    let started = Instant::now();
    let mut last_said = Instant::now();
    let mut said_postpone: Option<Instant> = None;
    let mut meter = coord::LagMeter::new(&config.buffer_dir);
    loop {
        ctx.helpers.check().await?;
        if ctx.interrupted.load(Ordering::Relaxed) {
            return Err(CutoverError::Interrupted);
        }
        let applied = coord::applied(&ctx.tgt, &ctx.buffer_id)
            .await
            .map_err(sql("reading the target's applied LSN"))?
            .unwrap_or(Lsn::ZERO);
        let lag = meter.measure(&ctx.src, &config.slot, applied).await?;
        let postponed = config.buffer_dir.join(POSTPONE_FILE).exists();
        if postponed {
            if said_postpone.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                config.say(&format!(
                    "cutover postponed: {} exists; waiting (remove it to proceed)",
                    config.buffer_dir.join(POSTPONE_FILE).display()
                ));
                said_postpone = Some(Instant::now());
            }
        } else if lag.streaming && lag.settled && lag.secs <= config.max_lag.as_secs_f64() {
            ctx.tl.end(
                &mut ctx.report,
                format!(
                    "lag {:.2} s (capture {} bytes, replay {} bytes)",
                    lag.secs, lag.capture_bytes, lag.replay_bytes
                ),
            );
            return Ok(());
        }
        if let Some(limit) = config.preflight_timeout
            && started.elapsed() > limit
        {
            return Err(CutoverError::LagTimeout {
                lag_secs: lag.secs,
                max: config.max_lag,
                waited: started.elapsed(),
                unconfirmed_bytes: lag.capture_bytes,
                reply_age: lag
                    .reply_age_secs
                    .map(|a| format!("{a:.1} s ago"))
                    .unwrap_or_else(|| "never (no walsender serves the slot)".into()),
            });
        }
        if !postponed && !lag.streaming && last_said.elapsed() >= Duration::from_secs(2) {
            config.say(&format!(
                "cutover waiting for capture to stream from slot {:?} (it is not active yet)",
                config.slot
            ));
            last_said = Instant::now();
        } else if !postponed && last_said.elapsed() >= Duration::from_secs(2) {
            config.say(&format!(
                "cutover waiting for replay to catch up: lag {:.1} s (capture {} bytes, replay {} bytes), need ≤ {:?}",
                lag.secs, lag.capture_bytes, lag.replay_bytes, config.max_lag
            ));
            last_said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fence → switch. Any error returned here aborts.
async fn fenced(ctx: &mut Ctx<'_>, own_pid: i32) -> Result<(), CutoverError> {
    let config = ctx.config;
    let dir = &config.buffer_dir;
    ctx.window_start = Some(ctx.tl.begin("fence"));
    let mut note = String::new();
    if !config.dry_run
        && let Some(cmd) = &config.before
    {
        let (run, r) = hooks::run_hook("before", cmd, &ctx.hook_ctx, config.hook_timeout).await;
        ctx.report.hooks.push(run);
        r?;
        note.push_str("before hook ran; ");
    }
    match (config.fence, config.dry_run) {
        (FenceMode::ReadOnly, false) => {
            let state =
                fence::prepare(&ctx.src, dir, &ctx.report.cutover_id, ctx.leftover.take()).await?;
            ctx.report.fence_previous_setting = state.previous.clone();
            ctx.fence_state = Some(state.clone());
            if let Some(j) = &mut ctx.journal {
                j.fence = Some(state.clone());
            }
            ctx.record(Step::Fenced, "read-only")?;
            let timeout = config.terminate_timeout.min(ctx.remaining());
            ctx.report.fence_role_settings_removed =
                state.role_overrides.iter().map(|o| o.to_string()).collect();
            let n = fence::raise(&ctx.src, &state, &[own_pid], timeout.as_millis() as i64).await?;
            fence::prove_new_session(&config.source, &state.database).await?;
            // One prepared between preflight's check and the termination survives it.
            let pending = prepared_xacts(&ctx.src).await?;
            if !pending.is_empty() {
                return Err(CutoverError::PreparedTransactions {
                    when: "after the fence".into(),
                    list: pending.join(", "),
                });
            }
            ctx.report.sessions_terminated = n;
            note.push_str(&format!("read-only; {n} session(s) terminated"));
        }
        (FenceMode::ReadOnly, true) => {
            let n = fence::other_sessions(&ctx.src, &[own_pid]).await?.len();
            note.push_str(&format!("dry run: would terminate {n} session(s)"));
        }
        (FenceMode::Hook, _) => {
            ctx.record(Step::Fenced, "by the before hook")?;
            note.push_str("fenced by the before hook")
        }
        (FenceMode::None, _) => {
            ctx.record(Step::Fenced, "none")?;
            note.push_str("none (writes stopped by the operator)")
        }
    }
    let applied_at_fence = coord::applied(&ctx.tgt, &ctx.buffer_id)
        .await
        .map_err(sql("reading the target's applied LSN"))?
        .unwrap_or(Lsn::ZERO);
    ctx.report.applied_at_fence = Some(applied_at_fence);
    ctx.tl.end(&mut ctx.report, note.trim_end_matches("; "));
    ctx.deadline_check("fence")?;

    // Marker.
    ctx.tl.begin("marker");
    ctx.src
        .query_one(
            "SELECT pg_logical_emit_message(true, $1, $2)::text",
            &[&crate::apply::replay::MARKER_PREFIX, &ctx.report.cutover_id],
        )
        .await
        .map_err(sql("writing the cutover marker on the source"))?;
    let marker: Lsn = ctx
        .src
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await
        .map_err(sql("reading the source's WAL position"))?
        .get::<_, String>(0)
        .parse()
        .unwrap_or_default();
    ctx.report.marker_lsn = Some(marker);
    ctx.record(Step::Marker, marker.to_string())?;
    ctx.tl.end(&mut ctx.report, format!("at {marker}"));

    // Drain: durable in the buffer (slot confirmed) and applied on the target.
    ctx.tl.begin("drain");
    let mut scan = ctx.scan.take().expect("positioned after preflight");
    let mut durable = false;
    let end = loop {
        ctx.deadline_check("drain")?;
        ctx.helpers.check().await?;
        // Durable: the slot is confirmed past the end of the marker's transaction (capture
        // confirms only what the buffer has fsynced).
        let found = scan.poll()?;
        if !durable && let Some(end) = found {
            durable = coord::slot_confirmed(&ctx.src, &config.slot)
                .await
                .map_err(sql("reading the slot's confirmed position"))?
                .is_some_and(|c| c >= end);
        }
        if durable && let Some(end) = found {
            let applied = coord::applied(&ctx.tgt, &ctx.buffer_id)
                .await
                .map_err(sql("reading the target's applied LSN"))?
                .unwrap_or(Lsn::ZERO);
            if applied >= end {
                break end;
            }
        }
        tokio::time::sleep(config.poll_interval).await;
    };
    ctx.report.marker_commit_end = Some(end);
    ctx.hook_ctx.marker = Some(end);
    ctx.record(Step::Drained, end.to_string())?;
    ctx.tl.end(&mut ctx.report, format!("applied past {end}"));

    // Sequences.
    ctx.deadline_check("sequences")?;
    ctx.tl.begin("sequences");
    let synced = sequences::sync(&ctx.src, &ctx.tgt, &ctx.table_map)
        .await
        .map_err(sql("syncing sequences"))?;
    ctx.report.sequences = synced.set;
    ctx.report.sequences_skipped = synced.skipped;
    let note = format!("{} set", ctx.report.sequences.len());
    ctx.record(Step::Sequences, note.clone())?;
    ctx.tl.end(&mut ctx.report, note);

    // Verify.
    ctx.deadline_check("verify")?;
    ctx.tl.begin("verify");
    if config.verify != VerifyMode::None {
        let tables = verify::published_tables(&ctx.src, &config.publication)
            .await
            .map_err(sql("listing the published tables"))?;
        let remaining = ctx.remaining();
        // The server stops with the window too: a query left running would hold this session
        // (and the unfence behind it).
        ctx.src
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                remaining.as_millis().max(1)
            ))
            .await
            .map_err(sql(
                "limiting verify's statements on the source to the window",
            ))?;
        let checks = match tokio::time::timeout(
            remaining,
            verify::verify_tables(
                &ctx.src,
                &ctx.tgt,
                &tables,
                &ctx.table_map,
                config.transform.as_deref(),
                config.verify,
            ),
        )
        .await
        {
            Ok(r) => {
                let checks = r?;
                ctx.src
                    .batch_execute("SET statement_timeout = 0")
                    .await
                    .map_err(sql("resetting statement_timeout on the source"))?;
                checks
            }
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
        ctx.record(Step::Verified, format!("{n} tables"))?;
        ctx.tl.end(&mut ctx.report, format!("{n} tables"));
    } else {
        ctx.tl.end(&mut ctx.report, "skipped (--verify none)");
    }

    if config.dry_run {
        ctx.report.window_secs = ctx.window_start.map(|s| s.elapsed().as_secs_f64());
        return Ok(());
    }

    // Switch.
    ctx.deadline_check("the switch (not started)")?;
    ctx.tl.begin("switch");
    // Durable before the hook runs: from here on walshift undoes nothing on its own.
    ctx.record(
        Step::SwitchStarted,
        config.switch.clone().unwrap_or_default(),
    )?;
    ctx.switch_started = true;
    if let Some(cmd) = &config.switch {
        let (run, r) = hooks::run_hook("switch", cmd, &ctx.hook_ctx, config.hook_timeout).await;
        ctx.report.hooks.push(run);
        if let Err(e) = r {
            // A hook that failed part-way may have moved some of the traffic: in doubt.
            ctx.record(Step::SwitchFailed, e.to_string())?;
            return Err(e.into());
        }
        ctx.record(Step::SwitchDone, "switch hook done")?;
        ctx.tl.end(&mut ctx.report, "switch hook done");
    } else {
        ctx.record(Step::SwitchDone, "no --switch hook")?;
        ctx.tl.end(&mut ctx.report, "no --switch hook");
    }
    ctx.report.window_secs = ctx.window_start.map(|s| s.elapsed().as_secs_f64());
    Ok(())
}

/// Lifts the fence, stops in-process helpers and wraps the cause.
async fn abort(mut ctx: Ctx<'_>, cause: CutoverError) -> CutoverError {
    let config = ctx.config;
    ctx.tl.end_open(&mut ctx.report, format!("failed: {cause}"));
    if ctx.switch_started {
        ctx.report.outcome = Outcome::SwitchInDoubt;
        ctx.report.error = Some(cause.to_string());
        let warnings = ctx.helpers.stop().await;
        ctx.report.warnings.extend(warnings);
        let journal = ctx
            .journal
            .take()
            .unwrap_or_else(|| Journal::new(&config.buffer_dir, ""));
        return in_doubt(&journal, cause.to_string(), Some(ctx.report));
    }
    ctx.tl.begin("unfence");
    let mut unfenced = Ok(());
    let had_fence = ctx.fence_state.is_some();
    if let Some(state) = ctx.fence_state.take() {
        unfenced = lift_with_retry(config, &ctx.src, &config.buffer_dir, &state).await;
    }
    let note = match &unfenced {
        Ok(()) if ctx.report.fence_previous_setting.is_some() || had_fence => {
            "previous setting restored"
        }
        Ok(()) => "nothing to undo",
        Err(_) => "FAILED",
    };
    ctx.tl.end(&mut ctx.report, note);
    ctx.report.outcome = Outcome::Aborted;
    ctx.report.error = Some(cause.to_string());
    let recorded = match &unfenced {
        Ok(()) => ctx.record(Step::Aborted, "unfenced"),
        Err(e) => ctx.record(Step::Aborted, format!("unfencing failed: {e}")),
    };
    if let Err(e) = recorded {
        ctx.report.warnings.push(e.to_string());
    }
    let warnings = ctx.helpers.stop().await;
    ctx.report.warnings.extend(warnings);
    CutoverError::Aborted(Box::new(Aborted {
        cause,
        report: ctx.report,
        unfenced,
        fence: config.fence,
    }))
}

/// Lifts the fence over the existing session, or a new one if that session is gone.
async fn lift_with_retry(
    config: &CutoverConfig,
    src: &Client,
    dir: &Path,
    state: &FenceState,
) -> Result<(), String> {
    if fence::lift(src, dir, state).await.is_ok() {
        return Ok(());
    }
    let mut last = String::new();
    for _ in 0..5 {
        match config.source.connect().await {
            Ok(c) => match fence::lift(&c, dir, state).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last)
}

/// A journal time (seconds since the Unix epoch) in UTC, RFC 3339.
fn rfc3339(secs: f64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs_f64(secs))
        .to_string()
}

/// The refusal (or the interruption) of a switch whose end is unknown.
fn in_doubt(journal: &Journal, cause: String, report: Option<CutoverReport>) -> CutoverError {
    CutoverError::SwitchInDoubt(Box::new(SwitchInDoubt {
        cutover_id: journal.cutover_id.clone(),
        cause,
        started_at: journal.when(Step::SwitchStarted).map(rfc3339),
        journal: journal.file().to_path_buf(),
        report,
    }))
}

/// A rerun after the switch: finishes what is left (the switch confirmed by the operator, a
/// failed after hook, an after hook that was due or started and never recorded a result — run
/// again, so after hooks must be safe to run twice) and never repeats or undoes the switch.
/// Without `--after`, an after hook left failed or unfinished keeps the outcome (exit 4).
async fn after_switch(
    config: &CutoverConfig,
    mut journal: Journal,
    state: State,
    mut report: CutoverReport,
    mut tl: Timeline,
) -> Result<CutoverReport, CutoverError> {
    let dir = &config.buffer_dir;
    report.cutover_id = journal.cutover_id.clone();
    report.fence_previous_setting = journal.fence.as_ref().and_then(|f| f.previous.clone());
    if state == State::Switched {
        config.say(&format!(
            "cutover {} already switched (recorded in {}); nothing left to do{}",
            journal.cutover_id,
            journal.file().display(),
            if config.after.is_some() {
                " (--after not run: its hook succeeded or none was due)"
            } else {
                ""
            }
        ));
        report.outcome = Outcome::AlreadySwitched;
        return Ok(report);
    }
    if state == State::SwitchInDoubt {
        tl.begin("resume");
        journal.after_hook = config.after.is_some();
        journal.record(
            Step::SwitchDone,
            "recorded by --resume-after-switch: the operator confirmed where traffic points",
        )?;
        let src = config.source.connect().await?;
        prepare_session(&src).await?;
        let tgt = config.target.connect().await?;
        prepare_session(&tgt).await?;
        let map = match &config.transform {
            Some(m) => TableMap::from_mapping(m.clone()),
            None => config.table_map.clone(),
        };
        let synced = sequences::sync(&src, &tgt, &map)
            .await
            .map_err(sql("syncing sequences (forward only)"))?;
        report.sequences = synced.set;
        report.sequences_skipped = synced.skipped;
        if let Err(e) = FenceState::remove(dir) {
            report.warnings.push(e.to_string());
        }
        let note = format!(
            "switch recorded done; sequences set forward only ({} kept, target ahead)",
            report.sequences.iter().filter(|s| s.target_ahead).count()
        );
        tl.end(&mut report, note);
    }
    match &config.after {
        Some(cmd) => {
            tl.begin("after");
            let hook_ctx = HookContext {
                cutover_id: journal.cutover_id.clone(),
                source: config.source.clone(),
                target: config.target.clone(),
                buffer_dir: dir.clone(),
                marker: journal
                    .entries
                    .iter()
                    .find(|e| e.step == Step::Drained)
                    .and_then(|e| e.note.parse().ok()),
            };
            let note = if state == State::SwitchedAfterHookUnfinished {
                format!("{cmd} (again: the last one never recorded a result)")
            } else {
                cmd.clone()
            };
            journal.record(Step::AfterHookStarted, note)?;
            let (run, r) = hooks::run_hook("after", cmd, &hook_ctx, config.hook_timeout).await;
            report.hooks.push(run);
            match r {
                Ok(()) => {
                    tl.end(&mut report, "");
                    journal.record(Step::AfterHookOk, "")?;
                    report.outcome = Outcome::Switched;
                }
                Err(e) => {
                    tl.end(&mut report, "failed");
                    journal.record(Step::AfterHookFailed, e.to_string())?;
                    report.outcome = Outcome::SwitchedAfterHookFailed;
                    report.error = Some(e.to_string());
                }
            }
        }
        None if state == State::SwitchedAfterHookFailed => {
            report.warnings.push(format!(
                "the --after hook of cutover {} failed and no --after was given, so nothing ran: \
                 run the after-steps by hand, or run cutover again with --after",
                journal.cutover_id
            ));
            report.outcome = Outcome::SwitchedAfterHookFailed;
        }
        None if state == State::SwitchedAfterHookUnfinished => {
            let started = journal
                .when(Step::AfterHookStarted)
                .filter(|_| journal.last_after_hook_step() == Some(Step::AfterHookStarted));
            let msg = format!(
                "the --after hook of cutover {} {}, and no --after was given, so nothing ran: \
                 whether it did its work is unknown. Check, then run cutover again with the same \
                 --after (it runs again, so it must be safe to run twice) or do the after-steps \
                 by hand and run cutover again with --after true",
                journal.cutover_id,
                match started.map(rfc3339) {
                    Some(at) => format!(
                        "started at {at} and never recorded a result (walshift died while it ran)"
                    ),
                    None => "was due and never started (walshift died after the switch)".into(),
                }
            );
            report.error = Some(msg.clone());
            report.warnings.push(msg);
            report.outcome = Outcome::SwitchedAfterHookUnfinished;
        }
        None => report.outcome = Outcome::Switched,
    }
    Ok(report)
}

/// The operator's way out of a switch in doubt when traffic never left the source: lifts the
/// fence exactly as the journal (or `cutover-fence.json`) recorded it and journals that, so a
/// new cutover may run. Touches nothing else: the buffer, the slot, the target and its
/// sequences stay as they are.
async fn unfence_after_failed_switch(
    config: &CutoverConfig,
    mut journal: Journal,
    mut report: CutoverReport,
    mut tl: Timeline,
) -> Result<CutoverReport, CutoverError> {
    let dir = &config.buffer_dir;
    report.cutover_id = journal.cutover_id.clone();
    tl.begin("unfence");
    let recorded = match journal.fence.clone() {
        Some(state) => Some(state),
        None => FenceState::read_leftover(dir)?.filter(|l| l.cutover_id == journal.cutover_id),
    };
    let note = match &recorded {
        Some(state) => {
            let src = config.source.connect().await?;
            fence::lift(&src, dir, state).await?;
            report.fence_previous_setting = state.previous.clone();
            report.fence_role_settings_removed =
                state.role_overrides.iter().map(|o| o.to_string()).collect();
            format!(
                "default_transaction_read_only {}; {} role setting(s) put back",
                match &state.previous {
                    Some(v) => format!("restored to {v:?}"),
                    None => "reset".into(),
                },
                state.role_overrides.len()
            )
        }
        None => {
            "no read-only fence recorded (--fence hook or none): nothing for walshift to lift; \
                 undo what --before did by hand"
                .into()
        }
    };
    journal.record(
        Step::UnfencedAfterFailedSwitch,
        format!("the operator confirmed traffic never left the source; {note}"),
    )?;
    tl.end(&mut report, note);
    report.warnings.push(format!(
        "cutover {}: the source takes writes again. Anything the application wrote to the target after the \
         switch started is not on the source; the next cutover's verify finds such differences",
        journal.cutover_id
    ));
    report.outcome = Outcome::UnfencedAfterFailedSwitch;
    Ok(report)
}
