//! Bounded reads: a range of an assigned partition (restores, replays), or a whole topic
//! (`tail`, tests).

use super::KafkaClients;
use anyhow::{anyhow, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::util::Timeout;
use rdkafka::{Message, TopicPartitionList};
use std::time::Duration;

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
pub fn read_topic(clients: &KafkaClients, topic: &str, idle: Duration, mut until: impl FnMut(usize) -> bool) -> Result<Vec<OwnedMessage>> {
    let partitions = super::admin::partition_count(clients, topic)?.ok_or_else(|| anyhow!("topic {topic} does not exist"))?;
    let consumer: BaseConsumer = clients.reader_config("intentflow-reader", "read_committed").create()?;
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
