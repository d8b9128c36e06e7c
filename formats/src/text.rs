//! Line-oriented event files: schema-v1 JSONL, and the public REES46, Taobao and RetailRocket
//! CSV layouts.
//!
//! Every row, whatever its layout, is validated by [`EventDecoder::decode_object`], the rules a
//! record on Kafka obeys (timestamp bounds, id lengths, price cap), so `train` never learns from
//! an event the operator would reject. A CSV row is mapped to schema-v1 fields first:
//!
//! * **REES46** (`event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session`):
//!   `event_time` `2019-10-01 00:00:00 UTC` → `ts`; `view`/`cart`/`remove_from_cart`/`purchase`
//!   → `type`; `product_id` → `item_id`; `category_code` → `category` (the path, absent when
//!   empty); `category_id`; `brand` (absent when empty); `price`; `user_id`; `user_session` →
//!   `session_id`.
//! * **Taobao UserBehavior** (no header: `user_id,item_id,category_id,behavior_type,timestamp`):
//!   `pv`/`cart`/`fav`/`buy` → `view`/`add_to_cart`/`wishlist`/`purchase`; `category_id`;
//!   `timestamp` in epoch seconds.
//! * **RetailRocket** `events.csv` (`timestamp,visitorid,event,itemid,transactionid`):
//!   `view`/`addtocart`/`transaction` → `view`/`add_to_cart`/`purchase`; `timestamp` in epoch
//!   milliseconds; `visitorid` → `user_id`; `transactionid` → `event_id` (prefixed `t`). It has
//!   no prices, categories or session ids (categories live in a separate properties file).

use crate::{BadRow, Imported};
use intentflow_schemas::{DecodeError, Event, EventDecoder};
use serde_json::{Map, Value};
use std::io::{BufRead, Read};

/// The CSV layouts [`read_csv`] knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsvLayout {
    /// REES46 "eCommerce behavior data from multi category store".
    Rees46,
    /// Alibaba Tianchi Taobao UserBehavior.
    Taobao,
    /// RetailRocket `events.csv`.
    RetailRocket,
}

/// Decodes each non-blank line of `reader`: its 1-based number, its text and the result.
///
/// # Errors
///
/// Read errors of `reader`; invalid lines are not errors.
pub fn jsonl_rows(reader: impl BufRead, decoder: &EventDecoder, now_ms: i64, mut row: impl FnMut(usize, &str, Result<Event, DecodeError>)) -> std::io::Result<()> {
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if !line.trim().is_empty() {
            row(i + 1, &line, decoder.decode(line.as_bytes(), now_ms));
        }
    }
    Ok(())
}

/// Reads schema-v1 JSONL; generated files (`intentflow generate`) also give the generator's
/// `latent_intent` of each event.
///
/// # Errors
///
/// Read errors of `reader`.
pub fn read_jsonl(reader: impl BufRead, decoder: &EventDecoder, now_ms: i64) -> std::io::Result<Imported> {
    #[derive(serde::Deserialize)]
    struct Truth {
        latent_intent: Option<f64>,
    }
    let mut out = Imported::default();
    let mut latent = Vec::new();
    jsonl_rows(reader, decoder, now_ms, |line, text, event| match event {
        Ok(e) => {
            out.events.push(e);
            latent.push(serde_json::from_str::<Truth>(text).ok().and_then(|t| t.latent_intent));
        }
        Err(e) => out.bad.push(BadRow { line, reason: e.to_string() }),
    })?;
    if !latent.is_empty() && latent.iter().all(Option::is_some) {
        out.latent_intent = Some(latent.into_iter().flatten().collect());
    }
    Ok(out)
}

/// Reads a CSV file of `layout`; rows that do not map or do not validate are reported in
/// [`Imported::bad`] with their line numbers.
pub fn read_csv(input: impl Read, layout: CsvLayout, decoder: &EventDecoder, now_ms: i64) -> Imported {
    let mut out = Imported::default();
    csv_rows(input, layout, decoder, now_ms, |line, event| match event {
        Ok(e) => out.events.push(e),
        Err(reason) => out.bad.push(BadRow { line, reason }),
    });
    out
}

/// Streams the rows of a CSV file of `layout` to `row`: each row's 1-based line number and its
/// event, or why it could not be mapped or validated. Memory stays bounded by one row.
pub fn csv_rows(input: impl Read, layout: CsvLayout, decoder: &EventDecoder, now_ms: i64, mut row: impl FnMut(usize, Result<Event, String>)) {
    let header = layout != CsvLayout::Taobao;
    let mut reader = csv::ReaderBuilder::new().has_headers(header).flexible(true).from_reader(input);
    let mut record = csv::StringRecord::new();
    let mut fields = Map::new();
    let mut line = if header { 2 } else { 1 };
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let mapped = map_row(layout, &record, &mut fields).map_err(|e| e.to_string());
                row(line, mapped.and_then(|()| decoder.decode_object(&fields, now_ms).map_err(|e| e.to_string())));
            }
            Err(e) => row(line, Err(e.to_string())),
        }
        line += 1;
    }
}

/// Why a CSV row could not even be mapped to schema-v1 fields.
#[derive(Debug, thiserror::Error)]
enum MapError {
    #[error("{0} `{1}` is not a finite number")]
    NotANumber(&'static str, String),
    #[error("event_time `{0}`: {1}")]
    BadTime(String, chrono::ParseError),
    #[error("timestamp {0} s is out of range")]
    TimeOutOfRange(i64),
}

/// The trimmed, non-empty cell `i`.
fn cell(r: &csv::StringRecord, i: usize) -> Option<&str> {
    r.get(i).map(str::trim).filter(|s| !s.is_empty())
}

fn text_value(r: &csv::StringRecord, i: usize) -> Value {
    cell(r, i).map_or(Value::Null, |s| Value::String(s.to_string()))
}

fn integer(r: &csv::StringRecord, i: usize, name: &'static str) -> Result<Option<i64>, MapError> {
    cell(r, i).map(|s| s.parse().map_err(|_| MapError::NotANumber(name, s.to_string()))).transpose()
}

/// Fills `fields` with the schema-v1 fields of one row (absent cells become null, which the
/// decoder treats as missing).
fn map_row(layout: CsvLayout, r: &csv::StringRecord, fields: &mut Map<String, Value>) -> Result<(), MapError> {
    fields.clear();
    let mut set = |name: &str, value: Value| {
        fields.insert(name.to_string(), value);
    };
    match layout {
        CsvLayout::Rees46 => {
            let ts = match cell(r, 0) {
                None => Value::Null,
                Some(time) => Value::from(
                    chrono::NaiveDateTime::parse_from_str(time.trim_end_matches(" UTC"), "%Y-%m-%d %H:%M:%S")
                        .map_err(|e| MapError::BadTime(time.to_string(), e))?
                        .and_utc()
                        .timestamp_millis(),
                ),
            };
            let price = match cell(r, 6) {
                None => Value::Null,
                Some(p) => {
                    let x = p.parse().ok().and_then(serde_json::Number::from_f64);
                    Value::Number(x.ok_or_else(|| MapError::NotANumber("price", p.to_string()))?)
                }
            };
            set("ts", ts);
            set("type", text_value(r, 1));
            set("item_id", text_value(r, 2));
            set("category_id", text_value(r, 3));
            set("category", text_value(r, 4));
            set("brand", text_value(r, 5));
            set("price", price);
            set("user_id", text_value(r, 7));
            set("session_id", text_value(r, 8));
        }
        CsvLayout::Taobao => {
            let ts = match integer(r, 4, "timestamp")? {
                None => Value::Null,
                Some(secs) => Value::from(secs.checked_mul(1000).ok_or(MapError::TimeOutOfRange(secs))?),
            };
            set("user_id", text_value(r, 0));
            set("item_id", text_value(r, 1));
            set("category_id", text_value(r, 2));
            set("type", text_value(r, 3));
            set("ts", ts);
        }
        CsvLayout::RetailRocket => {
            set("ts", integer(r, 0, "timestamp")?.map_or(Value::Null, Value::from));
            set("user_id", text_value(r, 1));
            set("type", text_value(r, 2));
            set("item_id", text_value(r, 3));
            set("event_id", cell(r, 4).map_or(Value::Null, |t| Value::String(format!("t{t}"))));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use intentflow_schemas::EventType;

    const NOW: i64 = 1_700_000_000_000;

    fn csv(layout: CsvLayout, text: &str) -> Imported {
        let mut out = read_csv(text.as_bytes(), layout, &EventDecoder::default(), NOW);
        out.events.sort_by_key(|e| e.ts);
        out
    }

    #[test]
    fn rees46_rows_map_and_bad_rows_are_reported() {
        let got = csv(
            CsvLayout::Rees46,
            "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n\
             2019-10-01 00:00:05 UTC,cart,44600062,2103807459595387724,,shiseido,35.79,541312140,72d76fde\n\
             2019-10-01 00:00:00 UTC,view,3900821,2053013552326770905,appliances.water_heater,aqua,33.20,554748717,9333dfbd\n\
             2019-10-01 00:00:07 UTC,teleport,1,2,,,1.0,5,s\n\
             2019-10-01 00:00:08 UTC,view,1,2,,,-4,5,s\n",
        );
        assert_eq!(got.events.len(), 2);
        let first = &got.events[0];
        assert_eq!((first.user_id.as_str(), first.kind, first.ts), ("554748717", EventType::View, 1_569_888_000_000));
        assert_eq!(first.category.as_deref(), Some("appliances.water_heater"));
        assert_eq!((first.category_id.as_deref(), first.brand.as_deref()), (Some("2053013552326770905"), Some("aqua")));
        assert_eq!(got.events[1].kind, EventType::AddToCart);
        // No path: the id stays in its own field, not folded into `category`.
        assert_eq!(got.events[1].category, None);
        assert_eq!(got.events[1].category_id.as_deref(), Some("2103807459595387724"));
        assert_eq!(got.events[1].brand.as_deref(), Some("shiseido"));
        assert_eq!(got.events[1].session_id.as_deref(), Some("72d76fde"));
        assert_eq!(got.bad.iter().map(|b| b.line).collect::<Vec<_>>(), [4, 5]);
        assert!(got.bad[0].reason.contains("unknown event type `teleport`"), "{}", got.bad[0].reason);
    }

    #[test]
    fn csv_rows_obey_the_operators_limits() {
        // What the operator's decoder rejects, an import rejects too: a price above the cap, an
        // over-long id, a time before 2000 or far in the future, and (Taobao) seconds whose
        // milliseconds overflow.
        let long_id = "x".repeat(300);
        let got = csv(
            CsvLayout::Rees46,
            &format!(
                "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n\
                 2019-10-01 00:00:00 UTC,view,1,2,,,2000000000,5,s\n\
                 2019-10-01 00:00:00 UTC,view,1,2,,,1.0,{long_id},s\n\
                 1999-12-31 23:59:59 UTC,view,1,2,,,1.0,5,s\n\
                 2090-01-01 00:00:00 UTC,view,1,2,,,1.0,5,s\n\
                 2019-10-01 00:00:00 UTC,view,1,2,,,1.0,5,s\n"
            ),
        );
        assert_eq!(got.events.len(), 1);
        let reasons: Vec<&str> = got.bad.iter().map(|b| b.reason.as_str()).collect();
        assert!(reasons[0].contains("`price` out of range") && reasons[0].contains("exceeds"), "{reasons:?}");
        assert!(reasons[1].contains("`user_id` out of range") && reasons[1].contains("300 bytes"), "{reasons:?}");
        assert!(reasons[2].contains("`ts` out of range") && reasons[2].contains("before"), "{reasons:?}");
        assert!(reasons[3].contains("`ts` out of range") && reasons[3].contains("future"), "{reasons:?}");

        let got = csv(CsvLayout::Taobao, "1,2,3,pv,92233720368547759\n1,2,3,pv,1511544070\n");
        assert_eq!(got.events.len(), 1);
        assert_eq!(got.bad.len(), 1);
        assert!(got.bad[0].reason.contains("out of range"), "{}", got.bad[0].reason);
    }

    #[test]
    fn taobao_rows_map() {
        let got = csv(CsvLayout::Taobao, "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,buy,1511561733\n1,2333346,2520771,fav\n");
        assert_eq!(got.events.iter().map(|e| e.kind).collect::<Vec<_>>(), [EventType::View, EventType::Purchase]);
        assert_eq!(got.events[0].ts, 1_511_544_070_000);
        assert_eq!((got.events[0].category_id.as_deref(), got.events[0].category.as_deref()), (Some("2520377"), None));
        assert_eq!(got.bad.len(), 1);
        assert!(got.bad[0].reason.contains("missing required field `ts`"), "{}", got.bad[0].reason);
    }

    #[test]
    fn retailrocket_rows_map() {
        let got = csv(
            CsvLayout::RetailRocket,
            "timestamp,visitorid,event,itemid,transactionid\n\
             1433221332117,257597,view,355908,\n\
             1433224214164,992329,addtocart,248676,\n\
             1433221999827,111016,transaction,5,11117\n\
             1433221999827,111016,wave,5,\n\
             soon,111016,view,5,\n",
        );
        let kinds: Vec<_> = got.events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventType::View, EventType::Purchase, EventType::AddToCart], "time order");
        assert_eq!(got.events[1].event_id.as_deref(), Some("t11117"));
        assert_eq!((got.events[0].user_id.as_str(), got.events[0].ts), ("257597", 1_433_221_332_117));
        assert_eq!(got.bad.iter().map(|b| b.line).collect::<Vec<_>>(), [5, 6]);
        assert!(got.summary().starts_with("3 events (1 view, 1 add_to_cart, 1 purchase), 3 users, 2 rows skipped"), "{}", got.summary());
    }

    #[test]
    fn generated_jsonl_keeps_the_latent_intent_with_its_event() {
        let text = "{\"user_id\":\"a\",\"ts\":1600000002000,\"type\":\"view\",\"latent_intent\":0.25}\n\
                    {\"user_id\":\"b\",\"ts\":1600000001000,\"type\":\"view\",\"latent_intent\":0.75}\n";
        let got = read_jsonl(text.as_bytes(), &EventDecoder::default(), NOW).unwrap();
        assert_eq!(got.events[0].user_id, "a");
        assert_eq!(got.latent_intent, Some(vec![0.25, 0.75]));
    }
}
