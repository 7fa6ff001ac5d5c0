//! The `walshift` command line: argument parsing and dispatch to the library.

use std::process::ExitCode;

use clap::Parser;

/// Near-zero-downtime PostgreSQL releases.
#[derive(Parser, Debug)]
#[command(name = "walshift", version, about)]
pub struct Cli {}

/// Entry point used by `main.rs`.
pub fn main() -> ExitCode {
    let _cli = Cli::parse();
    ExitCode::SUCCESS
}
