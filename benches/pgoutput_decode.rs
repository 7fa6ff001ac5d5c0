//! Decode throughput of pgoutput payloads for workload W's table
//! `accounts(id bigint, owner text, balance bigint, note text, updated_at timestamptz)` in text
//! format. Each iteration decodes a batch of distinct payloads; criterion reports messages/s.
//!
//! `cargo bench --bench pgoutput_decode`

use bytes::Bytes;
use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use walshift::Lsn;
use walshift::source::pgoutput::encode::encode;
use walshift::source::pgoutput::{
    Begin, Commit, Delete, Insert, LogicalMessage, OldTuple, PgTimestamp, TupleData, Update,
    ValueRef, decode, decode_row,
};

const RELID: u32 = 16385;
const BATCH: usize = 1000;

fn row(id: u64, version: u64) -> TupleData {
    let id_s = id.to_string();
    let owner = format!("owner-{id}");
    let balance = (id * 37 + version * 11 % 100_000).to_string();
    let note = format!("account {id}, revision {version}: monthly statement sent");
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

fn key(id: u64) -> TupleData {
    let id_s = id.to_string();
    TupleData::text([Some(id_s.as_str()), None, None, None, None])
}

fn insert(id: u64) -> LogicalMessage {
    LogicalMessage::Insert(Insert {
        xid: None,
        relid: RELID,
        new: row(id, 0),
    })
}

fn update(id: u64, old: Option<OldTuple>) -> LogicalMessage {
    LogicalMessage::Update(Update {
        xid: None,
        relid: RELID,
        old,
        new: row(id, 1),
    })
}

fn delete(id: u64) -> LogicalMessage {
    LogicalMessage::Delete(Delete {
        xid: None,
        relid: RELID,
        old: OldTuple::Key(key(id)),
    })
}

/// Workload W's shape: transactions of 10 changes, 50% UPDATE, 30% INSERT, 20% DELETE.
fn workload_w(transactions: u64) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut lsn = 0x1_0000_0000u64;
    for tx in 0..transactions {
        out.push(encode(&LogicalMessage::Begin(Begin {
            final_lsn: Lsn(lsn + 2000),
            commit_time: PgTimestamp(767_880_000_000_000 + tx as i64),
            xid: 1000 + tx as u32,
        })));
        for i in 0..10u64 {
            let id = tx * 10 + i + 100_000;
            let msg = match i {
                0..=4 => update(id, None),
                5..=7 => insert(id),
                _ => delete(id),
            };
            out.push(encode(&msg));
        }
        out.push(encode(&LogicalMessage::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(lsn + 2000),
            end_lsn: Lsn(lsn + 2048),
            commit_time: PgTimestamp(767_880_000_000_000 + tx as i64),
        })));
        lsn += 2048;
    }
    out
}

fn bench_batch(c: &mut Criterion, name: &str, payloads: &[Bytes]) {
    let bytes: usize = payloads.iter().map(Bytes::len).sum();
    let mut group = c.benchmark_group("pgoutput_decode");
    group.throughput(Throughput::Elements(payloads.len() as u64));
    group.bench_function(
        format!(
            "{name} ({} msgs, avg {} B)",
            payloads.len(),
            bytes / payloads.len()
        ),
        |b| {
            b.iter(|| {
                for p in payloads {
                    black_box(decode(black_box(p)).unwrap());
                }
            })
        },
    );
    group.finish();
}

/// `decode` against `decode_row` plus a walk over every value, on the same payloads.
fn bench_owned_vs_borrowed(c: &mut Criterion, name: &str, payloads: &[Bytes]) {
    let mut group = c.benchmark_group("pgoutput_decode_row");
    group.throughput(Throughput::Elements(payloads.len() as u64));
    group.bench_function(format!("{name}: decode"), |b| {
        b.iter(|| {
            for p in payloads {
                black_box(decode(black_box(p)).unwrap());
            }
        })
    });
    group.bench_function(format!("{name}: decode_row + values"), |b| {
        b.iter(|| {
            for p in payloads {
                let row = decode_row(black_box(p)).unwrap().unwrap();
                for t in row.old.map(|(_, t)| t).into_iter().chain(row.new) {
                    for v in t.values() {
                        if let ValueRef::Text(b) | ValueRef::Binary(b) = v {
                            black_box(b);
                        }
                    }
                }
            }
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let ids = 100_000..100_000 + BATCH as u64;
    let inserts: Vec<Bytes> = ids.clone().map(|id| encode(&insert(id))).collect();
    let updates: Vec<Bytes> = ids.clone().map(|id| encode(&update(id, None))).collect();
    let updates_full: Vec<Bytes> = ids
        .clone()
        .map(|id| encode(&update(id, Some(OldTuple::Full(row(id, 0))))))
        .collect();
    let deletes: Vec<Bytes> = ids.map(|id| encode(&delete(id))).collect();
    bench_batch(c, "insert", &inserts);
    bench_batch(c, "update", &updates);
    bench_batch(c, "update replica identity full", &updates_full);
    bench_batch(c, "delete key", &deletes);
    bench_batch(c, "workload W mix", &workload_w(BATCH as u64 / 10));
    bench_owned_vs_borrowed(c, "update", &updates);
    bench_owned_vs_borrowed(c, "update replica identity full", &updates_full);
}

criterion_group!(pgoutput, benches);
criterion_main!(pgoutput);
