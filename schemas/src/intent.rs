//! Scored intents (schemas v1 and v2): what the operator emits for every valid input event.

use serde::{Deserialize, Serialize};

/// Version of the scored-intent schema written by default, field `v` of every intent.
pub const INTENT_SCHEMA_VERSION: u32 = 1;

/// The versions of the scored-intent schema an output may be written in
/// (`docs/schemas/intent-v1.schema.json`, `intent-v2.schema.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub enum IntentSchema {
    /// Version 1: the score, the event's type, time and position, the session's counts, the model.
    #[default]
    V1,
    /// Version 2: version 1, the triggering event's product (`item_id`, `category`,
    /// `category_id`, `brand`, `price`), the session's cart (`cart_count`, `cart_value`), the
    /// `decision` at the model's `threshold`, and the label `horizon`.
    V2,
}

impl IntentSchema {
    /// The version number, field `v`.
    pub fn number(self) -> u32 {
        match self {
            IntentSchema::V1 => 1,
            IntentSchema::V2 => 2,
        }
    }
}

impl From<IntentSchema> for u32 {
    fn from(s: IntentSchema) -> u32 {
        s.number()
    }
}

impl TryFrom<u32> for IntentSchema {
    type Error = String;
    fn try_from(v: u32) -> Result<IntentSchema, String> {
        match v {
            1 => Ok(IntentSchema::V1),
            2 => Ok(IntentSchema::V2),
            other => Err(format!("intent schema {other}: 1 or 2")),
        }
    }
}

/// What a score predicts (v2's `horizon`): a purchase before the current session ends, the only
/// label `intentflow train` trains for.
pub const HORIZON_SESSION: &str = "session";

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
    /// Schema version: 1 ([`INTENT_SCHEMA_VERSION`], the default) or 2 ([`IntentSchema`]).
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
    /// v2's fields (absent in v1).
    #[serde(flatten)]
    pub detail: IntentDetail,
    /// The placement under an `[[output]]`'s policy (absent on the every-event output).
    #[serde(flatten)]
    pub placement: Placement,
}

/// What schema v2 adds to an intent: the triggering event's product, the session's cart, the
/// decision at the model's threshold, the label horizon. All absent in v1.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct IntentDetail {
    /// The triggering event's product id, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_id: Option<String>,
    /// The triggering event's category path, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// The triggering event's category id, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category_id: Option<String>,
    /// The triggering event's brand, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brand: Option<String>,
    /// The triggering event's unit price, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
    /// Items added to the cart in the current session, after this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cart_count: Option<u32>,
    /// Value of the items added to the cart in the current session, after this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cart_value: Option<f64>,
    /// Whether the score reaches the model's decision threshold (absent for a model
    /// without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<bool>,
    /// That threshold (F1-maximising on the model's validation split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// What the score predicts ([`HORIZON_SESSION`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub horizon: Option<String>,
}

/// What an `[[output]]` with a policy adds to the intents it publishes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Placement {
    /// On an output with a policy that remembers (`delta`, `threshold`, `segments`): the score
    /// this output published for the user before this one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_score: Option<f32>,
    /// On a `threshold` output: `up` when the user reached the entry score, `down` when the
    /// score fell below the exit score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crossing: Option<Crossing>,
    /// On a `segments` output: the user's segment after this score (e.g. `hot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
}

/// The direction of a threshold crossing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Crossing {
    /// The score reached the entry threshold from below.
    Up,
    /// The score fell below the exit threshold from inside.
    Down,
}
