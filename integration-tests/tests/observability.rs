//! What a platform team watches, on the real broker: every metric of the spec
//! (`docs/metrics.md`) exported from start-up and counting a known input, the status page
//! rendered in headless Chromium with non-empty charts, and the configuration layers
//! (file < environment < flags) of the real binary.

use intentflow_integration_tests::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

const IDLE: Duration = Duration::from_secs(120);

/// The metric names of `docs/metrics.md`'s tables (first column).
fn spec_metrics() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md")).unwrap();
    let names: BTreeSet<String> = doc.lines().filter_map(|l| l.strip_prefix("| `intentflow_")).map(|l| format!("intentflow_{}", &l[..l.find('`').unwrap()])).collect();
    assert!(names.len() > 30, "the spec lists {} metrics", names.len());
    names
}

/// The spec metrics with no series in `/metrics` text.
fn missing(text: &str, spec: &BTreeSet<String>) -> Vec<String> {
    spec.iter().filter(|n| !text.lines().any(|l| l.starts_with(&format!("{n} ")) || l.starts_with(&format!("{n}{{")) || l.starts_with(&format!("{n}_count")))).cloned().collect()
}

/// The value of a series, as a float (0 when absent).
fn value(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse::<f64>().ok())).unwrap_or(0.0)
}

/// The body of a `GET`.
fn body(addr: &str, path: &str) -> String {
    http_get(addr, path).split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

#[test]
fn every_spec_metric_is_exported_from_start_up_and_counts_a_known_input_and_the_status_page_draws_it() {
    let sc = Scenario::new("observe", 2);
    let addr = free_addr();
    // The layers of the real binary: the output topic comes from the environment, the group
    // from a flag over a wrong one in the environment, the batch cap from the environment over
    // the file's, the commit interval from the file over the default (100 ms): 300 ms, so that
    // commits are at least that far apart. One [[output]] (every event but
    // purchases) has its own counter.
    let config = sc.dir.path().join("run.toml");
    let no_purchases = unique("observe-no-purchases");
    std::fs::write(&config, format!("commit_interval_ms = 300\nmax_batch_records = 8\n[[output]]\ntopic = \"{no_purchases}\"\npolicy = \"every\"\nexclude_purchases = true\n")).unwrap();
    let mut args = sc.run_args(&["--metrics-addr", &addr, "--config", &config.display().to_string()]);
    let at = args.iter().position(|a| a == "--output-topic").unwrap();
    args.drain(at..at + 2);
    let env = [("INTENTFLOW_OUTPUT_TOPIC", sc.output.as_str()), ("INTENTFLOW_GROUP", "not-this-group"), ("INTENTFLOW_MAX_BATCH_RECORDS", "100")];
    let mut op = Operator::spawn_env("run", &args, sc.dir.path().join("op.log"), &env).unwrap();
    let spec = spec_metrics();

    // Before any input: every series is there (the lag once librdkafka's first statistics
    // came, every 5 s).
    let started = Instant::now();
    let before = loop {
        let text = body(&addr, "/metrics");
        let gone = missing(&text, &spec);
        if gone.is_empty() && probe(&addr, "/readyz").0 == 200 {
            break text;
        }
        assert!(op.exited().is_none() && started.elapsed() < Duration::from_secs(60), "not exported before any input: {gone:?}\n{text}\nlog:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(value(&before, "intentflow_records_in_total"), 0.0);
    assert_eq!(value(&before, "intentflow_event_to_produce_seconds_count"), 0.0);

    // A known input: 600 valid events of 40 users, one malformed record, one without a user.
    let events = generated_events(40, 600, 11);
    let produced = Instant::now();
    produce(&sc.brokers, &sc.input, &[("u-bad".into(), b"{not json".to_vec()), ("u-x".into(), br#"{"v":1,"event_type":"view","ts":"2026-01-01T00:00:00Z"}"#.to_vec())]).unwrap();
    produce_events(&sc.brokers, &sc.input, &events).unwrap();
    let intents = sc.intents(events.len(), IDLE);
    // Under exactly-once the last intents are visible once the last commit is done: no commit
    // comes after this.
    let all_read = produced.elapsed();
    assert_eq!(intents.len(), events.len(), "intents on the topic named by INTENTFLOW_OUTPUT_TOPIC");
    assert_eq!(committed_records(&sc.brokers, &sc.group, &sc.input).unwrap(), events.len() as i64 + 2, "the --group flag won over INTENTFLOW_GROUP");

    let n = events.len() as f64;
    let text = loop {
        // Committed counts land after the commit; the store's figures every 5 s.
        let text = body(&addr, "/metrics");
        if value(&text, "intentflow_intents_out_total") == n && value(&text, "intentflow_state_keys") >= 40.0 && value(&text, "intentflow_state_size_bytes") > 0.0 {
            break text;
        }
        assert!(started.elapsed() < IDLE, "counts never arrived:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(value(&text, "intentflow_records_in_total"), n + 2.0);
    let purchases = events.iter().filter(|e| e.kind == intentflow_schemas::EventType::Purchase).count();
    assert!(purchases > 0);
    assert_eq!(value(&text, &format!("intentflow_output_intents_total{{output=\"{no_purchases}\"}}")), n - purchases as f64, "{text}");
    assert_eq!(read_intents(&sc.brokers, &no_purchases, usize::MAX, Duration::from_secs(5)).unwrap().len(), events.len() - purchases);
    assert_eq!(value(&text, "intentflow_records_invalid_total{error_type=\"invalid_json\"}"), 1.0, "{text}");
    assert_eq!(value(&text, "intentflow_records_invalid_total{error_type=\"missing_field\"}"), 1.0, "{text}");
    assert_eq!(value(&text, "intentflow_batch_records_sum"), n + 2.0);
    // One latency of each kind per intent.
    for h in ["intentflow_event_to_produce_seconds", "intentflow_consume_to_produce_seconds"] {
        assert_eq!(value(&text, &format!("{h}_count")), n, "{h}:\n{text}");
        assert!(value(&text, &format!("{h}_sum")) > 0.0, "{h}:\n{text}");
    }
    assert_eq!(value(&text, "intentflow_consume_to_produce_seconds_bucket{le=\"+Inf\"}"), n);
    assert!(value(&text, "intentflow_consume_to_produce_seconds_bucket{le=\"60\"}") == n, "consumed and produced within a minute:\n{text}");
    let steps = value(&text, "intentflow_model_steps_total");
    assert!(steps >= 1.0 && value(&text, "intentflow_model_step_seconds_count") == steps, "one step time per wave:\n{text}");
    let commits = value(&text, "intentflow_commits_total");
    assert!(commits >= 1.0 && value(&text, "intentflow_commit_seconds_count") == commits, "{text}");
    // The file's commit_interval_ms = 300 paces the commits (under exactly-once an interval
    // after the last commit began): the first unit stays open the whole interval, and no two
    // commits began closer than that, so from the first record to the last intent there were
    // no more commits than 300 ms intervals.
    assert!(value(&text, "intentflow_commit_open_seconds_bucket{le=\"0.25\"}") < commits, "every unit committed within 250 ms: the file's commit_interval_ms = 300 not applied:\n{text}");
    let most = (all_read.as_secs_f64() / 0.3).floor() + 1.0;
    assert!(commits <= most, "{commits} commits in {all_read:?} from the first record to the last intent: closer than the file's 300 ms:\n{text}");
    assert_eq!(value(&text, "intentflow_restoring_partitions"), 0.0);
    let batches = value(&text, "intentflow_batch_records_count");
    assert!(batches >= 7.0 && value(&text, "intentflow_batch_records_bucket{le=\"100\"}") == batches, "batches of at most INTENTFLOW_MAX_BATCH_RECORDS = 100:\n{text}");
    assert!(value(&text, "intentflow_batch_records_bucket{le=\"10\"}") < batches, "no batch above the file's max_batch_records = 8: the environment did not win:\n{text}");
    for p in 0..2 {
        let lag = format!("intentflow_consumer_lag_records{{topic=\"{}\",partition=\"{p}\"}}", sc.input);
        assert!(text.contains(&lag), "no {lag}:\n{text}");
    }

    // The status page's data, then the page itself in headless Chromium.
    let status: serde_json::Value = serde_json::from_str(&body(&addr, "/status.json")).unwrap();
    assert_eq!(status["status"], "running", "{status}");
    assert_eq!(status["totals"]["intents_out"], events.len() as u64, "{status}");
    assert_eq!(status["scores"]["count"], events.len() as u64, "{status}");
    assert_eq!(status["latency"]["consume_to_produce_seconds"]["count"], events.len() as u64, "{status}");
    let points = status["throughput"]["points"].as_array().unwrap();
    assert_eq!(points.iter().map(|p| p["records"].as_u64().unwrap()).sum::<u64>(), events.len() as u64 + 2);
    assert_eq!(status["lag"].as_array().unwrap().len(), 2, "{status}");
    assert!(!status["risers"].as_array().unwrap().is_empty(), "some of 40 users' intent rose: {status}");
    let page = body(&addr, "/");
    assert!(page.contains("status.json") && page.contains("data-chart"), "{page}");
    screenshot_shows_the_charts(&addr, sc.dir.path());

    let (exit, log) = op.terminate().unwrap();
    assert!(exit.success(), "exit {exit}; log:\n{log}");
}

/// Renders the status page in headless Chromium (`scripts/browser-check`): after the page's
/// scripts ran, each chart has data marks, those of throughput (its peak), latency and scores above zero,
/// the risers table has rows, and the screenshot holds thousands of pixels of the marks'
/// colour (#1f77b4). The screenshot is kept in `target/status-page.png`.
fn screenshot_shows_the_charts(addr: &str, dir: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = dir.join("browser");
    let run = std::process::Command::new(root.join("scripts/browser-check")).arg(format!("http://{addr}/")).arg(&out).output().unwrap();
    assert!(run.status.success(), "scripts/browser-check failed (is Chromium installed? scripts/setup installs it):\n{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    let dom = std::fs::read_to_string(out.join("dom.html")).unwrap();
    assert!(!dom.contains("data-rendered=\"0\"") && dom.contains("data-rendered=\""), "the page never rendered:\n{dom}");
    for chart in ["throughput", "lag", "latency", "scores"] {
        let at = dom.find(&format!("data-chart=\"{chart}\"")).unwrap_or_else(|| panic!("no {chart} chart:\n{dom}"));
        let svg = &dom[at..at + dom[at..].find("</svg>").unwrap()];
        // A throughput line's value is its latest second; its peak is `data-max`.
        let attribute = if chart == "throughput" { "data-max=\"" } else { "data-value=\"" };
        let values: Vec<f64> = svg.split(attribute).skip(1).map(|v| v[..v.find('"').unwrap()].parse().unwrap()).collect();
        assert!(!values.is_empty(), "{chart}: no marks:\n{svg}");
        if chart != "lag" {
            assert!(values.iter().any(|&v| v > 0.0), "{chart}: all marks zero:\n{svg}");
        }
    }
    assert!(dom.contains("class=\"riser\""), "no risers:\n{dom}");
    let png = out.join("status.png");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let marks = buf[..info.buffer_size()].chunks_exact(channels).filter(|p| p[..3] == [31, 119, 180]).count();
    assert!(marks > 2_000, "{marks} pixels of the charts' colour in {}", png.display());
    let kept = root.join("target/status-page.png");
    let _ = std::fs::copy(&png, kept);
}
