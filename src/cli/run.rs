//! `walshift run`: capture (cloning on first start) and replay --follow in one process, with a
//! status line and a control socket (see [`crate::run`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use super::{BufferDir, shutdown_signal};
use crate::conn::ConnInfo;
use crate::run::{self as live, LiveConfig};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Source database (the live site): a libpq URL or key=value string.
    #[arg(long, value_name = "CONN")]
    source: String,
    /// Target database (the copy): cloned on first start, then kept in sync.
    #[arg(long, value_name = "CONN")]
    target: String,
    #[command(flatten)]
    buffer: BufferDir,
    /// Migration mapping (TOML) the changes go through.
    #[arg(long, value_name = "FILE")]
    transform: Option<PathBuf>,
    /// Replication slot (created if missing).
    #[arg(long, default_value = "walshift")]
    slot: String,
    /// Publication (created FOR ALL TABLES if missing).
    #[arg(long, default_value = "walshift")]
    publication: String,
    /// Tables copied in parallel by the first-start clone.
    #[arg(long, default_value_t = 2)]
    clone_parallel: usize,
    /// Capture's longest wait before a received change is fsynced, in milliseconds.
    #[arg(long, default_value_t = 20)]
    flush_ms: u64,
    /// Replay's longest batch, in milliseconds.
    #[arg(long, default_value_t = 200)]
    batch_ms: u64,
    /// Replay's target connections per batch (two-phase commit; needs
    /// max_prepared_transactions >= N on the target, else one is used).
    #[arg(long, default_value_t = 2, value_name = "N")]
    apply_connections: usize,
    /// After capture stopped on a partition of a publish_via_partition_root publication and the
    /// copy was made to match: accept its current state (comma-separated schema.table).
    #[arg(long, value_delimiter = ',', value_name = "TABLE")]
    accept_partition_rewrite: Vec<String>,
    /// No status line.
    #[arg(long)]
    no_progress: bool,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let source = ConnInfo::parse(&a.source).context("--source")?;
    let target = ConnInfo::parse(&a.target).context("--target")?;
    let mut config = LiveConfig::new(source, target, a.buffer.buffer);
    config.slot = a.slot;
    config.publication = a.publication;
    config.clone_parallel = a.clone_parallel.max(1);
    config.flush_interval = Duration::from_millis(a.flush_ms.max(1));
    config.batch_time = Duration::from_millis(a.batch_ms);
    config.apply_connections = a.apply_connections.max(1);
    config.status_line = !a.no_progress;
    config.accept_partition_rewrite = a.accept_partition_rewrite;
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
