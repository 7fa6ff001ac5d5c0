//! `walshift replay`: flags to [`crate::apply::replay::ReplayConfig`], one replay of a buffer
//! into a target at a time (the replay guard), the report to the terminal.

use std::process::ExitCode;

use anyhow::Context;

use super::args::{BatchRows, BufferDir, ReplayPace, Target};
use super::{parse_lsn, shutdown_signal};
use crate::apply::replay::lock::{LOCK_WAIT, ReplayGuard, RetakenLock};
use crate::apply::replay::{self, ReplayConfig};
use crate::lsn::Lsn;

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    buffer: BufferDir,
    #[command(flatten)]
    target: Target,
    /// Keep applying as capture appends, until Ctrl-C.
    #[arg(long)]
    follow: bool,
    /// Stop after the transaction that ends at or after this LSN.
    #[arg(long, value_parser = parse_lsn, value_name = "LSN")]
    until_lsn: Option<Lsn>,
    #[command(flatten)]
    batch_rows: BatchRows,
    #[command(flatten)]
    pace: ReplayPace,
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
    let mut config = ReplayConfig::new(a.buffer.buffer, a.target.conn()?);
    config.follow = a.follow;
    config.until_lsn = a.until_lsn;
    // Replay takes batch_rows as given; it clamps the connections itself.
    config.batch_rows = a.batch_rows.batch_rows.max(1);
    config.batch_time = a.pace.batch_time();
    config.apply_connections = a.pace.apply_connections;
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
        config.lock = Some(RetakenLock::shared(config.target.clone(), id, guard));
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
