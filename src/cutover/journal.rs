//! The cutover journal: `<buffer>/cutover-journal.json`, the durable record of how far a
//! cutover got, read first by every cutover of the buffer.
//!
//! Each step is appended as it happens: fenced (with what unfencing restores), marker, drained,
//! sequences, verified, **switch started**, **switch done** (or switch failed: the hook exited
//! non-zero, and may have moved part of the traffic before failing), **after started** and the
//! after hook's result, aborted, and — only on the operator's word — unfenced after a failed
//! switch. The file is rewritten with fsync + rename (mode 0600) before walshift goes on after
//! every step a later run decides on; marker, drained, sequences and verified are only noted
//! ([`Journal::note`]) and reach the file with the next such step (switch started, or aborted),
//! which keeps four durable writes out of the window. Whether an `--after`
//! hook is due is recorded with the journal before the fence, so a cutover killed between the
//! switch and the after hook is not taken for finished either.
//!
//! **Contract:** once `switch started` is recorded, walshift never lifts the fence of that
//! source on its own and never moves a target sequence backwards; a later cutover of the
//! buffer reads the journal and either finishes what was left (the after hook: a failed one,
//! or one that was due or started and never recorded a result — it is run again, so an after
//! hook must be safe to run twice), says nothing is left, or refuses until the operator says where traffic points: `--resume-after-switch`
//! (it reached the target) or `--unfence-after-failed-switch` (none of it ever left the
//! source: the fence is lifted exactly and that is recorded).

use crate::buffer::fs::FileSystem;
use std::path::{Path, PathBuf};

use super::fence::FenceState;

/// Name of the journal file in the buffer directory.
pub const JOURNAL_FILE: &str = "cutover-journal.json";

/// One step of a cutover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Fenced,
    Marker,
    Drained,
    Sequences,
    Verified,
    SwitchStarted,
    SwitchDone,
    /// The switch hook failed (exited non-zero, or was killed): part of the traffic may have
    /// moved before it failed, so the switch stays in doubt.
    SwitchFailed,
    /// Recorded before the after hook runs: without a result after it, walshift died while
    /// the hook ran and what the hook did is unknown.
    AfterHookStarted,
    AfterHookOk,
    AfterHookFailed,
    /// Stopped before the switch started; the fence was lifted (or there was none).
    Aborted,
    /// After a switch in doubt, the operator confirmed that traffic never left the source
    /// (`--unfence-after-failed-switch`); the fence was lifted as recorded.
    UnfencedAfterFailedSwitch,
}

/// A recorded step.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub step: Step,
    /// Seconds since the Unix epoch.
    pub at: f64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// Where the journal says the last cutover of this buffer stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No cutover got as far as the switch (none ran, it aborted, or it died before the
    /// switch): a new cutover may run.
    Open,
    /// The switch started and its end was never recorded: traffic may point anywhere.
    SwitchInDoubt,
    /// Switched; the after hook failed.
    SwitchedAfterHookFailed,
    /// Switched; the after hook was due or started and never recorded a result (walshift
    /// died before or while it ran): whether it did anything is unknown.
    SwitchedAfterHookUnfinished,
    /// Switched; nothing left to do.
    Switched,
}

/// The journal of one cutover.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Journal {
    pub cutover_id: String,
    /// What lifting the fence restores (read-only fence only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<FenceState>,
    /// An `--after` hook is due after the switch (journals of earlier versions: unknown, taken
    /// as none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub after_hook: bool,
    pub entries: Vec<Entry>,
    #[serde(skip)]
    path: PathBuf,
}

/// Journal failures.
#[derive(Debug, thiserror::Error)]
#[error("cutover journal {path}: {source}")]
pub struct JournalError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl Journal {
    pub fn path(buffer_dir: &Path) -> PathBuf {
        buffer_dir.join(JOURNAL_FILE)
    }

    /// A fresh journal for `cutover_id` (not written until the first [`Journal::record`]).
    pub fn new(buffer_dir: &Path, cutover_id: &str) -> Self {
        Journal {
            cutover_id: cutover_id.to_owned(),
            fence: None,
            after_hook: false,
            entries: Vec::new(),
            path: Self::path(buffer_dir),
        }
    }

    /// The journal of the buffer's last cutover, if any.
    pub fn read(buffer_dir: &Path) -> Result<Option<Journal>, JournalError> {
        let path = Self::path(buffer_dir);
        match std::fs::read(&path) {
            Ok(b) => {
                let mut j: Journal = serde_json::from_slice(&b).map_err(|e| JournalError {
                    path: path.clone(),
                    source: std::io::Error::other(format!(
                        "unreadable ({e}); it is the only record of whether traffic was switched: \
                             check where traffic points, then move the file aside"
                    )),
                })?;
                j.path = path;
                Ok(Some(j))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JournalError { path, source }),
        }
    }

    /// The journal's file.
    pub fn file(&self) -> &Path {
        &self.path
    }

    pub fn has(&self, step: Step) -> bool {
        self.entries.iter().any(|e| e.step == step)
    }

    pub fn state(&self) -> State {
        if self.has(Step::SwitchDone) {
            match self.last_after_hook_step() {
                Some(Step::AfterHookFailed) => State::SwitchedAfterHookFailed,
                Some(Step::AfterHookStarted) => State::SwitchedAfterHookUnfinished,
                Some(_) => State::Switched,
                None if self.after_hook => State::SwitchedAfterHookUnfinished,
                None => State::Switched,
            }
        } else if self.has(Step::SwitchStarted) {
            // Journals of earlier versions record a cleanly failed switch as aborted.
            match self.entries.last().map(|e| e.step) {
                Some(Step::Aborted | Step::UnfencedAfterFailedSwitch) => State::Open,
                _ => State::SwitchInDoubt,
            }
        } else {
            State::Open
        }
    }

    /// The after hook's last recorded step: started, ok or failed.
    pub fn last_after_hook_step(&self) -> Option<Step> {
        self.entries.iter().rev().map(|e| e.step).find(|s| {
            matches!(
                s,
                Step::AfterHookStarted | Step::AfterHookOk | Step::AfterHookFailed
            )
        })
    }

    /// When `step` was recorded, as seconds since the Unix epoch.
    pub fn when(&self, step: Step) -> Option<f64> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.step == step)
            .map(|e| e.at)
    }

    /// Appends `step` in memory only: it reaches the file with the next [`Journal::record`].
    /// For the steps nothing is decided on after a crash (marker, drained, sequences,
    /// verified): a journal without them reads the same ([`Journal::state`]), and the window
    /// saves a durable write for each.
    pub fn note(&mut self, step: Step, note: impl Into<String>) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.entries.push(Entry {
            step,
            at,
            note: note.into(),
        });
    }

    /// Appends `step` and makes the journal — with every step noted before it — durable
    /// before returning.
    pub fn record(&mut self, step: Step, note: impl Into<String>) -> Result<(), JournalError> {
        self.note(step, note);
        let body = serde_json::to_vec_pretty(self).expect("serializable");
        write_durable(&self.path, &body).map_err(|source| JournalError {
            path: self.path.clone(),
            source,
        })
    }
}

/// Writes `data` to `path` atomically and durably: a 0600 temporary file, fsynced, renamed
/// over `path`, and the directory fsynced (the buffer's own [`FileSystem::write_atomic`]).
pub(crate) fn write_durable(path: &Path, data: &[u8]) -> std::io::Result<()> {
    crate::buffer::fs::StdFs.write_atomic(path, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn noted_steps_reach_the_file_with_the_next_recorded_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new(dir.path(), "c1");
        j.record(Step::Fenced, "").unwrap();
        j.note(Step::Marker, "0/1");
        j.note(Step::Drained, "0/2");
        let on_disk = Journal::read(dir.path()).unwrap().unwrap();
        assert!(on_disk.has(Step::Fenced) && !on_disk.has(Step::Marker));
        assert_eq!(on_disk.state(), State::Open);
        j.record(Step::SwitchStarted, "").unwrap();
        let on_disk = Journal::read(dir.path()).unwrap().unwrap();
        let steps: Vec<Step> = on_disk.entries.iter().map(|e| e.step).collect();
        assert_eq!(
            steps,
            [
                Step::Fenced,
                Step::Marker,
                Step::Drained,
                Step::SwitchStarted
            ]
        );
        assert_eq!(on_disk.state(), State::SwitchInDoubt);
    }

    #[test]
    fn states_follow_the_recorded_steps_and_the_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new(dir.path(), "c1");
        assert_eq!(j.state(), State::Open);
        j.record(Step::Fenced, "").unwrap();
        j.record(Step::SwitchStarted, "").unwrap();
        assert_eq!(j.state(), State::SwitchInDoubt);
        let back = Journal::read(dir.path()).unwrap().unwrap();
        assert_eq!(back.state(), State::SwitchInDoubt);
        assert_eq!(back.cutover_id, "c1");
        let mode = std::fs::metadata(Journal::path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        j.record(Step::SwitchDone, "").unwrap();
        assert_eq!(j.state(), State::Switched, "no after hook due");
        j.record(Step::AfterHookStarted, "").unwrap();
        assert_eq!(j.state(), State::SwitchedAfterHookUnfinished);
        j.record(Step::AfterHookFailed, "").unwrap();
        assert_eq!(j.state(), State::SwitchedAfterHookFailed);
        j.record(Step::AfterHookStarted, "").unwrap();
        assert_eq!(
            Journal::read(dir.path()).unwrap().unwrap().state(),
            State::SwitchedAfterHookUnfinished,
            "killed during the rerun of a failed after hook"
        );
        j.record(Step::AfterHookOk, "").unwrap();
        assert_eq!(j.state(), State::Switched);
        let mut due = Journal::new(dir.path(), "c3");
        due.after_hook = true;
        due.record(Step::SwitchDone, "").unwrap();
        assert_eq!(
            Journal::read(dir.path()).unwrap().unwrap().state(),
            State::SwitchedAfterHookUnfinished,
            "killed between the switch and the after hook"
        );
        let mut k = Journal::new(dir.path(), "c2");
        k.record(Step::SwitchStarted, "").unwrap();
        k.record(Step::SwitchFailed, "exit 1").unwrap();
        assert_eq!(
            k.state(),
            State::SwitchInDoubt,
            "a failed hook may have moved traffic"
        );
        k.record(Step::UnfencedAfterFailedSwitch, "").unwrap();
        assert_eq!(k.state(), State::Open);
    }
}
