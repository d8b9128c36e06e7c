//! The streaming runtime of `intentflow run`.
//!
//! One loop owns the consumer, the producer, the state store and the operator:
//!
//! 1. collect a micro-batch (up to `max_batch_records`, waiting at most `batch_linger_ms` after
//!    the first record);
//! 2. drop records the state store already reflects (see [`offsets::already_applied`]);
//! 3. decode, then score with [`IntentOperator::process`] (waves of batched GRU steps);
//! 4. produce every intent and await every acknowledgement;
//! 5. write the users' new states and the next offsets to RocksDB in one atomic batch;
//! 6. commit the next offsets to the consumer group.
//!
//! A crash before 5 re-scores the batch on restart (outputs may repeat: at-least-once); a
//! crash between 5 and 6 is harmless, because step 2 skips what the store already holds, so a
//! user's hidden state never applies an event twice. On SIGTERM/SIGINT the loop finishes the
//! batch in hand, commits synchronously and returns.

use crate::config::RunConfig;
use crate::kafka::{self, DeliveryWindow};
use crate::telemetry::{BatchMetrics, BatchStats, Health};
use anyhow::{Context, Result};
use intentflow_model::IntentModel;
use intentflow_operators::{decode::decode_batch, encode::encode_intent, IntentOperator, SourceRecord};
use intentflow_schemas::{EventDecoder, Limits};
use intentflow_state::{StateStore, StoreOptions};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub mod offsets;

/// Totals of a run, returned when it stops.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// Records consumed.
    pub records: u64,
    /// Intents produced and acknowledged.
    pub intents: u64,
    /// Records rejected as invalid.
    pub invalid: u64,
    /// Records skipped because the state already reflected them.
    pub skipped: u64,
    /// Batches processed.
    pub batches: u64,
}

/// Consumer context: tracks the assignment and tells the loop when it changed.
struct RebalanceTracker {
    health: Arc<Health>,
    changed: AtomicBool,
}

impl ClientContext for RebalanceTracker {}

impl ConsumerContext for RebalanceTracker {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        match rebalance {
            Rebalance::Assign(tpl) => tracing::info!(partitions = tpl.count(), "partitions assigned"),
            Rebalance::Revoke(tpl) => tracing::info!(partitions = tpl.count(), "partitions revoked"),
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
        self.health.assigned_partitions.store(assigned, Ordering::Relaxed);
        self.changed.store(true, Ordering::Relaxed);
    }
}

/// Resolves when `shutdown` says stop (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Runs the operator until `shutdown` turns true. Returns the totals.
///
/// # Errors
///
/// Start-up failures (no model, state store locked, broker unreachable) and failures that
/// would risk losing data (a delivery that did not succeed, a state write that failed). The
/// offsets of the failed batch are not committed, so a restart repeats it.
pub async fn run(cfg: RunConfig, mut shutdown: watch::Receiver<bool>, health: Arc<Health>) -> Result<RunSummary> {
    let device = cfg.device.open()?;
    let model = IntentModel::load(&cfg.model_dir, &device)?;
    tracing::info!(version = model.version(), hidden = model.hidden_dim(), device = ?cfg.device, "model loaded");
    let operator = IntentOperator::new(model);
    let store = StateStore::open(&cfg.state_dir, StoreOptions::default())
        .with_context(|| format!("opening state store {}", cfg.state_dir.display()))?;
    let decoder = EventDecoder::new(Limits { max_record_bytes: cfg.max_record_bytes, ..Limits::default() });

    let input_partitions = kafka::partition_count(&cfg.brokers, &cfg.input_topics[0])?.unwrap_or(4);
    kafka::ensure_topic(&cfg.brokers, &cfg.output_topic, input_partitions).await?;
    kafka::ensure_topic(&cfg.brokers, &cfg.dlq_topic, input_partitions).await?;
    let producer = kafka::producer(&cfg.brokers, &cfg.kafka.producer)?;

    let tracker = RebalanceTracker { health: health.clone(), changed: AtomicBool::new(true) };
    let mut consumer_cfg = kafka::client_config(&cfg.brokers, &Default::default());
    consumer_cfg
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", cfg.offset_reset.librdkafka())
        .set("isolation.level", "read_committed");
    for (k, v) in &cfg.kafka.consumer {
        consumer_cfg.set(k, v);
    }
    let consumer: StreamConsumer<RebalanceTracker> = consumer_cfg.create_with_context(tracker)?;
    let topics: Vec<&str> = cfg.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    tracing::info!(topics = ?cfg.input_topics, group = %cfg.group, output = %cfg.output_topic, "subscribed");

    let metrics = BatchMetrics::default();
    let linger = Duration::from_millis(cfg.batch_linger_ms);
    let mut applied = offsets::AppliedOffsets::default();
    let mut summary = RunSummary::default();
    health.running.store(true, Ordering::Relaxed);

    loop {
        let first = tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break,
            m = consumer.recv() => m,
        };
        let mut batch: Vec<BorrowedMessage<'_>> = Vec::with_capacity(cfg.max_batch_records);
        match first {
            Ok(m) => batch.push(m),
            Err(e) => {
                consumer_error(&e)?;
                continue;
            }
        }
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < cfg.max_batch_records {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m),
                Ok(Err(e)) => consumer_error(&e)?,
                Err(_) => break,
            }
        }
        let started = Instant::now();
        if consumer.context().changed.swap(false, Ordering::Relaxed) {
            // Ownership may have moved while the batch was collected: records of partitions
            // revoked meanwhile belong to their new owner, and recorded offsets are re-read.
            applied.clear();
            let assignment = consumer.assignment()?;
            let before = batch.len();
            batch.retain(|m| assignment.find_partition(m.topic(), m.partition()).is_some());
            if batch.len() < before {
                tracing::info!(dropped = before - batch.len(), "records of revoked partitions left to their new owner");
            }
            if batch.is_empty() {
                continue;
            }
        }

        let mut stats = BatchStats { records: batch.len() as u64, ..Default::default() };
        let mut fresh = Vec::with_capacity(batch.len());
        for m in &batch {
            // A partition's recorded offset is loaded on its first record after start-up or a
            // rebalance, which is when a committed offset lost to retention shows: check then,
            // not per record.
            let stored = applied.get_or_load(m.topic(), m.partition(), || {
                let stored = store.offset(m.topic(), m.partition())?;
                if let Some(expected) = stored.filter(|&e| m.offset() > e) {
                    tokio::task::block_in_place(|| report_gap(&consumer, m.topic(), m.partition(), expected, m.offset(), cfg.offset_reset));
                }
                Ok::<_, intentflow_state::StateError>(stored)
            })?;
            if offsets::already_applied(m.offset(), stored) {
                stats.skipped += 1;
            } else {
                fresh.push(SourceRecord {
                    topic: m.topic(),
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp_ms: m.timestamp().to_millis(),
                    payload: m.payload(),
                });
            }
        }
        let decoded = decode_batch(&decoder, fresh, chrono::Utc::now().timestamp_millis());
        report_rejections(&decoded.rejected, &mut stats);
        let out = tokio::task::block_in_place(|| {
            operator.process(&decoded.events, &store, chrono::Utc::now().timestamp_millis())
        })?;

        let mut window = DeliveryWindow::new(&producer, 100_000);
        for intent in &out.intents {
            window.send(&cfg.output_topic, intent.user_id.as_bytes(), &encode_intent(intent)).await?;
        }
        for r in &decoded.rejected {
            let key = format!("{}/{}", r.source.topic, r.source.partition);
            let payload = r.payload.as_deref().unwrap_or_default();
            window.send_with_headers(&cfg.dlq_topic, key.as_bytes(), payload, Some(dead_letter_headers(r))).await?;
        }
        window.finish().await?;

        let next = offsets::next_offsets(batch.iter().map(|m| (m.topic(), m.partition(), m.offset())));
        store.commit(
            out.states.iter().map(|(p, u, s)| (*p, u.as_str(), s)),
            next.iter().map(|((t, p), o)| (t.as_str(), *p, *o)),
        )?;
        for ((t, p), o) in &next {
            applied.advance(t, *p, *o);
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &next {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            // The state store holds the offsets too, so a lost commit only costs a re-read.
            tracing::warn!(error = %e, "offset commit failed");
        }

        stats.intents = out.intents.len() as u64;
        stats.state_resets = out.reset_states as u64;
        stats.waves = out.waves as u64;
        stats.seconds = started.elapsed().as_secs_f64();
        metrics.emit(&stats, &health);
        summary.records += stats.records;
        summary.intents += stats.intents;
        summary.skipped += stats.skipped;
        summary.invalid += stats.invalid.values().sum::<u64>();
        summary.batches += 1;
        tracing::debug!(records = stats.records, intents = stats.intents, waves = stats.waves, seconds = stats.seconds, "batch done");
    }

    health.running.store(false, Ordering::Relaxed);
    // Every processed batch committed asynchronously; make the last position durable.
    // Only partitions still owned: a stale commit for a moved partition would rewind its owner.
    let assignment = consumer.assignment()?;
    let mut tpl = TopicPartitionList::new();
    for (t, p, o) in applied.known().filter(|(t, p, _)| assignment.find_partition(t, *p).is_some()) {
        tpl.add_partition_offset(t, p, Offset::Offset(o))?;
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(error = %e, "final offset commit failed; the state store holds the offsets");
        }
    }
    consumer.unsubscribe();
    tracing::info!(?summary, "stopped");
    Ok(summary)
}

/// A consumer error: fatal when the committed offset is gone and the policy is `fail`,
/// otherwise logged.
fn consumer_error(e: &rdkafka::error::KafkaError) -> Result<()> {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    if let KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset) = e {
        tracing::error!(error = %e, "a committed offset no longer exists (deleted by retention?) and offset_reset = fail: stopping");
        anyhow::bail!("committed offset out of range and offset_reset = fail: {e}");
    }
    tracing::warn!(error = %e, "consumer error");
    Ok(())
}

/// Called when a partition's first record after start-up or a rebalance lies beyond the next
/// offset the state store expects.
/// Offsets can be skipped legitimately (transaction markers), so the low watermark decides: if
/// the expected offset is below it, retention deleted records this operator never applied, and
/// that is logged loudly and counted.
fn report_gap<C: rdkafka::consumer::ConsumerContext>(
    consumer: &StreamConsumer<C>,
    topic: &str,
    partition: i32,
    expected: i64,
    got: i64,
    policy: crate::config::OffsetReset,
) {
    let low = consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)).map(|(low, _)| low);
    if let Some(lost) = offsets::lost_to_retention(expected, got, low.ok()) {
        metrics::counter!("intentflow_offsets_lost_total").increment(lost);
        tracing::error!(
            topic,
            partition,
            expected,
            resumed_at = got,
            lost,
            policy = ?policy,
            "records deleted by retention before they were processed: {lost} offsets skipped"
        );
    }
}

/// Headers of a dead-letter record: the error kind, a readable reason, and the source position.
pub fn dead_letter_headers(r: &intentflow_operators::Rejected) -> rdkafka::message::OwnedHeaders {
    use rdkafka::message::{Header, OwnedHeaders};
    let (partition, offset) = (r.source.partition.to_string(), r.source.offset.to_string());
    let timestamp = r.timestamp_ms.map(|t| t.to_string()).unwrap_or_default();
    let reason = r.error.to_string();
    [
        (DLQ_ERROR_KIND, r.error.kind()),
        (DLQ_REASON, reason.as_str()),
        (DLQ_SOURCE_TOPIC, r.source.topic.as_str()),
        (DLQ_SOURCE_PARTITION, partition.as_str()),
        (DLQ_SOURCE_OFFSET, offset.as_str()),
        (DLQ_SOURCE_TIMESTAMP, timestamp.as_str()),
    ]
    .into_iter()
    .fold(OwnedHeaders::new(), |h, (key, value)| h.insert(Header { key, value: Some(value) }))
}

/// Dead-letter header: the rejection kind (`invalid_json`, `missing_field`, …).
pub const DLQ_ERROR_KIND: &str = "intentflow.error.kind";
/// Dead-letter header: a human-readable reason.
pub const DLQ_REASON: &str = "intentflow.error.reason";
/// Dead-letter header: the source topic.
pub const DLQ_SOURCE_TOPIC: &str = "intentflow.source.topic";
/// Dead-letter header: the source partition (decimal).
pub const DLQ_SOURCE_PARTITION: &str = "intentflow.source.partition";
/// Dead-letter header: the source offset (decimal).
pub const DLQ_SOURCE_OFFSET: &str = "intentflow.source.offset";
/// Dead-letter header: the source record's timestamp in epoch ms (empty if it had none).
pub const DLQ_SOURCE_TIMESTAMP: &str = "intentflow.source.timestamp";

/// Logs rejected records (each one names topic/partition/offset, up to a cap per batch) and
/// counts them by reason.
fn report_rejections(rejected: &[intentflow_operators::Rejected], stats: &mut BatchStats) {
    const LOGGED_PER_BATCH: usize = 20;
    for (i, r) in rejected.iter().enumerate() {
        *stats.invalid.entry(r.error.kind()).or_default() += 1;
        if i < LOGGED_PER_BATCH {
            tracing::warn!(
                topic = %r.source.topic,
                partition = r.source.partition,
                offset = r.source.offset,
                error_type = r.error.kind(),
                "rejected record: {}",
                r.error
            );
        }
    }
    if rejected.len() > LOGGED_PER_BATCH {
        tracing::warn!(more = rejected.len() - LOGGED_PER_BATCH, "further rejected records in this batch not logged");
    }
}
