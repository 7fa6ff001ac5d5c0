//! `walshift cutover`: flags to [`crate::cutover::CutoverConfig`], the report to the terminal
//! (a table on stderr, or JSON on stdout with `--json`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::args::{BufferDir, SlotPublication, Source, Target, own_help};
use super::shutdown_signal;
use crate::cutover::{self, CutoverConfig, CutoverError, FenceMode, Outcome, VerifyMode};

#[derive(clap::Args, Debug)]
#[command(mut_args(own_help(&[
    ("target", "Target database (the migrated copy)"),
    ("slot", "Replication slot (as given to capture)"),
    ("publication", "Publication (as given to capture)"),
])))]
pub struct CutoverArgs {
    #[command(flatten)]
    source: Source,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    buffer: BufferDir,
    /// Migration mapping (TOML) the copy was migrated with: replay started by cutover applies
    /// through it, sequences follow its renames, verify compares through it.
    #[arg(long, value_name = "FILE")]
    transform: Option<PathBuf>,
    /// How writes are stopped: read-only (ALTER DATABASE … default_transaction_read_only, other
    /// sessions terminated), hook (--before stops the application), none (already stopped).
    #[arg(long, default_value = "read-only", value_parser = parse_fence)]
    fence: FenceMode,
    /// Shell command run before the fence (in hook mode it is the fence).
    #[arg(long, value_name = "CMD")]
    before: Option<String>,
    /// Shell command that moves traffic to the target (pooler, DNS, VIP).
    #[arg(long, value_name = "CMD")]
    switch: Option<String>,
    /// Shell command run after the switch.
    #[arg(long, value_name = "CMD")]
    after: Option<String>,
    /// Longest any hook may run, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DUR")]
    hook_timeout: Duration,
    /// Fence only once the target is at most this far behind, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DUR")]
    max_lag: Duration,
    /// Abort and unfence if the switch has not started this long after the fence, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DUR")]
    max_window: Duration,
    /// Wait this long for prepared transactions on the source to finish before refusing, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DUR")]
    max_prepared_wait: Duration,
    /// What to compare before the switch: none, counts or checksum.
    #[arg(long, default_value = "counts", value_parser = parse_verify)]
    verify: VerifyMode,
    /// Sessions verify reads each side over. 1 reads each table whole; with more, tables of
    /// 8 MiB or more are cut into that many page ranges read at once (for servers with cores
    /// to spare; on a machine source and target share, they compete and the window grows).
    #[arg(long, default_value_t = crate::cutover::verify::SESSIONS_PER_SIDE, value_name = "N")]
    verify_sessions: usize,
    /// Rehearse every step except fencing, the hooks and the switch; print the projected window.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    slot: SlotPublication,
    /// After a cutover whose switch started but was never recorded done (walshift killed
    /// during the --switch hook): you checked that traffic reaches the target. Records the
    /// switch as done, sets sequences (forward only) and runs --after. Never unfences.
    #[arg(long)]
    resume_after_switch: bool,
    /// After a cutover whose switch started but did not complete (exit 5: the --switch hook
    /// failed or was killed, walshift died): you checked that none of the application's
    /// traffic ever left the source. Lifts the fence exactly as it was before the cutover
    /// (role settings included) and records that in the journal; then cutover can run again.
    #[arg(long, conflicts_with = "resume_after_switch")]
    unfence_after_failed_switch: bool,
    /// PgBouncer's admin console (dbname=pgbouncer, a user in admin_users): the fence pauses
    /// the application's pool (clients wait instead of failing), the switch points its entry at
    /// the target and resumes it. --fence still applies on top (for clients that bypass the
    /// pooler); use --fence none when every writer goes through PgBouncer.
    #[arg(long, value_name = "CONN", requires = "pooler_databases_file")]
    pooler: Option<String>,
    /// The pooler's name for the database (its [databases] entry). Default: --source's dbname.
    #[arg(long, value_name = "NAME", requires = "pooler")]
    pooler_database: Option<String>,
    /// The file holding that entry (pgbouncer.ini or a file it %includes); the switch rewrites
    /// the entry in it (other lines untouched) and RELOADs.
    #[arg(long, value_name = "FILE", requires = "pooler")]
    pooler_databases_file: Option<PathBuf>,
    /// The entry the switch writes, e.g. "host=10.0.0.7 port=5432 dbname=shop user=app".
    /// Default: the current entry with --target's host, port and dbname.
    #[arg(long, value_name = "ENTRY", requires = "pooler")]
    pooler_target_entry: Option<String>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Exit code: switched, but the --after hook failed or never finished (walshift died while it
/// ran); a rerun with --after runs only the after hook.
pub const EXIT_AFTER_HOOK_FAILED: u8 = 4;
/// Exit code: the switch started and its end is unknown; the source stays fenced.
pub const EXIT_SWITCH_IN_DOUBT: u8 = 5;

fn parse_fence(s: &str) -> Result<FenceMode, String> {
    s.parse()
}

fn parse_verify(s: &str) -> Result<VerifyMode, String> {
    s.parse()
}

pub async fn run(a: CutoverArgs) -> anyhow::Result<ExitCode> {
    let mut config = CutoverConfig::new(a.source.conn()?, a.target.conn()?, a.buffer.buffer);
    config.slot = a.slot.slot;
    config.publication = a.slot.publication.name;
    config.fence = a.fence;
    config.before = a.before;
    config.switch = a.switch;
    config.after = a.after;
    config.hook_timeout = a.hook_timeout;
    config.max_lag = a.max_lag;
    config.max_window = a.max_window;
    config.verify = a.verify;
    config.verify_sessions = a.verify_sessions.max(1);
    config.dry_run = a.dry_run;
    config.resume_after_switch = a.resume_after_switch;
    config.unfence_after_failed_switch = a.unfence_after_failed_switch;
    config.max_prepared_wait = a.max_prepared_wait;
    if let Some(admin) = &a.pooler {
        config.pooler = Some(cutover::PoolerConfig {
            admin: crate::conn::ConnInfo::parse(admin).context("--pooler")?,
            database: a
                .pooler_database
                .clone()
                .unwrap_or_else(|| config.source.dbname().to_owned()),
            databases_file: a.pooler_databases_file.clone().unwrap_or_default(),
            target_entry: a.pooler_target_entry.clone(),
        });
    }
    if let Some(path) = &a.transform {
        config.transform = Some(Arc::new(crate::transform::Mapping::load(path)?));
    }
    config.say = Some(Arc::new(|line: &str| eprintln!("{line}")));
    let json = a.json;
    let print = |report: &cutover::CutoverReport| -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(report)?);
        } else {
            eprint!("{report}");
        }
        Ok(())
    };
    match cutover::run(config, shutdown_signal()).await {
        Ok(report) => {
            print(&report)?;
            Ok(match report.outcome {
                Outcome::Switched
                | Outcome::DryRun
                | Outcome::AlreadySwitched
                | Outcome::UnfencedAfterFailedSwitch => ExitCode::SUCCESS,
                Outcome::SwitchedAfterHookFailed | Outcome::SwitchedAfterHookUnfinished => {
                    ExitCode::from(EXIT_AFTER_HOOK_FAILED)
                }
                _ => ExitCode::FAILURE,
            })
        }
        Err(CutoverError::SwitchInDoubt(doubt)) => {
            if let Some(report) = &doubt.report {
                print(report)?;
            }
            eprintln!("error: {doubt}");
            Ok(ExitCode::from(EXIT_SWITCH_IN_DOUBT))
        }
        Err(CutoverError::Aborted(aborted)) => {
            print(&aborted.report)?;
            Err(anyhow::Error::new(*aborted))
        }
        Err(e) => Err(e.into()),
    }
}
