//! The durable buffer: a segmented, checksummed, fsynced append-only log of raw pgoutput
//! messages. Capture appends to it and confirms to the slot only what it has fsynced; replay
//! reads complete transactions from it; a buffer directory is also the fixture format.
//! `docs/buffer-format.md` describes the bytes, the durability contract and the recovery rules.
//!
//! - `format`: segment names, header and record frames, as pure encode/decode functions.
//! - `error`: [`BufferError`], naming the directory, file and offset, and what to do.
//! - `fs`: the file-system seam the writer mutates through, with failpoints for tests.
//! - `segment`: segment files on disk: listing, headers, a record cursor, commit bookkeeping.
//! - `writer`: [`BufferWriter`], group commit on a sync thread, the durability contract.
//! - `recovery`: what opening a writer repairs (torn tail, incomplete trailing transaction).
//! - `reader`: [`BufferReader`], reading from an LSN (also while a writer appends), status.
//! - `meta`: `buffer.json`, the source a buffer belongs to.
//! - `progress`: `confirmed.json`, how far the slot was confirmed for this buffer.
//! - [`prune`]: retention by whole segments.

mod error;
pub mod format;
pub mod fs;
mod meta;
mod progress;
mod reader;
mod recovery;
mod segment;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::{BufferError, Result};
pub use format::Pos;
pub use meta::{BufferMeta, META_FILE};
pub use progress::{PROGRESS_FILE, SlotProgress};
pub use reader::{BufferReader, BufferStatus, RecordIter, Transaction, TxnEvent, TxnItem, TxnIter};
pub use recovery::{CutTransaction, RecoveryReport, TornTail};
pub use segment::{CommitInfo, Record, pg_time_to_system_time};
pub use writer::{BufferWriter, writer_running};

use crate::lsn::Lsn;

/// Lock file a writer holds (`flock`) while it has the buffer open.
pub const LOCK_FILE: &str = "writer.lock";

/// Mode of a buffer directory: it holds every captured row, so only its owner may read it.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file in a buffer directory (segments, metadata, lock, fence and journal files).
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (mode [`DIR_MODE`]; missing parents get the default mode) or, if it exists,
/// tightens it and the files in it to [`DIR_MODE`]/[`FILE_MODE`], warning about each one that
/// was readable by others.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| BufferError::io("create directory", parent, e))?;
    }
    match std::fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(BufferError::io("create directory", dir, e)),
    }
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| BufferError::io("list", dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    // A directory someone else just created empty is tightened without a warning.
    let tighten = |path: &Path, mode: u32, warn: bool| -> Result<()> {
        let meta = std::fs::symlink_metadata(path).map_err(|e| BufferError::io("stat", path, e))?;
        let current = meta.permissions().mode() & 0o777;
        if current & 0o077 != 0 {
            if warn {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{current:o}"),
                    "buffer file was accessible to others (it holds captured rows): tightening to {mode:o}"
                );
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| BufferError::io("change the mode of", path, e))?;
        }
        Ok(())
    };
    tighten(dir, DIR_MODE, !files.is_empty())?;
    for f in &files {
        tighten(f, FILE_MODE, true)?;
    }
    Ok(())
}

/// Default maximum segment size: 64 MiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;
/// Smallest accepted segment size (tests use tiny segments to exercise rollover).
pub const MIN_SEGMENT_SIZE: u64 = 256;

/// How recovery treats damage at the end of the last segment that is followed by valid data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecoveryMode {
    /// Only a torn tail (damage with nothing valid after it) is truncated; anything else is a
    /// hard error. The default.
    #[default]
    Strict,
    /// Also truncate the last segment at its first damaged record even when valid records
    /// follow. For an operator who accepts losing those records (capture then resumes from the
    /// durable LSN, so the source must still hold them).
    TruncateCorruptTail,
}

/// Writer settings.
#[derive(Clone, Debug)]
pub struct BufferConfig {
    /// Maximum size of a segment file in bytes. Default 64 MiB. Smaller segments make
    /// retention finer-grained and starting mid-log cheaper; larger ones mean fewer files. A
    /// record larger than this gets a segment of its own.
    pub segment_size: u64,
    /// Recovery policy for damage at the end of the last segment. Default [`RecoveryMode::Strict`].
    pub recovery: RecoveryMode,
    /// File-system operations; default the real file system. Tests inject [`fs::FailpointFs`].
    pub fs: Arc<dyn fs::FileSystem>,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            segment_size: DEFAULT_SEGMENT_SIZE,
            recovery: RecoveryMode::Strict,
            fs: Arc::new(fs::StdFs),
        }
    }
}

impl BufferConfig {
    pub fn with_segment_size(mut self, bytes: u64) -> Self {
        self.segment_size = bytes;
        self
    }

    pub fn with_fs(mut self, fs: Arc<dyn fs::FileSystem>) -> Self {
        self.fs = fs;
        self
    }

    pub fn with_recovery(mut self, mode: RecoveryMode) -> Self {
        self.recovery = mode;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.segment_size < MIN_SEGMENT_SIZE {
            return Err(BufferError::Config(format!(
                "segment size {} is below the minimum of {MIN_SEGMENT_SIZE} bytes",
                self.segment_size
            )));
        }
        Ok(())
    }
}

/// What [`prune`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    pub removed: Vec<PathBuf>,
    pub bytes_freed: u64,
    /// Segment files left.
    pub remaining: usize,
}

/// Retention: removes whole segments, oldest first, that hold only transactions ending at or
/// before `before` (and records preceding them). A segment still needed by a transaction
/// ending after `before`, and the last segment, are always kept; so is the relation preamble
/// readers need, which every kept segment carries. Safe to run while a writer appends.
pub fn prune(dir: impl AsRef<Path>, before: Lsn) -> Result<PruneReport> {
    let dir = dir.as_ref();
    let fs = fs::StdFs;
    let segs = segment::list_segments(dir)?;
    let mut report = PruneReport {
        remaining: segs.len(),
        ..PruneReport::default()
    };
    let mut keep_from = None;
    for s in &segs {
        let h = match segment::read_header(&s.path)? {
            Ok(h) if h.seq == s.seq => h,
            // A last segment still being created: it cannot lower the cut.
            Err(format::HeaderError::TooShort(_)) if Some(s.seq) == segs.last().map(|l| l.seq) => {
                break;
            }
            _ => segment::require_header(s)?,
        };
        if h.prev_commit_end <= before {
            keep_from = Some(h.resume.seq);
        } else {
            break;
        }
    }
    let Some(keep_from) = keep_from else {
        return Ok(report);
    };
    for s in segs.iter().filter(|s| s.seq < keep_from) {
        let len = segment::file_len(&s.path)?;
        fs::FileSystem::remove_file(&fs, &s.path)
            .map_err(|e| BufferError::io("remove", &s.path, e))?;
        report.removed.push(s.path.clone());
        report.bytes_freed += len;
        report.remaining -= 1;
    }
    if !report.removed.is_empty() {
        fs::FileSystem::sync_dir(&fs, dir)
            .map_err(|e| BufferError::io("fsync directory", dir, e))?;
        tracing::info!(
            dir = %dir.display(),
            segments = report.removed.len(),
            bytes = report.bytes_freed,
            %before,
            "pruned buffer segments"
        );
    }
    Ok(report)
}

/// [`BufferReader::status`] for a directory.
pub fn status(dir: impl AsRef<Path>) -> Result<BufferStatus> {
    BufferReader::open(dir)?.status()
}
