//! `walshift rehearse`: replay a fixture into a scratch target, check it, time the window.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use super::args::{BatchRows, own_help};
use crate::conn::ConnInfo;
use crate::rehearse::{self, Fixture, RehearseOptions, RehearseReport, Scratch};

/// Exit code when the rehearsal ran and a table differs from the expectation.
pub const EXIT_DIFFERS: u8 = 3;

#[derive(clap::Args, Debug)]
#[command(mut_args(own_help(&[
    ("batch_rows", "Replay batch size (changes)"),
])))]
pub struct RehearseArgs {
    /// The fixture directory (`fixture.toml`, `buffer/`, `schema.sql`, …; docs/fixtures.md).
    #[arg(long, value_name = "DIR")]
    fixture: PathBuf,
    /// An empty database to rehearse into. Default: a throwaway local cluster, deleted after.
    /// Comparing needs a second scratch database on its server (CREATEDB).
    #[arg(long, value_name = "CONN")]
    target: Option<String>,
    /// The projected cutover window is the time replay needs for the last this-long of the
    /// captured traffic (by commit timestamps).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    window_of: Duration,
    #[command(flatten)]
    batch_rows: BatchRows,
    /// Write expect.json from this rehearsal instead of comparing with it (a regression
    /// baseline for fixtures recorded from a source that was not quiescent).
    #[arg(long)]
    write_expect: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: RehearseArgs) -> anyhow::Result<ExitCode> {
    let fixture = Fixture::open(&a.fixture)?;
    // A damaged fixture is reported before a cluster is started for it.
    rehearse::fixture::check_buffer(&fixture)?;
    let scratch = match &a.target {
        Some(t) => Scratch::given(ConnInfo::parse(t).context("--target")?),
        None => {
            if !a.json {
                eprintln!(
                    "rehearse: starting a throwaway PostgreSQL cluster for the scratch target"
                );
            }
            Scratch::throwaway("rehearsal").await?
        }
    };
    let opts = RehearseOptions {
        window_of: a.window_of,
        batch_rows: a.batch_rows.batch_rows,
        write_expect: a.write_expect,
    };
    let report = rehearse::rehearse(&fixture, &scratch, &opts).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.equal() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIFFERS)
    })
}

fn print_report(r: &RehearseReport) {
    println!("rehearse: fixture {} into {}", r.fixture, r.target);
    println!(
        "  load {:.2} s, migrate {:.2} s",
        r.load_secs, r.migrate_secs
    );
    println!(
        "  replay {} transactions, {} changes in {:.3} s: {:.0} changes/s ({} target commits)",
        r.replay.transactions,
        r.replay.changes,
        r.replay.secs,
        r.replay.changes_per_sec,
        r.replay.batches
    );
    let whole = r.window.split_lsn.is_zero();
    println!(
        "  projected cutover drain: {:.3} s for the last {:.0} s of traffic ({} transactions, {} changes{})",
        r.window.drain_secs,
        r.window.of_secs.min(r.window.captured_secs),
        r.window.tail_transactions,
        r.window.tail_changes,
        if whole {
            format!(
                "; the fixture spans only {:.1} s: all of it",
                r.window.captured_secs
            )
        } else {
            String::new()
        }
    );
    for t in &r.tables {
        let name = if t.source == t.target {
            t.source.clone()
        } else {
            format!("{} → {}", t.source, t.target)
        };
        let mark = if t.equal { "✓" } else { "✗" };
        match (&t.expected_rows, &t.expected_checksum) {
            (Some(er), Some(ec)) if !t.equal => {
                println!(
                    "  {mark} {name}  rows {} (expected {er})  checksum {} (expected {ec})",
                    t.rows, t.checksum
                )
            }
            (None, _) if !t.equal => println!("  {mark} {name}  not in expect.json"),
            _ => println!("  {mark} {name}  {} rows  checksum {}", t.rows, t.checksum),
        }
    }
    if r.expect_written {
        println!(
            "rehearse: wrote expect.json from this rehearsal ({} tables)",
            r.tables.len()
        );
    } else {
        let differ = r.tables.iter().filter(|t| !t.equal).count();
        let from = r.expect_from.map(|e| e.to_string()).unwrap_or_default();
        if differ == 0 {
            println!("rehearse: every table matches expect.json (from the {from})");
        } else {
            println!(
                "rehearse: {differ} of {} tables differ from expect.json (from the {from})",
                r.tables.len()
            );
        }
    }
}
