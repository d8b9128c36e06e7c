//! An in-process cache of the states this process wrote last, in front of RocksDB.
//!
//! A user who clicks again within a session is read back shortly after the batch that wrote
//! them. Without the cache that read walks the memtables, the bloom filters and a data block of
//! RocksDB; with it, it is a hash lookup. The cache holds encoded states (the bytes RocksDB
//! holds), so a hit is decoded exactly as a read from RocksDB would be.
//!
//! Eviction is generational, an approximation of LRU without per-entry bookkeeping: writes go
//! to the young generation; when it holds half the budget it becomes the old one and the
//! previous old one is dropped. A lookup checks both.
//!
//! The cache is filled only by the store's own commits, never by reads, and every other write
//! to a user key (restores, resets, partition drops) removes the keys it touches, all under one
//! lock with the RocksDB write: so the cache never holds anything but the latest value of a key.

use foldhash::fast::RandomState;
use std::collections::HashMap;

type Map = HashMap<Box<[u8]>, Vec<u8>, RandomState>;

/// Bookkeeping bytes counted per entry on top of key and value (hash table slot, two boxes).
const ENTRY_OVERHEAD: usize = 64;

/// Encoded states by store key, within a byte budget.
#[derive(Debug, Default)]
pub(crate) struct HotStates {
    young: Map,
    old: Map,
    young_bytes: usize,
    old_bytes: usize,
    capacity: usize,
}

fn size(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

impl HotStates {
    /// A cache of at most `capacity` bytes (0 turns it off).
    pub(crate) fn new(capacity: usize) -> HotStates {
        HotStates { capacity, ..HotStates::default() }
    }

    /// The budget in bytes.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The latest value written under `key`, if still cached.
    pub(crate) fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.young.get(key).or_else(|| self.old.get(key)).map(Vec::as_slice)
    }

    /// Records that `key` now holds `value`. A key already cached keeps its allocations.
    pub(crate) fn put(&mut self, key: &[u8], value: &[u8]) {
        if self.capacity == 0 {
            return;
        }
        if let Some(v) = self.young.get_mut(key) {
            self.young_bytes = self.young_bytes - v.len() + value.len();
            v.clear();
            v.extend_from_slice(value);
        } else {
            let (k, mut v) = match self.old.remove_entry(key) {
                Some((k, v)) => {
                    self.old_bytes -= size(&k, &v);
                    (k, v)
                }
                None => (Box::from(key), Vec::new()),
            };
            v.clear();
            v.extend_from_slice(value);
            self.young_bytes += size(&k, &v);
            self.young.insert(k, v);
        }
        if self.young_bytes > self.capacity / 2 {
            // Freed here, on the thread that allocated it, so the allocator reuses the memory
            // for the next generation (freed elsewhere, it lingers and the process grows).
            self.old = std::mem::take(&mut self.young);
            self.old_bytes = std::mem::take(&mut self.young_bytes);
        }
    }

    /// Forgets `key`.
    pub(crate) fn remove(&mut self, key: &[u8]) {
        if let Some(v) = self.young.remove(key) {
            self.young_bytes -= size(key, &v);
        }
        if let Some(v) = self.old.remove(key) {
            self.old_bytes -= size(key, &v);
        }
    }

    /// Forgets every key that starts with `prefix`.
    pub(crate) fn remove_prefix(&mut self, prefix: &[u8]) {
        for (map, bytes) in [(&mut self.young, &mut self.young_bytes), (&mut self.old, &mut self.old_bytes)] {
            map.retain(|k, v| {
                let keep = !k.starts_with(prefix);
                if !keep {
                    *bytes -= size(k, v);
                }
                keep
            });
        }
    }

    /// Bytes held, by the same count as the budget.
    pub(crate) fn bytes(&self) -> usize {
        self.young_bytes + self.old_bytes
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the operations, a cached key holds the last value written to it, a removed
        /// key is not cached, and the budget holds.
        #[test]
        fn holds_only_latest_values_within_budget(
            ops in proptest::collection::vec((0u8..3, 0u8..40, proptest::collection::vec(any::<u8>(), 0..50)), 0..400),
            capacity in 0usize..4_000,
        ) {
            let mut cache = HotStates::new(capacity);
            let mut truth: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
            for (op, k, v) in ops {
                let key = vec![b'u', k % 4, k];
                match op {
                    0 | 1 => {
                        cache.put(&key, &v);
                        truth.insert(key, v);
                    }
                    _ if k % 7 == 0 => {
                        cache.remove_prefix(&key[..2]);
                        truth.retain(|t, _| !t.starts_with(&key[..2]));
                    }
                    _ => {
                        cache.remove(&key);
                        truth.remove(&key);
                    }
                }
                prop_assert!(cache.bytes() <= capacity + 50 + 3 + ENTRY_OVERHEAD, "{} > {capacity}", cache.bytes());
                for k in 0..40u8 {
                    let key = [b'u', k % 4, k];
                    if let Some(v) = cache.get(&key) {
                        prop_assert_eq!(Some(v), truth.get(key.as_slice()).map(Vec::as_slice));
                    }
                }
            }
            let counted: usize = cache.young.iter().chain(cache.old.iter()).map(|(k, v)| size(k, v)).sum();
            prop_assert_eq!(counted, cache.bytes());
        }
    }

    #[test]
    fn recent_writes_stay_and_old_ones_go() {
        let mut cache = HotStates::new(10 * (3 + 10 + ENTRY_OVERHEAD));
        for k in 0..100u8 {
            cache.put(&[b'u', 0, k], &[k; 10]);
        }
        assert_eq!(cache.get(&[b'u', 0, 99]), Some([99u8; 10].as_slice()));
        assert_eq!(cache.get(&[b'u', 0, 0]), None);
        assert!(cache.len() <= 10);
        assert_eq!(HotStates::new(0).get(&[1]), None);
    }
}
