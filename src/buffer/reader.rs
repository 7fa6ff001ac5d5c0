//! Read-only access to a buffer, also while another process appends to it.
//!
//! A reader sees the log up to its *visible end*: the position after the last record that
//! leaves the log outside a transaction (after a commit, or after a non-transactional record).
//! Everything before it is complete and checksummed, so a reader never hands out half a
//! transaction. [`RecordIter::refresh`] moves the visible end forward (follow mode).
//!
//! Starting at an LSN does not scan the whole buffer: segment headers record the end LSN of the
//! last commit before the segment and where that commit ends, which picks the first segment to
//! read; from there the reader delivers only relation and type records (the segment's preamble
//! and originals) until it passes the last commit at or before the requested LSN.

use std::path::{Path, PathBuf};

use super::error::{BufferError, HINT_RESTORE, HINT_TAIL, Result};
use super::format::{HEADER_LEN, HeaderError, Pos, SegmentHeader, tag};
use super::meta::BufferMeta;
use super::segment::{
    CommitInfo, Cursor, Record, SegmentFile, Step, TxnState, file_len, list_segments, read_header,
    require_header, segment_path,
};
use crate::lsn::Lsn;

/// A read-only handle on a buffer directory.
#[derive(Clone, Debug)]
pub struct BufferReader {
    dir: PathBuf,
}

/// A segment with its header, as found by a reader.
struct Seg {
    file: SegmentFile,
    header: SegmentHeader,
}

impl BufferReader {
    /// Opens `dir` for reading. Takes no lock and changes nothing.
    pub fn open(dir: impl AsRef<Path>) -> Result<BufferReader> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::metadata(&dir).map_err(|e| BufferError::io("open buffer directory", &dir, e))?;
        Ok(BufferReader { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The buffer's `buffer.json`, if it has one.
    pub fn meta(&self) -> Result<Option<BufferMeta>> {
        BufferMeta::read(&self.dir)
    }

    /// Segments with valid headers. The last segment may be mid-creation (shorter than a
    /// header); it is left out. Any other bad header is corruption.
    fn segments(&self) -> Result<Vec<Seg>> {
        let files = list_segments(&self.dir)?;
        let n = files.len();
        let mut out = Vec::with_capacity(n);
        for (i, file) in files.into_iter().enumerate() {
            if i + 1 == n
                && let Err(HeaderError::TooShort(_)) = read_header(&file.path)?
            {
                break;
            }
            let header = require_header(&file)?;
            out.push(Seg { file, header });
        }
        Ok(out)
    }

    /// All records in log order for the transactions ending after `after`, and the
    /// non-transactional records after the last commit at or before it. Relation and type
    /// records from before that point (the starting segment's preamble and originals) come
    /// first, so a consumer can build its relation cache.
    pub fn records_from(&self, after: Lsn) -> Result<RecordIter> {
        let segs = self.segments()?;
        let (Some(first), Some(last)) = (segs.first(), segs.last()) else {
            return Ok(RecordIter::empty(&self.dir));
        };
        let visible = scan_forward(&self.dir, normalize(last.header.resume))?;
        let limit = visible.idle_end;

        let Some(m) = segs.iter().rposition(|s| s.header.prev_commit_end <= after) else {
            return Err(self.pruned(after, &segs));
        };
        let resume = segs[m].header.resume;
        if resume.seq < first.file.seq {
            return Err(self.pruned(after, &segs));
        }
        let from = normalize(resume);
        let mut start = from;
        let mut probe = RecordIter::new(&self.dir, from, from, limit);
        for rec in probe.by_ref() {
            let rec = rec?;
            if rec.kind == tag::COMMIT && !rec.preamble {
                if rec.lsn > after {
                    break;
                }
                start = Pos::new(rec.pos.seq, rec.end_offset());
            }
        }
        Ok(RecordIter::new(
            &self.dir,
            Pos::new(from.seq, HEADER_LEN as u64),
            start,
            limit,
        ))
    }

    /// Streaming form: the records of [`records_from`](Self::records_from) marked with
    /// transaction boundaries. Only complete transactions are visible, and none is held in
    /// memory.
    pub fn transactions_from(&self, after: Lsn) -> Result<TxnIter> {
        Ok(TxnIter {
            records: self.records_from(after)?,
            in_txn: false,
        })
    }

    /// Collected form, for small uses such as `inspect`: up to `max_transactions` transactions
    /// ending after `after`, with the records outside transactions around them.
    pub fn collect_transactions(
        &self,
        after: Lsn,
        max_transactions: usize,
    ) -> Result<Vec<TxnItem>> {
        let mut out = Vec::new();
        let mut open: Option<(Record, Vec<Record>)> = None;
        let mut count = 0;
        if max_transactions == 0 {
            return Ok(out);
        }
        for ev in self.transactions_from(after)? {
            match ev? {
                TxnEvent::Standalone(r) => out.push(TxnItem::Standalone(r)),
                TxnEvent::Begin(r) => open = Some((r, Vec::new())),
                TxnEvent::Change(r) => {
                    if let Some((_, changes)) = open.as_mut() {
                        changes.push(r);
                    }
                }
                TxnEvent::Commit { record, commit } => {
                    if let Some((begin, changes)) = open.take() {
                        out.push(TxnItem::Transaction(Transaction {
                            begin,
                            changes,
                            commit: record,
                            info: commit,
                        }));
                        count += 1;
                        if count == max_transactions {
                            break;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Segments, sizes, first and last commit, transaction count.
    pub fn status(&self) -> Result<BufferStatus> {
        let segs = self.segments()?;
        let mut status = BufferStatus {
            dir: self.dir.clone(),
            meta: self.meta()?,
            confirmed: super::SlotProgress::read(&self.dir)?,
            ..BufferStatus::default()
        };
        let (Some(first), Some(last)) = (segs.first(), segs.last()) else {
            return Ok(status);
        };
        status.segments = segs.len();
        status.first_segment = Some(first.file.path.clone());
        status.last_segment = Some(last.file.path.clone());
        for s in &segs {
            status.total_bytes += file_len(&s.file.path)?;
        }
        let visible = scan_forward(&self.dir, normalize(last.header.resume))?;
        status.transactions = (last.header.commits_before + visible.commits)
            .saturating_sub(first.header.commits_before);
        status.last_commit = visible.last_commit.or_else(|| {
            (!last.header.prev_commit_end.is_zero()).then_some(CommitInfo {
                end_lsn: last.header.prev_commit_end,
                commit_time_us: None,
            })
        });
        status.earliest_start = segs
            .iter()
            .filter(|s| s.header.resume.seq >= first.file.seq)
            .map(|s| s.header.prev_commit_end)
            .min()
            .unwrap_or_default();
        let start = Pos::new(first.file.seq, HEADER_LEN as u64);
        for rec in RecordIter::new(&self.dir, start, start, visible.idle_end) {
            let rec = rec?;
            if rec.kind == tag::COMMIT && !rec.preamble {
                status.first_commit_lsn = Some(rec.lsn);
                break;
            }
        }
        Ok(status)
    }

    /// The last complete commit from `from` (a position outside any transaction: what the
    /// previous call returned, or `None` to start at the last segment) to the end of the log,
    /// and where the next call may start. Follows a growing buffer at the cost of reading only
    /// what was appended since (where [`status`](Self::status) rereads the last segment).
    pub fn last_commit_since(&self, from: Option<Pos>) -> Result<(Option<CommitInfo>, Pos)> {
        let start = match from {
            Some(p) if segment_path(&self.dir, p.seq).exists() => p,
            _ => {
                let segs = self.segments()?;
                let Some(last) = segs.last() else {
                    return Ok((None, Pos::new(0, HEADER_LEN as u64)));
                };
                last.header.resume
            }
        };
        let state = scan_forward(&self.dir, normalize(start))?;
        Ok((state.last_commit, state.idle_end))
    }

    fn pruned(&self, requested: Lsn, segs: &[Seg]) -> BufferError {
        let first = segs.first().map(|s| s.file.seq).unwrap_or(0);
        BufferError::Pruned {
            dir: self.dir.clone(),
            requested,
            earliest: segs
                .iter()
                .filter(|s| s.header.resume.seq >= first)
                .map(|s| s.header.prev_commit_end)
                .min()
                .unwrap_or_default(),
        }
    }
}

/// Summary of a buffer for `walshift status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BufferStatus {
    pub dir: PathBuf,
    pub meta: Option<BufferMeta>,
    pub segments: usize,
    pub first_segment: Option<PathBuf>,
    pub last_segment: Option<PathBuf>,
    pub total_bytes: u64,
    /// End LSN of the first commit in the buffer.
    pub first_commit_lsn: Option<Lsn>,
    /// The last complete commit (its time is unknown when its record lies in a pruned or
    /// earlier segment than the scan covers).
    pub last_commit: Option<CommitInfo>,
    /// Complete transactions in the buffer.
    pub transactions: u64,
    /// The smallest LSN `records_from` / `transactions_from` accept (retention).
    pub earliest_start: Lsn,
    /// What capture recorded as confirmed to the slot (`confirmed.json`), if anything.
    pub confirmed: Option<super::SlotProgress>,
}

fn normalize(p: Pos) -> Pos {
    Pos::new(p.seq, p.offset.max(HEADER_LEN as u64))
}

/// Walks valid records from `from` (a position outside any transaction) to the current end
/// of the log. A partial or damaged record at the very end of the last segment is where the
/// writer is (or was, if it crashed) and ends the walk; damage anywhere else is an error.
fn scan_forward(dir: &Path, from: Pos) -> Result<TxnState> {
    let mut state = TxnState::idle_at(from);
    let mut seq = from.seq;
    let mut offset = from.offset;
    loop {
        let path = segment_path(dir, seq);
        if seq != from.seq {
            if !path.exists() {
                return Ok(state);
            }
            match read_header(&path)? {
                Ok(h) if h.seq == seq => {}
                Err(HeaderError::TooShort(_)) if !has_successor(dir, seq) => return Ok(state),
                _ => {
                    require_header(&SegmentFile {
                        seq,
                        path: path.clone(),
                    })?;
                }
            }
        }
        let seg = SegmentFile {
            seq,
            path: path.clone(),
        };
        let mut cur = Cursor::open(seg, offset)?;
        let mut successor_seen = false;
        loop {
            match cur.next_step()? {
                Step::Record(r) => state.apply(&r).map_err(|reason| {
                    BufferError::corrupt(&path, r.pos.offset, reason, HINT_RESTORE)
                })?,
                Step::End { .. } => {
                    if successor_seen {
                        break;
                    }
                    if has_successor(dir, seq) {
                        // Re-read: bytes written before the successor was created count.
                        successor_seen = true;
                        continue;
                    }
                    return Ok(state);
                }
                Step::Damaged { offset, reason } => {
                    if successor_seen {
                        return Err(BufferError::corrupt(&path, offset, reason, HINT_RESTORE));
                    }
                    if has_successor(dir, seq) {
                        successor_seen = true;
                        continue;
                    }
                    if cur.valid_record_after(offset)? {
                        return Err(BufferError::corrupt(&path, offset, reason, HINT_TAIL));
                    }
                    tracing::debug!(
                        segment = %path.display(),
                        offset,
                        "buffer ends in an incomplete record ({reason}): a write in progress or a torn tail"
                    );
                    return Ok(state);
                }
            }
        }
        seq += 1;
        offset = HEADER_LEN as u64;
    }
}

fn has_successor(dir: &Path, seq: u64) -> bool {
    segment_path(dir, seq + 1).exists()
}

/// Records in log order up to the visible end. See [`BufferReader::records_from`].
pub struct RecordIter {
    dir: PathBuf,
    /// Records before this position are delivered only if they are relation or type records.
    start: Pos,
    limit: Pos,
    pos: Pos,
    cursor: Option<Cursor>,
    failed: bool,
}

impl RecordIter {
    fn new(dir: &Path, read_from: Pos, start: Pos, limit: Pos) -> RecordIter {
        RecordIter {
            dir: dir.to_path_buf(),
            start,
            limit,
            pos: read_from,
            cursor: None,
            failed: false,
        }
    }

    fn empty(dir: &Path) -> RecordIter {
        RecordIter::new(dir, Pos::default(), Pos::default(), Pos::default())
    }

    /// Follow mode: extends the visible end to what has been appended since. Returns true if
    /// there is more to read.
    pub fn refresh(&mut self) -> Result<bool> {
        if self.limit == Pos::default() {
            let segs = BufferReader::open(&self.dir)?.segments()?;
            let Some(first) = segs.first() else {
                return Ok(false);
            };
            let p = Pos::new(first.file.seq, HEADER_LEN as u64);
            (self.start, self.pos, self.limit) = (p, p, p);
        }
        let state = scan_forward(&self.dir, self.limit)?;
        let moved = state.idle_end > self.limit;
        self.limit = state.idle_end;
        Ok(moved)
    }

    /// Position of the next record to read.
    pub fn position(&self) -> Pos {
        self.pos
    }

    fn step(&mut self) -> Result<Option<Record>> {
        loop {
            if self.pos >= self.limit {
                return Ok(None);
            }
            let cursor = match self.cursor.as_mut() {
                Some(c) if c.seg.seq == self.pos.seq => c,
                _ => {
                    let path = segment_path(&self.dir, self.pos.seq);
                    if !path.exists() {
                        return Err(BufferError::MissingSegment {
                            dir: self.dir.clone(),
                            name: super::format::segment_file_name(self.pos.seq),
                        });
                    }
                    let seg = SegmentFile {
                        seq: self.pos.seq,
                        path,
                    };
                    self.cursor.insert(Cursor::open(seg, self.pos.offset)?)
                }
            };
            match cursor.next_step()? {
                Step::Record(r) => {
                    self.pos = Pos::new(r.pos.seq, r.end_offset());
                    if r.pos < self.start && !matches!(r.kind, tag::RELATION | tag::TYPE) {
                        continue;
                    }
                    return Ok(Some(r));
                }
                Step::End { offset } => {
                    if self.pos.seq < self.limit.seq {
                        self.pos = Pos::new(self.pos.seq + 1, HEADER_LEN as u64);
                        continue;
                    }
                    return Err(BufferError::corrupt(
                        &cursor.seg.path,
                        offset,
                        "segment ends before data a reader already validated (was it truncated or replaced concurrently?)",
                        HINT_RESTORE,
                    ));
                }
                Step::Damaged { offset, reason } => {
                    return Err(BufferError::corrupt(
                        &cursor.seg.path,
                        offset,
                        reason,
                        HINT_RESTORE,
                    ));
                }
            }
        }
    }
}

impl Iterator for RecordIter {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(r) => r.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// A record with its place in the transaction structure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnEvent {
    /// A `B` record: a transaction starts.
    Begin(Record),
    /// Any record inside a transaction (including `R`/`Y`, and preamble copies when a segment
    /// starts inside the transaction).
    Change(Record),
    /// A `C` record: the transaction is complete.
    Commit { record: Record, commit: CommitInfo },
    /// A record outside any transaction: relation/type records before the start position or
    /// in a preamble, non-transactional logical messages.
    Standalone(Record),
}

/// Streaming transactions. See [`BufferReader::transactions_from`].
pub struct TxnIter {
    records: RecordIter,
    in_txn: bool,
}

impl TxnIter {
    /// Follow mode: see [`RecordIter::refresh`].
    pub fn refresh(&mut self) -> Result<bool> {
        self.records.refresh()
    }

    pub fn position(&self) -> Pos {
        self.records.position()
    }
}

impl Iterator for TxnIter {
    type Item = Result<TxnEvent>;

    fn next(&mut self) -> Option<Self::Item> {
        let rec = match self.records.next()? {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        let ev = match rec.kind {
            tag::BEGIN if !rec.preamble => {
                self.in_txn = true;
                TxnEvent::Begin(rec)
            }
            tag::COMMIT if !rec.preamble => {
                self.in_txn = false;
                let commit = CommitInfo::from_record(rec.lsn, &rec.payload);
                TxnEvent::Commit {
                    record: rec,
                    commit,
                }
            }
            _ if self.in_txn => TxnEvent::Change(rec),
            _ => TxnEvent::Standalone(rec),
        };
        Some(Ok(ev))
    }
}

/// A complete transaction, collected in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    pub begin: Record,
    /// Records between `begin` and `commit`.
    pub changes: Vec<Record>,
    pub commit: Record,
    pub info: CommitInfo,
}

/// An item of [`BufferReader::collect_transactions`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnItem {
    Transaction(Transaction),
    Standalone(Record),
}
