//! Segment files on disk: listing a buffer directory, reading headers, and a cursor that yields
//! checksummed records from one segment file. Shared by recovery, the reader and retention.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use bytes::{Buf, Bytes, BytesMut};

use super::error::{BufferError, HINT_RESTORE, Result};
use super::format::{
    self, Frame, HEADER_LEN, HeaderError, Pos, SegmentHeader, find_valid_record_after,
    segment_file_name,
};
use crate::lsn::Lsn;
use crate::source::pgoutput;

const READ_CHUNK: usize = 1 << 20;

/// One segment file found in the directory.
#[derive(Clone, Debug)]
pub(crate) struct SegmentFile {
    pub seq: u64,
    pub path: PathBuf,
}

/// Segment files of `dir` in log order. Errors if the sequence has a gap.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<SegmentFile>> {
    let rd = std::fs::read_dir(dir).map_err(|e| BufferError::io("list", dir, e))?;
    let mut segs = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| BufferError::io("list", dir, e))?;
        if let Some(seq) = entry
            .file_name()
            .to_str()
            .and_then(format::parse_segment_file_name)
        {
            segs.push(SegmentFile {
                seq,
                path: entry.path(),
            });
        }
    }
    segs.sort_by_key(|s| s.seq);
    for w in segs.windows(2) {
        if w[1].seq != w[0].seq + 1 {
            return Err(BufferError::MissingSegment {
                dir: dir.to_path_buf(),
                name: segment_file_name(w[0].seq + 1),
            });
        }
    }
    Ok(segs)
}

pub(crate) fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(segment_file_name(seq))
}

pub(crate) fn file_len(path: &Path) -> Result<u64> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| BufferError::io("stat", path, e))
}

/// Reads a header; the inner error says why the bytes are not one (the caller decides whether
/// that is a torn creation or corruption).
pub(crate) fn read_header(path: &Path) -> Result<Result<SegmentHeader, HeaderError>> {
    let mut f = File::open(path).map_err(|e| BufferError::io("open", path, e))?;
    let mut b = Vec::with_capacity(HEADER_LEN);
    (&mut f)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut b)
        .map_err(|e| BufferError::io("read", path, e))?;
    Ok(SegmentHeader::decode(&b))
}

/// Reads a header that must be valid, checking it names the expected sequence number.
pub(crate) fn require_header(seg: &SegmentFile) -> Result<SegmentHeader> {
    match read_header(&seg.path)? {
        Ok(h) if h.seq == seg.seq => Ok(h),
        Ok(h) => Err(BufferError::corrupt(
            &seg.path,
            16,
            format!(
                "header names segment {} but the file is segment {}",
                h.seq, seg.seq
            ),
            HINT_RESTORE,
        )),
        Err(e) => Err(BufferError::corrupt(
            &seg.path,
            0,
            e.to_string(),
            HINT_RESTORE,
        )),
    }
}

/// True when the file is shorter than a header or holds only zero bytes: a segment whose
/// creation was interrupted before its first write reached the disk.
pub(crate) fn is_torn_creation(path: &Path) -> Result<bool> {
    let data = std::fs::read(path).map_err(|e| BufferError::io("read", path, e))?;
    Ok(data.len() < HEADER_LEN || data.iter().all(|&b| b == 0))
}

/// A record read from a segment; the payload is a slice of the read buffer (no copy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Where the record's frame starts.
    pub pos: Pos,
    /// For a commit, the transaction's end LSN; otherwise the XLogData start the server sent.
    pub lsn: Lsn,
    /// The pgoutput tag (`b'B'`, `b'C'`, `b'R'`, …), without the preamble flag.
    pub kind: u8,
    /// A relation-preamble copy written at a segment start, not an original message.
    pub preamble: bool,
    /// The raw pgoutput message, starting with the tag byte.
    pub payload: Bytes,
}

impl Record {
    /// Offset just past this record's frame.
    pub fn end_offset(&self) -> u64 {
        self.pos.offset + format::frame_len(self.payload.len()) as u64
    }
}

/// One step of a [`Cursor`].
pub(crate) enum Step {
    Record(Record),
    /// No more bytes at a record boundary (for now: the file may still grow).
    End {
        offset: u64,
    },
    /// The bytes at `offset` are not a complete valid record.
    Damaged {
        offset: u64,
        reason: String,
    },
}

/// Sequential reader of the records of one segment file.
pub(crate) struct Cursor {
    pub seg: SegmentFile,
    file: File,
    buf: BytesMut,
    /// File offset of `buf[0]`.
    offset: u64,
}

impl Cursor {
    /// Opens `seg` positioned at `offset` (which must be a record boundary at or after the
    /// header).
    pub fn open(seg: SegmentFile, offset: u64) -> Result<Cursor> {
        let offset = offset.max(HEADER_LEN as u64);
        let mut file = File::open(&seg.path).map_err(|e| BufferError::io("open", &seg.path, e))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| BufferError::io("seek", &seg.path, e))?;
        Ok(Cursor {
            seg,
            file,
            buf: BytesMut::new(),
            offset,
        })
    }

    fn fill(&mut self, want: usize) -> Result<bool> {
        let have = self.buf.len();
        let grow = want.saturating_sub(have).max(READ_CHUNK);
        self.buf.resize(have + grow, 0);
        let mut filled = have;
        let mut progressed = false;
        while filled < have + grow {
            match self.file.read(&mut self.buf[filled..]) {
                Ok(0) => break,
                Ok(n) => {
                    filled += n;
                    progressed = true;
                    if filled >= want {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.buf.truncate(have);
                    return Err(BufferError::io("read", &self.seg.path, e));
                }
            }
        }
        self.buf.truncate(filled);
        Ok(progressed)
    }

    pub fn next_step(&mut self) -> Result<Step> {
        loop {
            match format::decode_record(&self.buf) {
                Frame::Valid(v) => {
                    // Skip the header in place: one shared handle per record (a reference
                    // count touched once, not for the frame and again for its payload).
                    self.buf.advance(v.payload_start);
                    let payload = self.buf.split_to(v.payload_len).freeze();
                    let pos = Pos::new(self.seg.seq, self.offset);
                    self.offset += v.frame_len() as u64;
                    return Ok(Step::Record(Record {
                        pos,
                        lsn: v.lsn,
                        kind: v.tag(),
                        preamble: v.is_preamble(),
                        payload,
                    }));
                }
                Frame::Incomplete { needed } => {
                    let want = needed.unwrap_or(format::RECORD_HEADER_LEN);
                    if !self.fill(want)? {
                        if self.buf.is_empty() {
                            return Ok(Step::End {
                                offset: self.offset,
                            });
                        }
                        return Ok(Step::Damaged {
                            offset: self.offset,
                            reason: format!(
                                "incomplete record: {} bytes present{}",
                                self.buf.len(),
                                needed.map(|n| format!(" of {n}")).unwrap_or_default()
                            ),
                        });
                    }
                }
                Frame::Invalid(e) => {
                    return Ok(Step::Damaged {
                        offset: self.offset,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }

    /// Whether any valid record starts after the damaged record at `offset` in this file.
    pub fn valid_record_after(&self, offset: u64) -> Result<bool> {
        let path = &self.seg.path;
        let mut f = File::open(path).map_err(|e| BufferError::io("open", path, e))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| BufferError::io("seek", path, e))?;
        let mut rest = Vec::new();
        f.read_to_end(&mut rest)
            .map_err(|e| BufferError::io("read", path, e))?;
        Ok(find_valid_record_after(&rest, 0).is_some())
    }
}

/// What the buffer knows about the last commit it has seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CommitInfo {
    /// The transaction's end LSN (the position the slot is confirmed to).
    pub end_lsn: Lsn,
    /// Commit time in microseconds since 2000-01-01 00:00:00 UTC, when known.
    pub commit_time_us: Option<i64>,
}

impl CommitInfo {
    pub(crate) fn from_record(lsn: Lsn, payload: &[u8]) -> CommitInfo {
        CommitInfo {
            end_lsn: lsn,
            commit_time_us: pgoutput::peek_commit(payload).map(|c| c.commit_time.micros()),
        }
    }

    /// The commit time as a `SystemTime`.
    pub fn commit_time(&self) -> Option<std::time::SystemTime> {
        self.commit_time_us.map(pg_time_to_system_time)
    }
}

/// Converts PostgreSQL's microseconds since 2000-01-01 UTC to a `SystemTime`.
pub fn pg_time_to_system_time(us: i64) -> std::time::SystemTime {
    const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;
    let epoch = std::time::UNIX_EPOCH + std::time::Duration::from_secs(PG_EPOCH_UNIX_SECS);
    if us >= 0 {
        epoch + std::time::Duration::from_micros(us as u64)
    } else {
        epoch - std::time::Duration::from_micros(us.unsigned_abs())
    }
}

/// Transaction bookkeeping while walking records in log order.
#[derive(Clone, Debug, Default)]
pub(crate) struct TxnState {
    pub in_txn: bool,
    pub txn_begin: Pos,
    pub last_commit: Option<CommitInfo>,
    /// Position just after the last commit record seen.
    pub after_commit: Option<Pos>,
    pub commits: u64,
    /// Position just after the last record that left the log outside a transaction.
    pub idle_end: Pos,
}

impl TxnState {
    pub fn idle_at(pos: Pos) -> TxnState {
        TxnState {
            idle_end: pos,
            ..TxnState::default()
        }
    }

    /// Accounts for `rec`; an error string if the order is impossible.
    pub fn apply(&mut self, rec: &Record) -> std::result::Result<(), String> {
        let end = Pos::new(rec.pos.seq, rec.end_offset());
        match rec.kind {
            format::tag::BEGIN if !rec.preamble => {
                if self.in_txn {
                    return Err("begin record inside a transaction".into());
                }
                self.in_txn = true;
                self.txn_begin = rec.pos;
            }
            format::tag::COMMIT if !rec.preamble => {
                if !self.in_txn {
                    return Err("commit record outside a transaction".into());
                }
                self.in_txn = false;
                self.commits += 1;
                self.last_commit = Some(CommitInfo::from_record(rec.lsn, &rec.payload));
                self.after_commit = Some(end);
            }
            _ => {}
        }
        if !self.in_txn {
            self.idle_end = end;
        }
        Ok(())
    }
}
