//! Writes of an open Kafka transaction: visible to the batches that follow, written to RocksDB
//! only once the transaction has committed.
//!
//! Under exactly-once one transaction spans every batch of a commit interval. Batch N+1 must
//! see the states batch N built, but RocksDB may only hold what the changelog holds committed
//! (a crash must leave the store a prefix of the committed changelog). So a batch's states go
//! to a [`Staged`] overlay; reads go through a [`StagedView`] (the overlay first, then the
//! store); a commit writes the overlay with [`StateStore::commit_staged`] in one atomic batch;
//! an abort drops it.

use crate::store::{user_key_into, Loaded};
use crate::{StateError, StateStore};
use foldhash::fast::RandomState;
use std::collections::{BTreeMap, HashMap};

/// Where a batch reads its users' states from: the store itself, or the store under the
/// writes of an open transaction.
pub trait StateRead {
    /// Reads the states of many users at once (see [`StateStore::get_many`]).
    ///
    /// # Errors
    ///
    /// RocksDB read errors.
    fn get_many<'a>(&self, keys: impl IntoIterator<Item = (i32, &'a str)>) -> Result<Vec<Loaded>, StateError>;
}

impl StateRead for StateStore {
    fn get_many<'a>(&self, keys: impl IntoIterator<Item = (i32, &'a str)>) -> Result<Vec<Loaded>, StateError> {
        StateStore::get_many(self, keys)
    }
}

/// Uncommitted writes: the latest encoded state per user (or its deletion), the next input
/// offset per topic-partition and the next changelog offset per partition.
#[derive(Debug, Default)]
pub struct Staged {
    /// Store key → encoded state (the latest of the open transaction); empty for a deleted
    /// user (an encoded state is never empty).
    users: HashMap<Vec<u8>, Vec<u8>, RandomState>,
    /// Bytes of the staged states' keys and values.
    bytes: usize,
    offsets: BTreeMap<(String, i32), i64>,
    changelog: BTreeMap<i32, i64>,
    /// Scratch for the store key of the user being staged.
    key: Vec<u8>,
}

impl Staged {
    /// Stages a user's encoded state; a later state of the same user replaces it. A user
    /// staged before costs no allocation.
    pub fn put_user(&mut self, partition: i32, user: &str, state: Vec<u8>) {
        user_key_into(partition, user, &mut self.key);
        match self.users.get_mut(self.key.as_slice()) {
            Some(v) => {
                self.bytes = self.bytes - v.len() + state.len();
                *v = state;
            }
            None => {
                self.bytes += self.key.len() + state.len();
                self.users.insert(self.key.clone(), state);
            }
        }
    }

    /// Stages the deletion of a user's state (an erasure, an expiry): reads through a
    /// [`StagedView`] find no state, and the commit deletes it from RocksDB. A later
    /// [`Staged::put_user`] of the same user replaces the deletion.
    pub fn delete_user(&mut self, partition: i32, user: &str) {
        self.put_user(partition, user, Vec::new());
    }

    /// Whether a user is staged, and if so whether as deleted (`Some(true)`).
    pub fn staged_deleted(&self, partition: i32, user: &str) -> Option<bool> {
        let mut key = Vec::with_capacity(5 + user.len());
        user_key_into(partition, user, &mut key);
        self.users.get(&key).map(Vec::is_empty)
    }

    /// Stages the next input offset of a topic-partition (the highest staged wins).
    pub fn put_offset(&mut self, topic: String, partition: i32, next: i64) {
        let o = self.offsets.entry((topic, partition)).or_insert(next);
        *o = (*o).max(next);
    }

    /// Stages the next changelog offset of a partition (the highest staged wins).
    pub fn put_changelog(&mut self, partition: i32, next: i64) {
        let o = self.changelog.entry(partition).or_insert(next);
        *o = (*o).max(next);
    }

    /// The staged next input offsets per topic-partition.
    pub fn offsets(&self) -> &BTreeMap<(String, i32), i64> {
        &self.offsets
    }

    /// The staged states as (partition, user, encoded state), in no particular order; a deleted
    /// user's encoded state is empty.
    pub fn user_states(&self) -> impl Iterator<Item = (i32, &str, &[u8])> {
        self.users.iter().map(|(k, v)| {
            let (partition, user) = crate::store::split_user_key(k).expect("staged keys are user keys");
            (partition, user, v.as_slice())
        })
    }

    /// Users staged.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Bytes of the staged states (keys and values).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.offsets.is_empty() && self.changelog.is_empty()
    }

    /// Drops everything staged (an aborted transaction), keeping the allocations.
    pub fn clear(&mut self) {
        self.users.clear();
        self.bytes = 0;
        self.offsets.clear();
        self.changelog.clear();
    }
}

/// The store as an open transaction sees it: its staged writes over the store, and under them
/// the writes of an earlier unit whose commit is still under way, if any.
#[derive(Clone, Copy)]
pub struct StagedView<'a> {
    /// The committed states.
    pub store: &'a StateStore,
    /// The open transaction's writes.
    pub staged: &'a Staged,
    /// An earlier unit's writes that RocksDB does not hold yet (its commit is in flight): read
    /// where `staged` has nothing for a user.
    pub committing: Option<&'a Staged>,
}

impl StagedView<'_> {
    /// A user's staged encoded state: the open unit's, else the committing one's.
    fn staged_bytes(&self, key: &[u8]) -> Option<&[u8]> {
        self.staged.users.get(key).or_else(|| self.committing.and_then(|c| c.users.get(key))).map(Vec::as_slice)
    }
}

impl StateRead for StagedView<'_> {
    fn get_many<'a>(&self, keys: impl IntoIterator<Item = (i32, &'a str)>) -> Result<Vec<Loaded>, StateError> {
        let keys: Vec<(i32, &str)> = keys.into_iter().collect();
        if self.staged.users.is_empty() && self.committing.is_none_or(|c| c.users.is_empty()) {
            return self.store.get_many(keys);
        }
        let mut key = Vec::with_capacity(64);
        let mut found: Vec<Option<Loaded>> = Vec::with_capacity(keys.len());
        let mut misses = Vec::new();
        for &(partition, user) in &keys {
            user_key_into(partition, user, &mut key);
            match self.staged_bytes(&key) {
                Some(bytes) if bytes.is_empty() => found.push(Some(Loaded::Absent)),
                Some(bytes) => found.push(Some(crate::store::decoded(bytes))),
                None => {
                    found.push(None);
                    misses.push((partition, user));
                }
            }
        }
        let mut read = self.store.get_many(misses)?.into_iter();
        Ok(found.into_iter().map(|f| f.unwrap_or_else(|| read.next().expect("one read per miss"))).collect())
    }
}

impl StateStore {
    /// Writes what an open transaction staged (deleting the users staged as deleted), and the
    /// changelog offsets `staged` holds, in one atomic batch (see [`StateStore::commit_encoded`]). The caller clears `staged` after.
    ///
    /// # Errors
    ///
    /// RocksDB write errors; nothing is written then.
    pub fn commit_staged(&self, staged: &Staged) -> Result<(), StateError> {
        self.commit_keyed(
            staged.users.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect(),
            staged.offsets.iter().map(|((t, p), o)| (t.as_str(), *p, *o)),
            staged.changelog.iter().map(|(p, o)| (*p, *o)),
        )
    }
}

/// A write announced with [`StateStore::announce_write`]: done when dropped.
pub struct AnnouncedWrite(std::sync::Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>);

impl Drop for AnnouncedWrite {
    fn drop(&mut self) {
        let (count, done) = &*self.0;
        *count.lock().unwrap_or_else(std::sync::PoisonError::into_inner) -= 1;
        done.notify_all();
    }
}

impl StateStore {
    /// Announces a write that another thread will do (a committed unit written while the next
    /// one is scored): [`StateStore::wait_for_announced_writes`] waits for it until the
    /// returned guard is dropped. A restore that starts after the announcement thus reads the
    /// store after the write, never between.
    pub fn announce_write(&self) -> AnnouncedWrite {
        *self.announced.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        AnnouncedWrite(self.announced.clone())
    }

    /// Waits until every write announced so far is done.
    pub fn wait_for_announced_writes(&self) {
        let (count, done) = &*self.announced;
        let mut n = count.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *n > 0 {
            n = done.wait(n).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{StoreOptions, UserState};

    fn state(events: u32) -> UserState {
        let mut s = UserState::default();
        s.session.events = events;
        s.session.last_ts_ms = i64::from(events);
        s
    }

    fn events(loaded: Vec<Loaded>) -> Vec<Option<u32>> {
        loaded.into_iter().map(|l| l.state().map(|s| s.session.events)).collect()
    }

    #[test]
    fn staged_writes_shadow_the_store_until_committed_and_vanish_when_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
        store.commit([(0, "a", &state(1)), (1, "b", &state(2))], [("in", 0, 10)], [(0, 5)]).unwrap();
        let mut staged = Staged::default();
        staged.put_user(0, "a", state(7).encode());
        staged.put_user(0, "a", state(8).encode());
        staged.put_user(0, "c", state(3).encode());
        staged.put_offset("in".into(), 0, 12);
        staged.put_offset("in".into(), 0, 11);
        staged.put_changelog(0, 9);
        assert_eq!(staged.users(), 2);
        let view = StagedView { store: &store, staged: &staged, committing: None };
        // The same user id on another partition is another key.
        let keys = [(0, "a"), (1, "b"), (0, "c"), (1, "a"), (0, "a")];
        assert_eq!(events(view.get_many(keys).unwrap()), [Some(8), Some(2), Some(3), None, Some(8)]);
        assert_eq!(events(store.get_many(keys).unwrap()), [Some(1), Some(2), None, None, Some(1)], "nothing reaches RocksDB before the commit");

        store.commit_staged(&staged).unwrap();
        assert_eq!(events(store.get_many(keys).unwrap()), [Some(8), Some(2), Some(3), None, Some(8)]);
        assert_eq!(store.offset("in", 0).unwrap(), Some(12));
        assert_eq!(store.changelog_offset(0).unwrap(), Some(9));

        staged.clear();
        assert!(staged.is_empty());
        staged.put_user(1, "b", state(40).encode());
        let view = StagedView { store: &store, staged: &staged, committing: None };
        assert_eq!(events(view.get_many(keys).unwrap()), [Some(8), Some(40), Some(3), None, Some(8)]);
        staged.clear();
        let view = StagedView { store: &store, staged: &staged, committing: None };
        assert_eq!(events(view.get_many(keys).unwrap()), [Some(8), Some(2), Some(3), None, Some(8)], "an aborted transaction's writes are gone");
    }

    #[test]
    fn waiting_for_announced_writes_returns_once_their_guards_are_dropped() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(StateStore::open(dir.path(), StoreOptions::default()).unwrap());
        store.wait_for_announced_writes();
        let announced = store.announce_write();
        let written = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (store, written) = (store.clone(), written.clone());
            std::thread::spawn(move || {
                store.wait_for_announced_writes();
                // After the wait, the announced write is in the store.
                assert!(written.load(Ordering::SeqCst), "the wait returned before the announced write was done");
                assert_eq!(events(store.get_many([(0, "a")]).unwrap()), [Some(1)]);
            })
        };
        let mut staged = Staged::default();
        staged.put_user(0, "a", state(1).encode());
        store.commit_staged(&staged).unwrap();
        written.store(true, Ordering::SeqCst);
        drop(announced);
        waiter.join().unwrap();
    }

    #[test]
    fn a_committing_unit_is_read_under_the_open_one_and_over_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
        store.commit([(0, "a", &state(1)), (0, "b", &state(2)), (0, "c", &state(3))], [], []).unwrap();
        let mut committing = Staged::default();
        committing.put_user(0, "a", state(10).encode());
        committing.delete_user(0, "b");
        committing.put_user(0, "d", state(40).encode());
        let mut open = Staged::default();
        open.put_user(0, "a", state(11).encode());
        open.put_user(0, "b", state(21).encode());
        let keys = [(0, "a"), (0, "b"), (0, "c"), (0, "d"), (0, "e")];
        let view = StagedView { store: &store, staged: &open, committing: Some(&committing) };
        assert_eq!(events(view.get_many(keys).unwrap()), [Some(11), Some(21), Some(3), Some(40), None], "the open unit first, then the committing one, then the store");
        let view = StagedView { store: &store, staged: &Staged::default(), committing: Some(&committing) };
        assert_eq!(events(view.get_many(keys).unwrap()), [Some(10), None, Some(3), Some(40), None], "a deletion in flight hides the stored state");
        // Once RocksDB has the committing unit, the store alone answers as the layers did.
        store.commit_staged(&committing).unwrap();
        let view = StagedView { store: &store, staged: &open, committing: None };
        assert_eq!(events(view.get_many(keys).unwrap()), [Some(11), Some(21), Some(3), Some(40), None]);
    }

    #[test]
    fn a_staged_deletion_hides_the_stored_state_and_deletes_it_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
        store.commit([(0, "a", &state(1)), (0, "b", &state(2))], [], []).unwrap();
        // Read once, so that the hot cache holds it too.
        assert_eq!(events(store.get_many([(0, "a")]).unwrap()), [Some(1)]);
        let mut staged = Staged::default();
        staged.put_user(0, "a", state(5).encode());
        staged.delete_user(0, "a");
        staged.delete_user(0, "c");
        assert_eq!((staged.staged_deleted(0, "a"), staged.staged_deleted(0, "b")), (Some(true), None));
        let keys = [(0, "a"), (0, "b"), (0, "c")];
        let view = StagedView { store: &store, staged: &staged, committing: None };
        assert_eq!(events(view.get_many(keys).unwrap()), [None, Some(2), None]);
        assert_eq!(events(store.get_many(keys).unwrap()), [Some(1), Some(2), None], "nothing deleted before the commit");
        store.commit_staged(&staged).unwrap();
        assert_eq!(events(store.get_many(keys).unwrap()), [None, Some(2), None]);
        assert_eq!(store.users().unwrap().len(), 1);

        // A state staged after a deletion wins.
        staged.clear();
        staged.delete_user(0, "b");
        staged.put_user(0, "b", state(9).encode());
        assert_eq!(staged.staged_deleted(0, "b"), Some(false));
        store.commit_staged(&staged).unwrap();
        assert_eq!(events(store.get_many(keys).unwrap()), [None, Some(9), None]);
    }
}
