//! `walshift verify`: compare the target with the source through the mapping (offline, or
//! `--online` while capture and replay run), the report as a table or JSON; exit 3 when a
//! table differs.

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use anyhow::Context;

use super::args::{Publication, Source, Target, own_help};
use crate::conn::ConnInfo;
use crate::transform::{Mapping, TableName};
use crate::verify::{self, OnlineOptions, VerifyOptions, VerifyReport};

/// Exit code when verify ran and a table differs (1 is "could not verify", 2 a usage error).
pub const EXIT_DIFFERS: u8 = 3;

#[derive(clap::Args, Debug)]
#[command(mut_args(own_help(&[
    ("publication", "Publication whose tables are verified when --tables is not given"),
])))]
pub struct VerifyArgs {
    #[command(flatten)]
    source: Source,
    #[command(flatten)]
    target: Target,
    /// Mapping file: compare the target with the source rows *through* the mapping.
    /// Without it every table maps onto itself.
    #[arg(long, value_name = "FILE")]
    transform: Option<PathBuf>,
    /// Source tables to verify (comma-separated `schema.table`, quoted like SQL identifiers:
    /// `'"a,b",public.c'`); default: the publication's.
    #[arg(long, value_name = "TABLES")]
    tables: Vec<String>,
    #[command(flatten)]
    publication: Publication,
    /// Differing keys reported per table (0: counts and checksums only).
    #[arg(long, default_value_t = verify::DEFAULT_MAX_KEYS)]
    max_keys: usize,
    /// Longest any one statement may run on the (live) source, e.g. 1h; 0 for no limit. The
    /// source's reads also run read-only, and expressions calling volatile functions are refused.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration, value_name = "DUR")]
    source_statement_timeout: Duration,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Compare while writes continue: each chunk at one source position, the running replay
    /// (or one verify runs itself) held there while the target side is read. Needs --buffer
    /// and capture running.
    #[arg(long, requires = "buffer")]
    online: bool,
    /// The buffer capture writes and replay applies (with --online).
    #[arg(long, value_name = "DIR")]
    buffer: Option<PathBuf>,
    /// Source rows per chunk (with --online): each chunk is compared at its own point.
    #[arg(long, default_value_t = crate::verify::DEFAULT_CHUNK_ROWS, value_name = "N")]
    chunk_rows: usize,
    /// Seconds a hold on replay lasts unless verify refreshes it (with --online): a killed
    /// verify blocks replay no longer than this.
    #[arg(long, default_value_t = crate::verify::DEFAULT_HOLD_TTL_SECS, value_name = "SECS")]
    hold_timeout: u64,
    /// Seconds capture or replay may make no progress towards a point before verify gives up
    /// (with --online).
    #[arg(long, default_value_t = crate::verify::DEFAULT_STALL_SECS, value_name = "SECS")]
    stall_timeout: u64,
}

pub async fn run(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let source_info = a.source.conn()?;
    let target_info = a.target.conn()?;
    let transform = match &a.transform {
        Some(p) => Some(std::sync::Arc::new(Mapping::load(p)?)),
        None => None,
    };
    let identity = Mapping::identity();
    let mapping = transform.as_deref().unwrap_or(&identity);
    let source = source_info.connect().await?;
    let target = target_info.connect().await?;
    let tables = if a.tables.is_empty() {
        verify::published_tables(&source, &a.publication.name).await?
    } else {
        super::split_tables("--tables", &a.tables)?
            .iter()
            .map(|t| {
                TableName::parse(t).with_context(|| {
                    format!("--tables: {t:?} is not a table name; write table or schema.table")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let opts = VerifyOptions {
        max_keys: a.max_keys,
        source_statement_timeout: Some(a.source_statement_timeout).filter(|d| !d.is_zero()),
        ..VerifyOptions::default()
    };
    let report = match (&a.buffer, a.online) {
        (Some(buffer), true) => {
            let online = OnlineOptions {
                base: opts,
                chunk_rows: a.chunk_rows,
                hold_ttl: Duration::from_secs(a.hold_timeout.max(1)),
                stall: Duration::from_secs(a.stall_timeout.max(1)),
            };
            verify::verify_online(
                &source_info,
                &target_info,
                buffer,
                transform.clone(),
                &tables,
                &online,
            )
            .await?
        }
        _ => verify::verify(&source, &target, mapping, &tables, &opts).await?,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report, &source_info, &target_info);
    }
    Ok(if report.equal() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIFFERS)
    })
}

fn print_human(report: &VerifyReport, source: &ConnInfo, target: &ConnInfo) {
    println!("verify: source {source}");
    println!("        target {target}");
    let names: Vec<String> = report
        .tables
        .iter()
        .map(|t| {
            if t.source == t.target {
                t.target.to_string()
            } else {
                format!("{} → {}", t.source, t.target)
            }
        })
        .collect();
    let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    for (t, name) in report.tables.iter().zip(&names) {
        let pad = width - name.chars().count();
        println!(
            "  {} {name}{:pad$}  source {:>10} rows  target {:>10} rows  {}{}",
            if t.equal { "✓" } else { "✗" },
            "",
            t.source_rows,
            t.target_rows,
            if t.equal {
                "equal"
            } else if t.source_rows != t.target_rows {
                "counts differ"
            } else {
                "checksums differ"
            },
            if t.chunks > 1 {
                format!(" ({} chunks)", t.chunks)
            } else {
                String::new()
            }
        );
        if !t.differences.is_empty() {
            let key = t.key.join(", ");
            for d in &t.differences {
                println!("      {:<17} ({key}) = {}", d.kind.to_string(), d.key);
            }
        }
    }
    for n in &report.not_checked {
        println!("  not checked: {n}");
    }
    if let Some(o) = &report.online {
        println!(
            "verify: online, {} point(s) from {} to {}, replay {}",
            o.points,
            o.first_point.as_deref().unwrap_or("-"),
            o.last_point.as_deref().unwrap_or("-"),
            o.replay
        );
    }
    let differing = report.differing().count();
    if differing == 0 {
        println!(
            "verify: {} tables equal ({:.1} s)",
            report.tables.len(),
            report.elapsed_secs
        );
    } else {
        println!(
            "verify: {differing} of {} tables differ ({:.1} s)",
            report.tables.len(),
            report.elapsed_secs
        );
    }
}
