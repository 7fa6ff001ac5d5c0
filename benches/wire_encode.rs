//! Encoding one batch column of 10,000 values into its statement parameter (`apply::params`):
//! the binary array built straight from the values' bytes (`encode_array`), for a bigint, a
//! timestamptz and a text column with a few NULLs.
//!
//! `cargo bench --bench wire_encode`. Criterion prints values/s (elements/s).

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::types::{ToSql, Type};
use walshift::apply::params::{self, Wire};

const VALUES: usize = 10_000;

fn column(rng: &mut StdRng, value: impl Fn(&mut StdRng) -> String) -> Vec<Option<Bytes>> {
    (0..VALUES)
        .map(|_| (rng.gen_range(0..20) != 0).then(|| Bytes::from(value(rng))))
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    let columns = [
        (
            "int8",
            Wire::Int8,
            Type::INT8_ARRAY,
            column(&mut rng, |r| r.r#gen::<i64>().to_string()),
        ),
        (
            "timestamptz",
            Wire::Timestamptz,
            Type::TIMESTAMPTZ_ARRAY,
            column(&mut rng, |r| {
                format!(
                    "20{:02}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
                    r.gen_range(0..30),
                    r.gen_range(1..13),
                    r.gen_range(1..29),
                    r.gen_range(0..24),
                    r.gen_range(0..60),
                    r.gen_range(0..60),
                    r.gen_range(0..1_000_000)
                )
            }),
        ),
        (
            "text",
            Wire::Text,
            Type::TEXT_ARRAY,
            column(&mut rng, |r| format!("{:032x}", r.r#gen::<u128>())),
        ),
    ];
    let mut g = c.benchmark_group("wire_encode");
    g.throughput(Throughput::Elements(VALUES as u64));
    let mut out = BytesMut::new();
    for (name, wire, ty, values) in &columns {
        let raw = || values.iter().map(|v| v.as_deref());
        g.bench_function(format!("{name}/encoded_array"), |b| {
            b.iter(|| {
                out.clear();
                params::encode_array(*wire, raw())
                    .unwrap()
                    .to_sql_checked(ty, &mut out)
                    .unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
