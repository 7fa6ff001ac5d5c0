//! Migrate: run the release's SQL scripts on the target, in the order given, each exactly once.
//!
//! This module owns `walshift.migrations` on the target (one row per applied script: its file
//! name, the SHA-256 of its content, when it was applied and how long it ran) and the rules for
//! running a script. Operator documentation: `docs/migrate.md`.
//!
//! **Contracts**
//! - *A script and its record are atomic.* A script runs in its own transaction, and its row in
//!   `walshift.migrations` is inserted in that same transaction: after any failure or crash
//!   either both are committed or neither is. A failing script is rolled back whole, and the
//!   scripts after it are not run.
//! - *A `-- walshift:no-transaction` script* (that exact first line) runs one statement at a
//!   time, each committing on its own (so `CREATE INDEX CONCURRENTLY`, `VACUUM`, … work); its
//!   row is inserted only after its last statement succeeded. A failure or crash midway leaves
//!   the earlier statements committed and the script unrecorded, so it runs again next time:
//!   such scripts must be safe to rerun.
//! - *Never twice.* A script whose name is recorded with the same checksum is skipped. A
//!   recorded script whose content changed is an error naming it, raised before any script runs.
//!   `name` is the primary key, so even a run that bypassed the lock could not record a script
//!   twice (its transaction would fail instead).
//! - *One run at a time.* A run holds the session advisory lock [`LOCK_KEY`] on the target
//!   database from before it reads the record until it is done; a second run waits, then sees
//!   what the first applied.
//! - *Refused before anything runs:* unreadable or non-UTF-8 files, duplicate file names, a
//!   misspelt directive, `psql` meta-commands, and `BEGIN`/`COMMIT`/… in a script that runs in
//!   walshift's transaction (see [`Script::from_bytes`]).
//! - A script runs on a fresh session (like `psql -f`): settings it changes do not leak into the
//!   next script.

pub mod error;
mod script;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_postgres::error::{ErrorPosition, SqlState};
use tokio_postgres::{AsyncMessage, Client};

pub use error::{ChangedScript, MigrateError};
pub use script::{NO_TRANSACTION_DIRECTIVE, Script, Statement, TxnControl};

use crate::conn::ConnInfo;
use crate::error::{SqlContext, SqlError};
use error::pg_message;

/// Session advisory lock key held by a migrate run (`pg_advisory_lock(8607785412446838132)`;
/// the bytes spell `wsmigrat`).
pub const LOCK_KEY: i64 = 0x7773_6d69_6772_6174;

const RECORD_DDL: &str = "CREATE SCHEMA IF NOT EXISTS walshift;
CREATE TABLE IF NOT EXISTS walshift.migrations (
    name           text PRIMARY KEY,
    sha256         text NOT NULL,
    applied_at     timestamptz NOT NULL,
    duration       interval NOT NULL,
    no_transaction boolean NOT NULL
)";

const RECORD: &str = "INSERT INTO walshift.migrations (name, sha256, applied_at, duration, no_transaction) \
     VALUES ($1, $2, clock_timestamp(), make_interval(secs => $3), $4)";

/// How to migrate.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The database to migrate (the copy).
    pub target: ConnInfo,
    /// Only say what would run: no lock, nothing created, nothing run. Default: false.
    pub dry_run: bool,
}

impl MigrateOptions {
    /// Defaults: really run.
    pub fn new(target: ConnInfo) -> Self {
        MigrateOptions {
            target,
            dry_run: false,
        }
    }
}

/// What happened to a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ScriptStatus {
    /// Run and recorded by this run.
    Applied,
    /// Already recorded with the same checksum.
    Skipped,
    /// Dry run: would be run.
    WouldRun,
}

/// One script's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ScriptResult {
    /// File name.
    pub name: String,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    pub status: ScriptStatus,
    /// Ran outside a transaction (`-- walshift:no-transaction`).
    pub no_transaction: bool,
    /// Time spent running the script's statements (applied only).
    pub duration_ms: Option<f64>,
    /// When it was applied (skipped only; the recorded `applied_at`).
    pub applied_at: Option<String>,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    /// The target, without secrets.
    pub target: String,
    pub dry_run: bool,
    /// Every script given, in order.
    pub scripts: Vec<ScriptResult>,
    pub applied: usize,
    pub skipped: usize,
    pub elapsed_secs: f64,
}

/// Events of a run, as they happen.
#[derive(Debug)]
#[non_exhaustive]
pub enum Progress<'a> {
    /// Another run holds [`LOCK_KEY`]; waiting for it.
    WaitingForLock,
    /// A script starts running.
    Running(&'a Script),
    /// The server sent a notice (`RAISE NOTICE`, a warning, …) while a script ran.
    Notice {
        script: &'a str,
        severity: String,
        message: String,
    },
    /// A script is done (applied, skipped, or would run).
    Done(&'a ScriptResult),
}

/// Loads scripts in the order given; refuses unreadable or unacceptable files and duplicate
/// file names before anything runs.
pub fn load_scripts(paths: &[PathBuf]) -> Result<Vec<Script>, MigrateError> {
    let scripts = paths
        .iter()
        .map(|p| Script::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    check_names(&scripts)?;
    Ok(scripts)
}

fn check_names(scripts: &[Script]) -> Result<(), MigrateError> {
    if scripts.is_empty() {
        return Err(MigrateError::NoScripts);
    }
    let mut seen: HashMap<&str, &Script> = HashMap::new();
    for s in scripts {
        if let Some(first) = seen.insert(&s.name, s) {
            return Err(MigrateError::DuplicateName {
                name: s.name.clone(),
                first: first.path.clone(),
                second: s.path.clone(),
            });
        }
    }
    Ok(())
}

/// Runs `scripts` on the target in order (see the module contracts), reporting each step to
/// `progress`. Stops at the first failing script.
pub async fn migrate(
    opts: &MigrateOptions,
    scripts: &[Script],
    mut progress: impl FnMut(Progress<'_>),
) -> Result<MigrateReport, MigrateError> {
    let started = Instant::now();
    check_names(scripts)?;
    let target = opts.target.redacted();
    let (lock, _notices) = connect(&opts.target).await?;
    if !opts.dry_run {
        let got: bool = lock
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
            .await
            .sql_context("taking the migrate lock on the target")?
            .get(0);
        if !got {
            progress(Progress::WaitingForLock);
            lock.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
                .await
                .sql_context("waiting for the migrate lock on the target")?;
        }
        crate::sql::create_own_objects(&lock, RECORD_DDL)
            .await
            .sql_context("creating walshift.migrations on the target")?;
    }
    let recorded = read_record(&lock, scripts).await?;
    let changed: Vec<ChangedScript> = scripts
        .iter()
        .filter_map(|s| {
            let (sha, at) = recorded.get(&s.name)?;
            (*sha != s.sha256).then(|| ChangedScript {
                name: s.name.clone(),
                applied_at: at.clone(),
                recorded: sha.clone(),
                current: s.sha256.clone(),
            })
        })
        .collect();
    if !changed.is_empty() {
        return Err(MigrateError::ChecksumMismatch { target, changed });
    }

    let mut results = Vec::with_capacity(scripts.len());
    for (i, s) in scripts.iter().enumerate() {
        let mut result = ScriptResult {
            name: s.name.clone(),
            sha256: s.sha256.clone(),
            status: ScriptStatus::WouldRun,
            no_transaction: s.no_transaction,
            duration_ms: None,
            applied_at: None,
        };
        if let Some((_, at)) = recorded.get(&s.name) {
            result.status = ScriptStatus::Skipped;
            result.applied_at = Some(at.clone());
        } else if !opts.dry_run {
            progress(Progress::Running(s));
            let not_run = scripts.len() - i - 1;
            let took = run_script(&opts.target, s, not_run, &mut progress).await?;
            result.status = ScriptStatus::Applied;
            result.duration_ms = Some(took.as_secs_f64() * 1e3);
        }
        progress(Progress::Done(&result));
        results.push(result);
    }
    if !opts.dry_run {
        // Closing the session would release it too; unlock now so a waiting run starts at once.
        lock.execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
            .await
            .sql_context("releasing the migrate lock on the target")?;
    }
    Ok(MigrateReport {
        target,
        dry_run: opts.dry_run,
        applied: results
            .iter()
            .filter(|r| r.status == ScriptStatus::Applied)
            .count(),
        skipped: results
            .iter()
            .filter(|r| r.status == ScriptStatus::Skipped)
            .count(),
        scripts: results,
        elapsed_secs: started.elapsed().as_secs_f64(),
    })
}

/// `name → (sha256, applied_at)` of the given scripts already recorded on the target.
async fn read_record(
    client: &Client,
    scripts: &[Script],
) -> Result<HashMap<String, (String, String)>, MigrateError> {
    let ctx = "reading walshift.migrations on the target";
    let exists: bool = client
        .query_one("SELECT to_regclass('walshift.migrations') IS NOT NULL", &[])
        .await
        .sql_context(ctx)?
        .get(0);
    if !exists {
        return Ok(HashMap::new());
    }
    let names: Vec<&str> = scripts.iter().map(|s| s.name.as_str()).collect();
    let rows = client
        .query(
            "SELECT name, sha256, applied_at::text FROM walshift.migrations WHERE name = ANY($1)",
            &[&names],
        )
        .await
        .sql_context(ctx)?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

/// Runs one script on a fresh session and records it; returns the time its statements took.
async fn run_script(
    target: &ConnInfo,
    s: &Script,
    not_run: usize,
    progress: &mut impl FnMut(Progress<'_>),
) -> Result<Duration, MigrateError> {
    let (client, mut notices) = connect(target).await?;
    let mut forward = |notices: &mut mpsc::UnboundedReceiver<tokio_postgres::error::DbError>| {
        while let Ok(n) = notices.try_recv() {
            progress(Progress::Notice {
                script: &s.name,
                severity: n.severity().to_owned(),
                message: n.message().to_owned(),
            });
        }
    };
    let ctx = format!("running \"{}\"", s.name);
    if !s.no_transaction {
        client.batch_execute("BEGIN").await.sql_context(&ctx)?;
    }
    let t0 = Instant::now();
    for (k, st) in s.statements.iter().enumerate() {
        let text = s.statement_text(st);
        if let Err(e) = client.batch_execute(text).await {
            // Ends walshift's transaction, or a no-transaction script's own open one.
            let _ = client.batch_execute("ROLLBACK").await;
            forward(&mut notices);
            return Err(script_error(s, st, e, k, not_run));
        }
        forward(&mut notices);
    }
    let took = t0.elapsed();
    if !s.no_transaction {
        // Fails outside a transaction block: the script ended ours in a way the lexer missed.
        if let Err(e) = client.batch_execute("SAVEPOINT walshift_record").await {
            if e.code() == Some(&SqlState::NO_ACTIVE_SQL_TRANSACTION) {
                return Err(MigrateError::TransactionEnded {
                    name: s.name.clone(),
                });
            }
            return Err(SqlError::new(ctx, e).into());
        }
    }
    // The record is walshift's, whatever role the script switched to.
    client.batch_execute("RESET ROLE").await.sql_context(&ctx)?;
    client
        .execute(
            RECORD,
            &[&s.name, &s.sha256, &took.as_secs_f64(), &s.no_transaction],
        )
        .await
        .with_sql_context(|| format!("recording \"{}\" in walshift.migrations", s.name))?;
    if !s.no_transaction
        && let Err(e) = client.batch_execute("COMMIT").await
    {
        // Deferred constraints and serialization failures surface here.
        return Err(MigrateError::ScriptFailed {
            name: s.name.clone(),
            line: None,
            excerpt: String::new(),
            message: format!("at COMMIT: {}", pg_message(&e)),
            no_transaction: false,
            committed: 0,
            not_run,
            source: e,
        });
    }
    Ok(took)
}

/// Maps a statement's failure to the error naming the script, line and server message.
fn script_error(
    s: &Script,
    st: &Statement,
    e: tokio_postgres::Error,
    committed: usize,
    not_run: usize,
) -> MigrateError {
    let text = s.statement_text(st);
    let (line, excerpt) = match e.as_db_error().and_then(|d| d.position()) {
        Some(ErrorPosition::Original(p)) => s.locate(st.start, text, *p),
        // No position, or one inside an internal query: the statement's first line.
        _ => s.locate(st.start, text, 1),
    };
    let message = pg_message(&e);
    if !s.no_transaction && e.code() == Some(&SqlState::ACTIVE_SQL_TRANSACTION) {
        return MigrateError::NeedsNoTransaction {
            name: s.name.clone(),
            line: Some(line),
            excerpt,
            message,
            not_run,
            source: e,
        };
    }
    MigrateError::ScriptFailed {
        name: s.name.clone(),
        line: Some(line),
        excerpt,
        message,
        no_transaction: s.no_transaction,
        committed,
        not_run,
        source: e,
    }
}

/// A SQL session whose server notices are kept (`psql` shows them; so does migrate).
async fn connect(
    target: &ConnInfo,
) -> Result<
    (
        Client,
        mpsc::UnboundedReceiver<tokio_postgres::error::DbError>,
    ),
    MigrateError,
> {
    let (client, mut connection) =
        target
            .connect_raw()
            .await?
            .map_err(|e| MigrateError::Connect {
                target: target.redacted(),
                message: pg_message(&e),
                source: e,
            })?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notice(n)) => {
                    let _ = tx.send(n);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("connection closed: {e}");
                    break;
                }
            }
        }
    });
    Ok((client, rx))
}
