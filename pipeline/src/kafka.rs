//! Kafka wiring shared by the commands: client configs, topic creation, a bounded window of
//! in-flight deliveries, and a bulk reader.

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{OwnedHeaders, OwnedMessage};
use rdkafka::producer::future_producer::{Delivery, DeliveryFuture, OwnedDeliveryResult};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Message, TopicPartitionList};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// Metadata and admin requests give up after this long.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A base client config for `brokers` with the given extra properties applied last.
pub fn client_config(brokers: &str, overrides: &BTreeMap<String, String>) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers);
    for (k, v) in overrides {
        cfg.set(k, v);
    }
    cfg
}

/// A config for a consumer of assigned partitions that never commits: `group` only names it.
pub fn reader_config(brokers: &str, overrides: &BTreeMap<String, String>, group: &str, isolation: &str) -> ClientConfig {
    let mut cfg = client_config(brokers, overrides);
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", isolation);
    cfg
}

/// An idempotent producer tuned for throughput with bounded latency.
///
/// # Errors
///
/// If librdkafka rejects the configuration.
pub fn producer(brokers: &str, overrides: &BTreeMap<String, String>) -> Result<FutureProducer> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "500000")
        .set("message.timeout.ms", "120000");
    for (k, v) in overrides {
        cfg.set(k, v);
    }
    cfg.create().context("creating Kafka producer")
}

/// Creates `topic` with `partitions` partitions (the broker's default replication factor) if it
/// does not exist yet. Returns the topic's partition count.
///
/// # Errors
///
/// If the broker cannot be reached or refuses the topic.
pub async fn ensure_topic(brokers: &str, topic: &str, partitions: i32) -> Result<i32> {
    ensure_topic_with(brokers, topic, partitions, &[]).await
}

/// [`ensure_topic`] with topic configs (such as `cleanup.policy = compact`) for a new topic.
///
/// # Errors
///
/// If the broker cannot be reached or refuses the topic.
pub async fn ensure_topic_with(brokers: &str, topic: &str, partitions: i32, configs: &[(&str, &str)]) -> Result<i32> {
    if let Some(n) = partition_count(brokers, topic)? {
        return Ok(n);
    }
    let admin: AdminClient<DefaultClientContext> = client_config(brokers, &BTreeMap::new()).create()?;
    let new = configs.iter().fold(NewTopic::new(topic, partitions, TopicReplication::Fixed(-1)), |t, (k, v)| t.set(k, v));
    let results = admin
        .create_topics([&new], &AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT)))
        .await
        .with_context(|| format!("creating topic {topic}"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("creating topic {name}: {code}"),
        }
    }
    // Creation is asynchronous on the broker: wait until metadata shows the partitions.
    for _ in 0..100 {
        if let Some(n) = partition_count(brokers, topic)? {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("topic {topic} was created but its metadata did not appear")
}

/// The number of partitions of `topic`, or `None` if it does not exist.
///
/// # Errors
///
/// If the broker cannot be reached.
pub fn partition_count(brokers: &str, topic: &str) -> Result<Option<i32>> {
    let consumer: BaseConsumer = client_config(brokers, &BTreeMap::new())
        .set("allow.auto.create.topics", "false")
        .create()?;
    let md = consumer
        .fetch_metadata(Some(topic), ADMIN_TIMEOUT)
        .with_context(|| format!("fetching metadata of {topic} from {brokers}"))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len() as i32))
}

/// Keeps up to `capacity` deliveries in flight and surfaces the first failure.
///
/// Sending never blocks on a round trip: when librdkafka's queue is full, the oldest delivery
/// is awaited to make room. Deliveries sent with [`DeliveryWindow::send_tracked`] have their
/// highest offset per partition kept ([`DeliveryWindow::tracked`]).
pub struct DeliveryWindow<'p> {
    producer: &'p FutureProducer,
    pending: VecDeque<(DeliveryFuture, bool)>,
    capacity: usize,
    delivered: u64,
    tracked: BTreeMap<i32, i64>,
}

impl<'p> DeliveryWindow<'p> {
    /// A window over `producer` with at most `capacity` deliveries awaited at once.
    pub fn new(producer: &'p FutureProducer, capacity: usize) -> Self {
        DeliveryWindow { producer, pending: VecDeque::new(), capacity: capacity.max(1), delivered: 0, tracked: BTreeMap::new() }
    }

    async fn settle_oldest(&mut self) -> Result<()> {
        if let Some((fut, track)) = self.pending.pop_front() {
            let d = settle(fut.await)?;
            self.delivered += 1;
            if track {
                let top = self.tracked.entry(d.partition).or_insert(d.offset);
                *top = (*top).max(d.offset);
            }
        }
        Ok(())
    }

    /// Highest delivered offset per partition of the records sent with
    /// [`DeliveryWindow::send_tracked`] (complete after [`DeliveryWindow::finish`]).
    pub fn tracked(&self) -> &BTreeMap<i32, i64> {
        &self.tracked
    }

    /// Enqueues one record to an explicit partition and keeps its delivered offset.
    ///
    /// # Errors
    ///
    /// The first failed delivery, or a non-retriable enqueue error.
    pub async fn send_tracked(&mut self, topic: &str, partition: i32, key: &[u8], payload: &[u8]) -> Result<()> {
        self.enqueue(FutureRecord::to(topic).partition(partition).key(key).payload(payload), true).await
    }

    /// Enqueues one record.
    ///
    /// # Errors
    ///
    /// The first failed delivery, or a non-retriable enqueue error.
    pub async fn send(&mut self, topic: &str, key: &[u8], payload: &[u8]) -> Result<()> {
        self.send_with_headers(topic, key, payload, None).await
    }

    /// Enqueues one record with `timestamp_ms` as its record timestamp (instead of the
    /// producer's clock).
    ///
    /// # Errors
    ///
    /// The first failed delivery, or a non-retriable enqueue error.
    pub async fn send_at(&mut self, topic: &str, key: &[u8], payload: &[u8], timestamp_ms: i64) -> Result<()> {
        self.enqueue(FutureRecord::to(topic).key(key).payload(payload).timestamp(timestamp_ms), false).await
    }

    /// Enqueues one record with headers.
    ///
    /// # Errors
    ///
    /// The first failed delivery, or a non-retriable enqueue error.
    pub async fn send_with_headers(&mut self, topic: &str, key: &[u8], payload: &[u8], headers: Option<OwnedHeaders>) -> Result<()> {
        let mut record = FutureRecord::to(topic).key(key).payload(payload);
        if let Some(h) = headers {
            record = record.headers(h);
        }
        self.enqueue(record, false).await
    }

    async fn enqueue(&mut self, mut record: FutureRecord<'_, [u8], [u8]>, track: bool) -> Result<()> {
        if self.pending.len() >= self.capacity {
            self.settle_oldest().await?;
        }
        loop {
            match self.producer.send_result(record) {
                Ok(fut) => {
                    self.pending.push_back((fut, track));
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    if self.pending.is_empty() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    } else {
                        self.settle_oldest().await?;
                    }
                }
                Err((e, back)) => return Err(anyhow!(e).context(format!("producing to {}", back.topic))),
            }
        }
    }

    /// Awaits every pending delivery; returns how many were delivered in all.
    ///
    /// # Errors
    ///
    /// The first failed delivery.
    pub async fn finish(&mut self) -> Result<u64> {
        while !self.pending.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(self.delivered)
    }
}

fn settle<Canceled>(r: Result<OwnedDeliveryResult, Canceled>) -> Result<Delivery> {
    match r {
        Ok(Ok(d)) => Ok(d),
        Ok(Err((e, m))) => Err(anyhow!(e).context(format!("delivery to {} failed", m.topic()))),
        Err(_) => bail!("producer dropped a delivery"),
    }
}

/// Reads `topic`/`partition` (already assigned to `consumer`) until the consumer's position
/// reaches `end`, calling `each` for every record below `end`. Returns the position, or `None`
/// after `max` records when the end is not reached yet (call again to go on).
///
/// The position passes transaction markers and aborted records, so with `read_committed` the
/// call returns once every transaction below `end` has ended; while one stays open, a line is
/// logged every 5 s.
///
/// # Errors
///
/// Kafka errors and whatever `each` returns.
pub fn read_range(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    end: i64,
    max: usize,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<()>,
) -> Result<Option<i64>> {
    let mut last_progress = std::time::Instant::now();
    let mut delivered = 0;
    loop {
        if delivered >= max {
            return Ok(None);
        }
        match consumer.poll(Timeout::After(Duration::from_millis(100))) {
            Some(Ok(m)) => {
                let offset = m.offset();
                if offset < end {
                    each(&m)?;
                    delivered += 1;
                }
                if offset + 1 >= end {
                    return Ok(Some(offset + 1));
                }
                last_progress = std::time::Instant::now();
                // The position is only asked for when the partition goes quiet: asking costs a
                // round trip to librdkafka's main thread.
                continue;
            }
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => return Err(anyhow!(e).context(format!("reading {topic}/{partition}"))),
        }
        let position = consumer.position()?.find_partition(topic, partition).and_then(|e| e.offset().to_raw()).unwrap_or(-1);
        if position >= end {
            return Ok(Some(position));
        }
        if last_progress.elapsed() > Duration::from_secs(5) {
            tracing::warn!(topic, partition, position, end, "waiting for an open transaction below the end offset (a crashed producer's is aborted after its transaction timeout)");
            last_progress = std::time::Instant::now();
        }
    }
}

/// Reads every record of `topic` from the beginning until `until(count)` says stop or the
/// topic has been idle for `idle`. Reads committed data only. Returns the records in the order
/// read (per partition in offset order).
///
/// # Errors
///
/// Kafka errors.
pub fn read_topic(brokers: &str, topic: &str, idle: Duration, mut until: impl FnMut(usize) -> bool) -> Result<Vec<OwnedMessage>> {
    let partitions = partition_count(brokers, topic)?.ok_or_else(|| anyhow!("topic {topic} does not exist"))?;
    let consumer: BaseConsumer = reader_config(brokers, &BTreeMap::new(), "intentflow-reader", "read_committed").create()?;
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
