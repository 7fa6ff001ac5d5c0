//! `walshift replay`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use super::{BufferDir, parse_lsn, shutdown_signal};
use crate::apply::replay::{self, ReplayConfig, ReplayError, TargetLock};
use crate::conn::ConnInfo;
use crate::cutover::coord::ReplayGuard;
use crate::lsn::Lsn;

/// How long a replay waits for the buffer's replay lock (a replay that was just killed holds it
/// until its server session notices).
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The replay lock, taken again when replay reconnects: its session died with the target.
struct RetakenLock {
    target: ConnInfo,
    buffer_id: String,
    guard: tokio::sync::Mutex<Option<ReplayGuard>>,
}

impl TargetLock for RetakenLock {
    fn retake(&self) -> futures_util::future::BoxFuture<'_, Result<(), ReplayError>> {
        Box::pin(async move {
            let mut guard = self.guard.lock().await;
            // Closes the old session if it is still there (a dropped connection, not a
            // restart), which releases the lock for the new one.
            guard.take();
            match ReplayGuard::acquire_within(&self.target, &self.buffer_id, LOCK_WAIT).await? {
                Some(g) => {
                    *guard = Some(g);
                    Ok(())
                }
                None => Err(ReplayError::LockTaken),
            }
        })
    }
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    buffer: BufferDir,
    /// Target database (the copy): a libpq URL or key=value string.
    #[arg(long, value_name = "CONN")]
    target: String,
    /// Keep applying as capture appends, until Ctrl-C.
    #[arg(long)]
    follow: bool,
    /// Stop after the transaction that ends at or after this LSN.
    #[arg(long, value_parser = parse_lsn, value_name = "LSN")]
    until_lsn: Option<Lsn>,
    /// Changes folded into one batch before it is written.
    #[arg(long, default_value_t = 50_000)]
    batch_rows: usize,
    /// Longest a batch stays open, in milliseconds.
    #[arg(long, default_value_t = 200)]
    batch_ms: u64,
    /// Target connections each batch is written over (rows split by key; two-phase commit,
    /// which needs max_prepared_transactions >= N on the target, else one connection is used).
    #[arg(long, default_value_t = 2, value_name = "N")]
    apply_connections: usize,
    /// Migration mapping (TOML) the rows go through; see docs/transforms.md. Default: every
    /// table onto the same-named target table.
    #[arg(long, value_name = "FILE")]
    transform: Option<std::path::PathBuf>,
    /// The target was not cloned by `walshift capture --clone-to` but loaded another way (a
    /// restore, a snapshot copy). You guarantee it holds the source's rows exactly as of the
    /// slot's consistent point (where the buffer starts); without this flag replay refuses a
    /// target that has no clone record of this buffer's source and slot. A target that is the
    /// source itself is refused regardless.
    #[arg(long)]
    target_not_cloned_by_walshift: bool,
    /// After the target restarts, fails over or drops a connection: reconnect attempts in a
    /// row before giving up (1 s, 2 s, 4 s … up to 30 s apart: 10 ≈ 3 minutes); each resumes
    /// after the last committed batch. 0 = stop at the first lost connection.
    #[arg(long, default_value_t = crate::conn::reconnect::DEFAULT_ATTEMPTS, value_name = "N")]
    reconnect_attempts: u32,
    /// No progress line.
    #[arg(long)]
    no_progress: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: ReplayArgs) -> anyhow::Result<ExitCode> {
    let target = ConnInfo::parse(&a.target).context("--target")?;
    let mut config = ReplayConfig::new(a.buffer.buffer, target);
    config.follow = a.follow;
    config.until_lsn = a.until_lsn;
    config.batch_rows = a.batch_rows.max(1);
    config.batch_time = Duration::from_millis(a.batch_ms);
    config.apply_connections = a.apply_connections.max(1);
    config.progress = !a.no_progress;
    config.reconnect = crate::conn::reconnect::Reconnect::attempts(a.reconnect_attempts);
    if a.target_not_cloned_by_walshift {
        config.target_origin = replay::TargetOrigin::LoadedElsewhere;
    }
    if let Some(path) = &a.transform {
        config.transform = Some(std::sync::Arc::new(crate::transform::Mapping::load(path)?));
    }
    // One replay of a buffer into a target at a time; the lock is also how `walshift cutover`
    // sees that a replay is already running.
    if let Some(m) = crate::buffer::BufferMeta::read(&config.buffer_dir)? {
        let id = crate::apply::progress::buffer_id(m.system_identifier, &m.slot);
        let guard = ReplayGuard::acquire_within(&config.target, &id, LOCK_WAIT)
            .await?
            .context(
                "another walshift replay (or walshift run, or a cutover) is applying this buffer to this target; stop it first",
            )?;
        config.lock = Some(std::sync::Arc::new(RetakenLock {
            target: config.target.clone(),
            buffer_id: id,
            guard: tokio::sync::Mutex::new(Some(guard)),
        }));
    }
    let report = replay::run(config, shutdown_signal()).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        eprintln!(
            "replay: {} transactions, {} changes in {} target commits over {} connection(s) ({:.0} changes/s); applied up to {}",
            report.transactions,
            report.changes,
            report.batches,
            report.apply_connections,
            report.changes as f64 / report.elapsed_secs.max(1e-3),
            report.applied_lsn
        );
    }
    Ok(ExitCode::SUCCESS)
}
