//! The live order of records when several input topics share partitions.
//!
//! With one input topic, records are processed in the order consumed: each partition in offset
//! order. With several, [`InputOrder`] holds each partition's records in a
//! [`TopicMerge`] and releases them in `(timestamp, topic index, offset)` order, the order a
//! replay of the same ranges uses. A topic counts as having nothing more to give when the
//! consumer's position (or, before anything of it was consumed, where the store says it stands)
//! has reached its high watermark as last seen by librdkafka (no request needed). A partition held
//! back for longer than `max_task_idle_ms` by a topic that is not at its end (an open
//! transaction, a slow fetch), or holding more than its cap of buffered records (one topic far
//! behind the other in time), is released anyway and logged: memory stays bounded, at the cost of
//! the replay order in those cases only.

use intentflow_operators::merge::TopicMerge;
use rdkafka::consumer::Consumer;
use rdkafka::message::BorrowedMessage;
use rdkafka::Message;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Buffered records of the input topics, per partition.
pub struct InputOrder<'c> {
    topics: Vec<String>,
    merges: BTreeMap<i32, TopicMerge<BorrowedMessage<'c>>>,
    blocked_since: BTreeMap<i32, Instant>,
    idle: Duration,
    /// Most records buffered per partition.
    cap: usize,
    /// High watermarks asked of the broker for topic-partitions with no position yet in this
    /// assignment (librdkafka's cached one may be older than the assignment).
    asked_high: BTreeMap<(usize, i32), i64>,
}

impl<'c> InputOrder<'c> {
    /// The order of `topics` (in configured order), or `None` for a single topic, whose records
    /// need no merging. A partition buffers at most four batches (and at least 10,000 records).
    pub fn new(topics: &[String], idle: Duration, max_batch_records: usize) -> Option<InputOrder<'c>> {
        (topics.len() > 1).then(|| InputOrder {
            topics: topics.to_vec(),
            merges: BTreeMap::new(),
            blocked_since: BTreeMap::new(),
            idle,
            cap: (4 * max_batch_records).max(10_000),
            asked_high: BTreeMap::new(),
        })
    }

    /// Buffers a consumed record.
    pub fn push(&mut self, m: BorrowedMessage<'c>) {
        let Some(topic) = self.topics.iter().position(|t| t == m.topic()) else {
            tracing::warn!(topic = m.topic(), "a record of a topic not subscribed to is ignored");
            return;
        };
        let (timestamp, offset) = (m.timestamp().to_millis().unwrap_or(0), m.offset());
        self.merges.entry(m.partition()).or_insert_with(|| TopicMerge::new(self.topics.len())).push(topic, timestamp, offset, m);
    }

    /// Moves the records that may be processed now to `out`, in merge order per partition.
    /// `stored_next(topic, partition)` is the offset the store says a topic-partition continues
    /// from, for topics whose consumer position is not known yet.
    pub fn release<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
        &mut self,
        consumer: &C,
        stored_next: impl Fn(&str, i32) -> Option<i64>,
        out: &mut Vec<BorrowedMessage<'c>>,
    ) {
        let positions = consumer.position().ok();
        let now = Instant::now();
        for (partition, merge) in &mut self.merges {
            if merge.is_empty() {
                continue;
            }
            // Once per partition, not per record: where each topic stands against its end.
            let asked_high = &mut self.asked_high;
            let at_end: Vec<bool> = self
                .topics
                .iter()
                .enumerate()
                .map(|(t, topic)| {
                    let position = positions.as_ref().and_then(|tpl| tpl.find_partition(topic, *partition)).and_then(|e| e.offset().to_raw()).filter(|p| *p >= 0);
                    match position {
                        Some(pos) => cached_high_watermark(consumer, topic, *partition).is_some_and(|high| pos >= high),
                        // Nothing consumed since the assignment: the store's offset against a high
                        // watermark asked once per assignment (the cached one may predate it).
                        None => {
                            let high = match asked_high.get(&(t, *partition)) {
                                Some(h) => Some(*h),
                                None => consumer.fetch_watermarks(topic, *partition, Duration::from_secs(5)).ok().map(|(_, h)| h),
                            };
                            if let Some(h) = high {
                                asked_high.insert((t, *partition), h);
                            }
                            matches!((stored_next(topic, *partition), high), (Some(pos), Some(high)) if pos >= high)
                        }
                    }
                })
                .collect();
            merge.release(|t| at_end[t], out);
            let Some(topic) = merge.blocked_on(|t| at_end[t]) else {
                self.blocked_since.remove(partition);
                continue;
            };
            let since = *self.blocked_since.entry(*partition).or_insert(now);
            let (waited, full) = (now.duration_since(since) >= self.idle, merge.len() > self.cap);
            if waited || full {
                let released = merge.release_all(out);
                tracing::warn!(
                    partition,
                    waiting_for = %self.topics[topic],
                    released,
                    idle_ms = self.idle.as_millis() as u64,
                    over_cap = full,
                    "released records without waiting any longer for a co-partitioned topic that is not at its end"
                );
                self.blocked_since.remove(partition);
            }
        }
    }

    /// When a held-back partition will be released anyway, if one is held back.
    pub fn deadline(&self) -> Option<Instant> {
        self.blocked_since.values().min().map(|since| *since + self.idle)
    }

    /// Forgets everything buffered; returns the first buffered offset of each topic-partition,
    /// where consumption must resume if those records are to be processed.
    pub fn clear(&mut self) -> Vec<(String, i32, i64)> {
        self.blocked_since.clear();
        self.asked_high.clear();
        let topics = &self.topics;
        let firsts = self.merges.iter_mut().flat_map(|(p, m)| m.clear().into_iter().map(move |(t, o)| (topics[t].clone(), *p, o))).collect();
        self.merges.clear();
        firsts
    }
}

/// The high watermark of a partition as last seen by the client (updated with every fetch
/// response), without a request; `None` before the first fetch.
fn cached_high_watermark<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(consumer: &C, topic: &str, partition: i32) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer stays valid while `consumer` lives, `topic` is a valid C string
    // for the call, and the out-pointers point at live locals. The call only reads librdkafka's
    // cached values under its own lock.
    let err = unsafe { rdkafka::bindings::rd_kafka_get_watermark_offsets(consumer.client().native_ptr(), topic.as_ptr(), partition, &mut low, &mut high) };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}
