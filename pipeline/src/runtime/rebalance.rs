//! What the consumer does when partitions move, without blocking in the rebalance callback on
//! anything but the producer.
//!
//! A revocation under at-least-once first flushes the producer (the states of a commit in
//! flight must reach the changelog before the partitions' next owner restores it; see
//! [`super`]). An assignment pauses its partitions at once and starts one background restore per partition
//! ([`super::restore`]); the callback returns immediately, so the consumer keeps polling (no
//! eviction for exceeding `max.poll.interval.ms`, however long a changelog is) and the
//! partitions that are already up to date go on processing. Each finished restore is reported
//! to the batch loop, which resumes that partition ([`Assignment::resume`]) if it still belongs to
//! the same assignment. Every rebalance event bumps a generation counter: the loop drops a batch
//! collected across a rebalance, and a restore whose partition was revoked stops early.
//!
//! The erasure topic is assigned with the input topics. Its partitions without a committed
//! offset (no request applied yet) start from their beginning whatever `offset_reset` says (one
//! committed-offsets request per assignment, before the assignment is made), so that no request
//! is skipped and `offset_reset = "fail"` does not stop on them. A partition number counts as
//! this instance's (restored, resumed, swept) only when its input partitions are assigned: in a
//! group where some members do not consume the erasure topic (a rolling upgrade), an erasure
//! partition assigned without its input partition stays paused until the next rebalance.

use super::restore::{RestoreDone, Restorer};
use crate::config::OffsetReset;
use crate::telemetry::Health;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use std::time::Duration;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedSender;

/// How long a revocation waits for the producer's deliveries (well within
/// `max.poll.interval.ms`; the producer's `message.timeout.ms` is longer, 120 s).
const REVOKE_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// The consumer's context: tracks the assignment and starts restores.
pub struct RebalanceContext {
    health: Arc<Health>,
    restorer: Arc<Restorer>,
    done: UnboundedSender<RestoreDone>,
    /// Incremented by every rebalance event.
    generation: Arc<AtomicU64>,
    /// The assigned partitions (of every input topic) and those still restoring.
    assignment: Mutex<Assignment>,
    /// Where a partition without a committed offset starts: for its lag before it is consumed.
    offset_reset: OffsetReset,
    /// The erasure topic.
    erasures: String,
    /// At-least-once, the operator's producer: flushed before partitions are given up, so
    /// that the states of a commit in flight reach the changelog before their next owner
    /// restores it.
    flush_on_revoke: Option<FutureProducer>,
}

/// The current assignment.
#[derive(Debug, Default, Clone)]
pub struct Assignment {
    /// Assigned `(topic, partition)`s.
    pub topic_partitions: Vec<(String, i32)>,
    /// The partition numbers whose input partitions are assigned: this instance's.
    pub owned: BTreeSet<i32>,
    /// Partitions whose restore has not finished.
    pub restoring: BTreeSet<i32>,
    /// When the partitions were assigned.
    pub since: Option<std::time::Instant>,
}

impl Assignment {
    /// The topic-partitions of `partition`, for pausing or resuming it.
    pub fn of_partition(&self, partition: i32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (t, p) in self.topic_partitions.iter().filter(|(_, p)| *p == partition) {
            tpl.add_partition(t, *p);
        }
        tpl
    }
}

impl RebalanceContext {
    /// A context that restores with `restorer` and reports finished restores to `done`.
    /// `offset_reset` is the group's policy for partitions without a committed offset.
    /// `erasures` is the erasure topic. `flush_on_revoke`, at-least-once, is the producer to
    /// flush before a revocation returns.
    pub fn new(
        health: Arc<Health>,
        restorer: Arc<Restorer>,
        done: UnboundedSender<RestoreDone>,
        offset_reset: OffsetReset,
        erasures: String,
        flush_on_revoke: Option<FutureProducer>,
    ) -> RebalanceContext {
        RebalanceContext { health, restorer, done, generation: Arc::new(AtomicU64::new(0)), assignment: Mutex::new(Assignment::default()), offset_reset, erasures, flush_on_revoke }
    }

    /// Sets the erasure partitions of `tpl` that have no committed offset to start from their
    /// beginning (see the module docs).
    fn erasures_from_their_start(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let mut erasures = TopicPartitionList::new();
        for e in tpl.elements_for_topic(&self.erasures) {
            erasures.add_partition(&self.erasures, e.partition());
        }
        if erasures.count() == 0 {
            return;
        }
        match consumer.committed_offsets(erasures, Duration::from_secs(10)) {
            Ok(committed) => {
                for e in committed.elements().iter().filter(|e| e.offset() == Offset::Invalid) {
                    if let Err(err) = tpl.set_partition_offset(&self.erasures, e.partition(), Offset::Beginning) {
                        tracing::warn!(partition = e.partition(), error = %err, "could not start an erasure partition at its beginning");
                    }
                }
            }
            Err(e) => tracing::warn!(topic = %self.erasures, error = %e, "committed offsets of the erasure topic unknown: its new partitions start where offset_reset says"),
        }
    }

    /// The current generation: it changes with every rebalance event.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// A copy of the current assignment.
    pub fn assignment(&self) -> Assignment {
        self.assignment.lock().expect("assignment lock").clone()
    }

    /// Called by the loop when the restore of `partition` asked for by assignment `generation`
    /// finished: returns the topic-partitions to resume, or `None` when the assignment has
    /// changed since.
    pub fn restored(&self, partition: i32, generation: u64) -> Option<TopicPartitionList> {
        if generation != self.generation() {
            return None;
        }
        let mut a = self.assignment.lock().expect("assignment lock");
        if !a.restoring.remove(&partition) {
            return None;
        }
        self.health.ready(partition);
        Some(a.of_partition(partition))
    }
}

/// Records of a partition the operator has not consumed yet: from its position (the next offset
/// it will be handed, else the committed one, else where `offset_reset` starts it: `reset`) to
/// the last stable offset (what a `read_committed` consumer can read). `None` while none of
/// them is known (librdkafka says -1 or -1001).
pub fn partition_lag(ls_offset: i64, app_offset: i64, committed_offset: i64, reset: Option<i64>) -> Option<i64> {
    let position = [Some(app_offset), Some(committed_offset), reset].into_iter().flatten().find(|&o| o >= 0)?;
    (ls_offset >= 0).then(|| (ls_offset - position).max(0))
}

/// The lag gauge of one input partition.
fn lag_gauge(topic: &str, partition: i32) -> metrics::Gauge {
    metrics::gauge!("intentflow_consumer_lag_records", "topic" => topic.to_string(), "partition" => partition.to_string())
}

impl ClientContext for RebalanceContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): the lag of each assigned input
    /// partition ([`partition_lag`]), restoring ones included (their position is the committed
    /// offset).
    fn stats(&self, statistics: Statistics) {
        let assigned = self.assignment.lock().expect("assignment lock").topic_partitions.clone();
        for (topic, partition) in assigned {
            let Some(p) = statistics.topics.get(&topic).and_then(|t| t.partitions.get(&partition)) else { continue };
            let reset = match self.offset_reset {
                OffsetReset::Earliest => Some(p.lo_offset),
                OffsetReset::Latest => Some(p.ls_offset),
                OffsetReset::Fail => None,
            };
            if let Some(lag) = partition_lag(p.ls_offset, p.app_offset, p.committed_offset, reset) {
                lag_gauge(&topic, partition).set(lag as f64);
                // The status page shows the clickstream's lag; the erasure topic's (requests not
                // applied yet) is in the metric alone.
                if topic != self.erasures {
                    self.health.live.set_lag(&topic, partition, lag);
                }
            }
        }
    }
}

impl ConsumerContext for RebalanceContext {
    /// rdkafka's own rebalance (for the eager assignors, the only ones accepted), with the
    /// erasure partitions' starting offsets set before the assignment.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let assign = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
        if assign {
            self.erasures_from_their_start(consumer, tpl);
        } else if let Some(producer) = &self.flush_on_revoke {
            if let Err(e) = producer.flush(REVOKE_FLUSH_TIMEOUT) {
                // Deliveries still in flight could land on the changelog after the next owner
                // restored it, over its newer states. A crash instead leaves this instance's
                // store a prefix of the changelog, and its restart catches up.
                tracing::error!(error = %e, timeout = ?REVOKE_FLUSH_TIMEOUT, "the producer did not flush before partitions were given up; stopping at once");
                std::process::abort();
            }
        }
        let client = consumer.client().native_ptr();
        // SAFETY: the client pointer is valid while `consumer` lives and the list's for the
        // call; librdkafka copies the list.
        let result = unsafe { rdkafka::bindings::rd_kafka_assign(client, if assign { tpl.ptr() } else { std::ptr::null_mut() }) };
        if result != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            tracing::error!(error = ?result, assign, "librdkafka refused the (un)assignment");
        }
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            e => Rebalance::Error(KafkaError::Rebalance(e.into())),
        };
        self.post_rebalance(consumer, &rebalance);
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // The eager assignors revoke everything, then assign the new set. (Asking the consumer
        // for its assignment here can deadlock while it closes.)
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let mut a = self.assignment.lock().expect("assignment lock");
        match rebalance {
            Rebalance::Assign(tpl) => {
                // Nothing is fetched for a partition before its state is restored.
                if let Err(e) = consumer.pause(tpl) {
                    tracing::error!(error = %e, "pausing newly assigned partitions failed");
                }
                a.topic_partitions = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
                a.owned = a.topic_partitions.iter().filter(|(t, _)| *t != self.erasures).map(|(_, p)| *p).collect();
                a.restoring = a.owned.clone();
                a.since = Some(std::time::Instant::now());
                let partitions: Vec<i32> = a.restoring.iter().copied().collect();
                tracing::info!(partitions = ?partitions, generation, "partitions assigned; restoring them in the background");
                self.health.assigned(&partitions);
                for &p in &partitions {
                    self.restorer.spawn(p, generation, self.generation.clone(), self.done.clone());
                }
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                // Their lag is their next owner's to report.
                for (topic, partition) in &a.topic_partitions {
                    lag_gauge(topic, *partition).set(0.0);
                }
                *a = Assignment::default();
                self.health.revoked();
            }
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                *a = Assignment::default();
                self.health.revoked();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::partition_lag;

    #[test]
    fn lag_runs_from_the_position_to_the_last_stable_offset() {
        assert_eq!(partition_lag(1_000, 400, 300, Some(0)), Some(600), "consumed up to 400");
        assert_eq!(partition_lag(1_000, -1, 300, Some(0)), Some(700), "nothing consumed yet (paused while restoring): from the committed offset");
        assert_eq!(partition_lag(1_000, -1, -1001, Some(0)), Some(1_000), "a new group starts at the reset position");
        assert_eq!(partition_lag(1_000, 1_000, 300, None), Some(0));
        // A transaction marker can put the position one past the last stable offset.
        assert_eq!(partition_lag(1_000, 1_001, 300, None), Some(0));
        assert_eq!(partition_lag(-1, 400, 300, None), None);
        assert_eq!(partition_lag(1_000, -1, -1001, None), None, "no committed offset (librdkafka's OFFSET_INVALID), offset_reset = fail");
    }
}
