//! The versioned binary encoding of [`UserState`].
//!
//! Version 2, all integers little-endian:
//!
//! ```text
//! u8  version (= 2)
//! u8  flags: bit 0 = purchased, bit 1 = session_id present, bit 2 = last_item present
//! u32 session_seq | u32 events | u32 cart_count | f64 cart_value
//! i64 started_ms  | i64 last_ts_ms | u64 total_events
//! [u64 last_item]                      (only if flag bit 2)
//! [u16 len, bytes] session_id          (only if flag bit 1)
//! u16 len, bytes   model_version
//! u16 n, n × f32   hidden vector
//! ```
//!
//! Version 1 is version 2 without `last_item` (flag bit 2 never set). It still decodes: the
//! migration reads it with `last_item = None`, so the next event of such a session is not
//! recognised as repeating the previous item.

use crate::StateError;
use intentflow_schemas::SessionState;

/// Current encoding version, the first byte of every encoded state.
pub const STATE_ENCODING_VERSION: u8 = 2;
/// Oldest version [`UserState::decode`] still reads.
const OLDEST_READABLE_VERSION: u8 = 1;

/// Everything the operator remembers about one user.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserState {
    /// Session counters and times.
    pub session: SessionState,
    /// The GRU hidden intent vector after the user's latest event (empty for a new user).
    pub hidden: Vec<f32>,
    /// Version of the model that produced `hidden`.
    pub model_version: String,
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if self.bytes.len() < n {
            return Err(StateError::Corrupt(format!("truncated: wanted {n} more bytes, {} left", self.bytes.len())));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }
    fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, StateError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String, StateError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|e| StateError::Corrupt(e.to_string()))
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Ids are limited to 256 bytes by the decoder and model versions are short; cut defensively.
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl UserState {
    /// Encodes this state (version [`STATE_ENCODING_VERSION`]).
    pub fn encode(&self) -> Vec<u8> {
        let s = &self.session;
        let mut out = Vec::with_capacity(64 + self.hidden.len() * 4 + self.model_version.len());
        out.push(STATE_ENCODING_VERSION);
        out.push(u8::from(s.purchased) | (u8::from(s.session_id.is_some()) << 1) | (u8::from(s.last_item.is_some()) << 2));
        out.extend_from_slice(&s.session_seq.to_le_bytes());
        out.extend_from_slice(&s.events.to_le_bytes());
        out.extend_from_slice(&s.cart_count.to_le_bytes());
        out.extend_from_slice(&s.cart_value.to_le_bytes());
        out.extend_from_slice(&s.started_ms.to_le_bytes());
        out.extend_from_slice(&s.last_ts_ms.to_le_bytes());
        out.extend_from_slice(&s.total_events.to_le_bytes());
        if let Some(item) = s.last_item {
            out.extend_from_slice(&item.to_le_bytes());
        }
        if let Some(id) = &s.session_id {
            put_str(&mut out, id);
        }
        put_str(&mut out, &self.model_version);
        out.extend_from_slice(&(self.hidden.len() as u16).to_le_bytes());
        for h in &self.hidden {
            out.extend_from_slice(&h.to_le_bytes());
        }
        out
    }

    /// Decodes bytes written by [`UserState::encode`] of this or an older version.
    ///
    /// # Errors
    ///
    /// [`StateError::UnsupportedVersion`] for an unknown version byte, [`StateError::Corrupt`]
    /// for truncated or trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<UserState, StateError> {
        let mut r = Reader { bytes };
        let [version] = r.array()?;
        if !(OLDEST_READABLE_VERSION..=STATE_ENCODING_VERSION).contains(&version) {
            return Err(StateError::UnsupportedVersion { found: version, supported: STATE_ENCODING_VERSION });
        }
        let [flags] = r.array()?;
        let session_seq = r.u32()?;
        let events = r.u32()?;
        let cart_count = r.u32()?;
        let cart_value = f64::from_le_bytes(r.array()?);
        let started_ms = r.i64()?;
        let last_ts_ms = r.i64()?;
        let total_events = u64::from_le_bytes(r.array()?);
        let last_item = if flags & 4 != 0 { Some(u64::from_le_bytes(r.array()?)) } else { None };
        let session_id = if flags & 2 != 0 { Some(r.string()?) } else { None };
        let model_version = r.string()?;
        let n = r.u16()? as usize;
        let hidden = r.take(n * 4)?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        if !r.bytes.is_empty() {
            return Err(StateError::Corrupt(format!("{} trailing bytes", r.bytes.len())));
        }
        Ok(UserState {
            session: SessionState {
                session_id,
                session_seq,
                events,
                cart_count,
                cart_value,
                started_ms,
                last_ts_ms,
                purchased: flags & 1 != 0,
                total_events,
                last_item,
            },
            hidden,
            model_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(
            seq in any::<u32>(), events in any::<u32>(), cart in any::<u32>(), value in 0.0f64..1e9,
            started in any::<i64>(), last in any::<i64>(), total in any::<u64>(), purchased in any::<bool>(),
            sid in proptest::option::of("[a-z0-9-]{0,40}"), version in "[a-z0-9-]{0,20}",
            last_item in proptest::option::of(any::<u64>()),
            hidden in proptest::collection::vec(-1.0f32..1.0, 0..128),
        ) {
            let state = UserState {
                session: SessionState { session_id: sid, session_seq: seq, events, cart_count: cart, cart_value: value,
                    started_ms: started, last_ts_ms: last, purchased, total_events: total, last_item },
                hidden,
                model_version: version,
            };
            prop_assert_eq!(UserState::decode(&state.encode()).unwrap(), state);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = UserState::decode(&bytes);
        }
    }

    #[test]
    fn reads_version_1_as_a_session_without_last_item() {
        // A version-1 record: v1 had no flag bit 2 and no last_item field.
        let mut v1 = vec![1u8, 0b10];
        v1.extend_from_slice(&3u32.to_le_bytes()); // session_seq
        v1.extend_from_slice(&4u32.to_le_bytes()); // events
        v1.extend_from_slice(&1u32.to_le_bytes()); // cart_count
        v1.extend_from_slice(&9.5f64.to_le_bytes()); // cart_value
        v1.extend_from_slice(&100i64.to_le_bytes()); // started_ms
        v1.extend_from_slice(&200i64.to_le_bytes()); // last_ts_ms
        v1.extend_from_slice(&12u64.to_le_bytes()); // total_events
        for s in ["s1", "gru-abc"] {
            v1.extend_from_slice(&(s.len() as u16).to_le_bytes());
            v1.extend_from_slice(s.as_bytes());
        }
        v1.extend_from_slice(&1u16.to_le_bytes());
        v1.extend_from_slice(&0.25f32.to_le_bytes());
        let state = UserState::decode(&v1).unwrap();
        assert_eq!(state.session.session_seq, 3);
        assert_eq!(state.session.session_id.as_deref(), Some("s1"));
        assert_eq!(state.session.last_item, None);
        assert_eq!((state.model_version.as_str(), state.hidden.as_slice()), ("gru-abc", [0.25f32].as_slice()));
        assert_eq!(UserState::decode(&state.encode()).unwrap(), state, "re-encoded as version 2");
    }

    #[test]
    fn rejects_unknown_version_and_truncation() {
        let mut bytes = UserState { hidden: vec![0.5; 4], ..Default::default() }.encode();
        assert!(matches!(UserState::decode(&bytes[..bytes.len() - 1]), Err(StateError::Corrupt(_))));
        bytes[0] = 9;
        assert!(matches!(UserState::decode(&bytes), Err(StateError::UnsupportedVersion { found: 9, supported: 2 })));
    }
}
