//! An in-process cache of the states this process wrote last, in front of RocksDB.
//!
//! A user who clicks again within a session is read back shortly after the batch that wrote
//! them. Without the cache that read walks the memtables, the bloom filters and a data block of
//! RocksDB; with it, it is a hash lookup. The cache holds encoded states (the bytes RocksDB
//! holds), so a hit is decoded exactly as a read from RocksDB would be.
//!
//! The cache is filled only by the store's own commits, never by reads, and every other write
//! to a user key (restores, resets, partition drops) removes the keys it touches: so the cache
//! never holds anything but the latest value of a key. Each shard has two locks. Its *writer*
//! lock ([`HotCache::write_for`]) is held by a writer of its keys across its RocksDB write and
//! its cache changes, so writers of one shard take turns. Its cache lock is held briefly by
//! readers and by writers' changes. A commit holds only the writer lock across its RocksDB
//! write and takes the cache lock to put the new values after it: readers (the next batch,
//! while the last one is written on another thread) never wait for RocksDB's write, and find
//! a key's old value until the write is done, never an older value after a newer one.
//!
//! It is sharded by input partition, so that a restore writing one partition's changelog chunk
//! does not hold up the batch loop's reads and writes of the others.
//! Eviction is generational per shard, an approximation of LRU without per-entry bookkeeping:
//! writes go to the shard's young generation; whenever the whole cache is over its budget, the
//! shard being written turns its young generation old and frees its previous old one (and the
//! other shards do, if that is not enough). A lookup checks both generations.

use foldhash::fast::RandomState;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Shards; partition `p` lives in shard `p mod SHARDS`.
const SHARDS: usize = 16;

/// Bookkeeping bytes counted per entry on top of key and value (hash table slot, two boxes).
const ENTRY_OVERHEAD: usize = 64;

/// One generation: store key → encoded state.
type Map = HashMap<Box<[u8]>, Vec<u8>, RandomState>;

fn size(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

/// One shard's two generations and their bytes.
#[derive(Debug, Default)]
struct Shard {
    young: Map,
    old: Map,
    bytes: usize,
}

impl Shard {
    fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.young.get(key).or_else(|| self.old.get(key)).map(Vec::as_slice)
    }

    /// Stores `value` under `key` in the young generation; returns the bytes added (negative
    /// when the value shrank). A key already cached keeps its allocations.
    fn put(&mut self, key: &[u8], value: &[u8]) -> isize {
        let before = self.bytes;
        if let Some(v) = self.young.get_mut(key) {
            self.bytes = self.bytes - v.len() + value.len();
            v.clear();
            v.extend_from_slice(value);
        } else {
            let (k, mut v) = match self.old.remove_entry(key) {
                Some((k, v)) => {
                    self.bytes -= size(&k, &v);
                    (k, v)
                }
                None => (Box::from(key), Vec::new()),
            };
            v.clear();
            v.extend_from_slice(value);
            self.bytes += size(&k, &v);
            self.young.insert(k, v);
        }
        self.bytes as isize - before as isize
    }

    /// Turns the young generation old; returns the previous old one and the bytes it held.
    fn turn(&mut self) -> (Map, usize) {
        let freed: usize = self.old.iter().map(|(k, v)| size(k, v)).sum();
        self.bytes -= freed;
        (std::mem::replace(&mut self.old, std::mem::take(&mut self.young)), freed)
    }

    /// Forgets the keys `keep` refuses; returns the bytes freed.
    fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) -> usize {
        let before = self.bytes;
        for map in [&mut self.young, &mut self.old] {
            map.retain(|k, v| {
                let kept = keep(k);
                if !kept {
                    self.bytes -= size(k, v);
                }
                kept
            });
        }
        before - self.bytes
    }

    /// Forgets `key`; returns the bytes freed.
    fn remove(&mut self, key: &[u8]) -> usize {
        let mut freed = 0;
        for map in [&mut self.young, &mut self.old] {
            if let Some(v) = map.remove(key) {
                freed += size(key, &v);
            }
        }
        self.bytes -= freed;
        freed
    }
}

/// The shard of an input partition.
fn shard_of(partition: i32) -> usize {
    partition.rem_euclid(SHARDS as i32) as usize
}

/// The shard of a user key (`u` + partition, big-endian + user id).
fn shard_of_key(key: &[u8]) -> usize {
    key.get(1..5).map_or(0, |p| shard_of(i32::from_be_bytes(p.try_into().expect("4 bytes"))))
}

/// Recently written states by store key, within a byte budget over all shards.
#[derive(Debug)]
pub(crate) struct HotCache {
    shards: Vec<Mutex<Shard>>,
    /// Per shard, the writer lock: held by a writer of the shard's keys across its RocksDB
    /// write and its changes to the shard; readers never take it.
    writers: Vec<Mutex<()>>,
    /// Bytes held by all shards, by [`size`]'s count.
    bytes: AtomicUsize,
    capacity: usize,
}

impl HotCache {
    /// A cache of about `capacity` bytes (0 turns it off).
    pub(crate) fn new(capacity: usize) -> HotCache {
        HotCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            writers: (0..SHARDS).map(|_| Mutex::new(())).collect(),
            bytes: AtomicUsize::new(0),
            capacity,
        }
    }

    /// Locks one shard. A shard whose lock was poisoned (a panic during a change) may be
    /// stale: it is emptied before use.
    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        match self.shards[shard].lock() {
            Ok(guard) => guard,
            Err(poisoned) => {
                let mut guard = poisoned.into_inner();
                self.empty(&mut guard);
                self.shards[shard].clear_poison();
                guard
            }
        }
    }

    fn empty(&self, shard: &mut Shard) {
        self.bytes.fetch_sub(shard.bytes, Ordering::Relaxed);
        *shard = Shard::default();
    }

    fn locked(&self, wanted: [bool; SHARDS]) -> Locked<'_> {
        // Always in shard order, so that holders of several shards cannot deadlock.
        Locked { cache: self, guards: (0..SHARDS).map(|i| wanted[i].then(|| self.lock(i))).collect(), dropped: Vec::new() }
    }

    fn writing(&self, wanted: [bool; SHARDS]) -> Writing<'_> {
        // In shard order, and before any cache lock, so that writers cannot deadlock (they take
        // turns). A writer lock poisoned by a panic between a RocksDB write and the cache's
        // update leaves the shard's cache possibly stale: it is emptied.
        let turns = (0..SHARDS)
            .filter(|&i| wanted[i])
            .map(|i| {
                self.writers[i].lock().unwrap_or_else(|poisoned| {
                    self.empty(&mut self.lock(i));
                    self.writers[i].clear_poison();
                    poisoned.into_inner()
                })
            })
            .collect();
        Writing { cache: self, wanted, _turns: turns }
    }

    /// Takes the writer locks of the shards of `keys`' partitions.
    pub(crate) fn write_for<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) -> Writing<'_> {
        let mut wanted = [false; SHARDS];
        keys.into_iter().for_each(|k| wanted[shard_of_key(k)] = true);
        self.writing(wanted)
    }

    /// Takes the writer lock of the shard of one partition.
    pub(crate) fn write_partition(&self, partition: i32) -> Writing<'_> {
        self.writing(std::array::from_fn(|i| i == shard_of(partition)))
    }

    /// Takes every writer lock.
    pub(crate) fn write_all(&self) -> Writing<'_> {
        self.writing([true; SHARDS])
    }

    /// Calls `found(i, value)` for each of `keys` that is cached, one shard at a time.
    pub(crate) fn lookup(&self, keys: &[Vec<u8>], mut found: impl FnMut(usize, &[u8])) {
        if self.capacity == 0 {
            return;
        }
        let mut by_shard: [Vec<usize>; SHARDS] = Default::default();
        keys.iter().enumerate().for_each(|(i, k)| by_shard[shard_of_key(k)].push(i));
        for (shard, indices) in by_shard.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
            let hot = self.lock(shard);
            for &i in indices {
                if let Some(v) = hot.get(&keys[i]) {
                    found(i, v);
                }
            }
        }
    }

    /// Entries and bytes (by the budget's count).
    pub(crate) fn totals(&self) -> (usize, usize) {
        let entries = (0..SHARDS).map(|i| self.lock(i)).map(|s| s.young.len() + s.old.len()).sum();
        (entries, self.bytes.load(Ordering::Relaxed))
    }
}

/// Shards whose writer locks are held: the RocksDB write of their keys and the cache's changes
/// happen under it. Writer locks are always taken before cache locks.
pub(crate) struct Writing<'c> {
    cache: &'c HotCache,
    wanted: [bool; SHARDS],
    _turns: Vec<MutexGuard<'c, ()>>,
}

impl Writing<'_> {
    /// Locks the cache of the shards held, for changes (briefly: readers wait for it). The
    /// writer locks outlive it.
    pub(crate) fn cache(&self) -> Locked<'_> {
        self.cache.locked(self.wanted)
    }
}

/// Shards held locked: changes go to the shard of their key, which must be among them.
pub(crate) struct Locked<'c> {
    cache: &'c HotCache,
    guards: Vec<Option<MutexGuard<'c, Shard>>>,
    /// Generations turned out while locked, freed after the locks are released.
    dropped: Vec<Map>,
}

impl Locked<'_> {
    fn shard(&mut self, key: &[u8]) -> &mut Shard {
        self.guards[shard_of_key(key)].as_mut().expect("the shard of every key changed is locked")
    }

    /// Records that `key` now holds `value`.
    pub(crate) fn put(&mut self, key: &[u8], value: &[u8]) {
        if self.cache.capacity == 0 {
            return;
        }
        let added = self.shard(key).put(key, value);
        let total = if added >= 0 {
            self.cache.bytes.fetch_add(added as usize, Ordering::Relaxed) + added as usize
        } else {
            self.cache.bytes.fetch_sub(added.unsigned_abs(), Ordering::Relaxed) - added.unsigned_abs()
        };
        if total <= self.cache.capacity {
            return;
        }
        // Over budget: the written shard turns first; if that is not enough (the bytes sit in
        // other shards, say of partitions no longer written), the others turn too, those held
        // here or free right now (never waited for: no lock order to break), twice at most.
        let own = shard_of_key(key);
        let order = std::iter::once(own).chain((0..SHARDS).filter(|&i| i != own));
        for shard in order.clone().chain(order) {
            if self.cache.bytes.load(Ordering::Relaxed) <= self.cache.capacity {
                break;
            }
            let (old, freed) = match &mut self.guards[shard] {
                Some(held) => held.turn(),
                None => match self.cache.shards[shard].try_lock() {
                    Ok(mut other) => other.turn(),
                    Err(_) => continue,
                },
            };
            self.cache.bytes.fetch_sub(freed, Ordering::Relaxed);
            self.dropped.push(old);
        }
    }

    /// Forgets `key`.
    pub(crate) fn remove(&mut self, key: &[u8]) {
        let freed = self.shard(key).remove(key);
        self.cache.bytes.fetch_sub(freed, Ordering::Relaxed);
    }

    /// Forgets every key of `partition`.
    pub(crate) fn remove_partition(&mut self, partition: i32) {
        let shard = self.guards[shard_of(partition)].as_mut().expect("the partition's shard is locked");
        let freed = shard.retain(|k| k.get(1..5) != Some(partition.to_be_bytes().as_slice()));
        self.cache.bytes.fetch_sub(freed, Ordering::Relaxed);
    }

    /// Forgets everything in the locked shards.
    pub(crate) fn clear(&mut self) {
        for shard in self.guards.iter_mut().flatten() {
            self.cache.bytes.fetch_sub(shard.bytes, Ordering::Relaxed);
            self.dropped.push(std::mem::take(&mut shard.young));
            self.dropped.push(std::mem::take(&mut shard.old));
            shard.bytes = 0;
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // Unlock first, then free the turned-out generations on this thread (so the allocator
        // reuses their memory) without holding up the shards' other users.
        self.guards.clear();
        self.dropped.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(partition: i32, user: u8) -> Vec<u8> {
        let mut k = vec![b'u'];
        k.extend_from_slice(&partition.to_be_bytes());
        k.push(user);
        k
    }

    proptest! {
        /// Whatever the operations, a cached key holds the last value written to it, a removed
        /// key is not cached, and the budget holds (within one entry).
        #[test]
        fn holds_only_latest_values_within_budget(
            ops in proptest::collection::vec((0u8..4, 0i32..20, 0u8..10, proptest::collection::vec(any::<u8>(), 0..50)), 0..400),
            capacity in 0usize..4_000,
        ) {
            let cache = HotCache::new(capacity);
            let mut truth: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
            for (op, partition, user, v) in ops {
                let k = key(partition, user);
                match op {
                    0 | 1 => {
                        cache.write_for([k.as_slice()]).cache().put(&k, &v);
                        if capacity > 0 {
                            truth.insert(k, v);
                        }
                    }
                    2 if user == 0 => {
                        let prefix = key(partition, 0)[..5].to_vec();
                        cache.write_partition(partition).cache().remove_partition(partition);
                        truth.retain(|t, _| !t.starts_with(&prefix));
                    }
                    2 => {
                        cache.write_partition(partition).cache().remove(&k);
                        truth.remove(&k);
                    }
                    _ if user == 9 => {
                        cache.write_all().cache().clear();
                        truth.clear();
                    }
                    _ => {}
                }
                let (_, bytes) = cache.totals();
                prop_assert!(bytes <= capacity + 50 + 6 + ENTRY_OVERHEAD, "{bytes} > {capacity}");
                let counted: usize = (0..SHARDS).map(|i| cache.lock(i)).map(|s| s.young.iter().chain(s.old.iter()).map(|(k, v)| size(k, v)).sum::<usize>()).sum();
                prop_assert_eq!(counted, bytes);
            }
            let keys: Vec<Vec<u8>> = (0..20).flat_map(|p| (0..10).map(move |u| key(p, u))).collect();
            let mut found = 0;
            cache.lookup(&keys, |i, v| {
                assert_eq!(Some(v), truth.get(&keys[i]).map(Vec::as_slice), "key {:?}", keys[i]);
                found += 1;
            });
            prop_assert!(found <= truth.len());
        }
    }

    #[test]
    fn recent_writes_stay_and_old_ones_go() {
        let cache = HotCache::new(10 * (6 + 10 + ENTRY_OVERHEAD));
        for user in 0..100u8 {
            let k = key(3, user);
            cache.write_for([k.as_slice()]).cache().put(&k, &[user; 10]);
        }
        let mut hits = Vec::new();
        let keys: Vec<Vec<u8>> = (0..100).map(|u| key(3, u)).collect();
        cache.lookup(&keys, |i, v| hits.push((i, v.to_vec())));
        assert!(hits.contains(&(99, vec![99; 10])), "the last write is cached");
        assert!(!hits.iter().any(|(i, _)| *i == 0), "the first write is gone");
        assert!(hits.len() <= 11);
        let off = HotCache::new(0);
        off.write_for([keys[0].as_slice()]).cache().put(&keys[0], &[1]);
        assert_eq!(off.totals(), (0, 0));
    }
}
