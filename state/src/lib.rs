//! Per-user state of Intentflow, kept in an embedded RocksDB store.
//!
//! * [`UserState`] is what the operator remembers per user: the session counters
//!   ([`SessionState`]), the GRU hidden vector as plain `f32`s and the version of the model that
//!   produced it. [`UserState::encode`] / [`UserState::decode`] define a versioned binary
//!   encoding (see `docs/state.md`); this crate stores bytes and knows nothing about tensors.
//! * [`StateStore`] wraps RocksDB. States are keyed by input partition and user id, so that a
//!   partition's users can be found, moved or dropped together. A [`StateStore::commit`] writes a
//!   batch of states together with the input offsets they reflect in one atomic write batch,
//!   so the store never holds states without knowing how far they got.
//! * [`changelog`] defines the records of the compacted changelog topic that backs the store,
//!   and the recovery decision ([`changelog::plan_restore`]) a partition's local copy follows
//!   on start-up or when a rebalance assigns it.

pub mod changelog;
mod encoding;
mod store;

pub use encoding::{UserState, STATE_ENCODING_VERSION};
pub use intentflow_schemas::SessionState;
pub use store::{StateStore, StoreOptions};

/// Errors of the state layer.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// RocksDB failed (I/O, corruption reported by RocksDB, lock held by another process).
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// Stored bytes could not be decoded.
    #[error("corrupt state record: {0}")]
    Corrupt(String),
    /// Stored bytes use an encoding version this build does not know.
    #[error("state encoding version {found} is not supported (this build reads {supported})")]
    UnsupportedVersion {
        /// Version byte found.
        found: u8,
        /// Version this build reads.
        supported: u8,
    },
}
