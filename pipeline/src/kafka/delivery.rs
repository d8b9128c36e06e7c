//! A bounded window of in-flight deliveries: sending never waits for a round trip, and the first
//! failed delivery surfaces.

use anyhow::{anyhow, bail, Result};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::future_producer::{Delivery, DeliveryFuture, OwnedDeliveryResult};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

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

    /// Awaits the oldest delivery. Cancellation-safe: a delivery leaves the window only once it
    /// has settled, so a caller may race [`DeliveryWindow::finish`] against other events.
    async fn settle_oldest(&mut self) -> Result<()> {
        let Some((fut, _)) = self.pending.front_mut() else { return Ok(()) };
        let result = fut.await;
        let (_, track) = self.pending.pop_front().expect("the delivery awaited");
        let d = settle(result)?;
        self.delivered += 1;
        if track {
            let top = self.tracked.entry(d.partition).or_insert(d.offset);
            *top = (*top).max(d.offset);
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

    /// Enqueues a tombstone (a key without a value) to an explicit partition and keeps its
    /// delivered offset.
    ///
    /// # Errors
    ///
    /// The first failed delivery, or a non-retriable enqueue error.
    pub async fn send_tombstone(&mut self, topic: &str, partition: i32, key: &[u8]) -> Result<()> {
        self.enqueue(FutureRecord::<[u8], [u8]>::to(topic).partition(partition).key(key), true).await
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

    /// Awaits every pending delivery; returns how many were delivered in all. Cancellation-safe
    /// (see `settle_oldest`).
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
