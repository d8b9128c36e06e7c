//! Parquet files in and out: schema-v1 events from data-lake files, events and scored intents
//! to files that Spark, DuckDB, Polars or pandas read as they are.
//!
//! **Reading events.** Only the schema-v1 columns are read (`user_id`, `ts`, `type`,
//! `event_id`, `session_id`, `item_id`, `category`, `price`, `quantity`); other columns are
//! skipped without being decoded. Each row is validated by [`EventDecoder::decode_object`], the
//! same rules as a JSON record on Kafka, so a row is accepted or rejected for the same reason
//! wherever it comes from. Column types are taken as writers produce them: strings (plain,
//! large, view or dictionary-encoded) or integers for ids; a timestamp of any unit and zone,
//! epoch milliseconds or RFC 3339 strings for `ts`; any integer, float or decimal for `price`
//! and `quantity`. A file without `user_id`, `ts` or `type` is an error before any row is read.
//!
//! **Writing.** [`IntentWriter`] and [`EventWriter`] write snappy-compressed files with typed
//! columns (timestamps in UTC milliseconds, `source` flattened to `source_topic`,
//! `source_partition` and `source_offset`). Rows are handed to the Parquet encoder in fixed
//! chunks of [`ROWS_PER_CHUNK`], so the bytes of a file depend only on its rows, never on how the
//! caller batched them: replaying the same range twice writes identical files.
//!
//! Codecs: uncompressed, snappy, gzip, LZ4 (raw and Hadoop), zstd and brotli files are read, which
//! covers the defaults of Spark, Iceberg, Delta, DuckDB, Polars and pyarrow. LZO, which the Parquet
//! library does not implement, fails with its "not supported" error naming the codec.

use arrow::array::{
    Array, ArrayRef, ArrowPrimitiveType, AsArray, BooleanArray, PrimitiveArray, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType};
use intentflow_schemas::{DecodeError, Event, EventDecoder, ScoredIntent};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Number, Value};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

/// Rows per chunk handed to the Parquet encoder (a multiple of its 1,024-row write batch).
pub const ROWS_PER_CHUNK: usize = 8192;

/// The schema-v1 event fields, in the order of [`EventWriter`]'s columns.
const EVENT_FIELDS: [&str; 9] = ["user_id", "ts", "type", "event_id", "session_id", "item_id", "category", "price", "quantity"];

/// Errors of Parquet reading and writing.
#[derive(Debug, thiserror::Error)]
pub enum ColumnarError {
    /// The file could not be opened or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The Parquet library failed (a corrupt file, the LZO codec).
    #[error("{path}: {source}")]
    Parquet {
        /// The file.
        path: String,
        /// The cause.
        source: parquet::errors::ParquetError,
    },
    /// A required column is absent.
    #[error("{path}: no column `{column}` (columns: {found})")]
    MissingColumn {
        /// The file.
        path: String,
        /// The required column.
        column: &'static str,
        /// The columns the file has.
        found: String,
    },
    /// A record batch of the file could not be read or decompressed.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: arrow::error::ArrowError,
    },
    /// Arrow failed to build or convert a column.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// An intent that cannot be written or read back: a timestamp that is not RFC 3339, a
    /// column of the wrong type, an unknown event type.
    #[error("intent file: {0}")]
    BadIntent(String),
}

/// Events read from a Parquet file, in file order, and the rows that failed validation.
#[derive(Debug, Default)]
pub struct ReadEvents {
    /// Valid events.
    pub events: Vec<Event>,
    /// Invalid rows: 0-based row number in the file, and why.
    pub rejected: Vec<(usize, DecodeError)>,
}

/// One input column, converted once per record batch to a type whose cells map to JSON values.
enum Cells {
    Text(StringArray),
    Int(Int64Array),
    UInt(UInt64Array),
    Float(Float64Array),
    Bool(BooleanArray),
    /// A type with no schema-v1 meaning; cells present as this JSON shape so that the decoder
    /// names the wrong type.
    Other(ArrayRef, Value),
}

impl Cells {
    fn new(column: &ArrayRef) -> Result<Cells, ColumnarError> {
        use arrow::compute::cast;
        let cells = match column.data_type() {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Dictionary(..) => {
                Cells::Text(cast(column, &DataType::Utf8)?.as_string::<i32>().clone())
            }
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 | DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => {
                Cells::Int(cast(column, &DataType::Int64)?.as_primitive().clone())
            }
            DataType::UInt64 => Cells::UInt(column.as_primitive().clone()),
            DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Decimal128(..) | DataType::Decimal256(..) => {
                Cells::Float(cast(column, &DataType::Float64)?.as_primitive().clone())
            }
            DataType::Timestamp(..) | DataType::Date32 | DataType::Date64 => {
                let millis = cast(column, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
                Cells::Int(millis.as_primitive::<TimestampMillisecondType>().reinterpret_cast())
            }
            DataType::Boolean => Cells::Bool(column.as_boolean().clone()),
            DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..) => Cells::Other(column.clone(), Value::Array(Vec::new())),
            _ => Cells::Other(column.clone(), Value::Object(Map::new())),
        };
        Ok(cells)
    }

    /// The cell of `row` as a JSON value; `None` when null. A float that JSON cannot carry
    /// (NaN, infinity) is rejected here with the decoder's own error.
    fn get(&self, row: usize, field: &'static str) -> Result<Option<Value>, DecodeError> {
        let present = |a: &dyn Array| a.is_valid(row);
        Ok(match self {
            Cells::Text(a) => present(a).then(|| Value::String(a.value(row).to_string())),
            Cells::Int(a) => present(a).then(|| Value::from(a.value(row))),
            Cells::UInt(a) => present(a).then(|| Value::from(a.value(row))),
            Cells::Float(a) if present(a) => {
                let x = a.value(row);
                let n = Number::from_f64(x)
                    .ok_or_else(|| DecodeError::OutOfRange { field, reason: format!("{x} is not a finite number") })?;
                Some(Value::Number(n))
            }
            Cells::Float(_) => None,
            Cells::Bool(a) => present(a).then(|| Value::Bool(a.value(row))),
            Cells::Other(a, shape) => present(a.as_ref()).then(|| shape.clone()),
        })
    }
}

fn parquet_error(path: &Path) -> impl FnOnce(parquet::errors::ParquetError) -> ColumnarError + '_ {
    move |source| ColumnarError::Parquet { path: path.display().to_string(), source }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ColumnarError + '_ {
    move |source| ColumnarError::Io { path: path.display().to_string(), source }
}

/// Reads the schema-v1 events of a Parquet file, validating each row with `decoder` (`now_ms`
/// bounds future timestamps, as for live records).
///
/// # Errors
///
/// An unreadable or corrupt file, or one without a required column; invalid rows are not
/// errors, they come back in [`ReadEvents::rejected`].
pub fn read_events(path: &Path, decoder: &EventDecoder, now_ms: i64) -> Result<ReadEvents, ColumnarError> {
    let mut out = ReadEvents::default();
    for_each_event(path, decoder, now_ms, |row, event| match event {
        Ok(e) => out.events.push(e),
        Err(e) => out.rejected.push((row, e)),
    })?;
    Ok(out)
}

/// Streams the schema-v1 rows of a Parquet file to `row` in file order: each row's 0-based
/// number, and its event or why it was rejected. Memory holds one record batch of
/// [`ROWS_PER_CHUNK`] rows at a time, whatever the file's size.
///
/// # Errors
///
/// As [`read_events`].
pub fn for_each_event(
    path: &Path,
    decoder: &EventDecoder,
    now_ms: i64,
    mut row: impl FnMut(usize, Result<Event, DecodeError>),
) -> Result<(), ColumnarError> {
    let file = File::open(path).map_err(io_error(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_error(path))?;
    let schema = builder.schema().clone();
    for column in ["user_id", "ts", "type"] {
        if schema.column_with_name(column).is_none() {
            let found: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(ColumnarError::MissingColumn { path: path.display().to_string(), column, found: found.join(", ") });
        }
    }
    let wanted: Vec<usize> = EVENT_FIELDS.iter().filter_map(|name| schema.index_of(name).ok()).collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), wanted);
    let reader = builder.with_projection(mask).with_batch_size(ROWS_PER_CHUNK).build().map_err(parquet_error(path))?;

    let mut row_base = 0;
    for batch in reader {
        let batch = batch.map_err(|source| ColumnarError::Read { path: path.display().to_string(), source })?;
        let columns: Vec<(&'static str, Cells)> = EVENT_FIELDS
            .iter()
            .filter_map(|name| batch.column_by_name(name).map(|c| (*name, c)))
            .map(|(name, c)| Cells::new(c).map(|cells| (name, cells)))
            .collect::<Result<_, _>>()?;
        // One object per batch, its keys made once; each row overwrites the values.
        let mut obj: Map<String, Value> = columns.iter().map(|(name, _)| ((*name).to_string(), Value::Null)).collect();
        for i in 0..batch.num_rows() {
            row(row_base + i, fill_row(&mut obj, &columns, i).and_then(|()| decoder.decode_object(&obj, now_ms)));
        }
        row_base += batch.num_rows();
    }
    Ok(())
}

/// Overwrites the values of `obj` (keyed by `columns`) with the cells of `row`; a null cell
/// becomes JSON null, which the decoder treats as absent.
fn fill_row(obj: &mut Map<String, Value>, columns: &[(&'static str, Cells)], row: usize) -> Result<(), DecodeError> {
    for (name, cells) in columns {
        *obj.get_mut(*name).expect("keys made from the columns") = cells.get(row, name)?.unwrap_or(Value::Null);
    }
    Ok(())
}

/// Rows waiting to be written, cut into fixed chunks whatever the callers' batches.
struct ChunkedWriter<T> {
    writer: ArrowWriter<File>,
    schema: SchemaRef,
    pending: Vec<T>,
    rows: u64,
    path: String,
    to_columns: fn(&[T]) -> Result<Vec<ArrayRef>, ColumnarError>,
}

impl<T> ChunkedWriter<T> {
    fn create(path: &Path, schema: Schema, to_columns: fn(&[T]) -> Result<Vec<ArrayRef>, ColumnarError>) -> Result<Self, ColumnarError> {
        let file = File::create(path).map_err(io_error(path))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by(format!("intentflow {}", env!("CARGO_PKG_VERSION")))
            .build();
        let schema = Arc::new(schema);
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(parquet_error(path))?;
        Ok(ChunkedWriter { writer, schema, pending: Vec::with_capacity(ROWS_PER_CHUNK), rows: 0, path: path.display().to_string(), to_columns })
    }

    fn push(&mut self, row: T) -> Result<(), ColumnarError> {
        self.pending.push(row);
        if self.pending.len() == ROWS_PER_CHUNK {
            self.flush_chunk()?;
        }
        Ok(())
    }

    fn flush_chunk(&mut self) -> Result<(), ColumnarError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = RecordBatch::try_new(self.schema.clone(), (self.to_columns)(&self.pending)?)?;
        self.writer.write(&batch).map_err(|source| ColumnarError::Parquet { path: self.path.clone(), source })?;
        self.rows += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    fn finish(mut self) -> Result<u64, ColumnarError> {
        self.flush_chunk()?;
        self.writer.close().map_err(|source| ColumnarError::Parquet { path: self.path.clone(), source })?;
        Ok(self.rows)
    }
}

fn utc_millis() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn text<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(values.collect::<StringArray>())
}

fn timestamps(values: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from(values).with_timezone("UTC"))
}

/// Writes scored intents to a Parquet file. Columns: `v`, `user_id`, `score` (float),
/// `event_ts` (timestamp), `event_type`, `event_id`, `session_id`, `session_seq`,
/// `session_events`, `model_version`, `source_topic`, `source_partition`, `source_offset`,
/// `emitted_at` (timestamp).
pub struct IntentWriter(ChunkedWriter<ScoredIntent>);

impl IntentWriter {
    /// Creates (or truncates) `path`.
    ///
    /// # Errors
    ///
    /// If the file cannot be created.
    pub fn create(path: &Path) -> Result<IntentWriter, ColumnarError> {
        let schema = Schema::new(vec![
            Field::new("v", DataType::UInt32, false),
            Field::new("user_id", DataType::Utf8, false),
            Field::new("score", DataType::Float32, false),
            Field::new("event_ts", utc_millis(), false),
            Field::new("event_type", DataType::Utf8, false),
            Field::new("event_id", DataType::Utf8, true),
            Field::new("session_id", DataType::Utf8, true),
            Field::new("session_seq", DataType::UInt32, false),
            Field::new("session_events", DataType::UInt32, false),
            Field::new("model_version", DataType::Utf8, false),
            Field::new("source_topic", DataType::Utf8, false),
            Field::new("source_partition", DataType::Int32, false),
            Field::new("source_offset", DataType::Int64, false),
            Field::new("emitted_at", utc_millis(), false),
        ]);
        ChunkedWriter::create(path, schema, intent_columns).map(IntentWriter)
    }

    /// Appends intents.
    ///
    /// # Errors
    ///
    /// Write failures.
    pub fn write(&mut self, intents: impl IntoIterator<Item = ScoredIntent>) -> Result<(), ColumnarError> {
        intents.into_iter().try_for_each(|i| self.0.push(i))
    }

    /// Writes what is buffered and the file footer; returns the rows written.
    ///
    /// # Errors
    ///
    /// Write failures.
    pub fn finish(self) -> Result<u64, ColumnarError> {
        self.0.finish()
    }
}

fn rfc3339_millis(ts: &str) -> Result<i64, ColumnarError> {
    chrono::DateTime::parse_from_rfc3339(ts).map(|t| t.timestamp_millis()).map_err(|_| ColumnarError::BadIntent(format!("timestamp `{ts}` is not RFC 3339")))
}

fn intent_columns(rows: &[ScoredIntent]) -> Result<Vec<ArrayRef>, ColumnarError> {
    let times = |f: fn(&ScoredIntent) -> &str| rows.iter().map(|i| rfc3339_millis(f(i))).collect::<Result<Vec<_>, _>>();
    Ok(vec![
        Arc::new(rows.iter().map(|i| i.v).collect::<UInt32Array>()),
        text(rows.iter().map(|i| Some(i.user_id.as_str()))),
        Arc::new(rows.iter().map(|i| i.score).collect::<Float32Array>()),
        timestamps(times(|i| &i.event_ts)?),
        text(rows.iter().map(|i| Some(i.event_type.as_str()))),
        text(rows.iter().map(|i| i.event_id.as_deref())),
        text(rows.iter().map(|i| i.session_id.as_deref())),
        Arc::new(rows.iter().map(|i| i.session_seq).collect::<UInt32Array>()),
        Arc::new(rows.iter().map(|i| i.session_events).collect::<UInt32Array>()),
        text(rows.iter().map(|i| Some(i.model_version.as_str()))),
        text(rows.iter().map(|i| Some(i.source.topic.as_str()))),
        Arc::new(rows.iter().map(|i| i.source.partition).collect::<Int32Array>()),
        Arc::new(rows.iter().map(|i| i.source.offset).collect::<Int64Array>()),
        timestamps(times(|i| &i.emitted_at)?),
    ])
}

/// Reads back an intent file written by [`IntentWriter`].
///
/// # Errors
///
/// An unreadable file, or one that lacks an intent column or holds one of another type.
pub fn read_intents(path: &Path) -> Result<Vec<ScoredIntent>, ColumnarError> {
    use arrow::datatypes::{Float32Type, Int32Type, Int64Type, UInt32Type};
    let file = File::open(path).map_err(io_error(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).and_then(|b| b.build()).map_err(parquet_error(path))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|source| ColumnarError::Read { path: path.display().to_string(), source })?;
        let text = |name| string_column(&batch, path, name);
        let (v, user, score) = (primitive_column::<UInt32Type>(&batch, path, "v")?, text("user_id")?, primitive_column::<Float32Type>(&batch, path, "score")?);
        let (event_ts, event_type, event_id) = (primitive_column::<TimestampMillisecondType>(&batch, path, "event_ts")?, text("event_type")?, text("event_id")?);
        let (session_id, seq, events) = (text("session_id")?, primitive_column::<UInt32Type>(&batch, path, "session_seq")?, primitive_column::<UInt32Type>(&batch, path, "session_events")?);
        let (model, topic, partition) = (text("model_version")?, text("source_topic")?, primitive_column::<Int32Type>(&batch, path, "source_partition")?);
        let (offset, emitted_at) = (primitive_column::<Int64Type>(&batch, path, "source_offset")?, primitive_column::<TimestampMillisecondType>(&batch, path, "emitted_at")?);
        let optional = |a: &StringArray, row: usize| a.is_valid(row).then(|| a.value(row).to_string());
        for row in 0..batch.num_rows() {
            let kind = event_type.value(row);
            out.push(ScoredIntent {
                v: v.value(row),
                user_id: user.value(row).to_string(),
                score: score.value(row),
                event_ts: intentflow_schemas::format_ts_ms(event_ts.value(row)),
                event_type: intentflow_schemas::EventType::parse(kind).ok_or_else(|| ColumnarError::BadIntent(format!("unknown event type `{kind}`")))?,
                event_id: optional(&event_id, row),
                session_id: optional(&session_id, row),
                session_seq: seq.value(row),
                session_events: events.value(row),
                model_version: model.value(row).to_string(),
                source: intentflow_schemas::SourcePosition { topic: topic.value(row).to_string(), partition: partition.value(row), offset: offset.value(row) },
                emitted_at: intentflow_schemas::format_ts_ms(emitted_at.value(row)),
            });
        }
    }
    Ok(out)
}

fn named_column<'b>(batch: &'b RecordBatch, path: &Path, name: &'static str) -> Result<&'b ArrayRef, ColumnarError> {
    batch.column_by_name(name).ok_or_else(|| {
        let found: Vec<&str> = batch.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
        ColumnarError::MissingColumn { path: path.display().to_string(), column: name, found: found.join(", ") }
    })
}

fn primitive_column<T: ArrowPrimitiveType>(batch: &RecordBatch, path: &Path, name: &'static str) -> Result<PrimitiveArray<T>, ColumnarError> {
    let column = named_column(batch, path, name)?;
    column.as_primitive_opt::<T>().cloned().ok_or_else(|| ColumnarError::BadIntent(format!("column `{name}` has type {}", column.data_type())))
}

fn string_column(batch: &RecordBatch, path: &Path, name: &'static str) -> Result<StringArray, ColumnarError> {
    let column = named_column(batch, path, name)?;
    column.as_string_opt::<i32>().cloned().ok_or_else(|| ColumnarError::BadIntent(format!("column `{name}` has type {}", column.data_type())))
}

/// Writes schema-v1 events to a Parquet file that [`read_events`] (or any Parquet reader) reads
/// back: `ts` as a UTC millisecond timestamp, optional fields nullable.
pub struct EventWriter(ChunkedWriter<Event>);

impl EventWriter {
    /// Creates (or truncates) `path`.
    ///
    /// # Errors
    ///
    /// If the file cannot be created.
    pub fn create(path: &Path) -> Result<EventWriter, ColumnarError> {
        let schema = Schema::new(vec![
            Field::new("user_id", DataType::Utf8, false),
            Field::new("ts", utc_millis(), false),
            Field::new("type", DataType::Utf8, false),
            Field::new("event_id", DataType::Utf8, true),
            Field::new("session_id", DataType::Utf8, true),
            Field::new("item_id", DataType::Utf8, true),
            Field::new("category", DataType::Utf8, true),
            Field::new("price", DataType::Float64, true),
            Field::new("quantity", DataType::UInt32, true),
        ]);
        ChunkedWriter::create(path, schema, event_columns).map(EventWriter)
    }

    /// Appends one event.
    ///
    /// # Errors
    ///
    /// Write failures.
    pub fn write(&mut self, event: &Event) -> Result<(), ColumnarError> {
        self.0.push(event.clone())
    }

    /// Writes what is buffered and the file footer; returns the rows written.
    ///
    /// # Errors
    ///
    /// Write failures.
    pub fn finish(self) -> Result<u64, ColumnarError> {
        self.0.finish()
    }
}

fn event_columns(rows: &[Event]) -> Result<Vec<ArrayRef>, ColumnarError> {
    Ok(vec![
        text(rows.iter().map(|e| Some(e.user_id.as_str()))),
        timestamps(rows.iter().map(|e| e.ts).collect()),
        text(rows.iter().map(|e| Some(e.kind.as_str()))),
        text(rows.iter().map(|e| e.event_id.as_deref())),
        text(rows.iter().map(|e| e.session_id.as_deref())),
        text(rows.iter().map(|e| e.item_id.as_deref())),
        text(rows.iter().map(|e| e.category.as_deref())),
        Arc::new(rows.iter().map(|e| e.price).collect::<Float64Array>()),
        Arc::new(rows.iter().map(|e| e.quantity).collect::<UInt32Array>()),
    ])
}

/// Whether the file at `path` is Parquet (starts with the `PAR1` magic).
///
/// # Errors
///
/// If the file cannot be read.
pub fn is_parquet(path: &Path) -> Result<bool, ColumnarError> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = File::open(path).map_err(io_error(path))?;
    let n = file.read(&mut magic).map_err(io_error(path))?;
    Ok(n == 4 && &magic == b"PAR1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{DictionaryArray, Int32Array as Keys, LargeStringArray, ListArray, TimestampMicrosecondArray};
    use arrow::datatypes::Int32Type;
    use intentflow_schemas::{EventType, SourcePosition};

    const NOW: i64 = 1_800_000_000_000;

    fn write_batch(path: &Path, columns: Vec<(&str, ArrayRef)>) {
        write_compressed(path, columns, Compression::UNCOMPRESSED);
    }

    fn write_compressed(path: &Path, columns: Vec<(&str, ArrayRef)>, codec: Compression) {
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let props = WriterProperties::builder().set_compression(codec).build();
        let mut w = ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    fn event(user: &str, ts: i64, kind: EventType) -> Event {
        Event {
            user_id: user.into(),
            ts,
            kind,
            event_id: Some(format!("e{ts}")),
            session_id: None,
            item_id: Some("42".into()),
            category: Some("electronics.phone".into()),
            price: Some(199.5),
            quantity: None,
        }
    }

    #[test]
    fn events_round_trip_through_parquet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.parquet");
        let events: Vec<Event> = (0..20_000)
            .map(|i| {
                let mut e = event(&format!("u{}", i % 97), 1_600_000_000_000 + i, EventType::ALL[i as usize % 4]);
                e.quantity = (i % 3 == 0).then_some(2);
                e.session_id = (i % 2 == 0).then(|| format!("s{}", i / 100));
                e
            })
            .collect();
        let mut w = EventWriter::create(&path).unwrap();
        events.iter().for_each(|e| w.write(e).unwrap());
        assert_eq!(w.finish().unwrap(), 20_000);
        assert!(is_parquet(&path).unwrap());
        let read = read_events(&path, &EventDecoder::default(), NOW).unwrap();
        assert!(read.rejected.is_empty(), "{:?}", &read.rejected[..3.min(read.rejected.len())]);
        assert_eq!(read.events, events);
    }

    #[test]
    fn other_writers_types_are_understood() {
        // What pyarrow, Spark or DuckDB typically write: dictionary-encoded and large strings,
        // integer user ids, microsecond timestamps with a zone, float32 prices, extra columns.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lake.parquet");
        let types = DictionaryArray::<Int32Type>::new(Keys::from(vec![0, 1, 0]), Arc::new(StringArray::from(vec!["view", "cart"])));
        let ts = TimestampMicrosecondArray::from(vec![1_600_000_000_123_456, 1_600_000_001_000_000, 1_600_000_002_000_000]).with_timezone("+02:00");
        write_batch(
            &path,
            vec![
                ("user_id", Arc::new(Int64Array::from(vec![7, 7, 8])) as ArrayRef),
                ("ts", Arc::new(ts)),
                ("type", Arc::new(types)),
                ("item_id", Arc::new(LargeStringArray::from(vec![Some("a"), None, Some("c")]))),
                ("price", Arc::new(Float32Array::from(vec![Some(1.5), Some(2.0), None]))),
                ("quantity", Arc::new(Int32Array::from(vec![None, Some(3), None]))),
                ("unrelated", Arc::new(BooleanArray::from(vec![true, false, true]))),
            ],
        );
        let read = read_events(&path, &EventDecoder::default(), NOW).unwrap();
        assert!(read.rejected.is_empty(), "{:?}", read.rejected);
        let got: Vec<(String, i64, EventType, Option<String>, Option<f64>, Option<u32>)> =
            read.events.into_iter().map(|e| (e.user_id, e.ts, e.kind, e.item_id, e.price, e.quantity)).collect();
        assert_eq!(
            got,
            vec![
                ("7".into(), 1_600_000_000_123, EventType::View, Some("a".into()), Some(1.5), None),
                ("7".into(), 1_600_000_001_000, EventType::AddToCart, None, Some(2.0), Some(3)),
                ("8".into(), 1_600_000_002_000, EventType::View, Some("c".into()), None, None),
            ]
        );
    }

    #[test]
    fn invalid_rows_are_rejected_with_their_row_and_reason_and_valid_rows_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.parquet");
        let tags = ListArray::from_iter_primitive::<Int32Type, _, _>(vec![None, Some(vec![Some(1)]), None, None, None, None]);
        write_batch(
            &path,
            vec![
                ("user_id", Arc::new(StringArray::from(vec![Some("a"), Some("b"), None, Some("d"), Some("e"), Some("f")])) as ArrayRef),
                ("ts", Arc::new(StringArray::from(vec!["2020-01-01T00:00:00Z", "2020-01-01T00:00:01Z", "2020-01-01T00:00:02Z", "yesterday", "2020-01-01T00:00:04Z", "2020-01-01T00:00:05Z"]))),
                ("type", Arc::new(StringArray::from(vec!["view", "view", "view", "view", "teleport", "purchase"]))),
                ("price", Arc::new(Float64Array::from(vec![Some(1.0), Some(2.0), None, None, None, Some(f64::NAN)]))),
                ("session_id", Arc::new(tags)),
            ],
        );
        let read = read_events(&path, &EventDecoder::default(), NOW).unwrap();
        assert_eq!(read.events.iter().map(|e| e.user_id.as_str()).collect::<Vec<_>>(), ["a"]);
        let reasons: Vec<(usize, &str)> = read.rejected.iter().map(|(row, e)| (*row, e.kind())).collect();
        assert_eq!(reasons, [(1, "wrong_type"), (2, "missing_field"), (3, "bad_timestamp"), (4, "unknown_event_type"), (5, "out_of_range")]);
        assert_eq!(read.rejected[0].1.to_string(), "field `session_id` must be a string or an integer, got array");
    }

    #[test]
    fn a_file_without_a_required_column_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no_type.parquet");
        write_batch(&path, vec![("user_id", Arc::new(StringArray::from(vec!["a"])) as ArrayRef), ("ts", Arc::new(Int64Array::from(vec![1_600_000_000_000])))]);
        let err = read_events(&path, &EventDecoder::default(), NOW).unwrap_err().to_string();
        assert!(err.contains("no column `type`") && err.contains("user_id, ts"), "{err}");
        let not_parquet = dir.path().join("x.parquet");
        std::fs::write(&not_parquet, b"{\"user_id\":1}\n").unwrap();
        assert!(!is_parquet(&not_parquet).unwrap());
        assert!(read_events(&not_parquet, &EventDecoder::default(), NOW).is_err());
    }

    #[test]
    fn files_from_other_writers_in_every_codec_are_read() {
        // Written by DuckDB (`COPY … (FORMAT parquet, COMPRESSION zstd|brotli)`): INT32 user ids,
        // TIMESTAMP ts, 2 rows. zstd is the default of Iceberg and Polars.
        for fixture in ["zstd-events.parquet", "brotli-events.parquet"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(fixture);
            let read = read_events(&path, &EventDecoder::default(), NOW).unwrap();
            assert!(read.rejected.is_empty(), "{fixture}: {:?}", read.rejected);
            let got: Vec<(&str, i64, EventType)> = read.events.iter().map(|e| (e.user_id.as_str(), e.ts, e.kind)).collect();
            assert_eq!(got, [("1", 1_577_836_800_000, EventType::View), ("2", 1_577_836_801_000, EventType::AddToCart)], "{fixture}");
        }
        // Every codec the Parquet library writes, on enough rows that pages really compress.
        let dir = tempfile::tempdir().unwrap();
        let users: Vec<String> = (0..5_000).map(|i| format!("u{}", i % 37)).collect();
        let columns = || -> Vec<(&str, ArrayRef)> {
            vec![
                ("user_id", Arc::new(StringArray::from_iter_values(&users)) as ArrayRef),
                ("ts", Arc::new(Int64Array::from_iter_values(1_600_000_000_000..1_600_000_005_000))),
                ("type", Arc::new(StringArray::from_iter_values((0..5_000).map(|i| ["view", "cart", "remove_from_cart", "purchase"][i % 4])))),
            ]
        };
        for codec in [
            Compression::UNCOMPRESSED,
            Compression::SNAPPY,
            Compression::GZIP(Default::default()),
            Compression::LZ4,
            Compression::LZ4_RAW,
            Compression::ZSTD(Default::default()),
            Compression::BROTLI(Default::default()),
        ] {
            let path = dir.path().join(format!("{codec}.parquet"));
            write_compressed(&path, columns(), codec);
            let read = read_events(&path, &EventDecoder::default(), NOW).unwrap();
            assert!(read.rejected.is_empty(), "{codec}");
            assert_eq!(read.events.len(), 5_000, "{codec}");
            assert!(read.events.iter().zip(&users).enumerate().all(|(i, (e, u))| &e.user_id == u && e.ts == 1_600_000_000_000 + i as i64), "{codec}");
            assert_eq!(read.events[4_999].kind, EventType::Purchase, "{codec}");
        }
    }

    fn intent(i: i64) -> ScoredIntent {
        ScoredIntent {
            v: 1,
            user_id: format!("u{}", i % 13),
            score: (i as f32 * 0.37).fract(),
            event_ts: intentflow_schemas::format_ts_ms(1_600_000_000_000 + i),
            event_type: EventType::ALL[i as usize % 4],
            event_id: (i % 2 == 0).then(|| format!("e{i}")),
            session_id: None,
            session_seq: (i % 5) as u32,
            session_events: (i % 7) as u32 + 1,
            model_version: "abc123".into(),
            source: SourcePosition { topic: "events".into(), partition: (i % 4) as i32, offset: i },
            emitted_at: intentflow_schemas::format_ts_ms(1_600_000_000_000 + i),
        }
    }

    #[test]
    fn intent_files_do_not_depend_on_how_writes_were_batched() {
        let dir = tempfile::tempdir().unwrap();
        let intents: Vec<ScoredIntent> = (0..30_000).map(intent).collect();
        let write = |name: &str, batch: usize| {
            let path = dir.path().join(name);
            let mut w = IntentWriter::create(&path).unwrap();
            intents.chunks(batch).for_each(|c| w.write(c.to_vec()).unwrap());
            assert_eq!(w.finish().unwrap(), 30_000);
            std::fs::read(path).unwrap()
        };
        let a = write("a.parquet", 7);
        let b = write("b.parquet", 16_384);
        assert_eq!(a, b);
        assert_eq!(read_intents(&dir.path().join("b.parquet")).unwrap(), intents);

        // The columns are typed for query engines.
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(dir.path().join("a.parquet")).unwrap()).unwrap().build().unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows, 30_000);
        let first = &batches[0];
        let scores = first.column_by_name("score").unwrap().as_primitive::<arrow::datatypes::Float32Type>();
        assert_eq!(scores.value(11), intents[11].score);
        let ts = first.column_by_name("event_ts").unwrap().as_primitive::<TimestampMillisecondType>();
        assert_eq!(ts.value(11), 1_600_000_000_011);
        let offsets = first.column_by_name("source_offset").unwrap().as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(offsets.value(11), 11);
        assert!(first.column_by_name("session_id").unwrap().is_null(0));
    }
}
