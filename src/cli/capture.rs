//! `walshift capture`: flags to [`crate::capture::CaptureConfig`] (and, with `--clone-to`, a
//! first-start clone), the report to the terminal.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use super::args::{BufferDir, FlushMs, SlotPublication, Source, own_help};
use super::{parse_lsn, shutdown_signal};
use crate::buffer::DEFAULT_SEGMENT_SIZE;
use crate::capture::{self, CaptureConfig, DEFAULT_READ_COALESCE};
use crate::conn::ConnInfo;
use crate::lsn::Lsn;

#[derive(clap::Args, Debug)]
#[command(mut_args(own_help(&[
    ("source", "Source database: a libpq URL or key=value string; PG* variables and ~/.pgpass fill gaps"),
])))]
pub struct CaptureArgs {
    #[command(flatten)]
    source: Source,
    #[command(flatten)]
    buffer: BufferDir,
    #[command(flatten)]
    slot: SlotPublication,
    /// Tables to publish when the publication is created, comma-separated (schema.table,
    /// quoted like SQL identifiers: `'"a,b",public.c'`).
    #[arg(long)]
    tables: Option<Vec<String>>,
    /// Stop once everything up to this LSN is durable in the buffer.
    #[arg(long, value_parser = parse_lsn, value_name = "LSN")]
    until_lsn: Option<Lsn>,
    #[command(flatten)]
    flush: FlushMs,
    /// After a read that brought only a few messages, pause this many microseconds so the
    /// socket fills (fewer, larger reads; 0 = off). Keep it under a millisecond: a Unix
    /// socket fills in well under that and a full socket stalls the source's walsender.
    #[arg(long, default_value_t = DEFAULT_READ_COALESCE.as_micros() as u64)]
    read_coalesce_us: u64,
    /// Segment size in MiB for a new buffer.
    #[arg(long, default_value_t = DEFAULT_SEGMENT_SIZE >> 20)]
    segment_mib: u64,
    /// Clone the source into this target database at the new slot's snapshot before streaming.
    #[arg(long, value_name = "CONN")]
    clone_to: Option<String>,
    /// With --clone-to: clone even if the target already holds the tables or an earlier clone.
    #[arg(long)]
    force: bool,
    /// With --clone-to: tables copied in parallel.
    #[arg(long, default_value_t = crate::clone::DEFAULT_PARALLEL)]
    clone_parallel: usize,
    /// After capture stopped on a partition of a publish_via_partition_root publication
    /// (TRUNCATE, VACUUM FULL/CLUSTER, DETACH or DROP of one partition) and the copy was made
    /// to match: accept its current state (comma-separated schema.table).
    #[arg(long, value_delimiter = ',', value_name = "TABLE")]
    accept_partition_rewrite: Vec<String>,
    /// Start this new buffer from a slot that already exists, at the slot's confirmed position.
    /// Only for a slot whose earlier buffer is abandoned: this buffer lacks everything the slot
    /// confirmed before, so replay it only into a target cloned at that position.
    #[arg(long)]
    adopt_slot: bool,
    /// Fail when the stream is silent (no change, no keepalive) this long, e.g. `30s`
    /// (`0s` = never). Default: the source's wal_sender_timeout, at least 10 s.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    stream_timeout: Option<Duration>,
    /// After the source restarts, fails over or drops the connection: reconnect attempts in
    /// a row before giving up (1 s, 2 s, 4 s … up to 30 s apart: 10 ≈ 3 minutes); each
    /// resumes from the buffer's durable end. 0 = stop at the first lost connection.
    #[arg(long, default_value_t = crate::conn::reconnect::DEFAULT_ATTEMPTS, value_name = "N")]
    reconnect_attempts: u32,
    /// No progress line.
    #[arg(long)]
    no_progress: bool,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: CaptureArgs) -> anyhow::Result<ExitCode> {
    let mut config = CaptureConfig::new(a.source.conn()?, a.buffer.buffer);
    config.slot = a.slot.slot;
    config.publication = a.slot.publication.name;
    config.tables = a
        .tables
        .map(|t| super::split_tables("--tables", &t))
        .transpose()?;
    config.until_lsn = a.until_lsn;
    config.flush_interval = a.flush.interval();
    config.read_coalesce = Duration::from_micros(a.read_coalesce_us);
    config.buffer.segment_size = a.segment_mib.max(1) * 1024 * 1024;
    config.progress = !a.no_progress;
    config.accept_partition_rewrite = a.accept_partition_rewrite;
    config.adopt_slot = a.adopt_slot;
    config.stream_timeout = a.stream_timeout;
    config.reconnect = crate::conn::reconnect::Reconnect::attempts(a.reconnect_attempts);
    if let Some(target) = &a.clone_to {
        let target = ConnInfo::parse(target).context("--clone-to")?;
        let mut clone = crate::clone::CloneOptions::new(config.source.clone(), target);
        clone.force = a.force;
        clone.parallel = a.clone_parallel.max(1);
        clone.progress = !a.no_progress;
        config.clone = Some(clone);
    }
    let report = capture::run(config, shutdown_signal()).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        eprintln!(
            "capture stopped: {} transactions, {} changes, {:.1} MiB in {:.1} s; durable and confirmed up to {}",
            report.transactions,
            report.changes,
            report.bytes as f64 / 1048576.0,
            report.elapsed.as_secs_f64(),
            report.durable_lsn
        );
    }
    Ok(ExitCode::SUCCESS)
}
