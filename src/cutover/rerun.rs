//! A cutover of a buffer whose journal records a switch: the switch is never repeated and never
//! undone. [`previous`] reads the journal first and decides: run a new cutover, finish what
//! the last one left ([`after_switch`]: the switch the operator confirmed, the `--after` hook),
//! lift the fence of a switch that never moved traffic on the operator's word
//! ([`unfence_after_failed_switch`]), or refuse (see the journal contract in [`super::journal`]).

use super::error::{in_doubt, rfc3339};
use super::fence::{self, FenceState};
use super::hooks::{self, HookContext};
use super::journal::{Journal, State, Step};
use super::preflight::prepare_session;
use super::report::Timeline;
use super::{CutoverConfig, CutoverError, CutoverReport, Outcome, TableMap, pooler, sequences};
use crate::SqlContext;

/// What the journal of the buffer's last cutover says this run does.
pub(super) enum Previous {
    /// No cutover started, or the last one ended before its switch: run a new one.
    NoSwitch,
    /// The last switch started: [`after_switch`] finishes what is left.
    Switched(Journal, State),
    /// The last switch is in doubt and the operator says no traffic left the source.
    UnfenceAfterFailedSwitch(Journal),
}

/// Reads the journal; refuses a switch in doubt without the operator's word, and the
/// operator's flags when the journal gives them nothing to do.
pub(super) fn previous(config: &CutoverConfig) -> Result<Previous, CutoverError> {
    if let Some(previous) = Journal::read(&config.buffer_dir)? {
        match previous.state() {
            State::Open => {}
            State::SwitchInDoubt if config.unfence_after_failed_switch => {
                return Ok(Previous::UnfenceAfterFailedSwitch(previous));
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
            state => return Ok(Previous::Switched(previous, state)),
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
    Ok(Previous::NoSwitch)
}

/// A rerun after the switch: finishes what is left (the switch confirmed by the operator, a
/// failed after hook, an after hook that was due or started and never recorded a result — run
/// again, so after hooks must be safe to run twice) and never repeats or undoes the switch.
/// Without `--after`, an after hook left failed or unfinished keeps the outcome (exit 4).
pub(super) async fn after_switch(
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
            .sql_context("syncing sequences (forward only)")?;
        report.sequences = synced.set;
        report.sequences_skipped = synced.skipped;
        if let Err(e) = FenceState::remove(dir) {
            report.warnings.push(e.to_string());
        }
        // The operator says traffic belongs on the copy: a pool the switch left paused is
        // pointed there and resumed (sequences are already set forward).
        let pooled = settle_pooler(config, true).await?;
        let note = format!(
            "switch recorded done; sequences set forward only ({} kept, target ahead){pooled}",
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
pub(super) async fn unfence_after_failed_switch(
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
    // After the fence: clients resumed on the source must find it writable.
    let note = format!("{note}{}", settle_pooler(config, false).await?);
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

/// A pool the switch in doubt left paused (`cutover-pooler.json`): pointed at the copy
/// (`to_target`) or back at the source, reloaded and resumed. Returns a note for the timeline
/// (empty when no pool was paused).
async fn settle_pooler(config: &CutoverConfig, to_target: bool) -> Result<String, CutoverError> {
    let dir = &config.buffer_dir;
    let Some(state) = pooler::PauseState::read(dir)? else {
        return Ok(String::new());
    };
    let Some(p) = config
        .pooler
        .as_ref()
        .filter(|p| p.database == state.database)
    else {
        return Err(pooler::PoolerError::LeftPausedWithoutPooler {
            cutover_id: state.cutover_id,
            name: state.database,
        }
        .into());
    };
    Ok(format!(
        "; {}",
        pooler::settle(p, dir, &state, to_target).await?
    ))
}
