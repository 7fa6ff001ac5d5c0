//! The dry run's projection of the window. A dry run goes through the window's phases (marker,
//! drain, sequences, verify) under the live load, but it must not fence, run hooks or switch,
//! and keeps no journal — all of which cost the real window time. [`rehearse`] runs last in
//! the dry window and does, harmlessly, what the real window does besides, so that the
//! projection (fence start → rehearsal done) counts it:
//!
//! - the journal of a switched cutover (its three durable writes: fenced, switch started with
//!   the steps noted before it, switch done) and, with the read-only fence, its state file: the
//!   same durable writes of the same files, in a scratch directory inside the buffer directory
//!   (same filesystem), removed afterwards — with the fence's reads of the settings it would
//!   change;
//! - with the read-only fence, its proof that a new session starts read-only: a new session on
//!   the source runs the same query (its answer means nothing unfenced), and is then terminated
//!   the way the fence terminates sessions (`pg_terminate_backend`, then waiting until it has
//!   exited); and its check for prepared transactions;
//! - with a `--switch` hook, the hook machinery running `:` instead of the hook;
//! - with `--pooler`, the pause record and the rewritten databases file (durable writes into
//!   the scratch directory) and six admin round trips in place of PAUSE, RELOAD, SHOW
//!   DATABASES, RECONNECT, SHOW POOLS and RESUME (what PAUSE waits for — the application's
//!   transactions in flight — is not projected).
//!
//! Not projected: `ALTER DATABASE … SET default_transaction_read_only` (one catalog update and
//! its commit), terminating the application's sessions (the dry run reports how many there
//! are: each is signalled at once and waited for), and the hooks' own work. The load itself is
//! the other difference: under the dry run the application keeps writing, so the drain and the
//! readings of verify share the servers with it, where the real window has them to itself.

use std::time::{Duration, Instant};

use super::fence::{self, FenceMode};
use super::journal::{Journal, Step};
use super::{Ctx, CutoverError, hooks, preflight};
use crate::SqlContext;

/// The journal steps a switched cutover takes inside the window, in order, and whether each
/// is a durable write ([`Journal::record`]) or only noted ([`Journal::note`]).
const WINDOW_STEPS: [(Step, bool); 7] = [
    (Step::Fenced, true),
    (Step::Marker, false),
    (Step::Drained, false),
    (Step::Sequences, false),
    (Step::Verified, false),
    (Step::SwitchStarted, true),
    (Step::SwitchDone, true),
];

/// The rehearsal phase of a dry run (see the module docs); ends the projected window.
pub(super) async fn rehearse(ctx: &mut Ctx<'_>) -> Result<(), CutoverError> {
    let config = ctx.config;
    ctx.tl.begin("rehearse");
    let scratch = tempfile::Builder::new()
        .prefix(".cutover-dry-run-")
        .tempdir_in(&config.buffer_dir)
        .map_err(|source| {
            CutoverError::Fence(fence::FenceError::StateFile {
                path: config.buffer_dir.clone(),
                source,
            })
        })?;
    let state = match config.fence {
        FenceMode::ReadOnly => {
            Some(fence::prepare(&ctx.src, scratch.path(), &ctx.report.cutover_id, None).await?)
        }
        FenceMode::Hook | FenceMode::None => None,
    };
    let mut journal = Journal::new(scratch.path(), &ctx.report.cutover_id);
    journal.after_hook = config.after.is_some();
    journal.fence = state.clone();
    for (step, durable) in WINDOW_STEPS {
        if durable {
            journal.record(step, "dry run")?;
        } else {
            journal.note(step, "dry run");
        }
    }
    let mut note = String::from("measured: 3 durable journal writes");
    if let Some(p) = &ctx.pooler {
        p.rehearse(scratch.path(), &ctx.report.cutover_id).await?;
        note.push_str(
            ", PgBouncer's pause record and rewritten databases file, its 6 admin round trips",
        );
    }
    drop(scratch);

    if let Some(state) = &state {
        let probe = config.source.connect().await?;
        let pid: i32 = probe
            .query_one(
                "SELECT pg_backend_pid(), current_user::text, current_setting('transaction_read_only')",
                &[],
            )
            .await
            .sql_context("opening a new session on the source, as the fence's proof does")?
            .get(0);
        terminate(&ctx.src, pid, config.terminate_timeout, &state.database).await?;
        drop(probe);
        preflight::prepared_xacts(&ctx.src).await?;
        note.push_str(
            ", the read-only fence's state file and reads, a new session opened and terminated, \
             prepared transactions",
        );
    }
    if config.switch.is_some() {
        let (_, r) = hooks::run_hook("switch", ":", &ctx.hook_ctx, config.hook_timeout).await;
        r?;
        note.push_str(", the switch hook's shell running `:`");
    }
    note.push_str(match state {
        Some(_) => "; not: ALTER DATABASE, terminating the application's sessions, the hooks' work",
        None => "; not: the hooks' work",
    });
    ctx.tl.end(&mut ctx.report, note);
    Ok(())
}

/// Terminates one session of the source the fence's way and waits until it has exited.
async fn terminate(
    client: &tokio_postgres::Client,
    pid: i32,
    timeout: Duration,
    database: &str,
) -> Result<(), CutoverError> {
    client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .sql_context("terminating the dry run's own probe session")?;
    let started = Instant::now();
    while !client
        .query("SELECT pid FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .await
        .sql_context("waiting for the dry run's probe session to exit")?
        .is_empty()
    {
        if started.elapsed() >= timeout {
            return Err(fence::FenceError::Lingering {
                count: 1,
                database: database.to_owned(),
                timeout_ms: timeout.as_millis() as i64,
                pids: vec![pid],
            }
            .into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}
