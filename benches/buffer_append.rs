//! Append throughput of the durable buffer: ~150-byte records (10-row transactions, as in
//! workload W) with a flush (write + fdatasync) every 1,000 transactions.
//!
//! `cargo bench --bench buffer_append`. Criterion prints bytes/s (MB/s); records/s is printed
//! once per run from a timed pass.

use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use walshift::Lsn;
use walshift::buffer::{BufferConfig, BufferWriter};

const TXNS: u64 = 10_000;
const ROWS: u64 = 10;
const ROW_BYTES: usize = 150;
const FLUSH_EVERY: u64 = 1_000;

fn payloads() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut begin = vec![b'B'];
    begin.resize(21, 0);
    let mut row = vec![b'U'];
    row.resize(ROW_BYTES, b'x');
    let mut commit = vec![b'C', 0];
    commit.resize(26, 0);
    (begin, row, commit)
}

/// Appends the whole workload into a fresh buffer; returns records written.
fn run(dir: &std::path::Path, segment_size: u64) -> u64 {
    let (begin, row, mut commit) = payloads();
    let (mut w, _) =
        BufferWriter::open(dir, BufferConfig::default().with_segment_size(segment_size)).unwrap();
    let mut lsn = 0x1_0000_0000u64;
    let mut records = 0;
    for t in 0..TXNS {
        w.append(Lsn(lsn), b'B', &begin).unwrap();
        for _ in 0..ROWS {
            lsn += 200;
            w.append(Lsn(lsn), b'U', &row).unwrap();
        }
        lsn += 200;
        commit[10..18].copy_from_slice(&lsn.to_be_bytes());
        w.append(Lsn(lsn), b'C', &commit).unwrap();
        records += ROWS + 2;
        if t % FLUSH_EVERY == FLUSH_EVERY - 1 {
            w.submit().unwrap();
        }
    }
    w.close().unwrap();
    records
}

fn bytes_per_run() -> u64 {
    let (begin, row, commit) = payloads();
    let frame = |n: usize| (n + 17) as u64;
    TXNS * (frame(begin.len()) + ROWS * frame(row.len()) + frame(commit.len()))
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("buffer_append");
    group.throughput(Throughput::Bytes(bytes_per_run()));
    group.sample_size(10);
    for (name, seg) in [("64MiB_segments", 64 << 20), ("1MiB_segments", 1 << 20)] {
        group.bench_function(name, |b| {
            b.iter_with_setup(|| tempfile::tempdir().unwrap(), |dir| run(dir.path(), seg))
        });
    }
    group.finish();

    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let records = run(dir.path(), 64 << 20);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "buffer_append: {records} records ({:.1} MB) in {secs:.3}s = {:.0} records/s, {:.1} MB/s (flush every {FLUSH_EVERY} txns)",
        bytes_per_run() as f64 / 1e6,
        records as f64 / secs,
        bytes_per_run() as f64 / 1e6 / secs
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
