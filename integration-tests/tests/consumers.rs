//! The consumers' side on the real broker: the example consumer of `examples/alerts-consumer`
//! reading the operator's committed output (the every-event topic, and a threshold
//! `[[output]]`'s alerts topic), and the output's optional record headers.

use intentflow_integration_tests::*;
use intentflow_pipeline::kafka::read::read_topic;
use intentflow_pipeline::kafka::KafkaClients;
use intentflow_schemas::EventType;
use rdkafka::message::{Headers, Message};
use std::process::Command;
use std::time::Duration;

#[test]
fn the_example_consumer_prints_each_rise_above_the_threshold_once_and_skips_what_is_no_intent() {
    let sc = Scenario::new("alerts", 2);
    let events = generated_events(40, 800, 5);
    produce_events(&sc.brokers, &sc.input, &events).unwrap();
    let (intents, _) = sc.run_until("op", &sc.run_args(&["--output-headers"]), events.len(), Duration::from_secs(120));
    assert_eq!(intents.len(), events.len());

    // Every intent record names its schema and the model that scored it in headers.
    let records = read_topic(&KafkaClients::new(&sc.brokers), &sc.output, Duration::from_secs(10), |n| n >= events.len()).unwrap();
    assert_eq!(records.len(), events.len());
    for m in &records {
        let headers: Vec<(String, String)> = m
            .headers()
            .map(|h| h.iter().map(|x| (x.key.to_string(), String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned())).collect())
            .unwrap_or_default();
        let intent: intentflow_schemas::ScoredIntent = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(headers, [("intentflow.schema".to_string(), "intent/1".to_string()), ("intentflow.model".to_string(), intent.model_version)], "offset {}", m.offset());
    }
    produce(&sc.brokers, &sc.output, &[("x".into(), b"{not an intent".to_vec())]).unwrap();

    // A threshold some shoppers cross: the scores' 80th percentile. What the consumer should
    // print: each upward crossing, in each shopper's own order, except those scored on a
    // purchase (the shopper already bought).
    let mut scores: Vec<f32> = intents.iter().map(|i| i.score).collect();
    scores.sort_by(f32::total_cmp);
    let min = scores[scores.len() * 4 / 5];
    let mut expected: Vec<(String, String)> = Vec::new();
    for (user, theirs) in intents_by_user(&intents) {
        let mut previous: Option<f32> = None;
        for i in theirs {
            if i.score >= min && previous.is_none_or(|p| p < min) && i.event_type != EventType::Purchase {
                expected.push((user.clone(), i.event_ts.clone()));
            }
            previous = Some(i.score);
        }
    }
    let above = intents.iter().filter(|i| i.score >= min).count();
    assert!(expected.len() >= 2 && expected.len() < above, "{} crossings of {min}, {above} intents at or above it", expected.len());

    // Exits once nothing came for 15 s (joining the group takes a few of them).
    let bin = intentflow_bin().with_file_name("intentflow-alerts");
    let group = unique("alerts-reader");
    let out = Command::new(&bin)
        .args(["--brokers", &sc.brokers, "--topic", &sc.output, "--group", &group, "--min-score", &min.to_string(), "--from-beginning", "--idle-seconds", "15"])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (built by `cargo build --release --workspace --bins`)", bin.display()));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "exit {}:\n{stderr}", out.status);
    let mut printed: Vec<(String, String)> = stdout
        .lines()
        .map(|l| {
            let mut parts = l.split("  ");
            let ts = parts.next().unwrap_or_default().to_string();
            let user = parts.next().and_then(|p| p.strip_prefix("user ")).unwrap_or_else(|| panic!("line without a user: {l}"));
            (user.to_string(), ts)
        })
        .collect();
    printed.sort();
    expected.sort();
    assert_eq!(printed, expected, "stdout:\n{stdout}");
    assert!(stderr.contains(&format!("skipped {}/", sc.output)) && stderr.contains("not an intent"), "stderr:\n{stderr}");
}

#[test]
fn the_example_consumer_prints_the_up_crossings_of_the_operators_alerts_topic() {
    let sc = Scenario::new("alerts-topic", 2);
    let events = generated_events(40, 800, 6);
    let mut scores: Vec<f32> = offline_scores(&events).values().flat_map(|s| s.scores.iter().copied()).collect();
    scores.sort_by(f32::total_cmp);
    let enter = scores[scores.len() * 4 / 5];
    let alerts = unique("purchase-intent-alerts");
    let config = sc.dir.path().join("run.toml");
    std::fs::write(&config, format!("[[output]]\ntopic = \"{alerts}\"\npolicy = \"threshold\"\nenter = {enter}\nleave = {}\nexclude_purchases = true\n", enter * 0.8)).unwrap();
    produce_events(&sc.brokers, &sc.input, &events).unwrap();
    let (intents, _) = sc.run_until("op", &sc.run_args(&["--config", &config.display().to_string()]), events.len(), Duration::from_secs(120));
    assert_eq!(intents.len(), events.len());
    let published = read_intents(&sc.brokers, &alerts, usize::MAX, Duration::from_secs(5)).unwrap();
    let mut expected: Vec<(String, String)> =
        published.iter().filter(|i| i.placement.crossing == Some(intentflow_schemas::Crossing::Up)).map(|i| (i.user_id.clone(), i.event_ts.clone())).collect();
    assert!(expected.len() >= 2 && published.iter().all(|i| i.event_type != EventType::Purchase), "{} up crossings of {} alerts", expected.len(), published.len());

    let bin = intentflow_bin().with_file_name("intentflow-alerts");
    let out = Command::new(&bin)
        .args(["--brokers", &sc.brokers, "--topic", &alerts, "--group", &unique("alerts-topic-reader"), "--min-score", "0.99", "--from-beginning", "--idle-seconds", "15"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {}:\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let mut printed: Vec<(String, String)> = stdout
        .lines()
        .map(|l| {
            let parts: Vec<&str> = l.split("  ").collect();
            assert!(parts[2].contains(" (up from ") || parts[2].contains(" (up, first score)"), "{l}");
            (parts[1].trim_start_matches("user ").to_string(), parts[0].to_string())
        })
        .collect();
    printed.sort();
    expected.sort();
    assert_eq!(printed, expected, "stdout:\n{stdout}");
}
