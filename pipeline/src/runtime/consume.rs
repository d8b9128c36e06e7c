//! What the batch loop does with the consumer: collecting a batch across rebalances, rewinding
//! after an aborted transaction, and reporting offsets lost to retention.

use super::inputs::InputOrder;
use super::RebalanceContext;
use crate::offsets;
use crate::config::OffsetReset;
use anyhow::{bail, Result};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::Offset;
use std::collections::BTreeMap;
use std::time::Duration;

/// Adds a received record to the batch being collected. Records collected before a rebalance
/// belong to the old assignment: the new one re-reads them from the committed offsets, so
/// they are dropped, not processed.
pub(super) fn collect<'c>(
    batch: &mut Vec<BorrowedMessage<'c>>,
    m: Result<BorrowedMessage<'c>, rdkafka::error::KafkaError>,
    generation: &mut u64,
    ctx: &RebalanceContext,
) -> Result<()> {
    let now = ctx.generation();
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

/// Moves each partition of an aborted transaction (whose first offsets, the batch in hand's
/// included, are `first`) and of the records buffered behind it back to its first record, and
/// forgets the buffered ones: everything is read again.
pub(super) fn rewind(consumer: &StreamConsumer<RebalanceContext>, mut first: BTreeMap<(String, i32), i64>, order: Option<&mut InputOrder<'_>>) {
    let buffered = order.map(InputOrder::clear).unwrap_or_default();
    for (topic, partition, offset) in buffered {
        let slot = first.entry((topic, partition)).or_insert(offset);
        *slot = (*slot).min(offset);
    }
    for ((topic, partition), offset) in first {
        // A partition that moved meanwhile is re-read by its new owner from the committed offset.
        if let Err(e) = consumer.seek(&topic, partition, Offset::Offset(offset), Duration::from_secs(10)) {
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
        bail!("committed offset out of range and offset_reset = fail: {e}");
    }
    tracing::warn!(error = %e, "consumer error");
    Ok(())
}

/// Called when a partition's first record after start-up or a rebalance lies beyond the next
/// offset the state store expects.
/// Offsets can be skipped legitimately (transaction markers), so the low watermark decides: if
/// the expected offset is below it, retention deleted records this operator never applied, and
/// that is logged loudly and counted.
pub(super) fn report_gap(consumer: &StreamConsumer<RebalanceContext>, topic: &str, partition: i32, expected: i64, got: i64, policy: OffsetReset) {
    let low = consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)).map(|(low, _)| low);
    if let Some(lost) = offsets::lost_to_retention(expected, got, low.ok()) {
        metrics::counter!("intentflow_offsets_lost_total").increment(lost);
        tracing::error!(topic, partition, expected, resumed_at = got, lost, policy = ?policy, "records deleted by retention before they were processed: {lost} offsets skipped");
    }
}
