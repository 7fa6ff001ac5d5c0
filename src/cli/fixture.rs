//! `walshift fixture record`: record a fixture from a live source.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::args::{Source, own_help};
use crate::lsn::Lsn;
use crate::rehearse::record::{ExpectMode, RecordOptions};

#[derive(clap::Subcommand, Debug)]
pub enum FixtureCommand {
    /// Record a fixture: schema and rows at a new slot's snapshot, the captured buffer, the
    /// release's migration and mapping, and the expected target state (docs/fixtures.md).
    Record(RecordArgs),
}

#[derive(clap::Args, Debug)]
#[command(mut_args(own_help(&[
    ("source", "The live source: a libpq URL or key=value string (REPLICATION, and able to pg_dump)"),
])))]
pub struct RecordArgs {
    #[command(flatten)]
    source: Source,
    /// The fixture directory to create (must not exist or be empty).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Stop once everything up to this LSN is captured (the expectation then comes from the
    /// first rehearsal).
    #[arg(long, value_name = "X/Y", value_parser = super::parse_lsn, conflicts_with = "seconds")]
    until_lsn: Option<Lsn>,
    /// Capture for this many seconds, then up to the source's end of WAL. Without it and
    /// without --until-lsn: until Ctrl-C.
    #[arg(long, value_name = "N")]
    seconds: Option<f64>,
    /// Tables to capture (comma-separated schema.table, quoted like SQL identifiers:
    /// `'"a,b",public.c'`); default all.
    #[arg(long, value_name = "TABLES")]
    tables: Vec<String>,
    /// The release's mapping file.
    #[arg(long, value_name = "FILE")]
    mapping: Option<PathBuf>,
    /// The release's migration scripts, in order (repeat the flag).
    #[arg(long, value_name = "FILE")]
    migration: Vec<PathBuf>,
    /// Ship this deterministic SQL as generate.sql instead of dumping the rows.
    #[arg(long, value_name = "FILE")]
    generate: Option<PathBuf>,
    /// Fixture name (default: the directory's name).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "")]
    description: String,
    /// What the fixture exercises (comma-separated tags).
    #[arg(long, value_delimiter = ',')]
    exercises: Vec<String>,
    /// Slot created and dropped for the recording.
    #[arg(long, default_value = "walshift_fixture")]
    slot: String,
    /// Publication used (created and dropped if missing).
    #[arg(long, default_value = "walshift_fixture")]
    publication: String,
    /// Require the expectation to come from the (quiescent) source.
    #[arg(long, conflicts_with = "expect_from_rehearsal")]
    expect_from_source: bool,
    /// Take the expectation from the first rehearsal.
    #[arg(long)]
    expect_from_rehearsal: bool,
    /// Do not rehearse the new fixture to check it (when the expectation comes from the source).
    #[arg(long)]
    no_check: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub async fn run(c: FixtureCommand) -> anyhow::Result<ExitCode> {
    let FixtureCommand::Record(a) = c;
    let mut opts = RecordOptions::new(a.source.conn()?, &a.out);
    opts.name = a.name;
    opts.description = a.description;
    opts.exercises = a.exercises;
    opts.tables = (!a.tables.is_empty())
        .then(|| super::split_tables("--tables", &a.tables))
        .transpose()?;
    opts.until_lsn = a.until_lsn;
    opts.mapping = a.mapping;
    opts.migration = a.migration;
    opts.generate = a.generate;
    opts.slot = a.slot;
    opts.publication = a.publication;
    opts.check = !a.no_check;
    opts.expect = if a.expect_from_source {
        ExpectMode::Source
    } else if a.expect_from_rehearsal {
        ExpectMode::Rehearsal
    } else {
        ExpectMode::Auto
    };
    let seconds = a.seconds;
    if !a.json {
        eprintln!(
            "fixture record: capturing from {}{}",
            opts.source.redacted(),
            match (seconds, opts.until_lsn) {
                (Some(s), _) => format!(" for {s} s"),
                (None, Some(l)) => format!(" up to {l}"),
                _ => " until Ctrl-C".into(),
            }
        );
    }
    let stop = async move {
        match seconds {
            Some(s) => tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs_f64(s.max(0.0))) => {}
                _ = super::shutdown_signal() => {}
            },
            None => super::shutdown_signal().await,
        }
    };
    let report = crate::rehearse::record(&opts, stop).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "fixture record: {} — {} transactions, {} changes, buffer {:.1} KiB ({} → {})",
            report.dir.display(),
            report.transactions,
            report.changes,
            report.buffer_bytes as f64 / 1024.0,
            report.consistent_point,
            report.end_lsn
        );
        match &report.expect_note {
            None => println!("  expect.json: from the source, through the mapping"),
            Some(n) => println!("  expect.json: from the first rehearsal ({n})"),
        }
        if let Some(r) = &report.rehearsal {
            println!(
                "  checked by a rehearsal: {:.0} changes/s, projected drain {:.3} s for the last {:.0} s",
                r.replay.changes_per_sec,
                r.window.drain_secs,
                r.window.of_secs.min(r.window.captured_secs)
            );
        }
        println!("  the slot {:?} was dropped", opts.slot);
    }
    Ok(ExitCode::SUCCESS)
}
