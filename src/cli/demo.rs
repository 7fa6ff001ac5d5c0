//! `walshift demo`: the end-to-end demo on throwaway local clusters (behind a throwaway
//! PgBouncer when it is installed, unless `--no-pooler`); Ctrl-C stops it and removes the
//! clusters (exit 130).

use std::process::ExitCode;

use super::shutdown_signal;
use crate::demo::{self, DemoOptions};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Seconds the demo shop keeps writing.
    #[arg(long, default_value_t = 6)]
    seconds: u64,
    /// Writer transactions per second.
    #[arg(long, default_value_t = 150)]
    tps: u32,
    /// Connect the writer directly and let the read-only fence refuse it, even when PgBouncer
    /// is installed (by default the writer goes through PgBouncer and is held, not refused).
    #[arg(long)]
    no_pooler: bool,
}

pub async fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let opts = DemoOptions {
        seconds: a.seconds.max(2),
        tps: a.tps.max(1),
        pooler: !a.no_pooler,
    };
    tokio::select! {
        r = demo::run(opts, |line| println!("{line}")) => { r?; Ok(ExitCode::SUCCESS) }
        _ = shutdown_signal() => {
            eprintln!("interrupted: stopping the demo clusters and removing their files");
            Ok(ExitCode::from(130))
        }
    }
}
