//! The batch-style commands: `generate`, `import`, `train`, `tail`.

use crate::import::{self, Format};
use crate::kafka::{self, DeliveryWindow};
use anyhow::{bail, Context, Result};
use clap::Args;
use intentflow_model::{train::TrainConfig, DeviceKind, IntentModel};
use intentflow_operators::generate::{generate, GeneratorConfig};
use intentflow_schemas::{EventType, ScoredIntent, SessionConfig};
use rdkafka::Message;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where event commands write: a JSONL file or a Kafka topic.
#[derive(Debug, Clone, Args)]
pub struct Sink {
    /// Write schema-v1 JSONL to this file.
    #[arg(long, conflicts_with = "topic", required_unless_present = "topic")]
    pub output: Option<PathBuf>,
    /// Produce to this Kafka topic, keyed by user id.
    #[arg(long)]
    pub topic: Option<String>,
    /// Kafka bootstrap servers (with --topic).
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Partitions of the topic if it has to be created.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
}

impl Sink {
    /// Writes `(user id, JSON)` records; returns how many.
    async fn write(&self, records: impl IntoIterator<Item = (String, Vec<u8>)>) -> Result<u64> {
        if let Some(path) = &self.output {
            let mut out = std::io::BufWriter::new(
                std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
            );
            let mut n = 0;
            for (_, json) in records {
                out.write_all(&json)?;
                out.write_all(b"\n")?;
                n += 1;
            }
            out.flush()?;
            return Ok(n);
        }
        let topic = self.topic.as_deref().expect("clap requires --output or --topic");
        kafka::ensure_topic(&self.brokers, topic, self.partitions).await?;
        let producer = kafka::producer(&self.brokers, &Default::default())?;
        let mut window = DeliveryWindow::new(&producer, 100_000);
        for (key, json) in records {
            window.send(topic, key.as_bytes(), &json).await?;
        }
        window.finish().await
    }

    fn describe(&self) -> String {
        match (&self.output, &self.topic) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(t)) => format!("topic {t} on {}", self.brokers),
            (None, None) => String::new(),
        }
    }
}

/// `intentflow generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Number of users.
    #[arg(long, default_value_t = 1_000)]
    pub users: usize,
    /// Number of events in all.
    #[arg(long, default_value_t = 20_000)]
    pub events: usize,
    /// Random seed; the same seed gives the same events.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub sink: Sink,
}

/// Generates a synthetic clickstream.
///
/// # Errors
///
/// Invalid sizes, file or Kafka failures.
pub async fn generate_cmd(args: &GenerateArgs) -> Result<()> {
    if args.users == 0 || args.events < args.users {
        bail!("--events ({}) must be at least --users ({}), and --users at least 1", args.events, args.users);
    }
    let events = generate(&GeneratorConfig { users: args.users, events: args.events, seed: args.seed, ..Default::default() });
    let n = args
        .sink
        .write(events.iter().map(|g| (g.event.user_id.clone(), serde_json::to_vec(g).expect("events serialise"))))
        .await?;
    eprintln!("generated {n} events for {} users (seed {}) into {}", args.users, args.seed, args.sink.describe());
    Ok(())
}

/// `intentflow import`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// Layout of the input file.
    #[arg(long, value_enum)]
    pub format: Format,
    /// Input file.
    #[arg(long)]
    pub input: PathBuf,
    #[command(flatten)]
    pub sink: Sink,
}

fn report_bad_rows(path: &Path, bad: &[import::BadRow]) {
    for b in bad.iter().take(10) {
        eprintln!("{}:{}: skipped: {}", path.display(), b.line, b.reason);
    }
    if bad.len() > 10 {
        eprintln!("{}: {} more rows skipped", path.display(), bad.len() - 10);
    }
}

/// Converts a dataset file into schema-v1 events in time order.
///
/// # Errors
///
/// File or Kafka failures.
pub async fn import_cmd(args: &ImportArgs) -> Result<()> {
    let imported = import::read_events(&args.input, args.format)?;
    report_bad_rows(&args.input, &imported.bad);
    let n = args
        .sink
        .write(imported.events.iter().map(|e| (e.user_id.clone(), serde_json::to_vec(e).expect("events serialise"))))
        .await?;
    eprintln!("imported {n} events ({} rows skipped) from {} into {}", imported.bad.len(), args.input.display(), args.sink.describe());
    Ok(())
}

/// `intentflow train`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Training events.
    #[arg(long)]
    pub input: PathBuf,
    /// Layout of the input file.
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: Format,
    /// Where to write model.safetensors and model.json.
    #[arg(long)]
    pub model_dir: PathBuf,
    /// Passes over the training split.
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: usize,
    /// GRU hidden size.
    #[arg(long, default_value_t = TrainConfig::default().hidden_dim)]
    pub hidden_dim: usize,
    /// Seed of initialisation and batch order.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,
    /// Sessions per batch.
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    pub batch_size: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = TrainConfig::default().learning_rate)]
    pub learning_rate: f64,
    /// Inactivity (minutes) that starts a new session. Recorded in model.json: the operator
    /// cuts sessions the way the model was trained.
    #[arg(long, default_value_t = 30)]
    pub session_gap_minutes: i64,
}

/// Trains a model and writes it to `--model-dir`.
///
/// # Errors
///
/// File failures, or data without purchases to learn from.
pub fn train_cmd(args: &TrainArgs) -> Result<()> {
    if args.session_gap_minutes <= 0 {
        bail!("--session-gap-minutes must be positive");
    }
    let imported = import::read_events(&args.input, args.format)?;
    report_bad_rows(&args.input, &imported.bad);
    let cfg = TrainConfig {
        epochs: args.epochs,
        hidden_dim: args.hidden_dim,
        seed: args.seed,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        session: SessionConfig { gap_ms: args.session_gap_minutes * 60_000 },
        ..TrainConfig::default()
    };
    eprintln!("training on {} events from {}", imported.events.len(), args.input.display());
    let device = DeviceKind::Cpu.open()?;
    let (params, spec, summary) = intentflow_model::train::train(&imported.events, &cfg, &device, |epoch, loss, val_loss, val_auc| {
        let auc = val_auc.map_or("n/a".to_string(), |a| format!("{a:.4}"));
        eprintln!("epoch {epoch:>3}/{}: train loss {loss:.4}  val log loss {val_loss:.4}  val ROC-AUC {auc}", cfg.epochs);
    })?;
    let meta = IntentModel::save(&args.model_dir, &params, spec, Some(summary.clone()))?;
    eprintln!(
        "model {} written to {} (best epoch {}, {} train / {} validation sessions, base rate {:.3}, val ROC-AUC {})",
        meta.version,
        args.model_dir.display(),
        summary.best_epoch,
        summary.train_sessions,
        summary.val_sessions,
        summary.train_base_rate,
        summary.val_roc_auc.map_or("n/a".into(), |a| format!("{a:.4}")),
    );
    Ok(())
}

/// `intentflow tail`.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Topic of scored intents.
    #[arg(long, default_value = "intents")]
    pub topic: String,
    /// Stop after this many records.
    #[arg(long, default_value_t = 20)]
    pub max: usize,
    /// Stop when no record arrived for this many milliseconds.
    #[arg(long, default_value_t = 3_000)]
    pub idle_ms: u64,
    /// Print raw JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Read the whole topic and show the N users, among those who have not just purchased,
    /// whose latest score is highest.
    #[arg(long, conflicts_with = "json")]
    pub top: Option<usize>,
}

/// Prints scored intents from the output topic (committed records only).
///
/// # Errors
///
/// Kafka failures.
pub fn tail_cmd(args: &TailArgs) -> Result<()> {
    let max = if args.top.is_some() { usize::MAX } else { args.max };
    let records = kafka::read_topic(&args.brokers, &args.topic, Duration::from_millis(args.idle_ms), |n| n >= max)?;
    if args.json {
        for m in &records {
            println!("{}", String::from_utf8_lossy(m.payload().unwrap_or_default()));
        }
        eprintln!("{} records from {}", records.len(), args.topic);
        return Ok(());
    }
    let intents: Vec<ScoredIntent> = records.iter().filter_map(|m| serde_json::from_slice(m.payload().unwrap_or_default()).ok()).collect();
    let shown: Vec<&ScoredIntent> = match args.top {
        None => intents.iter().collect(),
        Some(n) => {
            // The latest intent per user is the user's current intent; a user whose latest event
            // is a purchase has already bought, so is not a prospect.
            let mut latest: std::collections::HashMap<&str, &ScoredIntent> = std::collections::HashMap::new();
            for i in &intents {
                latest.insert(&i.user_id, i);
            }
            let mut top: Vec<&ScoredIntent> = latest.into_values().filter(|i| i.event_type != EventType::Purchase).collect();
            top.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.user_id.cmp(&b.user_id)));
            top.truncate(n);
            top
        }
    };
    println!("{:<14} {:>7}  {:<16} {:>4}  {:<24} source", "user", "score", "last event", "#", "event time");
    for i in shown {
        println!(
            "{:<14} {:>7.4}  {:<16} {:>4}  {:<24} {}/{}@{}",
            i.user_id, i.score, i.event_type.as_str(), i.session_events, i.event_ts, i.source.topic, i.source.partition, i.source.offset
        );
    }
    eprintln!("{} records from {} ({} scored intents)", records.len(), args.topic, intents.len());
    Ok(())
}
