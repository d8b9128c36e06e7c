//! One step of the default model (5 packed members of hidden size 8, item and category
//! embeddings) for batches of 1 to 8,192 users: the fused CPU kernel against candle's step, for
//! the GRU (`fused`, `candle`), and the LSTM and the causal convolution of the same shape
//! (`fused_lstm`, `fused_cnn`); states in the default int8 blocks, and the GRU's in f16 too
//! (`fused_f16`).
//!
//! `cargo bench --workspace --bench step` (docs/performance.md has the numbers).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use intentflow_formats::generate::{generate, GeneratorConfig};
use intentflow_model::train::{train, TrainConfig};
use intentflow_model::{Cell, Device, Features, IntentModel, StatePrecision};
use intentflow_schemas::SessionState;

fn bench(c: &mut Criterion) {
    let events: Vec<_> = generate(&GeneratorConfig { users: 2_000, events: 40_000, seed: 5, ..Default::default() }).into_iter().map(|g| g.event).collect();
    let trained_in = |cell: Cell, state_precision: StatePrecision| {
        let trained = train(&events, &TrainConfig { cells: vec![cell], epochs: 1, state_precision, ..TrainConfig::default() }, &Device::Cpu, |_, _| {}).unwrap();
        let dir = tempfile::tempdir().unwrap();
        trained.save(dir.path()).unwrap();
        IntentModel::load(dir.path(), &Device::Cpu).unwrap()
    };
    let trained = |cell: Cell| trained_in(cell, TrainConfig::default().state_precision);
    let (fused, lstm, cnn) = (trained(Cell::Gru), trained(Cell::Lstm), trained(Cell::Cnn));
    let fused_f16 = trained_in(Cell::Gru, StatePrecision::F16);
    let candle = fused.with_candle_step();
    // Real feature rows: each event featurised against a fresh session.
    let rows: Vec<Features> = events.iter().map(|e| fused.features().featurize(&mut SessionState::default(), e).features).collect();
    let h = fused.state_dim();

    let mut group = c.benchmark_group("model_step");
    for batch in [1usize, 16, 64, 256, 1024, 4096, 8192] {
        let inputs = &rows[..batch];
        let hidden = vec![0.1f32; batch * h];
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("fused", batch), &batch, |b, _| b.iter(|| fused.step(inputs, &hidden).unwrap()));
        group.bench_with_input(BenchmarkId::new("fused_f16", batch), &batch, |b, _| b.iter(|| fused_f16.step(inputs, &hidden).unwrap()));
        let states = vec![0.1f32; batch * lstm.state_dim()];
        group.bench_with_input(BenchmarkId::new("fused_lstm", batch), &batch, |b, _| b.iter(|| lstm.step(inputs, &states).unwrap()));
        let states = vec![0.1f32; batch * cnn.state_dim()];
        group.bench_with_input(BenchmarkId::new("fused_cnn", batch), &batch, |b, _| b.iter(|| cnn.step(inputs, &states).unwrap()));
        if batch <= 4096 {
            group.bench_with_input(BenchmarkId::new("candle", batch), &batch, |b, _| b.iter(|| candle.step(inputs, &hidden).unwrap()));
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
