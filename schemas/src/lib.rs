//! Wire types of Intentflow, the leaf of the workspace.
//!
//! * [`Event`] is one clickstream event (schema v1, one JSON object per Kafka message, keyed by
//!   user id). [`EventDecoder`] turns raw bytes into a validated [`Event`] or a typed
//!   [`DecodeError`] that names what is wrong; it never panics on any input.
//! * [`ScoredIntent`] is what the operator emits per valid input event: the probability that the
//!   user's current session ends in a purchase, with provenance.
//! * [`SessionState`] is the plain-data session part of a user's state (counters and times),
//!   shared by the state encoding, the feature code and the training code so they cannot drift.
//!
//! The formats are documented with examples in `docs/schemas.md`.

mod event;
mod intent;
mod session;

pub use event::{DecodeError, Event, EventDecoder, EventType, Limits};
pub use intent::{ScoredIntent, SourcePosition, INTENT_SCHEMA_VERSION};
pub use session::{item_key, SessionConfig, SessionState, SessionStep};

/// Formats epoch milliseconds as RFC 3339 UTC with millisecond precision, e.g.
/// `2019-10-01T00:00:00.000Z`.
pub fn format_ts_ms(ts_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ts_ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| ts_ms.to_string())
}
