//! The dead-letter topic: what cannot be used goes there with its original bytes and headers
//! that say why and where it came from, instead of stopping a partition.
//!
//! Two kinds of records end up there:
//!
//! * input records that fail validation ([`Rejected`]), with the decoder's reason;
//! * state records that cannot be used ([`QuarantinedState`]): a changelog record that does not
//!   decode, belongs to no known key, or uses a newer encoding, found while restoring; or a
//!   local state that does not decode, found while loading. Their users start fresh.
//!
//! Every one is also counted and logged with its topic, partition and offset.

use intentflow_operators::Rejected;
use rdkafka::message::{Header, OwnedHeaders};

/// Dead-letter header: the rejection kind (`invalid_json`, `missing_field`, `corrupt_state`, …).
pub const DLQ_ERROR_KIND: &str = "intentflow.error.kind";
/// Dead-letter header: a human-readable reason.
pub const DLQ_REASON: &str = "intentflow.error.reason";
/// Dead-letter header: the source topic (the changelog topic for state records, or
/// [`LOCAL_STORE`] for a record of the local store).
pub const DLQ_SOURCE_TOPIC: &str = "intentflow.source.topic";
/// Dead-letter header: the source partition (decimal).
pub const DLQ_SOURCE_PARTITION: &str = "intentflow.source.partition";
/// Dead-letter header: the source offset (decimal; -1 for a record of the local store).
pub const DLQ_SOURCE_OFFSET: &str = "intentflow.source.offset";
/// Dead-letter header: the source record's timestamp in epoch ms (empty if it had none).
pub const DLQ_SOURCE_TIMESTAMP: &str = "intentflow.source.timestamp";
/// The source topic named for a state read from the local store.
pub const LOCAL_STORE: &str = "local-state-store";

/// Headers of a dead letter.
fn headers(kind: &str, reason: &str, topic: &str, partition: i32, offset: i64, timestamp_ms: Option<i64>) -> OwnedHeaders {
    let (partition, offset) = (partition.to_string(), offset.to_string());
    let timestamp = timestamp_ms.map(|t| t.to_string()).unwrap_or_default();
    [
        (DLQ_ERROR_KIND, kind),
        (DLQ_REASON, reason),
        (DLQ_SOURCE_TOPIC, topic),
        (DLQ_SOURCE_PARTITION, partition.as_str()),
        (DLQ_SOURCE_OFFSET, offset.as_str()),
        (DLQ_SOURCE_TIMESTAMP, timestamp.as_str()),
    ]
    .into_iter()
    .fold(OwnedHeaders::new(), |h, (key, value)| h.insert(Header { key, value: Some(value) }))
}

/// Headers of a rejected input record: the error kind, a readable reason, and the source
/// position.
pub fn dead_letter_headers(r: &Rejected) -> OwnedHeaders {
    headers(r.error.kind(), &r.error.to_string(), &r.source.topic, r.source.partition, r.source.offset, r.timestamp_ms)
}

/// A state record that cannot be used.
#[derive(Debug)]
pub struct QuarantinedState {
    /// The changelog topic, or [`LOCAL_STORE`].
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The changelog offset (-1 for the local store).
    pub offset: i64,
    /// The record's key (the changelog key, or the user id).
    pub key: Vec<u8>,
    /// Its original bytes.
    pub value: Vec<u8>,
    /// [`intentflow_state::StateError::kind`].
    pub kind: &'static str,
    /// Why it cannot be used.
    pub reason: String,
}

impl QuarantinedState {
    /// Its dead-letter headers.
    pub fn headers(&self) -> OwnedHeaders {
        headers(self.kind, &self.reason, &self.topic, self.partition, self.offset, None)
    }

    /// Logs it (a state record is rare enough to log every one) and counts it.
    pub fn report(&self, counter: &metrics::Counter) {
        tracing::error!(
            topic = %self.topic,
            partition = self.partition,
            offset = self.offset,
            error_type = self.kind,
            key = %String::from_utf8_lossy(&self.key),
            "unusable state record quarantined to the dead-letter topic; its user starts fresh: {}",
            self.reason
        );
        counter.increment(1);
    }
}

/// Logs rejected records, each naming topic/partition/offset, up to a cap per batch.
pub fn log_rejections(rejected: &[Rejected]) {
    const LOGGED_PER_BATCH: usize = 20;
    for r in rejected.iter().take(LOGGED_PER_BATCH) {
        tracing::warn!(
            topic = %r.source.topic,
            partition = r.source.partition,
            offset = r.source.offset,
            error_type = r.error.kind(),
            "rejected record: {}",
            r.error
        );
    }
    if rejected.len() > LOGGED_PER_BATCH {
        tracing::warn!(more = rejected.len() - LOGGED_PER_BATCH, "further rejected records in this batch not logged");
    }
}
