//! Topic replays: every partition's range fixed at start, partitions read one after another,
//! and within a partition its input topics merged in the order the live operator applies them
//! ([`RangeReader`]: timestamp, then topic order, then offset).

use super::progress::Progress;
use super::range::{resolve, Bound, PartitionEnds};
use super::{ReplayJob, Scorer};
use crate::kafka::admin::partition_count;
use crate::output::Output;
use anyhow::{Context, Result};
use crate::kafka::read::RangeReader;
use intentflow_operators::decode::decode_batch;
use intentflow_operators::SourceRecord;
use intentflow_schemas::{EventDecoder, ScoredIntent};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::Duration;

/// One partition's ranges `[start, end)`, one per input topic (in the job's topic order).
struct PartitionRanges {
    partition: i32,
    ranges: Vec<(i64, i64)>,
}

/// Replays `topics` between `from` and `to`.
///
/// # Errors
///
/// Missing topics, Kafka errors, scoring and output errors.
pub async fn replay_topics(
    job: &ReplayJob,
    topics: &[String],
    from: &Bound,
    to: &Bound,
    scorer: &mut Scorer<'_>,
    output: &mut Output<'_, ScoredIntent>,
) -> Result<()> {
    let mut cfg = job.clients.reader_config("intentflow-replay", "read_committed");
    cfg.set("fetch.max.bytes", "104857600").set("max.partition.fetch.bytes", "16777216").set("queued.min.messages", "200000");
    let consumer: BaseConsumer = cfg.create()?;
    let decoder = EventDecoder::new(job.limits);

    // Co-partitioned inputs, or none of this makes sense.
    crate::kafka::admin::input_partition_count(&job.clients, topics)?;
    // Fix every range before reading anything.
    let mut partitions: BTreeMap<i32, PartitionRanges> = BTreeMap::new();
    for (index, topic) in topics.iter().enumerate() {
        let count = partition_count(&job.clients, topic)?.with_context(|| format!("topic {topic} does not exist"))?;
        let by_time = |bound: &Bound| -> Result<BTreeMap<i32, i64>> {
            let Bound::Time(ms) = bound else { return Ok(BTreeMap::new()) };
            let mut tpl = TopicPartitionList::new();
            for p in 0..count {
                tpl.add_partition_offset(topic, p, Offset::Offset(*ms))?;
            }
            let found = consumer.offsets_for_times(tpl, Duration::from_secs(30))?;
            Ok(found.elements().iter().filter_map(|e| e.offset().to_raw().filter(|o| *o >= 0).map(|o| (e.partition(), o))).collect())
        };
        let (from_times, to_times) = (by_time(from)?, by_time(to)?);
        for p in 0..count {
            let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(30))?;
            let ends = PartitionEnds { low, high };
            let start = resolve(from, p, ends, from_times.get(&p).copied(), true);
            let end = resolve(to, p, ends, to_times.get(&p).copied(), false).max(start);
            let entry = partitions.entry(p).or_insert_with(|| PartitionRanges { partition: p, ranges: vec![(0, 0); topics.len()] });
            entry.ranges[index] = (start, end);
            scorer.summary.ranges.insert((topic.clone(), p), (start, end));
        }
    }
    let total: i64 = partitions.values().flat_map(|r| r.ranges.iter().map(|(s, e)| e - s)).sum();
    tracing::info!(partitions = partitions.len(), topics = topics.len(), offsets = total, "replay ranges fixed");
    let progress = Progress::new(partitions.values().map(|r| (format!("partition {}", r.partition), r.ranges.iter().map(|(s, e)| (e - s) as u64).sum())).collect());

    for (index, part) in partitions.values().enumerate() {
        let mut reader = RangeReader::new(&consumer, topics, part.partition, &part.ranges)?;
        let mut batch: Vec<OwnedMessage> = Vec::with_capacity(job.max_batch_records);
        while !reader.done() {
            reader.next_batch(job.max_batch_records, &mut batch)?;
            if batch.is_empty() {
                continue;
            }
            let intents = score_records(&decoder, &batch, scorer)?;
            output.write(intents).await?;
            progress.advance(index, batch.len() as u64);
            batch.clear();
        }
    }
    progress.finish();
    Ok(())
}

/// Decodes and scores records of one partition in merge order.
fn score_records(decoder: &EventDecoder, batch: &[OwnedMessage], scorer: &mut Scorer<'_>) -> Result<Vec<ScoredIntent>> {
    let records = batch.iter().map(|m| SourceRecord {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        payload: m.payload(),
    });
    let decoded = decode_batch(decoder, records, chrono::Utc::now().timestamp_millis());
    scorer.summary.invalid += decoded.rejected.len() as u64;
    crate::dlq::log_rejections(&decoded.rejected);
    let next = crate::offsets::next_offsets(batch.iter().map(|m| (m.topic(), m.partition(), m.offset())));
    scorer.score(&decoded.events, next.iter().map(|((t, p), o)| (t.as_str(), *p, *o)))
}
