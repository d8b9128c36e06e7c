//! `intentflow train`: the seed ensemble of a sequence cell (GRU, LSTM or causal convolution; by
//! default each, and one chosen on validation), its calibration and baselines from an event file.

use super::{progress_reader, report_bad_rows, InputArgs};
use crate::external_sort::{ExternalSort, Keyed, SortOrder};
use anyhow::{bail, Result};
use intentflow_formats::BadRow;
use intentflow_model::train::{SessionSet, SessionsBuilder};
use intentflow_schemas::{Event, EventDecoder, EventType, Limits};
use std::path::{Path, PathBuf};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use intentflow_model::calibrate::CalibrationMethod;
use intentflow_model::train::{EpochReport, LabelHorizon, SplitSpec, TrainConfig};
use intentflow_model::{Cell, DeviceKind};
use intentflow_schemas::SessionConfig;

/// `intentflow train`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Where to write model.safetensors and model.json.
    #[arg(long)]
    pub model_dir: PathBuf,
    /// Most passes over the training split (early stopping may end sooner).
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: usize,
    /// Stop after this many epochs without a better validation PR-AUC.
    #[arg(long, default_value_t = TrainConfig::default().patience)]
    pub patience: usize,
    /// The sequence cell: `gru`, `lstm`, `cnn` (a causal convolution over the last three
    /// events), or `auto`: train all three and serve the cheapest (GRU, LSTM, CNN in that order)
    /// unless a dearer one beats it on validation PR-AUC with probability ≥ 0.9 (paired session
    /// bootstrap); the others are kept under `MODEL_DIR/candidates/` for `intentflow eval`.
    #[arg(long, value_enum, default_value = "auto")]
    pub arch: ArchArg,
    /// Hidden size of each ensemble member.
    #[arg(long, default_value_t = TrainConfig::default().hidden_dim)]
    pub hidden_dim: usize,
    /// Networks trained from consecutive seeds and packed into one served network (a seed
    /// ensemble).
    #[arg(long, default_value_t = TrainConfig::default().members)]
    pub members: usize,
    /// Precision the served model keeps hidden states in: `int8` (the default) rounds each new
    /// state in the step, on the CPU and the GPU alike, to 8-bit integers in blocks of 8 that
    /// share a power-of-two scale, so states take a byte a value in RocksDB and the changelog;
    /// `f16` rounds them to half precision (two bytes a value); `f32` keeps them whole. Quality
    /// cost measured with `intentflow eval --state-precision int8|f16`: docs/performance.md.
    #[arg(long, value_enum, default_value = "int8")]
    pub state_precision: super::eval::PrecisionArg,
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
    /// Hash buckets of the head's brand embedding (fewer than 2: none).
    #[arg(long, default_value_t = TrainConfig::default().head_buckets.0)]
    pub brand_buckets: u32,
    /// Hash buckets of the head's embedding of the category path's top level (fewer than 2: none).
    #[arg(long, default_value_t = TrainConfig::default().head_buckets.1)]
    pub top_category_buckets: u32,
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
    /// Device to train on: `cpu` (members side by side on all cores), or `cuda` in a build with
    /// the `cuda` feature (members one after another on the GPU).
    #[arg(long, default_value = "cpu", value_parser = crate::config::parse_device)]
    pub device: DeviceKind,
    /// Leave out the head's skip connection: the head then reads the GRU's hidden vector only
    /// (by default it also reads the dense features, see docs/model.md).
    #[arg(long)]
    pub no_skip: bool,
    /// Events held in memory while the input is put in user order (about 250 bytes each);
    /// beyond it, sorted runs are spilled to disk and merged. The model is the same whatever
    /// the limit.
    #[arg(long, default_value_t = 2_000_000)]
    pub max_events_in_memory: usize,
    /// Where sorted runs, labelled sessions and training batches are spilled [default: the
    /// system's temporary directory]. Needs about 2.5 times the input's size as JSON (runs of
    /// JSON, then about 300 bytes a labelled event, then the padded batches); removed when
    /// training ends, left behind (`sort-spill-*`, `train-spill-*`) if it is killed.
    #[arg(long)]
    pub spill_dir: Option<PathBuf>,
}

/// `--arch` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchArg {
    /// A GRU.
    Gru,
    /// An LSTM.
    Lstm,
    /// A causal temporal convolution over the session's last three events.
    Cnn,
    /// Every cell; the cheapest is served unless a dearer one validates better beyond doubt.
    Auto,
}

impl ArchArg {
    /// The cells to train.
    pub fn cells(self) -> Vec<Cell> {
        match self {
            ArchArg::Gru => vec![Cell::Gru],
            ArchArg::Lstm => vec![Cell::Lstm],
            ArchArg::Cnn => vec![Cell::Cnn],
            ArchArg::Auto => Cell::ALL.to_vec(),
        }
    }
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
        if self.state_precision == super::eval::PrecisionArg::Bf16 {
            bail!("--state-precision: a model keeps states in f32, f16 or int8 (bf16 is for `intentflow eval --state-precision` only)");
        }
        let fractions_ok = self.val_fraction > 0.0 && self.test_fraction >= 0.0 && self.val_fraction + self.test_fraction < 1.0;
        if !fractions_ok {
            bail!("--val-fraction must be positive and --val-fraction + --test-fraction below 1");
        }
        Ok(TrainConfig {
            cells: self.arch.cells(),
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
            head_buckets: (self.brand_buckets, self.top_category_buckets),
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
            state_precision: self.state_precision.into(),
            skip: !self.no_skip,
            ..TrainConfig::default()
        })
    }
}

fn epoch_line(member: usize, r: &EpochReport) -> String {
    let f = |v: Option<f64>| v.map_or("n/a".to_string(), |a| format!("{a:.4}"));
    format!(
        "{} member {member} epoch {:>3}: train loss {:.4}  val log loss {:.4}  val ROC-AUC {}  val PR-AUC {}{}",
        r.cell,
        r.epoch,
        r.train_loss,
        r.val_log_loss,
        f(r.val_roc_auc),
        f(r.val_pr_auc),
        if r.best { "  *" } else { "" }
    )
}

/// Reads the input once, as a stream, into an external sort by user (at most `limit` events in
/// memory), then cuts each user's events into labelled sessions spilled under `spill`: training
/// never holds the input, so its size is bounded by disk. Each user's events are in time order,
/// equal times in file order: the order an in-memory read gives them.
fn spill_sessions(input: &InputArgs, cfg: &TrainConfig, limit: usize, spill: &Path) -> Result<SessionSet> {
    let path = &input.input;
    let decoder = EventDecoder::new(Limits::default());
    let mut sort = ExternalSort::by(SortOrder::User, limit, spill);
    let (mut pushed, mut bad, mut skipped) = (Ok(()), Vec::new(), 0usize);
    let mut by_type = [0usize; EventType::ALL.len()];
    intentflow_formats::for_each_row(path, input.format.into(), &decoder, progress_reader(path), |row, event| match event {
        Ok(event) if pushed.is_ok() => {
            by_type[event.kind.index()] += 1;
            pushed = sort.push(Keyed { file: 0, row: row as u64, event });
        }
        Ok(_) => {}
        Err(reason) => {
            skipped += 1;
            if bad.len() < 10 {
                bad.push(BadRow { line: row, reason });
            }
        }
    })?;
    pushed?;
    report_bad_rows(path, &bad, skipped);
    if sort.runs() > 0 {
        eprintln!("{} events exceed --max-events-in-memory {limit}: merging {} sorted runs from {}", sort.len(), sort.runs() + 1, spill.display());
    }
    let mut builder = SessionsBuilder::create(spill, &cfg.feature_spec(), cfg.label)?;
    let (mut user, mut users): (Vec<Event>, usize) = (Vec::new(), 0);
    for keyed in sort.sorted()? {
        let event = keyed?.event;
        if user.last().is_some_and(|u| u.user_id != event.user_id) {
            builder.add_user(&user)?;
            users += 1;
            user.clear();
        }
        user.push(event);
    }
    if !user.is_empty() {
        builder.add_user(&user)?;
        users += 1;
    }
    eprintln!("training on {}: {}", path.display(), intentflow_formats::summary(&by_type, users, skipped));
    Ok(builder.finish()?)
}

/// Trains a model and writes it to `--model-dir`.
///
/// # Errors
///
/// File failures, or data without purchases to learn from.
pub fn train_cmd(args: &TrainArgs) -> Result<()> {
    let cfg = args.config()?;
    let device = args.device.open()?;
    let spill = args.spill_dir.clone().unwrap_or_else(std::env::temp_dir);
    let sessions = spill_sessions(&args.input, &cfg, args.max_events_in_memory, &spill)?;
    // Members train side by side on the CPU: the bar counts epochs of all of them (early stopping
    // may end them before the most).
    let most = (cfg.cells.len() * cfg.members * cfg.epochs) as u64;
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) { ProgressBar::new(most) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("[{bar:30}] {pos}/{len} epochs (all cells and members; early stopping ends sooner) {elapsed} {msg}").expect("valid template"));
    let trained = intentflow_model::train::train_sessions(&sessions, &cfg, &device, |member, r| {
        bar.inc(1);
        bar.set_message(format!("{} member {member} epoch {}", r.cell, r.epoch));
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
    if s.trials.len() > 1 {
        let f = |v: Option<f64>| v.map_or("n/a".to_string(), |a| format!("{a:.4}"));
        let trials: Vec<String> = s.trials.iter().map(|t| format!("{} {} / {}", t.cell, f(t.val_roc_auc), f(t.val_pr_auc))).collect();
        eprintln!("cells on validation (ROC-AUC / PR-AUC): {}; serving {}", trials.join(", "), meta.cell);
    }
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
    eprintln!("evaluate it on the held-out test sessions: intentflow eval --model-dir {} --input {}", args.model_dir.display(), args.input.input.display());
    Ok(())
}
