//! Bounded reads: ranges of one partition of one or more topics, merged (restores, replays), or
//! a whole topic (`tail`, tests).

use super::KafkaClients;
use anyhow::{anyhow, Result};
use intentflow_operators::merge::TopicMerge;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// Reads one partition of one or more topics, each from `start` up to (not including) `end`,
/// and gives the records back in the order [`TopicMerge`] fixes across the topics (timestamp,
/// topic order, offset; with one topic, offset order): the order the live operator applies a
/// partition's records in.
///
/// The consumer's position passes transaction markers and aborted records, so with
/// `read_committed` the reader is done once every transaction below `end` has ended; while one
/// stays open, a line is logged every 5 s.
pub struct RangeReader<'c> {
    consumer: &'c BaseConsumer,
    topics: &'c [String],
    partition: i32,
    /// The next offset to read per topic (the consumer's position).
    positions: Vec<i64>,
    ends: Vec<i64>,
    merge: TopicMerge<OwnedMessage>,
    last_progress: Instant,
}

impl<'c> RangeReader<'c> {
    /// Assigns `partition` of `topics` to `consumer` at the starts of `ranges` (`[start, end)`,
    /// one per topic; an empty range is not read).
    ///
    /// # Errors
    ///
    /// If the assignment fails.
    pub fn new(consumer: &'c BaseConsumer, topics: &'c [String], partition: i32, ranges: &[(i64, i64)]) -> Result<RangeReader<'c>> {
        let mut tpl = TopicPartitionList::new();
        for (topic, (start, end)) in topics.iter().zip(ranges) {
            if start < end {
                tpl.add_partition_offset(topic, partition, Offset::Offset(*start))?;
            }
        }
        consumer.assign(&tpl)?;
        Ok(RangeReader {
            consumer,
            topics,
            partition,
            positions: ranges.iter().map(|(s, _)| *s).collect(),
            ends: ranges.iter().map(|(_, e)| *e).collect(),
            merge: TopicMerge::new(topics.len()),
            last_progress: Instant::now(),
        })
    }

    /// Whether every record of every range has been handed out.
    pub fn done(&self) -> bool {
        self.merge.is_empty() && self.positions.iter().zip(&self.ends).all(|(p, e)| p >= e)
    }

    /// Where the reader stands per topic: the next offset it will read.
    pub fn positions(&self) -> &[i64] {
        &self.positions
    }

    /// Reads until `max` records are in `out` or everything is read; appends in merge order.
    ///
    /// # Errors
    ///
    /// Kafka errors.
    pub fn next_batch(&mut self, max: usize, out: &mut Vec<OwnedMessage>) -> Result<()> {
        while out.len() < max && !self.done() {
            let at_end: Vec<bool> = self.positions.iter().zip(&self.ends).map(|(p, e)| p >= e).collect();
            self.merge.release(|t| at_end[t], out);
            if out.len() >= max || self.done() {
                break;
            }
            self.poll()?;
        }
        Ok(())
    }

    /// Polls one record into the merge, or, when the partition is quiet, asks the consumer how
    /// far it got (asking costs a round trip to librdkafka's main thread, so only then).
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
            Some(Err(e)) => return Err(anyhow!(e).context(format!("reading partition {} of {:?}", self.partition, self.topics))),
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
                topics = ?self.topics,
                positions = ?self.positions,
                ends = ?self.ends,
                "waiting for an open transaction below the end offset (a crashed producer's is aborted after its transaction timeout)"
            );
            self.last_progress = Instant::now();
        }
        Ok(())
    }
}

/// Reads every record of `topic` from the beginning until `until(count)` says stop or the
/// topic has been idle for `idle`. Reads committed data only. Returns the records in the order
/// read (per partition in offset order).
///
/// # Errors
///
/// Kafka errors.
pub fn read_topic(clients: &KafkaClients, topic: &str, idle: Duration, mut until: impl FnMut(usize) -> bool) -> Result<Vec<OwnedMessage>> {
    let partitions = super::admin::partition_count(clients, topic)?.ok_or_else(|| anyhow!("topic {topic} does not exist"))?;
    let consumer: BaseConsumer = clients.reader_config("intentflow-reader", "read_committed").create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut last = std::time::Instant::now();
    while !until(out.len()) && last.elapsed() < idle {
        match consumer.poll(Timeout::After(Duration::from_millis(200))) {
            Some(Ok(m)) => {
                out.push(m.detach());
                last = std::time::Instant::now();
            }
            Some(Err(e)) => return Err(anyhow!(e).context(format!("reading {topic}"))),
            None => {}
        }
    }
    Ok(out)
}
