//! Durable buffer: round trips across segments, crash and corruption paths, failed fsync,
//! retention, reading from the middle.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::capture::segments;
use proptest::prelude::*;
use walshift::Lsn;
use walshift::buffer::format::{HEADER_LEN, segment_file_name};
use walshift::buffer::fs::FailpointFs;
use walshift::buffer::{
    self, BufferConfig, BufferError, BufferReader, BufferWriter, RecoveryMode, TxnEvent, TxnItem,
};

fn begin(xid: u32) -> Vec<u8> {
    let mut p = vec![b'B'];
    p.extend_from_slice(&0u64.to_be_bytes());
    p.extend_from_slice(&0i64.to_be_bytes());
    p.extend_from_slice(&xid.to_be_bytes());
    p
}

fn commit(end: u64, ts: i64) -> Vec<u8> {
    let mut p = vec![b'C', 0];
    p.extend_from_slice(&(end - 8).to_be_bytes());
    p.extend_from_slice(&end.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p
}

fn relation(relid: u32, version: u8) -> Vec<u8> {
    let mut p = vec![b'R'];
    p.extend_from_slice(&relid.to_be_bytes());
    p.extend_from_slice(b"public\0accounts\0");
    p.push(version);
    p
}

fn insert(relid: u32, n: usize, fill: u8) -> Vec<u8> {
    let mut p = vec![b'I'];
    p.extend_from_slice(&relid.to_be_bytes());
    p.resize(5 + n, fill);
    p
}

/// An appended record, as the test expects to read it back.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rec {
    lsn: u64,
    kind: u8,
    payload: Vec<u8>,
}

/// A transaction of `rows` inserts (optionally preceded by a relation message) with end LSN
/// `end`.
fn txn(end: u64, rows: &[usize], with_relation: Option<(u32, u8)>) -> Vec<Rec> {
    let mut v = vec![Rec {
        lsn: end - 100,
        kind: b'B',
        payload: begin(end as u32),
    }];
    let relid = with_relation.map(|r| r.0).unwrap_or(16384);
    if let Some((relid, ver)) = with_relation {
        v.push(Rec {
            lsn: end - 90,
            kind: b'R',
            payload: relation(relid, ver),
        });
    }
    for (i, &n) in rows.iter().enumerate() {
        v.push(Rec {
            lsn: end - 80 + i as u64,
            kind: b'I',
            payload: insert(relid, n, i as u8),
        });
    }
    v.push(Rec {
        lsn: end,
        kind: b'C',
        payload: commit(end, end as i64 * 10),
    });
    v
}

fn cfg(segment: u64) -> BufferConfig {
    BufferConfig::default().with_segment_size(segment)
}

fn write_all(w: &mut BufferWriter, recs: &[Rec]) {
    for r in recs {
        w.append(Lsn(r.lsn), r.kind, &r.payload).unwrap();
    }
}

fn read_back(dir: &Path, after: u64) -> Vec<Rec> {
    BufferReader::open(dir)
        .unwrap()
        .records_from(Lsn(after))
        .unwrap()
        .map(|r| r.unwrap())
        .filter(|r| !r.preamble)
        .map(|r| Rec {
            lsn: r.lsn.0,
            kind: r.kind,
            payload: r.payload.to_vec(),
        })
        .collect()
}

/// 40 transactions of 3 rows, end LSNs 1000, 2000, …, relation 16384 in the first.
fn workload(n: u64) -> Vec<Vec<Rec>> {
    (1..=n)
        .map(|i| txn(i * 1000, &[60, 60, 60], (i == 1).then_some((16384, 1))))
        .collect()
}

#[test]
fn roundtrip_across_segments_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let txns = workload(40);
    let (mut w, report) = BufferWriter::open(dir.path(), cfg(1024)).unwrap();
    assert!(report.created);
    for (i, t) in txns.iter().enumerate() {
        write_all(&mut w, t);
        if i % 7 == 0 {
            assert_eq!(w.flush().unwrap(), Lsn((i as u64 + 1) * 1000));
        }
    }
    assert_eq!(w.close().unwrap(), Lsn(40_000));
    assert!(segments(dir.path()).len() > 5);
    let all: Vec<Rec> = txns.concat();
    assert_eq!(read_back(dir.path(), 0), all);

    let (mut w, report) = BufferWriter::open(dir.path(), cfg(1024)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.durable_lsn, Lsn(40_000));
    assert_eq!(w.last_commit().unwrap().commit_time_us, Some(400_000));
    let more = txn(41_000, &[10], None);
    write_all(&mut w, &more);
    w.close().unwrap();
    assert_eq!(read_back(dir.path(), 0), [all, more].concat());

    let st = buffer::status(dir.path()).unwrap();
    assert_eq!(st.transactions, 41);
    assert_eq!(st.first_commit_lsn, Some(Lsn(1000)));
    assert_eq!(st.last_commit.unwrap().end_lsn, Lsn(41_000));
}

#[test]
fn reader_from_the_middle_gets_relations_and_later_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let txns = workload(40);
    let (mut w, _) = BufferWriter::open(dir.path(), cfg(1024)).unwrap();
    for t in &txns {
        write_all(&mut w, t);
    }
    w.close().unwrap();

    for after in [0u64, 999, 1000, 17_000, 17_500, 39_999, 40_000, 50_000] {
        let items = BufferReader::open(dir.path())
            .unwrap()
            .collect_transactions(Lsn(after), usize::MAX)
            .unwrap();
        let ends: Vec<u64> = items
            .iter()
            .filter_map(|i| match i {
                TxnItem::Transaction(t) => Some(t.info.end_lsn.0),
                _ => None,
            })
            .collect();
        let expected: Vec<u64> = (1..=40).map(|i| i * 1000).filter(|&e| e > after).collect();
        assert_eq!(ends, expected, "after {after}");
        if (1000..40_000).contains(&after) {
            // The relation (sent once, in the first transaction) reaches the reader first.
            match &items[0] {
                TxnItem::Standalone(r) => {
                    assert_eq!(r.kind, b'R');
                    assert_eq!(&r.payload[..], &relation(16384, 1)[..]);
                }
                other => panic!("expected the relation first, got {other:?}"),
            }
        }
    }
}

#[test]
fn torn_tail_is_truncated_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = BufferWriter::open(dir.path(), cfg(1 << 20)).unwrap();
    for t in workload(5) {
        write_all(&mut w, &t);
    }
    w.close().unwrap();
    let seg = segments(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    // Half a record of a sixth transaction, as a crash mid-write leaves it.
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    use std::io::Write;
    f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 5]).unwrap();
    drop(f);

    let (w, report) = BufferWriter::open(dir.path(), cfg(1 << 20)).unwrap();
    let torn = report.torn_tail.clone().expect("torn tail reported");
    assert_eq!(
        (torn.segment.clone(), torn.offset, torn.bytes_dropped),
        (seg.clone(), len, 9)
    );
    assert_eq!(report.durable_lsn, Lsn(5000));
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len);
    drop(w);
    assert_eq!(read_back(dir.path(), 0), workload(5).concat());
}

#[test]
fn bad_checksum_on_last_record_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = BufferWriter::open(dir.path(), cfg(1 << 20)).unwrap();
    for t in workload(3) {
        write_all(&mut w, &t);
    }
    w.close().unwrap();
    let seg = segments(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0xff; // inside the last commit's payload
    std::fs::write(&seg, &bytes).unwrap();
    let (_w, report) = BufferWriter::open(dir.path(), cfg(1 << 20)).unwrap();
    assert!(report.torn_tail.is_some());
    // The third transaction lost its commit, so it is cut as well.
    assert!(report.incomplete_txn.is_some());
    assert_eq!(report.durable_lsn, Lsn(2000));
}

#[test]
fn flipped_byte_mid_segment_names_segment_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = BufferWriter::open(dir.path(), cfg(1024)).unwrap();
    for t in workload(30) {
        write_all(&mut w, &t);
    }
    w.close().unwrap();
    let segs = segments(dir.path());
    let victim = &segs[1];
    let mut bytes = std::fs::read(victim).unwrap();
    let off = HEADER_LEN + 200;
    bytes[off] ^= 0x01;
    std::fs::write(victim, &bytes).unwrap();

    let err = BufferReader::open(dir.path())
        .unwrap()
        .records_from(Lsn(0))
        .unwrap()
        .find_map(|r| r.err())
        .expect("corruption reported");
    let (seg, at) = err.corrupt_location().expect("corruption error");
    assert_eq!(seg, victim.as_path());
    assert!(at <= off as u64 && at >= HEADER_LEN as u64, "{at}");
    let msg = err.to_string();
    assert!(
        msg.contains(&segment_file_name(2)) && msg.contains(&format!("offset {at}")),
        "{msg}"
    );

    // Same damage in the last segment, followed by valid records: the writer refuses to open.
    let last = segs.last().unwrap();
    let mut bytes = std::fs::read(last).unwrap();
    bytes[HEADER_LEN + 100] ^= 0x01;
    std::fs::write(last, &bytes).unwrap();
    let err = BufferWriter::open(dir.path(), cfg(1024)).unwrap_err();
    assert_eq!(err.corrupt_location().unwrap().0, last.as_path());
    assert!(err.to_string().contains("TruncateCorruptTail"), "{err}");

    // The operator can accept losing the tail explicitly.
    let (_w, report) = BufferWriter::open(
        dir.path(),
        cfg(1024).with_recovery(RecoveryMode::TruncateCorruptTail),
    )
    .unwrap();
    assert!(report.torn_tail.is_some());
}

#[test]
fn bad_header_in_earlier_segment_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = BufferWriter::open(dir.path(), cfg(1024)).unwrap();
    for t in workload(10) {
        write_all(&mut w, &t);
    }
    w.close().unwrap();
    let segs = segments(dir.path());
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    bytes[20] ^= 0x10;
    std::fs::write(&segs[0], &bytes).unwrap();
    let err = BufferWriter::open(dir.path(), cfg(1024)).unwrap_err();
    assert_eq!(err.corrupt_location(), Some((segs[0].as_path(), 0)));
}

#[test]
fn incomplete_trailing_transaction_spanning_segments_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = BufferWriter::open(dir.path(), cfg(1024)).unwrap();
    for t in workload(3) {
        write_all(&mut w, &t);
    }
    w.flush().unwrap();
    let before = segments(dir.path()).len();
    // A big transaction whose commit never arrives, spanning several segments.
    let big = txn(9000, &[200; 20], Some((16385, 1)));
    write_all(&mut w, &big[..big.len() - 1]);
    assert_eq!(w.flush().unwrap(), Lsn(3000));
    drop(w);
    assert!(segments(dir.path()).len() > before + 2);

    // Readers never see the incomplete transaction.
    assert_eq!(read_back(dir.path(), 0), workload(3).concat());

    let (mut w, report) = BufferWriter::open(dir.path(), cfg(1024)).unwrap();
    let cut = report.incomplete_txn.clone().expect("cut reported");
    assert_eq!(cut.begin_lsn, Lsn(8900));
    assert!(!report.removed_segments.is_empty());
    assert_eq!(report.durable_lsn, Lsn(3000));
    assert_eq!(segments(dir.path()).len(), before);
    // The server sends it again, complete this time.
    write_all(&mut w, &big);
    w.close().unwrap();
    assert_eq!(
        read_back(dir.path(), 0),
        [workload(3).concat(), big].concat()
    );
}

#[test]
fn failed_fsync_does_not_advance_durable_lsn_and_stops_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FailpointFs::new();
    let config = cfg(1 << 20).with_fs(Arc::new(fs.clone()));
    let (mut w, _) = BufferWriter::open(dir.path(), config.clone()).unwrap();
    let txns = workload(4);
    write_all(&mut w, &txns[0]);
    assert_eq!(w.flush().unwrap(), Lsn(1000));

    write_all(&mut w, &txns[1]);
    fs.fail_sync(true);
    let err = w.flush().unwrap_err();
    assert!(
        matches!(
            err,
            BufferError::WriteFailed {
                durable: Lsn(1000),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(w.durable_lsn(), Lsn(1000));
    fs.fail_sync(false);
    // No retry-and-pretend: the writer refuses more work until reopened.
    assert!(matches!(
        w.append(Lsn(2900), b'B', &begin(3)),
        Err(BufferError::WriteFailed { .. })
    ));
    assert!(w.flush().is_err());
    assert_eq!(w.durable_lsn(), Lsn(1000));
    drop(w);

    let (w, report) = BufferWriter::open(dir.path(), config).unwrap();
    assert!(report.durable_lsn >= Lsn(1000));
    drop(w);
}

#[test]
fn torn_write_then_reopen_recovers_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FailpointFs::new();
    let config = cfg(1 << 20).with_fs(Arc::new(fs.clone()));
    let (mut w, _) = BufferWriter::open(dir.path(), config.clone()).unwrap();
    let txns = workload(6);
    for t in &txns[..3] {
        write_all(&mut w, t);
    }
    w.flush().unwrap();
    for t in &txns[3..] {
        write_all(&mut w, t);
    }
    fs.tear_next_write(150);
    assert!(w.flush().is_err());
    assert_eq!(w.durable_lsn(), Lsn(3000));
    drop(w);
    let (_w, report) = BufferWriter::open(dir.path(), config).unwrap();
    assert_eq!(report.durable_lsn, Lsn(3000));
    assert!(report.torn_tail.is_some() || report.incomplete_txn.is_some());
    assert_eq!(read_back(dir.path(), 0), txns[..3].concat());
}

#[test]
fn second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_w, _) = BufferWriter::open(dir.path(), cfg(4096)).unwrap();
    assert!(matches!(
        BufferWriter::open(dir.path(), cfg(4096)),
        Err(BufferError::Locked { .. })
    ));
}

#[test]
fn out_of_order_records_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = BufferWriter::open(dir.path(), cfg(4096)).unwrap();
    write_all(&mut w, &txn(1000, &[5], None));
    assert!(matches!(
        w.append(Lsn(1), b'C', &commit(1000, 0)),
        Err(BufferError::Sequence { .. })
    ));
    w.append(Lsn(1100), b'B', &begin(1)).unwrap();
    assert!(matches!(
        w.append(Lsn(1100), b'B', &begin(1)),
        Err(BufferError::Sequence { .. })
    ));
    assert!(matches!(
        w.append(Lsn(1000), b'C', &commit(1000, 0)),
        Err(BufferError::Sequence { .. })
    ));
    assert!(matches!(
        w.append(Lsn(1100), b'I', b"U123"),
        Err(BufferError::InvalidRecord { .. })
    ));
}

#[test]
fn prune_keeps_what_is_needed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = BufferWriter::open(dir.path(), cfg(1024)).unwrap();
    let txns = workload(40);
    for t in &txns {
        write_all(&mut w, t);
    }
    w.close().unwrap();
    let n = segments(dir.path()).len();

    let report = buffer::prune(dir.path(), Lsn(20_000)).unwrap();
    assert!(!report.removed.is_empty());
    assert_eq!(report.remaining, n - report.removed.len());
    // Everything after the cut is still readable, with its relation metadata.
    let items = BufferReader::open(dir.path())
        .unwrap()
        .collect_transactions(Lsn(20_000), usize::MAX)
        .unwrap();
    let ends: Vec<u64> = items
        .iter()
        .filter_map(|i| match i {
            TxnItem::Transaction(t) => Some(t.info.end_lsn.0),
            _ => None,
        })
        .collect();
    assert_eq!(ends, (21..=40).map(|i| i * 1000).collect::<Vec<_>>());
    assert!(matches!(&items[0], TxnItem::Standalone(r) if r.kind == b'R'));
    // Asking for what was pruned is an error, not a silent gap.
    let err = BufferReader::open(dir.path())
        .unwrap()
        .records_from(Lsn(1000))
        .err()
        .expect("pruned");
    assert!(matches!(err, BufferError::Pruned { .. }), "{err}");
    let st = buffer::status(dir.path()).unwrap();
    assert!(st.earliest_start <= Lsn(20_000));

    // Pruning everything keeps the last segment.
    buffer::prune(dir.path(), Lsn(u64::MAX)).unwrap();
    assert!(!segments(dir.path()).is_empty());
    let (_w, report) = BufferWriter::open(dir.path(), cfg(1024)).unwrap();
    assert_eq!(report.durable_lsn, Lsn(40_000));
}

#[test]
fn prune_never_drops_the_start_of_an_open_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = BufferWriter::open(dir.path(), cfg(1024)).unwrap();
    write_all(&mut w, &txn(1000, &[5], Some((16384, 1))));
    let big = txn(5000, &[300; 10], None);
    write_all(&mut w, &big);
    w.close().unwrap();
    buffer::prune(dir.path(), Lsn(1000)).unwrap();
    let got = read_back(dir.path(), 1000);
    assert_eq!(got[0].kind, b'R');
    assert_eq!(&got[1..], &big[..]);
}

#[test]
fn follow_mode_sees_new_transactions_but_never_half_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = BufferWriter::open(dir.path(), cfg(1024)).unwrap();
    let txns = workload(6);
    write_all(&mut w, &txns[0]);
    w.flush().unwrap();
    let reader = BufferReader::open(dir.path()).unwrap();
    let mut it = reader.transactions_from(Lsn(0)).unwrap();
    let commits = |it: &mut walshift::buffer::TxnIter| {
        it.by_ref()
            .filter_map(|e| match e.unwrap() {
                TxnEvent::Commit { commit, .. } => Some(commit.end_lsn.0),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(commits(&mut it), vec![1000]);
    let t1 = &txns[1];
    write_all(&mut w, &t1[..t1.len() - 1]);
    w.flush().unwrap();
    it.refresh().unwrap();
    assert_eq!(commits(&mut it), Vec::<u64>::new());
    write_all(&mut w, &t1[t1.len() - 1..]);
    for t in &txns[2..] {
        write_all(&mut w, t);
    }
    w.flush().unwrap();
    assert!(it.refresh().unwrap());
    assert_eq!(commits(&mut it), vec![2000, 3000, 4000, 5000, 6000]);
}

#[test]
fn reader_sees_a_crashed_buffer_up_to_its_last_complete_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = BufferWriter::open(dir.path(), cfg(1 << 20)).unwrap();
    for t in workload(2) {
        write_all(&mut w, &t);
    }
    w.close().unwrap();
    let seg = segments(dir.path()).pop().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    use std::io::Write;
    f.write_all(&[200, 0, 0]).unwrap();
    drop(f);
    assert_eq!(read_back(dir.path(), 0), workload(2).concat());
}

#[derive(Clone, Debug)]
enum Op {
    Txn(Vec<usize>, bool),
    Message(usize),
    Flush,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            6 => (prop::collection::vec(1usize..400, 0..8), any::<bool>()).prop_map(|(r, rel)| Op::Txn(r, rel)),
            1 => (1usize..100).prop_map(Op::Message),
            2 => Just(Op::Flush),
        ],
        1..40,
    )
}

/// Writes `ops`; returns the records in order and the transaction boundaries (end LSN and
/// index just past the commit).
fn run_ops(dir: &Path, segment: u64, ops: &[Op]) -> (Vec<Rec>, Vec<(u64, usize)>) {
    let (mut w, _) = BufferWriter::open(dir, cfg(segment)).unwrap();
    let mut all = Vec::new();
    let mut bounds = Vec::new();
    let mut end = 0u64;
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Txn(rows, rel) => {
                end += 1000;
                let t = txn(end, rows, rel.then_some((16384 + (i as u32 % 3), i as u8)));
                write_all(&mut w, &t);
                all.extend(t);
                bounds.push((end, all.len()));
            }
            Op::Message(n) => {
                let mut p = vec![b'M', 0];
                p.resize(2 + n, b'm');
                let r = Rec {
                    lsn: end + 1,
                    kind: b'M',
                    payload: p,
                };
                write_all(&mut w, std::slice::from_ref(&r));
                all.push(r);
            }
            Op::Flush => {
                w.flush().unwrap();
            }
        }
    }
    w.close().unwrap();
    (all, bounds)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_read_back_identically(ops in ops(), segment in 300u64..3000) {
        let dir = tempfile::tempdir().unwrap();
        let (all, bounds) = run_ops(dir.path(), segment, &ops);
        prop_assert_eq!(read_back(dir.path(), 0), all.clone());
        // From any commit: exactly the records after it (plus relation records before it).
        if let Some(&(end, idx)) = bounds.get(bounds.len() / 2) {
            let got: Vec<Rec> = read_back(dir.path(), end);
            let tail: Vec<Rec> = got.iter().skip_while(|r| r.kind == b'R').cloned().collect();
            let expected: Vec<Rec> = all[idx..].to_vec();
            prop_assert_eq!(&tail, &expected);
            prop_assert_eq!(tail.iter().filter(|r| r.kind == b'C').count(), bounds.len() - bounds.len() / 2 - 1);
        }
    }

    #[test]
    fn random_truncation_recovers_a_prefix_of_complete_transactions(
        ops in ops(), segment in 300u64..3000, cut in any::<prop::sample::Index>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (all, bounds) = run_ops(dir.path(), segment, &ops);
        let last = segments(dir.path()).pop().unwrap();
        let len = std::fs::metadata(&last).unwrap().len();
        let new_len = cut.index(len as usize + 1) as u64;
        std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(new_len).unwrap();

        let (w, report) = BufferWriter::open(dir.path(), cfg(segment)).unwrap();
        let durable = report.durable_lsn.0;
        drop(w);
        let got = read_back(dir.path(), 0);
        prop_assert!(all.starts_with(&got), "not a prefix");
        // Every transaction up to the durable LSN survived, nothing after it did.
        let kept: Vec<u64> = got.iter().filter(|r| r.kind == b'C').map(|r| r.lsn).collect();
        let expected: Vec<u64> = bounds.iter().map(|b| b.0).filter(|&e| e <= durable).collect();
        prop_assert_eq!(kept, expected);
        prop_assert!(got.last().is_none_or(|r| r.kind != b'B' && r.kind != b'I'));
    }
}
