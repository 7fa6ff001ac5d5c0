//! `walshift run`: capture (cloning on first start) and replay --follow in one process, with a
//! status line and a control socket (see [`crate::run`]).

use std::path::PathBuf;
use std::process::ExitCode;

use super::args::{BufferDir, FlushMs, ReplayPace, SlotPublication, Source, Target, own_help};
use super::shutdown_signal;
use crate::run::{self as live, LiveConfig};

#[derive(clap::Args, Debug)]
#[command(mut_args(own_help(&[
    ("target", "Target database (the copy): cloned on first start, then kept in sync"),
    ("slot", "Replication slot (created if missing)"),
    ("publication", "Publication (created FOR ALL TABLES if missing)"),
    ("flush_ms", "Capture's longest wait before a received change is fsynced, in milliseconds"),
    ("batch_ms", "Replay's longest batch, in milliseconds"),
    ("apply_connections", "Replay's target connections per batch (two-phase commit; needs \
         max_prepared_transactions >= N on the target, else one is used)"),
])))]
pub struct RunArgs {
    #[command(flatten)]
    source: Source,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    buffer: BufferDir,
    /// Migration mapping (TOML) the changes go through.
    #[arg(long, value_name = "FILE")]
    transform: Option<PathBuf>,
    #[command(flatten)]
    slot: SlotPublication,
    /// Tables copied in parallel by the first-start clone.
    #[arg(long, default_value_t = crate::clone::DEFAULT_PARALLEL)]
    clone_parallel: usize,
    #[command(flatten)]
    flush: FlushMs,
    #[command(flatten)]
    pace: ReplayPace,
    /// After capture stopped on a partition of a publish_via_partition_root publication and the
    /// copy was made to match: accept its current state (comma-separated schema.table).
    #[arg(long, value_delimiter = ',', value_name = "TABLE")]
    accept_partition_rewrite: Vec<String>,
    /// After the source or the target restarts, fails over or drops a connection: reconnect
    /// attempts in a row (capture and replay each) before giving up (1 s, 2 s, 4 s … up to
    /// 30 s apart: 10 ≈ 3 minutes). 0 = the run ends at the first lost connection.
    #[arg(long, default_value_t = crate::conn::reconnect::DEFAULT_ATTEMPTS, value_name = "N")]
    reconnect_attempts: u32,
    /// No status line.
    #[arg(long)]
    no_progress: bool,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let mut config = LiveConfig::new(a.source.conn()?, a.target.conn()?, a.buffer.buffer);
    config.slot = a.slot.slot;
    config.publication = a.slot.publication.name;
    // Both clamped where they are used: the clone's parallelism in `live`, the connections in
    // replay.
    config.clone_parallel = a.clone_parallel;
    config.flush_interval = a.flush.interval();
    config.batch_time = a.pace.batch_time();
    config.apply_connections = a.pace.apply_connections;
    config.status_line = !a.no_progress;
    config.accept_partition_rewrite = a.accept_partition_rewrite;
    config.reconnect = crate::conn::reconnect::Reconnect::attempts(a.reconnect_attempts);
    if let Some(path) = &a.transform {
        config.transform = Some(std::sync::Arc::new(crate::transform::Mapping::load(path)?));
    }
    let report = live::run(config, shutdown_signal()).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        eprintln!(
            "run stopped: captured {} changes (durable up to {}), replayed {} (applied up to {}) in {:.0} s",
            report.captured_changes,
            report.durable_lsn,
            report.replayed_changes,
            report.applied_lsn,
            report.elapsed_secs
        );
    }
    Ok(ExitCode::SUCCESS)
}
