//! Parquet in and out: round trips, other writers' types and codecs, invalid rows, and intent
//! files whose bytes do not depend on how writes were batched.

use arrow::array::{
    ArrayRef, AsArray, BooleanArray, DictionaryArray, Float32Array, Float64Array, Int32Array, Int32Array as Keys, Int64Array, LargeStringArray, ListArray,
    RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{Int32Type, TimestampMillisecondType};
use intentflow_formats::columnar::{is_parquet, read_events, read_intents, EventWriter, IntentWriter};
use intentflow_schemas::{Event, EventDecoder, EventType, ScoredIntent, SourcePosition};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

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
        event_id: Some(format!("e{ts}").into()),
        session_id: None,
        item_id: Some("42".into()),
        category: Some("electronics.phone".into()),
        category_id: Some("2053013555631882655".into()),
        brand: Some("samsung".into()),
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
            e.session_id = (i % 2 == 0).then(|| format!("s{}", i / 100).into());
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
        read.events.into_iter().map(|e| (e.user_id.to_string(), e.ts, e.kind, e.item_id.map(|s| s.to_string()), e.price, e.quantity)).collect();
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
        // Some with reasons, which round-trip through the comma-separated column.
        reasons: match i % 3 {
            0 => Vec::new(),
            1 => vec!["cart_added".into()],
            _ => vec!["returning_buyer".into(), "max_price".into()],
        },
        detail: Default::default(),
        placement: Default::default(),
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
