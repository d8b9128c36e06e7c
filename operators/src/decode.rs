//! Decoding raw records into events, with every rejection kept and explained.

use intentflow_schemas::{DecodeError, EventDecoder, SourcePosition};
use rayon::prelude::*;

/// A raw input record as any source sees it.
#[derive(Debug, Clone, Copy)]
pub struct SourceRecord<'a> {
    /// Topic (or file) it came from.
    pub topic: &'a str,
    /// Partition (0 for files).
    pub partition: i32,
    /// Offset (line number for files).
    pub offset: i64,
    /// The record's timestamp (epoch ms), if the source has one.
    pub timestamp_ms: Option<i64>,
    /// The value bytes; `None` for a tombstone.
    pub payload: Option<&'a [u8]>,
}

/// A record that failed validation, with where it came from, why, and its original bytes (for
/// the dead-letter topic).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// Where the record came from.
    pub source: SourcePosition,
    /// The source record's timestamp (epoch ms), if it had one.
    pub timestamp_ms: Option<i64>,
    /// Why it was rejected.
    pub error: DecodeError,
    /// The original value bytes (`None` for a tombstone).
    pub payload: Option<Vec<u8>>,
}

/// A decoded batch: valid events with their positions, and the rejections, each in input order.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Valid events.
    pub events: Vec<crate::PositionedEvent>,
    /// Rejected records.
    pub rejected: Vec<Rejected>,
}

/// Decodes a batch of records. Never fails as a whole: every record ends up in exactly one of
/// the two lists.
pub fn decode_batch<'a>(
    decoder: &EventDecoder,
    records: impl IntoIterator<Item = SourceRecord<'a>>,
    now_ms: i64,
) -> Decoded {
    let mut out = Decoded::default();
    for r in records {
        let source = SourcePosition { topic: r.topic.into(), partition: r.partition, offset: r.offset };
        match decoder.decode(r.payload.unwrap_or_default(), now_ms) {
            Ok(event) => out.events.push(crate::PositionedEvent { source, event }),
            Err(error) => out.rejected.push(Rejected { source, timestamp_ms: r.timestamp_ms, error, payload: r.payload.map(<[u8]>::to_vec) }),
        }
    }
    out
}

/// Records per chunk below which [`decode_records`] decodes on the calling thread: a chunk must
/// outweigh handing it to another core.
const MIN_CHUNK: usize = 512;

/// [`decode_batch`] of a batch held in a slice, in chunks decoded on all cores (rayon's pool)
/// when the batch is large enough, then put back in input order: the same two lists, in the
/// same order, as decoding it on one thread.
pub fn decode_records(decoder: &EventDecoder, records: &[SourceRecord<'_>], now_ms: i64) -> Decoded {
    let chunks = rayon::current_num_threads().min(records.len() / MIN_CHUNK);
    if chunks <= 1 {
        return decode_batch(decoder, records.iter().copied(), now_ms);
    }
    let parts: Vec<Decoded> = records
        .par_chunks(records.len().div_ceil(chunks))
        .map(|chunk| decode_batch(decoder, chunk.iter().copied(), now_ms))
        .collect();
    let mut out = Decoded {
        events: Vec::with_capacity(parts.iter().map(|p| p.events.len()).sum()),
        rejected: Vec::new(),
    };
    for mut part in parts {
        out.events.append(&mut part.events);
        out.rejected.append(&mut part.rejected);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_lands_in_one_list_in_order() {
        let payloads: [&[u8]; 4] = [
            br#"{"user_id":"a","ts":1569888005000,"type":"view"}"#,
            b"garbage",
            br#"{"user_id":"b","ts":1569888006000,"type":"cart"}"#,
            b"",
        ];
        let records = payloads.iter().enumerate().map(|(i, p)| SourceRecord {
            topic: "events",
            partition: 2,
            offset: 10 + i as i64,
            timestamp_ms: Some(1_700_000_000_000 + i as i64),
            payload: Some(p),
        });
        let d = decode_batch(&EventDecoder::default(), records, 1_700_000_000_000);
        assert_eq!(d.events.iter().map(|e| e.source.offset).collect::<Vec<_>>(), [10, 12]);
        assert_eq!(d.rejected.iter().map(|r| (r.source.offset, r.error.kind())).collect::<Vec<_>>(), [(11, "invalid_json"), (13, "empty")]);
        assert_eq!(d.events[1].event.user_id, "b");
        assert_eq!(d.rejected[0].payload.as_deref(), Some(&b"garbage"[..]), "original bytes kept for the dead-letter topic");
        assert_eq!(d.rejected[0].timestamp_ms, Some(1_700_000_000_001));
    }

    #[test]
    fn decoding_in_chunks_gives_the_lists_of_one_thread() {
        // Enough records for chunks on any pool of two or more threads, every seventh invalid.
        let payloads: Vec<Vec<u8>> = (0..5_000)
            .map(|i| match i % 7 {
                3 => b"{\"user_id\":".to_vec(),
                _ => format!(r#"{{"user_id":"u{}","ts":{},"type":"view"}}"#, i % 97, 1_569_888_000_000i64 + i).into_bytes(),
            })
            .collect();
        let records: Vec<SourceRecord> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| SourceRecord { topic: "events", partition: (i % 3) as i32, offset: i as i64, timestamp_ms: None, payload: Some(p) })
            .collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let chunked = pool.install(|| decode_records(&EventDecoder::default(), &records, 1_700_000_000_000));
        let serial = decode_batch(&EventDecoder::default(), records.iter().copied(), 1_700_000_000_000);
        assert_eq!(chunked.events, serial.events);
        assert_eq!(chunked.rejected, serial.rejected);
        assert_eq!((chunked.events.len(), chunked.rejected.len()), (4_286, 714));
    }
}
