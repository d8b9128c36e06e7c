//! The RocksDB-backed store of user states and the input offsets they reflect.
//!
//! Over 400 lines: one type whose methods each own one key space (users, offsets, changelog
//! offsets, model, meta); splitting it by key space would scatter the key layout documented here.

use crate::changelog::{decode_offset, Applied, ChangelogKey, ModelPolicy, Quarantined, RestoreTrack};
use crate::hot::HotCache;
use crate::{StateError, UserState};
use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB, DEFAULT_COLUMN_FAMILY_NAME};
use std::path::Path;

const USER_PREFIX: u8 = b'u';
const OFFSET_PREFIX: u8 = b'o';
const CHANGELOG_PREFIX: u8 = b'c';
const MODEL_KEY: &[u8] = b"m";
/// Keys of small bookkeeping values (see [`StateStore::meta`]), apart from users and offsets.
const META_PREFIX: u8 = b'x';

/// A user's stored state as read back.
#[derive(Debug)]
pub enum Loaded {
    /// No state stored: a new user.
    Absent,
    /// A state that decodes.
    State(UserState),
    /// Stored bytes that do not decode (corrupt, or a newer encoding): the user starts fresh and
    /// the caller quarantines the bytes.
    Invalid {
        /// The stored bytes.
        bytes: Vec<u8>,
        /// Why they do not decode.
        error: StateError,
    },
}

impl Loaded {
    /// The state, if one decoded.
    pub fn state(self) -> Option<UserState> {
        match self {
            Loaded::State(s) => Some(s),
            Loaded::Absent | Loaded::Invalid { .. } => None,
        }
    }
}

/// A stored user state as raw bytes, for moving states without decoding them.
#[derive(Debug, Clone, PartialEq)]
pub struct RawUser {
    /// The store key: pass it back to [`StateStore::users_after`] to continue after this user.
    pub key: Vec<u8>,
    /// Input partition.
    pub partition: i32,
    /// User id.
    pub user: String,
    /// The encoded state.
    pub value: Vec<u8>,
}

/// Tuning of the embedded store.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Size of the LRU block cache in bytes (default 64 MiB, a quarter of 256 MiB).
    pub block_cache_bytes: usize,
    /// Budget of the in-process cache of the states this process wrote last (default 192 MiB;
    /// 0 turns it off): a user read back soon after a write skips RocksDB.
    pub hot_state_bytes: usize,
    /// Bulk loading (replays): large memtables, L0 compactions deferred to larger runs (and,
    /// from [`StoreOptions::bulk`], no write-ahead log). Writes survive only once
    /// [`StateStore::flush`] returns (or the store is closed cleanly), so a crashed bulk load
    /// must be started again in a fresh directory.
    pub bulk_load: bool,
    /// Whether writes go through RocksDB's write-ahead log (the default). Without it a write
    /// is durable once its memtable is flushed (RocksDB flushes full memtables as it goes, and
    /// all of them at [`StateStore::flush`] and on a clean close); a crash loses the writes
    /// after the last flush. Every write of the store then skips the log, so a store reopened
    /// after a crash holds a prefix of its writes, exactly as if the process had died earlier.
    ///
    /// The live operator turns it off, as Kafka Streams does for its RocksDB stores: its
    /// changelog topic is the log, and a store that lost its latest writes catches up from it
    /// (see [`crate::changelog`]). The store's bookkeeping writes
    /// ([`StateStore::set_model_version`], [`StateStore::set_meta`], [`StateStore::clear_users`],
    /// [`StateStore::clear_partition`]) flush at once; anything else that must survive on its own is followed by
    /// [`StateStore::flush`].
    pub write_ahead_log: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions::with_cache_budget(256 << 20)
    }
}

impl StoreOptions {
    /// Live options with one memory budget for states: a quarter for RocksDB's block cache,
    /// three quarters for the cache of recently written states (see
    /// [`StoreOptions::hot_state_bytes`]). Memtables come on top.
    pub fn with_cache_budget(bytes: usize) -> StoreOptions {
        StoreOptions { block_cache_bytes: (bytes / 4).max(1 << 20), hot_state_bytes: bytes - bytes / 4, bulk_load: false, write_ahead_log: true }
    }

    /// These options with writes that skip the write-ahead log (see
    /// [`StoreOptions::write_ahead_log`]): for a store whose changelog topic is its log.
    pub fn changelog_backed(self) -> StoreOptions {
        StoreOptions { write_ahead_log: false, ..self }
    }

    /// The options of a bulk load (replay): see [`StoreOptions::bulk_load`].
    pub fn bulk() -> StoreOptions {
        StoreOptions { bulk_load: true, write_ahead_log: false, ..StoreOptions::default() }
    }
}

/// Monitoring figures of a [`StateStore`] ([`StateStore::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Bytes of its SST files and memtables.
    pub size_bytes: u64,
    /// RocksDB's estimate of its keys (user states, plus a few offset and metadata records).
    pub estimated_keys: u64,
    /// RocksDB's estimate of the bytes compaction has yet to rewrite.
    pub pending_compaction_bytes: u64,
    /// Block cache hits since the store was opened.
    pub block_cache_hits: u64,
    /// Block cache misses since the store was opened.
    pub block_cache_misses: u64,
}

/// User states and recorded input offsets in one RocksDB database.
///
/// Keys: `u` + partition (i32, big-endian) + user id for states; `o` + topic + `0x00` +
/// partition for the next input offset to process; `c` + partition for the next changelog
/// offset the partition's states reflect.
pub struct StateStore {
    db: DB,
    /// The options the store was opened with: they hold its statistics (block cache tickers).
    options: Options,
    write_options: WriteOptions,
    /// Whether `write_options` go through the write-ahead log.
    logged: bool,
    /// Recently written states; writers of a shard's user keys take turns under its writer
    /// lock, and readers never wait for a RocksDB write (see `hot.rs`).
    hot: HotCache,
    /// Writes announced and not yet done (see [`StateStore::announce_write`]).
    pub(crate) announced: std::sync::Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>,
}

pub(crate) fn user_key(partition: i32, user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + user.len());
    user_key_into(partition, user, &mut k);
    k
}

/// Writes the store key of a user state into `k` (cleared first).
pub(crate) fn user_key_into(partition: i32, user: &str, k: &mut Vec<u8>) {
    k.clear();
    k.push(USER_PREFIX);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(user.as_bytes());
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

/// The partition and user id of a user key.
fn parse_user_key(key: &[u8]) -> Result<(i32, String), StateError> {
    if key.len() < 5 {
        return Err(StateError::Corrupt("user key shorter than 5 bytes".into()));
    }
    Ok((i32::from_be_bytes(key[1..5].try_into().expect("4 bytes")), String::from_utf8_lossy(&key[5..]).into_owned()))
}

/// The partition and user id of a key made by [`user_key`] (`None` if it is not one).
pub(crate) fn split_user_key(key: &[u8]) -> Option<(i32, &str)> {
    let partition = i32::from_be_bytes(key.get(1..5)?.try_into().ok()?);
    Some((partition, std::str::from_utf8(&key[5..]).ok()?))
}

fn meta_key(name: &str) -> Vec<u8> {
    [[META_PREFIX].as_slice(), name.as_bytes()].concat()
}

fn read_i64(bytes: Option<Vec<u8>>, what: &str) -> Result<Option<i64>, StateError> {
    bytes
        .map(|b| <[u8; 8]>::try_from(b.as_slice()).map(i64::from_le_bytes).map_err(|_| StateError::Corrupt(format!("{what} record is not 8 bytes"))))
        .transpose()
}

/// What stored bytes hold: a state, or, if they do not decode, the bytes to quarantine.
pub(crate) fn decoded(bytes: &[u8]) -> Loaded {
    match UserState::decode(bytes) {
        Ok(state) => Loaded::State(state),
        Err(error) => Loaded::Invalid { bytes: bytes.to_vec(), error },
    }
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
        // Most reads in a batch are of users absent from the memtables (a memtable holds the
        // last few seconds of writes): a whole-key bloom filter answers those without a walk
        // down the skip list.
        opts.set_memtable_prefix_bloom_ratio(0.05);
        opts.set_memtable_whole_key_filtering(true);
        // Tickers (block cache hits and misses) for `stats`; timers stay off, which keeps the
        // cost to counter increments.
        opts.enable_statistics();
        opts.set_statistics_level(rocksdb::statistics::StatsLevel::ExceptTimers);
        let mut write_options = WriteOptions::default();
        write_options.disable_wal(!options.write_ahead_log);
        if options.bulk_load {
            opts.set_write_buffer_size(256 << 20);
            opts.set_max_write_buffer_number(4);
            opts.set_level_zero_file_num_compaction_trigger(8);
            opts.set_level_zero_slowdown_writes_trigger(32);
            opts.set_level_zero_stop_writes_trigger(64);
            opts.set_max_background_jobs(4);
        }
        // Opened with the default column family named, so that batched reads can address it.
        let default_cf = ColumnFamilyDescriptor::new(DEFAULT_COLUMN_FAMILY_NAME, opts.clone());
        let hot = HotCache::new(options.hot_state_bytes);
        Ok(StateStore { db: DB::open_cf_descriptors(&opts, path, [default_cf])?, options: opts, write_options, logged: options.write_ahead_log, hot, announced: Default::default() })
    }

    /// Size, keys, compaction debt and block cache figures, for monitoring.
    ///
    /// # Errors
    ///
    /// RocksDB property reads.
    pub fn stats(&self) -> Result<StoreStats, StateError> {
        use rocksdb::properties::{CUR_SIZE_ALL_MEM_TABLES, ESTIMATE_NUM_KEYS, ESTIMATE_PENDING_COMPACTION_BYTES, TOTAL_SST_FILES_SIZE};
        use rocksdb::statistics::Ticker;
        let int = |name| self.db.property_int_value(name).map(Option::unwrap_or_default);
        Ok(StoreStats {
            size_bytes: int(TOTAL_SST_FILES_SIZE)? + int(CUR_SIZE_ALL_MEM_TABLES)?,
            estimated_keys: int(ESTIMATE_NUM_KEYS)?,
            pending_compaction_bytes: int(ESTIMATE_PENDING_COMPACTION_BYTES)?,
            block_cache_hits: self.options.get_ticker_count(Ticker::BlockCacheHit),
            block_cache_misses: self.options.get_ticker_count(Ticker::BlockCacheMiss),
        })
    }

    /// Reads the states of many users at once. A stored value that does not decode is
    /// [`Loaded::Invalid`], not an error: one bad record must not stop a partition.
    ///
    /// # Errors
    ///
    /// RocksDB read errors.
    pub fn get_many<'a>(&self, keys: impl IntoIterator<Item = (i32, &'a str)>) -> Result<Vec<Loaded>, StateError> {
        let keys: Vec<Vec<u8>> = keys.into_iter().map(|(p, u)| user_key(p, u)).collect();
        let mut loaded: Vec<Loaded> = std::iter::repeat_with(|| Loaded::Absent).take(keys.len()).collect();
        self.hot.lookup(&keys, |i, bytes| loaded[i] = decoded(bytes));
        // A cached value is never `Absent`: what is still absent goes to RocksDB.
        let mut misses: Vec<usize> = (0..keys.len()).filter(|&i| matches!(loaded[i], Loaded::Absent)).collect();
        // RocksDB's batched read walks sorted keys in one pass over each memtable and file, and
        // its values come back pinned in the block cache: decoded in place, never copied.
        misses.sort_unstable_by(|&a, &b| keys[a].cmp(&keys[b]));
        let cf = self.db.cf_handle(DEFAULT_COLUMN_FAMILY_NAME).expect("the store is opened with its default column family");
        let values = self.db.batched_multi_get_cf(cf, misses.iter().map(|&i| &keys[i]), true);
        for (&i, value) in misses.iter().zip(values) {
            if let Some(bytes) = value? {
                loaded[i] = decoded(&bytes);
            }
        }
        Ok(loaded)
    }

    /// Entries and bytes (by its own count) of the in-process cache of recently written states.
    pub fn hot_states(&self) -> (usize, usize) {
        self.hot.totals()
    }

    /// Atomically writes user states, the next input offsets they reflect and, per partition,
    /// the next changelog offset they reflect (see [`crate::changelog`]).
    ///
    /// # Errors
    ///
    /// RocksDB write errors; nothing is written then.
    pub fn commit<'s, 'o>(
        &self,
        states: impl IntoIterator<Item = (i32, &'s str, &'s UserState)>,
        offsets: impl IntoIterator<Item = (&'o str, i32, i64)>,
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
        self.commit_keyed(states.into_iter().map(|(partition, user, state)| (user_key(partition, user), state)).collect(), offsets, changelog)
    }

    /// [`StateStore::commit_encoded`] with the users' store keys made.
    pub(crate) fn commit_keyed<'s, 'o, K: AsRef<[u8]>>(
        &self,
        mut users: Vec<(K, &'s [u8])>,
        offsets: impl IntoIterator<Item = (&'o str, i32, i64)>,
        changelog: impl IntoIterator<Item = (i32, i64)>,
    ) -> Result<(), StateError> {
        // Sorted, consecutive inserts into the memtable's skip list reuse each other's search.
        // Stable: of two writes of one key, the later stays last.
        users.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        let mut batch = WriteBatch::default();
        for (key, state) in &users {
            // An empty value is a staged deletion (see `Staged::delete_user`).
            if state.is_empty() {
                batch.delete(key.as_ref());
            } else {
                batch.put(key.as_ref(), state);
            }
        }
        for (topic, partition, next_offset) in offsets {
            batch.put(offset_key(topic, partition), next_offset.to_le_bytes());
        }
        for (partition, next) in changelog {
            batch.put(changelog_key(partition), next.to_le_bytes());
        }
        // Writers of these keys' shards take turns; readers do not wait for the write: until
        // the cache takes the new values after it, they find the old ones there (or either in
        // RocksDB, whose batch lands atomically), and never an older value after a newer one.
        let writing = self.hot.write_for(users.iter().map(|(k, _)| k.as_ref()));
        self.db.write_opt(batch, &self.write_options)?;
        let mut hot = writing.cache();
        for (key, state) in &users {
            if state.is_empty() {
                hot.remove(key.as_ref());
            } else {
                hot.put(key.as_ref(), state);
            }
        }
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

    /// Compacts the whole store, so that [`StateStore::sst_bytes`] measures live data (what
    /// `intentflow bench` reports as bytes per idle user).
    ///
    /// # Errors
    ///
    /// RocksDB flush errors.
    pub fn compact(&self) -> Result<(), StateError> {
        self.db.flush()?;
        self.db.compact_range(None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    /// Bytes of the store's table files on disk (RocksDB's `total-sst-files-size`), memtables
    /// not included.
    ///
    /// # Errors
    ///
    /// RocksDB property errors.
    pub fn sst_bytes(&self) -> Result<u64, StateError> {
        Ok(self.db.property_int_value("rocksdb.total-sst-files-size")?.unwrap_or(0))
    }

    /// Applies changelog records of `partition` (offset, key, value; `None` deletes) and
    /// records `next` as the changelog offset the partition now reflects, in one atomic write.
    ///
    /// Every value is checked first. A record whose key is not the changelog's, whose value does
    /// not decode, or (a user state) uses an unknown encoding version is left out and returned in
    /// [`Applied::quarantined`]; its user, if any, is deleted so that it starts fresh. A user
    /// state built by another model than `model` is kept under [`ModelPolicy::Refuse`] (the
    /// operator refuses it when loading it), kept under [`ModelPolicy::Migrate`] (the operator
    /// migrates it) and dropped under [`ModelPolicy::Reset`]. `track`
    /// follows, across the chunks of one restore, which keys end on such a record (see
    /// [`RestoreTrack`]).
    ///
    /// # Errors
    ///
    /// RocksDB write errors; nothing of the chunk is written then.
    pub fn apply_changelog<'a>(
        &self,
        partition: i32,
        records: impl IntoIterator<Item = (i64, &'a [u8], Option<&'a [u8]>)>,
        next: i64,
        model: (&str, ModelPolicy),
        track: &mut RestoreTrack,
    ) -> Result<Applied, StateError> {
        let mut batch = WriteBatch::default();
        let mut out = Applied::default();
        // Every user key the chunk writes or deletes leaves the hot cache with the write.
        let mut touched: Vec<Vec<u8>> = Vec::new();
        for (offset, key, value) in records {
            let quarantine = |error: StateError| Quarantined { offset, key: key.to_vec(), value: value.unwrap_or_default().to_vec(), error };
            let parsed = match (ChangelogKey::decode(key), value) {
                (Ok(k), _) => k,
                // A tombstone of a key of no known kind (one the restore wrote): nothing to keep.
                (Err(_), None) => {
                    track.unusable.remove(key);
                    continue;
                }
                (Err(e), Some(_)) => {
                    out.quarantined.push(quarantine(e));
                    track.unusable.insert(key.to_vec());
                    continue;
                }
            };
            if let ChangelogKey::User(user) = parsed {
                touched.push(user_key(partition, user));
            }
            match (parsed, value) {
                (ChangelogKey::User(user), Some(v)) => match UserState::decode(v) {
                    Ok(state) if state.built_by(model.0) => {
                        batch.put(user_key(partition, user), v);
                        track.settled(key, Some(user));
                    }
                    Ok(state) => {
                        track.unusable.remove(key);
                        track.foreign.insert(user.to_string(), state.model_version);
                        match model.1 {
                            ModelPolicy::Refuse | ModelPolicy::Migrate => batch.put(user_key(partition, user), v),
                            ModelPolicy::Reset => {
                                batch.delete(user_key(partition, user));
                                out.reset_users += 1;
                                continue;
                            }
                        }
                    }
                    Err(e) => {
                        batch.delete(user_key(partition, user));
                        out.quarantined.push(quarantine(e));
                        track.foreign.remove(user);
                        track.unusable.insert(key.to_vec());
                        continue;
                    }
                },
                (ChangelogKey::Offset(topic), Some(v)) => match decode_offset(v) {
                    Ok(_) => {
                        batch.put(offset_key(topic, partition), v);
                        track.settled(key, None);
                    }
                    Err(e) => {
                        // Unknown from here: the group's committed offset and the fences decide.
                        batch.delete(offset_key(topic, partition));
                        out.quarantined.push(quarantine(e));
                        track.unusable.insert(key.to_vec());
                        continue;
                    }
                },
                (ChangelogKey::User(user), None) => {
                    batch.delete(user_key(partition, user));
                    track.settled(key, Some(user));
                }
                (ChangelogKey::Offset(topic), None) => {
                    batch.delete(offset_key(topic, partition));
                    track.settled(key, None);
                }
            }
            out.records += 1;
        }
        batch.put(changelog_key(partition), next.to_le_bytes());
        let writing = self.hot.write_partition(partition);
        let mut hot = writing.cache();
        self.db.write_opt(batch, &self.write_options)?;
        touched.iter().for_each(|k| hot.remove(k));
        Ok(out)
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

    /// Records the model version the states are (from now on) built with; durable on return.
    ///
    /// # Errors
    ///
    /// RocksDB write errors.
    pub fn set_model_version(&self, version: &str) -> Result<(), StateError> {
        self.db.put_opt(MODEL_KEY, version.as_bytes(), &self.write_options)?;
        self.persist_bookkeeping()
    }

    /// Makes a bookkeeping write (model, meta, a reset, a dropped partition) durable at once when the store writes
    /// without a write-ahead log, by flushing the memtables: a crash must not take back what
    /// the operator did on its strength, such as serving a new model. States and offsets need no
    /// such flush: the changelog restores them. Rare, so the flush costs nothing that matters.
    fn persist_bookkeeping(&self) -> Result<(), StateError> {
        if !self.logged {
            self.db.flush()?;
        }
        Ok(())
    }

    /// Drops every user state (all partitions), keeping the offsets: users start from zero.
    /// Durable on return.
    ///
    /// # Errors
    ///
    /// RocksDB errors.
    pub fn clear_users(&self) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        batch.delete_range([USER_PREFIX].as_slice(), [USER_PREFIX + 1].as_slice());
        let writing = self.hot.write_all();
        let mut hot = writing.cache();
        self.db.write_opt(batch, &self.write_options)?;
        hot.clear();
        drop(hot);
        drop(writing);
        self.persist_bookkeeping()
    }

    /// Drops everything the store holds for `partition`: its users, its input offsets and its
    /// changelog offset (before a rebuild from the changelog). Durable on return: a store
    /// that lost it could later count as up to date with states it was to drop.
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
        let writing = self.hot.write_partition(partition);
        let mut hot = writing.cache();
        self.db.write_opt(batch, &self.write_options)?;
        hot.remove_partition(partition);
        drop(hot);
        drop(writing);
        self.persist_bookkeeping()
    }

    /// The next input offset recorded for a topic-partition, if any.
    ///
    /// # Errors
    ///
    /// RocksDB read errors and malformed offset records.
    pub fn offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StateError> {
        read_i64(self.db.get(offset_key(topic, partition))?, "offset")
    }

    /// Up to `limit` stored user states as raw bytes, in key order, starting after the user whose
    /// [`RawUser::key`] is `after` (from the first when `None`). Moving every state of a large
    /// store chunk by chunk keeps memory bounded.
    ///
    /// # Errors
    ///
    /// RocksDB read errors and malformed keys.
    pub fn users_after(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<RawUser>, StateError> {
        let start = after.map_or_else(|| vec![USER_PREFIX], <[u8]>::to_vec);
        let mut out = Vec::with_capacity(limit.min(1 << 16));
        for item in self.db.iterator(IteratorMode::From(&start, Direction::Forward)) {
            let (key, value) = item?;
            if key.first() != Some(&USER_PREFIX) || out.len() >= limit {
                break;
            }
            if after == Some(&key[..]) {
                continue;
            }
            let (partition, user) = parse_user_key(&key)?;
            out.push(RawUser { key: key.to_vec(), partition, user, value: value.to_vec() });
        }
        Ok(out)
    }

    /// Up to `limit` stored user states of `partition` as raw bytes, in key order, starting
    /// after the user `after` (from the partition's first when `None`): a sweep over one
    /// partition, chunk by chunk.
    ///
    /// # Errors
    ///
    /// RocksDB read errors and malformed keys.
    pub fn partition_users_after(&self, partition: i32, after: Option<&str>, limit: usize) -> Result<Vec<RawUser>, StateError> {
        let start = user_key(partition, after.unwrap_or(""));
        let mut out = Vec::with_capacity(limit.min(1 << 16));
        for item in self.db.iterator(IteratorMode::From(&start, Direction::Forward)) {
            let (key, value) = item?;
            if out.len() >= limit || key.first() != Some(&USER_PREFIX) || key.get(1..5) != Some(&partition.to_be_bytes()[..]) {
                break;
            }
            if after.is_some() && key[..] == start[..] {
                continue;
            }
            let (partition, user) = parse_user_key(&key)?;
            out.push(RawUser { key: key.to_vec(), partition, user, value: value.to_vec() });
        }
        Ok(out)
    }

    /// A bookkeeping value stored under `name` (such as the progress of a hand-over).
    ///
    /// # Errors
    ///
    /// RocksDB read errors.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.db.get(meta_key(name))?)
    }

    /// Stores a bookkeeping value under `name`, or deletes it when `value` is `None`; durable on
    /// return.
    ///
    /// # Errors
    ///
    /// RocksDB write errors.
    pub fn set_meta(&self, name: &str, value: Option<&[u8]>) -> Result<(), StateError> {
        match value {
            Some(v) => self.db.put_opt(meta_key(name), v, &self.write_options)?,
            None => self.db.delete_opt(meta_key(name), &self.write_options)?,
        }
        self.persist_bookkeeping()
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
            let (partition, user) = parse_user_key(&key)?;
            out.push((partition, user, UserState::decode(&value)?));
        }
        Ok(out)
    }
}
