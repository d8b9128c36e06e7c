//! The state changelog: how user states and input offsets are written to, and read back from, a
//! compacted Kafka topic, and the recovery decision for a partition's local store.
//!
//! The changelog has one partition per input partition. Each committed unit of batches (one
//! commit interval) writes, to the changelog partition of every input partition it read:
//!
//! * `u` + user id → the user's [`UserState`](crate::UserState) encoding, latest per batch
//!   (under at-least-once, latest per unit);
//! * `o` + input topic → the next input offset of that topic-partition (8 bytes, little-endian).
//!
//! Compaction keeps the latest value per key, so the changelog partition always holds a full
//! copy of the partition's states *and* the input position they reflect. This crate defines the
//! bytes and applies them to RocksDB; the Kafka side lives in the pipeline.
//!
//! ## Invariants
//!
//! 1. Under exactly-once, the intents, changelog records and consumer offsets of a commit
//!    interval's batches are one Kafka transaction; the local store is written only after that
//!    transaction committed, with the changelog offset it now reflects
//!    ([`StateStore::commit_staged`](crate::StateStore::commit_staged)); until then its batches
//!    read each other's states from a [`Staged`](crate::Staged) overlay.
//!    So the local store is always a prefix of the committed changelog: never ahead of it.
//! 2. A partition's local store plus the committed changelog records after its recorded
//!    changelog offset equals the committed changelog, which equals the committed input
//!    position. Catching up ([`plan_restore`]) therefore restores exactly the state that the
//!    committed consumer offsets continue from: nothing lost, nothing applied twice.
//! 3. A store that claims to be ahead of the changelog (the topic was deleted and recreated)
//!    or behind its retained start cannot be caught up: that partition is rebuilt from the
//!    changelog's start. It is never wiped for any other reason, including an unclean exit.

use crate::StateError;

const USER_TAG: u8 = b'u';
const OFFSET_TAG: u8 = b'o';

/// What a changelog record's key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangelogKey<'a> {
    /// A user's state.
    User(&'a str),
    /// The next input offset of an input topic (on this changelog partition's partition).
    Offset(&'a str),
}

impl ChangelogKey<'_> {
    /// The key bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut k = Vec::new();
        self.encode_into(&mut k);
        k
    }

    /// Appends the key bytes to `out` (reusing a buffer across records).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (tag, name) = match self {
            ChangelogKey::User(u) => (USER_TAG, u),
            ChangelogKey::Offset(t) => (OFFSET_TAG, t),
        };
        out.reserve(1 + name.len());
        out.push(tag);
        out.extend_from_slice(name.as_bytes());
    }

    /// Parses key bytes.
    ///
    /// # Errors
    ///
    /// [`StateError::Corrupt`] for an unknown tag or a name that is not UTF-8.
    pub fn decode(bytes: &[u8]) -> Result<ChangelogKey<'_>, StateError> {
        let (&tag, name) = bytes.split_first().ok_or_else(|| StateError::Corrupt("empty changelog key".into()))?;
        let name = std::str::from_utf8(name).map_err(|e| StateError::Corrupt(format!("changelog key: {e}")))?;
        match tag {
            USER_TAG => Ok(ChangelogKey::User(name)),
            OFFSET_TAG => Ok(ChangelogKey::Offset(name)),
            other => Err(StateError::Corrupt(format!("changelog key tag {other:#04x}"))),
        }
    }
}

/// The value of an offset record.
pub fn encode_offset(next: i64) -> [u8; 8] {
    next.to_le_bytes()
}

/// Parses the value of an offset record.
///
/// # Errors
///
/// [`StateError::Corrupt`] unless it is 8 bytes.
pub fn decode_offset(bytes: &[u8]) -> Result<i64, StateError> {
    <[u8; 8]>::try_from(bytes).map(i64::from_le_bytes).map_err(|_| StateError::Corrupt(format!("offset record of {} bytes", bytes.len())))
}

/// What a partition's local store must do before its partition is processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestorePlan {
    /// The store already reflects the whole changelog partition.
    UpToDate,
    /// Apply the changelog records from `from` (the store's recorded offset) to the end.
    CatchUp {
        /// First changelog offset to read.
        from: i64,
    },
    /// Drop the partition's local states and offsets, then apply the changelog from `from`
    /// (its oldest retained offset).
    Rebuild {
        /// First changelog offset to read.
        from: i64,
        /// Why the local copy cannot be caught up.
        reason: String,
    },
}

/// The recovery decision for one partition, from the changelog offset the local store
/// recorded (`None` if it never saw this partition) and the changelog partition's oldest
/// retained offset `low` and end `high` (high watermark).
pub fn plan_restore(local: Option<i64>, low: i64, high: i64) -> RestorePlan {
    match local {
        None if high <= low => RestorePlan::UpToDate,
        None => RestorePlan::CatchUp { from: low },
        Some(c) if c > high => RestorePlan::Rebuild {
            from: low,
            reason: format!("the store reflects changelog offset {c}, beyond the changelog's end {high} (was the changelog topic recreated?)"),
        },
        Some(c) if c < low => RestorePlan::Rebuild {
            from: low,
            reason: format!("the store stopped at changelog offset {c}, before the oldest retained offset {low}"),
        },
        Some(c) if c == high => RestorePlan::UpToDate,
        Some(c) => RestorePlan::CatchUp { from: c },
    }
}

/// What to do with a state built by another model than the loaded one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelPolicy {
    /// Stop with [`StateError::ForeignModel`]: the operator refuses to continue such a state.
    Refuse,
    /// Drop the state: the user starts from zero with the loaded model.
    Reset,
    /// Keep the state and continue it under the loaded model (`model_reload`): at its user's
    /// next event its hidden vector restarts from zero, while its session counters, fences and
    /// output memories stay.
    Migrate,
}

impl ModelPolicy {
    /// `Reset` when told to reset, `Refuse` otherwise.
    pub fn from_reset_flag(reset: bool) -> ModelPolicy {
        if reset {
            ModelPolicy::Reset
        } else {
            ModelPolicy::Refuse
        }
    }
}

/// A changelog record that could not be applied and was left out instead of stopping the
/// partition: the caller logs it, counts it and sends it to the dead-letter topic.
#[derive(Debug)]
pub struct Quarantined {
    /// Its changelog offset.
    pub offset: i64,
    /// Its key bytes.
    pub key: Vec<u8>,
    /// Its value bytes.
    pub value: Vec<u8>,
    /// Why it was left out.
    pub error: StateError,
}

/// What applying a run of changelog records did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Records applied.
    pub records: usize,
    /// Records left out: their users (if any) start fresh.
    pub quarantined: Vec<Quarantined>,
    /// States of another model dropped under [`ModelPolicy::Reset`].
    pub reset_users: usize,
}

/// What a whole restore of one partition found that only its end can settle, carried across
/// the chunks of [`StateStore::apply_changelog`](crate::StateStore::apply_changelog): a record
/// is only the user's final word if no later record of the same key follows.
#[derive(Debug, Default)]
pub struct RestoreTrack {
    /// Users whose latest record is a state of another model, with that model.
    pub foreign: std::collections::HashMap<String, String>,
    /// Changelog keys whose latest record could not be used (quarantined).
    pub unusable: std::collections::HashSet<Vec<u8>>,
}

impl RestoreTrack {
    /// Under [`ModelPolicy::Refuse`]: the error for the first user whose final state is of
    /// another model, if any.
    pub fn refusal(&self, partition: i32, expected: &str) -> Option<StateError> {
        let (user, found) = self.foreign.iter().min()?;
        Some(StateError::ForeignModel { partition, user: user.clone(), found: found.clone(), expected: expected.to_string() })
    }

    /// The changelog keys to delete with a tombstone once the restore reached the end, so that
    /// the changelog agrees with the store: unusable records always, another model's states
    /// under [`ModelPolicy::Reset`].
    pub fn tombstones(&self, policy: ModelPolicy) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = self.unusable.iter().cloned().collect();
        if policy == ModelPolicy::Reset {
            keys.extend(self.foreign.keys().map(|u| ChangelogKey::User(u).encode()));
        }
        keys.sort();
        keys
    }

    /// A later record of `key` (of `user`, for a user key) settles whatever an earlier one left.
    pub(crate) fn settled(&mut self, key: &[u8], user: Option<&str>) {
        self.unusable.remove(key);
        if let Some(u) = user {
            self.foreign.remove(u);
        }
    }
}

/// Whether a store's states can go on with the loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelCheck {
    /// A store without a recorded model: it takes the loaded one.
    Fresh,
    /// Built by the loaded model.
    Same,
    /// Built by another model and the operator was told to reset: users start from zero.
    Reset {
        /// The model the states were built with.
        previous: String,
    },
    /// Built by another model: hidden vectors of one GRU mean nothing to another, so refuse.
    Refuse {
        /// The model the states were built with.
        previous: String,
    },
}

/// Decides whether states built by `stored` (the store's recorded model version) can continue
/// under the model `loaded`.
pub fn check_model(stored: Option<&str>, loaded: &str, reset: bool) -> ModelCheck {
    match stored {
        None => ModelCheck::Fresh,
        Some(v) if v == loaded => ModelCheck::Same,
        Some(v) if reset => ModelCheck::Reset { previous: v.to_string() },
        Some(v) => ModelCheck::Refuse { previous: v.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_continues_only_under_the_model_that_built_it() {
        assert_eq!(check_model(None, "gru-b", false), ModelCheck::Fresh);
        assert_eq!(check_model(Some("gru-b"), "gru-b", false), ModelCheck::Same);
        assert_eq!(check_model(Some("gru-a"), "gru-b", false), ModelCheck::Refuse { previous: "gru-a".into() });
        assert_eq!(check_model(Some("gru-a"), "gru-b", true), ModelCheck::Reset { previous: "gru-a".into() });
    }

    #[test]
    fn keys_round_trip_and_garbage_is_an_error() {
        for key in [ChangelogKey::User("alice"), ChangelogKey::Offset("events"), ChangelogKey::User("")] {
            assert_eq!(ChangelogKey::decode(&key.encode()).unwrap(), key);
        }
        assert!(ChangelogKey::decode(b"").is_err());
        assert!(ChangelogKey::decode(b"xuser").is_err());
        assert!(ChangelogKey::decode(&[b'u', 0xff]).is_err());
        assert_eq!(decode_offset(&encode_offset(-7)).unwrap(), -7);
        assert!(decode_offset(&[1, 2, 3]).is_err());
    }

    #[test]
    fn recovery_catches_up_from_the_recorded_offset_and_never_wipes_a_consistent_store() {
        // A new instance reads the whole retained changelog; an empty changelog needs nothing.
        assert_eq!(plan_restore(None, 0, 500), RestorePlan::CatchUp { from: 0 });
        assert_eq!(plan_restore(None, 40, 40), RestorePlan::UpToDate);
        // After kill -9 the store is behind by what was committed since its last memtable flush.
        assert_eq!(plan_restore(Some(480), 0, 500), RestorePlan::CatchUp { from: 480 });
        assert_eq!(plan_restore(Some(500), 0, 500), RestorePlan::UpToDate);
        // Compaction or retention moved the start past a store that has been away too long.
        assert!(matches!(plan_restore(Some(10), 100, 500), RestorePlan::Rebuild { from: 100, .. }));
        // A store ahead of the changelog cannot be right (the topic was recreated).
        let RestorePlan::Rebuild { from, reason } = plan_restore(Some(900), 0, 500) else { panic!("expected a rebuild") };
        assert_eq!(from, 0);
        assert!(reason.contains("beyond the changelog's end 500"), "{reason}");
    }
}
