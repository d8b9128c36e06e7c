//! Bringing partitions' local state up to date from the changelog topic, in the background.
//!
//! When partitions are assigned (at start-up or in a rebalance), the consumer pauses them and
//! each one is restored on its own thread while the partitions that are already up to date go on
//! processing; a restored partition is resumed by the batch loop (see [`super::rebalance`]).
//! Restoring reads the changelog partition with `read_committed` from the offset the local store
//! recorded ([`plan_restore`]) up to the partition's high watermark, applying records to RocksDB
//! in atomic chunks that also record how far they got, so a restore cut short (a crash, or the
//! partition revoked meanwhile) leaves a consistent prefix that the next one continues. Reaching
//! the high watermark (not merely the last stable offset) means an open transaction of a crashed
//! instance is waited out: it is either aborted (its records are skipped) or committed (its
//! records are applied), never half seen. Input processing resumes at the committed consumer
//! offsets, which the restored states reflect exactly (see `intentflow_state::changelog`).
//!
//! A changelog record that cannot be used — it does not decode, names no known key, or uses a
//! newer encoding — is quarantined to the dead-letter topic and its user starts fresh; a state
//! of another model is refused or dropped per the configured policy. Neither stops the partition
//! (a refusal stops the operator, by the user's choice).

use super::dlq::QuarantinedState;
use crate::kafka::KafkaClients;
use crate::telemetry::Health;
use anyhow::{bail, Context, Result};
use intentflow_state::changelog::{plan_restore, ModelPolicy, RestorePlan};
use intentflow_state::StateStore;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Records applied to RocksDB per atomic write while restoring.
const CHUNK: usize = 20_000;

/// What restoring one partition did.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    /// Changelog (= input) partition.
    pub partition: i32,
    /// The decision taken.
    pub plan: RestorePlan,
    /// Changelog records applied.
    pub records: u64,
    /// Records quarantined to the dead-letter topic.
    pub quarantined: u64,
    /// States of another model dropped.
    pub reset_users: u64,
    /// The changelog offset the store now reflects.
    pub changelog_offset: i64,
    /// Wall time of the restore.
    pub seconds: f64,
    /// The partition was revoked before the restore finished: it stopped at a chunk boundary.
    pub cancelled: bool,
}

/// A finished restore, for the batch loop.
#[derive(Debug)]
pub struct RestoreDone {
    /// The partition.
    pub partition: i32,
    /// The assignment generation that asked for it.
    pub generation: u64,
    /// What it did, or why it failed.
    pub result: Result<Restored>,
}

/// What a restore needs besides the partition.
pub struct Restorer {
    clients: KafkaClients,
    topic: String,
    store: Arc<StateStore>,
    model: String,
    policy: ModelPolicy,
    dlq_topic: String,
    /// A plain (non-transactional) producer for quarantined records.
    dlq: FutureProducer,
    health: Arc<Health>,
    runtime: tokio::runtime::Handle,
    /// One lock per partition: a partition revoked and assigned again while its first restore
    /// still runs is restored by one thread at a time.
    locks: Mutex<HashMap<i32, Arc<Mutex<()>>>>,
    invalid: metrics::Counter,
}

/// How a [`Restorer`] is set up.
pub struct RestorerConfig {
    /// Clients of the cluster.
    pub clients: KafkaClients,
    /// The changelog topic.
    pub topic: String,
    /// The store restored into.
    pub store: Arc<StateStore>,
    /// The loaded model's version: states of another are refused or dropped.
    pub model: String,
    /// What to do with another model's states.
    pub policy: ModelPolicy,
    /// Where quarantined records go.
    pub dlq_topic: String,
    /// Where restore progress shows.
    pub health: Arc<Health>,
}

impl Restorer {
    /// A restorer; call from within the Tokio runtime (deliveries of quarantined records are
    /// awaited on it).
    ///
    /// # Errors
    ///
    /// If the dead-letter producer cannot be created.
    pub fn new(cfg: RestorerConfig) -> Result<Restorer> {
        Ok(Restorer {
            dlq: cfg.clients.producer(&[])?,
            clients: cfg.clients,
            topic: cfg.topic,
            store: cfg.store,
            model: cfg.model,
            policy: cfg.policy,
            dlq_topic: cfg.dlq_topic,
            health: cfg.health,
            runtime: tokio::runtime::Handle::current(),
            locks: Mutex::new(HashMap::new()),
            invalid: crate::telemetry::state_records_invalid("changelog"),
        })
    }

    /// Restores `partition` on a thread of its own and reports to `done`. The restore stops
    /// early (at a chunk boundary) once `current` has moved past `generation`: the partition was
    /// revoked.
    pub fn spawn(self: &Arc<Self>, partition: i32, generation: u64, current: Arc<AtomicU64>, done: UnboundedSender<RestoreDone>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new().name(format!("restore-{partition}")).spawn(move || {
            let result = me.restore(partition, || current.load(Ordering::SeqCst) != generation);
            // The loop may have stopped meanwhile; then nobody needs the answer.
            let _ = done.send(RestoreDone { partition, generation, result });
        });
        if let Err(e) = spawned {
            tracing::error!(partition, error = %e, "cannot start a restore thread");
        }
    }

    fn consumer(&self, isolation: &str) -> Result<BaseConsumer> {
        let mut cfg = self.clients.reader_config("intentflow-restore", isolation);
        cfg.set("enable.partition.eof", "true").set("fetch.max.bytes", "52428800").set("max.partition.fetch.bytes", "10485760");
        cfg.create().context("creating the changelog restore consumer")
    }

    /// Restores one partition; `cancelled` is asked between chunks.
    ///
    /// # Errors
    ///
    /// Kafka errors, RocksDB errors, and a state of another model under
    /// [`ModelPolicy::Refuse`].
    pub fn restore(&self, partition: i32, cancelled: impl Fn() -> bool) -> Result<Restored> {
        let lock = self.locks.lock().expect("restore locks").entry(partition).or_default().clone();
        let _one_at_a_time = lock.lock().expect("partition restore lock");
        let started = Instant::now();
        // Watermarks from a read_uncommitted client: the high watermark, past any open transaction.
        let (low, high) = self
            .consumer("read_uncommitted")?
            .fetch_watermarks(&self.topic, partition, Duration::from_secs(30))
            .with_context(|| format!("watermarks of changelog {}/{partition}", self.topic))?;
        let local = self.store.changelog_offset(partition)?;
        let plan = plan_restore(local, low, high);
        let mut done = Restored {
            partition,
            plan: plan.clone(),
            records: 0,
            quarantined: 0,
            reset_users: 0,
            changelog_offset: local.unwrap_or(high),
            seconds: 0.0,
            cancelled: false,
        };
        let from = match &plan {
            RestorePlan::UpToDate => {
                done.seconds = started.elapsed().as_secs_f64();
                return Ok(done);
            }
            RestorePlan::CatchUp { from } => *from,
            RestorePlan::Rebuild { from, reason } => {
                tracing::warn!(partition, reason = %reason, "rebuilding the partition's local state from the changelog");
                self.store.clear_partition(partition)?;
                *from
            }
        };

        let consumer = self.consumer("read_committed")?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(from))?;
        consumer.assign(&tpl)?;
        let mut chunk: Vec<(i64, Vec<u8>, Option<Vec<u8>>)> = Vec::with_capacity(CHUNK);
        loop {
            let next = crate::kafka::read::read_range(&consumer, &self.topic, partition, high, CHUNK, |m| {
                chunk.push((m.offset(), m.key().unwrap_or_default().to_vec(), m.payload().map(<[u8]>::to_vec)));
                Ok(())
            })
            .with_context(|| format!("restoring changelog {}/{partition}", self.topic))?;
            let reached = next.unwrap_or_else(|| chunk.last().map_or(from, |(o, ..)| o + 1));
            self.apply(partition, &mut chunk, reached, &mut done)?;
            done.changelog_offset = reached;
            self.health.restoring(partition, done.records);
            fail::fail_point!("restore-chunk");
            if next.is_some() {
                break;
            }
            if cancelled() {
                done.cancelled = true;
                break;
            }
        }
        done.seconds = started.elapsed().as_secs_f64();
        Ok(done)
    }

    fn apply(&self, partition: i32, chunk: &mut Vec<(i64, Vec<u8>, Option<Vec<u8>>)>, next: i64, done: &mut Restored) -> Result<()> {
        let records = chunk.iter().map(|(o, k, v)| (*o, k.as_slice(), v.as_deref()));
        let applied = self.store.apply_changelog(partition, records, next, &self.model, self.policy)?;
        chunk.clear();
        done.records += applied.records as u64;
        done.reset_users += applied.reset_users as u64;
        for q in applied.quarantined {
            let q = QuarantinedState {
                topic: self.topic.clone(),
                partition,
                offset: q.offset,
                kind: q.error.kind(),
                reason: q.error.to_string(),
                key: q.key,
                value: q.value,
            };
            q.report(&self.invalid);
            let record = FutureRecord::to(&self.dlq_topic).key(&q.key).payload(&q.value).headers(q.headers());
            let delivery = self.runtime.block_on(self.dlq.send(record, Duration::from_secs(30)));
            if let Err((e, _)) = delivery {
                bail!("sending a quarantined changelog record of partition {partition} to {}: {e}", self.dlq_topic);
            }
            done.quarantined += 1;
        }
        Ok(())
    }
}
