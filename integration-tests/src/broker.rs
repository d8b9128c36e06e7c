//! The test broker and what tests do with it: topics, records in, intents out.

use anyhow::{bail, Context, Result};
use intentflow_formats::generate::{generate, GeneratorConfig};
use intentflow_model::train::{train, TrainConfig};
use intentflow_model::Device;
use intentflow_pipeline::kafka::read::read_topic;
use intentflow_pipeline::kafka::{admin, DeliveryWindow, KafkaClients};
use intentflow_schemas::{Event, ScoredIntent};
use rdkafka::Message;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::time::Duration;

/// Bootstrap servers of the test broker.
pub fn brokers() -> String {
    std::env::var("INTENTFLOW_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Fails with instructions when no broker answers.
pub fn require_broker() -> String {
    let b = brokers();
    if let Err(e) = admin::partition_count(&KafkaClients::new(&b), "__intentflow_probe") {
        panic!("no Kafka broker at {b} ({e:#}); start one with `scripts/kafka start` or run `scripts/test`");
    }
    b
}

/// A topic or group name unique to this test run.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("it-{name}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// The `intentflow` binary built alongside the test executable.
pub fn intentflow_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = dir.join("intentflow");
    assert!(bin.is_file(), "{} is missing: build it with `cargo build -p intentflow-pipeline` (scripts/test does)", bin.display());
    bin
}

/// Generated events for `users` users, in time order.
pub fn generated_events(users: usize, events: usize, seed: u64) -> Vec<Event> {
    generate(&GeneratorConfig { users, events, seed, ..Default::default() }).into_iter().map(|g| g.event).collect()
}

/// A model trained once per test process on generated data (hidden size 16, 2 epochs).
pub fn trained_model_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let events = generated_events(800, 16_000, 42);
        let cfg = TrainConfig { hidden_dim: 16, members: 1, epochs: 2, ..TrainConfig::default() };
        let trained = train(&events, &cfg, &Device::Cpu, |_, _| {}).expect("training");
        let dir = tempfile::tempdir().expect("tempdir");
        trained.save(dir.path()).expect("saving model");
        dir
    })
    .path()
}

/// A model other than [`trained_model_dir`]'s, trained from another seed, with hidden size
/// `hidden` (16 matches the shared test model's, so that one's hidden vectors would fit it).
pub fn other_model_dir(hidden: usize) -> tempfile::TempDir {
    let events = generated_events(400, 8_000, 99);
    let cfg = TrainConfig { hidden_dim: hidden, members: 1, epochs: 1, seed: 5, ..TrainConfig::default() };
    let trained = train(&events, &cfg, &Device::Cpu, |_, _| {}).expect("training");
    let dir = tempfile::tempdir().expect("tempdir");
    trained.save(dir.path()).expect("saving model");
    dir
}

/// Creates a topic with `partitions` partitions.
pub fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let n = rt.block_on(admin::ensure_topic(&KafkaClients::new(brokers), topic, partitions))?;
    if n != partitions {
        bail!("topic {topic} has {n} partitions, wanted {partitions}");
    }
    Ok(())
}

/// Deletes the records of `topic`/`partition` below `before`, as retention would; returns the
/// new low watermark.
pub fn delete_records_before(brokers: &str, topic: &str, partition: i32, before: i64) -> Result<i64> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = KafkaClients::new(brokers).base().create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(before))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let done = rt.block_on(admin.delete_records(&tpl, &AdminOptions::new()))?;
    let entry = done.find_partition(topic, partition).context("delete_records result lacks the partition")?;
    entry.error()?;
    match entry.offset() {
        rdkafka::Offset::Offset(low) => Ok(low),
        other => bail!("unexpected low watermark {other:?}"),
    }
}

/// Produces `(key, value)` records in order (per key order is kept by the idempotent producer).
pub fn produce(brokers: &str, topic: &str, records: &[(String, Vec<u8>)]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let producer = KafkaClients::new(brokers).producer(&[])?;
        let mut window = DeliveryWindow::new(&producer, 50_000);
        for (k, v) in records {
            window.send(topic, k.as_bytes(), v).await?;
        }
        window.finish().await?;
        Ok(())
    })
}

/// Produces `(key, value)` records in order, `per_second` of them a second (one producer).
pub fn produce_paced(brokers: &str, topic: &str, records: &[(String, Vec<u8>)], per_second: f64) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let producer = KafkaClients::new(brokers).producer(&[])?;
        let mut window = DeliveryWindow::new(&producer, 50_000);
        let started = std::time::Instant::now();
        for (i, (k, v)) in records.iter().enumerate() {
            let due = Duration::from_secs_f64(i as f64 / per_second);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            window.send(topic, k.as_bytes(), v).await?;
        }
        window.finish().await?;
        Ok(())
    })
}

/// Produces `(partition, key, value)` records to explicit partitions, in order.
pub fn produce_to_partitions(brokers: &str, topic: &str, records: &[(i32, Vec<u8>, Vec<u8>)]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let producer = KafkaClients::new(brokers).producer(&[])?;
        let mut window = DeliveryWindow::new(&producer, 50_000);
        for (p, k, v) in records {
            window.send_tracked(topic, *p, k, v).await?;
        }
        window.finish().await?;
        Ok(())
    })
}

/// The partition each user's records landed on in `topic` (as the producer's partitioner put
/// them).
pub fn user_partitions(brokers: &str, topic: &str) -> Result<std::collections::BTreeMap<String, i32>> {
    let records = read_topic(&KafkaClients::new(brokers), topic, Duration::from_secs(5), |_| false)?;
    Ok(records.iter().filter_map(|m| Some((String::from_utf8(m.key()?.to_vec()).ok()?, m.partition()))).collect())
}

/// Runs `intentflow <args>` to completion; returns its status and stderr.
pub fn intentflow(args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(intentflow_bin()).args(args).env("INTENTFLOW_LOG", "info").output().expect("running intentflow");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Produces events as schema-v1 JSON keyed by user id.
pub fn produce_events(brokers: &str, topic: &str, events: &[Event]) -> Result<()> {
    let records: Vec<(String, Vec<u8>)> = events.iter().map(|e| (e.user_id.to_string(), serde_json::to_vec(e).unwrap())).collect();
    produce(brokers, topic, &records)
}

/// Produces events keyed by user id, each record stamped with its event time (as
/// `intentflow import --event-time` does).
pub fn produce_events_at(brokers: &str, topic: &str, events: &[Event]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let producer = KafkaClients::new(brokers).producer(&[])?;
        let mut window = DeliveryWindow::new(&producer, 50_000);
        for e in events {
            window.send_at(topic, e.user_id.as_bytes(), &serde_json::to_vec(e)?, e.ts).await?;
        }
        window.finish().await?;
        Ok(())
    })
}

/// Reads scored intents from `topic` until `expected` arrived or none came for `idle`.
pub fn read_intents(brokers: &str, topic: &str, expected: usize, idle: Duration) -> Result<Vec<ScoredIntent>> {
    read_topic(&KafkaClients::new(brokers), topic, idle, |n| n >= expected)?
        .iter()
        .map(|m| serde_json::from_slice(m.payload().unwrap_or_default()).context("output is not a scored intent"))
        .collect()
}

/// Input records the consumer group `group` has committed in `topic` so far: the sum of its
/// committed offsets (read without joining the group). Under exactly-once, progress that no
/// crash can take back.
pub fn committed_records(brokers: &str, group: &str, topic: &str) -> Result<i64> {
    Ok(committed_offsets(brokers, group, topic)?.into_iter().filter(|o| *o > 0).sum())
}

/// The offset `group` has committed on each partition of `topic`, in partition order (negative
/// where it has committed none); empty while the topic does not exist.
pub fn committed_offsets(brokers: &str, group: &str, topic: &str) -> Result<Vec<i64>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let clients = KafkaClients::new(brokers);
    let Some(partitions) = admin::partition_count(&clients, topic)? else { return Ok(Vec::new()) };
    // read_uncommitted: the offsets committed so far, without waiting for an open transaction's.
    let consumer: BaseConsumer = clients.reader_config(group, "read_uncommitted").create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    let mut offsets: Vec<(i32, i64)> =
        committed.elements().iter().map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1))).collect();
    offsets.sort_unstable();
    Ok(offsets.into_iter().map(|(_, o)| o).collect())
}

/// Offsets in use in `topic` so far: the sum of its partitions' high minus low watermarks. An
/// instant progress probe while an operator runs; under exactly-once it also counts transaction
/// markers and aborted records, so it is an upper bound of the committed records.
pub fn topic_size(brokers: &str, topic: &str) -> Result<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let clients = KafkaClients::new(brokers);
    let Some(partitions) = admin::partition_count(&clients, topic)? else { return Ok(0) };
    let consumer: BaseConsumer = clients.base().create()?;
    let mut total = 0;
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        total += high - low;
    }
    Ok(total)
}
