//! The RocksDB-backed store of user states and the input offsets they reflect.

use crate::{StateError, UserState};
use rocksdb::{BlockBasedOptions, Cache, DBCompressionType, Direction, IteratorMode, Options, WriteBatch, DB};
use std::path::Path;

const USER_PREFIX: u8 = b'u';
const OFFSET_PREFIX: u8 = b'o';

/// Tuning of the embedded store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Size of the LRU block cache in bytes (default 64 MiB).
    pub block_cache_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { block_cache_bytes: 64 << 20 }
    }
}

/// User states and recorded input offsets in one RocksDB database.
///
/// Keys: `u` + partition (i32, big-endian) + user id for states; `o` + topic + `0x00` +
/// partition for the next input offset to process.
pub struct StateStore {
    db: DB,
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
        Ok(StateStore { db: DB::open(&opts, path)? })
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

    /// Atomically writes user states and the next input offsets they reflect.
    ///
    /// # Errors
    ///
    /// RocksDB write errors; nothing is written then.
    pub fn commit<'a>(
        &self,
        states: impl IntoIterator<Item = (i32, &'a str, &'a UserState)>,
        offsets: impl IntoIterator<Item = (&'a str, i32, i64)>,
    ) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        for (partition, user, state) in states {
            batch.put(user_key(partition, user), state.encode());
        }
        for (topic, partition, next_offset) in offsets {
            batch.put(offset_key(topic, partition), next_offset.to_le_bytes());
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// The next input offset recorded for a topic-partition, if any.
    ///
    /// # Errors
    ///
    /// RocksDB read errors and malformed offset records.
    pub fn offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StateError> {
        self.db
            .get(offset_key(topic, partition))?
            .map(|b| {
                <[u8; 8]>::try_from(b.as_slice())
                    .map(i64::from_le_bytes)
                    .map_err(|_| StateError::Corrupt("offset record is not 8 bytes".into()))
            })
            .transpose()
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
        let dir = tempfile::tempdir().unwrap();
        let mut a = UserState { hidden: vec![0.25, -0.5], model_version: "m1".into(), ..Default::default() };
        a.session.total_events = 3;
        let b = UserState { hidden: vec![1.0], ..Default::default() };
        {
            let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
            store.commit([(0, "alice", &a), (3, "bob", &b)], [("events", 0, 42), ("events", 3, 7)]).unwrap();
        }
        let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
        let got = store.get_many([(0, "alice"), (3, "bob"), (1, "alice")]).unwrap();
        assert_eq!(got, vec![Some(a.clone()), Some(b.clone()), None]);
        assert_eq!(store.offset("events", 0).unwrap(), Some(42));
        assert_eq!(store.offset("events", 3).unwrap(), Some(7));
        assert_eq!(store.offset("events", 1).unwrap(), None);
        let users = store.users().unwrap();
        assert_eq!(users, vec![(0, "alice".to_string(), a), (3, "bob".to_string(), b)]);
    }
}
