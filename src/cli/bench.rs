//! `walshift bench …`: without a subcommand, replay vs native logical replication
//! ([`crate::bench::replay`]); `walshift bench capture` for capture vs `pg_recvlogical`.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, FromArgMatches, Subcommand};

use crate::bench::capture::CaptureBench;
use crate::bench::replay::ReplayBench;
use crate::bench::workload::Workload;

/// `walshift bench`: the replay comparison's flags on the command itself, plus optional
/// subcommands for the other measurements.
///
/// The parent CLI declares `bench` as a subcommand group (`#[command(subcommand)]`), which
/// clap derives as "a subcommand is required". This wrapper implements [`Subcommand`] by
/// hand so that `bench` also takes its own flags and runs without a subcommand.
#[derive(Debug)]
pub struct BenchCommand(BenchArgs);

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchSub>,
    #[command(flatten)]
    replay: ReplayBenchArgs,
}

/// Replay throughput: walshift replay vs native logical replication (subscription with
/// `synchronous_commit` on and off), same backlog, same run.
#[derive(Args, Debug)]
pub struct ReplayBenchArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// `--batch-rows` for walshift replay (default: replay's own default).
    #[arg(long)]
    batch_rows: Option<usize>,
    /// `--apply-connections` for walshift replay (default: replay's own default).
    #[arg(long, value_name = "N")]
    apply_connections: Option<usize>,
    /// Also time replay through this mapping (TOML), same backlog, same run, e.g.
    /// fixtures/transforms/bench/mapping.toml.
    #[arg(long, value_name = "FILE")]
    transform: Option<std::path::PathBuf>,
    /// Migration SQL bringing the transform's target database to the mapping's schema
    /// (untimed), e.g. fixtures/transforms/bench/migration.sql.
    #[arg(long, value_name = "FILE", requires = "transform")]
    migration: Option<std::path::PathBuf>,
    /// Measure the cutover window instead (the same as `walshift bench cutover` with its
    /// defaults: pgbench scale 10 at 500 tps, five cutovers).
    #[arg(long, conflicts_with_all = ["transform", "migration", "batch_rows", "apply_connections"])]
    cutover: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The workload's shape (workload W by default).
#[derive(Args, Debug)]
pub struct WorkloadArgs {
    /// Row changes in the workload.
    #[arg(long, default_value_t = 1_000_000)]
    changes: i64,
    /// Row changes per source transaction.
    #[arg(long, default_value_t = 10)]
    txn_size: i64,
    /// Rows in `accounts` before the changes.
    #[arg(long, default_value_t = 200_000)]
    initial_rows: i64,
}

impl WorkloadArgs {
    fn workload(&self) -> Workload {
        Workload {
            changes: self.changes,
            txn_size: self.txn_size.max(1),
            initial_rows: self.initial_rows,
            ..Workload::default()
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum BenchSub {
    /// The cutover window under pgbench load: before each cutover a dry run projects it; prints
    /// min / median / max per phase over the cutovers, the dry runs' medians, and per run the
    /// real and projected window and the projection's error.
    Cutover {
        /// pgbench scale of the source.
        #[arg(long, default_value_t = 10)]
        scale: u32,
        /// pgbench --rate on the source, transactions per second.
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// pgbench clients.
        #[arg(long, default_value_t = 4)]
        clients: u32,
        /// Measured cutovers (each preceded by a dry run).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Seconds of load before each dry run and cutover.
        #[arg(long, default_value_t = 5)]
        warmup_secs: u64,
        /// Verification inside the window: none, counts or checksum.
        #[arg(long, default_value = "counts", value_parser = |s: &str| s.parse::<crate::cutover::VerifyMode>())]
        verify: crate::cutover::VerifyMode,
        /// Cutover's --verify-sessions.
        #[arg(long, default_value_t = crate::cutover::verify::SESSIONS_PER_SIDE)]
        verify_sessions: usize,
        /// pgbench goes through a throwaway PgBouncer and each cutover runs in pooler mode
        /// (a fresh release per run); adds what the clients saw: latency max and p99, failed
        /// transactions.
        #[arg(long)]
        pooler: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Capture throughput: walshift capture vs pg_recvlogical on identical slots, same run.
    Capture {
        #[command(flatten)]
        workload: WorkloadArgs,
        /// Measured runs per tool and transport.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// How both tools reach the server: unix (its socket), tcp (127.0.0.1) or both.
        #[arg(long, default_value = "both", value_parser = |s: &str| crate::bench::capture::Transport::parse_list(s).map(Transports))]
        transport: Transports,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `--transport`: one transport, or both.
#[derive(Clone, Debug)]
pub struct Transports(Vec<crate::bench::capture::Transport>);

impl FromArgMatches for BenchCommand {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        BenchArgs::from_arg_matches(m).map(BenchCommand)
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        self.0.update_from_arg_matches(m)
    }
}

impl Subcommand for BenchCommand {
    fn augment_subcommands(cmd: clap::Command) -> clap::Command {
        BenchArgs::augment_args(cmd)
            .subcommand_required(false)
            .arg_required_else_help(false)
            .args_conflicts_with_subcommands(true)
    }
    fn augment_subcommands_for_update(cmd: clap::Command) -> clap::Command {
        BenchArgs::augment_args_for_update(cmd)
            .subcommand_required(false)
            .arg_required_else_help(false)
            .args_conflicts_with_subcommands(true)
    }
    fn has_subcommand(name: &str) -> bool {
        BenchSub::has_subcommand(name)
    }
}

pub async fn run(c: BenchCommand) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the walshift binary")?;
    match c.0.command {
        Some(BenchSub::Cutover {
            scale,
            rate,
            clients,
            runs,
            warmup_secs,
            verify,
            verify_sessions,
            pooler,
            json,
        }) => {
            let bench = crate::bench::cutover::CutoverBench {
                scale: scale.max(1),
                rate: rate.max(1),
                clients: clients.max(1),
                runs: runs.max(1),
                warmup: std::time::Duration::from_secs(warmup_secs),
                verify,
                verify_sessions: verify_sessions.max(1),
                pooler,
            };
            let report = bench.run(&exe, |line| eprintln!("{line}")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
        }
        Some(BenchSub::Capture {
            workload,
            runs,
            transport,
            json,
        }) => {
            let bench = CaptureBench {
                workload: workload.workload(),
                runs: runs.max(1),
                transports: transport.0,
            };
            let report = bench.run(&exe, |line| eprintln!("{line}")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
        }
        None if c.0.replay.cutover => {
            let bench = crate::bench::cutover::CutoverBench::default();
            let report = bench.run(&exe, |line| eprintln!("{line}")).await?;
            if c.0.replay.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
        }
        None => {
            let a = c.0.replay;
            let bench = ReplayBench {
                workload: a.workload.workload(),
                // Passed on to `walshift replay`, which clamps both.
                batch_rows: a.batch_rows,
                apply_connections: a.apply_connections,
                transform: a
                    .transform
                    .map(|mapping| crate::bench::replay::TransformBench {
                        mapping,
                        migration: a.migration,
                    }),
            };
            let report = bench.run(&exe, |line| eprintln!("{line}")).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
