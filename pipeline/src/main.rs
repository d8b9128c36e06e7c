//! `intentflow`: purchase-intent scores from Kafka clickstreams.

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use intentflow_pipeline::{commands, config, replay, runtime, telemetry};
use std::sync::Arc;
use tokio::sync::watch;

/// Rust's allocations go to mimalloc (RocksDB's and librdkafka's C/C++ keep the system's):
/// the hot path allocates per event, and glibc's malloc and free took a sixth of it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "intentflow", version, about = "Live purchase-intent scores from Kafka clickstreams")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `intentflow_pipeline=debug`.
    #[arg(long, global = true, env = "INTENTFLOW_LOG", default_value = "info")]
    log: String,
    /// Log lines as `text` (for people) or `json` (one object a line, for a log pipeline: time,
    /// level, target, message and every field, such as a rejected record's topic, partition and
    /// offset, as a key of its own).
    #[arg(long, global = true, env = "INTENTFLOW_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the streaming operator: consume events, score them, produce intents.
    Run(config::RunArgs),
    /// Generate a seeded synthetic clickstream into a file or a topic.
    Generate(commands::generate::GenerateArgs),
    /// Convert a dataset (REES46, Taobao, RetailRocket, JSONL) into schema-v1 events in a file or a topic.
    Import(commands::import::ImportArgs),
    /// Train the intent GRU, its calibration, baselines and ensemble from an event file.
    Train(commands::train::TrainArgs),
    /// Evaluate a model against its baselines: metrics.json, report.html and a table.
    Eval(commands::eval::EvalArgs),
    /// Print scored intents from the output topic.
    Tail(commands::tail::TailArgs),
    /// Reprocess a bounded range of topics (or event files) into a separate state and a backfill topic or file.
    Replay(replay::ReplayArgs),
    /// Measure the hot path in-process (decode, RocksDB state, model, encode), or the live operator through a broker: events/s, latency, CPU, RSS, bytes per user.
    Bench(commands::bench::BenchArgs),
    /// Check a config file (`config check FILE`) or print the defaults (`config print-defaults`).
    Config(commands::config::ConfigArgs),
    /// A running operator's status page in the terminal: throughput, lag, latency, scores, rising users.
    Status(commands::status::StatusArgs),
    /// Delete users' states wherever they live (the erasure path for a GDPR delete request): the owning operators apply it and tombstone the changelog.
    Erase(commands::erase::EraseArgs),
}

/// Turns SIGTERM and SIGINT into the shutdown signal.
fn watch_signals() -> Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name} received: finishing the current batch");
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn run(args: config::RunArgs) -> Result<()> {
    let cfg = config::RunConfig::resolve(&args)?;
    if cfg.compute_threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.compute_threads)
            .thread_name(|i| format!("intentflow-compute-{i}"))
            .build_global()
            .context("starting the compute threads")?;
    }
    let health = Arc::new(telemetry::Health::default());
    if let Some(addr) = cfg.metrics_socket()? {
        let prometheus = telemetry::install_recorder()?;
        let health = health.clone();
        tokio::spawn(async move {
            if let Err(e) = telemetry::serve(addr, prometheus, health).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    let summary = runtime::run(cfg, watch_signals()?, health).await?;
    eprintln!(
        "intentflow run: {} records in, {} intents out, {} invalid, {} skipped as already applied, {} batches",
        summary.records, summary.intents, summary.invalid, summary.skipped, summary.batches
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    // Fault injection for the crash tests (`FAILPOINTS=name=action;…`); nothing is armed without it.
    let _failpoints = fail::FailScenario::setup();
    // `--version` names the librdkafka build: what TLS, SASL mechanisms and codecs it has.
    // Leaked once: clap wants a `'static` string (its `string` feature is off).
    let long_version: &'static str = String::leak(format!(
        "{} (git {})\nlibrdkafka {} ({})",
        env!("CARGO_PKG_VERSION"),
        env!("INTENTFLOW_GIT_SHA"),
        intentflow_pipeline::kafka::librdkafka_version(),
        intentflow_pipeline::kafka::builtin_features()
    ));
    let cli = Cli::from_arg_matches(&Cli::command().long_version(long_version).get_matches())?;
    let logs = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log)?).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).init(),
    }
    match cli.command {
        Command::Run(args) => run(args).await,
        Command::Generate(args) => commands::generate::generate_cmd(&args).await,
        Command::Import(args) => commands::import::import_cmd(&args).await,
        Command::Train(args) => tokio::task::block_in_place(|| commands::train::train_cmd(&args)),
        Command::Eval(args) => tokio::task::block_in_place(|| commands::eval::eval_cmd(&args)),
        Command::Tail(args) => tokio::task::block_in_place(|| commands::tail::tail_cmd(&args)),
        Command::Bench(args) => commands::bench::bench_cmd(&args).await,
        Command::Config(args) => commands::config::config_cmd(&args),
        Command::Status(args) => tokio::task::block_in_place(|| commands::status::status_cmd(&args)),
        Command::Erase(args) => commands::erase::erase_cmd(&args).await,
        Command::Replay(args) => {
            let s = replay::replay(&args.job()?).await?;
            for ((source, partition), (from, to)) in &s.ranges {
                eprintln!("intentflow replay: {source}/{partition} offsets [{from}, {to})");
            }
            eprintln!(
                "intentflow replay: {} events, {} intents out, {} invalid in {:.2} s ({:.0} events/s)",
                s.events,
                s.outputs,
                s.invalid,
                s.seconds,
                s.events as f64 / s.seconds.max(1e-9)
            );
            Ok(())
        }
    }
}
