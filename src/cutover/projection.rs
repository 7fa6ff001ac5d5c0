//! The dry run's projection of the window. A dry run goes through the window's phases (marker,
//! drain, sequences, verify) under the live load, but it must not fence, run hooks or switch,
//! and keeps no journal — all of which cost the real window time. [`rehearse`] runs last in
//! the dry window and does, harmlessly, what the real window does besides, so that the
//! projection (fence start → rehearsal done) counts it:
//!
//! - the journal's durable writes inside the window: the switch started (with the steps noted
//!   before it) and, with the `hook` or `none` fence, the fence itself — the same durable
//!   writes of the same file, in a scratch directory inside the buffer directory (same
//!   filesystem), removed afterwards. (With the read-only fence, its state file and the
//!   `fenced` step are written before the window starts, and the switch's `done` step after
//!   it ends: the real window does not count them either.)
//! - with the read-only fence, the session termination it waits for: a session opened on the
//!   source before the dry window ([`Probe`]) is terminated the way the fence terminates
//!   sessions (`pg_terminate_backend`, then waiting until it has exited); the catalog half of
//!   the fence's proof (a read); and its check for prepared transactions. (The live half of
//!   the proof, a new session, runs in the background in the real window.)
//! - with a `--switch` hook, the hook machinery running `:` instead of the hook;
//! - with `--pooler`, the pause record and the rewritten databases file (durable writes into
//!   the scratch directory) and six admin round trips in place of PAUSE, RELOAD, SHOW
//!   DATABASES, RECONNECT, SHOW POOLS and RESUME (what PAUSE waits for — the application's
//!   transactions in flight — is not projected).
//!
//! Not projected: `ALTER DATABASE … SET default_transaction_read_only` (one catalog update and
//! its commit), terminating more than one session (the dry run reports how many there are:
//! each is signalled at once and waited for), and the hooks' own work. The load itself is
//! the other difference: under the dry run the application keeps writing, so the drain and the
//! readings of verify share the servers with it, where the real window has them to itself.

use std::time::{Duration, Instant};

use super::fence::{self, FenceMode};
use super::journal::{Journal, Step};
use super::{Ctx, CutoverError, hooks, preflight};
use crate::SqlContext;

/// The journal steps a switched cutover takes inside the window, in order, and whether each
/// is a durable write ([`Journal::record`]) or only noted ([`Journal::note`]); the first is
/// inside the window only when the fence is not the read-only one.
const WINDOW_STEPS: [(Step, bool); 6] = [
    (Step::Fenced, true),
    (Step::Marker, false),
    (Step::Drained, false),
    (Step::Sequences, false),
    (Step::Verified, false),
    (Step::SwitchStarted, true),
];

/// A session on the source a dry run opens before its window, for [`rehearse`] to terminate
/// as the fence terminates the application's sessions.
pub(super) struct Probe {
    _client: tokio_postgres::Client,
    pub(super) pid: i32,
}

impl Probe {
    pub(super) async fn open(source: &crate::conn::ConnInfo) -> Result<Probe, CutoverError> {
        let client = source.connect().await?;
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .sql_context("opening the dry run's probe session on the source")?
            .get(0);
        Ok(Probe {
            _client: client,
            pid,
        })
    }
}

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
    let read_only = config.fence == FenceMode::ReadOnly;
    let mut journal = Journal::new(scratch.path(), &ctx.report.cutover_id);
    journal.after_hook = config.after.is_some();
    let mut writes = 0;
    for (step, durable) in WINDOW_STEPS {
        if durable && !(read_only && step == Step::Fenced) {
            journal.record(step, "dry run")?;
            writes += 1;
        } else {
            journal.note(step, "dry run");
        }
    }
    let mut note = format!("measured: {writes} durable journal write(s)");
    if let Some(p) = &ctx.pooler {
        p.rehearse(scratch.path(), &ctx.report.cutover_id).await?;
        note.push_str(
            ", PgBouncer's pause record and rewritten databases file, its 6 admin round trips",
        );
    }
    drop(scratch);

    if let Some(probe) = ctx.dry_probe.take() {
        let database: String = ctx
            .src
            .query_one("SELECT current_database()::text", &[])
            .await
            .sql_context("reading the database name")?
            .get(0);
        terminate(&ctx.src, probe.pid, config.terminate_timeout, &database).await?;
        drop(probe);
        fence::prove_catalog(&ctx.src).await?;
        preflight::prepared_xacts(&ctx.src).await?;
        note.push_str(
            ", a session terminated and waited for, the fence's catalog proof, prepared \
             transactions",
        );
    }
    if config.switch.is_some() {
        let (_, r) = hooks::run_hook("switch", ":", &ctx.hook_ctx, config.hook_timeout).await;
        r?;
        note.push_str(", the switch hook's shell running `:`");
    }
    note.push_str(if read_only {
        "; not: ALTER DATABASE, terminating more than one session, the hooks' work"
    } else {
        "; not: the hooks' work"
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
