//! Topic replays: every partition's range fixed at start, partitions read one after another,
//! and within a partition its input topics merged in the order the live operator applies them
//! ([`TopicMerge`]: timestamp, then topic order, then offset).

use super::progress::Progress;
use super::range::{resolve, Bound, PartitionEnds};
use super::{ReplayJob, Scorer};
use crate::kafka::admin::partition_count;
use crate::output::Output;
use anyhow::{anyhow, Context, Result};
use intentflow_operators::decode::decode_batch;
use intentflow_operators::merge::TopicMerge;
use intentflow_operators::SourceRecord;
use intentflow_schemas::{EventDecoder, ScoredIntent};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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
        let mut reader = PartitionReader::new(&consumer, topics, part)?;
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

/// Reads one partition of every input topic up to its range's end, in merge order.
struct PartitionReader<'c> {
    consumer: &'c BaseConsumer,
    topics: &'c [String],
    partition: i32,
    /// The next offset to read per topic (the consumer's position).
    positions: Vec<i64>,
    ends: Vec<i64>,
    merge: TopicMerge<OwnedMessage>,
    last_progress: Instant,
}

impl<'c> PartitionReader<'c> {
    fn new(consumer: &'c BaseConsumer, topics: &'c [String], part: &PartitionRanges) -> Result<PartitionReader<'c>> {
        let mut tpl = TopicPartitionList::new();
        for (topic, (start, end)) in topics.iter().zip(&part.ranges) {
            if start < end {
                tpl.add_partition_offset(topic, part.partition, Offset::Offset(*start))?;
            }
        }
        consumer.assign(&tpl)?;
        Ok(PartitionReader {
            consumer,
            topics,
            partition: part.partition,
            positions: part.ranges.iter().map(|(s, _)| *s).collect(),
            ends: part.ranges.iter().map(|(_, e)| *e).collect(),
            merge: TopicMerge::new(topics.len()),
            last_progress: Instant::now(),
        })
    }

    fn at_end(&self, topic: usize) -> bool {
        self.positions[topic] >= self.ends[topic]
    }

    fn done(&self) -> bool {
        self.merge.is_empty() && (0..self.topics.len()).all(|t| self.at_end(t))
    }

    /// Reads until `max` records are released or everything is read, and appends the released
    /// records to `out` in merge order.
    fn next_batch(&mut self, max: usize, out: &mut Vec<OwnedMessage>) -> Result<()> {
        while out.len() < max && !self.done() {
            self.merge.release(|t| self.positions[t] >= self.ends[t], out);
            if out.len() >= max || self.done() {
                break;
            }
            self.poll()?;
        }
        Ok(())
    }

    /// Polls one record into the merge, or, when the partition is quiet, asks the consumer how
    /// far it got (its position passes transaction markers and aborted records).
    fn poll(&mut self) -> Result<()> {
        match self.consumer.poll(Timeout::After(Duration::from_millis(100))) {
            Some(Ok(m)) => {
                let topic = self.topics.iter().position(|t| t == m.topic()).ok_or_else(|| anyhow!("a record of unexpected topic {}", m.topic()))?;
                let offset = m.offset();
                if offset < self.ends[topic] {
                    self.merge.push(topic, m.timestamp().to_millis().unwrap_or(0), offset, m.detach());
                }
                self.positions[topic] = self.positions[topic].max(offset + 1);
                self.last_progress = Instant::now();
                return Ok(());
            }
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => return Err(anyhow!(e).context(format!("reading partition {}", self.partition))),
        }
        let assigned = self.consumer.position()?;
        for (t, topic) in self.topics.iter().enumerate() {
            if let Some(pos) = assigned.find_partition(topic, self.partition).and_then(|e| e.offset().to_raw()) {
                self.positions[t] = self.positions[t].max(pos);
            }
        }
        if self.last_progress.elapsed() > Duration::from_secs(5) {
            tracing::warn!(
                partition = self.partition,
                positions = ?self.positions,
                ends = ?self.ends,
                "waiting for an open transaction below the end offset (a crashed producer's is aborted after its transaction timeout)"
            );
            self.last_progress = Instant::now();
        }
        Ok(())
    }
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
    crate::runtime::dlq::log_rejections(&decoded.rejected);
    let next = crate::runtime::offsets::next_offsets(batch.iter().map(|m| (m.topic(), m.partition(), m.offset())));
    scorer.score(&decoded.events, next.iter().map(|((t, p), o)| (t.as_str(), *p, *o)))
}
