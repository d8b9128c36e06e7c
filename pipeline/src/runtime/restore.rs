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
//! newer encoding — is quarantined to the dead-letter topic and its user starts fresh; a
//! partition whose users end on another model's state is refused, those users dropped or (under `model_reload`) kept for the operator to migrate, per
//! the configured policy. Neither stops the partition (a refusal stops the operator, by the
//! user's choice). Keys that end on a quarantined or dropped record are returned, and the batch
//! loop writes their tombstones in the partition's next transaction, so the changelog converges
//! to the store once compacted (until then a full restore meets, and reports, the same records
//! again). At most four partitions restore at once.

use crate::dlq::QuarantinedState;
use crate::kafka::read::RangeReader;
use crate::kafka::KafkaClients;
use crate::telemetry::Health;
use anyhow::{bail, Context, Result};
use intentflow_state::changelog::{plan_restore, ModelPolicy, RestorePlan, RestoreTrack};
use intentflow_state::StateStore;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Records applied to RocksDB per atomic write while restoring.
const CHUNK: usize = 20_000;
/// Restores that run at once; the others wait their turn (each holds two Kafka clients and a
/// thread, and an eager rebalance restores every assigned partition).
const CONCURRENT_RESTORES: usize = 4;

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
    /// Changelog keys to delete with tombstones so that the changelog agrees with the store:
    /// keys whose last record was quarantined or (under reset) of another model. The batch loop
    /// writes them in the partition's next transaction, fenced like any of its writes.
    pub tombstones: Vec<Vec<u8>>,
    /// The changelog offset the store now reflects.
    pub changelog_offset: i64,
    /// Wall time of the restore (a restore cut short because its partition was revoked stops
    /// at a chunk boundary and reports what it did).
    pub seconds: f64,
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
    producer: FutureProducer,
    health: Arc<Health>,
    runtime: tokio::runtime::Handle,
    /// One lock per partition: a partition revoked and assigned again while its first restore
    /// still runs is restored by one thread at a time.
    locks: Mutex<HashMap<i32, Arc<Mutex<()>>>>,
    /// Restores running now, at most [`CONCURRENT_RESTORES`].
    running: (Mutex<usize>, Condvar),
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
    /// If the producer cannot be created.
    pub fn new(cfg: RestorerConfig) -> Result<Restorer> {
        Ok(Restorer {
            producer: cfg.clients.producer(&[])?,
            clients: cfg.clients,
            topic: cfg.topic,
            store: cfg.store,
            model: cfg.model,
            policy: cfg.policy,
            dlq_topic: cfg.dlq_topic,
            health: cfg.health,
            runtime: tokio::runtime::Handle::current(),
            locks: Mutex::new(HashMap::new()),
            running: (Mutex::new(0), Condvar::new()),
            invalid: crate::telemetry::state_records_invalid("changelog"),
        })
    }

    /// Restores `partition` on a thread of its own and reports to `done`, whatever happens (a
    /// panic is reported as an error). The restore stops early (at a chunk boundary) once
    /// `current` has moved past `generation`: the partition was revoked.
    pub fn spawn(self: &Arc<Self>, partition: i32, generation: u64, current: Arc<AtomicU64>, done: UnboundedSender<RestoreDone>) {
        let me = self.clone();
        let report = done.clone();
        let spawned = std::thread::Builder::new().name(format!("restore-{partition}")).spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| me.restore(partition, || current.load(Ordering::SeqCst) != generation)))
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the restore thread of partition {partition} panicked")));
            // The loop may have stopped meanwhile; then nobody needs the answer.
            let _ = done.send(RestoreDone { partition, generation, result });
        });
        if let Err(e) = spawned {
            let _ = report.send(RestoreDone { partition, generation, result: Err(anyhow::anyhow!("cannot start a restore thread: {e}")) });
        }
    }

    /// Waits for a free restore slot; the slot is given back when the guard drops.
    fn turn(&self) -> impl Drop + '_ {
        struct Turn<'r>(&'r (Mutex<usize>, Condvar));
        impl Drop for Turn<'_> {
            fn drop(&mut self) {
                *self.0 .0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) -= 1;
                self.0 .1.notify_one();
            }
        }
        let (count, freed) = &self.running;
        let mut n = count.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *n >= CONCURRENT_RESTORES {
            n = freed.wait(n).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *n += 1;
        Turn(&self.running)
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
    /// Kafka errors, RocksDB errors, and a partition that ends on another model's state under
    /// [`ModelPolicy::Refuse`].
    pub fn restore(&self, partition: i32, cancelled: impl Fn() -> bool) -> Result<Restored> {
        // The partition's lock first, then a turn: a restore of a newer assignment cannot overtake
        // an older one of the same partition and be undone by it.
        let lock = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(partition).or_default().clone();
        let _one_at_a_time = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _turn = self.turn();
        // A committed unit the batch loop is still writing (announced before this assignment)
        // lands first: the restore reads the store after it, and its later records are not
        // overwritten by it.
        self.store.wait_for_announced_writes();
        let started = Instant::now();
        let skipped = |local| Restored {
            partition,
            plan: RestorePlan::UpToDate,
            records: 0,
            quarantined: 0,
            reset_users: 0,
            tombstones: Vec::new(),
            changelog_offset: local,
            seconds: started.elapsed().as_secs_f64(),
        };
        if cancelled() {
            // Revoked while waiting: the store is not touched (a newer restore may follow).
            return Ok(skipped(self.store.changelog_offset(partition)?.unwrap_or(-1)));
        }
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
            tombstones: Vec::new(),
            changelog_offset: local.unwrap_or(high),
            seconds: 0.0,
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
        let mut track = RestoreTrack::default();
        if from >= high {
            // Nothing to read (an empty changelog after a rebuild): the store reflects its end.
            self.store.apply_changelog(partition, [], high, (&self.model, self.policy), &mut track)?;
            done.changelog_offset = high;
            done.seconds = started.elapsed().as_secs_f64();
            return Ok(done);
        }

        let consumer = self.consumer("read_committed")?;
        let topics = [self.topic.clone()];
        // Reaching the high watermark, not just the last stable offset, waits out a transaction
        // that a crashed instance left open.
        let mut reader = RangeReader::new(&consumer, &topics, partition, &[(from, high)])?;
        let mut chunk: Vec<OwnedMessage> = Vec::with_capacity(CHUNK);
        loop {
            reader.next_batch(CHUNK, &mut chunk).with_context(|| format!("restoring changelog {}/{partition}", self.topic))?;
            // Everything read so far is applied: the chunk's end is where the reader stands.
            let reached = if reader.done() { high } else { reader.positions()[0] };
            let before = done.records;
            self.apply(partition, &chunk, reached, &mut track, &mut done)?;
            chunk.clear();
            done.changelog_offset = reached;
            metrics::counter!("intentflow_restored_records_total").increment(done.records - before);
            self.health.restoring(partition, done.records);
            fail::fail_point!("restore-chunk");
            if reader.done() {
                break;
            }
            if cancelled() {
                done.seconds = started.elapsed().as_secs_f64();
                return Ok(done);
            }
        }
        if self.policy == ModelPolicy::Refuse {
            if let Some(e) = track.refusal(partition, &self.model) {
                // Forget the partition locally, so that the next start restores it again and
                // refuses again, instead of finding it up to date.
                self.store.clear_partition(partition)?;
                return Err(e.into());
            }
        }
        if self.policy == ModelPolicy::Reset {
            done.reset_users = track.foreign.len() as u64;
        }
        done.tombstones = track.tombstones(self.policy);
        done.seconds = started.elapsed().as_secs_f64();
        Ok(done)
    }

    fn apply(&self, partition: i32, chunk: &[OwnedMessage], next: i64, track: &mut RestoreTrack, done: &mut Restored) -> Result<()> {
        let records = chunk.iter().map(|m| (m.offset(), m.key().unwrap_or_default(), m.payload()));
        let applied = self.store.apply_changelog(partition, records, next, (&self.model, self.policy), track)?;
        done.records += applied.records as u64;
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
            if let Err((e, _)) = self.runtime.block_on(self.producer.send(record, Duration::from_secs(30))) {
                bail!("sending a quarantined changelog record of partition {partition} to {}: {e}", self.dlq_topic);
            }
            done.quarantined += 1;
        }
        Ok(())
    }
}
