//! The cutover report: a timeline of every phase (start offset and duration), the write
//! window, what was drained, synced and verified, and the outcome. Rendered as a human table
//! (`Display`) or as JSON (`serde`).

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::lsn::Lsn;

/// How a cutover ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Traffic was switched; the source stays fenced.
    Switched,
    /// Switched, but the `--after` hook failed (the switch itself stands; the source stays
    /// fenced). Run the after-steps by hand.
    SwitchedAfterHookFailed,
    /// A rerun found the `--after` hook due or started and never finished (walshift died),
    /// and was given no `--after` to run again: whether it did its work is unknown.
    SwitchedAfterHookUnfinished,
    /// A rehearsal: nothing was fenced or switched.
    DryRun,
    /// Stopped before the switch; the source was unfenced.
    Aborted,
    /// The switch started and did not complete (the hook failed or was killed, walshift was
    /// interrupted): the source stays fenced; see [`super::SwitchInDoubt`].
    SwitchInDoubt,
    /// After a switch in doubt, the operator confirmed traffic never left the source: the
    /// fence was lifted exactly as recorded (`--unfence-after-failed-switch`).
    UnfencedAfterFailedSwitch,
    /// A rerun found the switch recorded done and nothing left to do.
    AlreadySwitched,
    /// Still running (only seen in a report taken mid-way).
    InProgress,
}

/// One phase of the timeline.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseTiming {
    /// `postpone`, `preflight`, `fence`, `marker`, `drain`, `sequences`, `verify`, `switch`,
    /// `after`, `unfence`.
    pub name: String,
    /// Seconds from the start of the cutover command to the start of this phase.
    pub start_secs: f64,
    /// Seconds the phase took.
    pub duration_secs: f64,
    /// Short note (skipped, what was done, why it failed).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// One target sequence set from the source.
#[derive(Clone, Debug, Serialize)]
pub struct SequenceSync {
    pub source: String,
    pub target: String,
    pub last_value: i64,
    pub is_called: bool,
    /// The target was already past the source: its value was kept (never set backwards).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub target_ahead: bool,
}

/// One table's verification.
#[derive(Clone, Debug, Serialize)]
pub struct TableCheck {
    pub source: String,
    pub target: String,
    pub source_rows: i64,
    pub target_rows: i64,
    /// Order-independent checksums (checksum mode only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_checksum: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_checksum: Option<String>,
    pub equal: bool,
}

/// A hook's run.
#[derive(Clone, Debug, Serialize)]
pub struct HookRun {
    /// `before`, `switch` or `after`.
    pub hook: String,
    pub command: String,
    /// Exit code (`None`: killed by a signal or by the timeout).
    pub exit_code: Option<i32>,
    pub duration_secs: f64,
    /// The last lines of its stdout and stderr.
    pub output_tail: String,
}

/// Everything a cutover did, for people (`Display`) and machines (`serde_json`).
#[derive(Clone, Debug, Serialize)]
pub struct CutoverReport {
    pub cutover_id: String,
    pub dry_run: bool,
    /// `read-only`, `hook` or `none`.
    pub fence: String,
    /// Value of the database's `default_transaction_read_only` setting before the fence
    /// (`None`: not set for the database); what unfencing restores.
    pub fence_previous_setting: Option<String>,
    /// Role settings of `default_transaction_read_only` the fence removed (they would have let
    /// those roles write); restored on abort, left removed after a switch.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fence_role_settings_removed: Vec<String>,
    /// Client sessions terminated by the fence.
    pub sessions_terminated: u64,
    /// PgBouncer's part (`--pooler`): the database paused, the entries, how long clients were
    /// held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pooler: Option<super::pooler::PoolerReport>,
    /// `external` (a running `walshift capture`/`walshift run`) or `in-process`.
    pub capture: String,
    /// `external` or `in-process`.
    pub replay: String,
    /// Where the marker message is in the source's WAL (`pg_logical_emit_message`'s answer).
    pub marker_lsn: Option<Lsn>,
    /// End LSN of the marker's transaction (what the target's applied LSN passed).
    pub marker_commit_end: Option<Lsn>,
    /// The target's applied LSN when the fence went up.
    pub applied_at_fence: Option<Lsn>,
    /// Source transactions and row changes applied between the fence and the marker.
    pub transactions_drained: u64,
    pub changes_drained: u64,
    pub phases: Vec<PhaseTiming>,
    /// Fence start → switch done (dry run: fence start → verify and the rehearsal of what the
    /// real window does besides done, the projection).
    pub window_secs: Option<f64>,
    pub outcome: Outcome,
    /// Why it aborted, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub sequences: Vec<SequenceSync>,
    /// Source sequences with no counterpart on the target (not set).
    pub sequences_skipped: Vec<String>,
    pub verify_mode: String,
    pub verified: Vec<TableCheck>,
    pub hooks: Vec<HookRun>,
    /// Things the operator should know that did not stop the cutover.
    pub warnings: Vec<String>,
}

impl CutoverReport {
    pub(crate) fn new(cutover_id: String, dry_run: bool, fence: String, verify: String) -> Self {
        CutoverReport {
            cutover_id,
            dry_run,
            fence,
            fence_previous_setting: None,
            fence_role_settings_removed: Vec::new(),
            sessions_terminated: 0,
            pooler: None,
            capture: String::new(),
            replay: String::new(),
            marker_lsn: None,
            marker_commit_end: None,
            applied_at_fence: None,
            transactions_drained: 0,
            changes_drained: 0,
            phases: Vec::new(),
            window_secs: None,
            outcome: Outcome::InProgress,
            error: None,
            sequences: Vec::new(),
            sequences_skipped: Vec::new(),
            verify_mode: verify,
            verified: Vec::new(),
            hooks: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// The duration of a phase, if it ran.
    pub fn phase(&self, name: &str) -> Option<Duration> {
        self.phases
            .iter()
            .find(|p| p.name == name)
            .map(|p| Duration::from_secs_f64(p.duration_secs))
    }

    /// The window (fence → traffic moved, or the dry run's projection).
    pub fn window(&self) -> Option<Duration> {
        self.window_secs.map(Duration::from_secs_f64)
    }
}

/// Records phases against the start of the command.
pub(crate) struct Timeline {
    start: Instant,
    current: Option<(String, Instant)>,
}

impl Timeline {
    pub fn new() -> Self {
        Timeline {
            start: Instant::now(),
            current: None,
        }
    }

    /// Starts a phase (ending none: phases are closed explicitly with [`Timeline::end`]).
    pub fn begin(&mut self, name: &str) -> Instant {
        let now = Instant::now();
        self.current = Some((name.to_owned(), now));
        now
    }

    /// Ends the current phase with a note; returns when it ended.
    pub fn end(&mut self, report: &mut CutoverReport, note: impl Into<String>) -> Instant {
        let now = Instant::now();
        if let Some((name, began)) = self.current.take() {
            report.phases.push(PhaseTiming {
                name,
                start_secs: began.duration_since(self.start).as_secs_f64(),
                duration_secs: now.duration_since(began).as_secs_f64(),
                note: note.into(),
            });
        }
        now
    }

    /// Ends the current phase if one is open (used on the abort path).
    pub fn end_open(&mut self, report: &mut CutoverReport, note: impl Into<String>) {
        if self.current.is_some() {
            self.end(report, note);
        }
    }
}

fn ms(secs: f64) -> String {
    format!("{:.1} ms", secs * 1000.0)
}

impl fmt::Display for CutoverReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = match self.outcome {
            Outcome::Switched => "SWITCHED",
            Outcome::SwitchedAfterHookFailed => "SWITCHED (after-hook failed)",
            Outcome::SwitchedAfterHookUnfinished => "SWITCHED (after-hook unfinished, unknown)",
            Outcome::DryRun => "DRY RUN (nothing fenced, nothing switched)",
            Outcome::Aborted => "ABORTED (source unfenced)",
            Outcome::SwitchInDoubt => "SWITCH IN DOUBT (source stays fenced)",
            Outcome::UnfencedAfterFailedSwitch => {
                "UNFENCED AFTER A FAILED SWITCH (on the operator's word; the source takes writes again)"
            }
            Outcome::AlreadySwitched => "ALREADY SWITCHED (nothing left to do)",
            Outcome::InProgress => "IN PROGRESS",
        };
        writeln!(f, "cutover {}: {outcome}", self.cutover_id)?;
        writeln!(
            f,
            "fence {} | capture {} | replay {} | verify {}",
            self.fence, self.capture, self.replay, self.verify_mode
        )?;
        writeln!(
            f,
            "{:<11} {:>12} {:>12}  note",
            "phase", "start", "duration"
        )?;
        for p in &self.phases {
            writeln!(
                f,
                "{:<11} {:>12} {:>12}  {}",
                p.name,
                ms(p.start_secs),
                ms(p.duration_secs),
                p.note
            )?;
        }
        match (self.window_secs, self.dry_run) {
            (Some(w), false) => writeln!(f, "window (fence → traffic moved): {}", ms(w))?,
            (Some(w), true) => writeln!(
                f,
                "projected window (fence → verify, plus the fence's, journal's and switch's costs as rehearsed; \
                 without ALTER DATABASE, terminating sessions and the hooks' work): {}",
                ms(w)
            )?,
            (None, _) => {}
        }
        if let Some(p) = &self.pooler {
            writeln!(
                f,
                "pooler: database {:?} {}{}{}{}",
                p.database,
                match (
                    p.resumed,
                    self.outcome == Outcome::Switched
                        || self.outcome == Outcome::SwitchedAfterHookFailed
                ) {
                    (true, true) => format!("repointed to {} and resumed", p.entry_after),
                    (true, false) => format!("resumed on {}", p.entry_before),
                    (false, _) if self.dry_run =>
                        format!("would be paused, then repointed to {}", p.entry_after),
                    (false, _) => format!("NOT RESUMED (entry was {})", p.entry_before),
                },
                p.pause_wait_secs
                    .map(|s| format!("; PAUSE waited {} for transactions in flight", ms(s)))
                    .unwrap_or_default(),
                p.paused_secs
                    .map(|s| format!("; paused for {}", ms(s)))
                    .unwrap_or_default(),
                match (p.clients_waiting, p.longest_client_wait_secs) {
                    (Some(n), Some(w)) => format!(
                        "; {n} client transaction(s) queued at RESUME, the longest waiting {}",
                        ms(w)
                    ),
                    _ => String::new(),
                },
            )?;
        }
        if let (Some(m), Some(e)) = (self.marker_lsn, self.marker_commit_end) {
            writeln!(
                f,
                "marker at {m} (transaction end {e}); drained {} transactions, {} changes after the fence",
                self.transactions_drained, self.changes_drained
            )?;
        }
        writeln!(
            f,
            "sequences set: {}{}",
            self.sequences.len(),
            if self.sequences_skipped.is_empty() {
                String::new()
            } else {
                format!(
                    " (not on the target, skipped: {})",
                    self.sequences_skipped.join(", ")
                )
            }
        )?;
        let differing: Vec<&TableCheck> = self.verified.iter().filter(|t| !t.equal).collect();
        if self.verify_mode != "none" {
            writeln!(
                f,
                "verified: {} tables, {} differ",
                self.verified.len(),
                differing.len()
            )?;
            for t in differing {
                writeln!(
                    f,
                    "  {} → {}: {} rows vs {} rows{}",
                    t.source,
                    t.target,
                    t.source_rows,
                    t.target_rows,
                    match (&t.source_checksum, &t.target_checksum) {
                        (Some(a), Some(b)) => format!(", checksum {a} vs {b}"),
                        _ => String::new(),
                    }
                )?;
            }
        }
        for h in &self.hooks {
            writeln!(
                f,
                "hook {} exited {} after {}",
                h.hook,
                h.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "by signal/timeout".into()),
                ms(h.duration_secs)
            )?;
        }
        if !self.fence_role_settings_removed.is_empty() {
            writeln!(
                f,
                "role settings removed by the fence: {}",
                self.fence_role_settings_removed.join(", ")
            )?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        if let Some(e) = &self.error {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}
