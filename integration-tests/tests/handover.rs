//! The history → live hand-over at scale, on the real broker.

use intentflow_integration_tests::*;
use intentflow_model::{Device, IntentModel};
use intentflow_pipeline::kafka::KafkaClients;
use intentflow_pipeline::state_dir::{ReplaySource, ReplayStatus, StateDir};
use intentflow_state::{StateStore, StoreOptions, UserState};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

const IDLE: Duration = Duration::from_secs(300);
const USERS: usize = 1_000_000;

/// The distinct user keys (`u` + user id) of changelog `topic` (all partitions, committed
/// records), counted without keeping the records.
fn distinct_user_keys(brokers: &str, topic: &str, partitions: i32) -> usize {
    let consumer: BaseConsumer = KafkaClients::new(brokers).reader_config("it-count", "read_committed").create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut keys: HashSet<Vec<u8>> = HashSet::with_capacity(USERS + 100);
    let mut last = std::time::Instant::now();
    while last.elapsed() < Duration::from_secs(5) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let key = m.key().unwrap_or_default();
            if key.first() == Some(&b'u') {
                keys.insert(key.to_vec());
            }
            last = std::time::Instant::now();
        }
    }
    keys.len()
}

/// Guarantee 6: handing over a replayed state of a million users streams it to the changelog in
/// bounded chunks; killed in the middle, the next start resumes after the last chunk it
/// recorded, and live processing then continues the replayed states where the replay ended.
#[test]
fn a_hand_over_of_a_million_users_streams_in_chunks_and_resumes_after_a_kill() {
    let sc = Scenario::new("handover", 4);
    let version = IntentModel::load(trained_model_dir(), &Device::Cpu).unwrap().version().to_string();
    // A little input history: the replay's end offsets are its high watermarks.
    let history = generated_events(40, 200, 81);
    produce_events(&sc.brokers, &sc.input, &history).unwrap();
    let partition_of = user_partitions(&sc.brokers, &sc.input).unwrap();
    let ends: BTreeMap<i32, i64> = (0..4).map(|p| (p, history_end(&sc.brokers, &sc.input, p))).collect();

    // The state directory a replay of a million users' history leaves: generated states, the
    // input offsets, a complete replay marker. The history's 40 users (on their real
    // partitions) are in their 42nd session.
    let dir = StateDir::new(&sc.state);
    {
        let store = StateStore::open(&sc.state, StoreOptions::bulk()).unwrap();
        store.set_model_version(&version).unwrap();
        let state = UserState { hidden: vec![0.25; 16], model_version: version.clone(), ..Default::default() };
        for chunk in (0..USERS).collect::<Vec<_>>().chunks(100_000) {
            let users: Vec<(i32, String)> = chunk.iter().map(|i| ((*i % 4) as i32, format!("replayed-{i}"))).collect();
            store.commit(users.iter().map(|(p, u)| (*p, u.as_str(), &state)), [], []).unwrap();
        }
        let mut probe = state.clone();
        probe.session.session_seq = 41;
        probe.session.events = 3;
        probe.session.total_events = 100;
        probe.session.started_ms = 1_000_000_000_000;
        probe.session.last_ts_ms = 1_000_000_000_000;
        store.commit(partition_of.iter().map(|(u, p)| (*p, u.as_str(), &probe)), ends.iter().map(|(p, o)| (sc.input.as_str(), *p, *o)), []).unwrap();
        store.flush().unwrap();
    }
    dir.mark_replay(&version, ReplaySource::Topics, ReplayStatus::Complete).unwrap();
    let total_users = USERS + partition_of.len();

    // The first start is killed after its fifth chunk.
    let mut op = Operator::spawn_env("run", &sc.run_args(&[]), sc.dir.path().join("killed.log"), &[("FAILPOINTS", "handover-chunk=4*off->return")]).unwrap();
    let (status, log) = op.wait_exit(IDLE).unwrap().expect("the failpoint ends the hand-over");
    assert!(!status.success() && log.contains("failpoint handover-chunk"), "{log}");
    assert!(log.contains("users=250000 chunk=5"), "{log}");
    assert_eq!(dir.replay_status().unwrap(), Some(ReplayStatus::Complete), "not adopted yet");

    // The second resumes where the first stopped and hands over the rest.
    let mut op = sc.start("resumed", &sc.run_args(&[]));
    let started = std::time::Instant::now();
    while !op.log_text().contains("replayed state handed over") {
        assert!(op.exited().is_none() && started.elapsed() < IDLE, "log:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = op.log_text();
    assert!(log.contains("resuming an interrupted hand-over"), "{log}");
    assert!(log.contains(&format!("users={} chunk=", total_users - 250_000)), "{log}");
    assert_eq!(dir.replay_status().unwrap(), None, "the replay marker was renamed ADOPTED");

    // The group continues at the replay's end offsets...
    let consumer: BaseConsumer = KafkaClients::new(&sc.brokers).base().set("group.id", &sc.group).create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..4 {
        tpl.add_partition(&sc.input, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    for (p, end) in &ends {
        assert_eq!(committed.find_partition(&sc.input, *p).unwrap().offset(), rdkafka::Offset::Offset(*end), "partition {p}");
    }
    // ...and live events continue the replayed states (a 43rd session, not a first one).
    let live = generated_events(40, 120, 82);
    produce_events(&sc.brokers, &sc.input, &live).unwrap();
    let intents = sc.intents(live.len(), IDLE);
    let (status, log) = op.terminate().unwrap();
    assert!(status.success(), "{log}");
    assert_eq!(intents.len(), live.len());
    for i in intents.iter().filter(|i| partition_of.contains_key(&i.user_id)) {
        assert!(i.session_seq >= 42, "{} started over instead of continuing its replayed state: {i:?}", i.user_id);
    }
    // Every replayed state is on the changelog, so any instance can restore it.
    let changelog_users = distinct_user_keys(&sc.brokers, &format!("{}-changelog", sc.group), 4);
    assert_eq!(changelog_users, total_users, "users on the changelog");
}

/// The high watermark of `topic`/`partition`.
fn history_end(brokers: &str, topic: &str, partition: i32) -> i64 {
    let consumer: BaseConsumer = KafkaClients::new(brokers).base().create().unwrap();
    consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)).unwrap().1
}
