//! What the consumer does when partitions move, without ever blocking in the rebalance
//! callback.
//!
//! An assignment pauses its partitions at once and starts one background restore per partition
//! ([`super::restore`]); the callback returns immediately, so the consumer keeps polling (no
//! eviction for exceeding `max.poll.interval.ms`, however long a changelog is) and the
//! partitions that are already up to date go on processing. Each finished restore is reported
//! to the batch loop, which resumes that partition ([`Assignment::resume`]) if it still belongs to
//! the same assignment. Every rebalance event bumps a generation counter: the loop drops a batch
//! collected across a rebalance, and a restore whose partition was revoked stops early.

use super::restore::{RestoreDone, Restorer};
use crate::telemetry::Health;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, TopicPartitionList};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedSender;

/// The consumer's context: tracks the assignment and starts restores.
pub struct RebalanceContext {
    health: Arc<Health>,
    restorer: Arc<Restorer>,
    done: UnboundedSender<RestoreDone>,
    /// Incremented by every rebalance event.
    generation: Arc<AtomicU64>,
    /// The assigned partitions (of every input topic) and those still restoring.
    assignment: Mutex<Assignment>,
}

/// The current assignment.
#[derive(Debug, Default, Clone)]
pub struct Assignment {
    /// Assigned `(topic, partition)`s.
    pub topic_partitions: Vec<(String, i32)>,
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

    fn partitions(&self) -> BTreeSet<i32> {
        self.topic_partitions.iter().map(|(_, p)| *p).collect()
    }
}

impl RebalanceContext {
    /// A context that restores with `restorer` and reports finished restores to `done`.
    pub fn new(health: Arc<Health>, restorer: Arc<Restorer>, done: UnboundedSender<RestoreDone>) -> RebalanceContext {
        RebalanceContext { health, restorer, done, generation: Arc::new(AtomicU64::new(0)), assignment: Mutex::new(Assignment::default()) }
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

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
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
                a.restoring = a.partitions();
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
