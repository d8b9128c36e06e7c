//! Restores from the changelog on the real broker: in the background, never holding up the
//! partitions that are already up to date.

use intentflow_integration_tests::*;
use intentflow_model::{Device, IntentModel};
use intentflow_state::changelog::ChangelogKey;
use intentflow_state::UserState;
use std::time::{Duration, Instant};

const IDLE: Duration = Duration::from_secs(120);

/// `intentflow_consumer_lag_records` of one input partition in `/metrics` text, if reported.
fn partition_lag(metrics: &str, topic: &str, partition: i32) -> Option<u64> {
    let series = format!("intentflow_consumer_lag_records{{topic=\"{topic}\",partition=\"{partition}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(series.as_str())?.trim().parse::<f64>().ok()).map(|v| v as u64)
}
/// Records on the changelog partition that has to be restored.
const LARGE: usize = 300_000;

/// Guarantee 4: an instance whose partitions 0–2 are up to date keeps scoring them while
/// partition 3 restores a changelog of hundreds of thousands of records; partition 3 is scored
/// once its restore is done, and nothing is lost or doubled.
#[test]
fn caught_up_partitions_keep_scoring_while_another_restores_a_large_changelog() {
    let sc = Scenario::new("bg-restore", 4);
    let version = IntentModel::load(trained_model_dir(), &Device::Cpu).unwrap().version().to_string();
    let changelog = format!("{}-changelog", sc.group);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let clients = intentflow_pipeline::kafka::KafkaClients::new(&sc.brokers);
    rt.block_on(intentflow_pipeline::kafka::admin::ensure_topic_with(&clients, &changelog, 4, &[("cleanup.policy", "compact")])).unwrap();
    // Partition 3's changelog: states of users who have no events in this test.
    let state = UserState { hidden: vec![0.125; 16], model_version: version, ..Default::default() }.encode();
    let records: Vec<(i32, Vec<u8>, Vec<u8>)> = (0..LARGE).map(|i| (3, ChangelogKey::User(&format!("restored-{i}")).encode(), state.clone())).collect();
    produce_to_partitions(&sc.brokers, &changelog, &records).unwrap();
    drop(records);

    let events = generated_events(400, 8_000, 77);
    produce_events(&sc.brokers, &sc.input, &events).unwrap();
    let addr = free_addr();
    // Each 20,000-record chunk of the restore takes a second longer (15 s in all), so that the restore surely
    // outlasts the scoring of the other partitions on any machine.
    let mut op = Operator::spawn_env("run", &sc.run_args(&["--metrics-addr", &addr]), sc.dir.path().join("op.log"), &[("FAILPOINTS", "restore-chunk=sleep(1000)")]).unwrap();

    // While /health still lists partition 3 as restoring, intents of the other partitions are
    // already on the output topic.
    let started = Instant::now();
    let during = loop {
        let body = http_get(&addr, "/health");
        let health: serde_json::Value = body.split("\r\n\r\n").nth(1).and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default();
        let restoring_3 = health["restoring"].get("3").is_some();
        if restoring_3 && health["intents_out"].as_u64().unwrap_or(0) > 0 {
            assert_eq!(health["status"], "restoring", "{health}");
            // Not ready while a partition restores, and saying which; live all the same.
            let (code, ready) = probe(&addr, "/readyz");
            let names_3 = ready["reasons"].as_array().is_some_and(|r| r.iter().any(|r| r.as_str().is_some_and(|r| r.starts_with("partition 3 restoring from the changelog"))));
            assert!(code == 503 && names_3, "{code} {ready}");
            assert_eq!(probe(&addr, "/livez").0, 200);
            break sc.intents(usize::MAX, Duration::from_secs(3));
        }
        assert!(op.exited().is_none(), "the operator exited; log:\n{}", op.log_text());
        assert!(!(health["status"] == "running" && !restoring_3), "partition 3 finished restoring before any intent was seen: {health}");
        assert!(started.elapsed() < IDLE, "no progress; log:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    let health_after = http_get(&addr, "/health");
    assert!(health_after.contains("\"3\":"), "partition 3 must still be restoring after the read: {health_after}");
    assert!(!during.is_empty());
    assert!(during.iter().all(|i| i.source.partition != 3), "partition 3 was scored before its state was restored");

    let intents = sc.intents(events.len(), IDLE);
    // Everything consumed: every partition reports its lag (librdkafka's statistics, every 5 s),
    // and it is 0.
    while (0..4).any(|p| partition_lag(&http_get(&addr, "/metrics"), &sc.input, p) != Some(0)) {
        assert!(started.elapsed() < IDLE * 2, "lag never 0 on every partition:\n{}", http_get(&addr, "/metrics"));
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every partition restored: ready.
    let (code, ready) = probe(&addr, "/readyz");
    assert_eq!((code, &ready["status"]), (200, &serde_json::json!("running")), "{ready}");
    let (status, log) = op.terminate().unwrap();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(intents.iter().any(|i| i.source.partition == 3), "partition 3 was never scored");
    let p3 = log.lines().find(|l| l.contains("partition restored from the changelog") && l.contains("partition=3")).unwrap_or_default();
    assert!(p3.contains(&format!("records={LARGE}")), "{p3}");
    let mut states = stored_states(&sc.state);
    states.retain(|user, _| !user.starts_with("restored-"));
    assert_exactly_once(&intents, &events, &states);
    eprintln!("background restore: {} intents of partitions 0-2 while partition 3 restored; {p3}", during.len());
}
