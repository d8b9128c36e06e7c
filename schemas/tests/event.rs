//! The schema-v1 decoder: what it accepts, what it rejects and how it says why.

use intentflow_schemas::{DecodeError, Event, EventDecoder, EventType};
use serde_json::Value;

const NOW: i64 = 1_700_000_000_000;

fn decode(s: &str) -> Result<Event, DecodeError> {
    EventDecoder::default().decode(s.as_bytes(), NOW)
}

#[test]
fn decodes_full_event_with_rfc3339_time() {
    let e = decode(
        r#"{"user_id":"u1","ts":"2019-10-01T00:00:05Z","type":"add_to_cart","event_id":"e9",
            "session_id":"s1","item_id":42,"category":"electronics.smartphone","price":199.5,"quantity":2,"extra":[1]}"#,
    )
    .unwrap();
    assert_eq!(e.user_id, "u1");
    assert_eq!(e.ts, 1_569_888_005_000);
    assert_eq!(e.kind, EventType::AddToCart);
    assert_eq!(e.item_id.as_deref(), Some("42"));
    assert_eq!(e.price, Some(199.5));
    assert_eq!(e.quantity, Some(2));
    assert_eq!(e.event_id.as_deref(), Some("e9"));
}

#[test]
fn integer_user_id_and_epoch_ms_and_aliases() {
    let e = decode(r#"{"user_id":513,"ts":1569888005000,"type":"BUY"}"#).unwrap();
    assert_eq!(e.user_id, "513");
    assert_eq!(e.ts, 1_569_888_005_000);
    assert_eq!(e.kind, EventType::Purchase);
    for (alias, kind) in [("pv", EventType::View), ("cart", EventType::AddToCart), ("fav", EventType::Wishlist)] {
        let e = decode(&format!(r#"{{"user_id":"u","ts":1569888005000,"type":"{alias}"}}"#)).unwrap();
        assert_eq!(e.kind, kind);
    }
}

#[test]
fn canonical_json_round_trips() {
    let e = decode(r#"{"user_id":"u1","ts":1569888005000,"type":"view","price":3.0}"#).unwrap();
    let back = decode(&serde_json::to_string(&e).unwrap()).unwrap();
    assert_eq!(e, back);
}

#[test]
fn rejections_name_the_problem() {
    let cases: &[(&str, &str)] = &[
        ("", "empty"),
        ("{not json", "invalid_json"),
        ("[1,2]", "invalid_json"),
        (r#"{"ts":1569888005000,"type":"view"}"#, "missing_field"),
        (r#"{"user_id":"u","type":"view"}"#, "missing_field"),
        (r#"{"user_id":"u","ts":1569888005000}"#, "missing_field"),
        (r#"{"user_id":true,"ts":1569888005000,"type":"view"}"#, "wrong_type"),
        (r#"{"user_id":"u","ts":1569888005000,"type":"view","price":"9.99"}"#, "wrong_type"),
        (r#"{"user_id":"u","ts":1569888005000,"type":"teleport"}"#, "unknown_event_type"),
        (r#"{"user_id":"u","ts":"yesterday","type":"view"}"#, "bad_timestamp"),
        (r#"{"user_id":"u","ts":1569888005000,"type":"view","price":-1}"#, "out_of_range"),
        (r#"{"user_id":"u","ts":4102444800000,"type":"view"}"#, "out_of_range"),
        (r#"{"user_id":"u","ts":5,"type":"view"}"#, "out_of_range"),
        (r#"{"user_id":"u","ts":1569888005000,"type":"view","quantity":0}"#, "out_of_range"),
        (r#"{"user_id":"","ts":1569888005000,"type":"view"}"#, "out_of_range"),
    ];
    for (input, kind) in cases {
        let err = decode(input).expect_err(input);
        assert_eq!(err.kind(), *kind, "{input}: {err}");
    }
    let big = format!(r#"{{"user_id":"u","ts":1569888005000,"type":"view","pad":"{}"}}"#, "x".repeat(70_000));
    assert_eq!(decode(&big).unwrap_err().kind(), "oversized");
}

#[test]
fn error_message_names_the_field() {
    let err = decode(r#"{"user_id":"u","ts":1569888005000,"type":"view","price":"9.99"}"#).unwrap_err();
    assert_eq!(err.to_string(), "field `price` must be a number, got string");
}

proptest::proptest! {
    #[test]
    fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
        let _ = EventDecoder::default().decode(&bytes, NOW);
    }

    #[test]
    fn never_panics_on_arbitrary_json_fields(
        user in proptest::option::of("[a-z0-9]{0,8}"),
        ts in proptest::num::i64::ANY,
        kind in "[a-z_]{0,12}",
        price in proptest::num::f64::ANY,
    ) {
        let mut obj = serde_json::Map::new();
        if let Some(u) = user { obj.insert("user_id".into(), u.into()); }
        obj.insert("ts".into(), ts.into());
        obj.insert("type".into(), kind.into());
        if let Some(n) = serde_json::Number::from_f64(price) { obj.insert("price".into(), n.into()); }
        let bytes = serde_json::to_vec(&serde_json::Value::Object(obj)).unwrap();
        if let Ok(e) = EventDecoder::default().decode(&bytes, NOW) {
            proptest::prop_assert!(e.price.is_none_or(|p| p >= 0.0));
            proptest::prop_assert!(!e.user_id.is_empty());
        }
    }
}

#[test]
fn json_records_and_field_maps_are_judged_alike() {
    // The record path (typed, borrowing) and the map path (Parquet rows, CSV imports) apply one
    // set of rules: every input gets the same event or the same error from both.
    let inputs = [
        r#"{"user_id":"u1","ts":"2019-10-01T00:00:05Z","type":"cart","item_id":42,"price":1.5,"quantity":2,"extra":{"a":[1,{"b":null}]}}"#,
        r#"{"user_id":"caf\u00e9 \"x\"","ts":1569888005000,"type":"view","session_id":"s\n1"}"#,
        r#"{"user_id":7,"ts":1569888005000.5,"type":"view"}"#,
        r#"{"user_id":"u","ts":1569888005000,"type":["view"]}"#,
        r#"{"user_id":"u","ts":1569888005000,"type":"view","price":{"v":1}}"#,
        r#"{"user_id":"u","ts":1569888005000,"type":"view","quantity":2.5}"#,
        r#"{"user_id":1.5,"ts":1569888005000,"type":"view"}"#,
        r#"{"user_id":null,"ts":1569888005000,"type":"view"}"#,
        r#"{"user_id":"u","ts":true,"type":"view"}"#,
        r#"{"user_id":"u","ts":1569888005000,"type":"teleport","item_id":null}"#,
    ];
    for input in inputs {
        let Ok(Value::Object(map)) = serde_json::from_str::<Value>(input) else { panic!("{input}") };
        let (bytes, fields) = (decode(input), EventDecoder::default().decode_object(&map, NOW));
        assert_eq!(bytes, fields, "{input}");
    }
    assert_eq!(decode(r#"{"user_id":"caf\u00e9","ts":1569888005000,"type":"view"}"#).unwrap().user_id, "café", "escapes are decoded");
    // Not an object, whatever serde would make of it; a field given twice is not accepted.
    assert_eq!(decode("[1,2]").unwrap_err().to_string(), "invalid JSON: expected an object, got array");
    assert_eq!(decode("  \"x\"").unwrap_err().to_string(), "invalid JSON: expected an object, got string");
    assert_eq!(decode(r#"{"user_id":"a","user_id":"b","ts":1569888005000,"type":"view"}"#).unwrap_err().kind(), "invalid_json");
}
