//! `intentflow replay` on the real broker: exact bounds, determinism, equality with the live
//! operator, file sources.

use intentflow_integration_tests::*;
use intentflow_formats::columnar;
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
    // Loaded as a user would: `intentflow import --event-time` stamps records with event times.
    let file = sc.dir.path().join("events.jsonl");
    std::fs::write(&file, events.iter().map(|e| serde_json::to_string(e).unwrap() + "\n").collect::<String>()).unwrap();
    let (status, log) = intentflow(&["import", "--format", "jsonl", "--input", &file.display().to_string(), "--topic", &sc.input, "--brokers", &sc.brokers, "--event-time"]);
    assert!(status.success(), "{log}");
    let (t0, t1) = (events[2_000].ts, events[6_000].ts);
    let (from, to) = (chrono_rfc3339(t0), chrono_rfc3339(t1));

    let out = sc.dir.path().join("window.jsonl");
    let log = replay(&sc, "state-window", &out, &["--from", &from, "--to", &to]);
    let got: BTreeSet<String> = read_jsonl(&out).into_iter().map(|i| i.event_id.unwrap()).collect();
    let want: BTreeSet<String> = events.iter().filter(|e| e.ts >= t0 && e.ts < t1).map(|e| e.event_id.as_deref().unwrap().to_string()).collect();
    assert_eq!(got.len(), want.len(), "{log}");
    assert!(got == want, "the replayed events are exactly those with {from} <= time < {to}");

    // A topic that the import creates keeps such records: unlimited time retention.
    let history = format!("{}-history", sc.input);
    let (status, log) = intentflow(&["import", "--format", "jsonl", "--input", &file.display().to_string(), "--topic", &history, "--brokers", &sc.brokers, "--event-time"]);
    assert!(status.success(), "{log}");
    assert_eq!(topic_config(&sc.brokers, &history, "retention.ms").as_deref(), Some("-1"));

    // The same window over the file, bounded by event time.
    let out = sc.dir.path().join("file-window.jsonl");
    let (model, state) = (trained_model_dir().display().to_string(), sc.dir.path().join("state-file").display().to_string());
    let (status, log) = intentflow(&["replay", "--input-file", &file.display().to_string(), "--from", &from, "--to", &to, "--model-dir", &model, "--state-dir", &state, "--output", &out.display().to_string()]);
    assert!(status.success(), "{log}");
    let from_file: BTreeSet<String> = read_jsonl(&out).into_iter().map(|i| i.event_id.unwrap()).collect();
    assert!(from_file == want, "the file replay's window differs");

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
    let (live, _) = sc.run_until("live", &sc.run_args(&[]), events.len(), IDLE);

    let (a, b) = (sc.dir.path().join("a.jsonl"), sc.dir.path().join("b.jsonl"));
    let log = replay(&sc, "state-a", &a, &[]);
    assert!(log.contains("12000 events, 12000 intents out, 0 invalid"), "{log}");
    replay(&sc, "state-b", &b, &["--max-batch-records", "777"]);
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "two replays (different batch sizes) wrote different bytes");
    // Parquet outputs too, and they hold the same intents.
    let (c, d) = (sc.dir.path().join("c.parquet"), sc.dir.path().join("d.parquet"));
    replay(&sc, "state-c", &c, &["--max-batch-records", "777"]);
    replay(&sc, "state-d", &d, &["--max-batch-records", "5000"]);
    assert!(std::fs::read(&c).unwrap() == std::fs::read(&d).unwrap(), "two Parquet replays wrote different bytes");
    assert!(columnar::read_intents(&c).unwrap() == read_jsonl(&a), "the Parquet output differs from the JSONL output");
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

/// Guarantee 5: with two co-partitioned input topics and a non-default record size limit, a
/// replay applies each partition's records in the live operator's order (timestamp, then topic
/// order) under the run's limits: the same intents and the same states.
#[test]
fn a_replay_of_two_input_topics_under_the_runs_limits_equals_the_live_operator() {
    let sc = Scenario::new("two-topics", 4);
    let carts = unique("two-topics-carts");
    create_topic(&sc.brokers, &carts, 4).unwrap();
    let events = generated_events(300, 6_000, 79);
    let (views, others): (Vec<_>, Vec<_>) = events.iter().cloned().partition(|e| e.kind == intentflow_schemas::EventType::View);
    // Views on the first topic, the rest on the second, each record stamped with its event time.
    produce_events_at(&sc.brokers, &sc.input, &views).unwrap();
    produce_events_at(&sc.brokers, &carts, &others).unwrap();
    // One more event, too large for the default limit of 64 KiB but within the run's 128 KiB.
    let mut padded = serde_json::to_value(&events[0]).unwrap();
    padded["padding"] = serde_json::Value::String("x".repeat(70_000));
    padded["event_id"] = serde_json::Value::String("padded".into());
    produce(&sc.brokers, &sc.input, &[(events[0].user_id.to_string(), serde_json::to_vec(&padded).unwrap())]).unwrap();
    let config = sc.dir.path().join("run.toml");
    // Never release a partition's records without waiting for the other topic: a slow fetch must
    // not change the order under test.
    std::fs::write(&config, "max_record_bytes = 131072\nmax_task_idle_ms = 600000\n").unwrap();
    let config = config.display().to_string();

    let args = sc.run_args(&["--config", &config, "--input-topic", &sc.input, "--input-topic", &carts]);
    let (live, log) = sc.run_until("live", &args, events.len() + 1, IDLE);
    assert_eq!(live.len(), events.len() + 1, "the padded record is valid under the run's limit; log:\n{log}");

    let out = sc.dir.path().join("replay.jsonl");
    let (model, state) = (trained_model_dir().display().to_string(), sc.dir.path().join("state-replay"));
    let state_arg = state.display().to_string();
    let (status, log) = intentflow(&[
        "replay", "--config", &config, "--brokers", &sc.brokers, "--input-topic", &sc.input, "--input-topic", &carts,
        "--model-dir", &model, "--state-dir", &state_arg, "--output", &out.display().to_string(),
    ]);
    assert!(status.success(), "{log}");
    let replayed = read_jsonl(&out);
    assert_eq!(replayed.len(), events.len() + 1, "{log}");
    let strip = |v: Vec<ScoredIntent>| -> BTreeMap<String, Vec<ScoredIntent>> {
        let mut by_user: BTreeMap<String, Vec<ScoredIntent>> = BTreeMap::new();
        for i in v {
            by_user.entry(i.user_id.clone()).or_default().push(ScoredIntent { emitted_at: String::new(), ..i });
        }
        by_user
    };
    assert!(strip(replayed) == strip(live), "the replay applied the two topics in another order than the live operator");
    assert_eq!(stored_states(&state), stored_states(&sc.state), "replayed states equal the live operator's");
}

#[test]
fn a_file_replay_equals_the_topic_replay_of_the_same_events() {
    let sc = Scenario::new("replay-file", 4);
    let events = generated_events(300, 6_000, 63);
    produce_events(&sc.brokers, &sc.input, &events).unwrap();
    let jsonl = |path: &Path, events: &mut dyn Iterator<Item = &intentflow_schemas::Event>| {
        std::fs::write(path, events.map(|e| serde_json::to_string(e).unwrap() + "\n").collect::<String>()).unwrap();
    };
    let file = sc.dir.path().join("events.jsonl");
    jsonl(&file, &mut events.iter());
    // A data-lake layout of the same events: every user's events spread over a Parquet part
    // (made by `intentflow import`) and a JSONL part, plus a marker file to skip.
    let lake = sc.dir.path().join("lake");
    std::fs::create_dir_all(lake.join("day=1")).unwrap();
    std::fs::write(lake.join("_SUCCESS"), b"").unwrap();
    let even = sc.dir.path().join("even.jsonl");
    jsonl(&even, &mut events.iter().step_by(2));
    jsonl(&lake.join("day=1/part-1.jsonl"), &mut events.iter().skip(1).step_by(2));
    let part0 = lake.join("day=1/part-0.parquet").display().to_string();
    let (status, log) = intentflow(&["import", "--format", "jsonl", "--input", &even.display().to_string(), "--output", &part0]);
    assert!(status.success(), "{log}");

    let from_topic = sc.dir.path().join("topic.jsonl");
    replay(&sc, "state-topic", &from_topic, &[]);
    let model = trained_model_dir().display().to_string();
    let from_file = |input: &Path, state: &str, out: &Path, extra: &[&str]| {
        let (input, out) = (input.display().to_string(), out.display().to_string());
        let state = sc.dir.path().join(state).display().to_string();
        let mut args = vec!["replay", "--input-file", &input, "--model-dir", &model, "--state-dir", &state, "--output", &out];
        args.extend_from_slice(extra);
        let (status, log) = intentflow(&args);
        assert!(status.success(), "{log}");
        log
    };
    let (from_jsonl, from_lake) = (sc.dir.path().join("file.jsonl"), sc.dir.path().join("lake.parquet"));
    from_file(&file, "state-file", &from_jsonl, &[]);
    let log = from_file(&lake, "state-lake", &from_lake, &[]);
    assert!(log.contains("6000 events, 6000 intents out, 0 invalid"), "{log}");
    assert!(!log.contains("merging sorted runs"), "6,000 events fit in memory: {log}");

    // Sorting in bounded memory (runs of 500 events spilled to disk and merged) changes nothing:
    // the same file bytes and the same states; the spilled runs are removed.
    let (spill, from_spilled) = (sc.dir.path().join("spill"), sc.dir.path().join("lake-spilled.parquet"));
    let log = from_file(&lake, "state-spilled", &from_spilled, &["--max-events-in-memory", "500", "--spill-dir", &spill.display().to_string()]);
    assert!(log.contains("merging sorted runs from disk") && log.contains("runs=12"), "{log}");
    assert!(std::fs::read(&from_spilled).unwrap() == std::fs::read(&from_lake).unwrap(), "a spilled sort changed the output");
    assert_eq!(stored_states(&sc.dir.path().join("state-spilled")), stored_states(&sc.dir.path().join("state-lake")));
    assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0, "spilled runs left behind");

    // Per user, the same events in the same order with bit-identical scores.
    let by_user = |intents: Vec<ScoredIntent>| {
        let mut m: BTreeMap<String, Vec<(String, u32)>> = BTreeMap::new();
        for i in intents {
            m.entry(i.user_id.clone()).or_default().push((i.event_id.unwrap(), i.score.to_bits()));
        }
        m
    };
    let t = by_user(read_jsonl(&from_topic));
    assert_eq!(t.len(), 300);
    assert!(t == by_user(read_jsonl(&from_jsonl)), "JSONL file and topic replays disagree");
    assert!(t == by_user(columnar::read_intents(&from_lake).unwrap()), "the Parquet + JSONL directory replay and the topic replay disagree");
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
    let consumer: BaseConsumer = intentflow_pipeline::kafka::KafkaClients::new(&sc.brokers).base().set("group.id", "intentflow-replay").create().unwrap();
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
/// A topic's configuration value, as the broker describes it.
fn topic_config(brokers: &str, topic: &str, key: &str) -> Option<String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let described = rt.block_on(admin.describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())).unwrap();
    described.into_iter().next()?.ok()?.get(key)?.value.clone()
}

fn chrono_rfc3339(ms: i64) -> String {
    intentflow_schemas::format_ts_ms(ms)
}

#[test]
fn history_then_live_hand_off_skips_nothing_and_applies_nothing_twice() {
    let sc = Scenario::new("handoff", 4);
    let events = generated_events(500, 12_000, 65);
    let (history, live) = events.split_at(7_000);
    produce_events(&sc.brokers, &sc.input, history).unwrap();
    // 1. Replay all history into the state directory the live operator will use.
    let model = trained_model_dir().display().to_string();
    let state = sc.state.display().to_string();
    let history_out = sc.dir.path().join("history.jsonl");
    let (status, log) = intentflow(&["replay", "--brokers", &sc.brokers, "--input-topic", &sc.input, "--model-dir", &model, "--state-dir", &state, "--output", &history_out.display().to_string()]);
    assert!(status.success(), "{log}");
    // 2. Live events arrive; the operator adopts the replayed state and goes on from there.
    produce_events(&sc.brokers, &sc.input, live).unwrap();
    let (intents, log) = sc.run_until("live", &sc.run_args(&[]), live.len(), IDLE);
    assert!(log.contains("replayed state handed over"), "{log}");
    assert!(sc.state.join("ADOPTED").exists());

    // Live scores only for live events, each once, none for history; the final states are those
    // of one uninterrupted pass over history + live (every event applied exactly once).
    let all = sc.intents(usize::MAX, Duration::from_secs(3));
    assert_eq!(all.len(), live.len(), "history was not re-emitted live");
    let live_ids: BTreeSet<String> = live.iter().map(|e| e.event_id.as_deref().unwrap().to_string()).collect();
    assert!(all.iter().all(|i| live_ids.contains(i.event_id.as_deref().unwrap())));
    assert_states_match_offline(&stored_states(&sc.state), &events);
    drop(intents);
}

#[test]
fn a_model_swap_goes_through_a_replay_and_a_mismatched_state_is_refused() {
    let sc = Scenario::new("swap", 2);
    let events = generated_events(200, 4_000, 66);
    produce_events(&sc.brokers, &sc.input, &events).unwrap();
    assert_eq!(sc.run_until("old", &sc.run_args(&[]), events.len(), IDLE).0.len(), events.len());

    // The live state was built by the old model: the new one refuses to continue it...
    let new_model = other_model_dir(8);
    let new = new_model.path().display().to_string();
    let mut refused = sc.start("refused", &sc.run_args(&["--model-dir", &new]));
    let (status, log) = refused.wait_exit(IDLE).unwrap().expect("the operator must refuse a state of another model");
    assert!(!status.success() && log.contains("was built by model"), "{log}");

    // ...so replay history with the new model into a fresh state directory and switch to it
    // (a new group, so a new changelog: the old one holds the old model's states).
    let swapped = sc.dir.path().join("state-new").display().to_string();
    let (status, log) = intentflow(&["replay", "--brokers", &sc.brokers, "--input-topic", &sc.input, "--model-dir", &new, "--state-dir", &swapped, "--output", &sc.dir.path().join("new.jsonl").display().to_string()]);
    assert!(status.success(), "{log}");
    let group = format!("{}-v2", sc.group);
    let more = generated_events(200, 1_000, 67);
    produce_events(&sc.brokers, &sc.input, &more).unwrap();
    let (out, _) = sc.run_until("new", &sc.run_args(&["--model-dir", &new, "--state-dir", &swapped, "--group", &group]), events.len() + more.len(), IDLE);
    let version = intentflow_model::IntentModel::load(new_model.path(), &intentflow_model::Device::Cpu).unwrap().version().to_string();
    let new_intents: Vec<&ScoredIntent> = out.iter().filter(|i| i.model_version == version).collect();
    assert_eq!(new_intents.len(), more.len(), "the swapped operator scores only the new events, with the new model");
    let states = stored_states(&sc.dir.path().join("state-new"));
    assert!(states.values().all(|s| s.model_version == version));

    // Or start every user from zero, when told to.
    let op = sc.start("reset", &sc.run_args(&["--model-dir", &new, "--reset-state-on-model-change"]));
    std::thread::sleep(Duration::from_secs(3));
    let (status, log) = op.terminate().unwrap();
    assert!(status.success() && log.contains("every user starts from zero"), "{log}");
}

#[test]
fn run_bootstrap_from_builds_history_then_goes_live_in_one_command() {
    let sc = Scenario::new("bootstrap", 4);
    let events = generated_events(400, 9_000, 68);
    let (history, live) = events.split_at(5_000);
    produce_events(&sc.brokers, &sc.input, history).unwrap();
    let backfill = format!("{}-history", sc.input);
    let op = sc.start("op", &sc.run_args(&["--bootstrap-from", "earliest", "--bootstrap-output-topic", &backfill]));
    let started = std::time::Instant::now();
    while !op.log_text().contains("replayed state handed over") {
        assert!(started.elapsed() < IDLE, "no hand-over; log:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    produce_events(&sc.brokers, &sc.input, live).unwrap();
    let intents = sc.intents(live.len(), IDLE);
    let (status, log) = op.terminate().unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("bootstrap: states built from history"), "{log}");
    assert_eq!(intents.len(), live.len(), "live intents for live events only");
    assert_eq!(sc.intents(usize::MAX, Duration::from_secs(3)).len(), live.len());
    assert_states_match_offline(&stored_states(&sc.state), &events);
    // Asked for, the history's intents went to the backfill topic: one per history event.
    let history_ids: BTreeSet<String> = history.iter().map(|e| e.event_id.as_deref().unwrap().to_string()).collect();
    let backfilled = read_intents(&sc.brokers, &backfill, usize::MAX, Duration::from_secs(3)).unwrap();
    assert_eq!(backfilled.len(), history.len());
    assert!(backfilled.into_iter().map(|i| i.event_id.unwrap()).collect::<BTreeSet<_>>() == history_ids);
}

#[test]
fn a_crashed_replay_is_refused_and_a_failed_start_leaves_the_directory_usable() {
    let sc = Scenario::new("replay-crash", 4);
    let model = trained_model_dir().display().to_string();
    let state = sc.dir.path().join("state-crash");
    let out = sc.dir.path().join("out.jsonl").display().to_string();
    let replay_args = |input: &Path| -> Vec<String> {
        let args = ["--input-file", &input.display().to_string(), "--model-dir", &model, "--state-dir", &state.display().to_string(), "--output", &out, "--max-batch-records", "256"];
        args.iter().map(|s| s.to_string()).collect()
    };
    let cli = |command: &str, args: &[String]| {
        let all: Vec<&str> = [command].into_iter().chain(args.iter().map(String::as_str)).collect();
        intentflow(&all)
    };

    // An input that cannot be read fails before anything is written: the directory stays usable.
    let corrupt = sc.dir.path().join("corrupt.parquet");
    std::fs::write(&corrupt, [&b"PAR1"[..], &[0; 64], b"PAR1"].concat()).unwrap();
    let (status, log) = cli("replay", &replay_args(&corrupt));
    assert!(!status.success() && log.contains("corrupt.parquet"), "{log}");
    assert!(!state.join("REPLAY").exists(), "a replay that wrote nothing marks nothing");

    // A replay killed once it has started writing leaves a directory marked `running`.
    let file = sc.dir.path().join("events.jsonl");
    let events = generated_events(2_000, 200_000, 70);
    std::fs::write(&file, events.iter().map(|e| serde_json::to_string(e).unwrap() + "\n").collect::<String>()).unwrap();
    let mut replay = Operator::spawn("replay", &replay_args(&file), sc.dir.path().join("replay.log")).unwrap();
    let marker = state.join("REPLAY");
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&marker).unwrap_or_default().contains("status running") {
        assert!(started.elapsed() < IDLE, "the replay never started writing; log:\n{}", replay.log_text());
        assert!(replay.wait_exit(Duration::from_millis(20)).unwrap().is_none(), "the replay exited early:\n{}", replay.log_text());
    }
    replay.crash().unwrap();
    assert!(std::fs::read_to_string(&marker).unwrap().contains("status running"), "the replay finished before it was killed");

    // Neither a new replay nor the live operator continues it.
    let (status, log) = cli("replay", &replay_args(&file));
    assert!(!status.success() && log.contains("did not finish"), "{log}");
    let (status, log) = cli("run", &sc.run_args(&["--state-dir", &state.display().to_string()]));
    assert!(!status.success() && log.contains("did not finish"), "{log}");
}
