//! `BufferError`: what went wrong, where (directory, segment file, byte offset) and what the
//! operator can do about it. I/O errors are carried as sources, not formatted into the text.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::lsn::Lsn;

/// A failure of the durable buffer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BufferError {
    /// A file operation failed.
    #[error("buffer I/O error: could not {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Stored bytes are damaged. Never skipped: the data after this point cannot be trusted.
    #[error(
        "buffer segment {} is corrupt at byte offset {offset}: {reason}. {hint}",
        segment.display()
    )]
    Corrupt {
        segment: PathBuf,
        offset: u64,
        reason: String,
        hint: &'static str,
    },

    /// A segment between the first and the last one is missing.
    #[error(
        "buffer {} is missing segment {name} (segments must be contiguous): the transactions in it are lost. Start over: a fresh clone (capture --clone-to) into a new --buffer directory",
        dir.display()
    )]
    MissingSegment { dir: PathBuf, name: String },

    /// Another writer holds the buffer.
    #[error(
        "buffer {} is locked by another writer (is a capture already running on it?)",
        dir.display()
    )]
    Locked {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A previous write or fsync failed; the writer refuses further work.
    #[error(
        "the buffer writer stopped after a failed write or fsync; nothing after durable LSN {durable} is confirmed. Reopen the buffer to recover (it truncates what was not made durable)"
    )]
    WriteFailed {
        durable: Lsn,
        #[source]
        source: Arc<BufferError>,
    },

    /// `append` was called with a record the buffer cannot store.
    #[error("invalid record at LSN {lsn}: {reason}")]
    InvalidRecord { lsn: Lsn, reason: String },

    /// Records arrive out of the order pgoutput guarantees (e.g. a commit whose end LSN does
    /// not advance, or a begin inside a transaction).
    #[error("record at LSN {lsn} out of sequence: {reason}")]
    Sequence { lsn: Lsn, reason: String },

    /// The requested start lies before what retention kept.
    #[error(
        "buffer {} no longer holds the transactions after {requested}: it was pruned and starts after commit {earliest}",
        dir.display()
    )]
    Pruned {
        dir: PathBuf,
        requested: Lsn,
        earliest: Lsn,
    },

    /// `buffer.json` is unreadable.
    #[error("buffer metadata {} is invalid", path.display())]
    Meta {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// The buffer was captured from another source than the one given.
    #[error(
        "buffer {} belongs to another source: its {field} is {found:?}, expected {expected:?}. Use a new buffer directory for this source",
        path.display()
    )]
    SourceMismatch {
        path: PathBuf,
        field: &'static str,
        expected: String,
        found: String,
    },

    /// The buffer ends before what it had made durable and confirmed to the slot: the
    /// transactions in between were lost (cut off, or an older copy of the directory was put
    /// back) and the slot will not send them again.
    #[error(
        "buffer {} ends at {buffer_end}, but it had made everything up to {durable} durable (and confirmed up to {confirmed} to the slot): \
         the transactions in between are gone from the buffer and the source will not send them again. This is data loss, not a torn tail: \
         do not replay or cut over from this buffer. Start over: drop the slot, capture with --clone-to into a fresh target and a new --buffer directory",
        dir.display()
    )]
    BehindConfirmed {
        dir: PathBuf,
        buffer_end: Lsn,
        durable: Lsn,
        confirmed: Lsn,
    },

    /// A configuration value is unusable.
    #[error("invalid buffer configuration: {0}")]
    Config(String),
}

/// Result alias for the buffer.
pub type Result<T, E = BufferError> = std::result::Result<T, E>;

pub(crate) const HINT_RESTORE: &str = "The data from here on cannot be trusted. Start over: a fresh clone (capture --clone-to) into a new --buffer directory. An older copy of this directory is no way out: it lacks what was confirmed to the slot since, and capture refuses it";
pub(crate) const HINT_TAIL: &str = "Valid records follow the damage, so this is not a torn write. Start over with a fresh clone into a new --buffer directory; or reopen the writer with RecoveryMode::TruncateCorruptTail, which drops everything from this offset on: capture then accepts the buffer only if the slot was not confirmed past what is left (checked against the source)";

impl BufferError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        BufferError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        segment: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
        hint: &'static str,
    ) -> Self {
        BufferError::Corrupt {
            segment: segment.into(),
            offset,
            reason: reason.into(),
            hint,
        }
    }

    /// For corruption: the segment file and byte offset.
    pub fn corrupt_location(&self) -> Option<(&std::path::Path, u64)> {
        match self {
            BufferError::Corrupt {
                segment, offset, ..
            } => Some((segment, *offset)),
            _ => None,
        }
    }
}
