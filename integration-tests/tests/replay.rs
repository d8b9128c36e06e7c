//! `intentflow replay` on the real broker: exact bounds, determinism, equality with the live
//! operator, file sources.

use intentflow_integration_tests::*;
use intentflow_schemas::ScoredIntent;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

const IDLE: Duration = Duration::from_secs(120);

fn read_jsonl(path: &Path) -> Vec<ScoredIntent> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `intentflow replay` of `sc`'s input into `out` with a state in `state`; asserts it exits 0.
fn replay(sc: &Scenario, state: &str, out: &Path, range: &[&str]) -> String {
    let model = trained_model_dir().display().to_string();
    let (out, state) = (out.display().to_string(), sc.dir.path().join(state).display().to_string());
    let mut args = vec!["replay", "--brokers", &sc.brokers, "--input-topic", &sc.input, "--model-dir", &model, "--state-dir", &state, "--output", &out];
    args.extend_from_slice(range);
    let (status, log) = intentflow(&args);
    assert!(status.success(), "replay failed: {log}");
    log
}

#[test]
fn time_and_offset_bounds_are_exact_per_partition() {
    let sc = Scenario::new("replay-bounds", 4);
    let events = generated_events(400, 8_000, 61);
    produce_events_at_event_time(&sc.brokers, &sc.input, &events).unwrap();
    let (t0, t1) = (events[2_000].ts, events[6_000].ts);
    let (from, to) = (chrono_rfc3339(t0), chrono_rfc3339(t1));

    let out = sc.dir.path().join("window.jsonl");
    let log = replay(&sc, "state-window", &out, &["--from", &from, "--to", &to]);
    let got: BTreeSet<String> = read_jsonl(&out).into_iter().map(|i| i.event_id.unwrap()).collect();
    let want: BTreeSet<String> = events.iter().filter(|e| e.ts >= t0 && e.ts < t1).map(|e| e.event_id.clone().unwrap()).collect();
    assert_eq!(got.len(), want.len(), "{log}");
    assert!(got == want, "the replayed events are exactly those with {from} <= time < {to}");

    // Explicit offsets: [5, 10) of every partition, nothing else.
    let out = sc.dir.path().join("offsets.jsonl");
    replay(&sc, "state-offsets", &out, &["--from", "0:5,1:5,2:5,3:5", "--to", "0:10,1:10,2:10,3:10"]);
    let positions: BTreeSet<(i32, i64)> = read_jsonl(&out).iter().map(|i| (i.source.partition, i.source.offset)).collect();
    let want: BTreeSet<(i32, i64)> = (0..4).flat_map(|p| (5..10).map(move |o| (p, o))).collect();
    assert_eq!(positions, want);
}

#[test]
fn replays_are_byte_identical_and_equal_the_live_operator() {
    let sc = Scenario::new("replay-live", 4);
    let events = generated_events(600, 12_000, 62);
    produce_events(&sc.brokers, &sc.input, &events).unwrap();
    let op = sc.start("live", &sc.run_args(&[]));
    let live = sc.intents(events.len(), IDLE);
    let (status, log) = op.terminate().unwrap();
    assert!(status.success(), "{log}");

    let (a, b) = (sc.dir.path().join("a.jsonl"), sc.dir.path().join("b.jsonl"));
    let log = replay(&sc, "state-a", &a, &[]);
    assert!(log.contains("12000 events, 12000 intents out, 0 invalid"), "{log}");
    replay(&sc, "state-b", &b, &["--max-batch-records", "777"]);
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "two replays (different batch sizes) wrote different bytes");
    assert_eq!(stored_states(&sc.dir.path().join("state-a")), stored_states(&sc.dir.path().join("state-b")));
    assert_eq!(stored_states(&sc.dir.path().join("state-a")), stored_states(&sc.state), "replayed states equal the live operator's");

    // The same intents as the live operator, but for emitted_at (replays stamp the event time).
    let key = |i: &ScoredIntent| (i.source.partition, i.source.offset);
    let live: BTreeMap<(i32, i64), ScoredIntent> = live.into_iter().map(|i| (key(&i), ScoredIntent { emitted_at: String::new(), ..i })).collect();
    let replayed: BTreeMap<(i32, i64), ScoredIntent> =
        read_jsonl(&a).into_iter().map(|i| (key(&i), ScoredIntent { emitted_at: String::new(), ..i })).collect();
    assert_eq!(replayed.len(), events.len());
    assert!(replayed == live, "replayed intents differ from the live operator's");
}

#[test]
fn a_file_replay_equals_the_topic_replay_of_the_same_events() {
    let sc = Scenario::new("replay-file", 4);
    let events = generated_events(300, 6_000, 63);
    produce_events(&sc.brokers, &sc.input, &events).unwrap();
    let file = sc.dir.path().join("events.jsonl");
    std::fs::write(&file, events.iter().map(|e| serde_json::to_string(e).unwrap() + "\n").collect::<String>()).unwrap();

    let from_topic = sc.dir.path().join("topic.jsonl");
    replay(&sc, "state-topic", &from_topic, &[]);
    let from_file = sc.dir.path().join("file.jsonl");
    let model = trained_model_dir().display().to_string();
    let state = sc.dir.path().join("state-file").display().to_string();
    let (status, log) = intentflow(&["replay", "--input-file", &file.display().to_string(), "--model-dir", &model, "--state-dir", &state, "--output", &from_file.display().to_string()]);
    assert!(status.success(), "{log}");

    // Per user, the same events in the same order with bit-identical scores.
    let by_user = |path: &Path| {
        let mut m: BTreeMap<String, Vec<(String, u32)>> = BTreeMap::new();
        for i in read_jsonl(path) {
            m.entry(i.user_id.clone()).or_default().push((i.event_id.unwrap(), i.score.to_bits()));
        }
        m
    };
    let (t, f) = (by_user(&from_topic), by_user(&from_file));
    assert_eq!(t.len(), 300);
    assert!(t == f, "file and topic replays disagree");
}

#[test]
fn a_replay_to_the_default_backfill_topic_exits_on_its_own() {
    let sc = Scenario::new("replay-topic", 2);
    let events = generated_events(100, 2_000, 64);
    produce_events(&sc.brokers, &sc.input, &events).unwrap();
    let model = trained_model_dir().display().to_string();
    let state = sc.dir.path().join("state-replay").display().to_string();
    let (status, log) = intentflow(&["replay", "--brokers", &sc.brokers, "--input-topic", &sc.input, "--model-dir", &model, "--state-dir", &state]);
    assert!(status.success(), "{log}");
    let backfill = read_intents(&sc.brokers, &format!("{}-backfill", sc.input), events.len(), IDLE).unwrap();
    assert_eq!(backfill.len(), events.len());
    // It never committed offsets for any group, its own included.
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = intentflow_pipeline::kafka::client_config(&sc.brokers, &Default::default()).set("group.id", "intentflow-replay").create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(&sc.input, 0);
    tpl.add_partition(&sc.input, 1);
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    assert!(committed.elements().iter().all(|e| e.offset() == rdkafka::Offset::Invalid), "{committed:?}");
    // A live operator's state directory is refused.
    std::fs::create_dir_all(&sc.state).unwrap();
    std::fs::write(sc.state.join("INSTANCE_ID"), "abc").unwrap();
    let (status, log) = intentflow(&["replay", "--brokers", &sc.brokers, "--input-topic", &sc.input, "--model-dir", &model, "--state-dir", &sc.state.display().to_string()]);
    assert!(!status.success() && log.contains("live operator's state directory"), "{log}");
}

/// RFC 3339 text of epoch milliseconds.
fn chrono_rfc3339(ms: i64) -> String {
    intentflow_schemas::format_ts_ms(ms)
}
