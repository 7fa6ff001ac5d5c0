//! [`CutoverConfig`]: what to cut over and how. Every setting documents its default and its
//! trade-off; [`CutoverConfig::validate`] refuses impossible settings before anything is
//! connected to or touched.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{CutoverError, FenceMode, PoolerConfig, Say, TableMap, VerifyMode};
use crate::conn::ConnInfo;

/// What to cut over and how. Every field documents its default and trade-off.
#[derive(Clone)]
pub struct CutoverConfig {
    /// The live database (fenced, then left read-only after a successful cutover).
    pub source: ConnInfo,
    /// The migrated copy that replay fills.
    pub target: ConnInfo,
    /// The buffer capture writes.
    pub buffer_dir: PathBuf,
    /// Replication slot. Default [`crate::source::slot::DEFAULT_SLOT`] (`walshift`, as capture's).
    /// Must be the buffer's slot.
    pub slot: String,
    /// Publication. Default [`crate::source::slot::DEFAULT_PUBLICATION`] (`walshift`, as capture's).
    /// Its tables are the ones verified.
    pub publication: String,
    /// How the source is fenced. Default read-only.
    pub fence: FenceMode,
    /// Run before the fence (required in hook mode, where it is the fence). Default none.
    pub before: Option<String>,
    /// Repoints traffic (pooler, DNS, VIP). Default none (the window then ends after verify).
    pub switch: Option<String>,
    /// Run after the switch (e.g. take the maintenance page down). Default none.
    pub after: Option<String>,
    /// Longest each hook may run before it is killed. Default 60 s.
    pub hook_timeout: Duration,
    /// Fence only once the target is at most this far behind. Default 5 s. Lower means a
    /// shorter drain inside the window; too low may never be reached under heavy load.
    pub max_lag: Duration,
    /// Abort (and unfence) if the switch has not started this long after the fence went up.
    /// Default 10 s. The cap on how long the site can be read-only because of walshift.
    pub max_window: Duration,
    /// What to compare after the drain. Default counts (cheap); checksum reads every row on
    /// both sides, inside the window.
    pub verify: VerifyMode,
    /// Sessions verify reads each side over, opened before the fence. Default
    /// [`super::verify::SESSIONS_PER_SIDE`] (1): each table read whole, one backend per side —
    /// one core of each server. With N > 1, tables of 8 MiB or more are cut into N page ranges
    /// read at once, so a side's reading uses N of its server's cores: raise it when the
    /// servers have cores to spare and large tables. On a machine the source and target
    /// share, more sessions make both sides' readings compete for the same cores and lengthen
    /// the window (measured in the README). Each session is one more backend on each side for
    /// the cutover's length.
    pub verify_sessions: usize,
    /// Rehearse: no fence, no hooks, no switch; report the projected window. Default false.
    pub dry_run: bool,
    /// The migration mapping the target was built with. Default none (identity). When set, a
    /// replay cutover starts itself applies through it, sequences follow its table renames,
    /// and verify compares through it ([`crate::verify::verify`]); `table_map` is ignored.
    pub transform: Option<Arc<crate::transform::Mapping>>,
    /// Source table → target tables, for sequences and verify without a `transform`. Default
    /// identity.
    pub table_map: TableMap,
    /// Give up (nothing fenced) if the lag is not under `max_lag` within this time. Default
    /// none: wait until it is, or until interrupted.
    pub preflight_timeout: Option<Duration>,
    /// How long to wait for each terminated session to exit. Default 5 s (capped by
    /// `max_window`).
    pub terminate_timeout: Duration,
    /// How often the drain checks the slot, the buffer and the target. Default 2 ms: each
    /// check is a small query; shorter adds load, longer adds up to that much to the window.
    pub poll_interval: Duration,
    /// Fsync interval of a capture cutover starts itself. Default 10 ms, shorter than capture's
    /// own [`crate::capture::DEFAULT_FLUSH_INTERVAL`] (20 ms): it is part of the drain time, at
    /// more fsyncs while cutover waits.
    pub capture_flush_interval: Duration,
    /// Batch time of a replay cutover starts itself. Default 50 ms, shorter than replay's own
    /// [`crate::apply::replay::DEFAULT_BATCH_TIME`] (200 ms): a batch cut sooner is applied
    /// sooner inside the window, at more commits. Its other settings are replay's defaults.
    pub replay_batch_time: Duration,
    /// The operator checked that traffic points to the target after a cutover whose switch
    /// started but whose end was not recorded: record the switch as done, set sequences
    /// (never backwards), run `after`. Default false (such a cutover is refused).
    pub resume_after_switch: bool,
    /// The operator checked that none of the application's traffic left the source after a
    /// cutover whose switch started but did not complete (the hook failed or was killed,
    /// walshift died): lift the fence exactly as the journal recorded it (the database's
    /// setting and the role settings the fence removed) and record that in the journal, so a
    /// new cutover may run. Default false. Refused when the journal records the switch done.
    pub unfence_after_failed_switch: bool,
    /// How long preflight waits for prepared transactions of the source database
    /// (`pg_prepared_xacts`) to be committed or rolled back before refusing. Default 5 s. A
    /// prepared transaction survives the fence and could be committed on the source after the
    /// switch, never reaching the copy.
    pub max_prepared_wait: Duration,
    /// PgBouncer in front of the source (`--pooler`): the fence pauses the application's
    /// pool (clients wait instead of failing) and the switch repoints it to the copy and
    /// resumes it. Default none (clients see the read-only fence's errors and reconnect).
    /// `fence` still applies on top, for clients that bypass the pooler: keep read-only unless
    /// every writer goes through PgBouncer (then `none` saves the termination round trips).
    pub pooler: Option<PoolerConfig>,
    /// Progress lines (waiting, lag). Default none.
    pub say: Option<Say>,
}

impl CutoverConfig {
    /// Defaults for everything but the databases and the buffer.
    pub fn new(source: ConnInfo, target: ConnInfo, buffer_dir: impl Into<PathBuf>) -> Self {
        CutoverConfig {
            source,
            target,
            buffer_dir: buffer_dir.into(),
            slot: crate::source::slot::DEFAULT_SLOT.into(),
            publication: crate::source::slot::DEFAULT_PUBLICATION.into(),
            fence: FenceMode::ReadOnly,
            before: None,
            switch: None,
            after: None,
            hook_timeout: Duration::from_secs(60),
            max_lag: Duration::from_secs(5),
            max_window: Duration::from_secs(10),
            verify: VerifyMode::Counts,
            verify_sessions: super::verify::SESSIONS_PER_SIDE,
            dry_run: false,
            transform: None,
            table_map: TableMap::identity(),
            preflight_timeout: None,
            terminate_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_millis(2),
            capture_flush_interval: Duration::from_millis(10),
            replay_batch_time: Duration::from_millis(50),
            resume_after_switch: false,
            unfence_after_failed_switch: false,
            max_prepared_wait: Duration::from_secs(5),
            pooler: None,
            say: None,
        }
    }

    /// Refuses impossible settings, before anything is connected to or touched.
    pub fn validate(&self) -> Result<(), CutoverError> {
        let bad =
            |flag: &str, why: &str| Err(CutoverError::InvalidConfig(format!("{flag}: {why}")));
        let positive = [
            (
                "--max-window",
                self.max_window,
                "the fence would be up with no time to drain: it would only ever fence, terminate every session and abort",
            ),
            (
                "--max-lag",
                self.max_lag,
                "preflight would wait for a lag of exactly zero, which a source taking writes never reaches",
            ),
            (
                "--hook-timeout",
                self.hook_timeout,
                "every hook would be killed at once",
            ),
            (
                "terminate timeout",
                self.terminate_timeout,
                "terminated sessions would never be waited for",
            ),
            (
                "poll interval",
                self.poll_interval,
                "the drain would poll without pause",
            ),
        ];
        for (flag, d, why) in positive {
            if d.is_zero() {
                return bad(flag, &format!("must be more than 0 ({why})"));
            }
        }
        if !crate::source::slot::valid_slot_name(&self.slot) {
            return bad(
                "--slot",
                &format!(
                    "{:?} is not a replication slot name (lower-case letters, digits and underscores, at most 63)",
                    self.slot
                ),
            );
        }
        if self.publication.is_empty() || self.publication.len() > 63 {
            return bad("--publication", "must be 1 to 63 bytes");
        }
        if self.fence == FenceMode::Hook && self.before.is_none() && !self.dry_run {
            return Err(CutoverError::HookModeWithoutBefore);
        }
        if self.dry_run && self.resume_after_switch {
            return bad("--resume-after-switch", "cannot be combined with --dry-run");
        }
        if self.unfence_after_failed_switch && (self.dry_run || self.resume_after_switch) {
            return bad(
                "--unfence-after-failed-switch",
                "cannot be combined with --dry-run or --resume-after-switch (traffic either reached the target or it did not)",
            );
        }
        if let Some(p) = &self.pooler {
            if p.database.is_empty() {
                return bad("--pooler-database", "must not be empty");
            }
            if p.databases_file.as_os_str().is_empty() {
                return bad(
                    "--pooler-databases-file",
                    "is required with --pooler (the file holding the [databases] entry the switch rewrites)",
                );
            }
        }
        Ok(())
    }

    pub(super) fn say(&self, line: &str) {
        if let Some(s) = &self.say {
            s(line);
        }
    }
}

impl std::fmt::Debug for CutoverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CutoverConfig")
            .field("source", &self.source)
            .field("target", &self.target)
            .field("buffer_dir", &self.buffer_dir)
            .field("fence", &self.fence)
            .field("dry_run", &self.dry_run)
            .finish_non_exhaustive()
    }
}
