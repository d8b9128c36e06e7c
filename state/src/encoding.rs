//! The versioned binary encoding of [`UserState`].
//!
//! Version 4, all integers little-endian:
//!
//! ```text
//! u8  version (= 4)
//! u8  flags: bit 0 = purchased, bit 1 = session_id present, bit 2 = last_item present,
//!            bit 3 = hidden vector in f16
//! u32 session_seq | u32 events | u32 cart_count | f64 cart_value
//! i64 started_ms  | i64 last_ts_ms | u64 total_events
//! [u64 last_item]                      (only if flag bit 2)
//! [u16 len, bytes] session_id          (only if flag bit 1)
//! u16 len, bytes   model_version
//! u16 n, n × f32   hidden vector       (n × f16 if flag bit 3)
//! u8  m, m × (u32 topic id, i64 next)  fences: per input topic, the offset after the last event applied
//! ```
//!
//! The hidden vector is written in f16 when every value converts to f16 and back to the same
//! bits (a model trained with `--state-precision f16` keeps its states so): nothing is lost,
//! and the vector takes half the bytes. Other states are written as version 3 (flag bit 3
//! clear), which builds from before version 4 read.
//!
//! Older versions still decode, with explicit migrations: version 3 is version 4 without flag
//! bit 3 (always f32); version 2 is version 3 without
//! fences (read with none, so its next event is applied whatever its offset); version 1 is
//! version 2 without `last_item` (flag bit 2 never set), read with `last_item = None`, so the
//! next event of such a session is not recognised as repeating the previous item.
//!
//! A newer version than this build knows is an error naming both versions
//! ([`StateError::UnsupportedVersion`]): the operator quarantines such a record rather than guess.

use crate::StateError;
use intentflow_schemas::SessionState;

/// Current encoding version, the first byte of every encoded state.
pub const STATE_ENCODING_VERSION: u8 = 4;
/// Oldest version [`UserState::decode`] still reads.
const OLDEST_READABLE_VERSION: u8 = 1;
/// First bytes above this are not taken for a future version but for garbage.
const PLAUSIBLE_VERSIONS: u8 = 32;

/// Everything the operator remembers about one user.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserState {
    /// Session counters and times.
    pub session: SessionState,
    /// The GRU hidden intent vector after the user's latest event (empty for a new user).
    pub hidden: Vec<f32>,
    /// Version of the model that produced `hidden`.
    pub model_version: String,
    /// Per input topic of the user's partition, the offset after the last event applied to this
    /// state. An event below its topic's fence is already in the state and is not applied again,
    /// whatever the partition's recorded offset says (see `docs/state.md`).
    pub fences: Vec<Fence>,
}

/// How far a state has applied one input topic: events at offsets below `next` are in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// The input topic, as [`topic_id`] of its name.
    pub topic: u32,
    /// The offset after the last applied event of that topic.
    pub next: i64,
}

/// A stable 32-bit id of a topic name (FNV-1a), so fences cost 12 bytes whatever the name.
pub fn topic_id(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

impl UserState {
    /// Whether this state was built by the model with version `model`: only then may it go on.
    pub fn built_by(&self, model: &str) -> bool {
        self.model_version == model
    }

    /// Whether the event at `offset` of topic `topic` (a [`topic_id`]) is already applied.
    pub fn has_applied(&self, topic: u32, offset: i64) -> bool {
        self.fences.iter().any(|f| f.topic == topic && offset < f.next)
    }

    /// Records that the event at `offset` of `topic` has been applied.
    pub fn mark_applied(&mut self, topic: u32, offset: i64) {
        match self.fences.iter_mut().find(|f| f.topic == topic) {
            Some(f) => f.next = f.next.max(offset + 1),
            None => self.fences.push(Fence { topic, next: offset + 1 }),
        }
    }
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
    /// Encodes this state: version [`STATE_ENCODING_VERSION`] when the hidden vector goes in
    /// f16, else the same bytes as version 3.
    pub fn encode(&self) -> Vec<u8> {
        let s = &self.session;
        // f16 only when it gives back every value's exact bits, and not for an all-zero vector
        // (any model's fresh state: written as version 3, which older builds read).
        let half = self.hidden.iter().any(|v| *v != 0.0) && self.hidden.iter().all(|v| half::f16::from_f32(*v).to_f32().to_bits() == v.to_bits());
        let mut out = Vec::with_capacity(64 + self.hidden.len() * 4 + self.model_version.len());
        // Without f16 the record is what version 3 wrote: builds from before version 4 still
        // read it (a rolled-back binary keeps its states).
        out.push(if half { STATE_ENCODING_VERSION } else { 3 });
        out.push(u8::from(s.purchased) | (u8::from(s.session_id.is_some()) << 1) | (u8::from(s.last_item.is_some()) << 2) | (u8::from(half) << 3));
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
            if half {
                out.extend_from_slice(&half::f16::from_f32(*h).to_le_bytes());
            } else {
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        // Input topics of one partition are few; more than 255 cannot be fenced and are dropped.
        let fences = &self.fences[..self.fences.len().min(u8::MAX as usize)];
        out.push(fences.len() as u8);
        for f in fences {
            out.extend_from_slice(&f.topic.to_le_bytes());
            out.extend_from_slice(&f.next.to_le_bytes());
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
        if version > STATE_ENCODING_VERSION && version <= PLAUSIBLE_VERSIONS {
            return Err(StateError::UnsupportedVersion { found: version, supported: STATE_ENCODING_VERSION });
        }
        if !(OLDEST_READABLE_VERSION..=STATE_ENCODING_VERSION).contains(&version) {
            return Err(StateError::Corrupt(format!("first byte {version:#04x} is no state encoding version")));
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
        let hidden = if version >= 4 && flags & 8 != 0 {
            r.take(n * 2)?.chunks_exact(2).map(|c| half::f16::from_le_bytes(c.try_into().expect("2 bytes")).to_f32()).collect()
        } else {
            r.take(n * 4)?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
        };
        let mut fences = Vec::new();
        if version >= 3 {
            let [m] = r.array()?;
            for _ in 0..m {
                fences.push(Fence { topic: r.u32()?, next: r.i64()? });
            }
        }
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
            fences,
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
            fences in proptest::collection::vec((any::<u32>(), any::<i64>()), 0..4),
            in_f16 in any::<bool>(),
        ) {
            // Half the cases hold f16 values (what a model with f16 states stores).
            let hidden: Vec<f32> = if in_f16 { hidden.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect() } else { hidden };
            let exact = hidden.iter().any(|v| *v != 0.0) && hidden.iter().all(|v| half::f16::from_f32(*v).to_f32().to_bits() == v.to_bits());
            let n = hidden.len();
            let state = UserState {
                session: SessionState { session_id: sid, session_seq: seq, events, cart_count: cart, cart_value: value,
                    started_ms: started, last_ts_ms: last, purchased, total_events: total, last_item },
                hidden,
                model_version: version,
                fences: fences.into_iter().map(|(topic, next)| Fence { topic, next }).collect(),
            };
            let bytes = state.encode();
            // Two bytes a value exactly when f16 keeps every value's bits.
            let with_f32 = UserState { hidden: vec![0.1; n], ..state.clone() }.encode().len();
            prop_assert_eq!(bytes.len(), if exact { with_f32 - 2 * n } else { with_f32 });
            prop_assert_eq!(UserState::decode(&bytes).unwrap(), state);
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
        assert_eq!(state.fences, [], "no fences before version 3");
        assert_eq!(UserState::decode(&state.encode()).unwrap(), state, "re-encoded in the current encoding");
        // A version-2 record is the version-1 one with last_item: read without fences.
        let mut v2 = v1.clone();
        v2[0] = 2;
        v2[1] |= 0b100;
        v2.splice(46..46, 77u64.to_le_bytes());
        let state = UserState::decode(&v2).unwrap();
        assert_eq!((state.session.last_item, state.fences.len()), (Some(77), 0));
    }

    #[test]
    fn fences_say_what_is_applied_per_topic() {
        let mut s = UserState::default();
        let (a, b) = (topic_id("views"), topic_id("carts"));
        assert_ne!(a, b);
        assert!(!s.has_applied(a, 0));
        s.mark_applied(a, 41);
        s.mark_applied(b, 7);
        assert!(s.has_applied(a, 41) && !s.has_applied(a, 42));
        assert!(s.has_applied(b, 0) && !s.has_applied(b, 8));
        s.mark_applied(a, 3);
        assert!(s.has_applied(a, 41), "a fence never moves back");
        assert_eq!(UserState::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn reads_version_3_with_its_hidden_vector_in_f32() {
        // 0.5 converts to f16 exactly: version 4 writes it in 2 bytes, version 3 wrote 4.
        let state = UserState { hidden: vec![0.5, -0.25], model_version: "gru-x".into(), ..Default::default() };
        let v4 = state.encode();
        assert_eq!(v4[1] & 8, 8, "f16 flag");
        let mut v3 = vec![3u8, v4[1] & !8];
        let hidden_at = v4.len() - 1 - 2 * 2;
        v3.extend_from_slice(&v4[2..hidden_at]);
        for h in &state.hidden {
            v3.extend_from_slice(&h.to_le_bytes());
        }
        v3.push(0);
        assert_eq!(v3.len(), v4.len() + 4);
        assert_eq!(UserState::decode(&v3).unwrap(), state);
    }

    #[test]
    fn rejects_unknown_version_and_truncation() {
        let mut bytes = UserState { hidden: vec![0.5; 4], ..Default::default() }.encode();
        assert!(matches!(UserState::decode(&bytes[..bytes.len() - 1]), Err(StateError::Corrupt(_))));
        bytes[0] = 9;
        let err = UserState::decode(&bytes).unwrap_err();
        assert!(matches!(err, StateError::UnsupportedVersion { found: 9, supported: 4 }));
        assert!(err.to_string().contains("version 9") && err.to_string().contains("1..=4"), "{err}");
    }
}
