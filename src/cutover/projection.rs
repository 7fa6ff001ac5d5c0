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
//! - with the read-only fence, the session terminations it waits for: sessions opened on the
//!   source before the dry window, as many as the fence would terminate (at most
//!   [`MAX_PROBES`]; [`Probes`]), are terminated the way the fence terminates sessions (all
//!   signalled at once, then waiting until they have exited); the catalog half of the fence's
//!   proof (a read); and its check for prepared transactions. (The live half of the proof, a
//!   new session, runs in the background in the real window.)
//! - with a `--switch` hook, the hook machinery running `:` instead of the hook;
//! - with `--pooler`, the pause record and the rewritten databases file (durable writes into
//!   the scratch directory) and six admin round trips in place of PAUSE, RELOAD, SHOW
//!   DATABASES, RECONNECT, SHOW POOLS and RESUME (what PAUSE waits for — the application's
//!   transactions in flight — is not projected).
//!
//! Not projected: `ALTER DATABASE … SET default_transaction_read_only` (one catalog update and
//! its commit), sessions beyond [`MAX_PROBES`], and the hooks' own work. The load itself is
//! the other difference: under the dry run the application keeps writing, so the drain and the
//! readings of verify share the servers with it, where the real window has them to itself.
//! [`window`] therefore times verify's two readings apart and adds up the critical path.

use std::time::Duration;

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

/// Most sessions a dry run opens to terminate in its rehearsal.
pub const MAX_PROBES: usize = 8;

/// Sessions on the source a dry run opens before its window — as many as the fence would
/// terminate, at most [`MAX_PROBES`] (at least one) — for [`rehearse`] to terminate all at
/// once and wait for, as the fence terminates the application's sessions.
pub(super) struct Probes {
    _clients: Vec<tokio_postgres::Client>,
    pub(super) pids: Vec<i32>,
}

impl Probes {
    pub(super) async fn open(
        source: &crate::conn::ConnInfo,
        sessions: usize,
    ) -> Result<Probes, CutoverError> {
        let n = sessions.clamp(1, MAX_PROBES);
        let clients = futures_util::future::try_join_all((0..n).map(|_| source.connect())).await?;
        let mut pids = Vec::with_capacity(n);
        for c in &clients {
            pids.push(
                c.query_one("SELECT pg_backend_pid()", &[])
                    .await
                    .sql_context("opening the dry run's probe sessions on the source")?
                    .get(0),
            );
        }
        Ok(Probes {
            _clients: clients,
            pids,
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

    if let Some(probes) = ctx.dry_probe.take() {
        let database: String = ctx
            .src
            .query_one("SELECT current_database()::text", &[])
            .await
            .sql_context("reading the database name")?
            .get(0);
        terminate(&ctx.src, &probes.pids, config.terminate_timeout, &database).await?;
        let n = probes.pids.len();
        drop(probes);
        fence::prove_catalog(&ctx.src).await?;
        preflight::prepared_xacts(&ctx.src).await?;
        note.push_str(&format!(
            ", {n} session(s) terminated and waited for, the fence's catalog proof, \
                 prepared transactions"
        ));
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

/// The projected window, in seconds. Without verify's readings timed (`--verify none`, or a
/// mapping), the dry window's own length: fence start → rehearsal done. With them, the real
/// window's critical path over the parts the dry run measured —
///
/// `fence + max(source reading, marker + drain + max(sequences, target reading)) + rehearse`
///
/// — the readings timed one after the other, each alone (`verify::start_target`): in the real
/// window the source's reading runs on a fenced, idle source and the target's on a target only
/// cutover reads; read at once in a dry run, on servers still taking the application's load,
/// the two would slow each other and the projection would mostly measure the load.
pub(super) fn window(ctx: &Ctx<'_>) -> Option<f64> {
    let wall = ctx.window_start.map(|s| s.elapsed().as_secs_f64());
    let Some((source, target)) = ctx.readings else {
        return wall;
    };
    let phase = |name: &str| {
        ctx.report
            .phases
            .iter()
            .rev()
            .find(|p| p.name == name)
            .map_or(0.0, |p| p.duration_secs)
    };
    let after_fence =
        phase("marker") + phase("drain") + phase("sequences").max(target.as_secs_f64());
    Some(phase("fence") + source.as_secs_f64().max(after_fence) + phase("rehearse"))
}

/// Terminates sessions of the source the fence's way — all signalled at once — and waits until
/// they have exited.
async fn terminate(
    client: &tokio_postgres::Client,
    pids: &[i32],
    timeout: Duration,
    database: &str,
) -> Result<(), CutoverError> {
    client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY($1)",
            &[&pids],
        )
        .await
        .sql_context("terminating the dry run's own probe sessions")?;
    Ok(fence::wait_exited(client, pids, timeout, database).await?)
}
