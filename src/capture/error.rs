//! Capture failures. Each says what happened and what to do.

use std::path::PathBuf;
use std::time::Duration;

use super::partitions;
use crate::buffer::BufferError;
use crate::error::SqlError;
use crate::lsn::Lsn;
use crate::source::preflight::PreflightError;
use crate::source::replication::ReplicationError;

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
    Identity(#[from] crate::identity::IdentityError),

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

    #[error(transparent)]
    Sql(#[from] SqlError),

    #[error(
        "lost the source and could not get the stream back: {attempts} reconnect attempt(s) over {} failed \
         (--reconnect-attempts). Everything received is durable in the buffer; run capture again once the \
         source is back to resume. The last attempt",
        crate::conn::reconnect::human(*.over)
    )]
    GaveUp {
        attempts: u32,
        /// Since the stream was lost.
        over: Duration,
        #[source]
        last: Box<CaptureError>,
    },
}

impl CaptureError {
    /// The source is gone for now (restarting, failing over, the connection dropped) and
    /// another start on the same buffer may succeed: capture reconnects after these
    /// ([`crate::conn::reconnect`]). Its slot still "active" for the walsender of the lost
    /// connection is one. Never a slot that is gone or ahead of the buffer, another source,
    /// the buffer itself, authentication or permissions: those stop capture at once.
    pub fn is_transient(&self) -> bool {
        use crate::conn::reconnect::{is_transient, is_transient_identity, is_transient_sql};
        match self {
            CaptureError::Replication(e) => e.is_transient(),
            CaptureError::Source(e) => is_transient(e),
            CaptureError::Sql(e) | CaptureError::Preflight(PreflightError::Sql(e)) => {
                is_transient_sql(e)
            }
            CaptureError::Identity(e) => is_transient_identity(e),
            CaptureError::StreamEnded { .. }
            | CaptureError::StreamStalled { .. }
            | CaptureError::SlotInUse { .. } => true,
            _ => false,
        }
    }
}
