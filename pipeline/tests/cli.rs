//! The `intentflow` command line without a broker: generate, train, eval, and the refusal to
//! run without a model.

use std::path::Path;
use std::process::Command;

fn intentflow(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_intentflow")).args(args).output().expect("running intentflow")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn generate_is_seeded_and_train_writes_pytorch_named_weights() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name).display().to_string();
    for name in ["a.jsonl", "b.jsonl"] {
        let out = intentflow(&["generate", "--users", "300", "--events", "6000", "--seed", "5", "--output", &file(name)]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let a = std::fs::read(file("a.jsonl")).unwrap();
    assert_eq!(a, std::fs::read(file("b.jsonl")).unwrap(), "same seed, same events");
    assert_eq!(a.iter().filter(|b| **b == b'\n').count(), 6000);

    let out = intentflow(&["train", "--input", &file("a.jsonl"), "--model-dir", &file("model"), "--epochs", "2", "--hidden-dim", "8", "--members", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // By default all three cells train (`--arch auto`) and one is served; the others are kept
    // beside it.
    let log = text(&out.stderr);
    for cell in ["gru", "lstm", "cnn"] {
        assert!(log.contains(&format!("{cell} member 1 epoch   2:")), "{cell} not trained: {log}");
    }
    assert!(log.contains("cells on validation (ROC-AUC / PR-AUC): gru "), "{log}");

    let model_dir = Path::new(&file("model")).to_path_buf();
    // Seeded and deterministic on CPU: the same input and seed give the same bytes, also when
    // the input is put in user order through sorted runs on disk (500 events in memory).
    let again = intentflow(&[
        "train", "--input", &file("a.jsonl"), "--model-dir", &file("again"), "--epochs", "2", "--hidden-dim", "8", "--members", "2",
        "--max-events-in-memory", "500", "--spill-dir", &file("spill"),
    ]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stderr).contains("6000 events exceed --max-events-in-memory 500: merging 12 sorted runs"), "{}", text(&again.stderr));
    assert_eq!(std::fs::read_dir(file("spill")).unwrap().count(), 0, "spill files left behind");
    for name in ["model.safetensors", "model.json"] {
        assert_eq!(std::fs::read(model_dir.join(name)).unwrap(), std::fs::read(Path::new(&file("again")).join(name)).unwrap(), "{name} differs between two runs");
    }
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(model_dir.join("model.json")).unwrap()).unwrap();
    let served = meta["cell"].as_str().unwrap();
    assert!(log.contains(&format!("serving {served}")), "{log}");
    let others: Vec<&str> = ["gru", "lstm", "cnn"].into_iter().filter(|c| *c != served).collect();
    let dirs = [(model_dir.clone(), served), (model_dir.join("candidates").join(others[0]), others[0]), (model_dir.join("candidates").join(others[1]), others[1])];
    for (dir, cell) in &dirs {
        let (dir, cell) = (dir.as_path(), *cell);
        // PyTorch's names and shapes: nn.GRU stacks 3 gates of 16 rows, nn.LSTM 4; nn.Conv1d
        // keeps (channels, inputs, taps).
        let cell_tensors: Vec<String> = match cell {
            "cnn" => vec!["conv.bias:[16]".into(), "conv.weight:[16,57,3]".into()],
            _ => {
                let g = if cell == "gru" { 48 } else { 64 };
                vec![format!("bias_hh_l0:[{g}]"), format!("bias_ih_l0:[{g}]"), format!("weight_hh_l0:[{g},16]"), format!("weight_ih_l0:[{g},57]")]
            }
        };
        let mut expected: Vec<String> = [
            "brand_embedding.weight:[256,1]",
            "category_embedding.weight:[256,8]",
            "head.bias:[1]",
            "head.weight:[1,16]",
            "item_embedding.weight:[1024,16]",
            "skip.weight:[1,33]",
            "top_category_embedding.weight:[64,1]",
        ]
        .into_iter()
        .map(String::from)
        .chain(cell_tensors)
        .collect();
        expected.sort();
        assert_eq!(safetensors_names(&dir.join("model.safetensors")), expected, "{cell}");
        let model = intentflow_model::IntentModel::load(dir, &intentflow_model::Device::Cpu).expect("the written model loads");
        assert_eq!(model.cell().name(), cell);
    }
    // Two members of hidden size 8 packed side by side.
    assert_eq!(meta["hidden_dim"], 16);
    assert_eq!(meta["input_dim"], 33 + 2 * 8 + 2 * 4);
    assert_eq!(meta["features"]["names"].as_array().unwrap().len(), 33);
    assert_eq!(meta["calibration"]["method"], "platt");
    assert_eq!(meta["baselines"]["logistic"]["weights"].as_array().unwrap().len(), 18);
    assert!(meta["version"].as_str().unwrap().starts_with(&format!("{served}-")));

    // Evaluation on the held-out sessions of generated data also shows the oracle.
    let report_dir = file("report");
    let out = intentflow(&["eval", "--model-dir", &file("model"), "--input", &file("a.jsonl"), "--out-dir", &report_dir, "--bootstrap", "50"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let candidates: Vec<String> = others.iter().map(|c| format!("{c}_candidate")).collect();
    for scorer in [served, &candidates[0], &candidates[1], "logistic_regression", "ensemble", "gradient_boosting", "base_rate", "oracle"] {
        assert!(table.lines().any(|l| l.starts_with(scorer)), "{scorer} missing from\n{table}");
    }
    let metrics: serde_json::Value = serde_json::from_slice(&std::fs::read(Path::new(&report_dir).join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["part"], "test");
    assert_eq!(metrics["model_version"], meta["version"]);
    let scorer = |name: &str| metrics["scorers"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap_or_else(|| panic!("no scorer {name}"))["metrics"].clone();
    let oracle_auc = scorer("oracle")["roc_auc"].as_f64().unwrap();
    let gru_auc = metrics["scorers"][0]["metrics"]["roc_auc"].as_f64().unwrap();
    assert!(oracle_auc > 0.6 && gru_auc > 0.5, "oracle {oracle_auc}, gru {gru_auc}");
    let html = std::fs::read_to_string(Path::new(&report_dir).join("report.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 4, "ROC, PR, reliability, AUC by events");
    assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("href="), "self-contained");
}

/// Names and shapes of the tensors in a safetensors file, sorted, read straight from the
/// file's JSON header (8-byte little-endian length, then the header) rather than through candle.
fn safetensors_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let mut names: Vec<String> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            assert_eq!(v["dtype"], "F32", "{k}");
            format!("{k}:{}", v["shape"])
        })
        .collect();
    names.sort();
    names
}

#[test]
fn run_refuses_to_start_without_a_model_and_says_how_to_make_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("no-model").display().to_string();
    let state = dir.path().join("state").display().to_string();
    let out = intentflow(&["run", "--model-dir", &model, "--state-dir", &state, "--metrics-addr", ""]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("no trained model") && err.contains("intentflow train --input"), "{err}");
}

#[test]
fn run_rejects_a_config_that_feeds_scores_back() {
    let out = intentflow(&["run", "--input-topic", "x", "--output-topic", "x"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("feed back"), "{}", text(&out.stderr));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state").display().to_string();
    let out = intentflow(&["run", "--device", "cuda", "--state-dir", &state, "--metrics-addr", ""]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("built without the `cuda` feature"), "{}", text(&out.stderr));
}

#[test]
fn version_names_the_librdkafka_build_a_production_cluster_needs() {
    let out = intentflow(&["--version"]);
    assert!(out.status.success());
    let text = text(&out.stdout);
    assert!(text.contains("librdkafka 2."), "{text}");
    // TLS, SASL with SCRAM, GSSAPI and OAUTHBEARER (OIDC through libcurl), zstd batches.
    for feature in ["ssl", "sasl_scram", "sasl_gssapi", "sasl_oauthbearer", "oidc", "zstd", "lz4"] {
        assert!(text.split(|c: char| !c.is_ascii_alphanumeric() && c != '_').any(|f| f == feature), "librdkafka lacks `{feature}`: {text}");
    }
}

#[test]
fn import_rejects_what_the_operator_rejects_under_the_runs_limits() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    // REES46 rows: valid, a price above the cap, an over-long user id, a time before 2000.
    let long_user = "9".repeat(300);
    std::fs::write(
        path("rees46.csv"),
        format!(
            "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n\
             2019-10-01 00:00:00 UTC,view,1,2,,,9.5,5,s\n\
             2019-10-01 00:00:01 UTC,view,1,2,,,2000000000,5,s\n\
             2019-10-01 00:00:02 UTC,view,1,2,,,9.5,{long_user},s\n\
             1999-01-01 00:00:00 UTC,view,1,2,,,9.5,5,s\n"
        ),
    )
    .unwrap();
    let out = intentflow(&["import", "--format", "rees46", "--input", &path("rees46.csv"), "--output", &path("events.jsonl")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    for (line, reason) in [(3, "field `price` out of range"), (4, "field `user_id` out of range"), (5, "field `ts` out of range")] {
        assert!(err.contains(&format!("rees46.csv:{line}: skipped: {reason}")), "line {line}: {err}");
    }
    assert_eq!(std::fs::read_to_string(path("events.jsonl")).unwrap().lines().count(), 1);

    // A record over the default 64 KiB is refused, as the operator refuses it, unless the run's
    // config allows more.
    let big = format!("{{\"user_id\":\"u\",\"ts\":1569888000000,\"type\":\"view\",\"pad\":\"{}\"}}\n", "x".repeat(70_000));
    std::fs::write(path("big.jsonl"), &big).unwrap();
    let out = intentflow(&["import", "--format", "jsonl", "--input", &path("big.jsonl"), "--output", &path("a.jsonl")]);
    assert!(text(&out.stderr).contains("exceeds the limit of 65536 bytes"), "{}", text(&out.stderr));
    std::fs::write(path("run.toml"), "max_record_bytes = 131072\n").unwrap();
    let out = intentflow(&["import", "--format", "jsonl", "--input", &path("big.jsonl"), "--output", &path("b.jsonl"), "--config", &path("run.toml")]);
    assert!(out.status.success() && text(&out.stderr).contains("wrote 1 events"), "{}", text(&out.stderr));
}

/// The cells of the rows of `intentflow bench`'s first table whose first cell is `mode`.
fn bench_rows(stdout: &str, mode: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .take_while(|l| !l.is_empty())
        .filter(|l| l.starts_with(&format!("| {mode}")))
        .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect())
        .collect()
}

/// Whether the kernel counts this process's writes to files under `dir` (procfs `write_bytes`):
/// not where procfs has no `io`, nor on a tmpfs, whose pages never go to storage.
fn counts_disk_writes(dir: &std::path::Path) -> bool {
    let (Ok(mounts), true) = (std::fs::read_to_string("/proc/self/mounts"), std::path::Path::new("/proc/self/io").exists()) else { return false };
    // The mount holding `dir` is the longest mount point it starts with.
    let dir = dir.canonicalize().unwrap();
    let fs = mounts.lines().filter_map(|l| {
        let mut f = l.split_whitespace();
        let (point, kind) = (f.nth(1)?, f.next()?);
        dir.starts_with(point).then_some((point.len(), kind))
    });
    fs.max().is_some_and(|(_, kind)| kind != "tmpfs")
}

#[test]
fn bench_runs_the_hot_path_in_process_and_reports_every_column() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().display().to_string();
    let out = intentflow(&["bench", "--users", "2000", "--events", "6000", "--batch", "512", "--rates", "flat,20000", "--work-dir", &work]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let rows = bench_rows(&stdout, "in-process");
    assert_eq!(rows.len(), 2, "{stdout}");
    for (row, offered) in rows.iter().zip(["flat out", "20000/s"]) {
        let num = |i: usize| row[i].parse::<f64>().unwrap_or_else(|_| panic!("column {i} of {row:?}"));
        assert_eq!(row[1], offered);
        assert_eq!(num(2), 6000.0, "events");
        assert!((1_850.0..=2_000.0).contains(&num(3)), "6,000 uniform draws reach about 1,900 of 2,000 users: {row:?}");
        assert!(num(4) > 0.0 && num(8) > 0.0 && num(9) > 0.0, "events/s, CPU and RSS measured: {row:?}");
        assert!(num(5) <= num(6) && num(6) <= num(7), "p50 ≤ p99 ≤ p99.9: {row:?}");
        assert!(num(10) > 40.0, "a compacted state of the default model takes more than its 40 hidden floats' worth of bytes: {row:?}");
        if counts_disk_writes(dir.path()) {
            assert!(num(11) > 0.0, "the run's states are flushed to disk, and the bytes counted: {row:?}");
        }
    }
    assert_eq!(rows[0][12], "12", "flat out, 6,000 events make full batches of 512");
    assert!(rows[1][12].parse::<u32>().unwrap() >= 12, "an offered load makes batches of what has arrived");
    assert!(stdout.contains("| offered | decode | state read + model"), "the per-stage table: {stdout}");
}

/// `bench --replay` replays a generated Parquet file and reports what a replay has: events,
/// users, rate, CPU, memory and state, no latency; it refuses an offered load.
#[test]
fn bench_replay_replays_a_generated_parquet_file_and_reports_its_columns() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().display().to_string();
    let out = intentflow(&["bench", "--replay", "--users", "500", "--events", "4000", "--seed", "3", "--work-dir", &work]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let rows = bench_rows(&stdout, "replay, Parquet to Parquet");
    assert_eq!(rows.len(), 1, "{stdout}");
    let row = &rows[0];
    let num = |i: usize| row[i].parse::<f64>().unwrap_or_else(|_| panic!("column {i} of {row:?}"));
    assert_eq!((num(2), num(3)), (4000.0, 500.0), "events, users: {row:?}");
    assert!(num(4) > 0.0 && num(8) > 0.0 && num(9) > 0.0, "events/s, CPU and RSS measured: {row:?}");
    assert_eq!(&row[5..8], ["–", "–", "–"], "a replay has no latency: {row:?}");
    assert!(num(10) > 40.0, "a compacted state of the default model: {row:?}");
    assert!(stdout.contains("batch 16384, 1 partitions, the replay's store"), "{stdout}");
    // The input stays in the work directory; the replay's state and intents are removed.
    let left: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(left.iter().any(|f| f == "replay-events-500-4000-3.parquet") && !left.iter().any(|f| f.starts_with("replay-state")), "{left:?}");
    let refused = intentflow(&["bench", "--replay", "--users", "500", "--rates", "1000", "--work-dir", &work]);
    assert!(!refused.status.success() && text(&refused.stderr).contains("--replay runs flat out"), "{}", text(&refused.stderr));
}
