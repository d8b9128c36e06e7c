//! The batch-style commands: `generate`, `import`, `train`, `eval`, `tail`.

use crate::import::{self, Format};
use crate::kafka::{self, DeliveryWindow};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use intentflow_model::assess::{assess, Assessment};
use intentflow_model::calibrate::CalibrationMethod;
use intentflow_model::train::{EpochReport, LabelHorizon, Part, SplitSpec, TrainConfig};
use intentflow_model::{DeviceKind, IntentModel};
use intentflow_operators::generate::{generate, GeneratorConfig};
use intentflow_operators::columnar::EventWriter;
use intentflow_schemas::{Event, EventType, ScoredIntent, SessionConfig};
use rdkafka::Message;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where event commands write: a JSONL or Parquet file, or a Kafka topic.
#[derive(Debug, Clone, Args)]
pub struct Sink {
    /// Write to this file: Parquet if it ends in `.parquet`, schema-v1 JSONL otherwise.
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
    /// With --topic: stamp each record with its event time instead of the producer's clock, so
    /// that `intentflow replay --from/--to` times select by event time. A topic created here
    /// then gets unlimited time retention (`retention.ms=-1`): under the broker's default of 7
    /// days, records stamped with a past event time are deleted within minutes. Give an
    /// existing topic that setting yourself.
    #[arg(long, requires = "topic")]
    pub event_time: bool,
}

/// Whether `path` names a Parquet file to write.
pub fn is_parquet_name(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

impl Sink {
    /// Writes records, each holding an event (`event` finds it) and written whole as JSON, which
    /// may carry more than the event, such as the generator's oracle; Parquet takes the events
    /// alone. Returns how many.
    async fn write<'e, R: serde::Serialize + 'e>(&self, records: impl IntoIterator<Item = &'e R>, event: impl Fn(&R) -> &Event) -> Result<u64> {
        if let Some(path) = &self.output {
            if is_parquet_name(path) {
                let mut out = EventWriter::create(path)?;
                for r in records {
                    out.write(event(r))?;
                }
                return Ok(out.finish()?);
            }
            let mut out = std::io::BufWriter::new(
                std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
            );
            let mut n = 0;
            for r in records {
                serde_json::to_writer(&mut out, r)?;
                out.write_all(b"\n")?;
                n += 1;
            }
            out.flush()?;
            return Ok(n);
        }
        let topic = self.topic.as_deref().expect("clap requires --output or --topic");
        let configs: &[(&str, &str)] = if self.event_time { &[("retention.ms", "-1")] } else { &[] };
        kafka::ensure_topic_with(&self.brokers, topic, self.partitions, configs).await?;
        let producer = kafka::producer(&self.brokers, &Default::default())?;
        let mut window = DeliveryWindow::new(&producer, 100_000);
        for r in records {
            let (e, json) = (event(r), serde_json::to_vec(r)?);
            let key = e.user_id.as_bytes();
            if self.event_time {
                window.send_at(topic, key, &json, e.ts).await?;
            } else {
                window.send(topic, key, &json).await?;
            }
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
        .write(&events, |g| &g.event)
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
        .write(&imported.events, |e| e)
        .await?;
    eprintln!("imported from {}: {}", args.input.display(), imported.summary());
    eprintln!("wrote {n} events to {}", args.sink.describe());
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
    /// Most passes over the training split (early stopping may end sooner).
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: usize,
    /// Stop after this many epochs without a better validation PR-AUC.
    #[arg(long, default_value_t = TrainConfig::default().patience)]
    pub patience: usize,
    /// GRU hidden size of each ensemble member.
    #[arg(long, default_value_t = TrainConfig::default().hidden_dim)]
    pub hidden_dim: usize,
    /// GRUs trained from consecutive seeds and packed into one served GRU (a seed ensemble).
    #[arg(long, default_value_t = TrainConfig::default().members)]
    pub members: usize,
    /// Seed of initialisation and batch order.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,
    /// Sessions per batch.
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    pub batch_size: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = TrainConfig::default().learning_rate)]
    pub learning_rate: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = TrainConfig::default().weight_decay)]
    pub weight_decay: f64,
    /// Loss weight of a positive label (default: sqrt(negatives / positives) of the training split).
    #[arg(long)]
    pub pos_weight: Option<f64>,
    /// Hash buckets of the item embedding (0: no item embedding).
    #[arg(long, default_value_t = TrainConfig::default().item_embedding.0)]
    pub item_buckets: u32,
    /// Width of the item embedding.
    #[arg(long, default_value_t = TrainConfig::default().item_embedding.1)]
    pub item_dim: usize,
    /// Hash buckets of the category embedding (0: no category embedding).
    #[arg(long, default_value_t = TrainConfig::default().category_embedding.0)]
    pub category_buckets: u32,
    /// Width of the category embedding.
    #[arg(long, default_value_t = TrainConfig::default().category_embedding.1)]
    pub category_dim: usize,
    /// Dense features to switch off, by name (see docs/model.md), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub disable_features: Vec<String>,
    /// What the labels predict: the session purchases later, or the user purchases within 24 h.
    #[arg(long, value_enum, default_value = "session")]
    pub label: LabelArg,
    /// Share of sessions (by start time, just before the test split) that validate.
    #[arg(long, default_value_t = SplitSpec::default().val_fraction)]
    pub val_fraction: f64,
    /// Share of sessions (the latest by start time) held out for `intentflow eval`.
    #[arg(long, default_value_t = SplitSpec::default().test_fraction)]
    pub test_fraction: f64,
    /// Calibration fitted on validation.
    #[arg(long, value_enum, default_value = "platt")]
    pub calibration: CalibrationArg,
    /// Inactivity (minutes) that starts a new session. Recorded in model.json: the operator
    /// cuts sessions the way the model was trained.
    #[arg(long, default_value_t = 30)]
    pub session_gap_minutes: i64,
}

/// `--label` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelArg {
    /// The session purchases later.
    Session,
    /// The user purchases within 24 hours.
    #[value(name = "24h")]
    Within24h,
}

/// `--calibration` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CalibrationArg {
    /// Raw GRU probabilities.
    None,
    /// Platt scaling.
    Platt,
    /// Isotonic regression.
    Isotonic,
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        if self.session_gap_minutes <= 0 {
            bail!("--session-gap-minutes must be positive");
        }
        if self.hidden_dim == 0 || self.members == 0 || self.epochs == 0 || self.batch_size == 0 {
            bail!("--hidden-dim, --members, --epochs and --batch-size must be at least 1");
        }
        let fractions_ok = self.val_fraction > 0.0 && self.test_fraction >= 0.0 && self.val_fraction + self.test_fraction < 1.0;
        if !fractions_ok {
            bail!("--val-fraction must be positive and --val-fraction + --test-fraction below 1");
        }
        Ok(TrainConfig {
            epochs: self.epochs,
            patience: self.patience,
            hidden_dim: self.hidden_dim,
            members: self.members,
            seed: self.seed,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            weight_decay: self.weight_decay,
            pos_weight: self.pos_weight,
            item_embedding: (self.item_buckets, self.item_dim),
            category_embedding: (self.category_buckets, self.category_dim),
            disabled: self.disable_features.clone(),
            label: match self.label {
                LabelArg::Session => LabelHorizon::Session,
                LabelArg::Within24h => LabelHorizon::Within24h,
            },
            split: SplitSpec { val_fraction: self.val_fraction, test_fraction: self.test_fraction },
            calibration: match self.calibration {
                CalibrationArg::None => CalibrationMethod::None,
                CalibrationArg::Platt => CalibrationMethod::Platt,
                CalibrationArg::Isotonic => CalibrationMethod::Isotonic,
            },
            session: SessionConfig { gap_ms: self.session_gap_minutes * 60_000 },
            ..TrainConfig::default()
        })
    }
}

fn epoch_line(member: usize, r: &EpochReport) -> String {
    let f = |v: Option<f64>| v.map_or("n/a".to_string(), |a| format!("{a:.4}"));
    format!(
        "member {member} epoch {:>3}: train loss {:.4}  val log loss {:.4}  val ROC-AUC {}  val PR-AUC {}{}",
        r.epoch,
        r.train_loss,
        r.val_log_loss,
        f(r.val_roc_auc),
        f(r.val_pr_auc),
        if r.best { "  *" } else { "" }
    )
}

/// Trains a model and writes it to `--model-dir`.
///
/// # Errors
///
/// File failures, or data without purchases to learn from.
pub fn train_cmd(args: &TrainArgs) -> Result<()> {
    let cfg = args.config()?;
    let imported = import::read_events(&args.input, args.format)?;
    report_bad_rows(&args.input, &imported.bad);
    eprintln!("training on {}: {}", args.input.display(), imported.summary());
    let device = DeviceKind::Cpu.open()?;
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) { ProgressBar::new(cfg.members as u64) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("[{bar:30}] {pos}/{len} members {elapsed} {msg}").expect("valid template"));
    let trained = intentflow_model::train::train(&imported.events, &cfg, &device, |member, r| {
        if member as u64 > bar.position() {
            bar.inc(1);
        }
        bar.set_message(format!("epoch {}", r.epoch));
        let line = epoch_line(member, r);
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(&line);
        }
    })?;
    bar.finish_and_clear();
    let meta = trained.save(&args.model_dir)?;
    let s = &trained.summary;
    eprintln!(
        "model {} written to {} ({} members, best epochs {:?}; sessions {} train / {} validation / {} test held out; \
         train base rate {:.4}, positive weight {:.2}; val ROC-AUC {}, PR-AUC {}; calibration {:?})",
        meta.version,
        args.model_dir.display(),
        s.members,
        s.best_epochs,
        s.train_sessions,
        s.val_sessions,
        s.test_sessions,
        s.train_base_rate,
        s.pos_weight,
        s.val_roc_auc.map_or("n/a".into(), |a| format!("{a:.4}")),
        s.val_pr_auc.map_or("n/a".into(), |a| format!("{a:.4}")),
        cfg.calibration,
    );
    eprintln!("evaluate it on the held-out test sessions: intentflow eval --model-dir {} --input {}", args.model_dir.display(), args.input.display());
    Ok(())
}

/// `intentflow eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// The model to evaluate.
    #[arg(long)]
    pub model_dir: PathBuf,
    /// Events to evaluate on.
    #[arg(long)]
    pub input: PathBuf,
    /// Layout of the input file.
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: Format,
    /// Which sessions of the model's recorded time split to score: `test` (held out by
    /// training on the same input) or `all` (for a different input).
    #[arg(long, value_enum, default_value = "test")]
    pub part: PartArg,
    /// Where to write metrics.json and report.html (default: the model directory).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Bootstrap replicates for the 95 % intervals.
    #[arg(long, default_value_t = 500)]
    pub bootstrap: usize,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `--part` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PartArg {
    /// The latest sessions, held out by training.
    Test,
    /// The validation sessions.
    Validation,
    /// The training sessions.
    Train,
    /// Every session.
    All,
}

/// Prints the comparison table of an assessment.
fn print_table(a: &Assessment) {
    let f = |v: Option<f64>| v.map_or("   n/a".to_string(), |a| format!("{a:.4}"));
    let ci = |c: Option<intentflow_model::eval::Interval>| c.map_or(String::new(), |c| format!(" [{:.3}, {:.3}]", c.lo, c.hi));
    println!("{:<20} {:>24} {:>24} {:>8} {:>8} {:>7} {:>6} {:>6} {:>6}", "scorer", "ROC-AUC [95% CI]", "PR-AUC [95% CI]", "logloss", "Brier", "ECE", "P", "R", "F1");
    for s in &a.scorers {
        let m = &s.metrics;
        println!(
            "{:<20} {:>24} {:>24} {:>8.4} {:>8.4} {:>7.4} {:>6.3} {:>6.3} {:>6.3}",
            s.name,
            format!("{}{}", f(m.roc_auc), ci(m.roc_auc_ci)),
            format!("{}{}", f(m.pr_auc), ci(m.pr_auc_ci)),
            m.log_loss,
            m.brier,
            m.ece,
            m.at_threshold.precision,
            m.at_threshold.recall,
            m.at_threshold.f1
        );
    }
}

/// Evaluates a model, its baselines and ensemble; writes metrics.json and report.html.
///
/// # Errors
///
/// File failures, a model without baselines, or an input part without labelled events.
pub fn eval_cmd(args: &EvalArgs) -> Result<()> {
    let model = IntentModel::load(&args.model_dir, &DeviceKind::Cpu.open()?)?;
    let imported = import::read_events(&args.input, args.format)?;
    report_bad_rows(&args.input, &imported.bad);
    let part = match args.part {
        PartArg::Test => Part::Test,
        PartArg::Validation => Part::Validation,
        PartArg::Train => Part::Train,
        PartArg::All => Part::All,
    };
    let a = assess(&model, &imported.events, imported.latent_intent.as_deref(), part, args.bootstrap, args.seed)?;
    let out = args.out_dir.clone().unwrap_or_else(|| args.model_dir.clone());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let metrics_path = out.join("metrics.json");
    std::fs::write(&metrics_path, serde_json::to_vec_pretty(&a)?).with_context(|| format!("writing {}", metrics_path.display()))?;
    let report_path = out.join("report.html");
    let html = intentflow_model::report::render_html(&a, &args.input.display().to_string());
    std::fs::write(&report_path, html).with_context(|| format!("writing {}", report_path.display()))?;
    if let Some(m) = a.scorers.first().map(|s| &s.metrics) {
        println!(
            "model {} on {} ({} part): {} labelled events in {} sessions, positive rate {:.4}",
            a.model_version,
            args.input.display(),
            a.part,
            m.events,
            m.sessions,
            m.base_rate
        );
    }
    print_table(&a);
    eprintln!("wrote {} and {}", metrics_path.display(), report_path.display());
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
