//! Cutover: the release-night moment. The source stops taking writes, the last changes reach
//! the migrated target, sequences follow, the copy is checked, and traffic moves — every phase
//! timed, and nothing lost if anything goes wrong.
//!
//! [`run`] is the orchestrator: it owns the phases and runs them in a straight line, each a
//! call into the file that owns it:
//!
//! 1. **postpone** — while `<buffer>/postpone-cutover` exists, wait (nothing is touched).
//! 2. **preflight** — every setting is valid ([`CutoverConfig::validate`]); the journal allows
//!    a cutover (`rerun.rs`); the buffer belongs to the source, the slot exists, the role may
//!    fence (`preflight.rs`); capture and replay are running elsewhere or are started here
//!    (`helpers.rs`); wait until the lag ([`lag`], WAL not yet durable included) is
//!    under `max_lag` and no prepared transaction of the source database is pending. Nothing
//!    is fenced yet.
//! 3. **fence** — the `--before` hook, `PAUSE` in PgBouncer with `--pooler` ([`pooler`]), then
//!    [`fence`] (read-only mode) — the window starts.
//! 4. **marker** — `pg_logical_emit_message(true, 'walshift', <cutover id>)` on the source
//!    (`drain.rs`).
//! 5. **drain** — find the marker's transaction in the buffer; wait until the slot's confirmed
//!    (durable) position and the target's `walshift.applied` both pass its end (`drain.rs`).
//! 6. **sequences** — planned before the fence ([`sequences::plan`]), the values read and set
//!    in the window ([`sequences::apply`]).
//! 7. **verify** — what `verify` asks, over verify's own sessions opened in preflight; the
//!    source's side is read from the fence on, the target's from the end of the drain
//!    (`verify.rs`).
//! 8. **switch** — with `--pooler`, the pooler's entry repointed to the copy; the `--switch`
//!    hook; with `--pooler`, `RESUME` — the window ends there (`switch.rs`).
//! 9. **after** — the `--after` hook; then the report ([`report`]).
//!
//! **Abort contract** (`abort.rs`): any failure before the switch is done, `max_window` running
//! out before the switch starts, or an interrupt, aborts: the fence is lifted (the database's
//! previous `default_transaction_read_only` restored exactly; a fence never raised is not
//! lifted — nothing is written to the source), and [`CutoverError::Aborted`]
//! carries the cause and the report. Nothing captured is lost: capture and replay only ever move forward
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
//! A dry run does everything except fencing, the hooks and the switch, then rehearses
//! harmlessly what those cost (`projection.rs`), and reports the projected window: the real
//! window's critical path over the parts it timed, verify's two readings timed apart.
//!
//! Files:
//! - `mod.rs` — [`run`]: the phases in order, and what they share.
//! - `config.rs` — [`CutoverConfig`]: every setting, its default and trade-off; validation.
//! - `error.rs` — [`CutoverError`], [`Aborted`], [`SwitchInDoubt`].
//! - `rerun.rs` — a buffer whose journal records a switch: finish, refuse, or unfence on the
//!   operator's word.
//! - `preflight.rs` — the checks and waits before the fence (postpone, identity, slot, clone,
//!   partitions, lag, prepared transactions).
//! - `helpers.rs` — capture and replay run in this process when none runs elsewhere (another
//!   capture is seen through the buffer's writer lock, `buffer::writer_running`; another
//!   replay through the replay lock, `apply::replay::lock`).
//! - `lag.rs` — how far the target is behind the source.
//! - `fence.rs` — the fence phase and the read-only fence (raise, prove, lift).
//! - `drain.rs` — the marker, and the wait until it is durable and applied.
//! - `sequences.rs` — target sequences set from the source, never backwards.
//! - `verify.rs` — what `--verify` compares inside the window.
//! - `projection.rs` — what a dry run measures in place of the fence, journal and switch.
//! - `switch.rs` — the switch and the after hook.
//! - `abort.rs` — lifting the fence on failure before the switch; never after it.
//! - `hooks.rs` — running `--before`, `--switch`, `--after`.
//! - `pooler/` — PgBouncer as the fence (`PAUSE`) and the switch (entry rewritten, `RELOAD`,
//!   `RESUME`), and the pause record a crash leaves.
//! - `journal.rs` — the durable record of how far a cutover got.
//! - `report.rs` — the timeline and the report.

mod abort;
mod config;
mod drain;
mod error;
pub mod fence;
mod helpers;
pub mod hooks;
pub mod journal;
pub mod lag;
pub mod pooler;
mod preflight;
mod projection;
pub mod report;
mod rerun;
pub mod sequences;
mod switch;
pub mod verify;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

pub use config::CutoverConfig;
pub use error::{Aborted, CutoverError, SwitchInDoubt};
pub use fence::FenceMode;
pub use pooler::PoolerConfig;
pub use report::{CutoverReport, Outcome};
pub use sequences::TableMap;
pub use verify::VerifyMode;

use drain::MarkerScan;
use fence::FenceState;
use helpers::Helpers;
use hooks::HookContext;
use journal::{Journal, Step};
use report::Timeline;
use rerun::Previous;

/// Name of the file that holds a cutover back while it exists.
pub const POSTPONE_FILE: &str = "postpone-cutover";

/// A callback for progress lines.
pub type Say = Arc<dyn Fn(&str) + Send + Sync>;

/// Runs a cutover. `interrupt` resolving (Ctrl-C) stops it: before the fence with
/// [`CutoverError::Interrupted`], after it with an abort (unfenced). See the module docs.
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
    match rerun::previous(config)? {
        Previous::NoSwitch => {}
        Previous::Switched(journal, state) => {
            return rerun::after_switch(config, journal, state, report, tl).await;
        }
        Previous::UnfenceAfterFailedSwitch(journal) => {
            return rerun::unfence_after_failed_switch(config, journal, report, tl).await;
        }
    }

    preflight::postpone(config, &interrupted, &mut report, &mut tl).await?;

    // Preflight: nothing is fenced until it passes.
    tl.begin("preflight");
    let dir = &config.buffer_dir;
    let preflight::Checked {
        buffer_id,
        src,
        own_pid,
        tgt,
        leftover,
        pooler,
    } = preflight::check(config, &mut report).await?;
    let helpers = helpers::start(config, &buffer_id, &mut report).await?;

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
        fence_raised: false,
        fence_proof: None,
        dry_probe: None,
        readings: None,
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
        pooler,
        pooler_paused: false,
        verify_sessions: verify::Sessions::default(),
        sequence_plan: None,
    };
    // The marker scan is positioned now, outside the window: finding a position in the buffer
    // reads up to a segment; following it afterwards reads only what is appended.
    let positioned = match preflight::wait_for_lag(&mut ctx).await {
        Ok(()) => match preflight::wait_prepared(&ctx).await {
            Ok(()) => match verify::Sessions::open(config).await {
                Ok(sessions) => {
                    ctx.verify_sessions = sessions;
                    match sequences::plan(&ctx.src, &ctx.tgt, &ctx.table_map).await {
                        Ok(plan) => {
                            ctx.sequence_plan = Some(plan);
                            drain::position(&ctx).await
                        }
                        Err(e) => {
                            Err(crate::SqlError::new("planning the sequences to set", e).into())
                        }
                    }
                }
                Err(e) => Err(e),
            },
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
    match window(&mut ctx, own_pid).await {
        Ok(()) => {}
        Err(cause) => return Err(abort::abort(ctx, cause).await),
    }
    // What the window had to drain, counted now that it is over.
    drain::count_drained(&mut ctx);
    if !config.dry_run {
        switch::after(&mut ctx).await;
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

/// Fence → switch: the window. Any error returned here aborts.
async fn window(ctx: &mut Ctx<'_>, own_pid: i32) -> Result<(), CutoverError> {
    fence::phase(ctx, own_pid).await?;
    // The fenced source cannot move: verify reads it while the drain waits, and the drained
    // target while sequences are set.
    verify::start_source(ctx);
    drain::marker(ctx).await?;
    drain::drain(ctx).await?;
    verify::start_target(ctx);
    sequences::phase(ctx).await?;
    verify::phase(ctx).await?;
    fence::proven(ctx).await?;
    if ctx.config.dry_run {
        projection::rehearse(ctx).await?;
        ctx.report.window_secs = projection::window(ctx);
        return Ok(());
    }
    switch::switch(ctx).await
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
    /// `ALTER DATABASE` may have been sent: an abort lifts the fence. Until then an abort
    /// only removes the state file [`fence::prepare`] wrote before the window.
    fence_raised: bool,
    /// The fence's live proof (a new session starts read-only), running from the fence until
    /// the switch waits for it.
    fence_proof: Option<tokio::task::JoinHandle<Result<(), fence::FenceError>>>,
    /// How long verify's readings took: the source's from the fence, the target's from the end
    /// of the drain (none with a mapping or `--verify none`).
    readings: Option<(Duration, Duration)>,
    /// A dry run's sessions to terminate in its rehearsal ([`projection::Probes`]).
    dry_probe: Option<projection::Probes>,
    leftover: Option<FenceState>,
    window_start: Option<Instant>,
    hook_ctx: HookContext,
    /// `config.table_map`, or the transform's tables.
    table_map: TableMap,
    /// Follows the buffer for the marker; positioned before the fence.
    scan: Option<MarkerScan>,
    /// This cutover's journal (none in a dry run).
    journal: Option<Journal>,
    /// The switch started: nothing may be undone.
    switch_started: bool,
    /// PgBouncer, checked by preflight (`--pooler`): the fence pauses it, the switch repoints
    /// and resumes it.
    pooler: Option<pooler::Pooler>,
    /// `PAUSE` was (or may have been) sent: an abort resumes the pool.
    pooler_paused: bool,
    /// verify's own sessions, opened before the fence (spared by it).
    verify_sessions: verify::Sessions,
    /// Which target sequence each source sequence feeds, worked out before the fence: the
    /// window only reads the values and sets them.
    sequence_plan: Option<sequences::Plan>,
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
        // A phase that waits (the drain) may not query a server for a while: a restart
        // inside the window is noticed here, not only when --max-window runs out.
        for (server, client) in [("source", &self.src), ("target", &self.tgt)] {
            if client.is_closed() {
                return Err(CutoverError::ServerLost {
                    server,
                    phase: phase.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Notes a step in the journal, written with the next recorded one ([`Journal::note`]).
    fn note(&mut self, step: Step, note: impl Into<String>) {
        if let Some(j) = &mut self.journal {
            j.note(step, note);
        }
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
