//! Capture: stream the slot's pgoutput messages into the durable buffer.
//!
//! One loop reads XLogData from the replication connection and appends each pgoutput message,
//! unchanged, to the [`crate::buffer`] (a memory copy; the buffer's sync thread writes and
//! fsyncs groups in the background). Every `flush_interval` the appended group is handed to the
//! sync thread; when a group is on disk the buffer's durable LSN advances, and only then is it
//! reported to the server as the slot's flush position.
//!
//! **Contract (kept in [`StreamState::sendable`]):** the flush position sent to the source
//! never passes what the buffer has fsynced — except that, while no transaction is open and
//! every appended record is durable, the server's own keepalive position may be confirmed (no
//! commit can lie before it unsent), once it is recorded in the buffer's [`SlotProgress`]. So after any crash the slot resends every transaction the
//! buffer does not hold; a transaction the buffer already holds is recognised by its commit
//! LSN and dropped. Each committed transaction is stored exactly once, in commit order.
//!
//! **One slot, one buffer.** A confirmed position is recorded in the buffer
//! ([`SlotProgress`], fsynced) before it is sent, and every start compares the slot's
//! `confirmed_flush_lsn` with what the buffer holds: a slot confirmed past the buffer (consumed
//! by another buffer, dropped and re-created, or the buffer restored from an older copy or cut
//! short) is refused, as is a new buffer on a slot that already exists (unless
//! [`CaptureConfig::adopt_slot`]). A stream silent for longer than the stream timeout is an
//! error, never a quiet "streaming, lag 0".

pub mod partitions;
mod progress;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::buffer::{BufferConfig, BufferError, BufferMeta, BufferWriter, SlotProgress};
use crate::clone::{self, CloneOptions, CloneStatus};
use crate::conn::ConnInfo;
use crate::lsn::Lsn;
use crate::source::preflight::{self, PreflightError, TableRef};
use crate::source::replication::{
    ReplicationConnection, ReplicationError, ReplicationEvent, ReplicationStream, SlotOptions,
    SnapshotAction, StandbyStatus, publication_names,
};

/// Events handled per `select!` round before timers and shutdown are checked again.
const DRAIN_BATCH: usize = 4096;

/// A drain batch smaller than this is followed by a `read_coalesce` pause.
const COALESCE_BELOW: usize = 64;

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
            slot: crate::source::DEFAULT_SLOT.into(),
            publication: crate::source::DEFAULT_PUBLICATION.into(),
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
        }
    }
}

/// Capture failures. Each says what happened and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),

    #[error(
        "{slot:?} is not a replication slot name: use 1–63 lower-case letters, digits and \
         underscores (--slot); nothing was created"
    )]
    InvalidSlotName { slot: String },

    #[error("replication connection to the source failed")]
    Replication(#[from] ReplicationError),

    #[error(transparent)]
    Buffer(#[from] BufferError),

    #[error(transparent)]
    Source(#[from] crate::Error),

    #[error(transparent)]
    Identity(#[from] crate::source::identity::IdentityError),

    #[error(
        "buffer {dir} was captured from another source (system {buffer_system}, slot {buffer_slot:?}); \
         this source is system {source_system}, slot {slot:?}. Use a new --buffer directory for a different source"
    )]
    ForeignBuffer {
        dir: PathBuf,
        buffer_system: u64,
        buffer_slot: String,
        source_system: u64,
        slot: String,
    },

    #[error(
        "slot {slot:?} does not exist on the source, but buffer {dir} was started from it (durable up to {durable}): \
         changes made while the slot was gone are lost to this buffer. Start over: a fresh clone and a new --buffer directory"
    )]
    SlotLost {
        slot: String,
        dir: PathBuf,
        durable: Lsn,
    },

    #[error(
        "slot {slot:?} exists but uses plugin {plugin:?} in database {database:?}; walshift needs a pgoutput slot \
         in {expected_db:?}. Choose another --slot"
    )]
    SlotMismatch {
        slot: String,
        plugin: String,
        database: String,
        expected_db: String,
    },

    #[error(
        "the source ended the replication stream ({reason}); run capture again once the source is back to resume (nothing durable is lost)"
    )]
    StreamEnded { reason: &'static str },

    #[error(
        "the replication stream of slot {slot:?} went silent: nothing (no change, no keepalive) received for {silent:?}, \
         longer than the stream timeout of {timeout:?}; the last position received was {last_lsn}. The walsender is stalled \
         or the network is down (check pg_stat_replication on the source). Everything durable up to {durable} is kept; \
         run capture again to resume. Tune with --stream-timeout"
    )]
    StreamStalled {
        slot: String,
        silent: Duration,
        timeout: Duration,
        last_lsn: Lsn,
        durable: Lsn,
    },

    #[error(
        "slot {slot:?} was confirmed up to {slot_confirmed}, but buffer {dir} holds only up to {buffer_end}: the changes in between \
         went somewhere else (another buffer directory using the same slot, a slot dropped and re-created under the same name, \
         or this buffer restored from an older copy) and the source will not send them again. Continuing would lose them silently. \
         Start over: drop the slot, capture with --clone-to into a fresh target and a new --buffer directory"
    )]
    SlotAhead {
        slot: String,
        dir: PathBuf,
        slot_confirmed: Lsn,
        buffer_end: Lsn,
    },

    #[error(
        "slot {slot:?} already exists (confirmed up to {confirmed}) but buffer {dir} is new: the slot belongs to another buffer, \
         and a second buffer on it would take the transactions the first one needs. Run capture with the --buffer that owns the \
         slot (a relative --buffer is resolved from the current directory), or use a new --slot (with --clone-to for a fresh target). \
         If the slot's old buffer is abandoned, --adopt-slot starts this buffer at {confirmed}: it will lack everything before"
    )]
    SlotNotOwned {
        slot: String,
        dir: PathBuf,
        confirmed: Lsn,
    },

    #[error(
        "slot {slot:?} is in use by another replication connection (walsender pid {pid} on the source): another capture \
         is streaming from it. Stop that capture first; a slot feeds one buffer only"
    )]
    SlotInUse { slot: String, pid: i32 },

    #[error(transparent)]
    Clone(#[from] crate::clone::CloneError),

    #[error(
        "buffer {dir} already holds streamed changes, but the target's clone is not marked done: \
         the two do not line up. Start over with a new --buffer directory and a fresh target"
    )]
    CloneAfterStreaming { dir: PathBuf },

    #[error(
        "slot {slot:?} already exists, so its starting snapshot is gone and a clone cannot line up with it. \
         Drop it (SELECT pg_drop_replication_slot('{slot}')) and run again with a new --buffer, or capture without --clone-to"
    )]
    CloneNeedsNewSlot { slot: String },

    #[error(
        "capture stopped: {} partition(s) of a publish_via_partition_root publication changed in a \
         way the stream cannot carry (everything received before is durable in the buffer):\n{}",
        .0.len(),
        .0.iter().map(|d| format!("  - {d}")).collect::<Vec<_>>().join("\n")
    )]
    PartitionChanged(Vec<partitions::Difference>),

    #[error(
        "--accept-partition-rewrite {name}: not a leaf partition walshift records for this buffer \
         (recorded: {known}); write schema.table as capture named it"
    )]
    UnknownPartition { name: String, known: String },

    #[error("{context}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

fn sql(context: &str) -> impl FnOnce(tokio_postgres::Error) -> CaptureError + '_ {
    move |source| CaptureError::Sql {
        context: context.to_owned(),
        source,
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
    /// Wall time of the streaming phase.
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
    if crate::source::valid_slot_name(&config.slot) {
        Ok(())
    } else {
        Err(CaptureError::InvalidSlotName {
            slot: config.slot.clone(),
        })
    }
}

/// File a new buffer directory gets just before capture creates its slot (`{"system_identifier",
/// "slot"}`), removed once `buffer.json` records the slot. A start interrupted in between
/// finds it and takes over the slot it created, instead of refusing it as another buffer's.
pub const CLAIM_FILE: &str = "slot-claim.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct SlotClaim {
    system_identifier: String,
    slot: String,
}

/// File listing every clone this buffer started (`{"clones": [{"system_identifier",
/// "database", "slot", "consistent_lsn"}]}`), each entry written before its clone records
/// itself on the target. A target whose unfinished (`copying`) clone record names one of them
/// is this buffer's own interrupted clone, redone without `--force`; any other is refused.
pub const CLONES_FILE: &str = "clones.json";

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct CloneAttempts {
    clones: Vec<CloneAttempt>,
}

#[derive(PartialEq, serde::Serialize, serde::Deserialize)]
struct CloneAttempt {
    system_identifier: String,
    database: String,
    slot: String,
    consistent_lsn: Lsn,
}

impl From<&clone::CloneOrigin> for CloneAttempt {
    fn from(o: &clone::CloneOrigin) -> Self {
        CloneAttempt {
            system_identifier: o.system_identifier.to_string(),
            database: o.database.clone(),
            slot: o.slot.clone(),
            consistent_lsn: o.consistent_lsn,
        }
    }
}

fn read_clone_attempts(dir: &std::path::Path) -> Result<CloneAttempts, CaptureError> {
    let path = dir.join(CLONES_FILE);
    match std::fs::read(&path) {
        Ok(data) => serde_json::from_slice(&data).map_err(|e| {
            crate::Error::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "not a walshift clone list ({e}); restore it or remove the buffer directory"
                    ),
                ),
            )
            .into()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CloneAttempts::default()),
        Err(e) => Err(crate::Error::io(&path, e).into()),
    }
}

/// Adds `origin` to [`CLONES_FILE`] (fsynced) unless it is there.
fn record_clone_attempt(
    config: &CaptureConfig,
    origin: &clone::CloneOrigin,
) -> Result<(), CaptureError> {
    let mut attempts = read_clone_attempts(&config.buffer_dir)?;
    let attempt = CloneAttempt::from(origin);
    if attempts.clones.contains(&attempt) {
        return Ok(());
    }
    attempts.clones.push(attempt);
    let path = config.buffer_dir.join(CLONES_FILE);
    let data = serde_json::to_vec_pretty(&attempts).expect("serializable");
    crate::buffer::fs::FileSystem::write_atomic(config.buffer.fs.as_ref(), &path, &data)
        .map_err(|e| crate::Error::io(&path, e))?;
    Ok(())
}

/// Whether `state` is an unfinished clone this buffer started (see [`CLONES_FILE`]).
fn own_unfinished_clone(state: Option<&clone::CloneState>, attempts: &CloneAttempts) -> bool {
    state.is_some_and(|s| {
        s.status == CloneStatus::Copying
            && s.origin
                .as_ref()
                .is_some_and(|o| attempts.clones.contains(&CloneAttempt::from(o)))
    })
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
        && (meta.system_identifier != system.system_id || meta.slot != config.slot)
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
        .map_err(sql(
            "looking for partitioned tables published via their root",
        ))?;
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
                    tracing::warn!(slot = %config.slot, confirmed = %found.confirmed, "taking over the slot an interrupted start of this buffer created");
                    (None, None, Some(found.confirmed))
                }
                Some((_, covered)) if found.confirmed > covered => {
                    return Err(CaptureError::SlotAhead {
                        slot: config.slot.clone(),
                        dir: config.buffer_dir.clone(),
                        slot_confirmed: found.confirmed,
                        buffer_end: covered,
                    });
                }
                Some(_) => (None, None, None),
                None if config.adopt_slot || claimed_only => {
                    tracing::warn!(slot = %config.slot, confirmed = %found.confirmed, "adopting an existing slot: this buffer starts at its confirmed position");
                    (None, None, Some(found.confirmed))
                }
                None if config.clone.is_some() => (None, None, None),
                None => {
                    return Err(CaptureError::SlotNotOwned {
                        slot: config.slot.clone(),
                        dir: config.buffer_dir.clone(),
                        confirmed: found.confirmed,
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
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&meta.slot],
        )
        .await
        .map_err(sql("looking up the replication slot"))?;
    let Some(row) = row else {
        return Err(CaptureError::SlotLost {
            slot: meta.slot.clone(),
            dir: dir.to_path_buf(),
            durable: buffer_end,
        });
    };
    let confirmed: Lsn = row
        .get::<_, Option<String>>(0)
        .and_then(|s| s.parse().ok())
        .unwrap_or(Lsn::ZERO);
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

/// A slot found in `pg_replication_slots`, not in use.
struct FoundSlot {
    plugin: String,
    database: String,
    confirmed: Lsn,
}

/// The slot named in `config`, if it exists. A slot in use by a walsender is given a moment
/// to be released (a capture that just stopped), then refused.
async fn existing_slot(
    client: &tokio_postgres::Client,
    config: &CaptureConfig,
) -> Result<Option<FoundSlot>, CaptureError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let Some(row) = client
            .query_opt(
                "SELECT plugin::text, database::text, confirmed_flush_lsn::text, active_pid \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&config.slot],
            )
            .await
            .map_err(sql("looking up the replication slot"))?
        else {
            return Ok(None);
        };
        if let Some(pid) = row.get::<_, Option<i32>>(3) {
            if Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            return Err(CaptureError::SlotInUse {
                slot: config.slot.clone(),
                pid,
            });
        }
        return Ok(Some(FoundSlot {
            plugin: row.get::<_, Option<String>>(0).unwrap_or_default(),
            database: row.get::<_, Option<String>>(1).unwrap_or_default(),
            confirmed: row
                .get::<_, Option<String>>(2)
                .and_then(|s| s.parse().ok())
                .unwrap_or(Lsn::ZERO),
        }));
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
        .map_err(sql("reading wal_sender_timeout"))?
        .get(0);
    Ok(ms
        .and_then(|m| m.parse::<u64>().ok())
        .filter(|&m| m > 0)
        .map(Duration::from_millis))
}

/// Opens (and recovers) the buffer, checks it belongs to this source, prepares the source and
/// streams until `until_lsn` is durable, `shutdown` resolves, or an error occurs. On a clean
/// stop everything received is flushed and confirmed before returning.
pub async fn run(
    config: CaptureConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<CaptureReport, CaptureError> {
    check_slot_name(&config)?;
    let (writer, recovery) = BufferWriter::open(&config.buffer_dir, config.buffer.clone())?;
    if !recovery.is_clean() {
        tracing::warn!("buffer recovery: {recovery:?}");
    }
    let mut existing = BufferMeta::read(&config.buffer_dir)?;
    let mut target_state = None;
    if let Some(clone) = &config.clone {
        // Before anything is created or dropped on either side, whatever `force` says.
        crate::source::identity::check_clone_target(&config.source, &clone.target).await?;
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
                    &config,
                    &clone::CloneOrigin {
                        system_identifier: meta.system_identifier,
                        database: meta.database.clone(),
                        slot: meta.slot.clone(),
                        consistent_lsn: start,
                    },
                )?;
            }
            tracing::warn!(slot = %config.slot, "an earlier clone did not finish: dropping its slot and cloning again");
            drop_slot_if_exists(&config).await?;
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
    let prepared = match prepare_inner(&config, existing.as_ref().map(|m| (m, covered)), true).await
    {
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
            record_progress(&config, start, durable)?;
        }
        meta.write(&config.buffer_dir)?;
        match std::fs::remove_file(config.buffer_dir.join(CLAIM_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(crate::Error::io(config.buffer_dir.join(CLAIM_FILE), e).into());
            }
            _ => {}
        }
    }
    let watch = partition_watch(&config, &prepared).await?;
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
                record_clone_attempt(&config, &origin)?;
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
    let tables = prepared.tables.iter().map(|t| t.to_string()).collect();
    let warnings = prepared.warnings.clone();
    let slot_created = prepared.consistent_point.is_some();
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
    let mut report = stream_into(
        &config,
        stream,
        writer,
        Resume {
            from: resume_from,
            covered: covered.max(prepared.slot_start.unwrap_or(Lsn::ZERO)),
            stream_timeout,
        },
        watch,
        shutdown,
    )
    .await?;
    report.slot_created = slot_created;
    report.tables = tables;
    report.warnings = warnings;
    Ok(report)
}

/// The partition record to watch, if the publication publishes via the root: a new one read in
/// the snapshot of a slot created now, else the buffer's record (or one read now, with a
/// warning, when there is none). Applies `accept_partition_rewrite`.
async fn partition_watch(
    config: &CaptureConfig,
    prepared: &PreparedSource,
) -> Result<Option<PartitionWatch>, CaptureError> {
    let dir = &config.buffer_dir;
    // A slot created now starts a new stream: a record left by an earlier, abandoned one (an
    // interrupted clone) does not describe it.
    let existing = match prepared.snapshot {
        Some(_) => {
            let path = partitions::PartitionRecord::path(dir);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(crate::Error::io(path, e).into());
                }
                _ => None,
            }
        }
        None => partitions::PartitionRecord::read(dir)?,
    };
    if existing.is_none() && prepared.via_root.is_empty() {
        return Ok(None);
    }
    let client = config.source.connect().await?;
    let mut record = match existing {
        Some(r) => r,
        None => {
            let roots = prepared.via_root.clone();
            let record = match &prepared.snapshot {
                Some(snapshot) => {
                    let snap = config.source.connect().await?;
                    snap.batch_execute(&format!(
                        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
                        crate::sql::quote_literal(snapshot)
                    ))
                    .await
                    .map_err(sql("importing the slot's snapshot to record the partitions"))?;
                    partitions::record(&snap, roots).await
                }
                None => {
                    tracing::warn!(
                        "no partition record in {}: recording the partitions as they are now, not \
                         as of the slot's start",
                        dir.display()
                    );
                    partitions::record(&client, roots).await
                }
            }
            .map_err(sql("recording the leaf partitions' relfilenodes"))?;
            record.write(dir)?;
            record
        }
    };
    if !config.accept_partition_rewrite.is_empty() {
        let seen = partitions::observe(&client, &record)
            .await
            .map_err(sql("reading the leaf partitions on the source"))?;
        for name in &config.accept_partition_rewrite {
            let name = name.trim();
            if !record.leaves.iter().any(|l| l.name == name) {
                return Err(CaptureError::UnknownPartition {
                    name: name.to_owned(),
                    known: record
                        .leaves
                        .iter()
                        .map(|l| l.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            match seen.differences.iter().find(|d| d.leaf.name == name) {
                Some(d) => {
                    tracing::warn!(partition = name, change = ?d.change, "accepted as the operator asked");
                    record.accept(d);
                }
                None => tracing::info!(partition = name, "unchanged; nothing to accept"),
            }
        }
        record.write(dir)?;
    }
    Ok(Some(PartitionWatch {
        client,
        record,
        reported: Vec::new(),
    }))
}

/// Capture's side of [`partitions`]: the record and a SQL session on the source.
struct PartitionWatch {
    client: tokio_postgres::Client,
    record: partitions::PartitionRecord,
    /// Differences waiting for the stream to pass the point they were seen at.
    reported: Vec<u32>,
}

impl PartitionWatch {
    /// Writes the TRUNCATEs received into the record when they changed.
    fn save_truncates(
        &mut self,
        dir: &std::path::Path,
        state: &StreamState,
    ) -> Result<(), CaptureError> {
        if self.record.truncates != state.truncates {
            self.record.truncates = state.truncates.clone();
            self.record.write(dir)?;
        }
        Ok(())
    }

    /// Compares the source with the record; accepts what the stream explains, records new
    /// leaves, and fails on what it cannot carry. Returns true when a difference waits for
    /// the stream (the caller asks the server for its position).
    async fn check(
        &mut self,
        dir: &std::path::Path,
        state: &mut StreamState,
    ) -> Result<bool, CaptureError> {
        let seen = partitions::observe(&self.client, &self.record)
            .await
            .map_err(sql("comparing the leaf partitions with the record"))?;
        let mut changed = false;
        for leaf in seen.new_leaves {
            tracing::warn!(
                "partition {} was attached to {} after the clone: changes through the stream reach \
                 the copy, but rows it held before ATTACH PARTITION do not. Compare it with \
                 `walshift verify --tables {}`",
                leaf.name,
                self.record.root_name(leaf.root),
                self.record.root_name(leaf.root)
            );
            self.record.leaves.push(leaf);
            changed = true;
        }
        let decoded = state.server_wal_end.max(state.received_commit_end);
        let mut unexplained = Vec::new();
        let mut waiting = false;
        // Every TRUNCATE received so far committed before this observation: with no
        // difference left, none of them explains anything any more.
        if seen.differences.is_empty() && !state.truncates.is_empty() {
            state.truncates.clear();
        }
        if state.truncates != self.record.truncates {
            self.record.truncates = state.truncates.clone();
            changed = true;
        }
        for d in seen.differences {
            match partitions::judge(&d, seen.lsn, &state.truncates, decoded) {
                partitions::Verdict::Explained => {
                    tracing::info!(partition = %d.leaf.name, "rewritten by a TRUNCATE of its root the stream carried");
                    self.record.accept(&d);
                    changed = true;
                }
                partitions::Verdict::Wait => {
                    if !self.reported.contains(&d.leaf.oid) {
                        tracing::debug!(partition = %d.leaf.name, "changed; waiting for the stream to pass it");
                        self.reported.push(d.leaf.oid);
                    }
                    waiting = true;
                }
                partitions::Verdict::Unexplained => unexplained.push(d),
            }
        }
        if changed {
            self.record.write(dir)?;
        }
        if !unexplained.is_empty() {
            return Err(CaptureError::PartitionChanged(unexplained));
        }
        if !waiting {
            self.reported.clear();
        }
        Ok(waiting)
    }
}

async fn drop_slot_if_exists(config: &CaptureConfig) -> Result<(), CaptureError> {
    let client = config.source.connect().await?;
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await
        .map_err(sql("dropping the slot of an unfinished clone"))?;
    Ok(())
}

/// Where streaming starts and what the buffer already covers.
struct Resume {
    /// Commits ending at or before this are already in the buffer (or before the slot).
    from: Lsn,
    /// The highest position already recorded as confirmed for this buffer.
    covered: Lsn,
    /// See [`CaptureConfig::stream_timeout`] (resolved; zero = off).
    stream_timeout: Duration,
}

/// Records (fsynced) that the slot is about to be confirmed up to `confirmed`.
fn record_progress(
    config: &CaptureConfig,
    confirmed: Lsn,
    durable: Lsn,
) -> Result<(), CaptureError> {
    SlotProgress {
        slot: config.slot.clone(),
        confirmed_lsn: confirmed,
        durable_lsn: durable,
        updated_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    }
    .write_with(&config.buffer_dir, config.buffer.fs.as_ref())?;
    Ok(())
}

/// Records the confirmable position when it passed the recorded one (or `always`), so the
/// slot is never confirmed past what [`SlotProgress`] says the buffer covers.
fn record(
    config: &CaptureConfig,
    state: &mut StreamState,
    always: bool,
) -> Result<(), CaptureError> {
    let confirmable = state.confirmable();
    if always || confirmable > state.recorded || state.buffer_durable > state.recorded_durable {
        record_progress(config, confirmable, state.buffer_durable)?;
        state.recorded = state.recorded.max(confirmable);
        state.recorded_durable = state.buffer_durable;
        state.recorded_at = Since(Instant::now());
    }
    Ok(())
}

/// The streaming loop. See the module contract.
async fn stream_into(
    config: &CaptureConfig,
    mut stream: ReplicationStream,
    mut writer: BufferWriter,
    resume: Resume,
    mut watch: Option<PartitionWatch>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<CaptureReport, CaptureError> {
    let started = Instant::now();
    let reads_before = stream.read_stats();
    let syncs_before = writer.syncs();
    let resume_from = resume.from;
    let mut state = StreamState {
        resume_from,
        durable: resume_from,
        track_truncates: watch.is_some(),
        truncates: watch
            .as_ref()
            .map(|w| w.record.truncates.clone())
            .unwrap_or_default(),
        recorded: resume.covered,
        buffer_durable: writer.durable_lsn(),
        recorded_durable: writer.durable_lsn(),
        recorded_at: Since(started),
        last_received: Since(started),
        ..Default::default()
    };
    let mut partition_tick = tokio::time::interval(config.partition_check_interval);
    partition_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut progress = progress::Progress::new(config.progress, started);

    // Half the flush interval: a group handed over at one tick is usually seen durable at the next.
    let mut flush_tick =
        tokio::time::interval((config.flush_interval / 2).max(Duration::from_millis(1)));
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status_tick = tokio::time::interval(config.status_interval);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut progress_tick = tokio::time::interval(Duration::from_secs(1));
    let mut stall_tick = tokio::time::interval(
        (resume.stream_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)),
    );
    stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_submit = Instant::now();
    let mut reported = Lsn::ZERO;
    tokio::pin!(shutdown);

    let outcome: Result<(), CaptureError> = async {
        loop {
            if config
                .until_lsn
                .is_some_and(|until| state.confirmable() >= until)
            {
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = &mut shutdown => return Ok(()),
                _ = flush_tick.tick() => {
                    if state.unsubmitted && last_submit.elapsed() >= config.flush_interval {
                        writer.submit()?;
                        state.unsubmitted = false;
                        last_submit = Instant::now();
                    }
                    state.set_durable(writer.poll()?);
                    // An idle position beyond the recorded one is recorded at most once a second.
                    if state.confirmable() > state.recorded
                        && state.recorded_at.0.elapsed() >= Duration::from_secs(1)
                    {
                        record(config, &mut state, false)?;
                    }
                    if state.sendable() > reported {
                        reported = state.sendable();
                        send_status(&mut stream, &state, false).await?;
                    }
                }
                _ = status_tick.tick() => {
                    // Rewritten whenever the source was heard from: its time shows liveness.
                    let heard = state.last_received.0 > state.recorded_at.0;
                    record(config, &mut state, heard)?;
                    // Asking for a reply makes a live server answer: silence means a stall.
                    send_status(&mut stream, &state, true).await?;
                }
                _ = partition_tick.tick(), if watch.is_some() => {
                    let w = watch.as_mut().expect("guarded");
                    if w.check(&config.buffer_dir, &mut state).await? {
                        // Ask for the server's decoded position now rather than at its leisure.
                        send_status(&mut stream, &state, true).await?;
                    }
                }
                _ = progress_tick.tick() => progress.update(&state),
                _ = stall_tick.tick() => {
                    let silent = state.last_received.0.elapsed();
                    if !resume.stream_timeout.is_zero() && silent > resume.stream_timeout {
                        return Err(CaptureError::StreamStalled {
                            slot: config.slot.clone(),
                            silent,
                            timeout: resume.stream_timeout,
                            last_lsn: state.server_wal_end,
                            durable: state.sendable(),
                        });
                    }
                }
                event = stream.next() => {
                    let Some(event) = event? else {
                        return Err(CaptureError::StreamEnded { reason: stream.end_reason() });
                    };
                    state.last_received = Since(Instant::now());
                    // Handle what has already arrived before the next select round (bounded,
                    // so timers and shutdown are still served under a constant stream).
                    let mut handled = 0;
                    let mut next = Some(event);
                    while let Some(ev) = next {
                        if state.handle(ev, &mut writer)? {
                            send_status(&mut stream, &state, false).await?;
                        }
                        handled += 1;
                        next = if handled < DRAIN_BATCH { stream.next_buffered()? } else { None };
                    }
                    // Before the slot may confirm a TRUNCATE, the record holds it: the slot
                    // will not send it again, and it explains the partitions it rewrote. Look
                    // at the partitions right away, while their pg_class rows still carry the
                    // TRUNCATE's transaction id (a later ALTER TABLE would replace it).
                    if let Some(w) = &mut watch {
                        w.save_truncates(&config.buffer_dir, &state)?;
                        if std::mem::take(&mut state.truncate_received)
                            && w.check(&config.buffer_dir, &mut state).await?
                        {
                            send_status(&mut stream, &state, true).await?;
                        }
                    }
                    // A trickle of small reads costs a wakeup and several syscalls per message,
                    // CPU the walsender (capture's real bottleneck) then lacks on a busy host.
                    // Letting the socket fill for a moment turns them into a few large reads.
                    // The thread sleeps outside the event loop: an awaited timer would park in
                    // epoll_wait, which every message the walsender sends meanwhile wakes.
                    if handled < COALESCE_BELOW && !config.read_coalesce.is_zero() {
                        std::thread::sleep(config.read_coalesce);
                    }
                }
            }
        }
    }
    .await;

    if let Some(w) = &mut watch
        && let Err(e) = w.save_truncates(&config.buffer_dir, &state)
    {
        tracing::error!("{e}");
    }
    // Whatever happened, make what was received durable; confirm it only on a clean stop.
    let flushed = writer.flush();
    if let Ok(durable) = &flushed {
        state.set_durable(*durable);
        state.unsubmitted = false;
    }
    progress.finish(&state);
    outcome?;
    flushed?;
    record(config, &mut state, false)?;
    send_status(&mut stream, &state, false).await?;
    let (socket_reads, socket_read_bytes) = stream.read_stats();
    let _ = stream.stop().await;
    Ok(CaptureReport {
        start_lsn: resume_from,
        durable_lsn: state.sendable(),
        transactions: state.transactions,
        changes: state.changes,
        bytes: state.bytes,
        elapsed: started.elapsed(),
        socket_reads: socket_reads - reads_before.0,
        socket_read_bytes: socket_read_bytes - reads_before.1,
        fsyncs: writer.syncs() - syncs_before,
        slot_created: false,
        tables: Vec::new(),
        warnings: Vec::new(),
    })
}

async fn send_status(
    stream: &mut ReplicationStream,
    state: &StreamState,
    reply: bool,
) -> Result<(), CaptureError> {
    let flush = state.sendable();
    let write = flush.max(state.received_commit_end);
    stream
        .send_status(StandbyStatus {
            write,
            flush,
            apply: flush,
            reply_requested: reply,
        })
        .await
        .map_err(CaptureError::from)
}

/// An instant, defaulting to now.
#[derive(Clone, Copy)]
struct Since(Instant);

impl Default for Since {
    fn default() -> Self {
        Since(Instant::now())
    }
}

/// The stream as capture sees it: transaction boundaries, duplicates, what is durable.
#[derive(Default)]
struct StreamState {
    /// Confirmed position recorded in the buffer's [`SlotProgress`]; nothing beyond the
    /// durable commit is sent to the slot unless recorded first.
    recorded: Lsn,
    /// The buffer's own durable LSN (end of its last fsynced commit; `durable` may start
    /// higher, at a new slot's consistent point).
    buffer_durable: Lsn,
    /// `buffer_durable` as recorded.
    recorded_durable: Lsn,
    recorded_at: Since,
    /// When the last message (XLogData or keepalive) arrived.
    last_received: Since,
    /// Commits ending at or before this are already in the buffer (or before the slot).
    resume_from: Lsn,
    /// The buffer's durable LSN (end of the last fsynced commit).
    durable: Lsn,
    in_transaction: bool,
    /// True while dropping a transaction the buffer already holds.
    skipping: bool,
    /// Records appended since the last submit to the sync thread.
    unsubmitted: bool,
    /// End LSN of the last commit appended.
    last_appended_commit: Lsn,
    /// Records appended after the last commit (standalone messages): their durability is not
    /// visible through the durable LSN, so they hold back keepalive confirmation.
    appended_since_commit: u64,
    /// End LSN of the last commit received (appended or skipped).
    received_commit_end: Lsn,
    /// Server position from keepalives while nothing was pending.
    idle_position: Lsn,
    server_wal_end: Lsn,
    last_commit_time: Option<i64>,
    /// Record the TRUNCATEs received (a via-root publication is watched).
    track_truncates: bool,
    /// Transaction id of the open transaction (from its Begin).
    xid: u32,
    /// TRUNCATEs received: transaction id → relation OIDs truncated.
    truncates: HashMap<u32, Vec<u32>>,
    /// A TRUNCATE arrived since the partitions were last compared.
    truncate_received: bool,
    transactions: u64,
    changes: u64,
    bytes: u64,
}

impl StreamState {
    /// The position that may be confirmed to the slot. Never passes the durable commit unless
    /// nothing is pending and no transaction is open (then the keepalive position is safe).
    fn confirmable(&self) -> Lsn {
        if self.all_durable() {
            self.durable.max(self.idle_position)
        } else {
            self.durable
        }
    }

    /// Nothing open, nothing appended after the last commit, and that commit is on disk.
    fn all_durable(&self) -> bool {
        !self.in_transaction
            && self.appended_since_commit == 0
            && self.durable >= self.last_appended_commit
    }

    /// The position sent to the slot: [`Self::confirmable`], with an idle position only as far
    /// as it is recorded.
    fn sendable(&self) -> Lsn {
        if self.all_durable() {
            self.durable.max(self.idle_position.min(self.recorded))
        } else {
            self.durable
        }
    }

    fn set_durable(&mut self, durable: Lsn) {
        self.buffer_durable = self.buffer_durable.max(durable);
        self.durable = self.durable.max(durable);
    }

    /// Applies one event: appends a message to the buffer or notes a keepalive. Returns
    /// true when the server asked for a status update now.
    fn handle(
        &mut self,
        event: ReplicationEvent,
        writer: &mut BufferWriter,
    ) -> Result<bool, CaptureError> {
        match event {
            ReplicationEvent::XLogData {
                wal_start,
                wal_end,
                data,
                ..
            } => {
                self.server_wal_end = self.server_wal_end.max(wal_end);
                if let Some((lsn, kind, payload)) = self.accept(wal_start, data) {
                    writer.append(lsn, kind, &payload)?;
                    self.unsubmitted = true;
                }
                Ok(false)
            }
            ReplicationEvent::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.server_wal_end = self.server_wal_end.max(wal_end);
                self.keepalive(wal_end);
                Ok(reply_requested)
            }
        }
    }

    fn keepalive(&mut self, wal_end: Lsn) {
        if self.all_durable() {
            self.idle_position = self.idle_position.max(wal_end);
        }
    }

    /// Classifies one pgoutput message; returns `(lsn, kind, payload)` to append, if any.
    fn accept(&mut self, wal_start: Lsn, data: Bytes) -> Option<(Lsn, u8, Bytes)> {
        self.bytes += data.len() as u64;
        let tag = *data.first()?;
        match tag {
            b'B' => {
                self.in_transaction = true;
                // Begin: final_lsn (8), commit timestamp (8), xid (4).
                self.xid = data
                    .get(17..21)
                    .map_or(0, |b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
                // Begin: final_lsn (the commit record's start) at bytes 1..9.
                let final_lsn = read_lsn(&data, 1);
                self.skipping = final_lsn.is_some_and(|f| f < self.resume_from);
                if self.skipping {
                    tracing::debug!(?final_lsn, resume_from = %self.resume_from, "dropping a transaction the buffer already holds");
                    return None;
                }
                Some((wal_start, tag, data))
            }
            b'C' => {
                self.in_transaction = false;
                // Commit: flags (1), commit_lsn (8), end_lsn (8), timestamp (8).
                let end = read_lsn(&data, 10).unwrap_or(wal_start);
                self.received_commit_end = self.received_commit_end.max(end);
                if std::mem::take(&mut self.skipping) {
                    return None;
                }
                self.transactions += 1;
                self.last_appended_commit = end;
                self.appended_since_commit = 0;
                self.last_commit_time = data
                    .get(18..26)
                    .map(|b| i64::from_be_bytes(b.try_into().expect("8 bytes")));
                Some((end, tag, data))
            }
            b'T' if self.track_truncates => {
                // Truncate: relation count (4), options (1), relation OIDs (4 each). Noted even
                // when the buffer already holds the transaction: the rewrite it explains is real.
                let n = data
                    .get(1..5)
                    .map_or(0, |b| i32::from_be_bytes(b.try_into().expect("4 bytes")));
                let rels = (0..n.max(0) as usize)
                    .filter_map(|i| data.get(6 + 4 * i..10 + 4 * i))
                    .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
                self.truncates.entry(self.xid).or_default().extend(rels);
                self.truncate_received = true;
                if self.skipping {
                    return None;
                }
                if !self.in_transaction {
                    self.appended_since_commit += 1;
                }
                Some((wal_start, tag, data))
            }
            _ if self.skipping => None,
            b'I' | b'U' | b'D' => {
                self.changes += 1;
                Some((wal_start, tag, data))
            }
            _ => {
                if !self.in_transaction {
                    self.appended_since_commit += 1;
                }
                Some((wal_start, tag, data))
            }
        }
    }
}

fn read_lsn(data: &[u8], at: usize) -> Option<Lsn> {
    data.get(at..at + 8)
        .map(|b| Lsn(u64::from_be_bytes(b.try_into().expect("8 bytes"))))
}
