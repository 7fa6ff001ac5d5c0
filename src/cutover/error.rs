//! [`CutoverError`], and the two failures that carry the report: [`Aborted`] (stopped before
//! the switch, the fence lifted) and [`SwitchInDoubt`] (the switch started and its end is not
//! known: the source stays fenced until the operator says where traffic points).

use std::path::PathBuf;
use std::time::Duration;

use super::fence::{self, FenceError, FenceMode};
use super::hooks::HookError;
use super::journal::{self, Journal, Step};
use super::lag::LagError;
use super::report::CutoverReport;
use super::verify;
use crate::apply::replay::ReplayError;
use crate::buffer::BufferError;
use crate::capture::CaptureError;
use crate::error::SqlError;

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

    /// Cutover's own session on the source or the target closed inside the window (the
    /// server restarted, failed over, or dropped it).
    #[error(
        "lost the connection to the {server} during {phase}: it restarted, failed over or dropped \
         cutover's session"
    )]
    ServerLost { server: &'static str, phase: String },

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
    Pooler(#[from] super::pooler::PoolerError),

    #[error(transparent)]
    Buffer(#[from] BufferError),

    #[error(transparent)]
    Lag(#[from] LagError),

    #[error(transparent)]
    Verify(#[from] verify::CheckError),

    #[error(transparent)]
    Connect(#[from] crate::Error),

    #[error(transparent)]
    Sql(#[from] SqlError),

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
    "cutover {} aborted before the switch: {cause_text}. {unfence}. Nothing captured is lost (the buffer, the slot and \
     the target's applied position are intact); {advice}, then run walshift cutover again",
    report.cutover_id,
    cause_text = crate::error::chain_text(&self.cause),
    unfence = self.unfence_text(),
    advice = self.advice()
)]
pub struct Aborted {
    pub cause: CutoverError,
    /// The report up to the abort (outcome [`super::Outcome::Aborted`]).
    pub report: CutoverReport,
    /// `Ok` if the fence was lifted (or there was none); the error text if lifting failed.
    pub unfenced: Result<(), String>,
    /// `--pooler`: why the paused pool could not be resumed, if it could not.
    pub pooler_paused: Option<String>,
    pub(super) fence: FenceMode,
}

impl Aborted {
    fn unfence_text(&self) -> String {
        let fence = self.fence_text();
        match (&self.pooler_paused, &self.report.pooler) {
            (Some(p), _) => format!("{fence}. {p}"),
            (None, Some(r)) if r.resumed => {
                format!(
                    "{fence}. PgBouncer's database {:?} was resumed on the source",
                    r.database
                )
            }
            _ => fence,
        }
    }

    fn fence_text(&self) -> String {
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
            CutoverError::ServerLost { .. } => {
                "wait until the server is back and capture and replay stream again (walshift run, \
                 capture and replay reconnect by themselves)"
            }
            CutoverError::Hook(_) => "fix the hook",
            CutoverError::Interrupted => "when ready",
            _ => "fix the cause above",
        }
    }
}

/// A journal time (seconds since the Unix epoch) in UTC, RFC 3339.
pub(super) fn rfc3339(secs: f64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs_f64(secs))
        .to_string()
}

/// The refusal (or the interruption) of a switch whose end is unknown.
pub(super) fn in_doubt(
    journal: &Journal,
    cause: String,
    report: Option<CutoverReport>,
) -> CutoverError {
    CutoverError::SwitchInDoubt(Box::new(SwitchInDoubt {
        cutover_id: journal.cutover_id.clone(),
        cause,
        started_at: journal.when(Step::SwitchStarted).map(rfc3339),
        journal: journal.file().to_path_buf(),
        report,
    }))
}
