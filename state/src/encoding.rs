//! The versioned binary encoding of [`UserState`].
//!
//! Version 3, all integers little-endian:
//!
//! ```text
//! u8  version (= 3)
//! u8  flags: bit 0 = purchased, bit 1 = session_id present, bit 2 = last_item present
//! u32 session_seq | u32 events | u32 cart_count | f64 cart_value
//! i64 started_ms  | i64 last_ts_ms | u64 total_events
//! [u64 last_item]                      (only if flag bit 2)
//! [u16 len, bytes] session_id          (only if flag bit 1)
//! u16 len, bytes   model_version
//! u16 n, n × f32   hidden vector
//! u8  m, m × (u32 topic id, i64 next)  fences: per input topic, the offset after the last event applied
//! ```
//!
//! Version 4, for a hidden vector that the int8 block format or f16 holds exactly (every value
//! comes back with the same bits, not all zero: the states of a model trained with
//! `--state-precision int8` or `f16`), is compact; varints are unsigned LEB128, signed ones
//! zigzag-encoded first:
//!
//! ```text
//! u8  version (= 4)
//! u8  flags: bits 0-2 as in version 3, bit 3 = hidden in f16, bit 4 = cart_value present,
//!     bit 5 = hidden in int8 blocks (exactly one of bits 3 and 5 is set)
//! varint session_seq | varint events | varint cart_count
//! [f64 cart_value]                     (only if flag bit 4; else 0)
//! zigzag started_ms | zigzag (last_ts_ms - started_ms) | varint total_events
//! [u64 last_item]                      (only if flag bit 2)
//! [varint len, bytes] session_id       (only if flag bit 1)
//! varint len, bytes   model_version
//! varint n, hidden vector: bit 3: n × f16;
//!     bit 5: per block of 8 values from the start (the last may be shorter), i8 exponent e,
//!     then the block's values as i8 q, each worth q · 2^e (`intentflow_schemas::int8`)
//! u8  m, m × (u32 topic id, zigzag next)
//! ```
//!
//! Every other state is written as version 3 (or 5 or 7, below).
//!
//! Versions 5 and 6 are versions 3 and 4 followed by the user's long-term history
//! ([`UserHistory`]) and the current session's counts ([`SessionCounts`]), written only when
//! they are not all zero, which is every user with an event (a build from before them
//! quarantines such states; a fresh state is still version 3 or 4):
//!
//! ```text
//! varint purchases | varint carts | zigzag previous_gap_ms
//! varint browsed | varint added | varint removed | varint wished | varint priced
//! [f32 price_sum | f32 price_max | f32 price_min]   (only if priced > 0)
//! u32 items sketch | u32 categories sketch
//! ```
//!
//! Versions 7 and 8 are versions 5 and 6 (the history block always written) followed by the
//! user's latest score and what the operator's policy outputs remember of the user
//! ([`OutputMemory`]), written when either is there (every user the operator has scored):
//!
//! ```text
//! u8 flags: bit 0 = latest score present | [f32 latest score]
//! u8 k, k × (u32 output id, u8 flags: bit 0 = a score was published, [f32 last published] (only if bit 0), u8 level)
//! ```
//!
//! Older versions still decode, with explicit migrations: versions 3 to 6 are read with no
//! output memory (each policy output starts as if it had published nothing for the user, so
//! its next score is judged as a first one); versions 3 and 4 are read with an
//! empty history and empty session counts (the user's earlier purchases and carts, and the
//! current session's counts, are unknown and count from the next event on; sessions before are
//! still `session_seq`); version 2 is version 3 without fences
//! (read with none, so its next event is applied whatever its offset); version 1 is
//! version 2 without `last_item` (flag bit 2 never set), read with `last_item = None`, so the
//! next event of such a session is not recognised as repeating the previous item.
//!
//! A newer version than this build knows is an error naming both versions
//! ([`StateError::UnsupportedVersion`]): the operator quarantines such a record rather than guess.

use crate::StateError;
use intentflow_schemas::int8::{int8_codes, int8_scale, INT8_BLOCK};
use intentflow_schemas::{DistinctSketch, SessionCounts, SessionState, UserHistory};

/// Newest encoding version. The first byte of an encoded state is 4 for f16 and int8 states, else 3,
/// plus 2 when the user has a history or session counts (5, 6), plus 4 when the user has a
/// latest score or policy outputs remember it (7, 8: every user the operator has scored).
pub const STATE_ENCODING_VERSION: u8 = 8;
/// What the history block adds to the version byte.
const WITH_HISTORY: u8 = 2;
/// What the history and output blocks add to the version byte.
const WITH_OUTPUTS: u8 = 4;
/// Oldest version [`UserState::decode`] still reads.
const OLDEST_READABLE_VERSION: u8 = 1;
/// First bytes above this are not taken for a future version but for garbage.
const PLAUSIBLE_VERSIONS: u8 = 32;

/// Everything the operator remembers about one user.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserState {
    /// Session counters and times.
    pub session: SessionState,
    /// The model's recurrent state after the user's latest event (a GRU's hidden vector, an
    /// LSTM's hidden vector and memory; empty for a new user).
    pub hidden: Vec<f32>,
    /// Version of the model that produced `hidden`.
    pub model_version: String,
    /// Per input topic of the user's partition, the offset after the last event applied to this
    /// state. An event below its topic's fence is already in the state and is not applied again,
    /// whatever the partition's recorded offset says (see `docs/state.md`).
    pub fences: Vec<Fence>,
    /// What each policy output (an `[[output]]` whose policy is not `every`) remembers of the
    /// user: the score it last published and the level it is at. Kept with the state so a
    /// policy decides the same live, after a crash and in a replay.
    pub outputs: Vec<OutputMemory>,
    /// The score of the user's latest applied event (what `/v1/users/{id}/intent` answers).
    pub last_score: Option<f32>,
}

/// What an output remembers of one user between events.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EmitMemory {
    /// The score it last published for the user, if any.
    pub last_published: Option<f32>,
    /// The user's level under the output's policy: inside (1) or outside (0) for a threshold,
    /// the segment for segments; 0 otherwise.
    pub level: u8,
}

/// One output's [`EmitMemory`] of a user.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutputMemory {
    /// The output, as [`topic_id`] of its topic.
    pub output: u32,
    /// What it remembers.
    pub memory: EmitMemory,
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

    /// What output `output` (a [`topic_id`]) remembers of this user; nothing published yet if
    /// it has no memory.
    pub fn output_memory(&self, output: u32) -> EmitMemory {
        self.outputs.iter().find(|m| m.output == output).map_or_else(EmitMemory::default, |m| m.memory)
    }

    /// Sets what output `output` remembers of this user.
    pub fn remember(&mut self, output: u32, memory: EmitMemory) {
        match self.outputs.iter_mut().find(|m| m.output == output) {
            Some(m) => m.memory = memory,
            None => self.outputs.push(OutputMemory { output, memory }),
        }
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
        self.utf8(n)
    }
    fn utf8(&mut self, n: usize) -> Result<String, StateError> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|e| StateError::Corrupt(e.to_string()))
    }
    /// An unsigned LEB128 varint of at most 10 bytes.
    fn varint(&mut self) -> Result<u64, StateError> {
        let mut value = 0u64;
        for i in 0..10 {
            let [b] = self.array()?;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(StateError::Corrupt("a varint longer than 10 bytes".into()))
    }
    fn varint_u32(&mut self) -> Result<u32, StateError> {
        u32::try_from(self.varint()?).map_err(|_| StateError::Corrupt("a 32-bit field over 2^32".into()))
    }
    fn zigzag(&mut self) -> Result<i64, StateError> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }
    fn f32(&mut self) -> Result<f32, StateError> {
        Ok(f32::from_le_bytes(self.array()?))
    }
    /// The end of every version: `session` completed with the history block when the version
    /// has one (5 to 8), the output block (7 and 8), and no bytes after them.
    fn finish(mut self, mut session: SessionState, version: u8) -> Result<(SessionState, Option<f32>, Vec<OutputMemory>), StateError> {
        if version >= 3 + WITH_HISTORY {
            (session.history, session.counts) = self.history()?;
        }
        let (last_score, outputs) = if version >= 3 + WITH_OUTPUTS { self.outputs()? } else { (None, Vec::new()) };
        if !self.bytes.is_empty() {
            return Err(StateError::Corrupt(format!("{} trailing bytes", self.bytes.len())));
        }
        Ok((session, last_score, outputs))
    }

    /// The latest score and output block of versions 7 and 8.
    fn outputs(&mut self) -> Result<(Option<f32>, Vec<OutputMemory>), StateError> {
        let [flags] = self.array()?;
        let last_score = if flags & 1 != 0 { Some(self.f32()?) } else { None };
        let [k] = self.array()?;
        let mut outputs = Vec::with_capacity(usize::from(k));
        for _ in 0..k {
            let output = self.u32()?;
            let [flags] = self.array()?;
            let last_published = if flags & 1 != 0 { Some(self.f32()?) } else { None };
            let [level] = self.array()?;
            outputs.push(OutputMemory { output, memory: EmitMemory { last_published, level } });
        }
        Ok((last_score, outputs))
    }

    /// The history block of versions 5 and 6.
    fn history(&mut self) -> Result<(UserHistory, SessionCounts), StateError> {
        let history = UserHistory { purchases: self.varint_u32()?, carts: self.varint_u32()?, previous_gap_ms: self.zigzag()? };
        let mut c = SessionCounts {
            browsed: self.varint_u32()?,
            added: self.varint_u32()?,
            removed: self.varint_u32()?,
            wished: self.varint_u32()?,
            priced: self.varint_u32()?,
            ..SessionCounts::default()
        };
        if c.priced > 0 {
            (c.price_sum, c.price_max, c.price_min) = (self.f32()?, self.f32()?, self.f32()?);
        }
        (c.items, c.categories) = (DistinctSketch(self.u32()?), DistinctSketch(self.u32()?));
        Ok((history, c))
    }
    /// `n` hidden values in the int8 block format: per block, its exponent, then its integers.
    fn int8_hidden(&mut self, n: usize) -> Result<Vec<f32>, StateError> {
        let mut hidden = Vec::with_capacity(n);
        while hidden.len() < n {
            let len = (n - hidden.len()).min(INT8_BLOCK);
            let [e] = self.array()?;
            let e = e as i8;
            let scale = int8_scale(e).ok_or_else(|| StateError::Corrupt(format!("int8 block exponent {e} outside the format")))?;
            hidden.extend(self.take(len)?.iter().map(|q| f32::from(*q as i8) * scale));
        }
        Ok(hidden)
    }

    fn varint_str(&mut self) -> Result<String, StateError> {
        let n = self.varint()?;
        if n > u64::from(u16::MAX) {
            return Err(StateError::Corrupt(format!("a {n}-byte string")));
        }
        self.utf8(n as usize)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_zigzag(out: &mut Vec<u8>, v: i64) {
    put_varint(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// Appends the history block of versions 5 to 8 and the latest score and output block of 7 and
/// 8, and returns what they add to the version byte (nothing for an empty history, empty counts,
/// no latest score and no output memory, which are not written).
fn put_tail(out: &mut Vec<u8>, state: &UserState) -> u8 {
    let scored = state.last_score.is_some() || !state.outputs.is_empty();
    let added = put_history(out, &state.session, scored);
    if !scored {
        return added;
    }
    out.push(u8::from(state.last_score.is_some()));
    if let Some(score) = state.last_score {
        out.extend_from_slice(&score.to_le_bytes());
    }
    // Outputs of one operator are few (the operator takes at most 255); more cannot be kept.
    debug_assert!(state.outputs.len() <= usize::from(u8::MAX), "more than 255 output memories");
    let outputs = &state.outputs[..state.outputs.len().min(u8::MAX as usize)];
    out.push(outputs.len() as u8);
    for m in outputs {
        out.extend_from_slice(&m.output.to_le_bytes());
        out.push(u8::from(m.memory.last_published.is_some()));
        if let Some(score) = m.memory.last_published {
            out.extend_from_slice(&score.to_le_bytes());
        }
        out.push(m.memory.level);
    }
    WITH_OUTPUTS
}

/// Appends the history block; an empty one only when `always`. Returns what it adds to the
/// version byte.
fn put_history(out: &mut Vec<u8>, s: &SessionState, always: bool) -> u8 {
    let (h, c) = (&s.history, &s.counts);
    if !always && *h == UserHistory::default() && *c == SessionCounts::default() {
        return 0;
    }
    put_varint(out, u64::from(h.purchases));
    put_varint(out, u64::from(h.carts));
    put_zigzag(out, h.previous_gap_ms);
    for n in [c.browsed, c.added, c.removed, c.wished, c.priced] {
        put_varint(out, u64::from(n));
    }
    if c.priced > 0 {
        for v in [c.price_sum, c.price_max, c.price_min] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out.extend_from_slice(&c.items.0.to_le_bytes());
    out.extend_from_slice(&c.categories.0.to_le_bytes());
    WITH_HISTORY
}

/// Compact flag: the hidden vector is in f16.
const FLAG_F16: u8 = 1 << 3;
/// Compact flag: the hidden vector is in the int8 block format.
const FLAG_INT8: u8 = 1 << 5;

/// Appends `hidden` in f16 and returns true when f16 gives back every value's exact bits;
/// else appends nothing and returns false. Each value is converted once.
fn put_f16_hidden(out: &mut Vec<u8>, hidden: &[f32]) -> bool {
    let start = out.len();
    for h in hidden {
        let half = half::f16::from_f32(*h);
        if half.to_f32().to_bits() != h.to_bits() {
            out.truncate(start);
            return false;
        }
        out.extend_from_slice(&half.to_le_bytes());
    }
    true
}

/// Appends `hidden` in the int8 block format (per block of [`INT8_BLOCK`], its exponent, then
/// its integers) and returns true when every block is exactly in it (the states of a model
/// trained with `--state-precision int8`); else appends nothing and returns false.
fn put_int8_hidden(out: &mut Vec<u8>, hidden: &[f32]) -> bool {
    let start = out.len();
    let mut codes = [0i8; INT8_BLOCK];
    for block in hidden.chunks(INT8_BLOCK) {
        let codes = &mut codes[..block.len()];
        let Some(e) = int8_codes(block, codes) else {
            out.truncate(start);
            return false;
        };
        out.push(e as u8);
        out.extend(codes.iter().map(|q| *q as u8));
    }
    true
}

fn put_varint_str(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Ids are limited to 256 bytes by the decoder and model versions are short; cut defensively.
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl UserState {
    /// Encodes this state: version 4 when the hidden vector goes in int8 blocks or f16, else the same bytes as
    /// version 3; 6 and 5 when the user has a history; 8 and 7 when the user has a latest score
    /// or outputs remember it.
    pub fn encode(&self) -> Vec<u8> {
        if let Some(compact) = self.encode_compact() {
            return compact;
        }
        let s = &self.session;
        let mut out = Vec::with_capacity(64 + self.hidden.len() * 4 + self.model_version.len());
        // Without int8 or f16 the record is what version 3 wrote (then 5 with a history block).
        out.push(3);
        out.push(self.base_flags());
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
        // Input topics of one partition are few; more than 255 cannot be fenced and are dropped.
        let fences = &self.fences[..self.fences.len().min(u8::MAX as usize)];
        out.push(fences.len() as u8);
        for f in fences {
            out.extend_from_slice(&f.topic.to_le_bytes());
            out.extend_from_slice(&f.next.to_le_bytes());
        }
        out[0] += put_tail(&mut out, self);
        out
    }

    /// The flags both versions begin with: purchased, session id present, last item present.
    fn base_flags(&self) -> u8 {
        let s = &self.session;
        u8::from(s.purchased) | (u8::from(s.session_id.is_some()) << 1) | (u8::from(s.last_item.is_some()) << 2)
    }

    /// Version 4: the hidden vector in int8 blocks or f16, counters and times as varints.
    /// `None` unless one of them gives back every value's exact bits (int8 tried first: a byte a
    /// value), and for an all-zero vector (any model's fresh state, written as version 3, which
    /// older builds read).
    fn encode_compact(&self) -> Option<Vec<u8>> {
        let s = &self.session;
        let mut out = Vec::with_capacity(32 + self.hidden.len() * 2 + self.model_version.len());
        out.push(4);
        let cart_value = s.cart_value.to_bits() != 0;
        out.push(self.base_flags() | (u8::from(cart_value) << 4));
        put_varint(&mut out, u64::from(s.session_seq));
        put_varint(&mut out, u64::from(s.events));
        put_varint(&mut out, u64::from(s.cart_count));
        if cart_value {
            out.extend_from_slice(&s.cart_value.to_le_bytes());
        }
        put_zigzag(&mut out, s.started_ms);
        put_zigzag(&mut out, s.last_ts_ms.wrapping_sub(s.started_ms));
        put_varint(&mut out, s.total_events);
        if let Some(item) = s.last_item {
            out.extend_from_slice(&item.to_le_bytes());
        }
        if let Some(id) = &s.session_id {
            put_varint_str(&mut out, id);
        }
        put_varint_str(&mut out, &self.model_version);
        if self.hidden.iter().all(|h| *h == 0.0) {
            return None;
        }
        put_varint(&mut out, self.hidden.len() as u64);
        if put_int8_hidden(&mut out, &self.hidden) {
            out[1] |= FLAG_INT8;
        } else if put_f16_hidden(&mut out, &self.hidden) {
            out[1] |= FLAG_F16;
        } else {
            return None;
        }
        let fences = &self.fences[..self.fences.len().min(u8::MAX as usize)];
        out.push(fences.len() as u8);
        for f in fences {
            out.extend_from_slice(&f.topic.to_le_bytes());
            put_zigzag(&mut out, f.next);
        }
        out[0] += put_tail(&mut out, self);
        Some(out)
    }

    /// Reads version 4, 6 or 8 after its version byte.
    fn decode_compact(mut r: Reader<'_>, version: u8) -> Result<UserState, StateError> {
        let [flags] = r.array()?;
        if (flags & FLAG_F16 != 0) == (flags & FLAG_INT8 != 0) {
            return Err(StateError::Corrupt("a version-4 state without one of its f16 and int8 flags".into()));
        }
        let session_seq = r.varint_u32()?;
        let events = r.varint_u32()?;
        let cart_count = r.varint_u32()?;
        let cart_value = if flags & 16 != 0 { f64::from_le_bytes(r.array()?) } else { 0.0 };
        let started_ms = r.zigzag()?;
        let last_ts_ms = started_ms.wrapping_add(r.zigzag()?);
        let total_events = r.varint()?;
        let last_item = if flags & 4 != 0 { Some(u64::from_le_bytes(r.array()?)) } else { None };
        let session_id = if flags & 2 != 0 { Some(r.varint_str()?) } else { None };
        let model_version = r.varint_str()?;
        let n = usize::try_from(r.varint()?).ok().filter(|n| *n <= usize::from(u16::MAX)).ok_or_else(|| StateError::Corrupt("a hidden vector over 65,535 values".into()))?;
        let hidden = if flags & FLAG_F16 != 0 { r.take(n * 2)?.chunks_exact(2).map(|c| half::f16::from_le_bytes(c.try_into().expect("2 bytes")).to_f32()).collect() } else { r.int8_hidden(n)? };
        let [m] = r.array()?;
        let mut fences = Vec::with_capacity(usize::from(m));
        for _ in 0..m {
            fences.push(Fence { topic: r.u32()?, next: r.zigzag()? });
        }
        let session = SessionState {
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
            ..SessionState::default()
        };
        let (session, last_score, outputs) = r.finish(session, version)?;
        Ok(UserState { session, hidden, model_version, fences, outputs, last_score })
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
        // Versions 4, 6 and 8 are the compact layout (2 is an old fixed-width one).
        if version >= 4 && version % 2 == 0 {
            return UserState::decode_compact(r, version);
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
        let mut fences = Vec::new();
        if version >= 3 {
            let [m] = r.array()?;
            for _ in 0..m {
                fences.push(Fence { topic: r.u32()?, next: r.i64()? });
            }
        }
        let session = SessionState {
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
            ..SessionState::default()
        };
        let (session, last_score, outputs) = r.finish(session, version)?;
        Ok(UserState { session, hidden, model_version, fences, outputs, last_score })
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
            rounding in 0u8..3,
            outputs in proptest::collection::vec((any::<u32>(), proptest::option::of(0.0f32..1.0), any::<u8>()), 0..3),
            last_score in proptest::option::of(0.0f32..1.0),
            history in proptest::option::of((any::<u32>(), any::<u32>(), any::<i64>())),
            counts in proptest::option::of((proptest::collection::vec(0u32..1000, 5), proptest::collection::vec(0.0f32..1e6, 3), any::<u32>(), any::<u32>())),
        ) {
            // A third of the cases hold f16 values, a third int8 blocks (what models with f16 or
            // int8 states store).
            let mut hidden = hidden;
            match rounding {
                0 => hidden.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
                1 => intentflow_schemas::int8::round_int8(&mut hidden),
                _ => {}
            }
            let nonzero = hidden.iter().any(|v| *v != 0.0);
            let in_int8 = nonzero && hidden.chunks(INT8_BLOCK).all(|b| int8_codes(b, &mut [0; INT8_BLOCK][..b.len()]).is_some());
            let exact = in_int8 || nonzero && hidden.iter().all(|v| half::f16::from_f32(*v).to_f32().to_bits() == v.to_bits());
            let state = UserState {
                session: SessionState { session_id: sid, session_seq: seq, events, cart_count: cart, cart_value: value,
                    started_ms: started, last_ts_ms: last, purchased, total_events: total, last_item,
                    history: history.map_or_else(UserHistory::default, |(purchases, carts, previous_gap_ms)| UserHistory { purchases, carts, previous_gap_ms }),
                    counts: counts.map_or_else(SessionCounts::default, |(n, p, items, categories)| SessionCounts {
                        browsed: n[0], added: n[1], removed: n[2], wished: n[3], priced: n[4],
                        // Prices are stored only when some event had one.
                        price_sum: if n[4] > 0 { p[0] } else { 0.0 }, price_max: if n[4] > 0 { p[1] } else { 0.0 }, price_min: if n[4] > 0 { p[2] } else { 0.0 },
                        items: DistinctSketch(items), categories: DistinctSketch(categories),
                    }) },
                hidden,
                model_version: version,
                fences: fences.into_iter().map(|(topic, next)| Fence { topic, next }).collect(),
                outputs: outputs.into_iter().map(|(output, last_published, level)| OutputMemory { output, memory: EmitMemory { last_published, level } }).collect(),
                last_score,
            };
            let bytes = state.encode();
            // The compact version 4 exactly when int8 blocks or f16 keep every value's bits; 2 more with a
            // history, 4 more with a latest score or output memory (which write the history block too).
            let with_history = state.session.history != UserHistory::default() || state.session.counts != SessionCounts::default();
            let added = if state.last_score.is_some() || !state.outputs.is_empty() { 4 } else if with_history { 2 } else { 0 };
            prop_assert_eq!(bytes[0], if exact { 4 } else { 3 } + added);
            // Int8 blocks whenever they hold the vector (f16 may too).
            prop_assert_eq!(exact && bytes[1] & FLAG_INT8 != 0, in_int8);
            prop_assert!(rounding != 1 || !nonzero || in_int8);
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
    fn a_history_adds_its_block_and_older_versions_read_without_one() {
        let mut state = UserState { hidden: vec![0.1, 0.2], model_version: "gru-x".into(), ..Default::default() };
        let v3 = state.encode();
        state.session.history = UserHistory { purchases: 2, carts: 5, previous_gap_ms: 3_600_000 };
        let v5 = state.encode();
        // Version 5 is version 3 and the history block: 1 + 1 + 4 bytes of history varints, 5
        // bytes of zero counts (no prices) and the two 4-byte sketches.
        assert_eq!((v3[0], v5[0], v5.len() - v3.len()), (3, 5, 6 + 5 + 8));
        assert_eq!(&v5[1..v3.len()], &v3[1..]);
        assert_eq!(UserState::decode(&v5).unwrap(), state);
        // A state written before histories existed (version 3) reads with an empty one.
        assert_eq!(UserState::decode(&v3).unwrap().session.history, UserHistory::default());
        state.hidden = vec![0.5, -0.25];
        let v6 = state.encode();
        assert_eq!(v6[0], 6);
        assert_eq!(UserState::decode(&v6).unwrap(), state);
        // Session counts alone also take the block, prices only when there are some.
        state.session.history = UserHistory::default();
        state.session.counts = SessionCounts { browsed: 3, priced: 2, price_sum: 7.5, price_max: 5.0, price_min: 2.5, items: DistinctSketch(6), ..Default::default() };
        let with_prices = state.encode();
        let v4 = UserState { session: SessionState::default(), ..state.clone() }.encode();
        // 3 bytes of zero history, 5 of counts, 12 of prices, 8 of sketches.
        assert_eq!((v4[0], with_prices[0], with_prices.len() - v4.len()), (4, 6, 3 + 5 + 12 + 8));
        assert_eq!(UserState::decode(&with_prices).unwrap(), state);
        assert!(matches!(UserState::decode(&v6[..v6.len() - 1]), Err(StateError::Corrupt(_))), "a cut history is corrupt");
    }

    #[test]
    fn output_memory_adds_its_block_and_older_versions_read_without_one() {
        let mut state = UserState { hidden: vec![0.5, -0.25], model_version: "gru-x".into(), ..Default::default() };
        let v4 = state.encode();
        let alerts = topic_id("alerts");
        assert_eq!(state.output_memory(alerts), EmitMemory::default(), "nothing published yet");
        state.remember(alerts, EmitMemory { last_published: Some(0.625), level: 1 });
        state.remember(topic_id("segments"), EmitMemory { last_published: None, level: 0 });
        let v8 = state.encode();
        // The empty history block (3 + 5 + 8 bytes), no latest score (1), then 1 + (4 + 1 + 4 + 1) + (4 + 1 + 1).
        assert_eq!((v4[0], v8[0], v8.len() - v4.len()), (4, 8, 16 + 1 + 1 + 10 + 6));
        assert_eq!(&v8[1..v4.len()], &v4[1..]);
        let read = UserState::decode(&v8).unwrap();
        assert_eq!(read, state);
        assert_eq!(read.output_memory(alerts), EmitMemory { last_published: Some(0.625), level: 1 });
        state.remember(alerts, EmitMemory { last_published: Some(0.25), level: 0 });
        assert_eq!(state.outputs.len(), 2, "remembering again replaces");
        // In f32 (version 7), with a history.
        state.hidden = vec![0.1, 0.2];
        state.session.history = UserHistory { purchases: 1, carts: 2, previous_gap_ms: 60_000 };
        let v7 = state.encode();
        assert_eq!(v7[0], 7);
        assert_eq!(UserState::decode(&v7).unwrap(), state);
        assert!(matches!(UserState::decode(&v7[..v7.len() - 1]), Err(StateError::Corrupt(_))), "a cut output block is corrupt");
        // The latest score alone also takes the block: 1 + 4 + 1 bytes after the history.
        let scored = UserState { outputs: vec![], last_score: Some(0.5), ..state.clone() };
        let bytes = scored.encode();
        assert_eq!((bytes[0], bytes.len() - UserState { last_score: None, ..scored.clone() }.encode().len()), (7, 6));
        assert_eq!(UserState::decode(&bytes).unwrap(), scored);
        // Written before outputs had memory: read with none.
        assert_eq!(UserState::decode(&UserState { outputs: vec![], last_score: None, ..state.clone() }.encode()).unwrap().outputs, []);
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
    fn a_typical_f16_state_takes_about_half_the_bytes() {
        let mut state = UserState { hidden: vec![0.0; 40], model_version: "gru-519253fe015e".into(), ..Default::default() };
        state.hidden.iter_mut().enumerate().for_each(|(i, h)| *h = half::f16::from_f32(i as f32 / 50.0 - 0.4).to_f32());
        state.session = SessionState {
            session_id: None,
            session_seq: 3,
            events: 7,
            cart_count: 0,
            cart_value: 0.0,
            started_ms: 1_569_888_000_000,
            last_ts_ms: 1_569_888_312_000,
            purchased: false,
            total_events: 31,
            last_item: Some(0x1234_5678_9abc_def0),
            counts: SessionCounts::default(),
            history: UserHistory::default(),
        };
        state.mark_applied(topic_id("events"), 1_234_567);
        let v4 = state.encode();
        let v3 = UserState { hidden: vec![0.1; 40], ..state.clone() }.encode();
        // Version 4: 2 + 3 counters + 6 + 3 times + 1 total + 8 item + 17 version + 1 + 80 hidden
        // + 1 + 4 + 4 fence = 130 bytes; version 3 holds the same in 247.
        assert_eq!((v4[0], v4.len(), v3.len()), (4, 130, 247));
        assert_eq!(UserState::decode(&v4).unwrap(), state);
    }

    #[test]
    fn an_int8_state_takes_a_byte_a_value_and_one_a_block() {
        let mut state = UserState { hidden: (0..40).map(|i| i as f32 / 50.0 - 0.4).collect(), model_version: "gru-519253fe015e".into(), ..Default::default() };
        intentflow_schemas::int8::round_int8(&mut state.hidden);
        state.session.last_item = Some(7);
        let bytes = state.encode();
        let f16 = UserState { hidden: state.hidden.iter().map(|v| half::f16::from_f32(*v + 1e-3).to_f32()).collect(), ..state.clone() }.encode();
        // The hidden vector: 5 exponents and 40 integers against 80 bytes of f16.
        assert_eq!((bytes[0], bytes[1] & (FLAG_INT8 | FLAG_F16), f16[1] & (FLAG_INT8 | FLAG_F16)), (4, FLAG_INT8, FLAG_F16));
        assert_eq!(f16.len() - bytes.len(), 80 - 45);
        assert_eq!(UserState::decode(&bytes).unwrap(), state);
        // An exponent the format never writes is corruption, not a value.
        // The first exponent: 45 bytes of hidden vector before the fence count.
        let at = bytes.len() - 1 - 45;
        let mut bad = bytes.clone();
        bad[at] = 121;
        assert!(matches!(UserState::decode(&bad), Err(StateError::Corrupt(m)) if m.contains("exponent 121")));
        // Neither flag, or both, is corruption.
        for flags in [bytes[1] & !FLAG_INT8, bytes[1] | FLAG_F16] {
            let mut bad = bytes.clone();
            bad[1] = flags;
            assert!(matches!(UserState::decode(&bad), Err(StateError::Corrupt(_))));
        }
    }

    #[test]
    fn reads_version_3_with_its_hidden_vector_in_f32() {
        // A version-3 record (what this build writes for vectors f16 cannot hold), its two
        // hidden floats then replaced by values f16 can hold (int8 blocks cannot: 2^-12 is no
        // multiple of 0.5's scale, 2^-7): still read as f32, and written back as version 4.
        let mut v3 = UserState { hidden: vec![0.1, 0.2], model_version: "gru-x".into(), ..Default::default() }.encode();
        assert_eq!(v3[0], 3);
        let at = v3.len() - 1 - 8;
        v3[at..at + 4].copy_from_slice(&0.5f32.to_le_bytes());
        v3[at + 4..at + 8].copy_from_slice(&(-0.000_244_140_63f32).to_le_bytes());
        let state = UserState::decode(&v3).unwrap();
        assert_eq!(state.hidden, [0.5, -0.000_244_140_63]);
        let v4 = state.encode();
        assert_eq!((v4[0], v4[1] & 8), (4, 8));
        assert_eq!(UserState::decode(&v4).unwrap(), state);
    }

    #[test]
    fn rejects_unknown_version_and_truncation() {
        let mut bytes = UserState { hidden: vec![0.5; 4], ..Default::default() }.encode();
        assert!(matches!(UserState::decode(&bytes[..bytes.len() - 1]), Err(StateError::Corrupt(_))));
        bytes[0] = 9;
        let err = UserState::decode(&bytes).unwrap_err();
        assert!(matches!(err, StateError::UnsupportedVersion { found: 9, supported: 8 }));
        assert!(err.to_string().contains("version 9") && err.to_string().contains("1..=8"), "{err}");
    }
}
