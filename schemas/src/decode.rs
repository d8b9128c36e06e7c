//! The validating decoder of schema-v1 events, one set of rules for every source.
//!
//! A Kafka record's bytes are deserialised straight into the eleven schema-v1 fields, each kept as
//! a [`Cell`] that borrows its string from the record where JSON needs no unescaping: no
//! `serde_json::Value` tree, no map of keys, nothing allocated for fields the schema does not
//! have (they are skipped). Sources that are not JSON bytes — Parquet rows, CSV importers —
//! present their values as a JSON map ([`EventDecoder::decode_object`]). Both go through the same
//! checks ([`FieldSource`]), so a row is accepted or rejected for the same reason wherever it
//! comes from.

use crate::event::{DecodeError, Event, EventType, Limits, Text};
use compact_str::ToCompactString;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Number, Value};
use std::borrow::Cow;
use std::fmt;

/// Decodes and validates schema v1 events.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventDecoder {
    /// The limits applied to every record.
    pub limits: Limits,
}

/// One field's value as the validator sees it: absent or null, or a JSON value of some type.
/// Strings borrow from the record when they hold no escapes.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Cell<'a> {
    /// Absent, or `null`.
    #[default]
    Absent,
    /// `true` or `false`.
    Bool(bool),
    /// A number, as JSON wrote it.
    Num(Number),
    /// A string.
    Str(Cow<'a, str>),
    /// An array (its contents are not kept).
    Array,
    /// An object (its contents are not kept).
    Object,
}

impl Cell<'_> {
    /// The JSON type's name, for error messages.
    fn type_name(&self) -> &'static str {
        match self {
            Cell::Absent => "null",
            Cell::Bool(_) => "boolean",
            Cell::Num(_) => "number",
            Cell::Str(_) => "string",
            Cell::Array => "array",
            Cell::Object => "object",
        }
    }

    /// The value, `None` when absent or null.
    fn present(&self) -> Option<&Self> {
        (!matches!(self, Cell::Absent)).then_some(self)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Cell<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CellVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for CellVisitor<'a> {
            type Value = Cell<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<Cell<'a>, E> {
                Ok(Cell::Absent)
            }
            fn visit_none<E>(self) -> Result<Cell<'a>, E> {
                Ok(Cell::Absent)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Cell<'a>, E> {
                Ok(Cell::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Cell<'a>, E> {
                Ok(Cell::Num(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Cell<'a>, E> {
                Ok(Cell::Num(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Cell<'a>, E> {
                Number::from_f64(v).map(Cell::Num).ok_or_else(|| E::custom("a number JSON cannot hold"))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cell<'a>, E> {
                Ok(Cell::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Cell<'a>, E> {
                Ok(Cell::Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Cell<'a>, E> {
                Ok(Cell::Str(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Cell<'a>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Cell::Array)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Cell<'a>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Cell::Object)
            }
        }
        d.deserialize_any(CellVisitor(std::marker::PhantomData))
    }
}

/// The schema-v1 fields of one JSON record; other fields are skipped unread.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    user_id: Cell<'a>,
    #[serde(borrow, default)]
    ts: Cell<'a>,
    #[serde(borrow, default, rename = "type")]
    kind: Cell<'a>,
    #[serde(borrow, default)]
    event_id: Cell<'a>,
    #[serde(borrow, default)]
    session_id: Cell<'a>,
    #[serde(borrow, default)]
    item_id: Cell<'a>,
    #[serde(borrow, default)]
    category: Cell<'a>,
    #[serde(borrow, default)]
    category_id: Cell<'a>,
    #[serde(borrow, default)]
    brand: Cell<'a>,
    #[serde(borrow, default)]
    price: Cell<'a>,
    #[serde(borrow, default)]
    quantity: Cell<'a>,
}

/// Where the validator reads an event's fields from.
pub trait FieldSource {
    /// The value of `field` (a schema-v1 field name).
    fn cell(&self, field: &'static str) -> Cell<'_>;
}

impl FieldSource for Fields<'_> {
    fn cell(&self, field: &'static str) -> Cell<'_> {
        let c = match field {
            "user_id" => &self.user_id,
            "ts" => &self.ts,
            "type" => &self.kind,
            "event_id" => &self.event_id,
            "session_id" => &self.session_id,
            "item_id" => &self.item_id,
            "category" => &self.category,
            "category_id" => &self.category_id,
            "brand" => &self.brand,
            "price" => &self.price,
            "quantity" => &self.quantity,
            _ => return Cell::Absent,
        };
        // A cheap copy: strings stay borrowed.
        match c {
            Cell::Str(s) => Cell::Str(Cow::Borrowed(s.as_ref())),
            other => other.clone(),
        }
    }
}

impl FieldSource for Map<String, Value> {
    fn cell(&self, field: &'static str) -> Cell<'_> {
        match self.get(field) {
            None | Some(Value::Null) => Cell::Absent,
            Some(Value::Bool(b)) => Cell::Bool(*b),
            Some(Value::Number(n)) => Cell::Num(n.clone()),
            Some(Value::String(s)) => Cell::Str(Cow::Borrowed(s)),
            Some(Value::Array(_)) => Cell::Array,
            Some(Value::Object(_)) => Cell::Object,
        }
    }
}

/// The JSON type of a document that is not an object, from its first byte.
fn top_level_type(bytes: &[u8]) -> Option<&'static str> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace())? {
        b'[' => Some("array"),
        b'"' => Some("string"),
        b't' | b'f' => Some("boolean"),
        b'n' => Some("null"),
        b'-' | b'0'..=b'9' => Some("number"),
        _ => None,
    }
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
    /// A [`DecodeError`] naming the first problem found. Unknown fields are ignored; a field
    /// given twice is invalid JSON.
    pub fn decode(&self, bytes: &[u8], now_ms: i64) -> Result<Event, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        if bytes.len() > self.limits.max_record_bytes {
            return Err(DecodeError::Oversized { size: bytes.len(), limit: self.limits.max_record_bytes });
        }
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            // Not an object (serde would take an array for the fields in order): say what it is.
            return Err(DecodeError::InvalidJson(match (serde_json::from_slice::<IgnoredAny>(bytes), top_level_type(bytes)) {
                (Ok(_), Some(kind)) => format!("expected an object, got {kind}"),
                (Ok(_), None) => "expected an object".into(),
                (Err(e), _) => e.to_string(),
            }));
        }
        let fields: Fields<'_> = serde_json::from_slice(bytes).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
        self.validate(&fields, now_ms)
    }

    /// Validates one event given as field values, with the same rules as
    /// [`EventDecoder::decode`] minus the byte-level checks. Sources that are not JSON (Parquet
    /// rows) present their cells this way, so every source obeys one set of rules.
    ///
    /// # Errors
    ///
    /// A [`DecodeError`] naming the first problem found. Unknown fields are ignored.
    pub fn decode_object(&self, obj: &Map<String, Value>, now_ms: i64) -> Result<Event, DecodeError> {
        self.validate(obj, now_ms)
    }

    /// The checks every source goes through.
    fn validate(&self, fields: &impl FieldSource, now_ms: i64) -> Result<Event, DecodeError> {
        let user_id = self.id_field(fields, "user_id")?.ok_or(DecodeError::MissingField("user_id"))?;
        if user_id.is_empty() {
            return Err(DecodeError::OutOfRange { field: "user_id", reason: "empty".into() });
        }
        let ts = self.timestamp(fields.cell("ts").present().ok_or(DecodeError::MissingField("ts"))?, now_ms)?;
        let kind = match fields.cell("type") {
            Cell::Absent => return Err(DecodeError::MissingField("type")),
            Cell::Str(s) => EventType::parse(&s).ok_or_else(|| DecodeError::UnknownEventType(truncate(&s)))?,
            other => return Err(DecodeError::WrongType { field: "type", expected: "a string", got: other.type_name() }),
        };
        let price = match fields.cell("price") {
            Cell::Absent => None,
            Cell::Num(n) => {
                let p = n.as_f64().unwrap_or(f64::NAN);
                if !(p.is_finite() && p >= 0.0) {
                    return Err(DecodeError::OutOfRange { field: "price", reason: format!("{p} is negative") });
                }
                if p > self.limits.max_price {
                    return Err(DecodeError::OutOfRange { field: "price", reason: format!("{p} exceeds {}", self.limits.max_price) });
                }
                Some(p)
            }
            other => return Err(DecodeError::WrongType { field: "price", expected: "a number", got: other.type_name() }),
        };
        let quantity = match fields.cell("quantity") {
            Cell::Absent => None,
            Cell::Num(n) => match n.as_u64() {
                Some(q) if q >= 1 && q <= u64::from(self.limits.max_quantity) => Some(q as u32),
                _ => {
                    return Err(DecodeError::OutOfRange {
                        field: "quantity",
                        reason: format!("{n} is not an integer in 1..={}", self.limits.max_quantity),
                    })
                }
            },
            other => return Err(DecodeError::WrongType { field: "quantity", expected: "an integer", got: other.type_name() }),
        };
        Ok(Event {
            user_id,
            ts,
            kind,
            event_id: self.id_field(fields, "event_id")?,
            session_id: self.id_field(fields, "session_id")?,
            item_id: self.id_field(fields, "item_id")?,
            category: self.id_field(fields, "category")?,
            category_id: self.id_field(fields, "category_id")?,
            brand: self.id_field(fields, "brand")?,
            price,
            quantity,
        })
    }

    /// Reads an optional id-like field: a string, or an integer kept as its decimal text. Text of
    /// up to 24 bytes is kept inline ([`Text`]): no allocation.
    fn id_field(&self, fields: &impl FieldSource, field: &'static str) -> Result<Option<Text>, DecodeError> {
        let s = match fields.cell(field) {
            Cell::Absent => return Ok(None),
            Cell::Str(s) => Text::from(s.as_ref()),
            Cell::Num(n) if n.is_i64() || n.is_u64() => n.to_compact_string(),
            other => return Err(DecodeError::WrongType { field, expected: "a string or an integer", got: other.type_name() }),
        };
        if s.len() > self.limits.max_id_bytes {
            return Err(DecodeError::OutOfRange { field, reason: format!("{} bytes exceeds {}", s.len(), self.limits.max_id_bytes) });
        }
        Ok(Some(s))
    }

    fn timestamp(&self, v: &Cell<'_>, now_ms: i64) -> Result<i64, DecodeError> {
        let ts = match v {
            Cell::Num(n) => n.as_i64().ok_or_else(|| DecodeError::BadTimestamp(n.to_string()))?,
            Cell::Str(s) => chrono::DateTime::parse_from_rfc3339(s.trim()).map_err(|_| DecodeError::BadTimestamp(truncate(s)))?.timestamp_millis(),
            other => {
                return Err(DecodeError::WrongType { field: "ts", expected: "an RFC 3339 string or epoch milliseconds", got: other.type_name() })
            }
        };
        if ts < self.limits.min_ts_ms {
            return Err(DecodeError::OutOfRange { field: "ts", reason: format!("{ts} is before {}", crate::format_ts_ms(self.limits.min_ts_ms)) });
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
