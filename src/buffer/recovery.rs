//! Recovery when a writer opens an existing buffer: validate every segment header, scan the last
//! segment, truncate a torn tail, cut an incomplete trailing transaction (the source sends it
//! again from the durable LSN), and rebuild what the writer needs to continue (relation
//! preamble, last commit, transaction count). Corruption that is not a torn tail is an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::{BufferError, HINT_RESTORE, HINT_TAIL, Result};
use super::format::{self, HEADER_LEN, Pos, SegmentHeader};
use super::segment::{
    self, CommitInfo, Cursor, SegmentFile, Step, TxnState, is_torn_creation, read_header,
    require_header,
};
use super::{BufferConfig, RecoveryMode};
use crate::lsn::Lsn;

/// Latest `R`/`Y` payload per (tag, object id), with its LSN.
pub(crate) type Relations = BTreeMap<(u8, u32), (Lsn, Vec<u8>)>;

/// What opening a buffer found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecoveryReport {
    /// The directory held no segment; a new buffer was started.
    pub created: bool,
    /// Segment files after recovery.
    pub segments: usize,
    /// End LSN of the last commit on disk: where capture resumes.
    pub durable_lsn: Lsn,
    /// The last commit on disk, if any.
    pub last_commit: Option<CommitInfo>,
    /// A torn write at the end of the last segment that was truncated.
    pub torn_tail: Option<TornTail>,
    /// A transaction without its commit at the end of the log that was cut off.
    pub incomplete_txn: Option<CutTransaction>,
    /// Segment files removed (a torn segment creation, or segments holding only the tail of
    /// the cut transaction).
    pub removed_segments: Vec<PathBuf>,
}

impl RecoveryReport {
    /// True when recovery changed nothing on disk.
    pub fn is_clean(&self) -> bool {
        self.torn_tail.is_none()
            && self.incomplete_txn.is_none()
            && self.removed_segments.is_empty()
    }
}

/// A truncated torn tail.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TornTail {
    pub segment: PathBuf,
    pub offset: u64,
    pub bytes_dropped: u64,
    pub reason: String,
}

/// An incomplete trailing transaction that was cut off.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CutTransaction {
    /// Segment and offset of its `B` record, where the log now ends.
    pub segment: PathBuf,
    pub offset: u64,
    /// LSN of its `B` record.
    pub begin_lsn: Lsn,
    pub bytes_dropped: u64,
}

/// The writer's starting point after recovery.
pub(crate) struct Recovered {
    pub seq: u64,
    pub seg_len: u64,
    pub seg_has_records: bool,
    pub header: SegmentHeader,
    pub state: TxnState,
    pub relations: Relations,
}

pub(crate) fn recover(
    dir: &Path,
    config: &BufferConfig,
    report: &mut RecoveryReport,
) -> Result<Option<Recovered>> {
    let fs = config.fs.as_ref();
    loop {
        let segs = segment::list_segments(dir)?;
        let Some(last) = segs.last().cloned() else {
            return Ok(None);
        };
        for s in &segs[..segs.len() - 1] {
            require_header(s)?;
        }
        let header = match read_header(&last.path)? {
            Ok(h) if h.seq == last.seq => h,
            Err(e) if is_torn_creation(&last.path)? => {
                tracing::warn!(
                    segment = %last.path.display(),
                    "removing segment whose creation was interrupted ({e})"
                );
                fs.remove_file(&last.path)
                    .map_err(|e| BufferError::io("remove", &last.path, e))?;
                fs.sync_dir(dir)
                    .map_err(|e| BufferError::io("sync directory", dir, e))?;
                report.removed_segments.push(last.path.clone());
                continue;
            }
            _ => {
                require_header(&last)?;
                unreachable!("require_header fails on an invalid header");
            }
        };
        let scan = scan_last(&last, &header, config.recovery)?;
        let cut = if scan.state.in_txn {
            scan.state.txn_begin
        } else {
            Pos::new(last.seq, scan.valid_end)
        };
        let last_len = segment::file_len(&last.path)?;
        if let Some((offset, reason)) = &scan.damage {
            tracing::warn!(
                segment = %last.path.display(),
                offset,
                bytes = last_len - offset,
                "truncating torn tail of the last buffer segment: {reason}"
            );
            report.torn_tail = Some(TornTail {
                segment: last.path.clone(),
                offset: *offset,
                bytes_dropped: last_len - offset,
                reason: reason.clone(),
            });
        }
        if cut == Pos::new(last.seq, last_len) {
            return Ok(Some(Recovered {
                seq: last.seq,
                seg_len: last_len,
                seg_has_records: scan.has_records,
                header,
                state: scan.state,
                relations: scan.relations,
            }));
        }
        let cut_seg =
            segs.iter()
                .find(|s| s.seq == cut.seq)
                .ok_or_else(|| BufferError::MissingSegment {
                    dir: dir.to_path_buf(),
                    name: format::segment_file_name(cut.seq),
                })?;
        if scan.state.in_txn {
            let mut dropped = segment::file_len(&cut_seg.path)?.saturating_sub(cut.offset);
            for s in segs.iter().filter(|s| s.seq > cut.seq) {
                dropped += segment::file_len(&s.path)?;
            }
            let begin_lsn = begin_lsn_at(cut_seg, cut.offset)?;
            tracing::warn!(
                segment = %cut_seg.path.display(),
                offset = cut.offset,
                %begin_lsn,
                bytes = dropped,
                "cutting incomplete trailing transaction; the source sends it again from the durable LSN"
            );
            report.incomplete_txn = Some(CutTransaction {
                segment: cut_seg.path.clone(),
                offset: cut.offset,
                begin_lsn,
                bytes_dropped: dropped,
            });
        }
        for s in segs.iter().rev().filter(|s| s.seq > cut.seq) {
            fs.remove_file(&s.path)
                .map_err(|e| BufferError::io("remove", &s.path, e))?;
            report.removed_segments.push(s.path.clone());
        }
        fs.truncate(&cut_seg.path, cut.offset)
            .map_err(|e| BufferError::io("truncate", &cut_seg.path, e))?;
        fs.sync_dir(dir)
            .map_err(|e| BufferError::io("sync directory", dir, e))?;
        // Scan again from the new end so the relation preamble and counters match it.
    }
}

struct LastScan {
    state: TxnState,
    relations: Relations,
    valid_end: u64,
    has_records: bool,
    damage: Option<(u64, String)>,
}

fn scan_last(last: &SegmentFile, header: &SegmentHeader, mode: RecoveryMode) -> Result<LastScan> {
    let mut state = TxnState {
        in_txn: header.in_txn,
        txn_begin: header.txn_begin,
        last_commit: (!header.prev_commit_end.is_zero()).then_some(CommitInfo {
            end_lsn: header.prev_commit_end,
            commit_time_us: None,
        }),
        after_commit: None,
        commits: header.commits_before,
        idle_end: Pos::new(last.seq, HEADER_LEN as u64),
    };
    let mut relations = Relations::new();
    let mut has_records = false;
    let mut cursor = Cursor::open(last.clone(), HEADER_LEN as u64)?;
    loop {
        match cursor.next_step()? {
            Step::Record(r) => {
                state.apply(&r).map_err(|reason| {
                    BufferError::corrupt(&last.path, r.pos.offset, reason, HINT_RESTORE)
                })?;
                has_records |= !r.preamble;
                if matches!(r.kind, format::tag::RELATION | format::tag::TYPE)
                    && let Some(oid) = format::object_id(&r.payload)
                {
                    relations.insert((r.kind, oid), (r.lsn, r.payload.to_vec()));
                }
            }
            Step::End { offset } => {
                return Ok(LastScan {
                    state,
                    relations,
                    valid_end: offset,
                    has_records,
                    damage: None,
                });
            }
            Step::Damaged { offset, reason } => {
                if mode == RecoveryMode::Strict && cursor.valid_record_after(offset)? {
                    return Err(BufferError::corrupt(&last.path, offset, reason, HINT_TAIL));
                }
                return Ok(LastScan {
                    state,
                    relations,
                    valid_end: offset,
                    has_records,
                    damage: Some((offset, reason)),
                });
            }
        }
    }
}

fn begin_lsn_at(seg: &SegmentFile, offset: u64) -> Result<Lsn> {
    match Cursor::open(seg.clone(), offset)?.next_step()? {
        Step::Record(r) => Ok(r.lsn),
        _ => Err(BufferError::corrupt(
            &seg.path,
            offset,
            "the segment headers point at a begin record that is not there",
            HINT_RESTORE,
        )),
    }
}
