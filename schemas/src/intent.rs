//! Scored intents (schema v1): what the operator emits for every valid input event.

use serde::{Deserialize, Serialize};

/// Version of the scored-intent schema, written as field `v` of every intent.
pub const INTENT_SCHEMA_VERSION: u32 = 1;

/// Where an input event came from: a Kafka topic-partition-offset, or a file and line for
/// offline runs (topic = file path, partition = 0, offset = line number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    /// Input topic (or file); a topic name of up to 24 bytes is kept inline, so an event's
    /// position costs no allocation.
    pub topic: crate::Text,
    /// Input partition.
    pub partition: i32,
    /// Offset of the input record.
    pub offset: i64,
}

/// The purchase intent of one user right after one event, keyed by `user_id` on Kafka.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredIntent {
    /// Schema version ([`INTENT_SCHEMA_VERSION`]).
    pub v: u32,
    /// The user.
    pub user_id: String,
    /// Probability (0..1) that the user's current session ends in a purchase.
    pub score: f32,
    /// Time of the event that produced this score, RFC 3339 UTC.
    pub event_ts: String,
    /// Type of that event.
    pub event_type: crate::EventType,
    /// Id of that event, if the producer gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The shop's session id, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Index of this session among the user's sessions seen by the operator (0-based).
    pub session_seq: u32,
    /// Number of events in the current session, this one included.
    pub session_events: u32,
    /// Content hash of the model that scored the event.
    pub model_version: String,
    /// Where the input event came from.
    pub source: SourcePosition,
    /// When the operator emitted the score, RFC 3339 UTC.
    pub emitted_at: String,
    /// The signals that raised the score most, strongest first (at most three; only when the
    /// operator runs with `reasons = true`), e.g. `["cart_added", "returning_buyer"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}
