//! A secured cluster: every command reaches the broker's SASL/SCRAM listener through the
//! `[kafka.common]` properties of one config file, with zstd-compressed input.

use intentflow_integration_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const IDLE: Duration = Duration::from_secs(120);

/// `scripts/kafka <args>`'s standard output.
fn kafka_script(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka");
    let out = Command::new(script).args(args).output().expect("running scripts/kafka");
    assert!(out.status.success(), "scripts/kafka {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Guarantee 7: run, replay, tail and import reach a SASL_PLAINTEXT/SCRAM-SHA-512 listener with
/// credentials from the config file alone (admin and metadata clients included), and the input
/// written by a zstd-compressing producer is read.
#[test]
fn every_command_works_against_a_sasl_scram_listener_with_zstd_input() {
    let brokers = require_broker();
    if std::env::var_os("INTENTFLOW_TEST_BROKERS").is_some() {
        skip("every_command_works_against_a_sasl_scram_listener_with_zstd_input", "INTENTFLOW_TEST_BROKERS names another broker than scripts/kafka's");
        return;
    }
    let sasl_port = kafka_script(&["sasl-port"]);
    assert!(!sasl_port.is_empty(), "the test broker runs without its SASL listener (scripts/kafka start makes one)");
    let user = format!("it-{}", std::process::id());
    kafka_script(&["scram-user", &user, "it-secret-42"]);

    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str, password: &str, producer: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "brokers = \"127.0.0.1:{sasl_port}\"\n[kafka.common]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
                 \"sasl.username\" = \"{user}\"\n\"sasl.password\" = \"{password}\"\n[kafka.producer]\n{producer}"
            ),
        )
        .unwrap();
        path.display().to_string()
    };
    let secured = config("run.toml", "it-secret-42", "");
    let zstd = config("zstd.toml", "it-secret-42", "\"compression.type\" = \"zstd\"\n");

    // Input: imported over SASL by a zstd-compressing producer (the topic is created over SASL
    // too).
    let events = generated_events(150, 3_000, 83);
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, events.iter().map(|e| serde_json::to_string(e).unwrap() + "\n").collect::<String>()).unwrap();
    let (input, output, group) = (unique("sasl-in"), unique("sasl-out"), unique("sasl"));
    let (status, log) = intentflow(&["import", "--config", &zstd, "--format", "jsonl", "--input", &file.display().to_string(), "--topic", &input]);
    assert!(status.success(), "{log}");

    // The operator: consumer, transactional producer, admin and restore clients over SASL.
    let (model, state) = (trained_model_dir().display().to_string(), dir.path().join("state").display().to_string());
    let args: Vec<String> = ["--config", &secured, "--input-topic", &input, "--output-topic", &output, "--group", &group, "--state-dir", &state, "--model-dir", &model, "--metrics-addr", ""]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut op = Operator::start(&args, dir.path().join("run.log")).unwrap();
    // The operator creates its output topic (over SASL) before it subscribes.
    let clients = intentflow_pipeline::kafka::KafkaClients::new(&brokers);
    let started = std::time::Instant::now();
    while intentflow_pipeline::kafka::admin::partition_count(&clients, &output).unwrap().is_none() {
        assert!(op.exited().is_none() && started.elapsed() < IDLE, "no output topic; log:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let intents = read_intents(&brokers, &output, events.len(), IDLE).unwrap();
    let (status, log) = op.terminate().unwrap();
    assert!(status.success(), "{log}");
    assert_eq!(intents.len(), events.len(), "{log}");

    // tail and replay over SASL.
    let (status, log) = intentflow(&["tail", "--config", &secured, "--topic", &output, "--max", "5"]);
    assert!(status.success() && log.contains(&format!("5 records from {output}")), "{log}");
    let out = dir.path().join("replay.jsonl");
    let (status, log) = intentflow(&[
        "replay", "--config", &secured, "--input-topic", &input, "--model-dir", &model, "--state-dir", &dir.path().join("replay").display().to_string(),
        "--output", &out.display().to_string(),
    ]);
    assert!(status.success(), "{log}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), events.len(), "{log}");

    // A wrong password gets nowhere: the credentials really are used.
    let wrong = config("wrong.toml", "not-the-password", "");
    let (status, log) = intentflow(&["tail", "--config", &wrong, "--topic", &output, "--max", "1", "--idle-ms", "1000"]);
    assert!(!status.success(), "a wrong password must fail: {log}");
}
