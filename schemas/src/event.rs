//! Clickstream events (schema v1) and their validating decoder.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The kind of a clickstream event. Aliases used by public datasets are accepted on input
/// (see [`EventType::parse`]); output always uses the canonical snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// A product or page view (`view`, `pv`, `page_view`, `detail`).
    View,
    /// A click on a product, banner or recommendation (`click`).
    Click,
    /// An item added to the cart (`add_to_cart`, `cart`, `addtocart`).
    AddToCart,
    /// An item removed from the cart (`remove_from_cart`, `remove`).
    RemoveFromCart,
    /// An item saved to a wishlist or favourites (`wishlist`, `fav`, `favorite`).
    Wishlist,
    /// A completed purchase (`purchase`, `buy`, `transaction`, `order`).
    Purchase,
}

impl EventType {
    /// All event types, in the order of their one-hot feature slots.
    pub const ALL: [EventType; 6] = [
        EventType::View,
        EventType::Click,
        EventType::AddToCart,
        EventType::RemoveFromCart,
        EventType::Wishlist,
        EventType::Purchase,
    ];

    /// Parses a canonical name or a documented alias, case-insensitively.
    pub fn parse(s: &str) -> Option<EventType> {
        let lower = s.trim().to_ascii_lowercase();
        Some(match lower.as_str() {
            "view" | "pv" | "page_view" | "pageview" | "detail" => EventType::View,
            "click" => EventType::Click,
            "add_to_cart" | "cart" | "addtocart" | "add-to-cart" => EventType::AddToCart,
            "remove_from_cart" | "remove" | "removefromcart" | "remove-from-cart" => {
                EventType::RemoveFromCart
            }
            "wishlist" | "fav" | "favorite" | "favourite" => EventType::Wishlist,
            "purchase" | "buy" | "transaction" | "order" => EventType::Purchase,
            _ => return None,
        })
    }

    /// The canonical name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::View => "view",
            EventType::Click => "click",
            EventType::AddToCart => "add_to_cart",
            EventType::RemoveFromCart => "remove_from_cart",
            EventType::Wishlist => "wishlist",
            EventType::Purchase => "purchase",
        }
    }

    /// Position of this type in [`EventType::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event's text: kept inline up to 24 bytes (user, item and category ids, brands: no
/// allocation per event), on the heap beyond.
pub type Text = compact_str::CompactString;

/// One validated clickstream event.
///
/// Serialises to canonical schema v1 JSON: `ts` as epoch milliseconds, absent optionals omitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The user (shopper) the event belongs to; integers on input are kept as their decimal text.
    pub user_id: Text,
    /// Event time in epoch milliseconds (UTC).
    pub ts: i64,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Producer-assigned id of the event, echoed in the scored intent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<Text>,
    /// The shop's own session id; a change starts a new session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Text>,
    /// Product id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_id: Option<Text>,
    /// Product category as a path of names (REES46 `category_code`, e.g.
    /// `electronics.smartphone`); a bare id belongs in `category_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<Text>,
    /// Product category id (REES46 and Taobao `category_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category_id: Option<Text>,
    /// Product brand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brand: Option<Text>,
    /// Unit price, ≥ 0, in the shop's currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
    /// Number of units, ≥ 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<u32>,
}

/// Why a record was rejected. Every variant names the offending field or limit so the log line
/// and the dead-letter headers can say exactly what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The record had no value (a tombstone or an empty message).
    #[error("empty record")]
    Empty,
    /// The record is larger than the configured maximum.
    #[error("record of {size} bytes exceeds the limit of {limit} bytes")]
    Oversized {
        /// Size of the record in bytes.
        size: usize,
        /// Configured maximum.
        limit: usize,
    },
    /// The bytes are not a JSON object.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// A required field is absent or null.
    #[error("missing required field `{0}`")]
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    #[error("field `{field}` must be {expected}, got {got}")]
    WrongType {
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
        /// The JSON type it had.
        got: &'static str,
    },
    /// `type` names no known event type or alias.
    #[error("unknown event type `{0}`")]
    UnknownEventType(String),
    /// `ts` is not RFC 3339 or epoch milliseconds.
    #[error("unparseable timestamp `{0}` (expected RFC 3339 or epoch milliseconds)")]
    BadTimestamp(String),
    /// A value is outside its allowed range.
    #[error("field `{field}` out of range: {reason}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl DecodeError {
    /// A short label from a bounded set, for metric labels and dead-letter headers.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::UnknownEventType(_) => "unknown_event_type",
            DecodeError::BadTimestamp(_) => "bad_timestamp",
            DecodeError::OutOfRange { .. } => "out_of_range",
        }
    }

    /// Every label [`DecodeError::kind`] can return, to pre-register metrics.
    pub const KINDS: [&'static str; 8] = [
        "empty",
        "oversized",
        "invalid_json",
        "missing_field",
        "wrong_type",
        "unknown_event_type",
        "bad_timestamp",
        "out_of_range",
    ];
}

/// Validation limits. The defaults accept any plausible shop event and reject absurd values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Largest accepted record in bytes (default 64 KiB).
    pub max_record_bytes: usize,
    /// How far an event time may lie ahead of the wall clock (default 1 day).
    pub max_future_ms: i64,
    /// Earliest accepted event time (default 2000-01-01T00:00:00Z).
    pub min_ts_ms: i64,
    /// Largest accepted unit price (default 10^9).
    pub max_price: f64,
    /// Largest accepted quantity (default 100 000).
    pub max_quantity: u32,
    /// Longest accepted id or category string in bytes (default 256).
    pub max_id_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_record_bytes: 64 * 1024,
            max_future_ms: 24 * 3600 * 1000,
            min_ts_ms: 946_684_800_000,
            max_price: 1e9,
            max_quantity: 100_000,
            max_id_bytes: 256,
        }
    }
}
