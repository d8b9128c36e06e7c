//! The streaming runtime of `intentflow run`.
//!
//! One loop owns the consumer, the producer, the state store and the operator. Per batch:
//!
//! 1. collect a micro-batch (up to `max_batch_records`, closing `commit_interval_ms` after its
//!    first record); a rebalance while collecting drops what was collected before it (the new
//!    assignment re-reads it from the committed offsets);
//! 2. drop records the state store already reflects (see [`offsets::already_applied`]);
//! 3. decode, then score with [`IntentOperator::process`] (waves of batched GRU steps);
//! 4. produce every intent, every dead letter, and per touched partition the users' latest
//!    states and the next input offsets to the changelog topic; await every acknowledgement;
//!    under exactly-once all of it, plus the consumer offsets (`send_offsets_to_transaction`),
//!    is one Kafka transaction, committed here;
//! 5. only then write the users' new states, the next input offsets and the changelog offsets
//!    to RocksDB in one atomic batch;
//! 6. at-least-once only: commit the offsets to the consumer group.
//!
//! When partitions are assigned (start-up, rebalance), each partition's local store first
//! catches up from the changelog ([`restore`]), in parallel, before any of its records are
//! processed. A crash anywhere leaves a store that is a prefix of the committed changelog, so a
//! restart catches up from where the store stopped — it is never wiped.
//!
//! Under exactly-once a crash before the commit in step 4 aborts the transaction (the restarted
//! instance's `init_transactions` does so at once): nothing of the batch is visible to
//! `read_committed` readers and the batch is processed again from the same state. A crash
//! between 4 and 5 leaves the store one batch behind the changelog, which the restore applies.
//! On SIGTERM/SIGINT the loop finishes the batch in hand, commits it and returns.

use crate::config::{ProcessingGuarantee, RunConfig};
use crate::kafka::{self, DeliveryWindow};
use crate::telemetry::{BatchMetrics, BatchStats, Health};
use anyhow::{bail, Context, Result};
use intentflow_model::IntentModel;
use intentflow_operators::{decode::decode_batch, encode::encode_intent, EmittedAt, IntentOperator, SourceRecord};
use intentflow_schemas::{EventDecoder, Limits};
use intentflow_state::changelog::{encode_offset, ChangelogKey};
use intentflow_state::{StateStore, StoreOptions};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub mod offsets;
pub mod restore;

/// Transaction calls give up after this long.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a transaction call with a retriable error is retried.
const RETRY_FOR: Duration = Duration::from_secs(60);
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

/// Consumer context: restores assigned partitions from the changelog before they are fetched,
/// tracks the assignment and counts rebalances.
struct RebalanceTracker {
    health: Arc<Health>,
    restorer: restore::Restorer,
    /// Incremented by every rebalance event; the loop compares it across a batch.
    generation: AtomicU64,
    /// A restore that failed: the loop stops with it.
    failure: Mutex<Option<String>>,
}

impl ClientContext for RebalanceTracker {}

impl ConsumerContext for RebalanceTracker {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(tpl) = rebalance else { return };
        let mut partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        partitions.sort_unstable();
        partitions.dedup();
        let started = Instant::now();
        match self.restorer.restore_all(&partitions) {
            Ok(done) => {
                let records: u64 = done.iter().map(|r| r.records).sum();
                for r in done.iter().filter(|r| r.records > 0) {
                    tracing::info!(
                        partition = r.partition,
                        records = r.records,
                        changelog_offset = r.changelog_offset,
                        seconds = r.seconds,
                        rate = (r.records as f64 / r.seconds.max(1e-9)).round(),
                        plan = ?r.plan,
                        "partition restored from the changelog"
                    );
                }
                metrics::counter!("intentflow_restored_records_total").increment(records);
                let seconds = started.elapsed().as_secs_f64();
                metrics::histogram!("intentflow_restore_seconds").record(seconds);
                tracing::info!(partitions = partitions.len(), records, seconds, "assigned partitions are up to date with the changelog");
            }
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "restoring from the changelog failed");
                *self.failure.lock().expect("failure lock") = Some(format!("{e:#}"));
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // The eager assignors revoke everything, then assign the new set. (Asking the consumer
        // for its assignment here can deadlock while it closes.)
        let assigned = match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned");
                tpl.count()
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                0
            }
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                0
            }
        };
        self.health.assigned_partitions.store(assigned, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// Resolves when `shutdown` says stop (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Refuses to continue states built by another model unless told to reset them; records the
/// loaded model as the store's model.
///
/// # Errors
///
/// A state built by another model without `reset`, and RocksDB errors.
pub fn adopt_model(store: &StateStore, loaded: &str, reset: bool) -> Result<()> {
    use intentflow_state::changelog::{check_model, ModelCheck};
    match check_model(store.model_version()?.as_deref(), loaded, reset) {
        ModelCheck::Same => return Ok(()),
        ModelCheck::Fresh => {}
        ModelCheck::Reset { previous } => {
            tracing::warn!(previous = %previous, loaded, "the state was built by another model: every user starts from zero");
            store.clear_users()?;
        }
        ModelCheck::Refuse { previous } => bail!(
            "the state directory was built by model {previous}, the loaded model is {loaded}: hidden states of one model mean nothing to \
             another. Replay history into a fresh state directory with the new model (`intentflow replay`, docs/replay.md), or pass \
             --reset-state-on-model-change to start every user from zero"
        ),
    }
    store.set_model_version(loaded)?;
    Ok(())
}

/// This instance's stable id: `instance_id` if configured, otherwise the one kept in the state
/// directory (created on first start), so a restarted instance reuses its transactional id and
/// its first `init_transactions` aborts whatever its previous life left open.
fn instance_id(cfg: &RunConfig) -> Result<String> {
    if !cfg.instance_id.is_empty() {
        return Ok(cfg.instance_id.clone());
    }
    let path = cfg.state_dir.join("INSTANCE_ID");
    if let Ok(id) = std::fs::read_to_string(&path) {
        return Ok(id.trim().to_string());
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let id = format!("{:012x}", (nanos ^ (u128::from(std::process::id()) << 40)) & 0xffff_ffff_ffff);
    std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
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
    crate::replay::bootstrap(&cfg).await.context("bootstrapping states from history")?;
    crate::replay::refuse_unfinished(&cfg.state_dir)?;
    let device = cfg.device.open()?;
    let model = IntentModel::load(&cfg.model_dir, &device)?;
    tracing::info!(version = model.version(), hidden = model.hidden_dim(), device = ?cfg.device, "model loaded");
    let operator = IntentOperator::new(model);
    let store = Arc::new(
        StateStore::open(&cfg.state_dir, StoreOptions::default())
            .with_context(|| format!("opening state store {}", cfg.state_dir.display()))?,
    );
    adopt_model(&store, operator.model().version(), cfg.reset_state_on_model_change)?;
    let decoder = EventDecoder::new(Limits { max_record_bytes: cfg.max_record_bytes, ..Limits::default() });
    let exactly_once = cfg.processing_guarantee == ProcessingGuarantee::ExactlyOnce;
    let changelog = cfg.changelog();

    let input_partitions = kafka::partition_count(&cfg.brokers, &cfg.input_topics[0])?.unwrap_or(4);
    kafka::ensure_topic(&cfg.brokers, &cfg.output_topic, input_partitions).await?;
    kafka::ensure_topic(&cfg.brokers, &cfg.dlq_topic, input_partitions).await?;
    let changelog_partitions = kafka::ensure_topic_with(&cfg.brokers, &changelog, input_partitions, &[("cleanup.policy", "compact")]).await?;
    if changelog_partitions < input_partitions {
        bail!("changelog topic {changelog} has {changelog_partitions} partitions, the input has {input_partitions}: it needs one per input partition");
    }

    let instance = instance_id(&cfg)?;
    let mut producer_overrides = cfg.kafka.producer.clone();
    if exactly_once {
        let timeout = cfg.transaction_timeout_ms.to_string();
        producer_overrides.entry("transactional.id".into()).or_insert_with(|| format!("intentflow-{}-{instance}", cfg.group));
        producer_overrides.entry("transaction.timeout.ms".into()).or_insert_with(|| timeout.clone());
        producer_overrides.entry("message.timeout.ms".into()).or_insert(timeout);
    }
    let producer = kafka::producer(&cfg.brokers, &producer_overrides)?;
    if exactly_once {
        // Fences an earlier life of this instance and aborts its open transaction, if any,
        // before any changelog partition is restored.
        tokio::task::block_in_place(|| producer.init_transactions(TXN_TIMEOUT)).context("initialising Kafka transactions")?;
        tracing::info!(transactional_id = %producer_overrides["transactional.id"], "transactions initialised");
    }

    let tracker = RebalanceTracker {
        health: health.clone(),
        restorer: restore::Restorer::new(&cfg.brokers, &changelog, store.clone(), &cfg.kafka.consumer),
        generation: AtomicU64::new(0),
        failure: Mutex::new(None),
    };
    let mut consumer_cfg = kafka::client_config(&cfg.brokers, &Default::default());
    consumer_cfg
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", cfg.offset_reset.librdkafka())
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "range,roundrobin")
        // Static membership: a restarted instance takes its partitions back without a
        // rebalance, and a second process with the same id is fenced.
        .set("group.instance.id", format!("intentflow-{instance}"))
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "2000");
    for (k, v) in &cfg.kafka.consumer {
        consumer_cfg.set(k, v);
    }
    let consumer: StreamConsumer<RebalanceTracker> = consumer_cfg.create_with_context(tracker)?;
    // Beyond the retries of a transaction call ([`RETRY_FOR`]) plus a margin.
    let watchdog = Watchdog::start(RETRY_FOR + Duration::from_secs(30));
    if cfg.state_dir.join(crate::replay::REPLAY_MARKER).exists() {
        let sink = Sink { producer: &producer, cfg: &cfg, changelog: &changelog, watchdog: &watchdog };
        sink.adopt_replay(&consumer, &store, input_partitions, exactly_once).await.context("handing the replayed state over")?;
    }
    let topics: Vec<&str> = cfg.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    tracing::info!(
        topics = ?cfg.input_topics, group = %cfg.group, output = %cfg.output_topic, changelog = %changelog,
        guarantee = ?cfg.processing_guarantee, "subscribed"
    );

    let metrics = BatchMetrics::default();
    let interval = Duration::from_millis(cfg.commit_interval_ms);
    let mut applied = offsets::AppliedOffsets::default();
    let mut summary = RunSummary::default();
    let mut aborts_in_a_row = 0;
    health.running.store(true, Ordering::Relaxed);

    loop {
        let start_generation = consumer.context().generation.load(Ordering::SeqCst);
        let mut generation = start_generation;
        let first = tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break,
            m = consumer.recv() => m,
        };
        let mut batch: Vec<BorrowedMessage<'_>> = Vec::with_capacity(cfg.max_batch_records);
        collect(&mut batch, first, &mut generation, consumer.context())?;
        let deadline = tokio::time::Instant::now() + interval;
        while batch.len() < cfg.max_batch_records {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(m) => collect(&mut batch, m, &mut generation, consumer.context())?,
                Err(_) => break,
            }
        }
        if let Some(failure) = consumer.context().failure.lock().expect("failure lock").take() {
            bail!("restoring state from changelog {changelog} failed: {failure}");
        }
        let now = consumer.context().generation.load(Ordering::SeqCst);
        if now != generation {
            tracing::info!(dropped = batch.len(), "rebalance while collecting: records left to the new assignment");
            batch.clear();
            generation = now;
        }
        if generation != start_generation {
            // A rebalance restored partitions: what the store reflects may have moved.
            applied.clear();
        }
        if batch.is_empty() {
            continue;
        }
        let started = Instant::now();
        let mut stats = BatchStats { records: batch.len() as u64, ..Default::default() };
        let mut fresh = Vec::with_capacity(batch.len());
        for m in &batch {
            // A partition's recorded offset is loaded on its first record after start-up or a
            // rebalance, which is when a committed offset lost to retention shows: check then,
            // not per record.
            let stored = applied.get_or_load(m.topic(), m.partition(), || {
                let stored = store.offset(m.topic(), m.partition())?;
                if let Some(expected) = stored.filter(|&e| m.offset() > e) {
                    tokio::task::block_in_place(|| report_gap(&consumer, m.topic(), m.partition(), expected, m.offset(), cfg.offset_reset));
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
        let decoded = decode_batch(&decoder, fresh, chrono::Utc::now().timestamp_millis());
        report_rejections(&decoded.rejected, &mut stats);
        let out = tokio::task::block_in_place(|| {
            operator.process(&decoded.events, &store, EmittedAt::Now(chrono::Utc::now().timestamp_millis()))
        })?;

        let next = offsets::next_offsets(batch.iter().map(|m| (m.topic(), m.partition(), m.offset())));
        let tpl = offsets_tpl(&next)?;
        // Encoded once, for the changelog and for RocksDB.
        let states: Vec<Vec<u8>> = out.states.iter().map(|(_, _, s)| s.encode()).collect();
        let sink = Sink { producer: &producer, cfg: &cfg, changelog: &changelog, watchdog: &watchdog };
        let outcome = if exactly_once {
            sink.transaction(&consumer, &out, &states, &decoded.rejected, &next, &tpl).await
        } else {
            sink.produce(&out, &states, &decoded.rejected, &next).await
        };
        let changelog_next = match outcome {
            Ok(changelog_next) => changelog_next,
            Err(e) if exactly_once => {
                // Nothing of the batch is visible and the store is untouched: abort, rewind the
                // batch's partitions and process it again.
                tracing::warn!(error = format!("{e:#}"), "transaction failed; aborting it and processing the batch again");
                tokio::task::block_in_place(|| retrying("aborting a failed transaction", || producer.abort_transaction(TXN_TIMEOUT)))?;
                rewind(&consumer, &batch);
                metrics::counter!("intentflow_transactions_aborted_total").increment(1);
                summary.aborted += 1;
                aborts_in_a_row += 1;
                if aborts_in_a_row >= MAX_ABORTS_IN_A_ROW {
                    bail!("{aborts_in_a_row} transactions in a row failed; last error: {e:#}");
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        aborts_in_a_row = 0;
        store.commit_encoded(
            out.states.iter().zip(&states).map(|((p, u, _), bytes)| (*p, u.as_str(), bytes.as_slice())),
            next.iter().map(|((t, p), o)| (t.as_str(), *p, *o)),
            changelog_positions(&changelog_next),
        )?;
        for ((t, p), o) in &next {
            applied.advance(t, *p, *o);
        }
        if !exactly_once {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                // The state store holds the offsets too, so a lost commit only costs a re-read.
                tracing::warn!(error = %e, "offset commit failed");
            }
        }

        stats.intents = out.intents.len() as u64;
        stats.state_resets = out.reset_states as u64;
        stats.waves = out.waves as u64;
        stats.seconds = started.elapsed().as_secs_f64();
        metrics.emit(&stats, &health);
        summary.records += stats.records;
        summary.intents += stats.intents;
        summary.skipped += stats.skipped;
        summary.invalid += stats.invalid.values().sum::<u64>();
        summary.batches += 1;
        tracing::debug!(records = stats.records, intents = stats.intents, waves = stats.waves, seconds = stats.seconds, "batch done");
    }

    health.running.store(false, Ordering::Relaxed);
    if exactly_once {
        // Every batch's offsets were committed in its transaction.
        consumer.unsubscribe();
        tracing::info!(?summary, "stopped");
        return Ok(summary);
    }
    // Every processed batch committed asynchronously; make the last position durable.
    // Only partitions still owned: a stale commit for a moved partition would rewind its owner.
    let assignment = consumer.assignment()?;
    let mut tpl = TopicPartitionList::new();
    for (t, p, o) in applied.known().filter(|(t, p, _)| assignment.find_partition(t, *p).is_some()) {
        tpl.add_partition_offset(t, p, Offset::Offset(o))?;
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(error = %e, "final offset commit failed; the state store holds the offsets");
        }
    }
    consumer.unsubscribe();
    tracing::info!(?summary, "stopped");
    Ok(summary)
}

/// Adds a received record to the batch being collected. Records collected before a rebalance
/// belong to the old assignment: the new one re-reads them from the committed offsets, so
/// they are dropped, not processed.
fn collect<'c>(
    batch: &mut Vec<BorrowedMessage<'c>>,
    m: Result<BorrowedMessage<'c>, rdkafka::error::KafkaError>,
    generation: &mut u64,
    tracker: &RebalanceTracker,
) -> Result<()> {
    let now = tracker.generation.load(Ordering::SeqCst);
    if now != *generation {
        if !batch.is_empty() {
            tracing::info!(dropped = batch.len(), "rebalance while collecting: records left to the new assignment");
        }
        batch.clear();
        *generation = now;
    }
    match m {
        Ok(m) => batch.push(m),
        Err(e) => consumer_error(&e)?,
    }
    Ok(())
}

/// Where a batch's results go: intents, dead letters and changelog records.
struct Sink<'a> {
    producer: &'a FutureProducer,
    cfg: &'a RunConfig,
    changelog: &'a str,
    watchdog: &'a Watchdog,
}

/// Ends the process when a transaction call blocks far beyond its timeout.
///
/// librdkafka's `send_offsets_to_transaction` ignores its timeout and can wait forever for a
/// group coordinator that died (librdkafka issues #5456 and #5511, open in 2.12). A crash is
/// what the exactly-once design recovers from — the broker aborts the open transaction and a
/// restarted instance catches up from the changelog — so a stuck call ends the process with
/// [`Watchdog::EXIT_CODE`] for its supervisor to restart, instead of hanging silently.
struct Watchdog {
    /// When the watched call started (ms since the epoch), 0 when none is running.
    since_ms: Arc<std::sync::atomic::AtomicI64>,
}

impl Watchdog {
    /// Exit status of a process ended by the watchdog (EX_TEMPFAIL: try again).
    const EXIT_CODE: i32 = 75;

    fn start(limit: Duration) -> Watchdog {
        let since_ms = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let seen = since_ms.clone();
        std::thread::Builder::new()
            .name("txn-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                let since = seen.load(Ordering::SeqCst);
                let stuck_ms = chrono::Utc::now().timestamp_millis() - since;
                if since > 0 && stuck_ms > limit.as_millis() as i64 {
                    tracing::error!(stuck_ms, "a transaction call has been blocked for {} s; exiting so that a restart recovers (librdkafka #5456)", stuck_ms / 1000);
                    std::process::exit(Watchdog::EXIT_CODE);
                }
            })
            .expect("spawning the transaction watchdog");
        Watchdog { since_ms }
    }

    /// Watches until the returned guard is dropped.
    fn watch(&self) -> impl Drop + '_ {
        struct Guard<'w>(&'w std::sync::atomic::AtomicI64);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                self.0.store(0, Ordering::SeqCst);
            }
        }
        self.since_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::SeqCst);
        Guard(&self.since_ms)
    }
}

impl Sink<'_> {
    /// Produces the batch's intents, dead letters and changelog records (`states` holds each
    /// touched user's encoded state) and awaits every acknowledgement. Returns the last
    /// changelog offset written per partition.
    async fn produce(
        &self,
        out: &intentflow_operators::BatchOutput,
        states: &[Vec<u8>],
        rejected: &[intentflow_operators::Rejected],
        next: &BTreeMap<(String, i32), i64>,
    ) -> Result<BTreeMap<i32, i64>> {
        let mut window = DeliveryWindow::new(self.producer, 100_000);
        for intent in &out.intents {
            window.send(&self.cfg.output_topic, intent.user_id.as_bytes(), &encode_intent(intent)).await?;
        }
        for r in rejected {
            let key = format!("{}/{}", r.source.topic, r.source.partition);
            let payload = r.payload.as_deref().unwrap_or_default();
            window.send_with_headers(&self.cfg.dlq_topic, key.as_bytes(), payload, Some(dead_letter_headers(r))).await?;
        }
        let users = out.states.iter().zip(states).map(|((p, u, _), bytes)| (*p, u.as_str(), bytes.as_slice()));
        self.send_changelog(&mut window, users, next).await?;
        window.finish().await?;
        Ok(window.tracked().clone())
    }

    /// Sends users' encoded states and the next input offsets to the changelog partitions of
    /// their input partitions, so a restore also restores the position the states reflect.
    async fn send_changelog<'u>(
        &self,
        window: &mut DeliveryWindow<'_>,
        users: impl IntoIterator<Item = (i32, &'u str, &'u [u8])>,
        next: &BTreeMap<(String, i32), i64>,
    ) -> Result<()> {
        for (partition, user, state) in users {
            window.send_tracked(self.changelog, partition, &ChangelogKey::User(user).encode(), state).await?;
        }
        for ((topic, partition), offset) in next {
            window.send_tracked(self.changelog, *partition, &ChangelogKey::Offset(topic).encode(), &encode_offset(*offset)).await?;
        }
        Ok(())
    }

    /// Adds the consumer offsets `tpl` to the open transaction and commits it, under the
    /// watchdog.
    fn commit_transaction(&self, consumer: &StreamConsumer<RebalanceTracker>, tpl: &TopicPartitionList) -> Result<()> {
        let group = consumer.group_metadata().context("the consumer has no group metadata")?;
        tokio::task::block_in_place(|| -> Result<()> {
            let _watch = self.watchdog.watch();
            retrying("adding the offsets to the transaction", || self.producer.send_offsets_to_transaction(tpl, &group, TXN_TIMEOUT))?;
            retrying("committing the transaction", || self.producer.commit_transaction(TXN_TIMEOUT))
        })
    }

    /// [`Sink::produce`] inside one Kafka transaction that also commits the consumer offsets
    /// `tpl`; returns once the transaction committed.
    async fn transaction(
        &self,
        consumer: &StreamConsumer<RebalanceTracker>,
        out: &intentflow_operators::BatchOutput,
        states: &[Vec<u8>],
        rejected: &[intentflow_operators::Rejected],
        next: &BTreeMap<(String, i32), i64>,
        tpl: &TopicPartitionList,
    ) -> Result<BTreeMap<i32, i64>> {
        self.producer.begin_transaction().context("beginning a transaction")?;
        let changelog_next = self.produce(out, states, rejected, next).await?;
        self.commit_transaction(consumer, tpl)?;
        Ok(changelog_next)
    }

    /// Hands a state directory written by `intentflow replay` over to the live operator: every
    /// replayed state and input offset goes to the changelog and the replay's end offsets become
    /// the group's committed offsets — one transaction under exactly-once — so live processing
    /// continues exactly where the replay ended, and a partition that later moves takes its
    /// replayed states with it. The replay marker is then renamed `ADOPTED`.
    async fn adopt_replay(&self, consumer: &StreamConsumer<RebalanceTracker>, store: &StateStore, partitions: i32, exactly_once: bool) -> Result<()> {
        let users = store.users()?;
        let mut next = BTreeMap::new();
        for topic in &self.cfg.input_topics {
            for p in 0..partitions {
                if let Some(o) = store.offset(topic, p)? {
                    next.insert((topic.clone(), p), o);
                }
            }
        }
        let tpl = offsets_tpl(&next)?;
        if exactly_once {
            self.producer.begin_transaction().context("beginning the hand-over transaction")?;
        }
        let mut window = DeliveryWindow::new(self.producer, 100_000);
        let encoded: Vec<Vec<u8>> = users.iter().map(|(_, _, s)| s.encode()).collect();
        self.send_changelog(&mut window, users.iter().zip(&encoded).map(|((p, u, _), b)| (*p, u.as_str(), b.as_slice())), &next).await?;
        window.finish().await?;
        if exactly_once {
            self.commit_transaction(consumer, &tpl)?;
        } else {
            consumer.commit(&tpl, CommitMode::Sync).context("committing the replay's offsets")?;
        }
        store.commit_encoded([], [], changelog_positions(window.tracked()))?;
        let marker = self.cfg.state_dir.join(crate::replay::REPLAY_MARKER);
        std::fs::rename(&marker, self.cfg.state_dir.join("ADOPTED"))?;
        tracing::info!(users = users.len(), offsets = ?next, "replayed state handed over: live processing continues where the replay ended");
        Ok(())
    }
}

/// The consumer offsets to commit for `next` offsets per topic-partition.
fn offsets_tpl(next: &BTreeMap<(String, i32), i64>) -> Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in next {
        tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
    }
    Ok(tpl)
}

/// The next changelog offset per partition after the last offsets written.
fn changelog_positions(last: &BTreeMap<i32, i64>) -> impl Iterator<Item = (i32, i64)> + '_ {
    last.iter().map(|(p, last)| (*p, last + 1))
}

/// Runs a transaction call again while librdkafka calls its error retriable (a coordinator
/// that moved, a broker being replaced), for up to [`RETRY_FOR`].
fn retrying(what: &str, mut call: impl FnMut() -> rdkafka::error::KafkaResult<()>) -> Result<()> {
    let deadline = Instant::now() + RETRY_FOR;
    loop {
        match call() {
            Ok(()) => return Ok(()),
            Err(rdkafka::error::KafkaError::Transaction(e)) if e.is_retriable() && Instant::now() < deadline => {
                tracing::warn!(error = %e, "{what}: retriable error, trying again");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e).context(what.to_string()),
        }
    }
}

/// Moves each partition of an aborted batch back to the batch's first record of it.
fn rewind(consumer: &StreamConsumer<RebalanceTracker>, batch: &[BorrowedMessage<'_>]) {
    let mut first: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for m in batch {
        first.entry((m.topic(), m.partition())).or_insert(m.offset());
    }
    for ((topic, partition), offset) in first {
        // A partition that moved meanwhile is re-read by its new owner from the committed offset.
        if let Err(e) = consumer.seek(topic, partition, Offset::Offset(offset), Duration::from_secs(10)) {
            tracing::warn!(topic, partition, offset, error = %e, "could not rewind the partition after an aborted transaction");
        }
    }
}

/// A consumer error: fatal when the committed offset is gone and the policy is `fail`,
/// otherwise logged.
fn consumer_error(e: &rdkafka::error::KafkaError) -> Result<()> {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    if let KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset) = e {
        tracing::error!(error = %e, "a committed offset no longer exists (deleted by retention?) and offset_reset = fail: stopping");
        anyhow::bail!("committed offset out of range and offset_reset = fail: {e}");
    }
    tracing::warn!(error = %e, "consumer error");
    Ok(())
}

/// Called when a partition's first record after start-up or a rebalance lies beyond the next
/// offset the state store expects.
/// Offsets can be skipped legitimately (transaction markers), so the low watermark decides: if
/// the expected offset is below it, retention deleted records this operator never applied, and
/// that is logged loudly and counted.
fn report_gap<C: rdkafka::consumer::ConsumerContext>(
    consumer: &StreamConsumer<C>,
    topic: &str,
    partition: i32,
    expected: i64,
    got: i64,
    policy: crate::config::OffsetReset,
) {
    let low = consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)).map(|(low, _)| low);
    if let Some(lost) = offsets::lost_to_retention(expected, got, low.ok()) {
        metrics::counter!("intentflow_offsets_lost_total").increment(lost);
        tracing::error!(
            topic,
            partition,
            expected,
            resumed_at = got,
            lost,
            policy = ?policy,
            "records deleted by retention before they were processed: {lost} offsets skipped"
        );
    }
}

/// Headers of a dead-letter record: the error kind, a readable reason, and the source position.
pub fn dead_letter_headers(r: &intentflow_operators::Rejected) -> rdkafka::message::OwnedHeaders {
    use rdkafka::message::{Header, OwnedHeaders};
    let (partition, offset) = (r.source.partition.to_string(), r.source.offset.to_string());
    let timestamp = r.timestamp_ms.map(|t| t.to_string()).unwrap_or_default();
    let reason = r.error.to_string();
    [
        (DLQ_ERROR_KIND, r.error.kind()),
        (DLQ_REASON, reason.as_str()),
        (DLQ_SOURCE_TOPIC, r.source.topic.as_str()),
        (DLQ_SOURCE_PARTITION, partition.as_str()),
        (DLQ_SOURCE_OFFSET, offset.as_str()),
        (DLQ_SOURCE_TIMESTAMP, timestamp.as_str()),
    ]
    .into_iter()
    .fold(OwnedHeaders::new(), |h, (key, value)| h.insert(Header { key, value: Some(value) }))
}

/// Dead-letter header: the rejection kind (`invalid_json`, `missing_field`, …).
pub const DLQ_ERROR_KIND: &str = "intentflow.error.kind";
/// Dead-letter header: a human-readable reason.
pub const DLQ_REASON: &str = "intentflow.error.reason";
/// Dead-letter header: the source topic.
pub const DLQ_SOURCE_TOPIC: &str = "intentflow.source.topic";
/// Dead-letter header: the source partition (decimal).
pub const DLQ_SOURCE_PARTITION: &str = "intentflow.source.partition";
/// Dead-letter header: the source offset (decimal).
pub const DLQ_SOURCE_OFFSET: &str = "intentflow.source.offset";
/// Dead-letter header: the source record's timestamp in epoch ms (empty if it had none).
pub const DLQ_SOURCE_TIMESTAMP: &str = "intentflow.source.timestamp";

/// Logs rejected records (each one names topic/partition/offset, up to a cap per batch) and
/// counts them by reason.
fn report_rejections(rejected: &[intentflow_operators::Rejected], stats: &mut BatchStats) {
    for r in rejected {
        *stats.invalid.entry(r.error.kind()).or_default() += 1;
    }
    log_rejections(rejected);
}

/// Logs rejected records, each naming topic/partition/offset, up to a cap per batch.
pub(crate) fn log_rejections(rejected: &[intentflow_operators::Rejected]) {
    const LOGGED_PER_BATCH: usize = 20;
    for (i, r) in rejected.iter().enumerate() {
        if i < LOGGED_PER_BATCH {
            tracing::warn!(
                topic = %r.source.topic,
                partition = r.source.partition,
                offset = r.source.offset,
                error_type = r.error.kind(),
                "rejected record: {}",
                r.error
            );
        }
    }
    if rejected.len() > LOGGED_PER_BATCH {
        tracing::warn!(more = rejected.len() - LOGGED_PER_BATCH, "further rejected records in this batch not logged");
    }
}
