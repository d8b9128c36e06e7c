//! What a state may never do, on the real broker: continue under another model, apply an event
//! twice after an at-least-once crash, or stop a partition because one record is unusable.

use intentflow_integration_tests::*;
use intentflow_pipeline::dlq::LOCAL_STORE;
use intentflow_schemas::{Event, ScoredIntent};
use intentflow_state::changelog::ChangelogKey;
use intentflow_state::{StateStore, StoreOptions, UserState, STATE_ENCODING_VERSION};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const IDLE: Duration = Duration::from_secs(120);

/// Each user's streamed scores equal `offline`'s, bit for bit.
fn assert_scores(intents: &[ScoredIntent], offline: &BTreeMap<String, intentflow_model::SequenceScores>) {
    let by_user = intents_by_user(intents);
    assert_eq!(by_user.len(), offline.len(), "users scored");
    for (user, got) in by_user {
        let got: Vec<u32> = got.iter().map(|i| i.score.to_bits()).collect();
        let want: Vec<u32> = offline[&user].scores.iter().map(|s| s.to_bits()).collect();
        assert_eq!(got, want, "user {user}: scores");
    }
}

/// Splits time-ordered events in three: the first third, the middle third of even-numbered
/// users only, and the last third.
fn three_stretches(events: &[Event]) -> (Vec<Event>, Vec<Event>, Vec<Event>) {
    let n = events.len();
    let even = |e: &&Event| e.user_id.trim_start_matches(|c: char| !c.is_ascii_digit()).parse::<u64>().is_ok_and(|k| k % 2 == 0);
    (events[..n / 3].to_vec(), events[n / 3..2 * n / 3].iter().filter(even).cloned().collect(), events[2 * n / 3..].to_vec())
}

/// Guarantee 1: a state built by one model is never continued by another, whether it arrives
/// from the local store or, after a partition moved, from the changelog — refused by default,
/// dropped under `--reset-state-on-model-change`, and never brought back by a later restore.
#[test]
fn states_never_cross_models_when_partitions_move_between_instances_of_two_models() {
    let sc = Scenario::new("models", 2);
    let events = generated_events(300, 9_000, 71);
    let (first, second, third) = three_stretches(&events);
    let model_b = other_model_dir(16);
    let b = model_b.path().display().to_string();
    let state = |name: &str| sc.dir.path().join(name).display().to_string();

    // Model A's instance scores the first stretch and leaves the group.
    produce_events(&sc.brokers, &sc.input, &first).unwrap();
    let (a_intents, _) = sc.run_until("a", &sc.run_args(&["--state-dir", &state("a")]), first.len(), IDLE);
    assert_eq!(a_intents.len(), first.len());
    let version_a = a_intents[0].model_version.clone();

    // Model B's instance takes the partitions over: the changelog hands it model A's states of
    // the same size, which it refuses (the default), without scoring anything.
    produce_events(&sc.brokers, &sc.input, &second).unwrap();
    let mut refused = sc.start("b-refuses", &sc.run_args(&["--state-dir", &state("b1"), "--model-dir", &b]));
    let (status, log) = refused.wait_exit(IDLE).unwrap().expect("model B must refuse model A's states");
    assert!(!status.success(), "{log}");
    assert!(log.contains(&format!("built by model {version_a}")) && log.contains("reset_state_on_model_change"), "{log}");
    assert_eq!(sc.intents(usize::MAX, Duration::from_secs(3)).len(), first.len(), "the refusing instance scored nothing");

    // Told to reset, model B starts every user of model A from zero: its scores of the second
    // stretch are those of fresh users.
    let reset = ["--model-dir", b.as_str(), "--reset-state-on-model-change"];
    let args = |dir: &str| -> Vec<String> {
        let mut a = vec!["--state-dir", dir];
        a.extend_from_slice(&reset);
        sc.run_args(&a)
    };
    let of = |all: &[ScoredIntent], stretch: &[Event]| -> Vec<ScoredIntent> {
        let ids: BTreeSet<&str> = stretch.iter().filter_map(|e| e.event_id.as_deref()).collect();
        all.iter().filter(|i| i.event_id.as_deref().is_some_and(|id| ids.contains(id))).cloned().collect()
    };
    let (all, log) = sc.run_until("b-resets", &args(&state("b2")), first.len() + second.len(), IDLE);
    let b_intents = of(&all, &second);
    assert_eq!(b_intents.len(), second.len(), "{log}");
    assert!(b_intents.iter().all(|i| i.model_version != version_a));
    assert_scores(&b_intents, &offline_scores_of(model_b.path(), &second));
    let users = |stretch: &[Event]| -> BTreeSet<String> { stretch.iter().map(|e| e.user_id.to_string()).collect() };
    // Every user of model A ends on model A's state: dropped, and tombstoned on the changelog so
    // that it agrees with the store.
    let a_users = users(&first).len() as u64;
    assert_eq!(log_sum(&log, "partition restored from the changelog", "reset_users="), a_users, "{log}");
    assert_eq!(log_sum(&log, "partition restored from the changelog", "tombstones="), a_users, "{log}");

    // A fresh instance of model B restores the changelog: model A's states are followed by their
    // tombstones (and, for the second stretch's users, by model B's states), so nothing of model
    // A survives and model B's own states continue.
    produce_events(&sc.brokers, &sc.input, &third).unwrap();
    let total = first.len() + second.len() + third.len();
    let (all, log) = sc.run_until("b-fresh", &args(&state("b3")), total, IDLE);
    assert!(users(&first).difference(&users(&second)).count() > 0, "some users of model A have no later events");
    assert_eq!(log_sum(&log, "partition restored from the changelog", "reset_users="), 0, "the changelog converged; {log}");
    let later = of(&all, &third);
    assert_eq!(later.len(), third.len());
    let b_users = users(&second);
    let continued: Vec<Event> = second.iter().chain(&third).filter(|e| b_users.contains(e.user_id.as_str())).cloned().collect();
    let restarted: Vec<Event> = third.iter().filter(|e| !b_users.contains(e.user_id.as_str())).cloned().collect();
    let mut expected = offline_scores_of(model_b.path(), &restarted);
    for (user, mut s) in offline_scores_of(model_b.path(), &continued) {
        // Only the third stretch's scores are new.
        s.scores.drain(..second.iter().filter(|e| e.user_id == user).count());
        if !s.scores.is_empty() {
            expected.insert(user, s);
        }
    }
    assert_scores(&later, &expected);
    let states = stored_states(std::path::Path::new(&state("b3")));
    assert!(states.values().all(|s| s.model_version != version_a), "a model-A state survived in model B's store");
}

/// The sum of the `field` values (`name=123`) of the log lines containing `line`.
fn log_sum(log: &str, line: &str, field: &str) -> u64 {
    log.lines().filter(|l| l.contains(line)).filter_map(|l| l.split(field).nth(1)?.split_whitespace().next()?.parse::<u64>().ok()).sum()
}

/// Guarantee 2: under at-least-once, a crash after a batch's user states reached the changelog
/// but before its offset record did makes the restarted operator read the batch again; the
/// states' fences keep its events from being applied twice. States end bit-identical to one
/// clean pass, and every event has its intent.
#[test]
fn at_least_once_never_applies_an_event_twice_after_a_crash_between_states_and_offsets() {
    let sc = Scenario::new("alo-fence", 4);
    let events = generated_events(600, 12_000, 73);
    produce_events(&sc.brokers, &sc.input, &events).unwrap();
    // A commit after every batch (interval 0), so that the crash below lands after three.
    let args = sc.run_args(&["--processing-guarantee", "at_least_once", "--max-batch-records", "500", "--commit-interval-ms", "0"]);

    // The fourth commit's states are flushed to the changelog, then the process aborts before
    // its offset records are sent (and before RocksDB or the group hear of the batch).
    let log = sc.dir.path().join("crash.log");
    let mut op = Operator::spawn_env("run", &args, log, &[("FAILPOINTS", "changelog-between-users-and-offsets=3*off->return")]).unwrap();
    let (status, text) = op.wait_exit(IDLE).unwrap().expect("the failpoint aborts the operator");
    assert!(!status.success() && text.contains("failpoint changelog-between-users-and-offsets"), "{text}");
    assert!(!sc.intents(usize::MAX, Duration::from_secs(3)).is_empty(), "batches were processed before the crash");

    let (_, log) = sc.run_until("after", &args, events.len(), IDLE);
    // Everything on the output topic, repeats included.
    let intents = sc.intents(usize::MAX, Duration::from_secs(3));
    let fenced = log.lines().find(|l| l.contains("intentflow run:")).unwrap_or_default().to_string();
    let skipped: u64 = fenced.split(" skipped as already applied").next().and_then(|h| h.rsplit(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(skipped > 0, "the restarted operator must have met events its states already held: {fenced}");
    let unique: BTreeMap<(i32, i64), &ScoredIntent> = intents.iter().map(|i| ((i.source.partition, i.source.offset), i)).collect();
    assert_eq!(unique.len(), events.len(), "at least one intent per event; {fenced}");
    // Each event applied once: the restarted operator skipped the crashed batch's events its
    // states had already applied, and a fresh restore of the changelog gives the same states.
    assert_states_match_offline(&stored_states(&sc.state), &events);
    let fresh = sc.dir.path().join("fresh").display().to_string();
    let op = sc.start("fresh", &sc.run_args(&["--processing-guarantee", "at_least_once", "--state-dir", &fresh]));
    wait_for_log(&op, "assigned partitions are up to date with the changelog", IDLE);
    let (status, _) = op.terminate().unwrap();
    assert!(status.success());
    assert_states_match_offline(&stored_states(std::path::Path::new(&fresh)), &events);
    eprintln!("fence test: {} intents for {} events; {fenced}", intents.len(), events.len());
}

/// Guarantee 3: an unusable state record — undecodable bytes, a key of no known kind, a newer
/// encoding version on the changelog, or garbage in the local store — is quarantined to the
/// dead-letter topic with a reason, counted and logged; its user starts fresh; the partition
/// never stops, and the changelog gets tombstones so that it agrees with the store.
#[test]
fn unusable_state_records_are_quarantined_and_their_users_start_fresh() {
    let sc = Scenario::new("poison", 2);
    let events = generated_events(100, 2_000, 75);
    let (first, second) = events.split_at(1_000);
    produce_events(&sc.brokers, &sc.input, first).unwrap();
    let users = user_partitions(&sc.brokers, &sc.input).unwrap();
    // Users with events in both halves: valid states after the first, loaded in the second.
    let later_users: BTreeSet<&str> = second.iter().map(|e| e.user_id.as_str()).collect();
    let victims: Vec<(&String, &i32)> = users.iter().filter(|(u, _)| later_users.contains(u.as_str())).take(3).collect();
    let (intents, log) = sc.run_until("first", &sc.run_args(&[]), first.len(), IDLE);
    assert_eq!(intents.len(), first.len(), "{log}");

    // After their valid states: garbage for one user, a newer encoding for another, and a record
    // of no known kind on the changelog; garbage in the local store for a third user.
    let changelog = format!("{}-changelog", sc.group);
    let mut newer = UserState { hidden: vec![0.5; 16], model_version: "whatever".into(), ..Default::default() }.encode();
    newer[0] = STATE_ENCODING_VERSION + 1;
    let poison = vec![
        (*victims[0].1, ChangelogKey::User(victims[0].0).encode(), b"\x03not a state".to_vec()),
        (0, b"#foreign record".to_vec(), b"{\"json\":true}".to_vec()),
        (*victims[1].1, ChangelogKey::User(victims[1].0).encode(), newer),
    ];
    produce_to_partitions(&sc.brokers, &changelog, &poison).unwrap();
    {
        let store = StateStore::open(&sc.state, StoreOptions::default()).unwrap();
        store.commit_encoded([(*victims[2].1, victims[2].0.as_str(), b"\x02\xff".as_slice())], [], []).unwrap();
    }

    // The same instance catches up from the changelog (quarantining its three records) and loads
    // the local garbage with the second half.
    produce_events(&sc.brokers, &sc.input, second).unwrap();
    let addr = free_addr();
    let op = sc.start("second", &sc.run_args(&["--metrics-addr", &addr]));
    let all = sc.intents(events.len(), IDLE);
    assert_eq!(wait_for_metric(&addr, "intentflow_state_records_invalid_total{source=\"changelog\"}", 3), 3);
    assert_eq!(wait_for_metric(&addr, "intentflow_state_records_invalid_total{source=\"store\"}", 1), 1);
    let (status, log) = op.terminate().unwrap();
    assert!(status.success(), "{log}");
    assert_eq!(all.len(), events.len(), "{log}");
    let quarantined: Vec<&str> = log.lines().filter(|l| l.contains("unusable state record quarantined")).collect();
    assert_eq!(quarantined.len(), 4, "{log}");
    assert!(quarantined.iter().any(|l| l.contains("unsupported_state_version") && l.contains(&format!("version {}", STATE_ENCODING_VERSION + 1))), "{quarantined:?}");
    assert!(log.contains(LOCAL_STORE), "{log}");
    assert!(log.lines().any(|l| l.contains("partition restored from the changelog") && !l.contains("tombstones=0")), "{log}");

    // The victims start fresh for the second half; everyone else continues.
    let victim_ids: BTreeSet<&str> = victims.iter().map(|(u, _)| u.as_str()).collect();
    let (fresh, rest): (Vec<Event>, Vec<Event>) = second.iter().cloned().partition(|e| victim_ids.contains(e.user_id.as_str()));
    let mut want = offline_scores(&fresh);
    let continuing: Vec<Event> = events.iter().filter(|e| !victim_ids.contains(e.user_id.as_str())).cloned().collect();
    let rest_users: BTreeSet<&str> = rest.iter().map(|e| e.user_id.as_str()).collect();
    for (user, mut s) in offline_scores(&continuing) {
        if rest_users.contains(user.as_str()) {
            s.scores.drain(..first.iter().filter(|e| e.user_id == user).count());
            want.insert(user, s);
        }
    }
    let second_ids: BTreeSet<&str> = second.iter().filter_map(|e| e.event_id.as_deref()).collect();
    let later: Vec<ScoredIntent> = all.iter().filter(|i| i.event_id.as_deref().is_some_and(|id| second_ids.contains(id))).cloned().collect();
    for (user, got) in intents_by_user(&later) {
        let got: Vec<u32> = got.iter().map(|i| i.score.to_bits()).collect();
        let exp: Vec<u32> = want[&user].scores.iter().map(|s| s.to_bits()).collect();
        assert_eq!(got, exp, "user {user}");
    }

    // Each unusable record went to the dead-letter topic once, with its bytes and its source.
    let dead = dead_letters(&sc.brokers, &sc.dlq, usize::MAX);
    let kinds: Vec<(String, String)> = {
        let mut k: Vec<(String, String)> = dead.iter().map(|d| (d.source_topic.clone(), d.kind.clone())).collect();
        k.sort();
        k
    };
    let mut want_kinds = vec![
        (changelog.clone(), "corrupt_state".to_string()),
        (changelog.clone(), "corrupt_state".to_string()),
        (changelog.clone(), "unsupported_state_version".to_string()),
        (LOCAL_STORE.to_string(), "corrupt_state".to_string()),
    ];
    want_kinds.sort();
    assert_eq!(kinds, want_kinds, "{dead:?}");
    assert!(dead.iter().any(|d| d.value == b"{\"json\":true}"), "the foreign record's bytes are kept");
    assert!(dead.iter().any(|d| d.value == b"\x02\xff" && d.source_offset == -1), "the local record's bytes are kept");

    // A fresh instance restoring the whole changelog ends with the same states.
    let fresh_dir = sc.dir.path().join("fresh").display().to_string();
    let op = sc.start("fresh", &sc.run_args(&["--state-dir", &fresh_dir]));
    wait_for_log(&op, "assigned partitions are up to date with the changelog", IDLE);
    let (status, log) = op.terminate().unwrap();
    assert!(status.success(), "{log}");
    assert_eq!(stored_states(std::path::Path::new(&fresh_dir)), stored_states(&sc.state));
}

/// Scrapes `/metrics` until `series` reaches `at_least` (or a minute passed); returns its value.
fn wait_for_metric(addr: &str, series: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = metric(&http_get(addr, "/metrics"), series);
        if v >= at_least || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
