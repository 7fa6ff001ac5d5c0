//! The switch and the after hook. The switch is journaled as started before its hook runs:
//! from then on walshift undoes nothing on its own, and a hook that fails (it may have moved
//! part of the traffic) leaves the switch in doubt. The window ends when traffic has moved (the
//! hook done, the pool resumed), before the journal's `switch done` is written.
//! The `--after` hook runs once the window is over; its failure does not undo the switch.

use super::hooks;
use super::journal::Step;
use super::{Ctx, CutoverError, Outcome};

/// The `--switch` hook (none: the window ends after verify).
pub(super) async fn switch(ctx: &mut Ctx<'_>) -> Result<(), CutoverError> {
    let config = ctx.config;
    ctx.deadline_check("the switch (not started)")?;
    ctx.tl.begin("switch");
    // Durable before the hook runs: from here on walshift undoes nothing on its own.
    let what = match (&config.switch, &ctx.pooler) {
        (Some(cmd), Some(_)) => format!("PgBouncer repoint, then {cmd}"),
        (Some(cmd), None) => cmd.clone(),
        (None, Some(_)) => "PgBouncer repoint".into(),
        (None, None) => String::new(),
    };
    ctx.record(Step::SwitchStarted, what)?;
    ctx.switch_started = true;
    if let Some(p) = &ctx.pooler {
        // A failure here leaves the switch in doubt like a failed hook: the pool stays paused
        // and the pause record says both entries, for the operator's --resume-after-switch or
        // --unfence-after-failed-switch.
        if let Err(e) = p.repoint(&config.target).await {
            ctx.record(Step::SwitchFailed, e.to_string())?;
            return Err(e.into());
        }
    }
    if let Some(cmd) = &config.switch {
        let (run, r) = hooks::run_hook("switch", cmd, &ctx.hook_ctx, config.hook_timeout).await;
        ctx.report.hooks.push(run);
        if let Err(e) = r {
            // A hook that failed part-way may have moved some of the traffic: in doubt.
            ctx.record(Step::SwitchFailed, e.to_string())?;
            return Err(e.into());
        }
    }
    let mut note = match &config.switch {
        Some(_) => "switch hook done".to_owned(),
        None => "no --switch hook".to_owned(),
    };
    if let Some(p) = &ctx.pooler {
        match p.resume(&config.buffer_dir).await {
            Ok(held) => {
                if let Some(r) = &mut ctx.report.pooler {
                    r.resumed = true;
                    r.paused_secs = held.paused.map(|d| d.as_secs_f64());
                    r.clients_waiting = held.clients_waiting;
                    r.longest_client_wait_secs = held.longest_wait.map(|d| d.as_secs_f64());
                }
                note = format!("PgBouncer repointed to the copy and resumed; {note}");
            }
            Err(e) => {
                ctx.record(Step::SwitchFailed, e.to_string())?;
                return Err(e.into());
            }
        }
    }
    // Traffic has moved: the window clients see ends here, before the bookkeeping.
    ctx.tl.end(&mut ctx.report, note.clone());
    ctx.report.window_secs = ctx.window_start.map(|s| s.elapsed().as_secs_f64());
    ctx.record(Step::SwitchDone, note)?;
    Ok(())
}

/// The `--after` hook, if any; its result is journaled and reported.
pub(super) async fn after(ctx: &mut Ctx<'_>) {
    let config = ctx.config;
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
}
