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
//! * [`Staged`] holds the writes of an open transaction, which the following batches read
//!   through a [`StagedView`] and which reach RocksDB only when it commits. [`WriteBehind`]
//!   writes each batch's on a thread of its own while the next batch is scored.
//! * [`changelog`] defines the records of the compacted changelog topic that backs the store,
//!   and the recovery decision ([`changelog::plan_restore`]) a partition's local copy follows
//!   on start-up or when a rebalance assigns it.
//!
//! Nothing stored is trusted blindly: a state that does not decode, uses an unknown encoding
//! version or belongs to another model is reported per user ([`Loaded`],
//! [`changelog::Applied::quarantined`]) so that the caller can quarantine it and start that user
//! fresh, instead of stopping a partition.

mod behind;
pub mod changelog;
mod encoding;
mod hot;
mod staged;
mod store;

pub use behind::WriteBehind;
pub use encoding::{topic_id, EmitMemory, Fence, OutputMemory, UserState, STATE_ENCODING_VERSION};
pub use intentflow_schemas::{SessionState, UserHistory};
pub use staged::{AnnouncedWrite, StateRead, Staged, StagedView};
pub use store::{Loaded, RawUser, StateStore, StoreOptions, StoreStats};

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
    #[error("state encoding version {found} is not supported: this build reads versions 1..={supported} (was it written by a newer intentflow?)")]
    UnsupportedVersion {
        /// Version byte found.
        found: u8,
        /// Newest version this build reads.
        supported: u8,
    },
    /// A user's state was built by another model and the policy is to refuse.
    #[error(
        "user {user} on partition {partition} has a state built by model {found}, the loaded model is {expected}: hidden states of one \
         model mean nothing to another. Replay history into a fresh state directory with the new model (docs/replay.md), or set \
         reset_state_on_model_change to start such users from zero"
    )]
    ForeignModel {
        /// The input partition.
        partition: i32,
        /// The user.
        user: String,
        /// The model the state was built with.
        found: String,
        /// The model loaded.
        expected: String,
    },
    /// The thread that writes behind ([`WriteBehind`]) could not be started.
    #[error("starting the state writer thread: {0}")]
    Writer(#[source] std::io::Error),
}

impl StateError {
    /// A short label from a bounded set, for metric labels and dead-letter headers.
    pub fn kind(&self) -> &'static str {
        match self {
            StateError::Rocks(_) => "rocksdb",
            StateError::Corrupt(_) => "corrupt_state",
            StateError::UnsupportedVersion { .. } => "unsupported_state_version",
            StateError::ForeignModel { .. } => "foreign_model",
            StateError::Writer(_) => "state_writer",
        }
    }
}
