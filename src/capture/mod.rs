//! Capture: stream the slot's pgoutput messages into the durable buffer.
//!
//! One loop reads XLogData from the replication connection and appends each pgoutput message,
//! unchanged, to the [`crate::buffer`]; the slot is confirmed only up to what the buffer has
//! fsynced ([`stream`] keeps that contract).
//!
//! **One slot, one buffer.** A confirmed position is recorded in the buffer
//! ([`SlotProgress`], fsynced) before it is sent, and every start compares the slot's
//! `confirmed_flush_lsn` with what the buffer holds: a slot confirmed past the buffer (consumed
//! by another buffer, dropped and re-created, or the buffer restored from an older copy or cut
//! short) is refused, as is a new buffer on a slot that already exists (unless
//! [`CaptureConfig::adopt_slot`]). A stream silent for longer than the stream timeout is an
//! error, never a quiet "streaming, lag 0".
//!
//! **Reconnecting** ([`CaptureConfig::reconnect`]). Once streaming has started, a source that
//! restarts, fails over or drops the connection ([`CaptureError::is_transient`]) is not the
//! end: the buffer is flushed and closed, and after a backoff capture starts again exactly as
//! a new `walshift capture` on the same buffer does — recovery cuts the transaction the stream
//! broke off in, the slot and the source are checked again, and streaming resumes from the
//! buffer's durable end; the slot resends from its confirmed position (never past the
//! buffer's end), and what the buffer already holds is dropped by commit LSN. A failure that
//! waiting cannot fix (slot gone, another source, the buffer) stops capture at once.
//!
//! - `mod.rs`: [`CaptureConfig`], [`prepare`] (preflight, publication, slot), [`check_slot`],
//!   [`run`] (buffer, clone, then the stream; again after a lost connection).
//! - `error`: [`CaptureError`].
//! - `claims`: the files that tie a buffer directory to the slot and the clones it started.
//! - `stream`: the stream state loop (receive → append → flush → acknowledge); its per-message
//!   [`StreamState`] is public for the receive → append benchmark.
//! - `partition_watch`: capture's side of [`partitions`] while streaming.
//! - [`partitions`]: what a `publish_via_partition_root` stream cannot carry (cutover reads it too).
//! - `progress`: the progress line.

mod claims;
mod error;
mod partition_watch;
pub mod partitions;
mod progress;
mod stream;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::buffer::{BufferConfig, BufferMeta, BufferWriter, SlotProgress};
use crate::clone::{self, CloneOptions, CloneStatus};
use crate::conn::ConnInfo;
use crate::conn::reconnect::{self, Reconnect, Reconnector};
use crate::error::SqlContext;
use crate::identity;
use crate::lsn::Lsn;
use crate::source::preflight::{self, TableRef};
use crate::source::replication::{
    ReplicationConnection, SlotOptions, SnapshotAction, publication_names,
};
use crate::source::slot::{self, SlotRow};

pub use claims::{CLAIM_FILE, CLONES_FILE};
use claims::{SlotClaim, own_unfinished_clone, read_clone_attempts, record_clone_attempt};
pub use error::CaptureError;
use partition_watch::partition_watch;
pub use stream::StreamState;
use stream::{Resume, record_progress, stream_into};

/// What to capture and how. Every field documents its default and trade-off.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// The live database. Needs a role with REPLICATION (or superuser).
    pub source: ConnInfo,
    /// Buffer directory; created if missing.
    pub buffer_dir: PathBuf,
    /// Replication slot name. Default `walshift`. The slot retains WAL on the source until
    /// walshift confirms it: drop it (`SELECT pg_drop_replication_slot('walshift')`) when the
    /// release is done, or the source keeps WAL forever.
    pub slot: String,
    /// Publication name. Default `walshift`; created `FOR ALL TABLES` (or `tables`) if missing.
    pub publication: String,
    /// Tables to publish when the publication is created. Default: all user tables.
    pub tables: Option<Vec<String>>,
    /// Stop once everything up to this LSN is durable. Default: run until interrupted.
    pub until_lsn: Option<Lsn>,
    /// Longest time a received change waits before its group is handed to fsync. Default
    /// 20 ms. Shorter lowers the lag replay and cutover see; longer makes fewer, larger fsyncs.
    pub flush_interval: Duration,
    /// After a read that brought only a few messages, wait this long before reading again so
    /// the socket fills. Default 200 µs. Saves CPU under load (fewer, larger reads), at the
    /// cost of up to this much added latency per message. Zero disables it. The thread
    /// sleeps (other tasks on it wait too), so keep it well under a millisecond. Keep it
    /// short of the time the server takes to fill the socket: a Unix socket holds only
    /// ~20 KB of pgoutput's small messages (each costs a kernel buffer of its own), and a
    /// full socket stalls the walsender until the next read — a 1 ms pause capped capture
    /// at ~110k changes/s over a Unix socket.
    pub read_coalesce: Duration,
    /// How often a standby status update is sent even when nothing changed. Default 10 s; must
    /// stay well under the server's `wal_sender_timeout` (60 s by default).
    pub status_interval: Duration,
    /// Buffer settings (segment size, recovery mode).
    pub buffer: BufferConfig,
    /// Clone the source into a target at the new slot's exported snapshot before streaming.
    /// Default: none. Only possible when the slot is created by this run; an interrupted
    /// clone is detected on the next start (slot dropped, cloned again from a new snapshot).
    pub clone: Option<CloneOptions>,
    /// Print a progress line to stderr once a second. Default false (the CLI turns it on).
    pub progress: bool,
    /// With a `publish_via_partition_root` publication: how often the leaf partitions'
    /// relfilenodes are compared with the record (see [`partitions`]). Default 5 s.
    pub partition_check_interval: Duration,
    /// Leaf partitions (`schema.table`) whose current relfilenode is accepted at start, after
    /// the operator dealt with a change capture stopped on. Default none.
    pub accept_partition_rewrite: Vec<String>,
    /// Start a new buffer from a slot that already exists. Default false: a slot that exists
    /// belongs to the buffer that created it, and a second buffer on it would take
    /// transactions the first never gets (and would itself miss everything the slot confirmed
    /// before). Only for a slot whose earlier buffer is abandoned, or one just created for
    /// this buffer by [`prepare`]; the new buffer starts at the slot's confirmed position.
    pub adopt_slot: bool,
    /// Longest silence (no XLogData, no keepalive) before the stream counts as stalled and
    /// capture fails. `None` (default): the server's `wal_sender_timeout`, at least 10 s (60 s
    /// when the server's is 0). Capture asks the server for a keepalive with every status
    /// update, so a live stream is never silent for longer than `status_interval`. Zero
    /// disables the check.
    pub stream_timeout: Option<Duration>,
    /// Reconnecting after the source restarts, fails over or drops the connection, once
    /// streaming has started (a source unreachable at the start is an error at once). Default
    /// [`Reconnect::never`] (the `capture` command's default is
    /// [`reconnect::DEFAULT_ATTEMPTS`] attempts): embedding callers that must not wait, like
    /// cutover's window, keep failing fast. See the module docs for what a reconnect does.
    pub reconnect: Reconnect,
}

/// [`CaptureConfig::flush_interval`]'s default.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// [`CaptureConfig::read_coalesce`]'s default.
pub const DEFAULT_READ_COALESCE: Duration = Duration::from_micros(200);
/// [`CaptureConfig::status_interval`]'s default.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// [`CaptureConfig::partition_check_interval`]'s default.
pub const DEFAULT_PARTITION_CHECK_INTERVAL: Duration = Duration::from_secs(5);

impl CaptureConfig {
    /// Defaults for everything but the source and the buffer directory.
    pub fn new(source: ConnInfo, buffer_dir: impl Into<PathBuf>) -> Self {
        CaptureConfig {
            source,
            buffer_dir: buffer_dir.into(),
            slot: slot::DEFAULT_SLOT.into(),
            publication: slot::DEFAULT_PUBLICATION.into(),
            tables: None,
            until_lsn: None,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            read_coalesce: DEFAULT_READ_COALESCE,
            status_interval: DEFAULT_STATUS_INTERVAL,
            buffer: BufferConfig::default(),
            clone: None,
            progress: false,
            partition_check_interval: DEFAULT_PARTITION_CHECK_INTERVAL,
            accept_partition_rewrite: Vec::new(),
            adopt_slot: false,
            stream_timeout: None,
            reconnect: Reconnect::never(),
        }
    }
}

/// What a capture run did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaptureReport {
    /// Where streaming started (the buffer's durable end, or the new slot's consistent point).
    pub start_lsn: Lsn,
    /// Everything up to here is fsynced in the buffer and confirmed to the slot.
    pub durable_lsn: Lsn,
    /// Transactions appended in this run.
    pub transactions: u64,
    /// Row changes (insert/update/delete) appended in this run.
    pub changes: u64,
    /// pgoutput bytes received in this run.
    pub bytes: u64,
    /// Wall time of the streaming phase (summed over reconnects; the outages not counted).
    #[serde(with = "secs")]
    pub elapsed: Duration,
    /// Socket reads that brought data during streaming, and the bytes they brought (wire
    /// framing included): bytes per read shows how well reads coalesce.
    pub socket_reads: u64,
    pub socket_read_bytes: u64,
    /// fdatasync and directory fsync calls the buffer made during streaming.
    pub fsyncs: u64,
    /// Whether this run created the slot.
    pub slot_created: bool,
    /// Published tables.
    pub tables: Vec<String>,
    /// Preflight warnings: what logical decoding does not carry (large objects, unlogged
    /// tables, sequences).
    pub warnings: Vec<String>,
    /// Times the stream was lost and got back ([`CaptureConfig::reconnect`]).
    pub reconnects: u32,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// The source after [`prepare`]: publication and slot exist, the replication connection is idle.
pub struct PreparedSource {
    /// Published tables.
    pub tables: Vec<TableRef>,
    /// What the source holds that logical decoding does not carry (see
    /// [`preflight::source_warnings`]); already logged as warnings.
    pub warnings: Vec<String>,
    /// Source system identifier.
    pub system_id: u64,
    /// Source database name.
    pub database: String,
    /// Replication connection, idle. If `snapshot` is set, it stays importable only until this
    /// connection runs its next command.
    pub conn: ReplicationConnection,
    /// Exported snapshot name when the slot was created now.
    pub snapshot: Option<String>,
    /// Consistent point of a slot created now.
    pub consistent_point: Option<Lsn>,
    /// The published partitioned tables when the publication publishes via the root.
    pub via_root: Vec<partitions::Root>,
    /// Where the slot stood when this buffer took it: the consistent point of a slot
    /// created now, or the confirmed position of an adopted one. `None` for a slot the buffer
    /// already owns.
    pub slot_start: Option<Lsn>,
    /// The server's `wal_sender_timeout` (`None` when 0, that is disabled).
    pub wal_sender_timeout: Option<Duration>,
}

/// Preflight, publication and slot: everything before streaming. `existing` is the buffer's
/// metadata and the position it covers (its durable end, or the recorded confirmed position if
/// higher) when it already belongs to a source: the source is identified and compared *before*
/// anything is created on it; a missing slot is then an error, never silently recreated, and
/// so is a slot confirmed past that position (the changes in between would be lost). Without
/// `existing`, an existing slot is refused unless `config.adopt_slot` (or `config.clone` is
/// set, which then fails with [`CaptureError::CloneNeedsNewSlot`]).
pub async fn prepare(
    config: &CaptureConfig,
    existing: Option<(&BufferMeta, Lsn)>,
) -> Result<PreparedSource, CaptureError> {
    check_slot_name(config)?;
    prepare_inner(config, existing, false).await
}

fn check_slot_name(config: &CaptureConfig) -> Result<(), CaptureError> {
    if slot::valid_slot_name(&config.slot) {
        Ok(())
    } else {
        Err(CaptureError::InvalidSlotName {
            slot: config.slot.clone(),
        })
    }
}

/// [`prepare`]; with `claim`, a new buffer directory is claimed ([`CLAIM_FILE`]) just before
/// the slot is created, and a claim left by an interrupted start is honoured.
async fn prepare_inner(
    config: &CaptureConfig,
    existing: Option<(&BufferMeta, Lsn)>,
    claim: bool,
) -> Result<PreparedSource, CaptureError> {
    let client = config.source.connect().await?;
    let server = preflight::check_server(&client).await?;
    let mut conn = ReplicationConnection::connect(&config.source).await?;
    let system = conn.identify_system().await?;
    if let Some((meta, _)) = existing
        && identity::check_buffer_source(meta, &config.slot, Some(system.system_id)).is_err()
    {
        return Err(CaptureError::ForeignBuffer {
            dir: config.buffer_dir.clone(),
            buffer_system: meta.system_identifier,
            buffer_slot: meta.slot.clone(),
            source_system: system.system_id,
            slot: config.slot.clone(),
        });
    }
    let tables =
        preflight::ensure_publication(&client, &config.publication, config.tables.as_deref())
            .await?;
    let mut warnings = preflight::source_warnings(&client).await?;
    let via_root = partitions::via_root_roots(&client, &config.publication, &tables)
        .await
        .sql_context("looking for partitioned tables published via their root")?;
    if !via_root.is_empty() {
        warnings.push(format!(
            "publication {:?} has publish_via_partition_root = true: changes to {} arrive \
             addressed to the partitioned table and are applied to it on the copy (its own \
             partitioning routes them). A TRUNCATE of a single partition, VACUUM FULL/CLUSTER of a \
             partition, DETACH or DROP of a partition are not carried in this mode: capture \
             compares every partition's relfilenode with the one recorded at the snapshot every \
             few seconds and stops naming the partition, and cutover refuses",
            config.publication,
            via_root
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }

    let wal_sender_timeout = wal_sender_timeout(&client).await?;
    // A buffer that names the slot but never took a position from it: a start interrupted
    // around the slot's creation, or an empty buffer from before slot_start_lsn existed.
    let claim_path = config.buffer_dir.join(CLAIM_FILE);
    let claimed_only = match existing {
        Some((m, covered)) => m.slot_start_lsn.is_none() && covered.is_zero(),
        None => {
            claim
                && std::fs::read(&claim_path)
                    .ok()
                    .and_then(|d| serde_json::from_slice::<SlotClaim>(&d).ok())
                    .is_some_and(|c| {
                        c.slot == config.slot && c.system_identifier == system.system_id.to_string()
                    })
        }
    };
    let mut found = existing_slot(&client, config).await?;
    if found.is_some() && existing.is_none() && claimed_only && config.clone.is_some() {
        // Created by an interrupted start of this buffer, before any clone began (buffer.json
        // is written first): its snapshot died with that start, so a clone needs a new slot.
        tracing::warn!(slot = %config.slot, "dropping the slot an interrupted start of this buffer created, to clone from a new one");
        drop_slot_if_exists(config).await?;
        found = None;
    }
    let (snapshot, consistent_point, slot_start) = match found {
        Some(found) => {
            let confirmed = found.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
            if found.plugin != "pgoutput" || found.database != server.database {
                return Err(CaptureError::SlotMismatch {
                    slot: config.slot.clone(),
                    plugin: found.plugin,
                    database: found.database,
                    expected_db: server.database,
                });
            }
            match existing {
                Some(_) if claimed_only => {
                    tracing::warn!(slot = %config.slot, confirmed = %confirmed, "taking over the slot an interrupted start of this buffer created");
                    (None, None, Some(confirmed))
                }
                Some((_, covered)) if confirmed > covered => {
                    return Err(CaptureError::SlotAhead {
                        slot: config.slot.clone(),
                        dir: config.buffer_dir.clone(),
                        slot_confirmed: confirmed,
                        buffer_end: covered,
                    });
                }
                Some(_) => (None, None, None),
                None if config.adopt_slot || claimed_only => {
                    tracing::warn!(slot = %config.slot, confirmed = %confirmed, "adopting an existing slot: this buffer starts at its confirmed position");
                    (None, None, Some(confirmed))
                }
                None if config.clone.is_some() => (None, None, None),
                None => {
                    return Err(CaptureError::SlotNotOwned {
                        slot: config.slot.clone(),
                        dir: config.buffer_dir.clone(),
                        confirmed,
                    });
                }
            }
        }
        None => {
            if let Some((_, durable)) = existing
                && !claimed_only
            {
                return Err(CaptureError::SlotLost {
                    slot: config.slot.clone(),
                    dir: config.buffer_dir.clone(),
                    durable,
                });
            }
            if claim && existing.is_none() {
                let data = serde_json::to_vec(&SlotClaim {
                    system_identifier: system.system_id.to_string(),
                    slot: config.slot.clone(),
                })
                .expect("serializable");
                crate::buffer::fs::FileSystem::write_atomic(
                    config.buffer.fs.as_ref(),
                    &claim_path,
                    &data,
                )
                .map_err(|e| crate::Error::io(&claim_path, e))?;
            }
            let created = conn
                .create_logical_slot(
                    &config.slot,
                    SlotOptions {
                        temporary: false,
                        snapshot: SnapshotAction::Export,
                    },
                )
                .await?;
            tracing::info!(slot = %config.slot, consistent_point = %created.consistent_point, "created replication slot");
            (
                created.snapshot_name,
                Some(created.consistent_point),
                Some(created.consistent_point),
            )
        }
    };
    Ok(PreparedSource {
        tables,
        warnings,
        system_id: system.system_id,
        database: server.database,
        conn,
        snapshot,
        consistent_point,
        via_root,
        slot_start,
        wal_sender_timeout,
    })
}

/// Checks a buffer against its slot on the source without streaming: errors with
/// [`CaptureError::SlotAhead`] when the slot was confirmed past what the buffer covers (its
/// last commit `buffer_end`, or the confirmed position it recorded while it still holds what
/// it recorded as durable), and [`CaptureError::SlotLost`] when the slot is gone. Returns the
/// slot's confirmed position.
pub async fn check_slot(
    source: &ConnInfo,
    meta: &BufferMeta,
    dir: &std::path::Path,
    buffer_end: Lsn,
) -> Result<Lsn, CaptureError> {
    let client = source.connect().await?;
    let row = slot::read(&client, &meta.slot)
        .await
        .sql_context("looking up the replication slot")?;
    let Some(row) = row else {
        return Err(CaptureError::SlotLost {
            slot: meta.slot.clone(),
            dir: dir.to_path_buf(),
            durable: buffer_end,
        });
    };
    let confirmed = row.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
    let covered = match SlotProgress::read(dir)? {
        Some(p) if p.durable_lsn <= buffer_end => buffer_end.max(p.confirmed_lsn),
        _ => buffer_end,
    }
    .max(meta.slot_start_lsn.unwrap_or(Lsn::ZERO));
    if confirmed > covered {
        return Err(CaptureError::SlotAhead {
            slot: meta.slot.clone(),
            dir: dir.to_path_buf(),
            slot_confirmed: confirmed,
            buffer_end: covered,
        });
    }
    Ok(confirmed)
}

/// The slot named in `config`, if it exists and is not in use. A slot in use by a walsender is given a moment
/// to be released (a capture that just stopped), then refused.
async fn existing_slot(
    client: &tokio_postgres::Client,
    config: &CaptureConfig,
) -> Result<Option<SlotRow>, CaptureError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let Some(row) = slot::read(client, &config.slot)
            .await
            .sql_context("looking up the replication slot")?
        else {
            return Ok(None);
        };
        if let Some(pid) = row.active_pid {
            if Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            return Err(CaptureError::SlotInUse {
                slot: config.slot.clone(),
                pid,
            });
        }
        return Ok(Some(row));
    }
}

async fn wal_sender_timeout(
    client: &tokio_postgres::Client,
) -> Result<Option<Duration>, CaptureError> {
    let ms: Option<String> = client
        .query_one(
            "SELECT setting FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await
        .sql_context("reading wal_sender_timeout")?
        .get(0);
    Ok(ms
        .and_then(|m| m.parse::<u64>().ok())
        .filter(|&m| m > 0)
        .map(Duration::from_millis))
}

/// Opens (and recovers) the buffer, checks it belongs to this source, prepares the source and
/// streams until `until_lsn` is durable, `shutdown` resolves, or an error occurs. On a clean
/// stop everything received is flushed and confirmed before returning. After a lost stream it
/// starts again as [`CaptureConfig::reconnect`] says (see the module docs).
pub async fn run(
    config: CaptureConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<CaptureReport, CaptureError> {
    check_slot_name(&config)?;
    tokio::pin!(shutdown);
    let mut reconnector = Reconnector::new(
        config.reconnect,
        "capture",
        "the source",
        "lost the replication stream",
    );
    let mut totals: Option<CaptureReport> = None;
    let mut attempt_config = config.clone();
    loop {
        let mut streaming_since = None;
        let outcome = run_once(
            &attempt_config,
            shutdown.as_mut(),
            &mut totals,
            &mut streaming_since,
            reconnector.reconnecting(),
        )
        .await;
        let error = match outcome {
            Ok(()) => break,
            Err(e) => e,
        };
        let again = reconnector
            .wait_to_retry(
                totals.is_some(),
                streaming_since,
                error,
                CaptureError::is_transient,
                |attempts, over, last| CaptureError::GaveUp {
                    attempts,
                    over,
                    last: Box::new(last),
                },
                shutdown.as_mut(),
            )
            .await?;
        if !again {
            break;
        }
        // The clone is done (streaming follows it): a reconnect resumes the stream only, as a
        // start on the same buffer without --clone-to does.
        attempt_config.clone = None;
    }
    Ok(totals.expect("the stream ran"))
}

/// One start of capture on the buffer: what a new `walshift capture` does. Adds what it streamed
/// to `totals` (created when streaming first starts); `streaming_since` is set once streaming
/// started; `reconnecting` is when the stream was lost and the attempts made since.
async fn run_once(
    config: &CaptureConfig,
    shutdown: impl std::future::Future<Output = ()>,
    totals: &mut Option<CaptureReport>,
    streaming_since: &mut Option<Instant>,
    reconnecting: Option<(Instant, u32)>,
) -> Result<(), CaptureError> {
    tokio::pin!(shutdown);
    let (writer, recovery) = BufferWriter::open(&config.buffer_dir, config.buffer.clone())?;
    if reconnecting.is_some() && recovery.torn_tail.is_none() {
        // Cutting the transaction the lost stream broke off in is what a reconnect expects.
        tracing::info!("buffer recovery: {recovery:?}");
    } else if !recovery.is_clean() {
        tracing::warn!("buffer recovery: {recovery:?}");
    }
    let mut existing = BufferMeta::read(&config.buffer_dir)?;
    let mut target_state = None;
    if let Some(clone) = &config.clone {
        // Before anything is created or dropped on either side, whatever `force` says.
        identity::check_clone_target(&config.source, &clone.target).await?;
        target_state = clone::clone_state(&clone.target).await?;
        let done = target_state
            .as_ref()
            .is_some_and(|s| s.status == CloneStatus::Done);
        if !done && let Some(meta) = &existing {
            // Streaming starts only after a clone is done, so an unfinished clone means the
            // buffer holds nothing yet: start over with a new slot and a new snapshot.
            if !writer.durable_lsn().is_zero() {
                return Err(CaptureError::CloneAfterStreaming {
                    dir: config.buffer_dir.clone(),
                });
            }
            // A buffer from before clones.json: its slot start is its clone's consistent
            // point. Kept there once buffer.json is gone, so the clone stays this buffer's.
            if let Some(start) = meta.slot_start_lsn {
                record_clone_attempt(
                    config,
                    &clone::CloneOrigin {
                        system_identifier: meta.system_identifier,
                        database: meta.database.clone(),
                        slot: meta.slot.clone(),
                        consistent_lsn: start,
                    },
                )?;
            }
            tracing::warn!(slot = %config.slot, "an earlier clone did not finish: dropping its slot and cloning again");
            drop_slot_if_exists(config).await?;
            for path in [
                BufferMeta::path(&config.buffer_dir),
                SlotProgress::path(&config.buffer_dir),
            ] {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(crate::Error::io(path, e).into());
                    }
                    _ => {}
                }
            }
            existing = None;
        }
    }
    // What the buffer covers: its durable end, or the confirmed position it recorded if that
    // is higher, as long as the buffer still holds what it recorded as durable.
    let durable = writer.durable_lsn();
    let progress = match &existing {
        Some(_) => SlotProgress::read(&config.buffer_dir)?,
        None => None,
    };
    let behind = progress
        .as_ref()
        .and_then(|p| p.check_buffer_end(&config.buffer_dir, durable).err());
    let covered = match &progress {
        Some(p) if behind.is_none() => durable.max(p.confirmed_lsn),
        _ => durable,
    }
    .max(
        existing
            .as_ref()
            .and_then(|m| m.slot_start_lsn)
            .unwrap_or(Lsn::ZERO),
    );
    let prepare = prepare_inner(config, existing.as_ref().map(|m| (m, covered)), true);
    let prepared = if reconnecting.is_some() {
        // A stop asked for while the source is still away ends the attempt (nothing to flush).
        tokio::select! {
            r = prepare => r,
            _ = shutdown.as_mut() => return Ok(()),
        }
    } else {
        prepare.await
    };
    let prepared = match prepared {
        Err(CaptureError::SlotAhead { .. }) if behind.is_some() => {
            return Err(behind.expect("checked").into());
        }
        r => r?,
    };
    if let Some(e) = behind {
        // The slot was not confirmed past what is left: the source sends the rest again.
        tracing::warn!(
            "{e} — but slot {:?} was not confirmed past the buffer's end, so the source still holds those transactions: resuming",
            config.slot
        );
    }
    let took_slot = prepared.slot_start.is_some()
        && existing.as_ref().is_none_or(|m| m.slot_start_lsn.is_none());
    if existing.is_none() || took_slot {
        let mut meta = BufferMeta::new(
            prepared.system_id,
            &prepared.database,
            &config.slot,
            &config.publication,
        );
        if let Some(start) = prepared.slot_start {
            meta = meta.with_slot_start(start);
            record_progress(config, start, durable)?;
        }
        meta.write(&config.buffer_dir)?;
        match std::fs::remove_file(config.buffer_dir.join(CLAIM_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(crate::Error::io(config.buffer_dir.join(CLAIM_FILE), e).into());
            }
            _ => {}
        }
    }
    let watch = partition_watch(config, &prepared).await?;
    if let Some(clone) = &config.clone {
        match &prepared.snapshot {
            Some(snapshot) => {
                let mut opts = clone.clone();
                // Only this buffer's own interrupted clone is redone without --force.
                opts.force |= own_unfinished_clone(
                    target_state.as_ref(),
                    &read_clone_attempts(&config.buffer_dir)?,
                );
                let origin = clone::CloneOrigin {
                    system_identifier: prepared.system_id,
                    database: prepared.database.clone(),
                    slot: config.slot.clone(),
                    consistent_lsn: prepared.consistent_point.unwrap_or(Lsn::ZERO),
                };
                record_clone_attempt(config, &origin)?;
                opts.origin = Some(origin);
                // The replication connection stays idle meanwhile: the snapshot stays valid.
                let report = clone::clone_database(&opts, snapshot, &prepared.tables).await?;
                tracing::info!(
                    rows = report.rows,
                    tables = report.tables.len(),
                    large_objects = report.large_objects,
                    "clone done"
                );
                if !report.materialized_views.is_empty() {
                    tracing::info!(
                        "materialized views refreshed on the target: {}",
                        report.materialized_views.join(", ")
                    );
                }
                if !report.text_format.is_empty() {
                    tracing::info!(
                        "copied in text format (columns holding catalog OIDs, resolved by name on \
                         the target): {}",
                        report.text_format.join(", ")
                    );
                }
            }
            None if existing.is_some() => {} // cloned earlier; resuming the stream
            None => {
                return Err(CaptureError::CloneNeedsNewSlot {
                    slot: config.slot.clone(),
                });
            }
        }
    }
    let stream_timeout = config.stream_timeout.unwrap_or_else(|| {
        prepared
            .wal_sender_timeout
            .unwrap_or(Duration::from_secs(60))
            .max(Duration::from_secs(10))
    });
    let resume_from = writer
        .durable_lsn()
        .max(prepared.consistent_point.unwrap_or(Lsn::ZERO));
    let stream = prepared
        .conn
        .start_logical_replication(
            &config.slot,
            resume_from,
            &[
                ("proto_version", "1"),
                (
                    "publication_names",
                    &publication_names(&[&config.publication]),
                ),
                ("messages", "true"),
            ],
        )
        .await?;
    *streaming_since = Some(Instant::now());
    let totals = match totals {
        Some(t) => {
            t.reconnects += 1;
            t
        }
        None => totals.insert(CaptureReport {
            start_lsn: resume_from,
            durable_lsn: resume_from,
            transactions: 0,
            changes: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
            socket_reads: 0,
            socket_read_bytes: 0,
            fsyncs: 0,
            slot_created: prepared.consistent_point.is_some(),
            tables: prepared.tables.iter().map(|t| t.to_string()).collect(),
            warnings: prepared.warnings.clone(),
            reconnects: 0,
        }),
    };
    if let Some((lost_at, attempts)) = reconnecting {
        tracing::warn!(
            "capture: reconnected to {} after {attempts} attempt(s), {} after the stream was lost; \
             streaming slot {:?} again from {resume_from}",
            config.source,
            reconnect::human(lost_at.elapsed()),
            config.slot,
        );
    }
    stream_into(
        config,
        stream,
        writer,
        Resume {
            from: resume_from,
            covered: covered.max(prepared.slot_start.unwrap_or(Lsn::ZERO)),
            stream_timeout,
        },
        watch,
        shutdown,
        totals,
    )
    .await
}

async fn drop_slot_if_exists(config: &CaptureConfig) -> Result<(), CaptureError> {
    let client = config.source.connect().await?;
    slot::drop_if_exists(&client, &config.slot)
        .await
        .sql_context("dropping the slot of an unfinished clone")?;
    Ok(())
}
