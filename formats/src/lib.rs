//! Event and intent files of Intentflow, kept out of the operators so that the streaming path
//! has no file-format dependency.
//!
//! * [`read_events`] reads a whole file of any [`Format`] into time-ordered events, reporting
//!   rows that do not validate; [`for_each_event`] streams a schema-v1 file (Parquet or JSONL,
//!   told apart by content) row by row in bounded memory, for replays of files larger than
//!   memory.
//! * [`columnar`] reads events from, and writes events and scored intents to, Parquet files that
//!   Spark, DuckDB, Polars or pandas read as they are.
//! * [`text`] holds the line formats: schema-v1 JSONL and the REES46, Taobao and RetailRocket
//!   CSV layouts.
//! * [`generate`] is the seeded synthetic clickstream used when no real data is at hand.
//!
//! Every row of every format is validated by the same [`EventDecoder`] as a record on Kafka.

pub mod columnar;
pub mod generate;
pub mod text;

use intentflow_schemas::{Event, EventDecoder, EventType};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Errors of reading or writing event files.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A Parquet file could not be read or written.
    #[error(transparent)]
    Columnar(#[from] columnar::ColumnarError),
}

/// Input file layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Schema-v1 events, one JSON object per line.
    Jsonl,
    /// Schema-v1 events as Parquet columns (see [`columnar`]).
    Parquet,
    /// REES46 "eCommerce behavior data from multi category store" CSV.
    Rees46,
    /// Alibaba Tianchi Taobao UserBehavior CSV.
    Taobao,
    /// RetailRocket e-commerce dataset `events.csv`.
    RetailRocket,
}

impl Format {
    /// Parquet if the file starts with Parquet's magic bytes, schema-v1 JSONL otherwise.
    ///
    /// # Errors
    ///
    /// If the file cannot be read.
    pub fn detect(path: &Path) -> Result<Format, FormatError> {
        Ok(if columnar::is_parquet(path)? { Format::Parquet } else { Format::Jsonl })
    }
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
    /// Valid events (in time order once [`read_events`] returns them).
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
        let mut by_type = [0usize; EventType::ALL.len()];
        for e in &self.events {
            by_type[e.kind.index()] += 1;
        }
        let users: std::collections::HashSet<&str> = self.events.iter().map(|e| e.user_id.as_str()).collect();
        summary(&by_type, users.len(), self.bad.len())
    }

    /// Sorts the events by time (stable: equal times keep file order); the oracle column, if
    /// any, moves with its events.
    fn sort_by_time(&mut self) {
        match self.latent_intent.take() {
            Some(latent) => {
                let mut paired: Vec<(Event, f64)> = self.events.drain(..).zip(latent).collect();
                paired.sort_by_key(|(e, _)| e.ts);
                let (events, latent): (Vec<Event>, Vec<f64>) = paired.into_iter().unzip();
                self.events = events;
                self.latent_intent = Some(latent);
            }
            None => self.events.sort_by_key(|e| e.ts),
        }
    }
}

/// The one-line summary of [`Imported::summary`] from counts: events by type (indexed as
/// [`EventType::index`]), distinct users, skipped rows.
pub fn summary(by_type: &[usize; EventType::ALL.len()], users: usize, skipped: usize) -> String {
    let types: Vec<String> = EventType::ALL.iter().zip(by_type).filter(|(_, n)| **n > 0).map(|(k, n)| format!("{n} {}", k.as_str())).collect();
    format!("{} events ({}), {users} users, {skipped} rows skipped", by_type.iter().sum::<usize>(), types.join(", "))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn open(path: &Path) -> Result<std::fs::File, FormatError> {
    std::fs::File::open(path).map_err(|source| FormatError::Io { path: path.to_path_buf(), source })
}

/// Reads `path` in `format`; the events come back in time order.
///
/// # Errors
///
/// If the file cannot be opened or read, or (Parquet) lacks a required column; bad rows are not
/// errors.
pub fn read_events(path: &Path, format: Format) -> Result<Imported, FormatError> {
    read_events_with(path, format, &EventDecoder::default(), |file, _| Box::new(file))
}

/// [`read_events`] validating with `decoder` (the operator's limits), with the file's reader
/// wrapped by `wrap` (given the file and its size), for a progress bar over the bytes read.
/// Parquet files are read by column and are not wrapped.
///
/// # Errors
///
/// As [`read_events`].
pub fn read_events_with(path: &Path, format: Format, decoder: &EventDecoder, wrap: impl FnOnce(std::fs::File, u64) -> Box<dyn Read>) -> Result<Imported, FormatError> {
    let now = now_ms();
    let mut out = if format == Format::Parquet {
        let read = columnar::read_events(path, decoder, now)?;
        let bad = read.rejected.into_iter().map(|(row, e)| BadRow { line: row + 1, reason: e.to_string() }).collect();
        Imported { events: read.events, bad, latent_intent: None }
    } else {
        let file = open(path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let reader = wrap(file, size);
        let layout = match format {
            Format::Jsonl => None,
            Format::Rees46 => Some(text::CsvLayout::Rees46),
            Format::Taobao => Some(text::CsvLayout::Taobao),
            Format::RetailRocket => Some(text::CsvLayout::RetailRocket),
            Format::Parquet => unreachable!("handled above"),
        };
        match layout {
            None => text::read_jsonl(std::io::BufReader::new(reader), decoder, now).map_err(|source| FormatError::Io { path: path.to_path_buf(), source })?,
            Some(layout) => text::read_csv(reader, layout, decoder, now),
        }
    };
    out.sort_by_time();
    Ok(out)
}

/// Streams the events of a schema-v1 file (Parquet or JSONL, told apart by content) to `row` in
/// file order, validated by `decoder`: each row's 1-based number (line, or row for Parquet) and
/// its event or why it was rejected: [`for_each_row`] in the format the file's content shows.
/// Unlike [`read_events`] it neither sorts nor holds the file: memory stays bounded whatever the
/// file's size.
///
/// # Errors
///
/// If the file cannot be opened or read, or (Parquet) lacks a required column.
pub fn for_each_event(path: &Path, decoder: &EventDecoder, row: impl FnMut(usize, Result<Event, String>)) -> Result<(), FormatError> {
    for_each_row(path, Format::detect(path)?, decoder, |file, _| Box::new(file), row)
}

/// Streams the rows of `path` in `format` (any of them, CSV layouts included) to `row` in file
/// order: each row's 1-based number and its event, or why it was skipped. Nothing is sorted or
/// held, so memory stays bounded whatever the file's size; text files are read through `wrap`
/// (given the file and its size), for a progress bar over the bytes read.
///
/// # Errors
///
/// If the file cannot be opened or read, or (Parquet) lacks a required column; bad rows are not
/// errors.
pub fn for_each_row(path: &Path, format: Format, decoder: &EventDecoder, wrap: impl FnOnce(std::fs::File, u64) -> Box<dyn Read>, mut row: impl FnMut(usize, Result<Event, String>)) -> Result<(), FormatError> {
    let now = now_ms();
    let layout = match format {
        Format::Parquet => {
            columnar::for_each_event(path, decoder, now, |i, event| row(i + 1, event.map_err(|e| e.to_string())))?;
            return Ok(());
        }
        Format::Jsonl => None,
        Format::Rees46 => Some(text::CsvLayout::Rees46),
        Format::Taobao => Some(text::CsvLayout::Taobao),
        Format::RetailRocket => Some(text::CsvLayout::RetailRocket),
    };
    let file = open(path)?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let reader = wrap(file, size);
    match layout {
        None => text::jsonl_rows(std::io::BufReader::with_capacity(1 << 20, reader), decoder, now, |i, _, event| row(i, event.map_err(|e| e.to_string())))
            .map_err(|source| FormatError::Io { path: path.to_path_buf(), source })?,
        Some(layout) => text::csv_rows(reader, layout, decoder, now, row),
    }
    Ok(())
}

/// Whether `path` names a Parquet file to write (its extension is `.parquet`).
pub fn is_parquet_name(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}
