//! `walshift bench …`.

use std::process::ExitCode;

use anyhow::Context;

use crate::bench::capture::CaptureBench;
use crate::bench::workload::Workload;

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Capture throughput: walshift capture vs pg_recvlogical on identical slots, same run.
    Capture {
        /// Row changes in the workload.
        #[arg(long, default_value_t = 1_000_000)]
        changes: i64,
        /// Row changes per source transaction.
        #[arg(long, default_value_t = 10)]
        txn_size: i64,
        /// Rows in `accounts` before the changes.
        #[arg(long, default_value_t = 200_000)]
        initial_rows: i64,
        /// Measured runs per tool.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(c: BenchCommand) -> anyhow::Result<ExitCode> {
    match c {
        BenchCommand::Capture {
            changes,
            txn_size,
            initial_rows,
            runs,
            json,
        } => {
            let bench = CaptureBench {
                workload: Workload {
                    changes,
                    txn_size: txn_size.max(1),
                    initial_rows,
                    ..Workload::default()
                },
                runs: runs.max(1),
            };
            let exe = std::env::current_exe().context("locating the walshift binary")?;
            let report = bench.run(&exe, |line| eprintln!("{line}")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
