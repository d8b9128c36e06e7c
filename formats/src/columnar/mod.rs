//! Parquet files in and out: schema-v1 events from data-lake files, events and scored intents
//! to files that Spark, DuckDB, Polars or pandas read as they are.
//!
//! **Reading events.** Only the schema-v1 columns are read (`user_id`, `ts`, `type`,
//! `event_id`, `session_id`, `item_id`, `category`, `category_id`, `brand`, `price`,
//! `quantity`); other columns are
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

mod read;
mod write;

pub use read::{for_each_event, read_events, ReadEvents};
pub use write::{read_intents, EventWriter, IntentWriter};

use std::fs::File;
use std::path::Path;

/// Rows per chunk handed to the Parquet encoder (a multiple of its 1,024-row write batch).
pub const ROWS_PER_CHUNK: usize = 8192;

/// The schema-v1 event fields, in the order of [`EventWriter`]'s columns.
pub(crate) const EVENT_FIELDS: [&str; 11] =
    ["user_id", "ts", "type", "event_id", "session_id", "item_id", "category", "category_id", "brand", "price", "quantity"];

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

pub(crate) fn parquet_error(path: &Path) -> impl FnOnce(parquet::errors::ParquetError) -> ColumnarError + '_ {
    move |source| ColumnarError::Parquet { path: path.display().to_string(), source }
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ColumnarError + '_ {
    move |source| ColumnarError::Io { path: path.display().to_string(), source }
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
