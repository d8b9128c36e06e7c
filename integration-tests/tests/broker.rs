//! The end-to-end slice on a real Kafka broker: events → RocksDB state → GRU → intents.

use intentflow_integration_tests::*;
use intentflow_schemas::{Event, ScoredIntent};
use intentflow_state::{StateStore, StoreOptions};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

const IDLE: Duration = Duration::from_secs(120);

/// Every valid input has exactly one intent, in its user's event order, with the offline score;
/// the final states equal the offline final states.
fn assert_matches_offline(intents: &[ScoredIntent], events: &[Event], state_dir: &std::path::Path) {
    assert_exactly_once(intents, events, &stored_states(state_dir));
}

/// At-least-once output: waits until each of the `events` input positions has an intent
/// (repeats count in the topic size, so the size only tells when to look); `op`'s log goes
/// into a failure. Returns the positions scored.
fn wait_for_every_input(sc: &Scenario, events: usize, op: &Operator) -> HashSet<(i32, i64)> {
    let started = Instant::now();
    loop {
        while topic_size(&sc.brokers, &sc.output).unwrap() < events as i64 {
            assert!(started.elapsed() < IDLE, "no progress; log:\n{}", op.log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
        let seen: HashSet<(i32, i64)> =
            sc.intents(usize::MAX, Duration::from_secs(2)).iter().map(|i| (i.source.partition, i.source.offset)).collect();
        if seen.len() == events {
            return seen;
        }
        assert!(started.elapsed() < IDLE, "{} of {} inputs scored; log:\n{}", seen.len(), events, op.log_text());
    }
}

/// The first intent of each input position among `all`, asserting that every repeat carries
/// its first score (a repeat re-scores an event from the state its first scoring started from).
fn first_intents(all: &[ScoredIntent]) -> Vec<ScoredIntent> {
    let mut first_score: BTreeMap<(i32, i64), f32> = BTreeMap::new();
    let mut unique = Vec::new();
    for i in all {
        match first_score.get(&(i.source.partition, i.source.offset)) {
            Some(s) => assert!((s - i.score).abs() <= 1e-6, "a repeat with another score"),
            None => {
                first_score.insert((i.source.partition, i.source.offset), i.score);
                unique.push(i.clone());
            }
        }
    }
    unique
}

#[test]
fn streamed_scores_equal_offline_scores_across_four_partitions() {
    let sc = Scenario::new("oracle", 4);
    let events = generated_events(1_200, 24_000, 7);
    produce_events(&sc.brokers, &sc.input, &events).unwrap();

    let (intents, log) = sc.run_until("op", &sc.run_args(&["--reasons"]), events.len(), IDLE);
    assert!(log.contains("24000 records in, 24000 intents out, 0 invalid"), "summary missing; log:\n{log}");
    // `--reasons`: intents name up to three of the model's signals.
    let with_reasons = intents.iter().filter(|i| !i.reasons.is_empty()).count();
    assert!(with_reasons > intents.len() / 10, "{with_reasons} of {} intents carry reasons", intents.len());
    assert!(intents.iter().all(|i| i.reasons.len() <= 3 && i.reasons.iter().all(|r| intentflow_model::REASON_NAMES.contains(&r.as_str()))));
    // Measured from outside: `eval --intents` scores what the operator streamed, and finds what
    // stepping the model offline finds.
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, lines: Vec<String>| {
        let path = files.path().join(name);
        std::fs::write(&path, lines.join("\n")).unwrap();
        path.display().to_string()
    };
    let events_file = write("events.jsonl", events.iter().map(|e| serde_json::to_string(e).unwrap()).collect());
    let intents_file = write("intents.jsonl", intents.iter().map(|i| serde_json::to_string(i).unwrap()).collect());
    let model = trained_model_dir().display().to_string();
    let mut metrics = Vec::new();
    for (name, extra) in [("offline", vec![]), ("streamed", vec!["--intents", intents_file.as_str()])] {
        let out = files.path().join(name).display().to_string();
        let mut args = vec!["eval", "--model-dir", &model, "--input", &events_file, "--part", "all", "--bootstrap", "0", "--out-dir", &out];
        args.extend(extra);
        let (status, log) = intentflow(&args);
        assert!(status.success(), "{name} eval: {log}");
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(files.path().join(name).join("metrics.json")).unwrap()).unwrap();
        metrics.push(m);
    }
    assert_eq!(metrics[1]["streamed"], true);
    for key in ["roc_auc", "pr_auc", "log_loss"] {
        let (offline, streamed) = (metrics[0]["scorers"][0]["metrics"][key].as_f64().unwrap(), metrics[1]["scorers"][0]["metrics"][key].as_f64().unwrap());
        assert!((offline - streamed).abs() < 1e-6, "{key}: offline {offline}, streamed {streamed}");
    }

    let partitions: HashSet<i32> = intents.iter().map(|i| i.source.partition).collect();
    assert_eq!(partitions.len(), 4, "events interleaved across 4 partitions");
    assert_matches_offline(&intents, &events, &sc.state);
    let store = StateStore::open(&sc.state, StoreOptions::default()).unwrap();
    let recorded: i64 = (0..4).map(|p| store.offset(&sc.input, p).unwrap().unwrap()).sum();
    assert_eq!(recorded, events.len() as i64, "the store records the next offset of every partition");
}

#[test]
fn sigterm_mid_stream_then_restart_loses_and_repeats_nothing() {
    let sc = Scenario::new("restart", 4);
    let events = generated_events(1_000, 30_000, 11);
    produce_events(&sc.brokers, &sc.input, &events).unwrap();

    // Small batches make the first run slow enough to stop it in the middle.
    let first = sc.start("first", &sc.run_args(&["--max-batch-records", "25", "--commit-interval-ms", "1"]));
    let started = Instant::now();
    while topic_size(&sc.brokers, &sc.output).unwrap() < 2_000 {
        assert!(started.elapsed() < IDLE, "no progress; log:\n{}", first.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, log) = first.terminate().unwrap();
    assert!(status.success(), "first run exit {status}; log:\n{log}");
    let before = sc.intents(usize::MAX, Duration::from_secs(3));
    assert!(before.len() < events.len(), "the first run was stopped mid-stream ({} of {})", before.len(), events.len());

    let (intents, _) = sc.run_until("second", &sc.run_args(&[]), events.len(), IDLE);
    // Nothing beyond the expected count arrived either.
    let all = sc.intents(usize::MAX, Duration::from_secs(3));
    assert_eq!(all.len(), events.len(), "exactly one intent per event across both runs");

    let first_users: HashSet<&str> = before.iter().map(|i| i.user_id.as_str()).collect();
    let before_sources: HashSet<(i32, i64)> = before.iter().map(|i| (i.source.partition, i.source.offset)).collect();
    let continued = intents
        .iter()
        .filter(|i| !before_sources.contains(&(i.source.partition, i.source.offset)) && first_users.contains(i.user_id.as_str()))
        .count();
    assert!(continued > 0, "some users have events on both sides of the restart");
    assert_matches_offline(&intents, &events, &sc.state);
}

#[test]
fn sigkill_mid_stream_then_restart_loses_nothing_and_applies_each_event_once() {
    let sc = Scenario::new("crash", 4);
    let events = generated_events(1_000, 30_000, 17);
    produce_events(&sc.brokers, &sc.input, &events).unwrap();

    // A killed member stays in the group until its session times out; a short session (set
    // through the TOML config's librdkafka pass-through) lets the restart take over quickly.
    let config = sc.dir.path().join("run.toml");
    std::fs::write(&config, "[kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n").unwrap();
    let config = config.display().to_string();
    let first = sc.start("first", &sc.run_args(&["--config", &config, "--processing-guarantee", "at_least_once", "--max-batch-records", "25", "--commit-interval-ms", "1"]));
    let started = Instant::now();
    while topic_size(&sc.brokers, &sc.output).unwrap() < 2_000 {
        assert!(started.elapsed() < IDLE, "no progress; log:\n{}", first.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    first.crash().unwrap();

    let second = sc.start("second", &sc.run_args(&["--config", &config, "--processing-guarantee", "at_least_once"]));
    let inputs = wait_for_every_input(&sc, events.len(), &second);
    let (status, log) = second.terminate().unwrap();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert_eq!(inputs.len(), events.len(), "no event lost");

    // A repeated intent comes from re-scoring a batch whose state was not yet written: it
    // carries the same score as the first time, because the state it started from is the same.
    let all = sc.intents(usize::MAX, Duration::from_secs(3));
    let unique = first_intents(&all);
    eprintln!("crash test: {} intents for {} events ({} repeats)", all.len(), events.len(), all.len() - events.len());
    // Each event applied to the hidden states exactly once: scores and final states are those
    // of an uninterrupted offline pass.
    assert_matches_offline(&unique, &events, &sc.state);
}

/// Under at-least-once a unit's commit runs while the next unit is scored; instances joining
/// and dying land rebalances among those commits in flight. None may lose an event, apply one
/// twice to a state or leave a stale state on the changelog.
#[test]
fn at_least_once_instances_joining_and_dying_mid_commit_lose_nothing_and_apply_each_event_once() {
    let sc = Scenario::new("alo-scale", 6);
    let events = generated_events(3_000, 90_000, 43);
    // The events arrive over about 15 s, so that the rebalances land while the instances score
    // and commit.
    let producer = {
        let (brokers, input) = (sc.brokers.clone(), sc.input.clone());
        let records: Vec<(String, Vec<u8>)> = events.iter().map(|e| (e.user_id.to_string(), serde_json::to_vec(e).unwrap())).collect();
        std::thread::spawn(move || produce_paced(&brokers, &input, &records, 6_000.0).unwrap())
    };
    let config = sc.dir.path().join("run.toml");
    std::fs::write(&config, "[kafka.consumer]\n\"session.timeout.ms\" = \"6000\"\n").unwrap();
    let config = config.display().to_string();
    let instance = |name: &str| {
        let state = sc.dir.path().join(format!("state-{name}")).display().to_string();
        // Short units: a commit is nearly always in flight when a rebalance comes.
        sc.start(name, &sc.run_args(&["--config", &config, "--processing-guarantee", "at_least_once", "--state-dir", &state, "--max-batch-records", "300", "--commit-interval-ms", "5"]))
    };
    let mut a = instance("a");
    let b = instance("b");
    wait_for_size(&sc.brokers, &sc.output, 15_000, &mut a, IDLE);
    let mut c = instance("c");
    wait_for_log(&c, "assigned partitions are up to date with the changelog", IDLE);
    wait_for_size(&sc.brokers, &sc.output, 45_000, &mut c, IDLE);
    b.crash().unwrap();
    producer.join().unwrap();
    wait_for_every_input(&sc, events.len(), &a);
    let c_log = c.log_text();
    let mut logs = vec![std::fs::read_to_string(sc.dir.path().join("b.log")).unwrap()];
    for op in [a, c] {
        let (status, log) = op.terminate().unwrap();
        assert!(status.success(), "exit {status}; log:\n{log}");
        logs.push(log);
    }
    assert!(c_log.contains("partition restored from the changelog"), "the joining instance took nothing over:\n{c_log}");
    let settled = |line: &str| logs.iter().map(|l| l.matches(line).count()).sum::<usize>();
    eprintln!(
        "rebalances on a commit in flight: {} dropped before its states, {} completed after",
        settled("a rebalance came before the commit's states were sent"),
        settled("a rebalance came after the commit's states were sent")
    );

    let all = sc.intents(usize::MAX, Duration::from_secs(3));
    let unique = first_intents(&all);
    // A fresh instance restores every partition from the changelog alone: each user's latest
    // changelog record is the state of an uninterrupted offline pass, bit for bit.
    let fresh_state = sc.dir.path().join("state-fresh");
    let fresh = sc.start("fresh", &sc.run_args(&["--processing-guarantee", "at_least_once", "--state-dir", &fresh_state.display().to_string()]));
    wait_for_log(&fresh, "assigned partitions are up to date with the changelog", IDLE);
    let (status, log) = fresh.terminate().unwrap();
    assert!(status.success(), "exit {status}; log:\n{log}");
    eprintln!("at-least-once scale-out test: {} intents for {} events ({} repeats)", all.len(), events.len(), all.len() - events.len());
    assert_matches_offline(&unique, &events, &fresh_state);
    // The first instance's store was a prefix of the changelog throughout: caught up from where
    // it stopped, it holds the offline states too.
    let state_a = sc.dir.path().join("state-a");
    let again = sc.start("a-again", &sc.run_args(&["--processing-guarantee", "at_least_once", "--state-dir", &state_a.display().to_string()]));
    wait_for_log(&again, "assigned partitions are up to date with the changelog", IDLE);
    let (status, log) = again.terminate().unwrap();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert_matches_offline(&unique, &events, &state_a);
}

#[test]
fn malformed_records_are_dead_lettered_counted_and_logged_while_valid_ones_are_scored() {
    let sc = Scenario::new("bad", 4);
    let events = generated_events(200, 3_000, 13);
    let future_ts = chrono_like_future();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("invalid_json", br#"{"user_id":"u1","ts":"#.to_vec()),
        ("wrong_type", br#"{"user_id":"u1","ts":1704067200000,"type":"view","price":"cheap"}"#.to_vec()),
        ("missing_field", br#"{"ts":1704067200000,"type":"view"}"#.to_vec()),
        ("unknown_event_type", br#"{"user_id":"u1","ts":1704067200000,"type":"teleport"}"#.to_vec()),
        ("out_of_range", br#"{"user_id":"u1","ts":1704067200000,"type":"view","price":-5}"#.to_vec()),
        ("out_of_range", format!(r#"{{"user_id":"u1","ts":{future_ts},"type":"view"}}"#).into_bytes()),
        ("oversized", format!(r#"{{"user_id":"u1","ts":1704067200000,"type":"view","x":"{}"}}"#, "a".repeat(70_000)).into_bytes()),
        ("empty", Vec::new()),
    ];
    let mut records = Vec::new();
    let mut expected_invalid: BTreeMap<&str, u64> = BTreeMap::new();
    // (kind, bytes) of every bad record, in production order.
    let mut bad_sent: Vec<(&str, Vec<u8>)> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        records.push((e.user_id.to_string(), serde_json::to_vec(e).unwrap()));
        if i % 10 == 0 {
            let (kind, bytes) = &bad[(i / 10) % bad.len()];
            records.push((e.user_id.to_string(), bytes.clone()));
            *expected_invalid.entry(kind).or_default() += 1;
            bad_sent.push((kind, bytes.clone()));
        }
    }
    produce(&sc.brokers, &sc.input, &records).unwrap();

    let addr = free_addr();
    let op = sc.start("op", &sc.run_args(&["--metrics-addr", &addr]));
    let intents = sc.intents(events.len(), IDLE);

    // The batch that produced the last intent counts its rejections when it finishes (after its
    // dead letters and its commit): wait until /metrics shows that batch.
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let m = http_get(&addr, "/metrics");
        if metric(&m, "intentflow_intents_out_total") == events.len() as u64 || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let health = http_get(&addr, "/health");
    let (status, log) = op.terminate().unwrap();
    assert!(status.success(), "exit {status}; log:\n{log}");

    let invalid_total: u64 = expected_invalid.values().sum();
    for (kind, n) in &expected_invalid {
        let got = metric(&metrics, &format!("intentflow_records_invalid_total{{error_type=\"{kind}\"}}"));
        assert_eq!(got, *n, "invalid records of kind {kind}; metrics:\n{metrics}");
    }
    assert_eq!(metric(&metrics, "intentflow_intents_out_total"), events.len() as u64);
    assert!(health.contains("\"status\":\"running\""), "{health}");
    assert!(log.contains(&format!("{} records in, {} intents out, {invalid_total} invalid", records.len(), events.len())), "log:\n{log}");
    let rejected_lines: Vec<&str> = log.lines().filter(|l| l.contains("rejected record:")).collect();
    assert!(!rejected_lines.is_empty());
    for line in &rejected_lines {
        assert!(line.contains(&format!("topic={}", sc.input)) && line.contains("partition=") && line.contains("offset="), "{line}");
    }
    assert_matches_offline(&intents, &events, &sc.state);

    // Every rejected record is on the dead-letter topic with its original bytes, its reason and
    // its source position; nothing else is.
    let dead = dead_letters(&sc.brokers, &sc.dlq, bad_sent.len());
    assert_eq!(dead.len(), bad_sent.len());
    let mut got: Vec<(String, Vec<u8>)> = dead.iter().map(|d| (d.kind.clone(), d.value.clone())).collect();
    let mut want: Vec<(String, Vec<u8>)> = bad_sent.iter().map(|(k, b)| (k.to_string(), b.clone())).collect();
    got.sort();
    want.sort();
    assert!(got == want, "dead letters differ from the bad records sent");
    let input_size = topic_size(&sc.brokers, &sc.input).unwrap();
    for d in &dead {
        assert_eq!(d.source_topic, sc.input);
        assert!((0..4).contains(&d.source_partition) && (0..input_size).contains(&d.source_offset), "{d:?}");
        assert!(!d.reason.is_empty() && d.source_timestamp.is_some_and(|t| t > 0), "{d:?}");
    }
    let positions: HashSet<(i32, i64)> = dead.iter().map(|d| (d.source_partition, d.source_offset)).collect();
    assert_eq!(positions.len(), dead.len(), "each source record dead-lettered once");
}

#[test]
fn a_committed_offset_deleted_by_retention_follows_the_policy() {
    let sc = Scenario::new("retention", 1);
    let first = generated_events(100, 1_000, 21);
    produce_events(&sc.brokers, &sc.input, &first).unwrap();
    assert_eq!(sc.run_until("first", &sc.run_args(&[]), first.len(), IDLE).0.len(), first.len());

    // While the operator is down, 1,000 more events arrive and retention deletes the oldest
    // 1,500 records: offsets 1,000..1,500 were never processed.
    let second = generated_events(100, 1_000, 22);
    produce_events(&sc.brokers, &sc.input, &second).unwrap();
    assert_eq!(delete_records_before(&sc.brokers, &sc.input, 0, 1_500).unwrap(), 1_500);

    // `fail`: the operator stops with an error instead of guessing.
    let mut op = sc.start("fail", &sc.run_args(&["--offset-reset", "fail"]));
    let (status, log) = op.wait_exit(Duration::from_secs(60)).unwrap().expect("offset_reset = fail must stop the operator");
    assert!(!status.success(), "{log}");
    assert!(log.contains("offset_reset = fail"), "{log}");

    // `earliest`: resume at the oldest kept record and say loudly what was lost.
    let (intents, log) = sc.run_until("earliest", &sc.run_args(&["--offset-reset", "earliest"]), first.len() + 500, IDLE);
    assert_eq!(intents.len(), first.len() + 500, "the 500 retained records after the gap are scored once");
    assert_eq!(sc.intents(usize::MAX, Duration::from_secs(3)).len(), 1_500, "no intent twice");
    let loud: Vec<&str> = log.lines().filter(|l| l.contains("records deleted by retention")).collect();
    assert_eq!(loud.len(), 1, "{log}");
    assert!(loud[0].contains("ERROR") && loud[0].contains("lost=500") && loud[0].contains("expected=1000"), "{}", loud[0]);

    // `fail` again, now that the input's committed offset exists: the erasure topic, whose
    // partitions have none (no request yet), is read from its beginning and stops nothing.
    let third = generated_events(10, 10, 23);
    produce_events(&sc.brokers, &sc.input, &third).unwrap();
    let (intents, _) = sc.run_until("fail-again", &sc.run_args(&["--offset-reset", "fail"]), 1_510, IDLE);
    assert_eq!(intents.len(), 1_510);
}

/// Epoch milliseconds a year from now: far beyond the decoder's one-day tolerance.
fn chrono_like_future() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    now + 365 * 86_400_000
}

/// `intentflow bench --brokers` drives the live operator through the broker: it starts `run`,
/// produces the events, reads every event's intent back (it fails if one is missing), and
/// deletes its topics.
#[test]
fn bench_measures_the_live_operator_through_the_broker() {
    let brokers = require_broker();
    let work = tempfile::tempdir().unwrap();
    let before = bench_topics(&brokers);
    let out = std::process::Command::new(intentflow_bin())
        .args(["bench", "--brokers", &brokers, "--users", "300", "--events", "3000", "--rates", "flat", "--processing-guarantee", "at_least_once"])
        .arg("--model-dir")
        .arg(trained_model_dir())
        .arg("--work-dir")
        .arg(work.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let row: Vec<&str> = stdout.lines().find(|l| l.starts_with("| live run, at_least_once")).unwrap_or_else(|| panic!("no live row: {stdout}")).trim_matches('|').split('|').map(str::trim).collect();
    assert_eq!(row[2], "3000", "{row:?}");
    let users: u32 = row[3].parse().unwrap();
    assert!((250..=300).contains(&users), "{row:?}");
    assert!(row[4].parse::<f64>().unwrap() > 0.0 && row[9].parse::<f64>().unwrap() > 0.0, "throughput and the operator's RSS: {row:?}");
    assert!(row[10].parse::<f64>().unwrap() > 0.0, "the operator's state on disk: {row:?}");
    assert!(!stdout.contains("Wall time per stage"), "no in-process stages for a live run");
    // Its topics are gone (deletion reaches the metadata shortly after the bench returns).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<String> = bench_topics(&brokers).into_iter().filter(|t| !before.contains(t)).collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the bench left topics behind: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The topics of `intentflow bench` runs on the broker.
fn bench_topics(brokers: &str) -> HashSet<String> {
    use rdkafka::consumer::Consumer;
    let client = intentflow_pipeline::kafka::KafkaClients::new(brokers).metadata_client().unwrap();
    let metadata = client.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    metadata.topics().iter().map(|t| t.name().to_string()).filter(|t| t.starts_with("bench-")).collect()
}

/// The probes answer with status codes: `/readyz` turns 200 once the assigned partitions are
/// restored and processing; `/livez` stays 200 while the operator waits for records, turns 503
/// (naming the stall) while one batch takes longer than `liveness_timeout_ms` (a failpoint makes
/// the first batch sleep 6 s), and is 200 again once the batch is done. The operator logs JSON
/// (`--log-format json`): one object a line, a rejected record's position as keys of its own.
#[test]
fn readyz_follows_the_assignment_and_livez_fails_only_while_a_batch_stalls() {
    let sc = Scenario::new("probes", 2);
    let addr = free_addr();
    let args = sc.run_args(&["--metrics-addr", &addr, "--liveness-timeout-ms", "1000", "--log-format", "json"]);
    let mut op = Operator::spawn_env("run", &args, sc.dir.path().join("op.log"), &[("FAILPOINTS", "batch=1*sleep(6000)")]).unwrap();
    let started = Instant::now();
    let ready = loop {
        let (code, body) = probe(&addr, "/readyz");
        if code == 200 {
            break body;
        }
        // Before: 503 with a reason (starting, joining the group, restoring), or not serving yet.
        assert!(code == 0 || (code == 503 && body["reasons"].as_array().is_some_and(|r| !r.is_empty())), "{code} {body}");
        assert!(op.exited().is_none() && started.elapsed() < IDLE, "never ready; log:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(ready["status"], "running", "{ready}");
    assert_eq!(ready["reasons"][0], "2 partitions assigned, restored and processing", "{ready}");
    // Live, and once the restore report that made it ready is handled, waiting.
    loop {
        let (code, live) = probe(&addr, "/livez");
        assert_eq!(code, 200, "{live}");
        if live["reasons"][0] == "waiting for records" {
            break;
        }
        assert!(started.elapsed() < IDLE, "never waiting: {live}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let events = generated_events(50, 400, 5);
    produce(&sc.brokers, &sc.input, &[("u-bad".to_string(), b"{not json".to_vec())]).unwrap();
    produce_events(&sc.brokers, &sc.input, &events).unwrap();
    let stalled = loop {
        let (code, body) = probe(&addr, "/livez");
        if code == 503 {
            break body;
        }
        assert!(op.exited().is_none() && started.elapsed() < IDLE, "the stalled batch never failed /livez; log:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    let reason = stalled["reasons"][0].as_str().unwrap();
    assert!(reason.starts_with("the batch loop has been in one batch or commit for") && reason.ends_with("(liveness_timeout_ms = 1000)"), "{stalled}");
    let intents = sc.intents(events.len(), IDLE);
    assert_eq!(intents.len(), events.len());
    let (code, live) = probe(&addr, "/livez");
    assert_eq!(code, 200, "live again after the batch: {live}");
    // Which build serves which model; and every series says what it is.
    let metrics = http_get(&addr, "/metrics");
    for typed in metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = typed.split_whitespace().next().unwrap();
        assert!(metrics.lines().any(|l| l.starts_with(&format!("# HELP {name} "))), "no # HELP for {name}:\n{metrics}");
    }
    let info = metrics.lines().find(|l| l.starts_with("intentflow_build_info{")).unwrap_or_else(|| panic!("no build info:\n{metrics}"));
    let model = intentflow_model::IntentModel::load(trained_model_dir(), &intentflow_model::Device::Cpu).unwrap().version().to_string();
    assert!(info.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))) && info.contains(&format!("model_version=\"{model}\"")) && info.contains("git_sha=\"") && info.ends_with(" 1"), "{info}");
    let (status, log) = op.terminate().unwrap();
    assert!(status.success(), "exit {status}; log:\n{log}");
    // Every log line is a JSON object but the closing summary the binary prints itself.
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.starts_with("intentflow run:") && !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().all(|l| l["timestamp"].is_string() && l["level"].is_string() && l["message"].is_string()), "{log}");
    let rejected = lines.iter().find(|l| l["message"].as_str().is_some_and(|m| m.starts_with("rejected record:"))).unwrap_or_else(|| panic!("no rejection logged:\n{log}"));
    assert_eq!((&rejected["topic"], &rejected["error_type"]), (&serde_json::json!(sc.input), &serde_json::json!("invalid_json")), "{rejected}");
    assert!(rejected["partition"].is_i64() && rejected["offset"].is_i64(), "{rejected}");
}
