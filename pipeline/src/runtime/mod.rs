//! The streaming runtime of `intentflow run`: the batch loop.
//!
//! One loop owns the consumer, the producer, the state store and the operator. Per batch:
//!
//! 1. collect a micro-batch (up to `max_batch_records`, closing `commit_interval_ms` after its
//!    first record); a rebalance while collecting drops what was collected before it (the new
//!    assignment re-reads it from the committed offsets); with several input topics, records
//!    pass through [`inputs::InputOrder`] so that a partition's topics are applied in the order a
//!    replay uses;
//! 2. drop records the state store already reflects (see [`crate::offsets::already_applied`]);
//! 3. decode, then score with [`IntentOperator::process`] (waves of batched GRU steps; events a
//!    user's state has already applied are skipped by its fences);
//! 4. send every intent, every dead letter, and per touched partition the users' latest states
//!    and the next input offsets to the changelog, and await every acknowledgement
//!    ([`sink::BatchSink`]); under exactly-once all of it, plus the consumer offsets, is one
//!    Kafka transaction, committed there;
//! 5. only then write the users' new states, the next input offsets and the changelog offsets
//!    to RocksDB in one atomic batch;
//! 6. at-least-once only: commit the offsets to the consumer group.
//!
//! Newly assigned partitions stay paused while they restore from the changelog in the
//! background ([`rebalance`], [`restore`]); the loop resumes each one when its restore reports
//! back, and the others go on meanwhile. A crash anywhere leaves a store that is a prefix of the
//! committed changelog, so a restart catches up from where the store stopped — it is never wiped.
//!
//! Under exactly-once a crash before the commit in step 4 aborts the transaction (the restarted
//! instance's `init_transactions` does so at once): nothing of the batch is visible to
//! `read_committed` readers and the batch is processed again from the same state. A crash
//! between 4 and 5 leaves the store one batch behind the changelog, which the restore applies.
//! On SIGTERM/SIGINT the loop finishes the batch in hand, commits it and returns.
//!
//! The other modules: [`startup`] opens everything, [`handover`] adopts a replayed state,
//! [`watchdog`] ends a process stuck in a transaction call, and `consume` is what the loop does
//! with the consumer (collecting, rewinding, reporting gaps). What goes to the dead-letter topic
//! is named in [`crate::dlq`]; the offset decisions are pure functions in [`crate::offsets`].

mod consume;
pub mod handover;
pub mod inputs;
pub mod rebalance;
pub mod restore;
pub mod sink;
pub mod startup;
pub mod watchdog;

pub use rebalance::RebalanceContext;

use crate::config::RunConfig;
use crate::telemetry::{BatchMetrics, BatchStats, Health, Phase};
use anyhow::{bail, Result};
use consume::{collect, report_gap, rewind};
use crate::dlq::{self, QuarantinedState};
use crate::offsets;
use inputs::InputOrder;
use intentflow_operators::{decode::decode_batch, EmittedAt, SourceRecord};
use intentflow_schemas::EventDecoder;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use restore::RestoreDone;
use sink::{changelog_positions, offsets_tpl, BatchRecords};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Consecutive aborted transactions after which the operator stops.
const MAX_ABORTS_IN_A_ROW: u32 = 10;

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
    /// Transactions aborted (their batches were processed again).
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
    let (started, mut restores) = startup::start(cfg, &health).await?;
    health.set_phase(Phase::WaitingForAssignment);
    let summary = BatchLoop::new(&started, &health).run(&mut shutdown, &mut restores).await;
    health.set_phase(Phase::Stopped);
    started.consumer.unsubscribe();
    let summary = summary?;
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
}

impl<'s> BatchLoop<'s> {
    fn new(s: &'s startup::Started, health: &'s Health) -> BatchLoop<'s> {
        BatchLoop {
            s,
            health,
            decoder: EventDecoder::new(s.cfg.limits()),
            metrics: BatchMetrics::default(),
            invalid_states: crate::telemetry::state_records_invalid("store"),
            applied: offsets::AppliedOffsets::default(),
            generation: 0,
            tombstones: BTreeMap::new(),
            restored_records: (0, 0),
            summary: RunSummary::default(),
            aborts_in_a_row: 0,
        }
    }

    async fn run(mut self, shutdown: &mut watch::Receiver<bool>, restores: &mut tokio::sync::mpsc::UnboundedReceiver<RestoreDone>) -> Result<RunSummary> {
        let s = self.s;
        let cfg = &s.cfg;
        let consumer = &s.consumer;
        let ctx = consumer.context();
        let interval = Duration::from_millis(cfg.commit_interval_ms);
        let mut order = InputOrder::new(&cfg.input_topics, Duration::from_millis(cfg.max_task_idle_ms), cfg.max_batch_records);
        loop {
            let mut generation = ctx.generation();
            self.follow_generation(generation, order.as_mut());
            let first = tokio::select! {
                biased;
                () = stopped(shutdown) => break,
                Some(done) = restores.recv() => {
                    self.restored(consumer, done)?;
                    continue;
                }
                () = sleep_until(order.as_ref().and_then(InputOrder::deadline)) => None,
                m = consumer.recv() => Some(m),
            };
            let mut fetched: Vec<BorrowedMessage<'_>> = Vec::with_capacity(cfg.max_batch_records);
            if let Some(m) = first {
                collect(&mut fetched, m, &mut generation, ctx)?;
                // One timer for the batch, not one per record: with `biased`, a record that is
                // ready is taken without polling the timer.
                let closes = tokio::time::sleep(interval);
                tokio::pin!(closes);
                while fetched.len() < cfg.max_batch_records {
                    tokio::select! {
                        biased;
                        m = consumer.recv() => collect(&mut fetched, m, &mut generation, ctx)?,
                        () = &mut closes => break,
                    }
                }
            }
            if ctx.generation() != generation {
                tracing::info!(dropped = fetched.len(), "rebalance while collecting: records left to the new assignment");
                continue;
            }
            // A rebalance during the collection (the records kept are of the new assignment).
            self.follow_generation(generation, order.as_mut());
            let batch = match &mut order {
                None => fetched,
                Some(o) => {
                    fetched.into_iter().for_each(|m| o.push(m));
                    let mut released = Vec::with_capacity(cfg.max_batch_records);
                    // A topic whose consumer position is not known yet (nothing consumed since the
                    // assignment) is where the store says its partition stands.
                    o.release(consumer, |t, p| s.store.offset(t, p).ok().flatten(), &mut released);
                    released
                }
            };
            if !batch.is_empty() {
                self.process(&batch, order.as_mut()).await?;
            }
        }
        self.health.set_phase(Phase::Stopping);
        self.finish()?;
        Ok(self.summary)
    }

    /// Forgets what belongs to an earlier assignment when a rebalance happened since the loop's
    /// buffers were filled (maybe while a restore report won the loop's select): what the store
    /// reflects may have moved, and buffered records belong to the old assignment (the new one
    /// reads them again from the committed offsets).
    fn follow_generation(&mut self, generation: u64, order: Option<&mut InputOrder<'_>>) {
        if generation != self.generation {
            self.applied.clear();
            // A revoked partition's next owner finds the same keys when it restores.
            self.tombstones.retain(|_, (g, _)| *g == generation);
            if let Some(o) = order {
                o.clear();
            }
            self.generation = generation;
        }
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
        metrics::counter!("intentflow_restored_records_total").increment(r.records);
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

    /// Processes one batch: steps 2–6 of the module docs.
    async fn process(&mut self, batch: &[BorrowedMessage<'_>], order: Option<&mut InputOrder<'_>>) -> Result<()> {
        let s = self.s;
        let cfg = &s.cfg;
        let consumer = &s.consumer;
        let started = Instant::now();
        let mut stats = BatchStats { records: batch.len() as u64, ..Default::default() };
        let mut fresh = Vec::with_capacity(batch.len());
        for m in batch {
            // A partition's recorded offset is loaded on its first record after start-up or a
            // rebalance, which is when a committed offset lost to retention shows: check then,
            // not per record.
            let stored = self.applied.get_or_load(m.topic(), m.partition(), || {
                let stored = s.store.offset(m.topic(), m.partition())?;
                if let Some(expected) = stored.filter(|&e| m.offset() > e) {
                    tokio::task::block_in_place(|| report_gap(consumer, m.topic(), m.partition(), expected, m.offset(), cfg.offset_reset));
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
        let now_ms = chrono::Utc::now().timestamp_millis();
        let decoded = decode_batch(&self.decoder, fresh, now_ms);
        for r in &decoded.rejected {
            *stats.invalid.entry(r.error.kind()).or_default() += 1;
        }
        dlq::log_rejections(&decoded.rejected);
        let out = tokio::task::block_in_place(|| s.operator.process(&decoded.events, &s.store, EmittedAt::Now(now_ms)))?;
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

        let next = offsets::next_offsets(batch.iter().map(|m| (m.topic(), m.partition(), m.offset())));
        let tpl = offsets_tpl(&next)?;
        // Encoded once, for the changelog and for RocksDB.
        let states: Vec<Vec<u8>> = out.states.iter().map(|(_, _, st)| st.encode()).collect();
        let records = BatchRecords { events: &decoded.events, out: &out, states: &states, rejected: &decoded.rejected, quarantined: &quarantined, tombstones: &self.tombstones, next: &next };
        let sink = s.sink();
        let changelog_next = match sink.send(consumer, &records, &tpl).await {
            Ok(changelog_next) => changelog_next,
            Err(e) if sink.exactly_once => {
                // Nothing of the batch is visible and the store is untouched: abort, rewind the
                // batch's partitions and process it again.
                tracing::warn!(error = format!("{e:#}"), "transaction failed; aborting it and processing the batch again");
                sink.abort()?;
                rewind(consumer, batch, order);
                metrics::counter!("intentflow_transactions_aborted_total").increment(1);
                self.summary.aborted += 1;
                self.aborts_in_a_row += 1;
                if self.aborts_in_a_row >= MAX_ABORTS_IN_A_ROW {
                    bail!("{} transactions in a row failed; last error: {e:#}", self.aborts_in_a_row);
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.aborts_in_a_row = 0;
        self.tombstones.clear();
        s.store.commit_encoded(
            out.states.iter().zip(&states).map(|((p, u, _), bytes)| (*p, u.as_str(), bytes.as_slice())),
            next.iter().map(|((t, p), o)| (t.as_str(), *p, *o)),
            changelog_positions(&changelog_next),
        )?;
        for ((t, p), o) in &next {
            self.applied.advance(t, *p, *o);
        }
        if !sink.exactly_once {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                // The state store holds the offsets too, so a lost commit only costs a re-read.
                tracing::warn!(error = %e, "offset commit failed");
            }
        }

        stats.skipped += out.already_applied as u64;
        stats.intents = out.scored.len() as u64;
        stats.state_resets = out.reset_states as u64;
        stats.foreign_states = out.foreign_states as u64;
        stats.waves = out.waves as u64;
        stats.resident = out.resident;
        stats.seconds = started.elapsed().as_secs_f64();
        self.metrics.emit(&stats, self.health);
        self.summary.records += stats.records;
        self.summary.intents += stats.intents;
        self.summary.skipped += stats.skipped;
        self.summary.invalid += stats.invalid.values().sum::<u64>();
        self.summary.batches += 1;
        tracing::debug!(records = stats.records, intents = stats.intents, waves = stats.waves, seconds = stats.seconds, "batch done");
        Ok(())
    }

    /// After the last batch: under at-least-once, make the last position durable in the group.
    fn finish(&self) -> Result<()> {
        if self.s.sink().exactly_once {
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
