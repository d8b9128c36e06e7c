//! Readers of event files: schema-v1 JSONL or Parquet, and the public REES46, Taobao and
//! RetailRocket CSV layouts.
//!
//! Mappings (also in `docs/schemas.md`):
//!
//! * **REES46** (`event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session`):
//!   `event_time` `2019-10-01 00:00:00 UTC` → `ts`; `view`/`cart`/`remove_from_cart`/`purchase`
//!   → `type`; `product_id` → `item_id`; `category_code` (or `category_id` when empty) →
//!   `category`; `price`; `user_id`; `user_session` → `session_id`.
//! * **Taobao UserBehavior** (no header: `user_id,item_id,category_id,behavior_type,timestamp`):
//!   `pv`/`cart`/`fav`/`buy` → `view`/`add_to_cart`/`wishlist`/`purchase`; `timestamp` in epoch
//!   seconds.
//! * **RetailRocket** `events.csv` (`timestamp,visitorid,event,itemid,transactionid`):
//!   `view`/`addtocart`/`transaction` → `view`/`add_to_cart`/`purchase`; `timestamp` in epoch
//!   milliseconds; `visitorid` → `user_id`; `transactionid` → `event_id` (prefixed `t`). It has
//!   no prices, categories or session ids (categories live in a separate properties file).
//!
//! Rows that do not fit are reported with their line numbers and skipped; the events that do
//! are returned in time order (stable, so equal times keep file order). A progress bar over the
//! bytes read runs on a terminal for files over 8 MiB.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use intentflow_operators::columnar;
use intentflow_schemas::{DecodeError, Event, EventDecoder, EventType};
use std::io::{BufRead, Read};
use std::path::Path;

/// Input file layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Schema-v1 events, one JSON object per line.
    Jsonl,
    /// Schema-v1 events as Parquet columns (see `intentflow_operators::columnar`).
    Parquet,
    /// REES46 "eCommerce behavior data from multi category store" CSV.
    Rees46,
    /// Alibaba Tianchi Taobao UserBehavior CSV.
    Taobao,
    /// RetailRocket e-commerce dataset `events.csv`.
    Retailrocket,
}

/// A row that could not become an event.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    /// 1-based line number in the file (row number for Parquet).
    pub line: usize,
    /// Why.
    pub reason: String,
}

/// Events read from a file, and the rows that were skipped.
#[derive(Debug, Default)]
pub struct Imported {
    /// Valid events in time order.
    pub events: Vec<Event>,
    /// Skipped rows.
    pub bad: Vec<BadRow>,
    /// For generated JSONL (`intentflow generate`): the generator's `latent_intent` of each
    /// event, aligned with `events`; `None` unless every event carries one.
    pub latent_intent: Option<Vec<f64>>,
}

impl Imported {
    /// A one-line summary: events by type, users, skipped rows.
    pub fn summary(&self) -> String {
        let mut by_type = [0usize; 6];
        for e in &self.events {
            by_type[e.kind.index()] += 1;
        }
        let types: Vec<String> =
            EventType::ALL.iter().zip(by_type).filter(|(_, n)| *n > 0).map(|(k, n)| format!("{n} {}", k.as_str())).collect();
        let users: std::collections::HashSet<&str> = self.events.iter().map(|e| e.user_id.as_str()).collect();
        format!("{} events ({}), {} users, {} rows skipped", self.events.len(), types.join(", "), users.len(), self.bad.len())
    }
}

impl Format {
    /// Parquet if the file starts with Parquet's magic bytes, schema-v1 JSONL otherwise.
    ///
    /// # Errors
    ///
    /// If the file cannot be read.
    pub fn detect(path: &Path) -> Result<Format> {
        Ok(if columnar::is_parquet(path)? { Format::Parquet } else { Format::Jsonl })
    }
}

/// Reads `path` in `format`.
///
/// # Errors
///
/// If the file cannot be opened or read, or (Parquet) lacks a required column; bad rows are not
/// errors.
pub fn read_events(path: &Path, format: Format) -> Result<Imported> {
    let mut out = match format {
        Format::Parquet => read_parquet(path)?,
        _ => read_text(path, format)?,
    };
    // Stable sort by time; the oracle column, if any, moves with its events.
    match out.latent_intent.take() {
        Some(latent) => {
            let mut paired: Vec<(Event, f64)> = out.events.drain(..).zip(latent).collect();
            paired.sort_by_key(|(e, _)| e.ts);
            let (events, latent): (Vec<Event>, Vec<f64>) = paired.into_iter().unzip();
            out.events = events;
            out.latent_intent = Some(latent);
        }
        None => out.events.sort_by_key(|e| e.ts),
    }
    Ok(out)
}

fn read_parquet(path: &Path) -> Result<Imported> {
    let read = columnar::read_events(path, &EventDecoder::default(), chrono::Utc::now().timestamp_millis())?;
    let bad = read.rejected.into_iter().map(|(row, e)| BadRow { line: row + 1, reason: e.to_string() }).collect();
    Ok(Imported { events: read.events, bad, latent_intent: None })
}

/// Reads a line-oriented file, with a progress bar over its bytes on a terminal.
fn read_text(path: &Path, format: Format) -> Result<Imported> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let progress = if size > 8 << 20 && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new(size)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}").expect("valid template"),
    );
    progress.set_message(format!("reading {}", path.display()));
    let reader = progress.wrap_read(file);
    let out = match format {
        Format::Jsonl => read_jsonl(std::io::BufReader::new(reader))?,
        Format::Rees46 => read_csv(reader, true, rees46_row)?,
        Format::Taobao => read_csv(reader, false, taobao_row)?,
        Format::Retailrocket => read_csv(reader, true, retailrocket_row)?,
        Format::Parquet => unreachable!("Parquet is columnar, not text"),
    };
    progress.finish_and_clear();
    Ok(out)
}

/// Streams the events of a schema-v1 file (Parquet or JSONL, told apart by content) to `row` in
/// file order: each row's 1-based number (line, or row for Parquet) and its event or why it was
/// rejected. Unlike [`read_events`] it neither sorts nor holds the file: memory stays bounded
/// whatever the file's size.
///
/// # Errors
///
/// If the file cannot be opened or read, or (Parquet) lacks a required column.
pub fn for_each_event(path: &Path, mut row: impl FnMut(usize, Result<Event, DecodeError>)) -> Result<()> {
    let now = chrono::Utc::now().timestamp_millis();
    let decoder = EventDecoder::default();
    if Format::detect(path)? == Format::Parquet {
        columnar::for_each_event(path, &decoder, now, |i, event| row(i + 1, event))?;
    } else {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        jsonl_rows(std::io::BufReader::with_capacity(1 << 20, file), &decoder, now, |i, _, event| row(i, event))
            .with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(())
}

/// Decodes each non-blank line of `reader`: its 1-based number, its text and the result.
fn jsonl_rows(reader: impl BufRead, decoder: &EventDecoder, now: i64, mut row: impl FnMut(usize, &str, Result<Event, DecodeError>)) -> Result<()> {
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if !line.trim().is_empty() {
            row(i + 1, &line, decoder.decode(line.as_bytes(), now));
        }
    }
    Ok(())
}

fn read_jsonl(reader: impl BufRead) -> Result<Imported> {
    #[derive(serde::Deserialize)]
    struct Truth {
        latent_intent: Option<f64>,
    }
    let mut out = Imported::default();
    let mut latent = Vec::new();
    jsonl_rows(reader, &EventDecoder::default(), chrono::Utc::now().timestamp_millis(), |line, text, event| match event {
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

fn read_csv(input: impl Read, header: bool, row: fn(&csv::StringRecord) -> Result<Event, String>) -> Result<Imported> {
    let mut reader = csv::ReaderBuilder::new().has_headers(header).flexible(true).from_reader(input);
    let mut out = Imported::default();
    let mut record = csv::StringRecord::new();
    let first_line = if header { 2 } else { 1 };
    let mut line = first_line;
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => match row(&record) {
                Ok(e) => out.events.push(e),
                Err(reason) => out.bad.push(BadRow { line, reason }),
            },
            Err(e) => out.bad.push(BadRow { line, reason: e.to_string() }),
        }
        line += 1;
    }
    Ok(out)
}

fn field<'a>(r: &'a csv::StringRecord, i: usize, name: &str) -> Result<&'a str, String> {
    r.get(i).map(str::trim).filter(|s| !s.is_empty()).ok_or_else(|| format!("missing {name}"))
}

fn price(s: Option<&str>) -> Result<Option<f64>, String> {
    match s.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => {
            let p: f64 = s.parse().map_err(|_| format!("price `{s}` is not a number"))?;
            if p.is_finite() && p >= 0.0 { Ok(Some(p)) } else { Err(format!("price {p} is negative")) }
        }
    }
}

fn rees46_row(r: &csv::StringRecord) -> Result<Event, String> {
    let time = field(r, 0, "event_time")?;
    let ts = chrono::NaiveDateTime::parse_from_str(time.trim_end_matches(" UTC"), "%Y-%m-%d %H:%M:%S")
        .map_err(|e| format!("event_time `{time}`: {e}"))?
        .and_utc()
        .timestamp_millis();
    let kind_text = field(r, 1, "event_type")?;
    let kind = EventType::parse(kind_text).ok_or_else(|| format!("unknown event_type `{kind_text}`"))?;
    let category = field(r, 4, "category_code").or_else(|_| field(r, 3, "category_id")).ok().map(str::to_string);
    Ok(Event {
        user_id: field(r, 7, "user_id")?.to_string(),
        ts,
        kind,
        event_id: None,
        session_id: field(r, 8, "user_session").ok().map(str::to_string),
        item_id: field(r, 2, "product_id").ok().map(str::to_string),
        category,
        price: price(r.get(6))?,
        quantity: None,
    })
}

fn taobao_row(r: &csv::StringRecord) -> Result<Event, String> {
    let kind_text = field(r, 3, "behavior_type")?;
    let kind = EventType::parse(kind_text).ok_or_else(|| format!("unknown behavior_type `{kind_text}`"))?;
    let secs: i64 = field(r, 4, "timestamp")?.parse().map_err(|_| "timestamp is not an integer".to_string())?;
    Ok(Event {
        user_id: field(r, 0, "user_id")?.to_string(),
        ts: secs * 1000,
        kind,
        event_id: None,
        session_id: None,
        item_id: field(r, 1, "item_id").ok().map(str::to_string),
        category: field(r, 2, "category_id").ok().map(str::to_string),
        price: None,
        quantity: None,
    })
}

fn retailrocket_row(r: &csv::StringRecord) -> Result<Event, String> {
    let kind_text = field(r, 2, "event")?;
    let kind = EventType::parse(kind_text).ok_or_else(|| format!("unknown event `{kind_text}`"))?;
    let ms: i64 = field(r, 0, "timestamp")?.parse().map_err(|_| "timestamp is not an integer".to_string())?;
    Ok(Event {
        user_id: field(r, 1, "visitorid")?.to_string(),
        ts: ms,
        kind,
        event_id: field(r, 4, "transactionid").ok().map(|t| format!("t{t}")),
        session_id: None,
        item_id: field(r, 3, "itemid").ok().map(str::to_string),
        category: None,
        price: None,
        quantity: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn rees46_rows_map_and_bad_rows_are_reported() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session").unwrap();
        writeln!(f, "2019-10-01 00:00:05 UTC,cart,44600062,2103807459595387724,,shiseido,35.79,541312140,72d76fde").unwrap();
        writeln!(f, "2019-10-01 00:00:00 UTC,view,3900821,2053013552326770905,appliances.water_heater,aqua,33.20,554748717,9333dfbd").unwrap();
        writeln!(f, "2019-10-01 00:00:07 UTC,teleport,1,2,,,1.0,5,s").unwrap();
        writeln!(f, "2019-10-01 00:00:08 UTC,view,1,2,,,-4,5,s").unwrap();
        let got = read_events(f.path(), Format::Rees46).unwrap();
        assert_eq!(got.events.len(), 2);
        let first = &got.events[0];
        assert_eq!((first.user_id.as_str(), first.kind, first.ts), ("554748717", EventType::View, 1_569_888_000_000));
        assert_eq!(first.category.as_deref(), Some("appliances.water_heater"));
        assert_eq!(got.events[1].kind, EventType::AddToCart);
        assert_eq!(got.events[1].category.as_deref(), Some("2103807459595387724"));
        assert_eq!(got.events[1].session_id.as_deref(), Some("72d76fde"));
        assert_eq!(got.bad.iter().map(|b| b.line).collect::<Vec<_>>(), [4, 5]);
    }

    #[test]
    fn taobao_rows_map() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "1,2268318,2520377,pv,1511544070").unwrap();
        writeln!(f, "1,2333346,2520771,buy,1511561733").unwrap();
        writeln!(f, "1,2333346,2520771,fav").unwrap();
        let got = read_events(f.path(), Format::Taobao).unwrap();
        assert_eq!(got.events.iter().map(|e| e.kind).collect::<Vec<_>>(), [EventType::View, EventType::Purchase]);
        assert_eq!(got.events[0].ts, 1_511_544_070_000);
        assert_eq!(got.bad.len(), 1);
    }

    #[test]
    fn retailrocket_rows_map() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "timestamp,visitorid,event,itemid,transactionid").unwrap();
        writeln!(f, "1433221332117,257597,view,355908,").unwrap();
        writeln!(f, "1433224214164,992329,addtocart,248676,").unwrap();
        writeln!(f, "1433221999827,111016,transaction,5,11117").unwrap();
        writeln!(f, "1433221999827,111016,wave,5,").unwrap();
        writeln!(f, "soon,111016,view,5,").unwrap();
        let got = read_events(f.path(), Format::Retailrocket).unwrap();
        let kinds: Vec<_> = got.events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventType::View, EventType::Purchase, EventType::AddToCart], "time order");
        assert_eq!(got.events[1].event_id.as_deref(), Some("t11117"));
        assert_eq!((got.events[0].user_id.as_str(), got.events[0].ts), ("257597", 1_433_221_332_117));
        assert_eq!(got.bad.iter().map(|b| b.line).collect::<Vec<_>>(), [5, 6]);
        assert!(got.summary().starts_with("3 events (1 view, 1 add_to_cart, 1 purchase), 3 users, 2 rows skipped"), "{}", got.summary());
    }

    #[test]
    fn generated_jsonl_keeps_the_latent_intent_with_its_event() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, r#"{{"user_id":"a","ts":1700000002000,"type":"view","latent_intent":0.25}}"#).unwrap();
        writeln!(f, r#"{{"user_id":"b","ts":1700000001000,"type":"view","latent_intent":0.75}}"#).unwrap();
        let got = read_events(f.path(), Format::Jsonl).unwrap();
        assert_eq!(got.events[0].user_id, "b");
        assert_eq!(got.latent_intent, Some(vec![0.75, 0.25]));
    }
}
