//! Reading schema-v1 events from Parquet: columns converted once per record batch, each row
//! validated by the event decoder.

use super::{io_error, parquet_error, ColumnarError, EVENT_FIELDS, ROWS_PER_CHUNK};
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, StringArray, UInt64Array};
use arrow::datatypes::{DataType, TimeUnit, TimestampMillisecondType};
use intentflow_schemas::{DecodeError, Event, EventDecoder};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde_json::{Map, Number, Value};
use std::fs::File;
use std::path::Path;

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
