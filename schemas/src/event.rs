//! Clickstream events (schema v1) and their validating decoder.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
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

/// One validated clickstream event.
///
/// Serialises to canonical schema v1 JSON: `ts` as epoch milliseconds, absent optionals omitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The user (shopper) the event belongs to; integers on input are kept as their decimal text.
    pub user_id: String,
    /// Event time in epoch milliseconds (UTC).
    pub ts: i64,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Producer-assigned id of the event, echoed in the scored intent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The shop's own session id; a change starts a new session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Product id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_id: Option<String>,
    /// Product category (id or path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
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

/// Decodes and validates schema v1 events.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventDecoder {
    /// The limits applied to every record.
    pub limits: Limits,
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn present<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

impl EventDecoder {
    /// Builds a decoder with the given limits.
    pub fn new(limits: Limits) -> Self {
        EventDecoder { limits }
    }

    /// Decodes one record. `now_ms` is the wall clock used to reject events from the far future;
    /// it is a parameter so that decoding stays a pure function.
    ///
    /// # Errors
    ///
    /// A [`DecodeError`] naming the first problem found. Unknown fields are ignored.
    pub fn decode(&self, bytes: &[u8], now_ms: i64) -> Result<Event, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        if bytes.len() > self.limits.max_record_bytes {
            return Err(DecodeError::Oversized { size: bytes.len(), limit: self.limits.max_record_bytes });
        }
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(DecodeError::InvalidJson(format!("expected an object, got {}", json_type(&value))));
        };
        self.decode_object(&obj, now_ms)
    }

    /// Validates one event given as field values, with the same rules as
    /// [`EventDecoder::decode`] minus the byte-level checks. Sources that are not JSON (Parquet
    /// rows) present their cells this way, so every source obeys one set of rules.
    ///
    /// # Errors
    ///
    /// A [`DecodeError`] naming the first problem found. Unknown fields are ignored.
    pub fn decode_object(&self, obj: &Map<String, Value>, now_ms: i64) -> Result<Event, DecodeError> {
        let user_id = self.id_field(obj, "user_id")?.ok_or(DecodeError::MissingField("user_id"))?;
        if user_id.is_empty() {
            return Err(DecodeError::OutOfRange { field: "user_id", reason: "empty".into() });
        }
        let ts = self.timestamp(present(obj, "ts").ok_or(DecodeError::MissingField("ts"))?, now_ms)?;
        let kind = match present(obj, "type").ok_or(DecodeError::MissingField("type"))? {
            Value::String(s) => EventType::parse(s).ok_or_else(|| DecodeError::UnknownEventType(truncate(s)))?,
            other => {
                return Err(DecodeError::WrongType { field: "type", expected: "a string", got: json_type(other) })
            }
        };
        let price = match present(obj, "price") {
            None => None,
            Some(Value::Number(n)) => {
                let p = n.as_f64().unwrap_or(f64::NAN);
                if !(p.is_finite() && p >= 0.0) {
                    return Err(DecodeError::OutOfRange { field: "price", reason: format!("{p} is negative") });
                }
                if p > self.limits.max_price {
                    return Err(DecodeError::OutOfRange {
                        field: "price",
                        reason: format!("{p} exceeds {}", self.limits.max_price),
                    });
                }
                Some(p)
            }
            Some(other) => {
                return Err(DecodeError::WrongType { field: "price", expected: "a number", got: json_type(other) })
            }
        };
        let quantity = match present(&obj, "quantity") {
            None => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(q) if q >= 1 && q <= u64::from(self.limits.max_quantity) => Some(q as u32),
                _ => {
                    return Err(DecodeError::OutOfRange {
                        field: "quantity",
                        reason: format!("{n} is not an integer in 1..={}", self.limits.max_quantity),
                    })
                }
            },
            Some(other) => {
                return Err(DecodeError::WrongType {
                    field: "quantity",
                    expected: "an integer",
                    got: json_type(other),
                })
            }
        };
        Ok(Event {
            user_id,
            ts,
            kind,
            event_id: self.id_field(obj, "event_id")?,
            session_id: self.id_field(obj, "session_id")?,
            item_id: self.id_field(obj, "item_id")?,
            category: self.id_field(obj, "category")?,
            price,
            quantity,
        })
    }

    /// Reads an optional id-like field: a string, or an integer kept as its decimal text.
    fn id_field(&self, obj: &Map<String, Value>, field: &'static str) -> Result<Option<String>, DecodeError> {
        let s = match present(obj, field) {
            None => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            Some(other) => {
                return Err(DecodeError::WrongType {
                    field,
                    expected: "a string or an integer",
                    got: json_type(other),
                })
            }
        };
        if s.len() > self.limits.max_id_bytes {
            return Err(DecodeError::OutOfRange {
                field,
                reason: format!("{} bytes exceeds {}", s.len(), self.limits.max_id_bytes),
            });
        }
        Ok(Some(s))
    }

    fn timestamp(&self, v: &Value, now_ms: i64) -> Result<i64, DecodeError> {
        let ts = match v {
            Value::Number(n) => n.as_i64().ok_or_else(|| DecodeError::BadTimestamp(n.to_string()))?,
            Value::String(s) => chrono::DateTime::parse_from_rfc3339(s.trim())
                .map_err(|_| DecodeError::BadTimestamp(truncate(s)))?
                .timestamp_millis(),
            other => {
                return Err(DecodeError::WrongType {
                    field: "ts",
                    expected: "an RFC 3339 string or epoch milliseconds",
                    got: json_type(other),
                })
            }
        };
        if ts < self.limits.min_ts_ms {
            return Err(DecodeError::OutOfRange {
                field: "ts",
                reason: format!("{ts} is before {}", crate::format_ts_ms(self.limits.min_ts_ms)),
            });
        }
        if ts > now_ms.saturating_add(self.limits.max_future_ms) {
            return Err(DecodeError::OutOfRange {
                field: "ts",
                reason: format!("{} is more than {} ms in the future", crate::format_ts_ms(ts), self.limits.max_future_ms),
            });
        }
        Ok(ts)
    }
}

/// Keeps error messages bounded when a field holds a huge string.
fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
