//! The `walshift` command line: argument parsing, logging setup, and dispatch. Each command's
//! handler lives in its own file and only translates between flags and the library:
//!
//! - `args.rs` — flag groups several commands share (databases, buffer, slot and publication,
//!   capture's flush interval, replay's batching), defaults from the library's DEFAULT_*.
//! - `capture.rs` — `walshift capture` (and its first-start clone).
//! - `replay.rs` — `walshift replay`.
//! - `migrate.rs` — `walshift migrate`.
//! - `transform.rs` — `walshift transform check`.
//! - `verify.rs` — `walshift verify` (offline and `--online`).
//! - `buffer_cmds.rs` — `walshift inspect`, `status` and `buffer prune|verify`.
//! - `cutover.rs` — `walshift cutover` and its exit codes.
//! - `run.rs` — `walshift run` (capture and replay --follow in one process).
//! - `fixture.rs` — `walshift fixture record`.
//! - `rehearse.rs` — `walshift rehearse`.
//! - `bench.rs` — `walshift bench` (replay, `capture`, `cutover`).
//! - `demo.rs` — `walshift demo`.
//! - `scrub.rs` — passwords out of the process title (re-exec at startup).

mod args;
mod bench;
mod buffer_cmds;
mod capture;
mod cutover;
mod demo;
mod fixture;
mod migrate;
mod rehearse;
mod replay;
mod run;
mod scrub;
mod transform;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::lsn::Lsn;

/// Near-zero-downtime PostgreSQL releases: capture the live database's changes into a durable
/// buffer, replay them into the migrated copy, cut over in a short measured window.
#[derive(Parser, Debug)]
#[command(name = "walshift", version, about, propagate_version = true)]
pub struct Cli {
    /// Log filter (tracing syntax), e.g. `info`, `walshift=debug`. Also `WALSHIFT_LOG`.
    #[arg(long, global = true, env = "WALSHIFT_LOG", default_value = "warn", value_parser = parse_log_filter)]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stream the source's changes (logical replication, pgoutput) into a durable buffer.
    Capture(capture::CaptureArgs),
    /// Apply the buffer's transactions to the target, batched, set-based, exactly once.
    Replay(replay::ReplayArgs),
    /// Run the release's migration scripts on the target, in order, each once, recorded there.
    Migrate(migrate::MigrateArgs),
    /// Migration mappings: compile and check one against the target.
    #[command(subcommand)]
    Transform(transform::TransformCommand),
    /// Compare each target table with the source through the mapping: counts, checksums, differing keys.
    Verify(verify::VerifyArgs),
    /// Show the transactions and changes held in a buffer.
    Inspect(buffer_cmds::InspectArgs),
    /// Show a buffer's segments, size, LSN range and last commit.
    Status(buffer_cmds::StatusArgs),
    /// Buffer maintenance.
    #[command(subcommand)]
    Buffer(buffer_cmds::BufferCommand),
    /// Measure walshift against PostgreSQL's own tools on throwaway clusters.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run walshift's main job end to end on throwaway local clusters.
    Demo(demo::DemoArgs),
    /// Fence the source, drain to a marker, sync sequences, verify, switch: the measured window.
    Cutover(cutover::CutoverArgs),
    /// Capture (cloning on first start) and replay --follow in one process, with a control socket.
    Run(run::RunArgs),
    /// Fixtures for rehearsals: record one from a live source.
    #[command(subcommand)]
    Fixture(fixture::FixtureCommand),
    /// Replay a fixture into a scratch target: check the result, measure throughput and the
    /// projected cutover window.
    Rehearse(rehearse::RehearseArgs),
}

/// Entry point used by `main.rs`.
pub fn main() -> ExitCode {
    // First, while single-threaded: passwords out of the process title (may re-exec).
    let cli = Cli::parse_from(scrub::args());
    init_logging(&cli.log);
    // One thread: capture's hot loop then polls its socket itself instead of being woken by
    // an I/O thread for every read (the buffer's fsyncs have their own thread).
    // Replay is the exception: its writer task runs the target's statements on a second
    // thread while the applier reads and folds the next batch.
    let mut builder = if matches!(cli.command, Command::Replay(_) | Command::Rehearse(_)) {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Capture(a) => capture::run(a).await,
            Command::Replay(a) => replay::run(a).await,
            Command::Migrate(a) => migrate::run(a).await,
            Command::Transform(c) => transform::run(c).await,
            Command::Verify(a) => verify::run(a).await,
            Command::Inspect(a) => buffer_cmds::inspect(a),
            Command::Status(a) => buffer_cmds::status(a).await,
            Command::Buffer(c) => buffer_cmds::buffer(c).await,
            Command::Bench(c) => bench::run(c).await,
            Command::Demo(a) => demo::run(a).await,
            Command::Cutover(a) => cutover::run(a).await,
            Command::Run(a) => run::run(a).await,
            Command::Fixture(c) => fixture::run(c).await,
            Command::Rehearse(a) => rehearse::run(a).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// A `--log` filter: valid tracing syntax whose bare words are levels or targets walshift logs
/// under (a misspelt level would otherwise silently select a target that never logs).
fn parse_log_filter(s: &str) -> Result<String, String> {
    const TARGETS: [&str; 3] = ["walshift", "tokio_postgres", "postgres"];
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map_err(|e| format!("invalid log filter {s:?}: {e}"))?;
    for d in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let target = d.split(['=', '[']).next().unwrap_or(d);
        let is_level = d.eq_ignore_ascii_case("off") || d.parse::<tracing::Level>().is_ok();
        let known = TARGETS
            .iter()
            .any(|t| target == *t || target.starts_with(&format!("{t}::")));
        if !is_level && !known && !target.is_empty() {
            return Err(format!(
                "invalid log filter {s:?}: {d:?} is neither a level (off, error, warn, info, debug, trace) \
                 nor a walshift target (e.g. walshift=debug, walshift::capture=trace)"
            ));
        }
    }
    Ok(s.to_owned())
}

/// The error and its causes on one line, each said once ([`crate::error::chain_text`]).
fn render_error(e: &anyhow::Error) -> String {
    crate::error::chain_text(e.as_ref())
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The table names of `--tables` values: each split on commas outside double quotes, so a
/// quoted name may hold commas (`--tables '"a,b",public.c'` → `"a,b"`, `public.c`); the flag
/// may also be repeated. Parts keep their quotes: they are parsed as SQL identifiers later.
fn split_tables(flag: &str, values: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for v in values {
        let mut part = String::new();
        let mut quoted = false;
        for c in v.chars() {
            match c {
                '"' => {
                    quoted = !quoted;
                    part.push(c);
                }
                ',' if !quoted => out.push(std::mem::take(&mut part)),
                _ => part.push(c),
            }
        }
        anyhow::ensure!(
            !quoted,
            "{flag}: {v:?} has an unterminated double quote; quote a name as in SQL (\"a,b\", with \"\" for a quote inside)"
        );
        out.push(part);
    }
    let out: Vec<String> = out.into_iter().map(|p| p.trim().to_owned()).collect();
    anyhow::ensure!(
        out.iter().all(|p| !p.is_empty()),
        "{flag}: an empty table name in {values:?}; separate names with single commas"
    );
    Ok(out)
}

/// Parses an `X/Y` LSN flag.
fn parse_lsn(s: &str) -> Result<Lsn, String> {
    s.parse::<Lsn>().map_err(|e| e.to_string())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect to db1: refused")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("connecting to the target: {0}")]
    struct Middle(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("capture failed: {0}")]
    struct Outer(#[source] Middle);

    #[test]
    fn each_cause_is_said_once() {
        let e = anyhow::Error::new(Outer(Middle(Inner)));
        assert_eq!(
            super::render_error(&e),
            "capture failed: connecting to the target: cannot connect to db1: refused"
        );
        let e = anyhow::Error::new(Inner).context("--source");
        assert_eq!(
            super::render_error(&e),
            "--source: cannot connect to db1: refused"
        );
    }

    /// Builds every command (clap's own consistency checks, and [`super::args::own_help`]'s:
    /// each override names a flag of its command).
    #[test]
    fn every_command_builds() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    #[test]
    fn table_lists_split_on_commas_outside_quotes() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            super::split_tables("--tables", &v(&["\"a,b\", public.c", "\"x\"\"y,\".z"])).unwrap(),
            v(&["\"a,b\"", "public.c", "\"x\"\"y,\".z"])
        );
        assert!(super::split_tables("--tables", &v(&["\"a,b"])).is_err());
        assert!(super::split_tables("--tables", &v(&["a,,b"])).is_err());
    }
}
