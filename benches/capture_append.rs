//! Capture's receive → append path without a socket: the bytes a walsender sends for workload
//! W (pgoutput in `CopyData`/XLogData frames) are fed in socket-read-sized chunks through the
//! same per-message work `walshift capture` does — the backend frame parser, the XLogData
//! parser, [`StreamState::handle`] (classification, then [`BufferWriter::append`]) — into a
//! buffer in a temporary directory, with the stream loop's flush timing (a group handed to the
//! sync thread every [`DEFAULT_FLUSH_INTERVAL`], checked every half interval) and a final
//! flush. Criterion reports messages/s (one change is 1.2 messages in W: a Begin and a Commit
//! per 10 changes).
//!
//! - `parse_only`: frames → events, nothing appended (the receive side alone);
//! - `append_nosync`: the whole path, the buffer's fdatasync and directory fsync replaced by
//!   no-ops (what the path costs in CPU);
//! - `append_fsync`: the whole path as in production (fdatasync on the sync thread).
//!
//! `cargo bench --bench capture_append`

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use walshift::Lsn;
use walshift::buffer::fs::{FileSystem, StdFs, WritableFile};
use walshift::buffer::{BufferConfig, BufferWriter};
use walshift::capture::{DEFAULT_FLUSH_INTERVAL, StreamState};
use walshift::source::pgoutput::encode::encode;
use walshift::source::pgoutput::{
    Begin, Column, Commit, Delete, Insert, LogicalMessage, OldTuple, PgTimestamp, Relation,
    ReplicaIdentity, TupleData, Update,
};
use walshift::source::protocol::{BackendMessage, ReplicationMessage};
use walshift::source::replication::ReplicationEvent;

const RELID: u32 = 16385;
const TRANSACTIONS: u64 = 20_000;
const TXN_SIZE: u64 = 10;
/// The walsender's keepalives between data: one per this many messages.
const KEEPALIVE_EVERY: u64 = 10_000;
/// Bytes per simulated socket read (`bench capture` measured ~12 KB per read over a Unix socket).
const READ_BYTES: usize = 12 * 1024;
/// As `ReplicationConnection::fill_read_buf`: reserve this much when less than `MIN_READ` is free.
const MIN_READ: usize = 64 * 1024;
const READ_BUFFER_RESERVE: usize = 256 * 1024;

fn row(id: u64, version: u64) -> TupleData {
    let id_s = id.to_string();
    let owner = format!("owner-{id}");
    let balance = (1000 + version).to_string();
    // W's note is md5(id::text): 32 hex digits.
    let note = format!(
        "{:032x}",
        u128::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
    );
    let updated = format!(
        "2024-05-01 12:{:02}:{:02}.{:06}+00",
        version % 60,
        id % 60,
        id % 1_000_000
    );
    TupleData::text([
        Some(id_s.as_str()),
        Some(owner.as_str()),
        Some(balance.as_str()),
        Some(note.as_str()),
        Some(updated.as_str()),
    ])
}

fn relation() -> LogicalMessage {
    let col = |flags, name: &str, type_oid| Column {
        flags,
        name: name.into(),
        type_oid,
        type_modifier: -1,
    };
    LogicalMessage::Relation(Relation {
        xid: None,
        relid: RELID,
        namespace: "public".into(),
        name: "accounts".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col(1, "id", 20),
            col(0, "owner", 25),
            col(0, "balance", 20),
            col(0, "note", 25),
            col(0, "updated_at", 1184),
        ],
    })
}

/// One backend `CopyData` frame holding an XLogData message.
fn put_xlogdata(out: &mut Vec<u8>, wal_start: u64, wal_end: u64, payload: &[u8]) {
    out.put_u8(b'd');
    out.put_u32((4 + 1 + 24 + payload.len()) as u32);
    out.put_u8(b'w');
    out.put_u64(wal_start);
    out.put_u64(wal_end);
    out.put_i64(767_880_000_000_000);
    out.put_slice(payload);
}

fn put_keepalive(out: &mut Vec<u8>, wal_end: u64) {
    out.put_u8(b'd');
    out.put_u32(4 + 1 + 17);
    out.put_u8(b'k');
    out.put_u64(wal_end);
    out.put_i64(767_880_000_000_000);
    out.put_u8(0);
}

/// What the walsender sends for W: transactions of 10 changes on `accounts`, 50% UPDATE, 30%
/// INSERT, 20% DELETE, preceded by the Relation message. Returns the bytes and the number of
/// XLogData messages in them.
fn walsender_bytes() -> (Vec<u8>, u64) {
    let mut out = Vec::new();
    let mut lsn = 0x1_0000_0000u64;
    let mut messages = 0u64;
    let mut emit = |out: &mut Vec<u8>, lsn: u64, msg: &LogicalMessage| {
        put_xlogdata(out, lsn, lsn, &encode(msg));
        messages += 1;
        if messages.is_multiple_of(KEEPALIVE_EVERY) {
            put_keepalive(out, lsn);
        }
    };
    emit(&mut out, lsn, &relation());
    for tx in 0..TRANSACTIONS {
        let commit_time = PgTimestamp(767_880_000_000_000 + tx as i64);
        let first = lsn;
        // Each change's WAL record is ~200 bytes; the commit record follows the last change.
        let commit_lsn = first + 200 * TXN_SIZE;
        let end_lsn = commit_lsn + 48;
        emit(
            &mut out,
            first,
            &LogicalMessage::Begin(Begin {
                final_lsn: Lsn(commit_lsn),
                commit_time,
                xid: 1000 + tx as u32,
            }),
        );
        for i in 0..TXN_SIZE {
            let id = tx * TXN_SIZE + i + 100_000;
            let msg = match i % 10 {
                0..=4 => LogicalMessage::Update(Update {
                    xid: None,
                    relid: RELID,
                    old: None,
                    new: row(id, 1),
                }),
                5..=7 => LogicalMessage::Insert(Insert {
                    xid: None,
                    relid: RELID,
                    new: row(id, 0),
                }),
                _ => {
                    let id_s = id.to_string();
                    LogicalMessage::Delete(Delete {
                        xid: None,
                        relid: RELID,
                        old: OldTuple::Key(TupleData::text([
                            Some(id_s.as_str()),
                            None,
                            None,
                            None,
                            None,
                        ])),
                    })
                }
            };
            emit(&mut out, first + 200 * i, &msg);
        }
        emit(
            &mut out,
            end_lsn,
            &LogicalMessage::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(commit_lsn),
                end_lsn: Lsn(end_lsn),
                commit_time,
            }),
        );
        lsn = end_lsn;
    }
    (out, messages)
}

/// A file system whose fdatasync and directory fsync do nothing.
#[derive(Debug)]
struct NoSyncFs;

struct NoSyncFile(Box<dyn WritableFile>);

impl WritableFile for NoSyncFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl FileSystem for NoSyncFs {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        Ok(Box::new(NoSyncFile(StdFs.create_new(path)?)))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        Ok(Box::new(NoSyncFile(StdFs.open_append(path)?)))
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        StdFs.truncate(path, len)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        StdFs.remove_file(path)
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        StdFs.write_atomic(path, data)
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}

/// Takes every complete frame off `read_buf` as the stream does; appends each event through
/// `state` when a writer is given. Returns the events seen.
fn drain(
    read_buf: &mut BytesMut,
    state: &mut StreamState,
    mut writer: Option<&mut BufferWriter>,
) -> u64 {
    let mut events = 0;
    while let Some(msg) = BackendMessage::parse(read_buf).unwrap() {
        let BackendMessage::CopyData(data) = msg else {
            panic!("only CopyData is sent");
        };
        let event = ReplicationEvent::from(ReplicationMessage::parse(data).unwrap());
        match writer.as_deref_mut() {
            Some(w) => {
                black_box(state.handle(event, w).unwrap());
            }
            None => {
                black_box(event);
            }
        }
        events += 1;
    }
    events
}

/// Feeds `stream` in socket-read-sized chunks; with a writer, flushes on the stream loop's
/// schedule and waits for the last group to be durable. Returns the events seen.
fn feed(stream: &[u8], mut writer: Option<&mut BufferWriter>) -> u64 {
    let mut state = StreamState::default();
    let mut read_buf = BytesMut::with_capacity(READ_BUFFER_RESERVE);
    let tick = DEFAULT_FLUSH_INTERVAL / 2;
    let mut last_tick = Instant::now();
    let mut last_submit = last_tick;
    let mut events = 0;
    for chunk in stream.chunks(READ_BYTES) {
        if read_buf.capacity() - read_buf.len() < MIN_READ {
            read_buf.reserve(READ_BUFFER_RESERVE);
        }
        read_buf.extend_from_slice(chunk);
        events += drain(&mut read_buf, &mut state, writer.as_deref_mut());
        if let Some(w) = writer.as_deref_mut()
            && last_tick.elapsed() >= tick
        {
            last_tick = Instant::now();
            if last_submit.elapsed() >= DEFAULT_FLUSH_INTERVAL {
                w.submit().unwrap();
                last_submit = Instant::now();
            }
            black_box(w.poll().unwrap());
        }
    }
    assert!(read_buf.is_empty(), "a frame was cut short");
    if let Some(w) = writer {
        black_box(w.flush().unwrap());
    }
    events
}

fn bench(c: &mut Criterion) {
    let (stream, messages) = walsender_bytes();
    let stream = Bytes::from(stream);
    let mut group = c.benchmark_group("capture_append");
    group.throughput(Throughput::Elements(messages));
    group.sample_size(10);
    group.bench_function(
        format!(
            "parse_only ({messages} msgs, {:.1} MB)",
            stream.len() as f64 / 1e6
        ),
        |b| b.iter(|| feed(&stream, None)),
    );
    type MakeFs = fn() -> Arc<dyn FileSystem>;
    let variants: [(&str, MakeFs); 2] = [
        ("append_nosync", || Arc::new(NoSyncFs)),
        ("append_fsync", || Arc::new(StdFs)),
    ];
    for (name, fs) in variants {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dir = tempfile::tempdir().unwrap();
                    let (mut w, _) =
                        BufferWriter::open(dir.path(), BufferConfig::default().with_fs(fs()))
                            .unwrap();
                    let t = Instant::now();
                    let events = feed(&stream, Some(&mut w));
                    total += t.elapsed();
                    assert!(events >= messages);
                    drop(w);
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
