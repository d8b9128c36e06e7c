//! Training of the intent network (a GRU, an LSTM or a causal convolution, or each and one
//! chosen on validation), its calibration, the baselines and the ensemble.
//!
//! * **Labels** ([`labelled_sessions`]): sessions are cut by
//!   [`intentflow_schemas::SessionState::advance`] (the dataset's session id, a 30-minute gap,
//!   and a purchase closes its session). With [`LabelHorizon::Session`] each event before the
//!   session's purchase is 1 if the session purchases later, else 0; with
//!   [`LabelHorizon::Within24h`] it is 1 if the user purchases within 24 hours after it. The
//!   purchase event itself carries no label.
//! * **Split** ([`SplitSpec`]): sessions sorted by start time; the latest `test_fraction` are
//!   the test split (never touched by training), the `val_fraction` before them validate, the
//!   rest train.
//! * **Optimisation:** length-bucketed padded batches with masks, BCE with logits weighted
//!   up for the rare positives, AdamW, early stopping on validation PR-AUC. Seeded
//!   initialisation and batch order; deterministic on CPU.
//! * **Wide start** (with [`TrainConfig::skip`], the default): the head's skip connection
//!   starts as a logistic regression on the session and history aggregates, the hidden
//!   vector's head weights at zero, and that regression is epoch 0 of early stopping.
//! * **Architectures** ([`TrainConfig::cells`]): with more than one cell, each is trained the
//!   same way and the cheapest is served unless a dearer one validates better beyond doubt
//!   ([`DEARER_CELL_CONFIDENCE`]); the others are kept as [`Trained::candidates`] for
//!   `intentflow eval` to compare.
//! * **After training**, on the validation split: calibration of the served network's score, the
//!   F1-maximising threshold, the logistic-regression baseline's threshold, the stacked
//!   ensemble, and the number of boosted trees of the tree baseline.
//!
//! The parts live in their own modules: [`labels`] (labels and the split), `fit` (one member's
//! training loop), `choice` (which cell is served); this module runs the pipeline over them.

mod choice;
mod fit;
pub mod labels;
pub mod store;

pub use choice::{CellTrial, DEARER_CELL_CONFIDENCE};
pub use labels::{labelled_sessions, user_sessions, LabelHorizon, LabelledSession, Part, SplitSpec};
pub use store::{SessionSet, SessionsBuilder};

use crate::baseline::{stack_row, Baselines, AGGREGATE_NAMES};
use crate::boosting::GradientBoosting;
use crate::calibrate::{Calibration, CalibrationMethod};
use crate::StatePrecision;
use crate::{eval, Cell, FeatureSpec, GruParams, Logistic, ModelError};
use candle_core::Device;
use choice::{choose_cell, ValidationEvents};
use fit::{aggregate_rows, fit_member, predict, Member, WideStart};
use store::{Split, TrainBatches};
use intentflow_schemas::{Event, SessionConfig};
use serde::{Deserialize, Serialize};

/// Most labelled training events each regression (the wide start, the logistic and boosted
/// baselines) is fitted on; past it, every k-th of them (k the smallest that fits), so that
/// their rows fit in memory whatever the input's size.
pub const MAX_FIT_ROWS: usize = 1 << 20;

/// Hyper-parameters of [`train`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// The cells to train: one, or several (cheapest first) of which one is served, chosen on
    /// validation PR-AUC (see the module documentation).
    pub cells: Vec<Cell>,
    /// Hidden size of each member.
    pub hidden_dim: usize,
    /// Networks trained from consecutive seeds and packed into one (a seed ensemble; the served
    /// hidden vector has `members × hidden_dim` values).
    pub members: usize,
    /// Most passes over the training split.
    pub epochs: usize,
    /// Stop after this many epochs without a better validation PR-AUC.
    pub patience: usize,
    /// Sessions per batch.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Longer sessions are cut to their first `max_len` events for training.
    pub max_len: usize,
    /// Weight of a positive label relative to a negative one; `None` uses
    /// `sqrt(negatives / positives)` of the training split.
    pub pos_weight: Option<f64>,
    /// Hash buckets and width of the item embedding (0 buckets: none).
    pub item_embedding: (u32, usize),
    /// Hash buckets and width of the category embedding (0 buckets: none).
    pub category_embedding: (u32, usize),
    /// Dense features switched off (by name).
    pub disabled: Vec<String>,
    /// What the labels predict.
    pub label: LabelHorizon,
    /// Train / validation / test split by session start.
    pub split: SplitSpec,
    /// Calibration fitted on validation.
    pub calibration: CalibrationMethod,
    /// Seed for initialisation and batch order.
    pub seed: u64,
    /// How sessions are cut.
    pub session: SessionConfig,
    /// Precision the served model keeps hidden states in between steps (default int8 blocks).
    /// Training itself runs in f32; `int8` stores 9 bytes per 8 values (`f16` 16, `f32` 32) at
    /// a measured cost below 0.0001 ROC-AUC (`intentflow eval --state-precision`,
    /// docs/performance.md).
    pub state_precision: StatePrecision,
    /// Whether the head also reads the dense features directly (the skip connection of
    /// `skip.weight`, see the `gru` module), beside the cell's output.
    pub skip: bool,
    /// Hash buckets of the head's brand and top-category embeddings (fewer than 2: none).
    pub head_buckets: (u32, u32),
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            cells: vec![Cell::Gru],
            hidden_dim: 8,
            members: 5,
            epochs: 40,
            patience: 8,
            batch_size: 64,
            learning_rate: 1e-3,
            weight_decay: 1e-4,
            max_len: 64,
            pos_weight: None,
            item_embedding: (1024, 8),
            category_embedding: (256, 4),
            disabled: Vec::new(),
            label: LabelHorizon::Session,
            split: SplitSpec::default(),
            calibration: CalibrationMethod::Platt,
            seed: 7,
            session: SessionConfig::default(),
            state_precision: StatePrecision::Int8,
            skip: true,
            head_buckets: (256, 64),
        }
    }
}

impl TrainConfig {
    /// The unfitted feature spec this configuration trains with.
    pub fn feature_spec(&self) -> FeatureSpec {
        let usable = |buckets: u32| if buckets >= 2 { buckets } else { 0 };
        FeatureSpec { disabled: self.disabled.clone(), ..FeatureSpec::identity(self.session) }
            .with_buckets(self.item_embedding.0, self.category_embedding.0)
            .with_head_buckets(usable(self.head_buckets.0), usable(self.head_buckets.1))
    }
}

/// Progress of one epoch, for display.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochReport {
    /// The cell being trained.
    pub cell: Cell,
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean weighted training loss.
    pub train_loss: f64,
    /// Validation log loss of the raw (weighted, uncalibrated) scores.
    pub val_log_loss: f64,
    /// Validation ROC-AUC.
    pub val_roc_auc: Option<f64>,
    /// Validation PR-AUC, the early-stopping criterion.
    pub val_pr_auc: Option<f64>,
    /// This epoch's weights are the best so far.
    pub best: bool,
}

/// What training measured, kept with the model for the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// Seed of weight initialisation and batch order (member k uses seed + k·1,000,003).
    pub seed: u64,
    /// Networks trained from consecutive seeds and packed into the model.
    pub members: usize,
    /// Epochs run by all members together (early stopping may end before the maximum).
    pub epochs: usize,
    /// Epoch whose weights were kept (best validation PR-AUC), per member.
    pub best_epochs: Vec<usize>,
    /// What the labels predict.
    pub label: LabelHorizon,
    /// How sessions were split.
    pub split: SplitSpec,
    /// Sessions in the training split.
    pub train_sessions: usize,
    /// Sessions in the validation split.
    pub val_sessions: usize,
    /// Sessions in the test split (not used by training).
    pub test_sessions: usize,
    /// Labelled events in the training split.
    pub train_events: usize,
    /// Share of positive labels in the training split.
    pub train_base_rate: f64,
    /// Weight of positive labels in the loss.
    pub pos_weight: f64,
    /// Validation ROC-AUC of the packed model (before calibration, which keeps the ranking).
    pub val_roc_auc: Option<f64>,
    /// Validation PR-AUC of the packed model.
    pub val_pr_auc: Option<f64>,
    /// Every cell trained, with its packed model's validation scores (absent in models from
    /// before LSTMs: one GRU).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trials: Vec<CellTrial>,
}

/// A trained model with everything fitted around it, ready to save.
#[derive(Debug, Clone)]
pub struct Trained {
    /// Network weights (on CPU).
    pub params: GruParams,
    /// Fitted feature contract.
    pub features: FeatureSpec,
    /// Calibration of the network's score.
    pub calibration: Calibration,
    /// F1-maximising threshold of the calibrated score on validation.
    pub threshold: f64,
    /// Baselines and ensemble.
    pub baselines: Baselines,
    /// The record of training.
    pub summary: TrainingSummary,
    /// Precision the served model keeps hidden states in ([`TrainConfig::state_precision`]).
    pub state_precision: StatePrecision,
    /// The cells trained beside the served one and not served (they did not validate better
    /// beyond doubt, see [`DEARER_CELL_CONFIDENCE`]), for comparison: `intentflow eval` scores
    /// them too. Empty when one cell was trained.
    pub candidates: Vec<Trained>,
}

/// Trains a model on `events`: for each of `cfg.cells`, `cfg.members` networks from consecutive
/// seeds packed into one ([`GruParams::pack`]), then one of them chosen to serve (see the module
/// documentation). `on_epoch` sees (member, epoch report), for progress display. The sessions
/// and batches are spilled under the system's temporary directory, as [`train_sessions`] reads
/// them; events too many for memory go through a [`SessionsBuilder`] instead.
///
/// # Errors
///
/// [`ModelError::Training`] when a split has nothing to learn from (no sessions, or no
/// positive label in training or validation); candle errors otherwise.
pub fn train(events: &[Event], cfg: &TrainConfig, device: &Device, on_epoch: impl FnMut(usize, &EpochReport) + Send) -> Result<Trained, ModelError> {
    let unfitted = cfg.feature_spec();
    unfitted.validate().map_err(ModelError::Training)?;
    let sessions = SessionSet::of_events(events, &unfitted, cfg.label, &std::env::temp_dir())?;
    train_sessions(&sessions, cfg, device, on_epoch)
}

/// [`train`] on labelled sessions spilled to disk: built by a [`SessionsBuilder`] with
/// [`TrainConfig::feature_spec`] and [`TrainConfig::label`] of `cfg`, from any number of events,
/// one user at a time (in user-id order, for the tie order [`labelled_sessions`] gives). Both
/// splits are read from disk whenever they are needed; memory holds at most [`MAX_FIT_ROWS`]
/// rows for each regression, the validation split's aggregates, scores and labels (for the
/// baselines, the calibration and the choice of cell), and the batch in hand.
///
/// # Errors
///
/// As [`train`], and spill file failures.
pub fn train_sessions(sessions: &SessionSet, cfg: &TrainConfig, device: &Device, on_epoch: impl FnMut(usize, &EpochReport) + Send) -> Result<Trained, ModelError> {
    let unfitted = cfg.feature_spec();
    unfitted.validate().map_err(ModelError::Training)?;
    let [train_range, val_range, test_range] = sessions.ranges(&cfg.split);
    // Read from disk whenever it is scored, as the training split is.
    let val_set = Split { set: sessions, range: val_range };
    let count = |s: &LabelledSession, positive: bool| -> usize { s.labels.iter().zip(&s.mask).filter(|(l, m)| **m > 0.0 && (!positive || **l > 0.5)).count() };
    let (mut labelled, mut positives) = (0, 0);
    for s in sessions.iter(train_range.clone()) {
        (labelled, positives) = (labelled + count(&s, false), positives + count(&s, true));
    }
    let val_positives: usize = val_set.iter().map(|s| count(&s, true)).sum();
    if positives == 0 || positives == labelled || val_positives == 0 {
        return Err(ModelError::Training(format!(
            "{} training sessions ({labelled} labelled events, {positives} positive) and {} validation sessions ({val_positives} positive): \
             both splits need events with and without a later purchase",
            train_range.len(),
            val_set.len(),
        )));
    }
    let train_rows = train_range.clone().map(|i| sessions.events_in(i)).sum();
    let spec = unfitted.fit_stream(train_rows, || sessions.iter(train_range.clone()).flat_map(|s| s.features));
    let pos_weight = cfg.pos_weight.unwrap_or_else(|| ((labelled - positives) as f64 / positives as f64).sqrt());
    // The regressions fit in memory: past MAX_FIT_ROWS labelled events, every stride-th.
    let stride = labelled.div_ceil(MAX_FIT_ROWS).max(1);
    if stride > 1 {
        tracing::info!(labelled, stride, rows = labelled.div_ceil(stride), "the regressions fit on every stride-th labelled training event");
    }

    let wide = cfg.skip.then(|| WideStart::fit(sessions.iter(train_range.clone()), stride, &spec, pos_weight as f32));

    // The baselines do not depend on the cell: fitted once, on the same splits.
    let (train_agg, train_agg_labels) = aggregate_rows(sessions.iter(train_range.clone()), stride);
    let names = AGGREGATE_NAMES.iter().map(|s| s.to_string()).collect();
    let logistic = Logistic::fit(names, &train_agg, &train_agg_labels, 1.0);
    let (val_agg, val_labels) = aggregate_rows(val_set.iter(), 1);
    let lr_val: Vec<f32> = val_agg.iter().map(|r| logistic.predict(r) as f32).collect();
    let boosting = GradientBoosting::fit(AGGREGATE_NAMES.iter().map(|s| s.to_string()).collect(), (&train_agg, &train_agg_labels), (&val_agg, &val_labels));
    let gb_val: Vec<f32> = val_agg.iter().map(|r| boosting.predict(r) as f32).collect();

    // Written once, read by every member of every cell.
    let batches = TrainBatches::write(sessions, train_range.clone(), &spec, cfg.batch_size, cfg.max_len, pos_weight as f32)?;
    let on_epoch = std::sync::Mutex::new(on_epoch);
    // Each cell's packed model, and its raw validation scores for the choice below.
    let fit_cell = |cell: Cell| -> Result<(Trained, Vec<f32>), ModelError> {
        // Members are independent (each from its own seed): on the CPU they train side by side
        // on all cores, each giving the bits it gives alone.
        let fit = |member: usize| {
            let seed = cfg.seed.wrapping_add(member as u64 * 1_000_003);
            fit_member(cell, &batches, &val_set, &spec, cfg, wide.as_ref(), seed, device, |r| {
                (on_epoch.lock().unwrap_or_else(std::sync::PoisonError::into_inner))(member, r)
            })
        };
        let fitted: Vec<Member> = if device.is_cpu() {
            use rayon::prelude::*;
            (0..cfg.members.max(1)).into_par_iter().map(fit).collect::<Result<_, _>>()?
        } else {
            (0..cfg.members.max(1)).map(fit).collect::<Result<_, _>>()?
        };
        let best_epochs: Vec<usize> = fitted.iter().map(|m| m.best_epoch).collect();
        let epochs_run = fitted.iter().map(|m| m.epochs).sum();
        let members: Vec<GruParams> = fitted.into_iter().map(|m| m.params).collect();
        let params = GruParams::pack(&members)?;

        // Everything below is fitted on validation.
        let (raw_val, val_labels) = predict(&params, &val_set, &spec, &Device::Cpu)?;
        let (val_roc_auc, val_pr_auc) = (eval::roc_auc(&raw_val, &val_labels), eval::pr_auc(&raw_val, &val_labels));
        let calibration = Calibration::fit(cfg.calibration, &raw_val, &val_labels);
        let gru_val: Vec<f32> = raw_val.iter().map(|&p| calibration.apply(p)).collect();
        let threshold = eval::best_f1_threshold(&gru_val, &val_labels);
        let stacked: Vec<Vec<f64>> = gru_val.iter().zip(&lr_val).map(|(&g, &l)| stack_row(g, l)).collect();
        let ensemble = Logistic::fit(vec!["gru_logit".into(), "logistic_logit".into()], &stacked, &val_labels, 1.0);
        let ens_val: Vec<f32> = stacked.iter().map(|r| ensemble.predict(r) as f32).collect();
        let baselines = Baselines {
            base_rate: positives as f64 / labelled as f64,
            logistic_threshold: eval::best_f1_threshold(&lr_val, &val_labels),
            logistic: logistic.clone(),
            ensemble_threshold: eval::best_f1_threshold(&ens_val, &val_labels),
            ensemble,
            boosting_threshold: eval::best_f1_threshold(&gb_val, &val_labels),
            boosting: Some(boosting.clone()),
        };
        let summary = TrainingSummary {
            seed: cfg.seed,
            members: members.len(),
            epochs: epochs_run,
            best_epochs,
            label: cfg.label,
            split: cfg.split,
            train_sessions: train_range.len(),
            val_sessions: val_set.len(),
            test_sessions: test_range.len(),
            train_events: labelled,
            train_base_rate: positives as f64 / labelled as f64,
            pos_weight,
            val_roc_auc,
            val_pr_auc,
            trials: vec![CellTrial { cell, val_roc_auc, val_pr_auc, p_better_than_served: None }],
        };
        let trained = Trained { params, features: spec.clone(), calibration, threshold, baselines, summary, state_precision: cfg.state_precision, candidates: Vec::new() };
        Ok((trained, raw_val))
    };
    // Cheapest first, whatever order they were given in.
    let cells: Vec<Cell> = Cell::ALL.into_iter().filter(|c| cfg.cells.contains(c)).collect();
    let (mut trained, val_scores): (Vec<Trained>, Vec<Vec<f32>>) =
        (if cells.is_empty() { vec![Cell::Gru] } else { cells }).into_iter().map(fit_cell).collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
    let val = ValidationEvents::of(val_set.iter());
    let best = choose_cell(&val_scores, &val, cfg.seed);
    let mut trials: Vec<CellTrial> = trained.iter().flat_map(|t| t.summary.trials.clone()).collect();
    for (i, trial) in trials.iter_mut().enumerate().filter(|(i, _)| *i != best) {
        trial.p_better_than_served = Some(val.p_better(&val_scores[i], &val_scores[best], cfg.seed));
    }
    let mut served = trained.remove(best);
    served.summary.trials = trials;
    served.candidates = trained;
    Ok(served)
}
