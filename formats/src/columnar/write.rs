//! Writing events and scored intents to Parquet in fixed row chunks (so a file's bytes depend
//! only on its rows), and reading intent files back.

use super::{io_error, parquet_error, ColumnarError, ROWS_PER_CHUNK};
use arrow::array::{
    Array, ArrayRef, ArrowPrimitiveType, AsArray, Float32Array, Float64Array, Int32Array, Int64Array, PrimitiveArray, RecordBatch, StringArray,
    TimestampMillisecondArray, UInt32Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType};
use intentflow_schemas::{Event, ScoredIntent};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

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
/// `emitted_at` (timestamp), `reasons` (the reasons comma-separated, null without any).
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
            Field::new("reasons", DataType::Utf8, true),
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
        Arc::new(rows.iter().map(|i| (!i.reasons.is_empty()).then(|| i.reasons.join(","))).collect::<StringArray>()),
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
        // Files written before intents had reasons have no such column.
        let reasons = batch.column_by_name("reasons").map(|_| text("reasons")).transpose()?;
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
                source: intentflow_schemas::SourcePosition { topic: topic.value(row).into(), partition: partition.value(row), offset: offset.value(row) },
                emitted_at: intentflow_schemas::format_ts_ms(emitted_at.value(row)),
                reasons: reasons.as_ref().and_then(|r| optional(r, row)).map_or_else(Vec::new, |r| r.split(',').map(str::to_string).collect()),
                // Intent files hold v1's columns of the every-event output.
                detail: Default::default(),
                placement: Default::default(),
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
            Field::new("category_id", DataType::Utf8, true),
            Field::new("brand", DataType::Utf8, true),
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
        text(rows.iter().map(|e| e.category_id.as_deref())),
        text(rows.iter().map(|e| e.brand.as_deref())),
        Arc::new(rows.iter().map(|e| e.price).collect::<Float64Array>()),
        Arc::new(rows.iter().map(|e| e.quantity).collect::<UInt32Array>()),
    ])
}
