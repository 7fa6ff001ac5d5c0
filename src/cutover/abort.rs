//! Abort: any failure before the switch is done, `max_window` running out before the switch
//! starts, or an interrupt lifts the fence (the database's previous
//! `default_transaction_read_only` restored exactly, on a new session if cutover's own is gone),
//! stops the in-process helpers and returns [`CutoverError::Aborted`] with the cause and the
//! report. Once the switch has started, nothing is lifted: the cutover is in doubt
//! ([`CutoverError::SwitchInDoubt`]) and the fence stays until the operator decides.

use std::path::Path;
use std::time::Duration;

use tokio_postgres::Client;

use super::error::in_doubt;
use super::fence::{self, FenceState};
use super::journal::{Journal, Step};
use super::{Aborted, Ctx, CutoverConfig, CutoverError, Outcome};

/// Lifts the fence, stops in-process helpers and wraps the cause.
pub(super) async fn abort(mut ctx: Ctx<'_>, cause: CutoverError) -> CutoverError {
    let config = ctx.config;
    let cause_text = crate::error::chain_text(&cause);
    ctx.tl
        .end_open(&mut ctx.report, format!("failed: {cause_text}"));
    if ctx.switch_started {
        ctx.report.outcome = Outcome::SwitchInDoubt;
        ctx.report.error = Some(cause_text.clone());
        let warnings = ctx.helpers.stop().await;
        ctx.report.warnings.extend(warnings);
        let journal = ctx
            .journal
            .take()
            .unwrap_or_else(|| Journal::new(&config.buffer_dir, ""));
        return in_doubt(&journal, cause_text, Some(ctx.report));
    }
    ctx.tl.begin("unfence");
    let mut unfenced = Ok(());
    let mut note = "nothing to undo";
    if let Some(state) = ctx.fence_state.take() {
        if ctx.fence_raised {
            unfenced = lift_with_retry(config, &ctx.src, &config.buffer_dir, &state).await;
            note = "previous setting restored";
        } else {
            // Recorded before the window, never raised (the before hook or PAUSE failed):
            // the source was not touched, and lifting would write to it for nothing.
            unfenced =
                FenceState::remove(&config.buffer_dir).map_err(|e| crate::error::chain_text(&e));
            note = "the fence was never raised: the source untouched";
        }
        if unfenced.is_err() {
            note = "FAILED";
        }
    }
    let mut pooler_paused = None;
    let mut note = note.to_owned();
    // Clients held by PgBouncer go on, on the unchanged entry, once the source takes writes
    // again (a resume before the fence is lifted would hand them read-only sessions).
    if ctx.pooler_paused
        && let Some(p) = &config.pooler
    {
        match super::pooler::resume_after_abort(p, &config.buffer_dir).await {
            Ok(()) => {
                if let Some(r) = &mut ctx.report.pooler {
                    r.resumed = true;
                }
                note.push_str("; PgBouncer resumed on the source");
            }
            Err(e) => {
                note.push_str("; PgBouncer NOT resumed");
                pooler_paused = Some(format!(
                    "PGBOUNCER'S DATABASE {:?} IS STILL PAUSED ({}): its clients wait. RESUME {} in the admin console",
                    p.database,
                    crate::error::chain_text(&e),
                    super::pooler::admin_ident(&p.database)
                ));
            }
        }
    }
    ctx.tl.end(&mut ctx.report, note);
    ctx.report.outcome = Outcome::Aborted;
    ctx.report.error = Some(cause_text);
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
        pooler_paused,
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
    // Cutover's session is gone: on new ones. A source that is restarting or failing over
    // ("the database system is shutting down / starting up", connection refused) is waited
    // for up to UNFENCE_PATIENCE — the site is read-only until then, and lifting now beats
    // leaving it to the operator; a failure waiting does not fix is reported at once.
    const UNFENCE_PATIENCE: Duration = Duration::from_secs(60);
    let started = std::time::Instant::now();
    let mut lift_failures = 0;
    loop {
        let last = match config.source.connect().await {
            Ok(c) => match fence::lift(&c, dir, state).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    lift_failures += 1;
                    if lift_failures >= 5 {
                        return Err(crate::error::chain_text(&e));
                    }
                    crate::error::chain_text(&e)
                }
            },
            Err(e) if crate::conn::reconnect::is_transient(&e) => crate::error::chain_text(&e),
            Err(e) => return Err(crate::error::chain_text(&e)),
        };
        if started.elapsed() >= UNFENCE_PATIENCE {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
