//! Decoding one schema-v1 record: the record path (typed fields borrowing from the bytes) against
//! the map path (a `serde_json::Value` tree, then the same checks), which is how every record was
//! decoded before.
//!
//! `cargo bench --workspace --bench decode`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use intentflow_schemas::EventDecoder;
use serde_json::Value;

fn bench(c: &mut Criterion) {
    let record = br#"{"user_id":"u004217","ts":1704067212345,"type":"add_to_cart","event_id":"g1-884213","session_id":"u004217-s3","item_id":"i1881","category":"c42","price":37.5}"#;
    let decoder = EventDecoder::default();
    let now = 1_800_000_000_000;
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("record_typed", |b| b.iter(|| decoder.decode(record, now).unwrap()));
    group.bench_function("value_tree_then_checks", |b| {
        b.iter(|| {
            let Value::Object(map) = serde_json::from_slice::<Value>(record).unwrap() else { unreachable!() };
            decoder.decode_object(&map, now).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
