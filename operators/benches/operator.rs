//! Throughput of the scoring operator without Kafka: a batch of events through state reads,
//! waves of batched GRU steps and intent construction, for several batch sizes.
//!
//! `cargo bench --workspace --bench operator`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use intentflow_model::train::{train, TrainConfig};
use intentflow_model::{Device, IntentModel};
use intentflow_formats::generate::{generate, GeneratorConfig};
use intentflow_operators::{IntentOperator, PositionedEvent, SourcePosition};
use intentflow_state::{StateStore, StoreOptions};

fn bench(c: &mut Criterion) {
    let events: Vec<PositionedEvent> = generate(&GeneratorConfig { users: 20_000, events: 60_000, seed: 2, ..Default::default() })
        .into_iter()
        .enumerate()
        .map(|(i, g)| PositionedEvent { source: SourcePosition { topic: "events".into(), partition: 0, offset: i as i64 }, event: g.event })
        .collect();
    let train_events: Vec<_> = events.iter().take(20_000).map(|p| p.event.clone()).collect();
    let model_dir = tempfile::tempdir().unwrap();
    let trained = train(&train_events, &TrainConfig { epochs: 1, ..TrainConfig::default() }, &Device::Cpu, |_, _| {}).unwrap();
    trained.save(model_dir.path()).unwrap();
    let op = IntentOperator::new(IntentModel::load(model_dir.path(), &Device::Cpu).unwrap());
    let state_dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(state_dir.path(), StoreOptions::default()).unwrap();

    let mut group = c.benchmark_group("operator_process");
    for batch in [64usize, 1024, 4096] {
        group.throughput(Throughput::Elements(batch as u64));
        let mut start = 0;
        group.bench_function(format!("batch_{batch}"), |b| {
            b.iter_batched(
                || {
                    start = (start + batch) % (events.len() - batch);
                    &events[start..start + batch]
                },
                |slice| {
                    let out = op.process(slice, &store, intentflow_operators::EmittedAt::Now(0)).unwrap();
                    store.commit(out.states.iter().map(|(p, u, s)| (*p, u.as_str(), s)), [], []).unwrap();
                    out.scored.len()
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    // One user with half of a batch's events: a wave per event of that user, and before waves
    // skipped finished users, a pass over every user per wave.
    let hot: Vec<PositionedEvent> = events[..4096]
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut e = e.clone();
            if i % 2 == 0 {
                e.event.user_id = "hot-user".into();
            }
            e
        })
        .collect();
    let mut group = c.benchmark_group("operator_hot_user");
    group.throughput(Throughput::Elements(hot.len() as u64));
    group.bench_function("batch_4096_half_one_user", |b| {
        b.iter(|| {
            let out = op.process(&hot, &store, intentflow_operators::EmittedAt::Now(0)).unwrap();
            out.scored.len()
        })
    });
    // The same batch with the live operator's default cap of 64 waves: the hot user's first 64
    // events and everyone else's are applied, its other 1,984 are deferred to later batches
    // (what `intentflow run` does with `max_waves_per_batch`), so the batch is done sooner.
    let capped = IntentOperator::new(IntentModel::load(model_dir.path(), &Device::Cpu).unwrap()).with_wave_cap(std::num::NonZeroUsize::new(64));
    group.bench_function("batch_4096_half_one_user_cap_64", |b| {
        b.iter(|| {
            let out = capped.process(&hot, &store, intentflow_operators::EmittedAt::Now(0)).unwrap();
            assert_eq!(out.deferred.len(), 2048 - 64);
            out.scored.len()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
