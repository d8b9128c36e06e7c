//! Users' hidden states resident where the model steps (a GPU), with RocksDB behind them.
//!
//! A [`SlotTable`] says which user holds which slot of the model's [`ResidentStates`] slab and
//! evicts the least recently used user when a new one needs a slot. The slab is a cache, never
//! the record: every batch still reads each user's state from the [`crate::StateStore`] (or the
//! staged writes of the open transaction over it; for the session counters and fences), and the
//! durable state is what the caller writes there. A slot
//! is trusted only when its *stamp* — a hash of the hidden vector it was last settled with —
//! equals the stamp of the vector the store holds now. Anything that changed the stored state
//! behind the slab (a transaction that aborted after the step, a restore from the changelog, a
//! reset, an erasure, another instance's writes while the partition was away) shows up as a
//! different stamp, and the slot is loaded again from the store. A batch that fails half way
//! leaves its users' slots unstamped, so they are loaded again too.
//!
//! Per batch, then, hidden vectors cross to the device only for users that are new to the slab
//! or stale; each wave sends the event features and slot numbers and gets the logits back; and
//! the touched users' vectors come back once at the end of the batch, to be written to the store
//! by the caller (write-through: eviction never has to write anything).

use intentflow_model::{ModelError, ResidentRow, ResidentStates};
use std::collections::HashMap;
use std::sync::Arc;

/// No slot: the end of the recency list.
const NIL: u32 = u32::MAX;

/// A user's slot was asked for while every slot holds a user of the current batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("all {capacity} resident slots hold users of this batch")]
pub struct SlotsFull {
    /// Slots in the table.
    pub capacity: usize,
}

/// One admitted user: its slot, and whether the slot must be loaded from the store first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// The slot.
    pub slot: u32,
    /// The slot does not hold the stored vector (a new user, an evicted one, or a stale stamp).
    pub load: bool,
}

#[derive(Debug)]
struct Entry {
    key: Option<Arc<[u8]>>,
    /// Hash of the vector the slot holds, if known.
    stamp: Option<u64>,
    /// Last batch that admitted it: such entries are not evicted within that batch.
    batch: u64,
    newer: u32,
    older: u32,
}

/// Which key holds which of `capacity` slots, least recently used out first.
#[derive(Debug)]
pub struct SlotTable {
    index: HashMap<Arc<[u8]>, u32>,
    entries: Vec<Entry>,
    /// Most recently admitted.
    newest: u32,
    /// Least recently admitted: the next to go.
    oldest: u32,
    /// Slots never used yet, or forgotten.
    free: Vec<u32>,
    batch: u64,
    evictions: u64,
}

impl SlotTable {
    /// A table of `capacity` empty slots.
    pub fn new(capacity: usize) -> SlotTable {
        let capacity = capacity.min(NIL as usize);
        SlotTable {
            index: HashMap::with_capacity(capacity.min(1 << 20)),
            entries: (0..capacity).map(|_| Entry { key: None, stamp: None, batch: 0, newer: NIL, older: NIL }).collect(),
            newest: NIL,
            oldest: NIL,
            free: (0..capacity as u32).rev().collect(),
            batch: 0,
            evictions: 0,
        }
    }

    /// Slots in the table.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Keys holding a slot.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no key holds a slot.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Keys evicted to make room since the table was made.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Starts a batch: keys admitted from now on are not evicted until the next one.
    pub fn begin_batch(&mut self) {
        self.batch += 1;
    }

    /// The slot for `key`, whose stored vector hashes to `stamp`: its own if it has one (then
    /// loaded only if the stamps differ), else a free one or the least recently used key's.
    /// The slot's stamp is cleared until [`SlotTable::settle`]: the batch is about to change
    /// the vector.
    ///
    /// # Errors
    ///
    /// [`SlotsFull`] when every slot holds a key of the current batch.
    pub fn admit(&mut self, key: &[u8], stamp: u64) -> Result<Admitted, SlotsFull> {
        if let Some(&slot) = self.index.get(key) {
            self.unlink(slot);
            self.link_newest(slot);
            let entry = &mut self.entries[slot as usize];
            entry.batch = self.batch;
            let load = entry.stamp != Some(stamp);
            entry.stamp = None;
            return Ok(Admitted { slot, load });
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                let slot = self.oldest;
                if slot == NIL || self.entries[slot as usize].batch == self.batch {
                    return Err(SlotsFull { capacity: self.capacity() });
                }
                self.unlink(slot);
                if let Some(old) = self.entries[slot as usize].key.take() {
                    self.index.remove(&*old);
                }
                self.evictions += 1;
                slot
            }
        };
        // One allocation, shared by the index and the entry.
        let owned: Arc<[u8]> = key.into();
        self.index.insert(owned.clone(), slot);
        let batch = self.batch;
        let entry = &mut self.entries[slot as usize];
        (entry.key, entry.stamp, entry.batch) = (Some(owned), None, batch);
        self.link_newest(slot);
        Ok(Admitted { slot, load: true })
    }

    /// Records that `slot` now holds a vector hashing to `stamp`.
    pub fn settle(&mut self, slot: u32, stamp: u64) {
        if let Some(entry) = self.entries.get_mut(slot as usize) {
            if entry.key.is_some() {
                entry.stamp = Some(stamp);
            }
        }
    }

    fn unlink(&mut self, slot: u32) {
        let (newer, older) = (self.entries[slot as usize].newer, self.entries[slot as usize].older);
        match newer {
            NIL => self.newest = older,
            n => self.entries[n as usize].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.entries[o as usize].newer = newer,
        }
        self.entries[slot as usize].newer = NIL;
        self.entries[slot as usize].older = NIL;
    }

    fn link_newest(&mut self, slot: u32) {
        self.entries[slot as usize].older = self.newest;
        self.entries[slot as usize].newer = NIL;
        match self.newest {
            NIL => self.oldest = slot,
            n => self.entries[n as usize].newer = slot,
        }
        self.newest = slot;
    }
}

/// A resident slab and its slot table: what [`crate::IntentOperator`] steps users on when its
/// model runs on a GPU.
pub(crate) struct Resident {
    slab: Box<dyn ResidentStates>,
    table: SlotTable,
    key: Vec<u8>,
    loads: Vec<u32>,
    vectors: Vec<f32>,
    rows: Vec<ResidentRow>,
    logits: Vec<f32>,
}

/// What the resident slab did for one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResidentBatch {
    /// The batch was stepped on the slab (false: it had more users than slots and ran on the
    /// stateless step).
    pub on_device: bool,
    /// Users whose stored vector was loaded into a slot (new to the slab, evicted before, or
    /// stale); the batch's other users were already there.
    pub loaded: usize,
    /// Users evicted to make room.
    pub evicted: u64,
    /// Users holding a slot after the batch.
    pub held: usize,
}

impl Resident {
    /// A table over `slab`'s slots.
    pub(crate) fn new(slab: Box<dyn ResidentStates>) -> Resident {
        let table = SlotTable::new(slab.capacity());
        Resident { slab, table, key: Vec::new(), loads: Vec::new(), vectors: Vec::new(), rows: Vec::new(), logits: Vec::new() }
    }

    /// Gives each of `count` users (input partition, id, stored hidden vector) a slot holding
    /// that vector, loading the ones the slab does not hold; `None`, with the table untouched,
    /// when the batch has more users than there are slots (it then runs on the stateless step).
    pub(crate) fn admit<'a>(&mut self, count: usize, users: impl Iterator<Item = (i32, &'a str, &'a [f32])>, report: &mut ResidentBatch) -> Result<Option<Vec<u32>>, ModelError> {
        // Rows a failed batch left behind must not be stepped with this one.
        self.rows.clear();
        *report = ResidentBatch { held: self.table.len(), ..ResidentBatch::default() };
        if count > self.table.capacity() {
            return Ok(None);
        }
        let evictions = self.table.evictions();
        self.table.begin_batch();
        self.loads.clear();
        self.vectors.clear();
        let mut slots = Vec::new();
        for (partition, user, hidden) in users {
            user_key(&mut self.key, partition, user);
            let Ok(admitted) = self.table.admit(&self.key, stamp(hidden)) else { return Ok(None) };
            if admitted.load {
                self.loads.push(admitted.slot);
                self.vectors.extend_from_slice(hidden);
            }
            slots.push(admitted.slot);
        }
        self.slab.load(&self.loads, &self.vectors)?;
        *report = ResidentBatch { on_device: true, loaded: self.loads.len(), evicted: self.table.evictions() - evictions, held: self.table.len() };
        Ok(Some(slots))
    }

    /// The rows of the next step, to be filled by the caller.
    pub(crate) fn rows(&mut self) -> &mut Vec<ResidentRow> {
        &mut self.rows
    }

    /// Steps the rows filled since the last step (and forgets them, whatever the outcome);
    /// returns their logits.
    pub(crate) fn step(&mut self) -> Result<&[f32], ModelError> {
        let stepped = self.slab.step(&self.rows, &mut self.logits);
        self.rows.clear();
        stepped?;
        Ok(&self.logits)
    }

    /// Reads `slots`' vectors back into `out` (`slots.len() × H`) and stamps the slots with
    /// them: from now on they are trusted while the store holds the same vectors.
    pub(crate) fn settle(&mut self, slots: &[u32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        self.slab.read(slots, out)?;
        let h = self.slab.state_dim();
        for (&slot, v) in slots.iter().zip(out.chunks_exact(h)) {
            self.table.settle(slot, stamp(v));
        }
        Ok(())
    }
}

/// The stamp of a hidden vector: a 64-bit FNV-1a hash of its length and bits.
pub fn stamp(hidden: &[f32]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ hidden.len() as u64;
    for v in hidden {
        h = (h ^ u64::from(v.to_bits())).wrapping_mul(PRIME);
    }
    h
}

/// The table key of a user of an input partition.
pub fn user_key(buf: &mut Vec<u8>, partition: i32, user: &str) {
    buf.clear();
    buf.extend_from_slice(&partition.to_be_bytes());
    buf.extend_from_slice(user.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_key_keeps_its_slot_and_is_loaded_only_when_its_stamp_changes() {
        let mut t = SlotTable::new(4);
        t.begin_batch();
        let a = t.admit(b"a", 1).unwrap();
        assert!(a.load);
        t.settle(a.slot, 7);
        t.begin_batch();
        assert_eq!(t.admit(b"a", 7).unwrap(), Admitted { slot: a.slot, load: false });
        // Not settled after that batch (it failed): loaded again even with the same stamp.
        t.begin_batch();
        assert_eq!(t.admit(b"a", 7).unwrap(), Admitted { slot: a.slot, load: true });
        t.settle(a.slot, 9);
        // The store holds another vector than the slot (an aborted transaction, a restore).
        t.begin_batch();
        assert_eq!(t.admit(b"a", 7).unwrap(), Admitted { slot: a.slot, load: true });
    }

    #[test]
    fn the_least_recently_used_key_is_evicted_but_never_one_of_the_current_batch() {
        let mut t = SlotTable::new(3);
        t.begin_batch();
        for k in [b"a", b"b", b"c"] {
            let s = t.admit(k, 0).unwrap().slot;
            t.settle(s, 0);
        }
        t.begin_batch();
        let a = t.admit(b"a", 0).unwrap();
        assert!(!a.load);
        // "b" is now the least recently used: "d" takes its slot.
        let d = t.admit(b"d", 0).unwrap();
        assert!(d.load);
        assert_eq!(t.evictions(), 1);
        t.settle(d.slot, 0);
        let b = t.admit(b"b", 0).unwrap();
        assert!(b.load, "an evicted key comes back through the store");
        assert_ne!(b.slot, a.slot);
        assert_ne!(b.slot, d.slot);
        // a, d and b are all in this batch: nothing can go.
        assert_eq!(t.admit(b"e", 0), Err(SlotsFull { capacity: 3 }));
        t.begin_batch();
        assert!(t.admit(b"e", 0).is_ok());
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn stamps_tell_vectors_apart() {
        assert_ne!(stamp(&[0.0, 1.0]), stamp(&[1.0, 0.0]));
        assert_ne!(stamp(&[0.0]), stamp(&[-0.0]));
        assert_ne!(stamp(&[]), stamp(&[0.0]));
        assert_eq!(stamp(&[0.5, 2.0]), stamp(&[0.5, 2.0]));
    }

    proptest! {
        /// Against a model (a recency-ordered list): same slots, same evictions, no two keys
        /// in one slot, and a kept slot is loaded exactly when its stamp changed.
        #[test]
        fn the_table_behaves_like_a_recency_list(capacity in 1usize..6, ops in proptest::collection::vec((0u8..9, 0u64..3, any::<bool>(), any::<bool>()), 1..200)) {
            let mut t = SlotTable::new(capacity);
            // (key, slot, stamp) from least to most recently used.
            let mut model: Vec<(u8, u32, Option<u64>)> = Vec::new();
            let mut batch_keys: Vec<u8> = Vec::new();
            t.begin_batch();
            for (key, stamp, settle, new_batch) in ops {
                if new_batch {
                    t.begin_batch();
                    batch_keys.clear();
                }
                let got = t.admit(&[key], stamp);
                let known = model.iter().position(|e| e.0 == key);
                match known {
                    Some(i) => {
                        let (k, slot, old) = model.remove(i);
                        prop_assert_eq!(got, Ok(Admitted { slot, load: old != Some(stamp) }));
                        model.push((k, slot, None));
                    }
                    None if model.len() < capacity => {
                        let a = got.unwrap();
                        prop_assert!(a.load);
                        prop_assert!(model.iter().all(|e| e.1 != a.slot));
                        model.push((key, a.slot, None));
                    }
                    None if batch_keys.contains(&model[0].0) => {
                        prop_assert_eq!(got, Err(SlotsFull { capacity }));
                        continue;
                    }
                    None => {
                        let (_, slot, _) = model.remove(0);
                        prop_assert_eq!(got, Ok(Admitted { slot, load: true }));
                        model.push((key, slot, None));
                    }
                }
                if !batch_keys.contains(&key) {
                    batch_keys.push(key);
                }
                if settle {
                    let last = model.last_mut().unwrap();
                    t.settle(last.1, stamp);
                    last.2 = Some(stamp);
                }
                prop_assert_eq!(t.len(), model.len());
            }
        }
    }
}
