//! The RocksDB store: commits read back, changelog records applied or quarantined, states of
//! another model refused or dropped, chunked iteration.

use intentflow_state::changelog::{encode_offset, ChangelogKey, ModelPolicy, RestoreTrack};
use intentflow_state::{Loaded, StateError, StateStore, StoreOptions, UserState, STATE_ENCODING_VERSION};

fn states(store: &StateStore, keys: &[(i32, &str)]) -> Vec<Option<UserState>> {
    store.get_many(keys.iter().copied()).unwrap().into_iter().map(Loaded::state).collect()
}

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
    a.mark_applied(intentflow_state::topic_id("events"), 41);
    let b = UserState { hidden: vec![1.0], ..Default::default() };
    {
        let store = StateStore::open(dir.path(), options).unwrap();
        store.commit([(0, "alice", &a), (3, "bob", &b)], [("events", 0, 42), ("events", 3, 7)], [(0, 5)]).unwrap();
        store.flush().unwrap();
    }
    let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(states(&store, &[(0, "alice"), (3, "bob"), (1, "alice")]), vec![Some(a.clone()), Some(b.clone()), None]);
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
    let (va, vb, off) = (a.encode(), b.encode(), encode_offset(40));
    // Two updates of alice (the later wins), a deletion of keep, the input offset.
    let records: Vec<(i64, &[u8], Option<&[u8]>)> = vec![(10, &ka, Some(&vb)), (11, &ka, Some(&va)), (12, &kb, None), (13, &ko, Some(&off))];
    let applied = store.apply_changelog(1, records, 17, ("m", ModelPolicy::Refuse), &mut RestoreTrack::default()).unwrap();
    assert_eq!((applied.records, applied.quarantined.len(), applied.reset_users), (4, 0, 0));
    assert_eq!(states(&store, &[(1, "alice"), (1, "keep"), (2, "other")]), vec![Some(a.clone()), None, Some(b.clone())]);
    assert_eq!((store.offset("events", 1).unwrap(), store.changelog_offset(1).unwrap()), (Some(40), Some(17)));

    assert_eq!(store.model_version().unwrap(), None);
    store.set_model_version("gru-1").unwrap();
    assert_eq!(store.model_version().unwrap().as_deref(), Some("gru-1"));

    store.clear_partition(1).unwrap();
    assert_eq!(states(&store, &[(1, "alice")]), vec![None]);
    assert_eq!((store.offset("events", 1).unwrap(), store.changelog_offset(1).unwrap()), (None, None));
    assert_eq!(store.users().unwrap(), vec![(2, "other".to_string(), b)], "other partitions untouched");
    assert_eq!(store.offset("events", 2).unwrap(), Some(9));
    store.clear_users().unwrap();
    assert!(store.users().unwrap().is_empty());
    assert_eq!(store.offset("events", 2).unwrap(), Some(9), "offsets survive a reset of the users");
}

#[test]
fn bad_changelog_records_are_quarantined_and_their_users_start_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
    let good = UserState { hidden: vec![0.5; 2], model_version: "m".into(), ..Default::default() };
    store.commit([(0, "junk", &good), (0, "future", &good)], [], []).unwrap();
    let mut newer = good.encode();
    newer[0] = STATE_ENCODING_VERSION + 1;
    let (kj, kf, kg) = (ChangelogKey::User("junk").encode(), ChangelogKey::User("future").encode(), ChangelogKey::User("good").encode());
    let (vg, ko) = (good.encode(), ChangelogKey::Offset("events").encode());
    let records: Vec<(i64, &[u8], Option<&[u8]>)> = vec![
        (0, &kj, Some(b"junk".as_slice())),
        (1, b"zforeign-key", Some(b"whatever".as_slice())),
        (2, &kf, Some(&newer)),
        (3, &kg, Some(&vg)),
        (4, &ko, Some(b"short".as_slice())),
    ];
    let mut track = RestoreTrack::default();
    let applied = store.apply_changelog(0, records, 5, ("m", ModelPolicy::Refuse), &mut track).unwrap();
    let why: Vec<(i64, &str)> = applied.quarantined.iter().map(|q| (q.offset, q.error.kind())).collect();
    assert_eq!(why, [(0, "corrupt_state"), (1, "corrupt_state"), (2, "unsupported_state_version"), (4, "corrupt_state")]);
    assert_eq!(applied.quarantined[1].value, b"whatever", "the original bytes are kept for the dead-letter topic");
    assert!(applied.quarantined[2].error.to_string().contains(&format!("version {}", STATE_ENCODING_VERSION + 1)));
    assert_eq!(applied.records, 1);
    // The quarantined users start fresh; the good one is applied; the partition moved on.
    assert_eq!(states(&store, &[(0, "junk"), (0, "future"), (0, "good")]), vec![None, None, Some(good.clone())]);
    assert_eq!((store.offset("events", 0).unwrap(), store.changelog_offset(0).unwrap()), (None, Some(5)));
    // Their keys are to be tombstoned at the end of the restore, unless a later record settles one.
    assert_eq!(track.tombstones(ModelPolicy::Refuse), [ko.clone(), kf.clone(), kj.clone(), b"zforeign-key".to_vec()]);
    let later = good.encode();
    store.apply_changelog(0, [(6, kj.as_slice(), Some(later.as_slice()))], 7, ("m", ModelPolicy::Refuse), &mut track).unwrap();
    assert_eq!(track.tombstones(ModelPolicy::Refuse), [ko, kf, b"zforeign-key".to_vec()], "junk has a good state again");
}

#[test]
fn states_of_another_model_are_settled_by_the_last_record_of_their_user() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
    let old = UserState { hidden: vec![0.5; 2], model_version: "gru-a".into(), ..Default::default() };
    let new = UserState { hidden: vec![0.25; 2], model_version: "gru-b".into(), ..Default::default() };
    let (k1, k2) = (ChangelogKey::User("u1").encode(), ChangelogKey::User("u2").encode());
    let (vo, vn) = (old.encode(), new.encode());
    // u1: old model, then the new one (a later record settles it); u2: old model only.
    let records = || -> Vec<(i64, &[u8], Option<&[u8]>)> { vec![(7, &k1, Some(&vo)), (8, &k2, Some(&vo)), (9, &k1, Some(&vn))] };

    let mut track = RestoreTrack::default();
    store.apply_changelog(2, records(), 10, ("gru-b", ModelPolicy::Refuse), &mut track).unwrap();
    let err = track.refusal(2, "gru-b").expect("u2 ends on another model's state");
    assert!(matches!(&err, StateError::ForeignModel { partition: 2, user, found, expected } if user == "u2" && found == "gru-a" && expected == "gru-b"), "{err}");
    assert_eq!(track.tombstones(ModelPolicy::Refuse), Vec::<Vec<u8>>::new(), "a refused state is kept, not deleted");
    assert_eq!(states(&store, &[(2, "u1"), (2, "u2")]), vec![Some(new.clone()), Some(old)], "kept locally: loading it refuses again");

    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
    let mut track = RestoreTrack::default();
    let applied = store.apply_changelog(2, records(), 10, ("gru-b", ModelPolicy::Reset), &mut track).unwrap();
    assert_eq!((applied.reset_users, applied.records), (2, 1));
    assert_eq!(states(&store, &[(2, "u1"), (2, "u2")]), vec![Some(new), None], "u2 starts from zero");
    assert_eq!(track.tombstones(ModelPolicy::Reset), [k2], "only u2's final state is of another model");
}

#[test]
fn undecodable_local_states_load_as_invalid_not_as_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
    store.commit_encoded([(0, "bad", b"\x03junk".as_slice())], [], []).unwrap();
    let got = store.get_many([(0, "bad"), (0, "new")]).unwrap();
    assert!(matches!(&got[0], Loaded::Invalid { bytes, .. } if bytes == b"\x03junk"), "{got:?}");
    assert!(matches!(got[1], Loaded::Absent));
}

#[test]
fn users_come_in_chunks_that_resume_after_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
    let s = UserState::default();
    let users: Vec<String> = (0..25).map(|i| format!("u{i:02}")).collect();
    store.commit(users.iter().map(|u| (1, u.as_str(), &s)), [], []).unwrap();
    let (mut seen, mut after) = (Vec::new(), None::<Vec<u8>>);
    loop {
        let chunk = store.users_after(after.as_deref(), 10).unwrap();
        if chunk.is_empty() {
            break;
        }
        assert!(chunk.len() <= 10);
        after = Some(chunk.last().unwrap().key.clone());
        seen.extend(chunk.into_iter().map(|r| (r.partition, r.user)));
    }
    assert_eq!(seen, users.iter().map(|u| (1, u.clone())).collect::<Vec<_>>());
    store.set_meta("handover", Some(b"x")).unwrap();
    assert_eq!(store.meta("handover").unwrap().as_deref(), Some(b"x".as_slice()));
    store.set_meta("handover", None).unwrap();
    assert_eq!(store.meta("handover").unwrap(), None);
    assert_eq!(store.users_after(None, 100).unwrap().len(), 25, "meta keys are not users");
}

#[test]
fn a_partition_sweep_sees_that_partition_alone_chunk_by_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
    let s = UserState::default();
    let users: Vec<String> = (0..13).map(|i| format!("u{i:02}")).collect();
    // Partition 1's users, with neighbours on partitions 0 and 2 (and 256, whose key shares a byte).
    for p in [0, 1, 2, 256] {
        store.commit(users.iter().map(|u| (p, u.as_str(), &s)), [], []).unwrap();
    }
    let (mut seen, mut after) = (Vec::new(), None::<String>);
    loop {
        let chunk = store.partition_users_after(1, after.as_deref(), 5).unwrap();
        if chunk.is_empty() {
            break;
        }
        assert!(chunk.len() <= 5 && chunk.iter().all(|r| r.partition == 1));
        after = Some(chunk.last().unwrap().user.clone());
        seen.extend(chunk.into_iter().map(|r| r.user));
    }
    assert_eq!(seen, users);
    assert!(store.partition_users_after(7, None, 5).unwrap().is_empty());
}

/// The in-process cache of recently written states answers reads only with what RocksDB holds:
/// restores, resets and dropped partitions take their keys out of it.
#[test]
fn the_hot_state_cache_never_answers_with_a_value_rocksdb_no_longer_holds() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
    let state = |x: f32| UserState { hidden: vec![x; 4], model_version: "m".into(), ..Default::default() };
    let (a, b, c) = (state(0.1), state(0.2), state(0.3));
    store.commit([(1, "a", &a), (1, "b", &b), (2, "c", &c)], [], []).unwrap();
    assert_eq!(store.hot_states().0, 3, "commits fill the cache");
    assert_eq!(states(&store, &[(1, "a"), (1, "b"), (2, "c")]), vec![Some(a.clone()), Some(b.clone()), Some(c.clone())]);

    // A restore rewrites a and deletes b.
    let a2 = state(0.9);
    let (ka, kb, va) = (ChangelogKey::User("a").encode(), ChangelogKey::User("b").encode(), a2.encode());
    let records: Vec<(i64, &[u8], Option<&[u8]>)> = vec![(0, &ka, Some(&va)), (1, &kb, None)];
    store.apply_changelog(1, records, 2, ("m", ModelPolicy::Refuse), &mut RestoreTrack::default()).unwrap();
    assert_eq!(store.hot_states().0, 1, "the restored keys left the cache");
    assert_eq!(states(&store, &[(1, "a"), (1, "b"), (2, "c")]), vec![Some(a2.clone()), None, Some(c.clone())]);

    store.clear_partition(2).unwrap();
    assert_eq!(states(&store, &[(2, "c")]), vec![None]);
    store.commit([(1, "a", &a), (2, "c", &c)], [], []).unwrap();
    store.clear_users().unwrap();
    assert_eq!(states(&store, &[(1, "a"), (2, "c")]), vec![None, None]);
    assert_eq!(store.hot_states(), (0, 0));

    // With the cache off, reads are the same.
    let store_b = dir.path().join("off");
    let off = StateStore::open(&store_b, StoreOptions { hot_state_bytes: 0, ..StoreOptions::default() }).unwrap();
    off.commit([(1, "a", &a)], [], []).unwrap();
    assert_eq!(off.hot_states(), (0, 0));
    assert_eq!(states(&off, &[(1, "a"), (1, "b")]), vec![Some(a), None]);
}

/// Readers do not wait for a commit's RocksDB write, and still never see a key go back to an
/// older value: while one thread commits ever newer states of the same users and another
/// restores ever newer changelog records of a partition sharing their cache shard (16 and 0),
/// a third reads them all, through a cache too small to hold them, and every read is at least
/// as new as the one before it.
#[test]
fn reads_during_commits_and_restores_on_other_threads_never_go_back_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(StateStore::open(dir.path(), StoreOptions { hot_state_bytes: 16 << 10, ..StoreOptions::default() }).unwrap());
    let users: Vec<String> = (0..200).map(|u| format!("u{u}")).collect();
    let state = |n: u32| {
        let mut s = UserState { hidden: vec![0.5; 4], model_version: "m".into(), ..Default::default() };
        s.session.events = n;
        s
    };
    let rounds = 300u32;
    let committer = {
        let (store, users) = (store.clone(), users.clone());
        std::thread::spawn(move || {
            for n in 1..=rounds {
                let s = state(n);
                store.commit(users.iter().enumerate().map(|(i, u)| (i as i32 % 4, u.as_str(), &s)), [("in", 0, i64::from(n))], []).unwrap();
            }
        })
    };
    let restorer = {
        let store = store.clone();
        std::thread::spawn(move || {
            let k = ChangelogKey::User("restored").encode();
            for n in 1..=rounds {
                let v = state(n).encode();
                let records = vec![(i64::from(n), k.as_slice(), Some(v.as_slice()))];
                store.apply_changelog(16, records, i64::from(n) + 1, ("m", ModelPolicy::Refuse), &mut RestoreTrack::default()).unwrap();
            }
        })
    };
    let keys: Vec<(i32, &str)> = users.iter().enumerate().map(|(i, u)| (i as i32 % 4, u.as_str())).chain([(16, "restored")]).collect();
    let events = |store: &StateStore| -> Vec<u32> { store.get_many(keys.iter().copied()).unwrap().into_iter().map(|l| l.state().map_or(0, |s| s.session.events)).collect() };
    let mut seen = vec![0u32; keys.len()];
    let mut reads = 0u64;
    while !(committer.is_finished() && restorer.is_finished()) || reads == 0 {
        for (i, n) in events(&store).into_iter().enumerate() {
            assert!(n >= seen[i], "{:?} read {n} after {}", keys[i], seen[i]);
            seen[i] = n;
        }
        reads += 1;
    }
    committer.join().unwrap();
    restorer.join().unwrap();
    assert_eq!(events(&store), vec![rounds; keys.len()]);
    eprintln!("{reads} reads of {} users during {rounds} commits and restores", keys.len());
}

#[test]
fn stats_count_keys_bytes_and_block_cache_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), StoreOptions { hot_state_bytes: 0, ..StoreOptions::default() }).unwrap();
    let empty = store.stats().unwrap();
    assert_eq!((empty.estimated_keys, empty.block_cache_hits, empty.block_cache_misses), (0, 0, 0));
    let s = UserState { hidden: vec![0.5; 40], model_version: "m".into(), ..Default::default() };
    let users: Vec<String> = (0..500).map(|i| format!("user-{i}")).collect();
    store.commit(users.iter().map(|u| (0, u.as_str(), &s)), [("events", 0, 500)], []).unwrap();
    store.flush().unwrap();
    let written = store.stats().unwrap();
    assert!(written.size_bytes > 500 * 8, "compressed, still more than the user keys: {written:?}");
    assert!((500..=520).contains(&written.estimated_keys), "{written:?}");
    // Read from the SST file: the first read of a block misses the cache, later ones hit it.
    for _ in 0..3 {
        assert!(states(&store, &[(0, "user-7"), (0, "user-400")]).iter().all(Option::is_some));
    }
    let read = store.stats().unwrap();
    assert!(read.block_cache_misses > 0 && read.block_cache_hits > 0, "{read:?}");
}

/// Copies a store's files as a crash would leave them: what the process wrote to disk so far
/// (the open store keeps running; with nothing to flush or compact, its files stand still).
fn files_at_crash(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() == "LOCK" {
            continue;
        }
        // RocksDB may be deleting a log file it no longer needs: gone is as good as not copied.
        if let Err(e) = std::fs::copy(entry.path(), to.join(entry.file_name())) {
            assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "copying {}: {e}", entry.path().display());
        }
    }
}

#[test]
fn a_store_without_its_write_ahead_log_survives_a_crash_as_a_prefix_of_its_writes_with_its_bookkeeping() {
    let state = |v: f32| UserState { hidden: vec![v; 4], model_version: "m2".into(), ..Default::default() };
    for logged in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let options = if logged { StoreOptions::default() } else { StoreOptions::default().changelog_backed() };
        let store = StateStore::open(&live, options).unwrap();
        store.commit([(0, "alice", &state(1.0))], [("events", 0, 1)], [(0, 1)]).unwrap();
        // A bookkeeping write: durable at once either way, and so is everything before it.
        store.set_model_version("m2").unwrap();
        store.set_meta("progress", Some(b"alice")).unwrap();
        store.commit([(0, "alice", &state(2.0)), (0, "bob", &state(3.0))], [("events", 0, 3)], [(0, 3)]).unwrap();

        let crashed = dir.path().join("crashed");
        files_at_crash(&live, &crashed);
        let after = StateStore::open(&crashed, StoreOptions::default()).unwrap();
        let (bookkeeping, meta) = (after.model_version().unwrap(), after.meta("progress").unwrap());
        assert_eq!((bookkeeping.as_deref(), meta.as_deref()), (Some("m2"), Some(b"alice".as_slice())), "logged {logged}");
        let (alice, bob) = (states(&after, &[(0, "alice")]).remove(0), states(&after, &[(0, "bob")]).remove(0));
        let position = (after.offset("events", 0).unwrap(), after.changelog_offset(0).unwrap());
        if logged {
            // The log replays the last commit.
            assert_eq!((alice, bob, position), (Some(state(2.0)), Some(state(3.0)), (Some(3), Some(3))));
        } else {
            // The last commit is lost whole: states and offsets as of the one before, from
            // which the changelog catches up.
            assert_eq!((alice, bob, position), (Some(state(1.0)), None, (Some(1), Some(1))));
        }

        // A clean close keeps everything, log or not.
        drop(store);
        let reopened = StateStore::open(&live, StoreOptions::default()).unwrap();
        let all = (states(&reopened, &[(0, "alice"), (0, "bob")]), reopened.changelog_offset(0).unwrap());
        assert_eq!(all, (vec![Some(state(2.0)), Some(state(3.0))], Some(3)), "logged {logged}");
    }
}
