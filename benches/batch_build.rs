//! Folding a batch of row changes to its net effect per key (`apply::fold`): 10,000 changes of
//! workload W's shape (50% UPDATE, 30% INSERT, 20% DELETE; 5 text-format columns; bigint key
//! `id`), consistent with a 200k-row table as a real source would send them.
//!
//! `cargo bench --bench batch_build`. Criterion prints changes/s (elements/s).

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use walshift::apply::fold::BatchFolder;
use walshift::apply::row::{Change, ColumnValue, TableShape, Value};

const CHANGES: usize = 10_000;
const INITIAL_ROWS: i64 = 200_000;

fn text(s: String) -> Value {
    Some(Bytes::from(s))
}

fn row(id: i64, rng: &mut StdRng) -> Vec<Value> {
    vec![
        text(id.to_string()),
        text(format!("owner-{id}")),
        text(rng.gen_range(0..100_000i64).to_string()),
        text(format!("{:032x}", rng.r#gen::<u128>())),
        text("2026-01-01 00:00:00+00".to_string()),
    ]
}

/// Like the W generator: deletes take the lowest live id, inserts append after the highest,
/// updates pick a random live id.
fn workload() -> Vec<Change> {
    let mut rng = StdRng::seed_from_u64(42);
    let (mut lo, mut hi) = (1i64, INITIAL_ROWS + 1);
    (0..CHANGES)
        .map(|_| match rng.gen_range(0..10) {
            0..=4 => {
                let id = rng.gen_range(lo..hi);
                let new = row(id, &mut rng)
                    .into_iter()
                    .map(ColumnValue::Known)
                    .collect();
                Change::Update { old: None, new }
            }
            5..=7 => {
                hi += 1;
                Change::Insert {
                    new: row(hi - 1, &mut rng),
                }
            }
            _ => {
                lo += 1;
                let mut old = vec![None; 5];
                old[0] = text((lo - 1).to_string());
                Change::Delete { old }
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let shape = TableShape {
        relid: 16384,
        columns: 5,
        key: vec![0],
        identity_full_without_key: false,
    };
    let changes = workload();
    let mut g = c.benchmark_group("batch_build");
    g.throughput(Throughput::Elements(CHANGES as u64));
    g.bench_function("fold_w_10k", |b| {
        b.iter_batched(
            || changes.clone(),
            |changes| {
                let mut f = BatchFolder::new();
                for ch in changes {
                    f.push(&shape, ch).unwrap();
                }
                f.finish()
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
