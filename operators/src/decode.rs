//! Decoding raw records into events, with every rejection kept and explained.

use intentflow_schemas::{DecodeError, EventDecoder, SourcePosition};

/// A raw input record as any source sees it.
#[derive(Debug, Clone, Copy)]
pub struct SourceRecord<'a> {
    /// Topic (or file) it came from.
    pub topic: &'a str,
    /// Partition (0 for files).
    pub partition: i32,
    /// Offset (line number for files).
    pub offset: i64,
    /// The value bytes; `None` for a tombstone.
    pub payload: Option<&'a [u8]>,
}

/// A record that failed validation, with where it came from and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// Where the record came from.
    pub source: SourcePosition,
    /// Why it was rejected.
    pub error: DecodeError,
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
        let source = SourcePosition { topic: r.topic.to_string(), partition: r.partition, offset: r.offset };
        match decoder.decode(r.payload.unwrap_or_default(), now_ms) {
            Ok(event) => out.events.push(crate::PositionedEvent { source, event }),
            Err(error) => out.rejected.push(Rejected { source, error }),
        }
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
            payload: Some(p),
        });
        let d = decode_batch(&EventDecoder::default(), records, 1_700_000_000_000);
        assert_eq!(d.events.iter().map(|e| e.source.offset).collect::<Vec<_>>(), [10, 12]);
        assert_eq!(d.rejected.iter().map(|r| (r.source.offset, r.error.kind())).collect::<Vec<_>>(), [(11, "invalid_json"), (13, "empty")]);
        assert_eq!(d.events[1].event.user_id, "b");
    }
}
