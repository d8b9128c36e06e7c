//! Where a batch's results go: intents to the output topic and to the `[[output]]` topics whose
//! policies publish them, dead letters to the dead-letter
//! topic, users' states and input offsets to the changelog — under exactly-once in the Kafka
//! transaction of the commit interval, with the consumer offsets.
//!
//! Under at-least-once there is no transaction, so the order of deliveries is what keeps the
//! guarantees: intents and dead letters are acknowledged first, then the changelog's user
//! states, then its offset records. A crash between any two steps leaves a changelog whose user
//! states may be ahead of its offset record; each state's fences (see
//! `intentflow_state::UserState::fences`) then keep the re-read events from being applied to it
//! twice, and their intents were already delivered.

use super::startup::Serving;
use super::watchdog::Watchdog;
use crate::kafka::DeliveryWindow;
use anyhow::{Context, Result};
use intentflow_operators::emit::PolicyOutput;
use intentflow_operators::{BatchOutput, PositionedEvent, Rejected};
use intentflow_schemas::IntentSchema;
use intentflow_state::changelog::{encode_offset, ChangelogKey};
use intentflow_state::Staged;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::TopicPartitionList;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Transaction calls give up after this long.
pub const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a transaction call with a retriable error is retried.
pub const RETRY_FOR: Duration = Duration::from_secs(60);
/// Deliveries awaited at once.
pub(super) const WINDOW: usize = 100_000;

/// Produces batches' results.
pub struct BatchSink<'a> {
    /// The producer (transactional under exactly-once).
    pub producer: &'a FutureProducer,
    /// Output topic of intents.
    pub output_topic: &'a str,
    /// The schema of its intents.
    pub output_schema: IntentSchema,
    /// Dead-letter topic.
    pub dlq_topic: &'a str,
    /// Changelog topic.
    pub changelog: &'a str,
    /// Watches transaction calls.
    pub watchdog: &'a Watchdog,
    /// Whether batches are transactions.
    pub exactly_once: bool,
    /// The operator whose `[[output]]`s (in the order
    /// [`intentflow_operators::emit::Published::output`] indexes) and headers of intent records
    /// (`output_headers`) the batches' intents go out with.
    pub serving: Arc<Serving>,
}

/// One batch's results, ready to send.
pub struct BatchRecords<'b> {
    /// The batch's valid events, the operator's input.
    pub events: &'b [PositionedEvent],
    /// What the operator produced.
    pub out: &'b BatchOutput,
    /// Each touched user's encoded state, aligned with `out.states`.
    pub states: &'b [Vec<u8>],
    /// Input records that failed validation.
    pub rejected: &'b [Rejected],
    /// State records that could not be used.
    pub quarantined: &'b [crate::dlq::QuarantinedState],
}

impl BatchSink<'_> {
    /// Enqueues a batch's intents (the output topic's, then the policy outputs'), and dead letters.
    ///
    /// # Errors
    ///
    /// The first failed delivery.
    pub async fn send_outputs(&self, window: &mut DeliveryWindow<'_>, batch: &BatchRecords<'_>) -> Result<()> {
        let mut buf = Vec::with_capacity(512);
        for scored in &batch.out.scored {
            buf.clear();
            batch.out.encode_intent_as(batch.events, scored, self.output_schema, &mut buf);
            let key = batch.events[scored.input].event.user_id.as_bytes();
            window.send_with_headers(self.output_topic, key, &buf, self.headers(self.output_schema)).await?;
        }
        for published in &batch.out.published {
            let output = &self.outputs()[published.output];
            buf.clear();
            batch.out.encode_published(batch.events, published, output, &mut buf);
            let key = batch.events[batch.out.scored[published.scored].input].event.user_id.as_bytes();
            window.send_with_headers(&output.name, key, &buf, self.headers(output.schema)).await?;
        }
        for r in batch.rejected {
            let key = format!("{}/{}", r.source.topic, r.source.partition);
            let payload = r.payload.as_deref().unwrap_or_default();
            window.send_with_headers(self.dlq_topic, key.as_bytes(), payload, Some(crate::dlq::dead_letter_headers(r))).await?;
        }
        for q in batch.quarantined {
            window.send_with_headers(self.dlq_topic, &q.key, &q.value, Some(q.headers())).await?;
        }
        Ok(())
    }

    /// The headers of an intent record in `schema`, if records carry them.
    fn headers(&self, schema: IntentSchema) -> Option<OwnedHeaders> {
        self.serving.intent_headers.as_ref().map(|h| h.of(schema).clone())
    }

    /// The `[[output]]`s.
    fn outputs(&self) -> &[PolicyOutput] {
        self.serving.operator.outputs()
    }

    /// Enqueues `tombstones`, then the batch's users' states, to the changelog. Tombstones come
    /// first: a user dropped by a restore and scored again in this batch ends with its new state.
    ///
    /// # Errors
    ///
    /// The first failed delivery.
    pub async fn send_states(&self, window: &mut DeliveryWindow<'_>, batch: &BatchRecords<'_>, tombstones: &BTreeMap<i32, (u64, Vec<Vec<u8>>)>) -> Result<()> {
        self.send_tombstones(window, tombstones).await?;
        let users = batch.out.states.iter().zip(batch.states).map(|((p, u, _), bytes)| (*p, u.as_str(), bytes.as_slice()));
        self.send_users(window, users).await
    }

    /// [`BatchSink::send_states`] for the states a unit staged (at-least-once sends them when
    /// the unit commits, each user's latest once).
    ///
    /// # Errors
    ///
    /// The first failed delivery.
    pub async fn send_staged(&self, window: &mut DeliveryWindow<'_>, tombstones: &BTreeMap<i32, (u64, Vec<Vec<u8>>)>, staged: &Staged) -> Result<()> {
        self.send_tombstones(window, tombstones).await?;
        self.send_users(window, staged.user_states()).await
    }

    async fn send_tombstones(&self, window: &mut DeliveryWindow<'_>, tombstones: &BTreeMap<i32, (u64, Vec<Vec<u8>>)>) -> Result<()> {
        for (partition, (_, keys)) in tombstones {
            for key in keys {
                window.send_tombstone(self.changelog, *partition, key).await?;
            }
        }
        Ok(())
    }

    /// A window of deliveries through this sink's producer.
    pub fn window(&self) -> DeliveryWindow<'_> {
        DeliveryWindow::new(self.producer, WINDOW)
    }

    /// Begins a transaction under exactly-once (nothing otherwise).
    ///
    /// # Errors
    ///
    /// If librdkafka refuses.
    pub fn begin(&self) -> Result<()> {
        if self.exactly_once {
            self.producer.begin_transaction().context("beginning a transaction")?;
        }
        Ok(())
    }

    /// Under exactly-once, commits the open transaction, with the consumer offsets `offsets`
    /// when given (and the group metadata to fence them with), under the watchdog; nothing
    /// otherwise.
    ///
    /// # Errors
    ///
    /// A transaction call that failed for good.
    pub fn commit(&self, offsets: Option<(&ConsumerGroupMetadata, &TopicPartitionList)>) -> Result<()> {
        if !self.exactly_once {
            return Ok(());
        }
        tokio::task::block_in_place(|| -> Result<()> {
            let _watch = self.watchdog.watch();
            if let Some((group, tpl)) = offsets {
                retrying("adding the offsets to the transaction", || self.producer.send_offsets_to_transaction(tpl, group, TXN_TIMEOUT))?;
            }
            retrying("committing the transaction", || self.producer.commit_transaction(TXN_TIMEOUT))
        })
    }

    /// Sends users' encoded states to the changelog partitions of their input partitions; an
    /// empty state (a deleted user) goes as a tombstone.
    ///
    /// # Errors
    ///
    /// The first failed delivery.
    pub async fn send_users<'u>(&self, window: &mut DeliveryWindow<'_>, users: impl IntoIterator<Item = (i32, &'u str, &'u [u8])>) -> Result<()> {
        let mut key = Vec::with_capacity(64);
        for (partition, user, state) in users {
            key.clear();
            ChangelogKey::User(user).encode_into(&mut key);
            if state.is_empty() {
                window.send_tombstone(self.changelog, partition, &key).await?;
            } else {
                window.send_tracked(self.changelog, partition, &key, state).await?;
            }
        }
        Ok(())
    }

    /// Sends the next input offset of each topic-partition to the changelog, so that a restore
    /// also restores the position the states reflect.
    ///
    /// # Errors
    ///
    /// The first failed delivery.
    pub async fn send_offsets(&self, window: &mut DeliveryWindow<'_>, next: &BTreeMap<(String, i32), i64>) -> Result<()> {
        for ((topic, partition), offset) in next {
            window.send_tracked(self.changelog, *partition, &ChangelogKey::Offset(topic).encode(), &encode_offset(*offset)).await?;
        }
        Ok(())
    }

    /// Aborts the open transaction.
    ///
    /// # Errors
    ///
    /// If it cannot be aborted: the operator must stop (a restart fences it).
    pub fn abort(&self) -> Result<()> {
        tokio::task::block_in_place(|| retrying("aborting a failed transaction", || self.producer.abort_transaction(TXN_TIMEOUT)))
    }
}

/// Runs a transaction call again while librdkafka calls its error retriable (a coordinator
/// that moved, a broker being replaced), for up to [`RETRY_FOR`].
///
/// # Errors
///
/// The call's error once it is not retriable or time is up.
pub fn retrying(what: &str, mut call: impl FnMut() -> rdkafka::error::KafkaResult<()>) -> Result<()> {
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

/// The consumer offsets to commit for `next` offsets per topic-partition.
///
/// # Errors
///
/// An offset librdkafka refuses.
pub fn offsets_tpl(next: &BTreeMap<(String, i32), i64>) -> Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in next {
        tpl.add_partition_offset(t, *p, rdkafka::Offset::Offset(*o))?;
    }
    Ok(tpl)
}

/// Keeps, per partition, the highest of the offsets in `into` and `from`.
pub fn keep_highest(into: &mut BTreeMap<i32, i64>, from: &BTreeMap<i32, i64>) {
    for (p, o) in from {
        let top = into.entry(*p).or_insert(*o);
        *top = (*top).max(*o);
    }
}

/// The next changelog offset per partition after the last offsets written.
pub fn changelog_positions(last: &BTreeMap<i32, i64>) -> impl Iterator<Item = (i32, i64)> + '_ {
    last.iter().map(|(p, last)| (*p, last + 1))
}
