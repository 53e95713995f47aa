//! Micro-benchmarks of the hot paths: RecordBatch encode and decode (none and
//! lz4) and the murmur2 partitioner. Throughput is in records.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use strom_client::partitioner::partition_for_key;
use strom_client::records::{BatchBuilder, BatchDecoder, Compression, ProducerIdentity};

const RECORDS: usize = 10_000;

/// Keys `key-{i}` and 100-byte values `{i}:xxx…`, as strom-bench sends them.
fn records() -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..RECORDS)
        .map(|i| {
            let mut v = format!("{i}:").into_bytes();
            v.resize(100, b'x');
            (format!("key-{i}").into_bytes(), v)
        })
        .collect()
}

fn build(records: &[(Vec<u8>, Vec<u8>)]) -> BatchBuilder {
    let mut b = BatchBuilder::new(128 * records.len());
    for (i, (k, v)) in records.iter().enumerate() {
        b.push(1_700_000_000_000 + i as i64, Some(k), Some(v), &[]);
    }
    b
}

fn codec(c: &mut Criterion) {
    let records = records();
    for (name, compression) in [("none", Compression::None), ("lz4", Compression::Lz4)] {
        let mut g = c.benchmark_group(format!("batch/{name}"));
        g.throughput(Throughput::Elements(RECORDS as u64));
        g.bench_function("encode", |bench| {
            bench.iter(|| {
                let b = build(black_box(&records));
                b.seal(compression, ProducerIdentity::default())
                    .map(|s| s.len())
            })
        });
        let sealed = build(&records)
            .seal(compression, ProducerIdentity::default())
            .expect("sealing a batch of valid records");
        g.bench_function("decode", |bench| {
            bench.iter(|| {
                let mut n = 0usize;
                for batch in BatchDecoder::new(black_box(sealed.clone()), true).flatten() {
                    n += batch.records().flatten().count();
                }
                assert_eq!(n, RECORDS);
                n
            })
        });
        g.finish();
    }
    let keys: Vec<Vec<u8>> = records.into_iter().map(|(k, _)| k).collect();
    let mut g = c.benchmark_group("partitioner");
    g.throughput(Throughput::Elements(keys.len() as u64));
    g.bench_function("murmur2", |bench| {
        bench.iter(|| {
            keys.iter()
                .map(|k| partition_for_key(black_box(k), 12) as i64)
                .sum::<i64>()
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
