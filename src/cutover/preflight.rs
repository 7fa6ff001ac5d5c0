//! Preflight: everything cutover checks and waits for before the fence, touching nothing — the
//! postpone file; the buffer belongs to this source and its slot exists; the role may fence;
//! the mapping is safe to evaluate for verify; the clone is finished; large objects and leaf
//! partitions did not change behind the stream; the target is the buffer's copy; then the
//! wait until the lag is under `max_lag` and no prepared transaction of the source database
//! is pending.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::fence::{self, FenceMode, FenceState};
use super::lag::LagMeter;
use super::report::Timeline;
use super::{Ctx, CutoverConfig, CutoverError, CutoverReport, POSTPONE_FILE, VerifyMode, verify};
use crate::SqlContext;
use crate::apply::progress;
use crate::apply::replay::ReplayError;
use crate::buffer::BufferMeta;
use crate::identity::{BufferMismatch, check_buffer_source};
use crate::lsn::Lsn;

/// While `<buffer>/postpone-cutover` exists, waits (the timeline's `postpone` phase).
pub(super) async fn postpone(
    config: &CutoverConfig,
    interrupted: &AtomicBool,
    report: &mut CutoverReport,
    tl: &mut Timeline,
) -> Result<(), CutoverError> {
    if config.buffer_dir.join(POSTPONE_FILE).exists() {
        tl.begin("postpone");
        wait_postponed(config, interrupted).await?;
        tl.end(report, "waited for the postpone file to go");
    }
    Ok(())
}

/// Waits while `<buffer>/postpone-cutover` exists, saying so every few seconds.
async fn wait_postponed(
    config: &CutoverConfig,
    interrupted: &AtomicBool,
) -> Result<bool, CutoverError> {
    let path = config.buffer_dir.join(POSTPONE_FILE);
    let mut waited = false;
    let mut last_said: Option<Instant> = None;
    while path.exists() {
        if interrupted.load(Ordering::Relaxed) {
            return Err(CutoverError::Interrupted);
        }
        if last_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            config.say(&format!(
                "cutover postponed: {} exists; waiting (remove it to proceed)",
                path.display()
            ));
            last_said = Some(Instant::now());
        }
        waited = true;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(waited)
}

/// What preflight's checks leave for the phases after them.
pub(super) struct Checked {
    /// [`crate::apply::progress::buffer_id`] of the buffer.
    pub(super) buffer_id: String,
    /// cutover's session on the source, and its backend pid (spared by the fence).
    pub(super) src: Client,
    pub(super) own_pid: i32,
    pub(super) tgt: Client,
    /// The fence a previous cutover left up (`cutover-fence.json`), if any.
    pub(super) leftover: Option<FenceState>,
    /// PgBouncer, checked (`--pooler`).
    pub(super) pooler: Option<super::pooler::Pooler>,
}

/// The checks, in order; the first that fails refuses the cutover with nothing touched.
/// Findings that do not refuse (a fence left by a previous run, large objects changed, …) are
/// warnings in the report.
pub(super) async fn check(
    config: &CutoverConfig,
    report: &mut CutoverReport,
) -> Result<Checked, CutoverError> {
    let dir = &config.buffer_dir;
    let meta = BufferMeta::read(dir)?.ok_or_else(|| CutoverError::NotABuffer(dir.clone()))?;
    let mismatch = |m: BufferMismatch| match m {
        BufferMismatch::Slot { buffer, named } => CutoverError::SlotMismatch {
            dir: dir.clone(),
            buffer_slot: buffer,
            slot: named,
        },
        BufferMismatch::System { buffer, source } => CutoverError::WrongSource {
            dir: dir.clone(),
            expected: buffer,
            found: source,
        },
    };
    check_buffer_source(&meta, &config.slot, None).map_err(mismatch)?;
    // A pool a cutover of this buffer left paused (it died before its switch): clients are
    // held until it is resumed, so that comes first.
    // Its read-only fence goes first (what the dead cutover's abort would have done), or the
    // resumed clients would find the source read-only.
    if !config.dry_run
        && let Some(paused) = super::pooler::PauseState::read(dir)?
    {
        if config.pooler.is_some()
            && let Some(f) = FenceState::read_leftover(dir)?
            && f.cutover_id == paused.cutover_id
        {
            let c = config.source.connect().await?;
            fence::lift(&c, dir, &f).await?;
            let w = format!(
                "cutover {} died with the source fenced; the fence was lifted to its recorded setting ({:?}) before its paused pool was resumed",
                f.cutover_id, f.previous
            );
            config.say(&w);
            report.warnings.push(w);
        }
        if let Some(w) = super::pooler::leftover(config.pooler.as_ref(), dir).await? {
            config.say(&w);
            report.warnings.push(w);
        }
    }
    let buffer_id = progress::buffer_id(meta.system_identifier, &meta.slot);
    let src = config.source.connect().await?;
    let own_pid = prepare_session(&src).await?;
    match src
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
    {
        Ok(r) => {
            let found: u64 = r.get::<_, String>(0).parse().unwrap_or(0);
            check_buffer_source(&meta, &config.slot, Some(found)).map_err(mismatch)?;
        }
        Err(e) => report.warnings.push(format!(
            "could not check the source's system identifier: {e}"
        )),
    }
    let slot_exists = crate::source::slot::exists(&src, &config.slot)
        .await
        .sql_context("looking up the slot")?;
    if !slot_exists {
        return Err(CutoverError::SlotMissing {
            slot: config.slot.clone(),
        });
    }
    if config.fence == FenceMode::ReadOnly && !config.dry_run {
        fence::check_privileges(&src).await?;
    }
    // Verify evaluates the mapping on the live source: refuse a volatile function now, with
    // nothing fenced, rather than inside the window.
    if let Some(mapping) = &config.transform
        && config.verify != VerifyMode::None
    {
        let tables: Vec<crate::transform::TableName> =
            verify::published_tables(&src, &config.publication)
                .await
                .sql_context("listing the published tables")?
                .into_iter()
                .map(|(s, t, _)| crate::transform::TableName::new(s, t))
                .collect();
        crate::verify::refuse_volatile(
            &src,
            mapping,
            &tables,
            config.verify == VerifyMode::Checksum,
        )
        .await
        .map_err(|e| CutoverError::Verify(verify::CheckError::Mapped(e)))?;
    }
    let leftover = FenceState::read_leftover(dir)?;
    if let Some(l) = &leftover {
        report.warnings.push(format!(
            "cutover {} left the source fenced ({} exists); its recorded previous setting ({:?}) is what unfencing restores",
            l.cutover_id,
            fence::STATE_FILE,
            l.previous
        ));
    }
    // A clone still being copied (by `walshift run` or `capture --clone-to`) is not a target
    // to replay into yet.
    match crate::clone::clone_state(&config.target).await {
        Ok(Some(state)) if state.status != crate::clone::CloneStatus::Done => {
            return Err(CutoverError::CloneUnfinished);
        }
        Ok(_) => {}
        Err(e) => report
            .warnings
            .push(format!("could not read the target's clone state: {e}")),
    }
    // Logical decoding does not carry large objects; the clone copied them and recorded a
    // fingerprint. A moved fingerprint means the copy's large objects are stale.
    match crate::clone::check_large_objects(&config.source, &config.target).await {
        Ok(c) if !c.unchanged() => report.warnings.push(format!(
            "LARGE OBJECTS CHANGED on the source since the clone (recorded: {}, now: {} large objects{}): \
             logical decoding does not carry them, so the copy's are stale. Copy them again before \
             switching the application over",
            c.at_clone.as_ref().map_or("none".to_string(), |f| f.count.to_string()),
            c.now.count,
            if c.now.data_md5.is_none() { "; content not checked: the role cannot read pg_largeobject" } else { "" }
        )),
        Ok(_) => {}
        Err(e) => report
            .warnings
            .push(format!("could not check the source's large objects: {e}")),
    }
    check_partitions(&src, dir, &mut report.warnings).await?;
    let tgt = config.target.connect().await?;
    prepare_session(&tgt).await?;
    let origin = crate::identity::TargetOrigin::ClonedByWalshift;
    crate::identity::check_replay_target(
        &tgt,
        &config.target.redacted(),
        &meta,
        origin,
        "cut over to",
    )
    .await
    .map_err(|e| CutoverError::Replay(e.into()))?;
    progress::ensure_progress_table(&tgt)
        .await
        .map_err(|e| CutoverError::Replay(ReplayError::Sql(e)))?;
    let pooler = match &config.pooler {
        Some(p) => {
            let checked =
                super::pooler::check(p, &config.source, &config.target, &mut report.warnings)
                    .await?;
            report.pooler = Some(checked.report());
            Some(checked)
        }
        None => None,
    };
    Ok(Checked {
        buffer_id,
        src,
        own_pid,
        tgt,
        leftover,
        pooler,
    })
}

/// With a `publish_via_partition_root` publication (a partition record in the buffer):
/// refuses when a leaf partition was truncated, rewritten, detached or dropped on its own since
/// capture last accepted it (see [`crate::capture::partitions`]); warns about leaves attached
/// after the clone.
async fn check_partitions(
    src: &tokio_postgres::Client,
    dir: &std::path::Path,
    warnings: &mut Vec<String>,
) -> Result<(), CutoverError> {
    use crate::capture::partitions::{self, PartitionRecord, Verdict};
    let record = match PartitionRecord::read(dir) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            warnings.push(format!("could not read the partition record: {e}"));
            return Ok(());
        }
    };
    let seen = partitions::observe(src, &record)
        .await
        .sql_context("comparing the leaf partitions with capture's record")?;
    let changed: Vec<_> = seen
        .differences
        .into_iter()
        .filter(|d| {
            partitions::judge(d, seen.lsn, &record.truncates, crate::lsn::Lsn(u64::MAX))
                != Verdict::Explained
        })
        .collect();
    if !changed.is_empty() {
        return Err(CutoverError::PartitionChanged(changed));
    }
    let later: Vec<String> = record
        .leaves
        .iter()
        .filter(|l| l.attached_later)
        .chain(&seen.new_leaves)
        .map(|l| l.name.clone())
        .collect();
    if !later.is_empty() {
        warnings.push(format!(
            "partition(s) {} were attached after the clone: rows they held before ATTACH PARTITION \
             never passed through the stream; compare their partitioned tables with walshift verify",
            later.join(", ")
        ));
    }
    Ok(())
}

pub(super) async fn prepare_session(client: &Client) -> Result<i32, CutoverError> {
    client
        .batch_execute(&format!(
            "SET default_transaction_read_only = off; SET synchronous_commit = on; \
             SET application_name = 'walshift cutover'; {}",
            verify::SESSION_SETTINGS
        ))
        .await
        .sql_context("preparing a session")?;
    Ok(client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .sql_context("preparing a session")?
        .get(0))
}

/// The source database's prepared transactions, described (gid, owner, age).
pub(super) async fn prepared_xacts(src: &Client) -> Result<Vec<String>, CutoverError> {
    Ok(src
        .query(
            "SELECT format('%L (owner %s, prepared %s ago)', gid, owner, \
                    date_trunc('second', now() - prepared)) \
             FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared",
            &[],
        )
        .await
        .sql_context("listing the source's prepared transactions")?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Preflight: waits up to `max_prepared_wait` for the source's prepared transactions to end.
pub(super) async fn wait_prepared(ctx: &Ctx<'_>) -> Result<(), CutoverError> {
    if ctx.config.dry_run {
        return Ok(());
    }
    let started = Instant::now();
    let mut said = false;
    loop {
        let pending = prepared_xacts(&ctx.src).await?;
        if pending.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= ctx.config.max_prepared_wait {
            return Err(CutoverError::PreparedTransactions {
                when: format!(
                    "preflight (waited {:?}); nothing was fenced",
                    ctx.config.max_prepared_wait
                ),
                list: pending.join(", "),
            });
        }
        if ctx.interrupted.load(Ordering::Relaxed) {
            return Err(CutoverError::Interrupted);
        }
        if !said {
            ctx.config.say(&format!(
                "cutover waiting up to {:?} for prepared transactions on the source: {}",
                ctx.config.max_prepared_wait,
                pending.join(", ")
            ));
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Preflight's wait: lag under `max_lag` and no postpone file.
pub(super) async fn wait_for_lag(ctx: &mut Ctx<'_>) -> Result<(), CutoverError> {
    let config = ctx.config;
    let started = Instant::now();
    let mut last_said = Instant::now();
    let mut said_postpone: Option<Instant> = None;
    let mut meter = LagMeter::new(&config.buffer_dir);
    loop {
        ctx.helpers.check().await?;
        if ctx.interrupted.load(Ordering::Relaxed) {
            return Err(CutoverError::Interrupted);
        }
        let applied = crate::apply::progress::read_applied(&ctx.tgt, &ctx.buffer_id)
            .await?
            .unwrap_or(Lsn::ZERO);
        let lag = meter.measure(&ctx.src, &config.slot, applied).await?;
        let postponed = config.buffer_dir.join(POSTPONE_FILE).exists();
        if postponed {
            if said_postpone.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                config.say(&format!(
                    "cutover postponed: {} exists; waiting (remove it to proceed)",
                    config.buffer_dir.join(POSTPONE_FILE).display()
                ));
                said_postpone = Some(Instant::now());
            }
        } else if lag.streaming && lag.settled && lag.secs <= config.max_lag.as_secs_f64() {
            ctx.tl.end(
                &mut ctx.report,
                format!(
                    "lag {:.2} s (capture {} bytes, replay {} bytes)",
                    lag.secs, lag.capture_bytes, lag.replay_bytes
                ),
            );
            return Ok(());
        }
        if let Some(limit) = config.preflight_timeout
            && started.elapsed() > limit
        {
            return Err(CutoverError::LagTimeout {
                lag_secs: lag.secs,
                max: config.max_lag,
                waited: started.elapsed(),
                unconfirmed_bytes: lag.capture_bytes,
                reply_age: lag
                    .reply_age_secs
                    .map(|a| format!("{a:.1} s ago"))
                    .unwrap_or_else(|| "never (no walsender serves the slot)".into()),
            });
        }
        if !postponed && !lag.streaming && last_said.elapsed() >= Duration::from_secs(2) {
            config.say(&format!(
                "cutover waiting for capture to stream from slot {:?} (it is not active yet)",
                config.slot
            ));
            last_said = Instant::now();
        } else if !postponed && last_said.elapsed() >= Duration::from_secs(2) {
            config.say(&format!(
                "cutover waiting for replay to catch up: lag {:.1} s (capture {} bytes, replay {} bytes), need ≤ {:?}",
                lag.secs, lag.capture_bytes, lag.replay_bytes, config.max_lag
            ));
            last_said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
