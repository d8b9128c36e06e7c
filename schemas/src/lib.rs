//! Wire types of Intentflow, the leaf of the workspace.
//!
//! * [`Event`] is one clickstream event (schema v1, one JSON object per Kafka message, keyed by
//!   user id). [`EventDecoder`] turns raw bytes into a validated [`Event`] or a typed
//!   [`DecodeError`] that names what is wrong; it never panics on any input.
//! * [`ScoredIntent`] is what the operator emits per valid input event: the probability that the
//!   user's current session ends in a purchase, with provenance.
//! * [`SessionState`] is the plain-data session part of a user's state (counters and times),
//!   shared by the state encoding, the feature code and the training code so they cannot drift.
//! * [`int8`] is the 8-bit block format of hidden states, shared by the model that rounds to it
//!   and the state encoding that stores it.
//!
//! The formats are documented with examples in `docs/schemas.md`.

mod decode;
mod event;
mod intent;
pub mod int8;
mod session;

pub use decode::{Cell, EventDecoder, FieldSource};
pub use event::{DecodeError, Event, EventType, Limits, Text};
pub use intent::{Crossing, IntentDetail, IntentSchema, Placement, ScoredIntent, SourcePosition, HORIZON_SESSION, INTENT_SCHEMA_VERSION};
pub use session::{item_key, DistinctSketch, SessionConfig, SessionCounts, SessionState, SessionStep, UserHistory};

/// Formats epoch milliseconds as RFC 3339 UTC with millisecond precision, e.g.
/// `2019-10-01T00:00:00.000Z`. Years 0–9999 are formatted by hand (two per intent, on the hot
/// path: no format-string parsing); others through chrono, as before.
pub fn format_ts_ms(ts_ms: i64) -> String {
    let mut out = Vec::with_capacity(24);
    write_ts_ms(ts_ms, &mut out);
    String::from_utf8(out).expect("ASCII digits and separators, or chrono's text")
}

/// Appends [`format_ts_ms`]'s text to `buf`, without allocating for years 0–9999.
pub fn write_ts_ms(ts_ms: i64, buf: &mut Vec<u8>) {
    const MIN: i64 = -62_167_219_200_000; // 0000-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    if !(MIN..=MAX).contains(&ts_ms) {
        let text = chrono::DateTime::from_timestamp_millis(ts_ms).map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()).unwrap_or_else(|| ts_ms.to_string());
        buf.extend_from_slice(text.as_bytes());
        return;
    }
    let (days, ms_of_day) = (ts_ms.div_euclid(86_400_000), ts_ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss, ms) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1_000 % 60, ms_of_day % 1_000);
    let mut out = [0u8; 24];
    let mut put = |at: usize, value: i64, width: usize| {
        let mut v = value;
        for i in (0..width).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, y, 4);
    put(5, m, 2);
    put(8, d, 2);
    put(11, hh, 2);
    put(14, mm, 2);
    put(17, ss, 2);
    put(20, ms, 3);
    for (at, c) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (23, b'Z')] {
        out[at] = c;
    }
    buf.extend_from_slice(&out);
}

/// `(year, month, day)` of days since 1970-01-01 in the proleptic Gregorian calendar (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_as_chrono_formats_them() {
        let chrono_format = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
        let mut ms = -62_167_219_200_000i64;
        // Every 37 hours and 11 ms or so across four millennia, plus the edges and leap days.
        while ms < 253_402_300_799_999 {
            assert_eq!(format_ts_ms(ms), chrono_format(ms), "{ms}");
            ms += 133_211_011;
        }
        for ms in [0, -1, 951_782_400_000, 1_569_888_000_000, 253_402_300_799_999, -62_167_219_200_000, 1_709_164_799_999] {
            assert_eq!(format_ts_ms(ms), chrono_format(ms), "{ms}");
        }
        assert_eq!(format_ts_ms(1_569_888_005_123), "2019-10-01T00:00:05.123Z");
    }
}
