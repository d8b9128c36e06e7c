//! Forgetting users: erasure requests (`intentflow erase`, through the erasure topic) and the
//! expiry of inactive users (`state_ttl_ms`).
//!
//! Both end the same way, inside the open unit: the user's state is staged as deleted (reads of
//! the unit's later batches find none, and the commit deletes it from RocksDB and from the cache
//! of recent states), and a tombstone for its key goes to the changelog (under exactly-once in
//! the unit's transaction, after any state of the user the unit sent before; under at-least-once
//! when the unit commits), so that no restore brings the state back. The request's offset is
//! committed with them, so a request is applied exactly once, however the process stops.
//!
//! A user is forgotten only when no event of theirs lies beyond the position its partition
//! commits ([`applied_beyond`]). A partition's committed offset can stay behind events already
//! applied: the wave cap holds it at the first deferred event, and after a crash, a rewind or a
//! rebalance the events beyond it are read again, which each user's fences skip. A user deleted
//! with its fences would have those events applied again (a second intent, a state rebuilt from
//! what was erased). So an erasure request of such a user waits (its offset held, like a deferred
//! event) until the partition's position has passed the user's events, and so does a request of
//! a partition with deferred events in the batch; the expiry sweep leaves such a user for its next
//! pass.

use intentflow_state::{Staged, StateStore, UserState};
use rdkafka::message::BorrowedMessage;
use rdkafka::Message;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Longest user id an erasure request may name (longer keys are refused as invalid).
const MAX_USER_BYTES: usize = 1024;
/// Users read per step of the expiry sweep: a step runs between batches, so it stays short.
pub(super) const SWEEP_CHUNK: usize = 10_000;
/// Pause between the steps of a pass, so that batches run between them.
const STEP_GAP: Duration = Duration::from_millis(50);

/// One record of the erasure topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ErasureRequest {
    /// Its partition: the input partition whose state holds the user.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The user to forget (the record's key), or `None` when the key is missing, empty, too long
    /// or not UTF-8.
    pub user: Option<String>,
}

impl ErasureRequest {
    /// The request a consumed record makes.
    pub fn of(m: &BorrowedMessage<'_>) -> ErasureRequest {
        let user = m.key().and_then(|k| std::str::from_utf8(k).ok()).filter(|u| !u.is_empty() && u.len() <= MAX_USER_BYTES).map(str::to_string);
        ErasureRequest { partition: m.partition(), offset: m.offset(), user }
    }
}

/// The expiry sweep: passes over the assigned partitions' users every `every`, a chunk at a
/// time, and names the users whose last event is older than the TTL.
#[derive(Debug)]
pub(super) struct Sweep {
    ttl_ms: i64,
    every: Duration,
    /// When the next pass begins (while no pass is under way).
    next: Instant,
    /// The pass under way: partitions left, each with the user it continues after.
    pending: Vec<(i32, Option<String>)>,
    /// When the pass's next step is due.
    next_step: Instant,
}

/// Whether `state` has applied an event at or beyond the committed position of its partition
/// (`position` of an input topic's [`intentflow_state::topic_id`]; `None` when the store knows
/// none): such an event is read again after a restart, and only the state's fences keep it from
/// being applied twice, so the state must not be deleted yet.
pub(super) fn applied_beyond(state: &UserState, position: impl Fn(u32) -> Option<i64>) -> bool {
    state.fences.iter().any(|f| position(f.topic).is_some_and(|p| f.next > p))
}

impl Sweep {
    /// A sweep with `ttl_ms` (none when 0), first passing one interval from now.
    pub fn new(ttl_ms: u64, every_ms: u64) -> Option<Sweep> {
        let every = Duration::from_millis(every_ms.max(1));
        let next = Instant::now() + every;
        (ttl_ms > 0).then(|| Sweep { ttl_ms: i64::try_from(ttl_ms).unwrap_or(i64::MAX), every, next, pending: Vec::new(), next_step: next })
    }

    /// When the next step is due: [`STEP_GAP`] after the last one while a pass is under way.
    pub fn due(&self) -> Instant {
        if self.pending.is_empty() {
            self.next
        } else {
            self.next_step
        }
    }

    /// One step: reads up to [`SWEEP_CHUNK`] users and returns those that expired (last event
    /// before `now_ms - ttl`), except staged ones (the open unit has just written or deleted
    /// them) and those `pinned` says must stay for now ([`applied_beyond`]). A pass begins over
    /// the partitions `ready` says, skips at its turn a partition no longer ready, and once over
    /// schedules the next.
    ///
    /// # Errors
    ///
    /// RocksDB read errors.
    pub fn step(
        &mut self,
        store: &StateStore,
        staged: &Staged,
        ready: &BTreeSet<i32>,
        now_ms: i64,
        pinned: impl Fn(i32, &UserState) -> bool,
    ) -> Result<Vec<(i32, String)>, intentflow_state::StateError> {
        if self.pending.is_empty() {
            // Last partition first out: the pass goes in partition order.
            self.pending = ready.iter().rev().map(|p| (*p, None)).collect();
        }
        let mut expired = Vec::new();
        let cutoff = now_ms.saturating_sub(self.ttl_ms);
        while let Some((partition, after)) = self.pending.pop() {
            if !ready.contains(&partition) {
                continue;
            }
            let chunk = store.partition_users_after(partition, after.as_deref(), SWEEP_CHUNK)?;
            let full = chunk.len() == SWEEP_CHUNK;
            for raw in &chunk {
                // A state that does not decode is the batch path's to quarantine, not the sweep's.
                let Ok(state) = UserState::decode(&raw.value) else { continue };
                if state.session.last_ts_ms < cutoff && staged.staged_deleted(partition, &raw.user).is_none() && !pinned(partition, &state) {
                    expired.push((partition, raw.user.clone()));
                }
            }
            if full {
                self.pending.push((partition, chunk.last().map(|r| r.user.clone())));
            }
            break;
        }
        if self.pending.is_empty() {
            self.next = Instant::now() + self.every;
        }
        self.next_step = Instant::now() + STEP_GAP;
        Ok(expired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use intentflow_state::StoreOptions;

    fn state(last_ts_ms: i64) -> UserState {
        let mut s = UserState::default();
        s.session.last_ts_ms = last_ts_ms;
        s
    }

    #[test]
    fn a_pass_names_every_expired_user_of_the_ready_partitions_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
        let now = 10_000_000;
        // Partition 0: 25,000 users, every third one inactive; partition 1: one old user;
        // partition 2 (not ready) and 3 (events beyond its position): old users that must stay.
        let users: Vec<(i32, String, UserState)> = (0..25_000)
            .map(|i| (0, format!("u{i:05}"), state(if i % 3 == 0 { now - 5_000 } else { now - 10 })))
            .chain([(1, "a".to_string(), state(0)), (2, "b".to_string(), state(0)), (3, "c".to_string(), state(0))])
            .collect();
        store.commit(users.iter().map(|(p, u, s)| (*p, u.as_str(), s)), [], []).unwrap();
        let mut staged = Staged::default();
        // Written by the open unit: not the sweep's.
        staged.put_user(0, "u00000", state(now).encode());
        let mut sweep = Sweep::new(1_000, 60_000).unwrap();
        assert!(sweep.due() > Instant::now() + Duration::from_secs(59), "the first pass waits one interval");
        let ready: BTreeSet<i32> = [0, 1, 3].into();
        let mut expired = Vec::new();
        let mut steps = 0;
        loop {
            // Partition 3's user has events beyond its partition's position.
            expired.extend(sweep.step(&store, &staged, &ready, now, |p, _| p == 3).unwrap());
            steps += 1;
            if sweep.due() > Instant::now() + Duration::from_secs(1) {
                break;
            }
            assert!(sweep.due() > Instant::now(), "steps are spaced, so that batches run between them");
        }
        assert_eq!(steps, 5, "three chunks of partition 0, then partitions 1 and 3");
        let mut want: Vec<(i32, String)> = (3..25_000).step_by(3).map(|i| (0, format!("u{i:05}"))).collect();
        want.push((1, "a".into()));
        assert_eq!(expired, want);
    }

    #[test]
    fn a_user_with_events_beyond_its_partitions_position_stays() {
        let mut s = state(0);
        // Applied up to offset 159 of topic 7, and 40 of topic 9.
        s.mark_applied(7, 159);
        s.mark_applied(9, 40);
        let at = |p7: i64, p9: Option<i64>| move |t: u32| if t == 7 { Some(p7) } else { p9 };
        assert!(applied_beyond(&s, at(150, Some(41))), "held at 150 behind the event at 159");
        assert!(!applied_beyond(&s, at(160, Some(41))));
        assert!(applied_beyond(&s, at(160, Some(30))), "any topic");
        assert!(!applied_beyond(&s, at(160, None)), "no known position, nothing read again from one");
        assert!(!applied_beyond(&state(0), at(0, Some(0))), "a state without fences");
    }

    #[test]
    fn without_a_ttl_there_is_no_sweep() {
        assert!(Sweep::new(0, 1_000).is_none());
    }
}
