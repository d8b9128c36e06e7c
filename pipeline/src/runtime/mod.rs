//! The streaming runtime of `intentflow run`: the batch loop.
//!
//! One loop owns the consumer, the producer, the state store and the operator. Batches are
//! grouped into *units* of one commit interval (`commit_interval_ms`); under exactly-once a unit
//! is one Kafka transaction. Per batch:
//!
//! 1. collect a micro-batch: the first record and whatever else has arrived (up to
//!    `max_batch_records`), without waiting for more; a rebalance while collecting drops what was
//!    collected before it (the new assignment re-reads it from the committed offsets); with
//!    several input topics, records pass through [`inputs::InputOrder`] so that a partition's
//!    topics are applied in the order a replay uses;
//! 2. drop records the state store already reflects (see [`crate::offsets::already_applied`]);
//! 3. decode, then score with [`IntentOperator::process`] (waves of batched GRU steps; events a
//!    user's state has already applied are skipped by its fences), reading users' states through
//!    the unit's staged writes ([`intentflow_state::StagedView`]): a batch sees the states the
//!    unit's earlier batches built, which RocksDB does not hold yet. A user with more events than
//!    `max_waves_per_batch` has the rest *deferred*: they lead the next batch (which then takes
//!    fewer new records and does not wait for any), and the partition's next offset stays at the
//!    first of them until they are applied, so a restart reads them again (the fences skip the
//!    other users' events read again with them);
//! 4. enqueue the intents and dead letters (and, under exactly-once, the users' new states to the
//!    changelog) without awaiting them, so the next batch is scored while they travel, and stage
//!    the states and next offsets.
//!
//! When the unit is due (checked after each batch, and by a timer when no records come): an
//! interval after the last commit began under exactly-once (as in Kafka Streams), after the
//! unit began under at-least-once ([`Unit::due`]); or once [`MAX_STAGED_BYTES`] of states are
//! staged, the unit commits:
//!
//! 5. at-least-once: await the intents, then send each staged user's latest state to the
//!    changelog; then (both guarantees) the next input offsets to the changelog, await every
//!    acknowledgement, and under exactly-once commit the transaction with the consumer offsets;
//! 6. only then write the staged states, the next input offsets and the changelog offsets to
//!    RocksDB in one atomic batch;
//! 7. at-least-once only: commit the offsets to the consumer group.
//!
//! Under exactly-once the loop does step 5 itself (one producer runs one transaction at a
//! time). Under at-least-once the unit is handed over to a *commit in flight* ([`Committing`])
//! and the loop goes on scoring the next unit: the loop's select moves the commit on whenever
//! the acknowledgements it waits for have arrived. Under both, RocksDB's write (step 6) runs on
//! a blocking thread, and the next unit's batches read the committing unit's states under
//! their own until RocksDB has them. One commit is in flight at a time (the next unit's end
//! waits for it), so the store still takes the units in order. A rebalance settles it first:
//! one whose states are not sent yet (at-least-once) is dropped like the open unit (its
//! partitions are read again; at-least-once repeats their intents); any other completes. So
//! that at-least-once states sent reach the changelog before a partition's next owner restores
//! it, the consumer's context flushes the producer before it gives partitions up.
//!
//! Newly assigned partitions stay paused while they restore from the changelog in the
//! background ([`rebalance`], [`restore`]); the loop resumes each one when its restore reports
//! back, and the others go on meanwhile. A crash anywhere leaves a store that is a prefix of the
//! committed changelog, so a restart catches up from where the store stopped — it is never wiped.
//!
//! Under exactly-once a crash before the commit in step 5 aborts the transaction (the restarted
//! instance's `init_transactions` does so at once): nothing of the unit is visible to
//! `read_committed` readers and its batches are processed again from the same state. A failed
//! delivery or transaction call aborts the unit and rewinds its partitions to the unit's first
//! offsets; a rebalance aborts it too (its group metadata, taken when it began, would fence its
//! offsets anyway), and the new assignment reads from the committed offsets. A crash between 5
//! and 6 leaves the store one unit behind the changelog, which the restore applies; so does a
//! crash after 6 (the store writes without RocksDB's write-ahead log and loses what it wrote
//! since its last memtable flush: docs/state.md). On
//! SIGTERM/SIGINT the loop finishes the batch in hand and any deferred events, commits the unit
//! and returns.
//!
//! Erasure requests (the erasure topic, consumed with the input) and the expiry sweep delete
//! users' states within the unit (`forget`); a reloaded model ([`reload`]) is switched to
//! between two units.
//!
//! The other modules: [`startup`] opens everything, [`handover`] adopts a replayed state,
//! [`watchdog`] ends a process stuck in a transaction call, and `consume` is what the loop does
//! with the consumer (collecting, rewinding, reporting gaps). What goes to the dead-letter topic
//! is named in [`crate::dlq`]; the offset decisions are pure functions in [`crate::offsets`].

mod consume;
mod forget;
pub mod handover;
pub mod reload;
pub mod inputs;
pub mod rebalance;
pub mod restore;
pub mod sink;
pub mod startup;
pub mod watchdog;

pub use rebalance::RebalanceContext;

use crate::config::RunConfig;
use crate::telemetry::{BatchMetrics, BatchStats, Health, Phase};
use anyhow::{bail, Context, Result};
use consume::{collect, report_gap, rewind};
use forget::{ErasureRequest, Sweep};
use crate::dlq::{self, QuarantinedState};
use crate::offsets;
use inputs::InputOrder;
use intentflow_operators::decode::{decode_records, Rejected};
use intentflow_operators::{EmittedAt, PositionedEvent, SourceRecord};
use intentflow_schemas::EventDecoder;
use crate::kafka::DeliveryWindow;
use intentflow_state::{Staged, StagedView, StateRead};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerGroupMetadata, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::Producer;
use rdkafka::{Message, Offset, TopicPartitionList};
use restore::RestoreDone;
use startup::Serving;
use sink::{changelog_positions, offsets_tpl, BatchRecords};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Consecutive aborted transactions after which the operator stops.
const MAX_ABORTS_IN_A_ROW: u32 = 10;
/// Staged states (keys and values) at which a unit commits before its interval is over, which
/// bounds the memory of an open transaction whatever the interval and the rate (twice this
/// with a commit in flight).
const MAX_STAGED_BYTES: usize = 64 << 20;

/// Totals of a run, returned when it stops.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// Records consumed (counted when their unit committed, as are the others).
    pub records: u64,
    /// Intents produced and acknowledged.
    pub intents: u64,
    /// Records rejected as invalid.
    pub invalid: u64,
    /// Records skipped because the state already reflected them.
    pub skipped: u64,
    /// Batches processed.
    pub batches: u64,
    /// Transactions aborted (after a failure or at a rebalance; their batches were processed
    /// again).
    pub aborted: u64,
}

/// Resolves when `shutdown` says stop (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves at `deadline`, never without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Runs the operator until `shutdown` turns true. Returns the totals.
///
/// # Errors
///
/// Start-up failures (no model, state store locked, broker unreachable) and failures that
/// would risk losing data (a delivery that did not succeed and a transaction that could not be
/// aborted, a state write that failed, a restore that failed). Nothing of a failed batch is
/// committed, so a restart repeats it.
pub async fn run(cfg: RunConfig, mut shutdown: watch::Receiver<bool>, health: Arc<Health>) -> Result<RunSummary> {
    health.set_phase(Phase::Starting);
    health.set_liveness_timeout_ms(cfg.liveness_timeout_ms);
    let before = reload::Before::take(&cfg)?;
    let (started, mut restores) = startup::start(cfg, &health).await?;
    crate::telemetry::build_info(started.serving.version());
    // The state store's figures, now and every few seconds while the loop runs.
    let store = started.store.clone();
    let figures = tokio::spawn(async move {
        let mut every = tokio::time::interval(crate::telemetry::UPKEEP);
        loop {
            every.tick().await;
            crate::telemetry::store_figures(&store);
        }
    });
    health.set_phase(Phase::WaitingForAssignment);
    let mut reloads = reload::watch(&started.cfg, before, started.serving.operator.model().device().clone(), started.serving.version());
    let summary = BatchLoop::new(&started, &health).run(&mut shutdown, &mut restores, &mut reloads).await;
    figures.abort();
    health.set_phase(Phase::Stopped);
    started.consumer.unsubscribe();
    // The store writes without a write-ahead log: flushed, a clean exit needs no catch-up.
    let flushed = started.store.flush();
    let summary = summary?;
    flushed?;
    tracing::info!(?summary, "stopped");
    Ok(summary)
}

/// The loop's state across batches.
struct BatchLoop<'s> {
    s: &'s startup::Started,
    health: &'s Health,
    decoder: EventDecoder,
    metrics: BatchMetrics,
    invalid_states: metrics::Counter,
    applied: offsets::AppliedOffsets,
    /// The assignment generation the loop's buffers belong to.
    generation: u64,
    /// Per partition, changelog keys its restore found ending on a dropped or quarantined
    /// record: deleted by the next batch's transaction. Kept with the generation of the restore,
    /// which may be newer than the loop's buffers when its report wins the loop's select.
    tombstones: BTreeMap<i32, (u64, Vec<Vec<u8>>)>,
    /// Changelog records restored for an assignment: (its generation, records).
    restored_records: (u64, u64),
    summary: RunSummary,
    aborts_in_a_row: u32,
    /// How often units commit (`commit_interval_ms`).
    interval: Duration,
    /// Under exactly-once, when the last unit's commit began: the next unit is due an interval
    /// after it.
    last_commit: Option<Instant>,
    /// The open unit, if any.
    unit: Option<Unit<'s>>,
    /// The open unit's states and offsets, which its batches read and RocksDB gets when it
    /// commits.
    staged: Staged,
    /// The unit before, while its commit is under way.
    committing: Option<Committing<'s>>,
    /// Events the wave cap deferred: the next batch begins with them.
    carry: Vec<PositionedEvent>,
    /// Invalid records read beyond a deferred event of their partition: dead-lettered by a
    /// later batch, once their partition's next offset passes them.
    carry_rejected: Vec<Rejected>,
    /// Per topic-partition, one past the highest offset collected since the last rewind or
    /// rebalance: a partition's next offset once nothing of it is deferred (a batch of deferred
    /// events alone must not move it back to theirs).
    collected: BTreeMap<(String, i32), i64>,
    /// The erasure topic, consumed with the input ([`forget`]).
    erasures: String,
    /// Erasure requests of partitions held back by deferred events: applied by a later batch.
    carry_erasures: Vec<ErasureRequest>,
    /// The expiry sweep, with a `state_ttl_ms`.
    sweep: Option<Sweep>,
    /// The operator and model that score the batches: the one loaded at start-up until a
    /// reload switches to another ([`reload`]).
    serving: Arc<Serving>,
}

/// The batches of one commit interval: under exactly-once one Kafka transaction.
struct Unit<'s> {
    /// Its deliveries (under exactly-once inside the transaction).
    window: DeliveryWindow<'s>,
    /// Under exactly-once, the group's metadata when it began: a rebalance since fences its
    /// offsets, so the commit fails rather than commit offsets of partitions that moved.
    group: Option<ConsumerGroupMetadata>,
    /// The first offset read per topic-partition: where an abort rewinds to.
    first: BTreeMap<(String, i32), i64>,
    /// Tombstones sent in it: sent again by the next unit if it is abandoned.
    tombstones: BTreeMap<i32, (u64, Vec<Vec<u8>>)>,
    /// When it began.
    began: Instant,
    /// When it commits. Under exactly-once an interval after the last commit began (or after
    /// it began, when it is the first), as in Kafka Streams: the loop waits for a transaction's
    /// commit, and records that arrived meanwhile then wait one interval in all, not the commit
    /// and an interval after it; but at least half an interval after it began (after a commit
    /// slower than the interval). Under at-least-once, whose commits do not hold the loop, an
    /// interval after it began (paced from the last commit, p99 latency at 50 k/s measured
    /// 44.5 ms against 38 ms, medians of six).
    due: Instant,
    /// Batches processed into it.
    batches: u64,
    /// What its batches did, counted when it commits.
    outcome: BatchStats,
    /// Per batch, when its records were handed over and its intents' event times (epoch ms):
    /// their latencies are taken when the unit commits.
    latency: Vec<(Instant, Vec<i64>)>,
}

/// A unit whose commit is under way while the loop scores the next one: under at-least-once
/// its intents, then its states and offsets, are awaited by [`commit_progress`] in the loop's
/// select, not by the loop itself; under both guarantees RocksDB gets its states on a blocking
/// thread.
struct Committing<'s> {
    unit: Unit<'s>,
    /// Its states and offsets: the open unit's batches read them (under their own) until
    /// RocksDB has them.
    staged: Arc<Staged>,
    /// Restore tombstones, sent before its states.
    tombstones: BTreeMap<i32, (u64, Vec<Vec<u8>>)>,
    /// What scored it (a reload may switch models before it completes).
    serving: Arc<Serving>,
    /// The assignment generation it belongs to.
    generation: u64,
    step: CommitStep,
    /// When it was handed over.
    began: Instant,
}

/// What a commit in flight waits for.
enum CommitStep {
    /// At-least-once: its intents' acknowledgements; its states go after them.
    Intents,
    /// At-least-once: its states' and offsets' acknowledgements; RocksDB gets them after.
    States,
    /// RocksDB writing its states and offsets (and flushing them, after an erasure).
    Writing(tokio::task::JoinHandle<Result<(), intentflow_state::StateError>>),
    /// The write's outcome.
    Written(Result<()>),
}

/// Resolves when what the commit in flight waits for has happened (never without one).
/// Cancellation-safe, for the loop's select.
async fn commit_progress(committing: &mut Option<Committing<'_>>) -> Result<()> {
    let Some(c) = committing else { return std::future::pending().await };
    match &mut c.step {
        CommitStep::Intents | CommitStep::States => c.unit.window.finish().await.map(|_| ()),
        CommitStep::Writing(write) => {
            let written = match write.await {
                Ok(r) => r.context("writing a commit to the state store"),
                Err(e) => Err(anyhow::Error::from(e).context("the state store's writer")),
            };
            c.step = CommitStep::Written(written);
            Ok(())
        }
        CommitStep::Written(_) => Ok(()),
    }
}

impl<'s> BatchLoop<'s> {
    fn new(s: &'s startup::Started, health: &'s Health) -> BatchLoop<'s> {
        BatchLoop {
            s,
            health,
            decoder: EventDecoder::new(s.cfg.limits()),
            metrics: BatchMetrics::default().with_outputs(s.serving.operator.outputs().iter().map(|o| o.name.as_str())),
            invalid_states: crate::telemetry::state_records_invalid("store"),
            applied: offsets::AppliedOffsets::default(),
            generation: 0,
            tombstones: BTreeMap::new(),
            restored_records: (0, 0),
            summary: RunSummary::default(),
            aborts_in_a_row: 0,
            interval: Duration::from_millis(s.cfg.commit_interval_ms),
            last_commit: None,
            unit: None,
            staged: Staged::default(),
            committing: None,
            carry: Vec::new(),
            carry_rejected: Vec::new(),
            collected: BTreeMap::new(),
            erasures: s.cfg.erasure_topic(),
            carry_erasures: Vec::new(),
            sweep: Sweep::new(s.cfg.state_ttl_ms, s.cfg.state_ttl_sweep_ms),
            serving: s.serving.clone(),
        }
    }

    async fn run(
        mut self,
        shutdown: &mut watch::Receiver<bool>,
        restores: &mut tokio::sync::mpsc::UnboundedReceiver<RestoreDone>,
        reloads: &mut tokio::sync::mpsc::Receiver<Serving>,
    ) -> Result<RunSummary> {
        match self.batches(shutdown, restores, reloads).await {
            Ok(()) => Ok(self.summary),
            Err(e) => {
                // Abort an open transaction now rather than leave it to block `read_committed`
                // readers and the next owner's restore until the broker times it out.
                if let Err(abort) = self.abandon_unit("an error that stops the operator") {
                    tracing::warn!(error = format!("{abort:#}"), "could not abort the open transaction; the broker aborts it after transaction_timeout_ms");
                }
                // A committed unit's write in flight lands before the store is flushed and
                // closed (whatever its outcome: the error that stops the loop is reported).
                if let Some(Committing { step: CommitStep::Writing(write), .. }) = self.committing.take() {
                    let _ = write.await;
                }
                Err(e)
            }
        }
    }

    /// The loop itself; returns on shutdown or on the first error.
    async fn batches(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        restores: &mut tokio::sync::mpsc::UnboundedReceiver<RestoreDone>,
        reloads: &mut tokio::sync::mpsc::Receiver<Serving>,
    ) -> Result<()> {
        let s = self.s;
        let cfg = &s.cfg;
        let consumer = &s.consumer;
        let ctx = consumer.context();
        let mut order = InputOrder::new(&cfg.input_topics, Duration::from_millis(cfg.max_task_idle_ms), cfg.max_batch_records);
        loop {
            let mut generation = ctx.generation();
            self.follow(generation, order.as_mut()).await?;
            // Deferred events are processed at once, with whatever else has arrived; a stop
            // waits for them (below).
            let deferred = !self.carry.is_empty();
            if deferred {
                if *shutdown.borrow() {
                    break;
                }
                // Restores that finished meanwhile resume their partitions now: a carry that
                // never empties (a hot user behind a backlog) must not keep them paused.
                while let Ok(done) = restores.try_recv() {
                    let _busy = self.health.busy();
                    self.restored(consumer, done)?;
                }
            }
            let first = if deferred { None } else { tokio::select! {
                biased;
                () = stopped(shutdown) => break,
                Some(done) = restores.recv() => {
                    let _busy = self.health.busy();
                    self.restored(consumer, done)?;
                    continue;
                }
                () = sleep_until(self.unit.as_ref().map(|u| u.due)) => {
                    let _busy = self.health.busy();
                    self.end_unit(order.as_mut()).await?;
                    continue;
                }
                () = sleep_until(order.as_ref().and_then(InputOrder::deadline)) => None,
                Some(serving) = reloads.recv() => {
                    let _busy = self.health.busy();
                    self.switch_model(serving, order.as_mut()).await?;
                    continue;
                }
                () = sleep_until(self.sweep.as_ref().map(Sweep::due)) => {
                    let _busy = self.health.busy();
                    self.sweep_step(order.as_mut()).await?;
                    continue;
                }
                r = commit_progress(&mut self.committing) => {
                    let _busy = self.health.busy();
                    r?;
                    self.advance_committing().await?;
                    continue;
                }
                m = consumer.recv() => Some(m),
            }};
            // Deferred events count against the batch's records.
            let room = cfg.max_batch_records.saturating_sub(self.carry.len());
            let mut fetched: Vec<BorrowedMessage<'_>> = Vec::with_capacity(room.max(1));
            let arrived = first.is_some();
            if let Some(m) = first {
                collect(&mut fetched, m, &mut generation, ctx)?;
            }
            if arrived || deferred {
                // The batch is what has arrived by now: nothing waits for more records (the commit
                // interval paces the commits, not the batches), so a record is scored as soon as
                // the batch before it is done.
                while fetched.len() < room {
                    tokio::select! {
                        biased;
                        m = consumer.recv() => collect(&mut fetched, m, &mut generation, ctx)?,
                        () = std::future::ready(()) => break,
                    }
                }
            }
            if ctx.generation() != generation {
                tracing::info!(dropped = fetched.len(), "rebalance while collecting: records left to the new assignment");
                continue;
            }
            // A rebalance during the collection (the records kept are of the new assignment).
            self.follow(generation, order.as_mut()).await?;
            let batch = match &mut order {
                None => fetched,
                Some(o) => {
                    // Erasure requests need no merging: they are applied after the batch's events.
                    let mut released = Vec::with_capacity(cfg.max_batch_records);
                    for m in fetched {
                        if m.topic() == self.erasures {
                            released.push(m);
                        } else {
                            o.push(m);
                        }
                    }
                    // A topic whose consumer position is not known yet (nothing consumed since the
                    // assignment) is where the store says its partition stands.
                    o.release(consumer, |t, p| s.store.offset(t, p).ok().flatten(), &mut released);
                    released
                }
            };
            // From here to the next wait the loop is at work: `/livez` fails if it stays longer
            // than `liveness_timeout_ms`.
            let _busy = self.health.busy();
            if !batch.is_empty() || !self.carry.is_empty() {
                self.process(&batch, order.as_mut()).await?;
            }
            if self.unit.as_ref().is_some_and(|u| Instant::now() >= u.due) || self.staged.bytes() >= MAX_STAGED_BYTES {
                self.end_unit(order.as_mut()).await?;
            }
        }
        self.health.set_phase(Phase::Stopping);
        let _busy = self.health.busy();
        // Deferred events are applied before the last commit, so that a clean stop leaves
        // nothing to read again.
        while !self.carry.is_empty() && ctx.generation() == self.generation {
            self.process(&[], order.as_mut()).await?;
        }
        // The batches in hand are committed (or, if that fails, aborted: the next start repeats them).
        if self.unit.is_some() {
            self.end_unit(order.as_mut()).await?;
        }
        self.complete_committing().await?;
        self.finish()
    }

    /// [`BatchLoop::follow_generation`], after settling the commit in flight: one whose states
    /// are sent completes (its partitions' next owners restore them), one still waiting for
    /// its intents is dropped, as the open unit is.
    async fn follow(&mut self, generation: u64, order: Option<&mut InputOrder<'_>>) -> Result<()> {
        if generation != self.generation {
            match self.committing.as_ref().map(|c| &c.step) {
                Some(CommitStep::Intents) => self.abandon_committing(),
                Some(CommitStep::States) => {
                    tracing::info!("a rebalance came after the commit's states were sent: completing it");
                    self.complete_committing().await?;
                }
                Some(CommitStep::Writing(_) | CommitStep::Written(_)) => self.complete_committing().await?,
                None => {}
            }
        }
        self.follow_generation(generation, order)
    }

    /// Forgets what belongs to an earlier assignment when a rebalance happened since the loop's
    /// buffers were filled (maybe while a restore report won the loop's select): what the store
    /// reflects may have moved, and buffered records belong to the old assignment (the new one
    /// reads them again from the committed offsets). [`BatchLoop::follow`] settles the commit in
    /// flight first.
    fn follow_generation(&mut self, generation: u64, order: Option<&mut InputOrder<'_>>) -> Result<()> {
        if generation != self.generation {
            // Aborting the open transaction is a broker call: watched by `/livez` like a commit.
            let _busy = self.health.busy();
            if self.unit.is_some() {
                // Its partitions were revoked: their next owner (maybe this instance again) reads
                // them from the committed offsets and restores the committed states.
                self.abandon_unit("a rebalance")?;
            }
            self.applied.clear();
            self.forget_collected();
            // A revoked partition's next owner finds the same keys when it restores.
            self.tombstones.retain(|_, (g, _)| *g == generation);
            if let Some(o) = order {
                o.clear();
            }
            self.generation = generation;
        }
        Ok(())
    }

    /// A restore reported back: resume its partition, or stop when it failed.
    fn restored(&mut self, consumer: &StreamConsumer<RebalanceContext>, done: RestoreDone) -> Result<()> {
        let RestoreDone { partition, generation, result } = done;
        if generation != consumer.context().generation() {
            // The partition was revoked meanwhile; its next owner restores it again.
            if let Err(e) = result {
                tracing::warn!(partition, error = format!("{e:#}"), "a restore of an earlier assignment failed");
            }
            return Ok(());
        }
        let r = match result {
            Ok(r) => r,
            Err(e) => bail!("restoring partition {partition} from changelog {} failed: {e:#}", self.s.changelog),
        };
        let Some(tpl) = consumer.context().restored(partition, generation) else {
            return Ok(());
        };
        consumer.resume(&tpl)?;
        metrics::counter!("intentflow_state_resets_total", "reason" => "foreign_model").increment(r.reset_users);
        metrics::histogram!("intentflow_restore_seconds").record(r.seconds);
        tracing::info!(
            partition = r.partition,
            records = r.records,
            quarantined = r.quarantined,
            reset_users = r.reset_users,
            tombstones = r.tombstones.len(),
            changelog_offset = r.changelog_offset,
            seconds = r.seconds,
            rate = (r.records as f64 / r.seconds.max(1e-9)).round(),
            plan = ?r.plan,
            "partition restored from the changelog; processing it"
        );
        if !r.tombstones.is_empty() {
            self.tombstones.insert(partition, (generation, r.tombstones));
        }
        if self.restored_records.0 != generation {
            self.restored_records = (generation, 0);
        }
        self.restored_records.1 += r.records;
        let assignment = consumer.context().assignment();
        if assignment.restoring.is_empty() {
            tracing::info!(
                partitions = assignment.topic_partitions.len(),
                records = self.restored_records.1,
                seconds = assignment.since.map_or(0.0, |t| t.elapsed().as_secs_f64()),
                "assigned partitions are up to date with the changelog"
            );
        }
        Ok(())
    }

    /// Processes one batch (steps 2–4 of the module docs) into the open unit, which it begins
    /// if there is none.
    async fn process(&mut self, batch: &[BorrowedMessage<'_>], order: Option<&mut InputOrder<'_>>) -> Result<()> {
        let s = self.s;
        let cfg = &s.cfg;
        let consumer = &s.consumer;
        let started = Instant::now();
        // Fault injection for the probe tests: a batch that takes long (`batch=sleep(ms)`).
        fail::fail_point!("batch");
        let mut stats = BatchStats { records: batch.len() as u64, ..Default::default() };
        let mut fresh = Vec::with_capacity(batch.len());
        let mut requests = std::mem::take(&mut self.carry_erasures);
        let carried_requests: Vec<(i32, i64)> = requests.iter().map(|r| (r.partition, r.offset)).collect();
        for m in batch {
            // A partition's recorded offset is loaded on its first record after start-up or a
            // rebalance, which is when a committed offset lost to retention shows: check then,
            // not per record. (Records of the open unit lie beyond it, so the committed offset
            // is the one to compare with.)
            let stored = self.applied.get_or_load(m.topic(), m.partition(), || {
                let stored = s.store.offset(m.topic(), m.partition())?;
                if let Some(expected) = stored.filter(|&e| m.offset() > e) {
                    tokio::task::block_in_place(|| report_gap(consumer, m.topic(), m.partition(), expected, m.offset(), cfg.offset_reset));
                }
                Ok::<_, intentflow_state::StateError>(stored)
            })?;
            if offsets::already_applied(m.offset(), stored) {
                stats.skipped += 1;
            } else if m.topic() == self.erasures {
                requests.push(ErasureRequest::of(m));
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
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut decoded = tokio::task::block_in_place(|| decode_records(&self.decoder, &fresh, now_ms));
        // Events deferred by the last batch go first: each user's events stay in order.
        let mut events = std::mem::take(&mut self.carry);
        let carried = events.len();
        events.append(&mut decoded.events);
        let mut rejected = std::mem::take(&mut self.carry_rejected);
        rejected.append(&mut decoded.rejected);
        // The users' states as the open unit left them.
        let view = StagedView { store: &s.store, staged: &self.staged, committing: self.committing.as_ref().map(|c| &*c.staged) };
        let serving = self.serving.clone();
        let mut out = tokio::task::block_in_place(|| serving.operator.process(&events, &view, EmittedAt::Now(now_ms)))?;
        let quarantined: Vec<QuarantinedState> = out
            .invalid_states
            .iter()
            .map(|i| QuarantinedState {
                topic: dlq::LOCAL_STORE.to_string(),
                partition: i.partition,
                offset: -1,
                key: i.user.as_bytes().to_vec(),
                value: i.bytes.clone(),
                kind: i.error.kind(),
                reason: i.error.to_string(),
            })
            .collect();
        quarantined.iter().for_each(|q| q.report(&self.invalid_states));

        for (partition, next) in offsets::next_offsets(batch.iter().map(|m| (m.topic(), m.partition(), m.offset()))) {
            self.collected.entry(partition).and_modify(|n| *n = (*n).max(next)).or_insert(next);
        }
        // The first offset of every partition the batch read, the deferred events it began with
        // included: where an abort rewinds to, and the partitions whose next offset it stages.
        let erasures = self.erasures.as_str();
        let first = offsets::first_offsets(
            batch
                .iter()
                .map(|m| (m.topic(), m.partition(), m.offset()))
                .chain(events[..carried].iter().map(|e| (&*e.source.topic, e.source.partition, e.source.offset)))
                .chain(carried_requests.iter().map(|&(p, o)| (erasures, p, o))),
        );
        let mut next: BTreeMap<(String, i32), i64> = first.keys().map(|k| (k.clone(), self.collected[k])).collect();
        offsets::hold_at_deferred(&mut next, out.deferred.iter().map(|&i| (&*events[i].source.topic, events[i].source.partition, events[i].source.offset)));
        // Erasure requests apply after the batch's events, once their users have nothing beyond
        // the position their partition commits (see `forget`); the others wait, their offsets
        // held like deferred events'.
        let (erased, postponed) = self.erasures_of(requests, &view, &mut out, &events, &next, &mut stats)?;
        offsets::hold_at_deferred(&mut next, postponed.iter().map(|r| (erasures, r.partition, r.offset)));
        // An invalid record beyond a partition's held offset waits with the deferred events: it
        // is dead-lettered once the offset passes it, so a restart that reads it again cannot
        // dead-letter it twice.
        let (rejected, held): (Vec<Rejected>, Vec<Rejected>) = rejected.into_iter().partition(|r| !offsets::held(&next, &r.source.topic, r.source.partition, r.source.offset));
        for r in &rejected {
            *stats.invalid.entry(r.error.kind()).or_default() += 1;
        }
        dlq::log_rejections(&rejected);
        // Encoded once, for the changelog and for RocksDB.
        let states: Vec<Vec<u8>> = out.states.iter().map(|(_, _, st)| st.encode()).collect();
        let records = BatchRecords { events: &events, out: &out, states: &states, rejected: &rejected, quarantined: &quarantined };
        if self.unit.is_none() {
            self.unit = Some(self.begin_unit()?);
        }
        let unit = self.unit.as_mut().expect("begun above");
        unit.batches += 1;
        for (partition, offset) in first {
            unit.first.entry(partition).and_modify(|o| *o = (*o).min(offset)).or_insert(offset);
        }
        let sink = s.sink(serving.clone());
        // Inside a transaction order does not matter: the states go now, while the next batch
        // is scored, after the unit's tombstones (sent once per unit, before any state).
        // At-least-once sends states when the unit commits, after its intents are acknowledged.
        let tombstones = if sink.exactly_once { std::mem::take(&mut self.tombstones) } else { BTreeMap::new() };
        let mut sent = sink.send_outputs(&mut unit.window, &records).await;
        if sent.is_ok() && sink.exactly_once {
            sent = sink.send_states(&mut unit.window, &records, &tombstones).await;
        }
        if sent.is_ok() && sink.exactly_once {
            // After the batch's states, so that an erased user's last changelog record is its tombstone.
            sent = sink.send_users(&mut unit.window, erased.iter().map(|(p, u)| (*p, u.as_str(), [].as_slice()))).await;
        }
        unit.tombstones.extend(tombstones);
        if let Err(e) = sent {
            self.failed_unit(e, order)?;
            return Ok(());
        }
        for ((p, u, _), bytes) in out.states.iter().zip(states) {
            self.staged.put_user(*p, u, bytes);
        }
        for (p, u) in &erased {
            self.staged.delete_user(*p, u);
        }
        for ((t, p), o) in next {
            self.staged.put_offset(t, p, o);
        }
        self.carry = out.deferred.iter().map(|&i| events[i].clone()).collect();
        self.carry_rejected = held;
        self.carry_erasures = postponed;

        stats.skipped += out.already_applied as u64;
        stats.intents = out.scored.len() as u64;
        stats.published = vec![0; serving.operator.outputs().len()];
        out.published.iter().for_each(|p| stats.published[p.output] += 1);
        stats.state_resets = out.reset_states as u64;
        stats.foreign_states = out.foreign_states as u64;
        stats.waves = out.step_seconds.len() as u64;
        stats.deferred = out.deferred.len() as u64;
        stats.resident = out.resident;
        stats.step_seconds = out.step_seconds;
        stats.seconds = started.elapsed().as_secs_f64();
        self.metrics.emit_batch(&stats, self.health);
        self.health.live.batch(stats.records, out.scored.iter().map(|x| (events[x.input].event.user_id.as_str(), x.score)));
        if !erased.is_empty() {
            self.health.live.forget(erased.iter().map(|(_, u)| u.as_str()));
        }
        let unit = self.unit.as_mut().expect("begun above");
        unit.outcome.add(&stats);
        unit.latency.push((started, out.scored.iter().map(|x| events[x.input].event.ts).collect()));
        tracing::debug!(records = stats.records, intents = stats.intents, waves = stats.waves, deferred = stats.deferred, seconds = stats.seconds, "batch done");
        Ok(())
    }

    /// Decides the batch's erasure `requests`: returns the users to forget now (each once),
    /// taken out of the batch's states `out`, for the caller to stage as deleted and tombstone,
    /// and the requests that must wait: those of a partition with events the wave cap deferred,
    /// and those of a user with events beyond the position its partition commits (`next`, else
    /// the unit's staged offsets, else the store's; see `forget`). Counts them in `stats`. A
    /// request without a usable user id is logged and counted, and otherwise ignored.
    fn erasures_of(
        &self,
        requests: Vec<ErasureRequest>,
        view: &StagedView<'_>,
        out: &mut intentflow_operators::BatchOutput,
        events: &[PositionedEvent],
        next: &BTreeMap<(String, i32), i64>,
        stats: &mut BatchStats,
    ) -> Result<(Vec<(i32, String)>, Vec<ErasureRequest>)> {
        if requests.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let (mut valid, mut postponed) = (Vec::with_capacity(requests.len()), Vec::new());
        let held: BTreeSet<i32> = out.deferred.iter().map(|&i| events[i].source.partition).collect();
        for r in requests {
            if held.contains(&r.partition) {
                postponed.push(r);
            } else if r.user.is_some() {
                valid.push(r);
            } else {
                stats.erasures_invalid += 1;
                tracing::warn!(topic = %self.erasures, partition = r.partition, offset = r.offset, "erasure request ignored: its key (the user id) is missing, empty, over 1024 bytes or not UTF-8");
            }
        }
        let mut users: Vec<(i32, String)> = Vec::with_capacity(valid.len());
        if valid.is_empty() {
            return Ok((users, postponed));
        }
        fn user(r: &ErasureRequest) -> (i32, &str) {
            (r.partition, r.user.as_deref().expect("valid requests name a user"))
        }
        let stored = view.get_many(valid.iter().map(user))?;
        for (r, loaded) in valid.into_iter().zip(stored) {
            let (partition, name) = user(&r);
            // The user's latest state: the batch's, else the unit's or the store's.
            let state = match out.states.iter().rev().find(|(p, u, _)| *p == partition && u == name) {
                Some((_, _, s)) => Some(s),
                None => match &loaded {
                    intentflow_state::Loaded::State(s) => Some(s),
                    _ => None,
                },
            };
            if state.is_some_and(|s| forget::applied_beyond(s, |topic| self.position(topic, partition, next))) {
                postponed.push(r);
                continue;
            }
            let had_state = state.is_some() || matches!(loaded, intentflow_state::Loaded::Invalid { .. });
            if users.iter().any(|(p, u)| *p == partition && u == name) {
                // A second request of the same user in the batch: already counted.
            } else if had_state {
                stats.erased += 1;
            } else {
                stats.erasures_absent += 1;
            }
            // The request's position, not the user id: the log must not keep what is erased.
            tracing::info!(topic = %self.erasures, partition, offset = r.offset, had_state, "erasure request applied: the user's state is deleted, and tombstoned on the changelog, with this commit");
            users.push((partition, name.to_string()));
        }
        users.sort_unstable();
        users.dedup();
        out.states.retain(|(p, u, _)| users.binary_search_by(|(q, v)| (*q, v.as_str()).cmp(&(*p, u.as_str()))).is_err());
        Ok((users, postponed))
    }

    /// Where input topic `topic` (a [`intentflow_state::topic_id`]) of `partition` stands once
    /// the open unit commits: the batch's `next` offset, else the unit's staged one, else the
    /// one of the commit in flight, else the store's (`None` for a topic that is not an input, or with no recorded offset).
    fn position(&self, topic: u32, partition: i32, next: &BTreeMap<(String, i32), i64>) -> Option<i64> {
        let name = self.s.cfg.input_topics.iter().find(|t| intentflow_state::topic_id(t) == topic)?;
        let key = (name.clone(), partition);
        next.get(&key)
            .or_else(|| self.staged.offsets().get(&key))
            .or_else(|| self.committing.as_ref().and_then(|c| c.staged.offsets().get(&key)))
            .copied()
            .or_else(|| self.s.store.offset(name, partition).ok().flatten())
    }

    /// One step of the expiry sweep ([`Sweep::step`]): the expired users it names are staged
    /// as deleted in the open unit (begun if there is none) and tombstoned on the changelog.
    async fn sweep_step(&mut self, order: Option<&mut InputOrder<'_>>) -> Result<()> {
        if self.sweep.is_none() {
            return Ok(());
        }
        // The sweep reads the store under the open unit's writes alone.
        self.complete_committing().await?;
        let Some(mut sweep) = self.sweep.take() else { return Ok(()) };
        let s = self.s;
        let assignment = s.consumer.context().assignment();
        let ready: BTreeSet<i32> = assignment.owned.iter().copied().filter(|p| !assignment.restoring.contains(p)).collect();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let none = BTreeMap::new();
        let this = &*self;
        let stepped = tokio::task::block_in_place(|| sweep.step(&s.store, &this.staged, &ready, now_ms, |p, state| forget::applied_beyond(state, |t| this.position(t, p, &none))));
        self.sweep = Some(sweep);
        let expired = stepped?;
        if expired.is_empty() {
            return Ok(());
        }
        if self.unit.is_none() {
            self.unit = Some(self.begin_unit()?);
        }
        let unit = self.unit.as_mut().expect("begun above");
        let sink = self.s.sink(self.serving.clone());
        if sink.exactly_once {
            if let Err(e) = sink.send_users(&mut unit.window, expired.iter().map(|(p, u)| (*p, u.as_str(), [].as_slice()))).await {
                // The users stay; the next pass finds them again.
                return self.failed_unit(e, order);
            }
        }
        for (p, u) in &expired {
            self.staged.delete_user(*p, u);
        }
        self.health.live.forget(expired.iter().map(|(_, u)| u.as_str()));
        tracing::info!(users = expired.len(), ttl_ms = s.cfg.state_ttl_ms, "inactive users expired: their states are deleted, and tombstoned on the changelog, with this commit");
        unit.outcome.expired += expired.len() as u64;
        Ok(())
    }

    /// Serves a reloaded model ([`reload`]) from the next batch on: the open unit, scored by the
    /// model served so far, is committed first, and the store records the new model.
    async fn switch_model(&mut self, serving: Serving, order: Option<&mut InputOrder<'_>>) -> Result<()> {
        self.end_unit(order).await?;
        self.complete_committing().await?;
        let previous = self.serving.version().to_string();
        self.s.store.set_model_version(serving.version())?;
        self.serving = Arc::new(serving);
        let now = self.serving.version();
        crate::telemetry::model_switched(&previous, now);
        self.health.live.serves(now);
        tracing::info!(previous = %previous, model = now, "model switched: intents from the next batch on are scored by it; each state of an earlier model restarts its hidden vector at its user's next event");
        Ok(())
    }

    /// Opens a unit: a transaction under exactly-once.
    fn begin_unit(&self) -> Result<Unit<'s>> {
        let sink = self.s.sink(self.serving.clone());
        let group = if sink.exactly_once {
            // Taken now, so that a rebalance before the commit fences the unit's offsets.
            Some(self.s.consumer.group_metadata().context("the consumer has no group metadata")?)
        } else {
            None
        };
        sink.begin()?;
        let began = Instant::now();
        // Due once its first batch is done when the last commit began an interval or more ago
        // (a first record after a quiet spell), but open at least half an interval after a
        // commit that took longer than one: a slow broker must not get a transaction per batch.
        let due = match self.last_commit {
            Some(last) => (last + self.interval).max(began + self.interval / 2),
            None => began + self.interval,
        };
        Ok(Unit { window: DeliveryWindow::new(&self.s.producer, sink::WINDOW), group, first: BTreeMap::new(), tombstones: BTreeMap::new(), began, due, batches: 0, outcome: BatchStats::default(), latency: Vec::new() })
    }

    /// Commits the open unit (steps 5–7 of the module docs) once the commit in flight before it
    /// is done. Under at-least-once the unit is handed over to a commit in flight
    /// ([`Committing`]) at once; under exactly-once once its transaction has committed, for
    /// RocksDB's write. A failure under exactly-once aborts it and rewinds its partitions.
    async fn end_unit(&mut self, order: Option<&mut InputOrder<'_>>) -> Result<()> {
        let s = self.s;
        if s.consumer.context().generation() != self.generation {
            // A rebalance since the unit's last batch (seen here first when no records came):
            // its partitions may have moved.
            return self.follow(s.consumer.context().generation(), order).await;
        }
        // At most one commit in flight, so that the store takes the units in order. (Before the
        // open unit is taken: if this fails, the error path still finds it and aborts it.)
        self.complete_committing().await?;
        let Some(mut unit) = self.unit.take() else { return Ok(()) };
        let sink = self.s.sink(self.serving.clone());
        if !sink.exactly_once {
            // The restore tombstones go with its states (under exactly-once they went with the
            // unit's first batch, and any left belong to the next unit).
            let tombstones = std::mem::take(&mut self.tombstones);
            self.hand_over(unit, tombstones, CommitStep::Intents, Instant::now());
            return Ok(());
        }
        let commit_began = Instant::now();
        self.last_commit = Some(commit_began);
        let committed = async {
            let tpl = offsets_tpl(self.staged.offsets())?;
            sink.send_offsets(&mut unit.window, self.staged.offsets()).await?;
            unit.window.finish().await?;
            sink.commit(unit.group.as_ref().map(|g| (g, &tpl)))?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = committed {
            self.unit = Some(unit);
            return self.failed_unit(e, order);
        }
        self.aborts_in_a_row = 0;
        // Its intents are visible from now on, whenever RocksDB has its states.
        self.metrics.produced(&unit.latency, chrono::Utc::now().timestamp_millis(), Instant::now(), self.health);
        self.hand_over(unit, BTreeMap::new(), CommitStep::States, commit_began);
        self.write_committing();
        Ok(())
    }

    /// Makes `unit`, with the open unit's staged writes, the commit in flight (there is none).
    fn hand_over(&mut self, unit: Unit<'s>, tombstones: BTreeMap<i32, (u64, Vec<Vec<u8>>)>, step: CommitStep, began: Instant) {
        debug_assert!(self.committing.is_none(), "one commit in flight at a time");
        self.committing = Some(Committing {
            unit,
            staged: Arc::new(std::mem::take(&mut self.staged)),
            tombstones,
            serving: self.serving.clone(),
            generation: self.generation,
            step,
            began,
        });
    }

    /// Moves the commit in flight one step on, once [`commit_progress`] says what it waited for
    /// has happened: after its intents, its states and offsets go to the changelog (unless a
    /// rebalance came first: then it is dropped, as an open unit is); after those, RocksDB gets
    /// it on a blocking thread; once written, the consumer group gets its offsets
    /// (at-least-once) and it is counted.
    async fn advance_committing(&mut self) -> Result<()> {
        let s = self.s;
        let Some(c) = self.committing.as_mut() else { return Ok(()) };
        match c.step {
            CommitStep::Intents => {
                if s.consumer.context().generation() != c.generation {
                    self.abandon_committing();
                    return Ok(());
                }
                // Intents before states: a state on the changelog means its intents were
                // delivered.
                let sink = s.sink(c.serving.clone());
                sink.send_staged(&mut c.unit.window, &c.tombstones, &c.staged).await?;
                fail::fail_point!("changelog-between-users-and-offsets", |_| {
                    // Fault injection for the crash tests: the users' states are on the
                    // changelog, the offset records are never sent.
                    let _ = s.producer.flush(Duration::from_secs(30));
                    tracing::error!("failpoint changelog-between-users-and-offsets: aborting");
                    std::process::abort()
                });
                sink.send_offsets(&mut c.unit.window, c.staged.offsets()).await?;
                c.step = CommitStep::States;
            }
            // States sent before a rebalance were delivered before the revocation returned
            // (the context flushes the producer, or stops the process when it cannot), so the
            // commit completes even after one.
            CommitStep::States => self.write_committing(),
            CommitStep::Writing(_) => {}
            CommitStep::Written(_) => {
                let Committing { unit, staged, began, step, .. } = self.committing.take().expect("matched above");
                let CommitStep::Written(written) = step else { unreachable!("matched above") };
                written?;
                self.record_commit(unit, &staged, began)?;
            }
        }
        Ok(())
    }

    /// Step 6 for the commit in flight whose deliveries (and, under exactly-once, transaction)
    /// succeeded: RocksDB gets its staged states, input offsets and changelog offsets in one
    /// atomic batch, written on a blocking thread while the loop goes on.
    fn write_committing(&mut self) {
        let Some(c) = self.committing.as_mut() else { return };
        let staged = Arc::get_mut(&mut c.staged).expect("only the commit in flight holds its states before the write");
        for (p, next) in changelog_positions(c.unit.window.tracked()) {
            staged.put_changelog(p, next);
        }
        let (store, staged, erased) = (self.s.store.clone(), c.staged.clone(), c.unit.outcome.erased > 0);
        // Announced now, before the loop polls the consumer again: a restore started by a later
        // assignment waits for this write rather than have it land over its records.
        let announced = store.announce_write();
        c.step = CommitStep::Writing(tokio::task::spawn_blocking(move || {
            let _announced = announced;
            store.commit_staged(&staged)?;
            if erased {
                // The store writes without a write-ahead log, and a tombstone leaves the
                // compacted changelog after `delete.retention.ms`: a store that lost the
                // deletion in a crash could then no longer learn it from the changelog, and the
                // erased state would come back. So an erasure is on disk before the unit
                // counts as done.
                store.flush()?;
            }
            Ok(())
        }));
    }

    /// Waits for the commit in flight, if any, to complete.
    async fn complete_committing(&mut self) -> Result<()> {
        while self.committing.is_some() {
            commit_progress(&mut self.committing).await?;
            self.advance_committing().await?;
        }
        Ok(())
    }

    /// Drops the commit in flight before its states were sent (a rebalance came first): its
    /// partitions are read again from the committed offsets, like an abandoned unit's. Its
    /// intents stay delivered: at-least-once repeats them.
    fn abandon_committing(&mut self) {
        if let Some(c) = self.committing.take() {
            tracing::info!(batches = c.unit.batches, "a rebalance came before the commit's states were sent: its partitions are read again");
            for (p, t) in c.tombstones {
                self.tombstones.entry(p).or_insert(t);
            }
        }
    }

    /// After a unit's states reached RocksDB (step 7): commits the offsets to the group under
    /// at-least-once, and counts the unit.
    fn record_commit(&mut self, unit: Unit<'s>, staged: &Staged, commit_began: Instant) -> Result<()> {
        let s = self.s;
        let exactly_once = s.exactly_once();
        for ((t, p), o) in staged.offsets() {
            self.applied.advance(t, *p, *o);
        }
        if !exactly_once {
            // Only partitions still owned: a stale commit for a moved partition would rewind its
            // owner.
            let assignment = s.consumer.context().assignment();
            let owned: BTreeMap<(String, i32), i64> =
                staged.offsets().iter().filter(|((t, p), _)| assignment.topic_partitions.iter().any(|(u, q)| u == t && q == p)).map(|(k, o)| (k.clone(), *o)).collect();
            let tpl = offsets_tpl(&owned)?;
            if tpl.count() > 0 {
                if let Err(e) = s.consumer.commit(&tpl, CommitMode::Async) {
                    // The state store holds the offsets too, so a lost commit only costs a re-read.
                    tracing::warn!(error = %e, "offset commit failed");
                }
            }
        }
        let commit_seconds = commit_began.elapsed().as_secs_f64();
        self.metrics.unit_committed(unit.batches, unit.began.elapsed().as_secs_f64(), commit_seconds);
        if !exactly_once {
            // (Under exactly-once taken when the transaction committed.)
            self.metrics.produced(&unit.latency, chrono::Utc::now().timestamp_millis(), Instant::now(), self.health);
        }
        self.metrics.emit_committed(&unit.outcome, self.health);
        let o = &unit.outcome;
        self.summary.records += o.records;
        self.summary.intents += o.intents;
        self.summary.skipped += o.skipped;
        self.summary.invalid += o.invalid.values().sum::<u64>();
        self.summary.batches += unit.batches;
        Ok(())
    }

    /// A delivery or transaction call of the open unit failed. Under exactly-once nothing of the
    /// unit is visible and the store is untouched: abort it, rewind its partitions (the batch in
    /// hand is already among them) and process them again. Under at-least-once the operator
    /// stops; a restart re-reads from the committed offsets.
    fn failed_unit(&mut self, e: anyhow::Error, order: Option<&mut InputOrder<'_>>) -> Result<()> {
        if !self.s.exactly_once() {
            return Err(e);
        }
        tracing::warn!(error = format!("{e:#}"), "transaction failed; aborting it and processing its batches again");
        let first = self.unit.as_ref().map(|u| u.first.clone()).unwrap_or_default();
        self.abandon_unit("a failed delivery or transaction call")?;
        rewind(&self.s.consumer, first, order);
        self.aborts_in_a_row += 1;
        if self.aborts_in_a_row >= MAX_ABORTS_IN_A_ROW {
            bail!("{} transactions in a row failed; last error: {e:#}", self.aborts_in_a_row);
        }
        Ok(())
    }

    /// Drops the open unit: aborts its transaction under exactly-once and forgets its staged
    /// states. Its tombstones are sent again by the next unit.
    fn abandon_unit(&mut self, why: &str) -> Result<()> {
        let Some(unit) = self.unit.take() else { return Ok(()) };
        if self.s.exactly_once() {
            tracing::info!(batches = unit.batches, "aborting the open transaction after {why}");
            self.s.sink(self.serving.clone()).abort()?;
            self.metrics.unit_aborted();
            self.summary.aborted += 1;
        }
        for (p, t) in unit.tombstones {
            self.tombstones.entry(p).or_insert(t);
        }
        self.staged.clear();
        // Its partitions are read again from its first offsets (a rewind) or from the committed
        // ones (a rebalance), deferred events included.
        self.forget_collected();
        Ok(())
    }

    /// Forgets the deferred events and how far each partition was collected: its records are
    /// read again.
    fn forget_collected(&mut self) {
        self.carry.clear();
        self.carry_rejected.clear();
        self.carry_erasures.clear();
        self.collected.clear();
    }

    /// After the last batch: under at-least-once, make the last position durable in the group.
    fn finish(&self) -> Result<()> {
        if self.s.exactly_once() {
            // Every batch's offsets were committed in its transaction.
            return Ok(());
        }
        let consumer = &self.s.consumer;
        // Only partitions still owned: a stale commit for a moved partition would rewind its owner.
        let assignment = consumer.assignment()?;
        let mut tpl = TopicPartitionList::new();
        for (t, p, o) in self.applied.known().filter(|(t, p, _)| assignment.find_partition(t, *p).is_some()) {
            tpl.add_partition_offset(t, p, Offset::Offset(o))?;
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(error = %e, "final offset commit failed; the state store holds the offsets");
            }
        }
        Ok(())
    }
}
