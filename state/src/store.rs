//! The RocksDB-backed store of user states and the input offsets they reflect.

use crate::changelog::{decode_offset, ChangelogKey};
use crate::{StateError, UserState};
use rocksdb::{BlockBasedOptions, Cache, DBCompressionType, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use std::path::Path;

const USER_PREFIX: u8 = b'u';
const OFFSET_PREFIX: u8 = b'o';
const CHANGELOG_PREFIX: u8 = b'c';
const MODEL_KEY: &[u8] = b"m";

/// Tuning of the embedded store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Size of the LRU block cache in bytes (default 64 MiB).
    pub block_cache_bytes: usize,
    /// Bulk loading (replays): large memtables, no write-ahead log, L0 compactions deferred
    /// to larger runs. Writes survive only once [`StateStore::flush`] returns (or the store is
    /// closed cleanly), so a crashed bulk load must be started again in a fresh directory.
    pub bulk_load: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { block_cache_bytes: 64 << 20, bulk_load: false }
    }
}

impl StoreOptions {
    /// The options of a bulk load (replay): see [`StoreOptions::bulk_load`].
    pub fn bulk() -> StoreOptions {
        StoreOptions { bulk_load: true, ..StoreOptions::default() }
    }
}

/// User states and recorded input offsets in one RocksDB database.
///
/// Keys: `u` + partition (i32, big-endian) + user id for states; `o` + topic + `0x00` +
/// partition for the next input offset to process; `c` + partition for the next changelog
/// offset the partition's states reflect.
pub struct StateStore {
    db: DB,
    write_options: WriteOptions,
}

fn user_key(partition: i32, user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + user.len());
    k.push(USER_PREFIX);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(user.as_bytes());
    k
}

fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + topic.len());
    k.push(OFFSET_PREFIX);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn changelog_key(partition: i32) -> [u8; 5] {
    let mut k = [CHANGELOG_PREFIX, 0, 0, 0, 0];
    k[1..].copy_from_slice(&partition.to_be_bytes());
    k
}

fn read_i64(bytes: Option<Vec<u8>>, what: &str) -> Result<Option<i64>, StateError> {
    bytes
        .map(|b| <[u8; 8]>::try_from(b.as_slice()).map(i64::from_le_bytes).map_err(|_| StateError::Corrupt(format!("{what} record is not 8 bytes"))))
        .transpose()
}

impl StateStore {
    /// Opens (creating if needed) the store at `path`.
    ///
    /// # Errors
    ///
    /// [`StateError::Rocks`] if RocksDB cannot open the directory, for instance because another
    /// process holds its lock.
    pub fn open(path: impl AsRef<Path>, options: StoreOptions) -> Result<StateStore, StateError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(DBCompressionType::Lz4);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&Cache::new_lru_cache(options.block_cache_bytes));
        table.set_bloom_filter(10.0, false);
        table.set_cache_index_and_filter_blocks(true);
        opts.set_block_based_table_factory(&table);
        let mut write_options = WriteOptions::default();
        if options.bulk_load {
            opts.set_write_buffer_size(256 << 20);
            opts.set_max_write_buffer_number(4);
            opts.set_level_zero_file_num_compaction_trigger(8);
            opts.set_level_zero_slowdown_writes_trigger(32);
            opts.set_level_zero_stop_writes_trigger(64);
            opts.set_max_background_jobs(4);
            write_options.disable_wal(true);
        }
        Ok(StateStore { db: DB::open(&opts, path)?, write_options })
    }

    /// Reads the states of many users at once; `None` where a user has no state yet.
    ///
    /// # Errors
    ///
    /// RocksDB read errors and undecodable records.
    pub fn get_many<'a>(
        &self,
        keys: impl IntoIterator<Item = (i32, &'a str)>,
    ) -> Result<Vec<Option<UserState>>, StateError> {
        let keys: Vec<Vec<u8>> = keys.into_iter().map(|(p, u)| user_key(p, u)).collect();
        self.db
            .multi_get(&keys)
            .into_iter()
            .map(|r| r?.map(|bytes| UserState::decode(&bytes)).transpose())
            .collect()
    }

    /// Atomically writes user states, the next input offsets they reflect and, per partition,
    /// the next changelog offset they reflect (see [`crate::changelog`]).
    ///
    /// # Errors
    ///
    /// RocksDB write errors; nothing is written then.
    pub fn commit<'a>(
        &self,
        states: impl IntoIterator<Item = (i32, &'a str, &'a UserState)>,
        offsets: impl IntoIterator<Item = (&'a str, i32, i64)>,
        changelog: impl IntoIterator<Item = (i32, i64)>,
    ) -> Result<(), StateError> {
        let encoded: Vec<(i32, &str, Vec<u8>)> = states.into_iter().map(|(p, u, s)| (p, u, s.encode())).collect();
        self.commit_encoded(encoded.iter().map(|(p, u, b)| (*p, *u, b.as_slice())), offsets, changelog)
    }

    /// [`StateStore::commit`] with states already encoded by [`UserState::encode`] (the runtime
    /// encodes each state once, for the changelog and for the store).
    ///
    /// # Errors
    ///
    /// RocksDB write errors; nothing is written then.
    pub fn commit_encoded<'s, 'o>(
        &self,
        states: impl IntoIterator<Item = (i32, &'s str, &'s [u8])>,
        offsets: impl IntoIterator<Item = (&'o str, i32, i64)>,
        changelog: impl IntoIterator<Item = (i32, i64)>,
    ) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        for (partition, user, state) in states {
            batch.put(user_key(partition, user), state);
        }
        for (topic, partition, next_offset) in offsets {
            batch.put(offset_key(topic, partition), next_offset.to_le_bytes());
        }
        for (partition, next) in changelog {
            batch.put(changelog_key(partition), next.to_le_bytes());
        }
        self.db.write_opt(batch, &self.write_options)?;
        Ok(())
    }

    /// Persists everything written so far (the memtables) to disk; what a bulk load calls
    /// before it reports success.
    ///
    /// # Errors
    ///
    /// RocksDB flush errors.
    pub fn flush(&self) -> Result<(), StateError> {
        self.db.flush()?;
        Ok(())
    }

    /// Applies changelog records of `partition` (key, value; `None` deletes) and records `next`
    /// as the changelog offset the partition now reflects, in one atomic write. Values are
    /// checked to decode before anything is written.
    ///
    /// # Errors
    ///
    /// [`StateError::Corrupt`] for a record that does not parse (nothing is written then), and
    /// RocksDB write errors.
    pub fn apply_changelog<'a>(
        &self,
        partition: i32,
        records: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
        next: i64,
    ) -> Result<usize, StateError> {
        let mut batch = WriteBatch::default();
        let mut applied = 0;
        for (key, value) in records {
            let key = match ChangelogKey::decode(key)? {
                ChangelogKey::User(user) => user_key(partition, user),
                ChangelogKey::Offset(topic) => offset_key(topic, partition),
            };
            match value {
                Some(v) => {
                    if key[0] == USER_PREFIX {
                        UserState::decode(v)?;
                    } else {
                        decode_offset(v)?;
                    }
                    batch.put(key, v);
                }
                None => batch.delete(key),
            }
            applied += 1;
        }
        batch.put(changelog_key(partition), next.to_le_bytes());
        self.db.write(batch)?;
        Ok(applied)
    }

    /// The next changelog offset the partition's local states reflect, if recorded.
    ///
    /// # Errors
    ///
    /// RocksDB read errors and malformed records.
    pub fn changelog_offset(&self, partition: i32) -> Result<Option<i64>, StateError> {
        read_i64(self.db.get(changelog_key(partition))?, "changelog offset")
    }

    /// The version of the model the stored states were built with, if recorded.
    ///
    /// # Errors
    ///
    /// RocksDB read errors.
    pub fn model_version(&self) -> Result<Option<String>, StateError> {
        Ok(self.db.get(MODEL_KEY)?.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Records the model version the states are (from now on) built with.
    ///
    /// # Errors
    ///
    /// RocksDB write errors.
    pub fn set_model_version(&self, version: &str) -> Result<(), StateError> {
        self.db.put(MODEL_KEY, version.as_bytes())?;
        Ok(())
    }

    /// Drops every user state (all partitions), keeping the offsets: users start from zero.
    ///
    /// # Errors
    ///
    /// RocksDB errors.
    pub fn clear_users(&self) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        batch.delete_range([USER_PREFIX].as_slice(), [USER_PREFIX + 1].as_slice());
        self.db.write(batch)?;
        Ok(())
    }

    /// Drops everything the store holds for `partition`: its users, its input offsets and its
    /// changelog offset (before a rebuild from the changelog).
    ///
    /// # Errors
    ///
    /// RocksDB errors.
    pub fn clear_partition(&self, partition: i32) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        // Partitions are non-negative, so as u32 the next one still sorts right after.
        let end = [[USER_PREFIX].as_slice(), &(partition as u32 + 1).to_be_bytes()].concat();
        batch.delete_range(user_key(partition, ""), end);
        for item in self.db.iterator(IteratorMode::From(&[OFFSET_PREFIX], Direction::Forward)) {
            let (key, _) = item?;
            if key.first() != Some(&OFFSET_PREFIX) {
                break;
            }
            if key.ends_with(&partition.to_be_bytes()) && key.len() >= 6 && key[key.len() - 5] == 0 {
                batch.delete(key);
            }
        }
        batch.delete(changelog_key(partition));
        self.db.write(batch)?;
        Ok(())
    }

    /// The next input offset recorded for a topic-partition, if any.
    ///
    /// # Errors
    ///
    /// RocksDB read errors and malformed offset records.
    pub fn offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StateError> {
        read_i64(self.db.get(offset_key(topic, partition))?, "offset")
    }

    /// Every stored user state as `(partition, user id, state)`, in key order.
    ///
    /// # Errors
    ///
    /// RocksDB read errors and undecodable records.
    pub fn users(&self) -> Result<Vec<(i32, String, UserState)>, StateError> {
        let mut out = Vec::new();
        for item in self.db.iterator(IteratorMode::From(&[USER_PREFIX], Direction::Forward)) {
            let (key, value) = item?;
            if key.first() != Some(&USER_PREFIX) {
                break;
            }
            if key.len() < 5 {
                return Err(StateError::Corrupt("user key shorter than 5 bytes".into()));
            }
            let partition = i32::from_be_bytes(key[1..5].try_into().expect("4 bytes"));
            let user = String::from_utf8_lossy(&key[5..]).into_owned();
            out.push((partition, user, UserState::decode(&value)?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_then_read_back_after_reopen() {
        commit_then_read_back(StoreOptions::default());
    }

    #[test]
    fn a_flushed_bulk_load_reads_back_after_reopen() {
        commit_then_read_back(StoreOptions::bulk());
    }

    fn commit_then_read_back(options: StoreOptions) {
        let dir = tempfile::tempdir().unwrap();
        let mut a = UserState { hidden: vec![0.25, -0.5], model_version: "m1".into(), ..Default::default() };
        a.session.total_events = 3;
        let b = UserState { hidden: vec![1.0], ..Default::default() };
        {
            let store = StateStore::open(dir.path(), options).unwrap();
            store.commit([(0, "alice", &a), (3, "bob", &b)], [("events", 0, 42), ("events", 3, 7)], [(0, 5)]).unwrap();
            store.flush().unwrap();
        }
        let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
        let got = store.get_many([(0, "alice"), (3, "bob"), (1, "alice")]).unwrap();
        assert_eq!(got, vec![Some(a.clone()), Some(b.clone()), None]);
        assert_eq!(store.offset("events", 0).unwrap(), Some(42));
        assert_eq!(store.offset("events", 3).unwrap(), Some(7));
        assert_eq!(store.offset("events", 1).unwrap(), None);
        let users = store.users().unwrap();
        assert_eq!(users, vec![(0, "alice".to_string(), a), (3, "bob".to_string(), b)]);
        assert_eq!((store.changelog_offset(0).unwrap(), store.changelog_offset(3).unwrap()), (Some(5), None));
    }

    #[test]
    fn changelog_records_restore_states_and_offsets_and_a_cleared_partition_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
        let a = UserState { hidden: vec![0.25; 3], model_version: "m".into(), ..Default::default() };
        let b = UserState { hidden: vec![-1.0; 3], model_version: "m".into(), ..Default::default() };
        store.commit([(1, "keep", &a), (2, "other", &b)], [("events", 1, 3), ("events", 2, 9)], [(1, 2)]).unwrap();
        let (ka, kb, ko) = (ChangelogKey::User("alice").encode(), ChangelogKey::User("keep").encode(), ChangelogKey::Offset("events").encode());
        let (va, vb, off) = (a.encode(), b.encode(), crate::changelog::encode_offset(40));
        // Two updates of alice (the later wins), a deletion of keep, the input offset.
        let records: Vec<(&[u8], Option<&[u8]>)> = vec![(&ka, Some(&vb)), (&ka, Some(&va)), (&kb, None), (&ko, Some(&off))];
        assert_eq!(store.apply_changelog(1, records, 17).unwrap(), 4);
        assert_eq!(store.get_many([(1, "alice"), (1, "keep"), (2, "other")]).unwrap(), vec![Some(a.clone()), None, Some(b.clone())]);
        assert_eq!((store.offset("events", 1).unwrap(), store.changelog_offset(1).unwrap()), (Some(40), Some(17)));
        // A record that does not decode is refused and nothing of its batch is written.
        assert!(store.apply_changelog(1, [(ka.as_slice(), Some(b"junk".as_slice()))], 99).is_err());
        assert_eq!(store.changelog_offset(1).unwrap(), Some(17));

        assert_eq!(store.model_version().unwrap(), None);
        store.set_model_version("gru-1").unwrap();
        assert_eq!(store.model_version().unwrap().as_deref(), Some("gru-1"));

        store.clear_partition(1).unwrap();
        assert_eq!(store.get_many([(1, "alice")]).unwrap(), vec![None]);
        assert_eq!((store.offset("events", 1).unwrap(), store.changelog_offset(1).unwrap()), (None, None));
        assert_eq!(store.users().unwrap(), vec![(2, "other".to_string(), b)], "other partitions untouched");
        assert_eq!(store.offset("events", 2).unwrap(), Some(9));
        store.clear_users().unwrap();
        assert!(store.users().unwrap().is_empty());
        assert_eq!(store.offset("events", 2).unwrap(), Some(9), "offsets survive a reset of the users");
    }
}
