//! `walshift migrate`: run the release's scripts on the target in order, each once, with a line
//! per script (or JSON, also on failure).

use std::path::PathBuf;
use std::process::ExitCode;

use super::args::{Target, own_help};
use crate::migrate::{self, MigrateOptions, Progress, ScriptResult, ScriptStatus};

#[derive(clap::Args, Debug)]
#[command(mut_args(own_help(&[
    ("target", "Target database (the copy to migrate): a libpq URL or key=value string"),
])))]
pub struct MigrateArgs {
    #[command(flatten)]
    target: Target,
    /// Only list what would run and what is already applied; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON on stdout (also on failure, with an "error" field).
    #[arg(long)]
    json: bool,
    /// The release's migration scripts, run in this order. A first line
    /// `-- walshift:no-transaction` runs a script outside a transaction.
    #[arg(required = true, value_name = "FILE.sql")]
    scripts: Vec<PathBuf>,
}

pub async fn run(a: MigrateArgs) -> anyhow::Result<ExitCode> {
    let target = a.target.conn()?;
    let scripts = match migrate::load_scripts(&a.scripts) {
        Ok(s) => s,
        Err(e) => return Ok(fail(a.json, &target.redacted(), a.dry_run, &[], &e)),
    };
    let mut opts = MigrateOptions::new(target.clone());
    opts.dry_run = a.dry_run;
    let json = a.json;
    let mut done: Vec<ScriptResult> = Vec::new();
    let result = migrate::migrate(&opts, &scripts, |p| match p {
        Progress::WaitingForLock => eprintln!(
            "migrate: another walshift migrate is running on {target}; waiting for it to finish \
             (advisory lock {})",
            migrate::LOCK_KEY
        ),
        Progress::Notice {
            script,
            severity,
            message,
        } => eprintln!("  {severity} ({script}): {message}"),
        Progress::Done(r) => {
            if !json {
                println!("{}", line(r));
            }
            done.push(r.clone());
        }
        _ => {}
    })
    .await;
    match result {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let verb = if report.dry_run {
                    "would run"
                } else {
                    "applied"
                };
                let n = report.scripts.len() - report.skipped;
                println!(
                    "migrate: {n} {verb}, {} already applied, in {:.2} s",
                    report.skipped, report.elapsed_secs
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(fail(json, &target.redacted(), a.dry_run, &done, &e)),
    }
}

/// One line per script: status, name, duration or when it was applied.
fn line(r: &ScriptResult) -> String {
    let how = if r.no_transaction {
        " (no transaction)"
    } else {
        ""
    };
    match r.status {
        ScriptStatus::Applied => format!(
            "  applied    {}  {:.1} ms{how}",
            r.name,
            r.duration_ms.unwrap_or(0.0)
        ),
        ScriptStatus::Skipped => format!(
            "  skipped    {}  already applied {}",
            r.name,
            r.applied_at.as_deref().unwrap_or("?")
        ),
        _ => format!("  would run  {}{how}", r.name),
    }
}

/// Reports a failure (the error on stderr; with `--json` also the report so far on stdout).
fn fail(
    json: bool,
    target: &str,
    dry_run: bool,
    done: &[ScriptResult],
    e: &migrate::MigrateError,
) -> ExitCode {
    if json {
        let v = serde_json::json!({
            "target": target,
            "dry_run": dry_run,
            "scripts": done,
            "error": e.to_string(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    // The message already carries the server's text; the source chain would repeat it.
    eprintln!("error: {e}");
    ExitCode::FAILURE
}
