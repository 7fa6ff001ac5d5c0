//! Flag groups several commands share, each defined once and pulled into a command with
//! `#[command(flatten)]`: the databases, the buffer directory, the slot and publication,
//! capture's flush interval and replay's batching. Defaults come from the library's DEFAULT_*
//! constants, so a changed default shows in every command's `--help`.
//!
//! A command that says more about a shared flag than the group does (`--slot` "as given to
//! capture") keeps its own wording with [`own_help`]; the flag's name, type and default stay
//! the group's.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Arg;

use crate::apply::replay::{DEFAULT_APPLY_CONNECTIONS, DEFAULT_BATCH_ROWS, DEFAULT_BATCH_TIME};
use crate::capture::DEFAULT_FLUSH_INTERVAL;
use crate::conn::ConnInfo;
use crate::source::slot::{DEFAULT_PUBLICATION, DEFAULT_SLOT};

/// A command's own help texts for shared flags, by flag id:
/// `#[command(mut_args(own_help(&[("slot", "…")])))]` (`mut_args` keeps the flags' order,
/// which the usage line follows). Building the command panics if an id names none of its flags.
pub(super) fn own_help(texts: &'static [(&'static str, &'static str)]) -> impl FnMut(Arg) -> Arg {
    let mut helps = OwnHelp { texts, applied: 0 };
    move |arg| helps.apply(arg)
}

struct OwnHelp {
    texts: &'static [(&'static str, &'static str)],
    applied: usize,
}

impl OwnHelp {
    fn apply(&mut self, arg: Arg) -> Arg {
        match self.texts.iter().find(|(id, _)| arg.get_id() == *id) {
            Some((_, text)) => {
                self.applied += 1;
                arg.help(*text)
            }
            None => arg,
        }
    }
}

impl Drop for OwnHelp {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_eq!(
                self.applied,
                self.texts.len(),
                "own_help names a flag the command does not have: {:?}",
                self.texts
            );
        }
    }
}

/// The buffer directory.
#[derive(clap::Args, Debug, Clone)]
pub(super) struct BufferDir {
    /// Buffer directory (created by `walshift capture`).
    #[arg(long, value_name = "DIR")]
    pub buffer: PathBuf,
}

/// The source database.
#[derive(clap::Args, Debug)]
pub(super) struct Source {
    /// Source database (the live site): a libpq URL or key=value string.
    #[arg(long, value_name = "CONN")]
    source: String,
}

impl Source {
    /// The parsed `--source`.
    pub fn conn(&self) -> anyhow::Result<ConnInfo> {
        ConnInfo::parse(&self.source).context("--source")
    }
}

/// The target database.
#[derive(clap::Args, Debug)]
pub(super) struct Target {
    /// Target database (the copy): a libpq URL or key=value string.
    #[arg(long, value_name = "CONN")]
    target: String,
}

impl Target {
    /// The parsed `--target`.
    pub fn conn(&self) -> anyhow::Result<ConnInfo> {
        ConnInfo::parse(&self.target).context("--target")
    }
}

/// The replication slot and the publication it streams.
#[derive(clap::Args, Debug)]
pub(super) struct SlotPublication {
    /// Replication slot (created if missing; it holds WAL on the source until dropped).
    #[arg(long, default_value = DEFAULT_SLOT)]
    pub slot: String,
    #[command(flatten)]
    pub publication: Publication,
}

/// The publication walshift streams.
#[derive(clap::Args, Debug)]
pub(super) struct Publication {
    /// Publication (created if missing: FOR ALL TABLES, or --tables).
    #[arg(id = "publication", long = "publication", value_name = "PUBLICATION", default_value = DEFAULT_PUBLICATION)]
    pub name: String,
}

/// How long capture holds received changes before an fsync.
#[derive(clap::Args, Debug)]
pub(super) struct FlushMs {
    /// Longest wait before a received change is fsynced, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_FLUSH_INTERVAL.as_millis() as u64)]
    flush_ms: u64,
}

impl FlushMs {
    /// `--flush-ms`, at least 1 ms (capture takes the interval as given).
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.flush_ms.max(1))
    }
}

/// How many changes a replay batch folds.
#[derive(clap::Args, Debug)]
pub(super) struct BatchRows {
    /// Changes folded into one batch before it is written.
    #[arg(long, default_value_t = DEFAULT_BATCH_ROWS)]
    pub batch_rows: usize,
}

/// How long a replay batch stays open and how many target connections write it.
#[derive(clap::Args, Debug)]
pub(super) struct ReplayPace {
    /// Longest a batch stays open, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_BATCH_TIME.as_millis() as u64)]
    batch_ms: u64,
    /// Target connections each batch is written over (rows split by key; two-phase commit,
    /// which needs max_prepared_transactions >= N on the target, else one connection is used).
    #[arg(long, default_value_t = DEFAULT_APPLY_CONNECTIONS, value_name = "N")]
    pub apply_connections: usize,
}

impl ReplayPace {
    /// `--batch-ms`.
    pub fn batch_time(&self) -> Duration {
        Duration::from_millis(self.batch_ms)
    }
}
