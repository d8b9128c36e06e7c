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
//! Over 400 lines: labels, the split, the training loop with early stopping, calibration and the
//! baselines are one pipeline over one set of sessions; it is split with the model-v2
//! architectures (one module per family), not before.

use crate::baseline::{stack_row, Baselines, SessionAggregates, AGGREGATE_NAMES};
use crate::boosting::GradientBoosting;
use crate::calibrate::{Calibration, CalibrationMethod};
use crate::StatePrecision;
use crate::{eval, Cell, FeatureSpec, Features, GruParams, Logistic, ModelError, Projection, FEATURE_DIM};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use intentflow_schemas::{Event, EventType, SessionConfig, SessionState};
use rand::{seq::SliceRandom, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// What a label predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelHorizon {
    /// The current session purchases later.
    #[default]
    Session,
    /// The user purchases within 24 hours.
    Within24h,
}

/// How sessions are split by start time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitSpec {
    /// Share of sessions, just before the test split, that validate.
    pub val_fraction: f64,
    /// Share of sessions, the latest, held out for testing.
    pub test_fraction: f64,
}

impl Default for SplitSpec {
    fn default() -> Self {
        SplitSpec { val_fraction: 0.15, test_fraction: 0.30 }
    }
}

/// Which part of a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Training sessions.
    Train,
    /// Validation sessions.
    Validation,
    /// Test sessions.
    Test,
    /// Every session.
    All,
}

impl Part {
    /// `train`, `validation`, `test` or `all`.
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Train => "train",
            Part::Validation => "validation",
            Part::Test => "test",
            Part::All => "all",
        }
    }
}

impl SplitSpec {
    /// Index ranges (train, validation, test) of `n` sessions sorted by start time.
    pub fn ranges(&self, n: usize) -> [std::ops::Range<usize>; 3] {
        let n_test = ((n as f64) * self.test_fraction).round() as usize;
        let n_val = ((n as f64) * self.val_fraction).round() as usize;
        let test_start = n - n_test.min(n);
        let val_start = test_start - n_val.min(test_start);
        [0..val_start, val_start..test_start, test_start..n]
    }

    /// The sessions of `part`; `sessions` must be sorted by start time.
    pub fn part<'a, T>(&self, sessions: &'a [T], part: Part) -> &'a [T] {
        let [train, val, test] = self.ranges(sessions.len());
        match part {
            Part::Train => &sessions[train],
            Part::Validation => &sessions[val],
            Part::Test => &sessions[test],
            Part::All => sessions,
        }
    }
}

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
    /// Precision the served model keeps hidden states in between steps. Training itself runs in
    /// f32; `f16` halves the stored hidden state (measured cost: `intentflow eval
    /// --state-precision`).
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
            state_precision: StatePrecision::F32,
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

/// One session as a training sequence (raw, unnormalised features).
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledSession {
    /// Time of the session's first event.
    pub start_ms: i64,
    /// Raw features per event.
    pub features: Vec<Features>,
    /// 1.0 if the label holds after this event.
    pub labels: Vec<f32>,
    /// 1.0 where the label counts (0 for the purchase event that closes the session).
    pub mask: Vec<f32>,
    /// Session aggregates so far per event, the baseline's inputs ([`AGGREGATE_NAMES`]).
    pub aggregates: Vec<Vec<f64>>,
    /// Index of each event in the input slice.
    pub events: Vec<usize>,
}

/// Cuts events into labelled sessions with features computed by `spec` (its normalisation is
/// not applied). Events are grouped by user and ordered by time; events with equal times keep
/// their input order. Sessions come sorted by start time (ties by user).
pub fn labelled_sessions(events: &[Event], spec: &FeatureSpec, horizon: LabelHorizon) -> Vec<LabelledSession> {
    const DAY_MS: i64 = 86_400_000;
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by(|&a, &b| events[a].user_id.cmp(&events[b].user_id).then(events[a].ts.cmp(&events[b].ts)));
    let mut out: Vec<LabelledSession> = Vec::new();
    let mut state = SessionState::default();
    let mut aggregates = SessionAggregates::default();
    for (k, &i) in order.iter().enumerate() {
        let ev = &events[i];
        let first_of_user = k == 0 || events[order[k - 1]].user_id != ev.user_id;
        if first_of_user {
            state = SessionState::default();
        }
        let (raw, new_session) = spec.featurize_raw(&mut state, ev);
        if new_session {
            aggregates = SessionAggregates::default();
            out.push(LabelledSession {
                start_ms: ev.ts,
                features: Vec::new(),
                labels: Vec::new(),
                mask: Vec::new(),
                aggregates: Vec::new(),
                events: Vec::new(),
            });
        }
        let s = out.last_mut().expect("the first event of a user opens a session");
        let purchase = ev.kind == EventType::Purchase;
        let label = match horizon {
            LabelHorizon::Session => false,
            LabelHorizon::Within24h => order[k + 1..]
                .iter()
                .map(|&j| &events[j])
                .take_while(|e| e.user_id == ev.user_id && e.ts <= ev.ts + DAY_MS)
                .any(|e| e.kind == EventType::Purchase),
        };
        s.features.push(raw);
        s.aggregates.push(aggregates.push(ev, &state));
        s.events.push(i);
        s.labels.push(if purchase { 0.0 } else { f32::from(u8::from(label)) });
        s.mask.push(if purchase { 0.0 } else { 1.0 });
        if purchase && horizon == LabelHorizon::Session {
            let n = s.labels.len();
            s.labels[..n - 1].iter_mut().for_each(|l| *l = 1.0);
        }
    }
    out.sort_by_key(|s| s.start_ms);
    out
}

/// A padded batch on the device: dense inputs `(B, T, D)`, item and category buckets `(B·T)`,
/// labels and loss weights `(B, T)`.
struct Batch {
    x: Tensor,
    items: Tensor,
    categories: Tensor,
    /// Brand and top-category buckets `(B·T)`.
    brands: Tensor,
    tops: Tensor,
    y: Tensor,
    w: Tensor,
}

fn make_batch(sessions: &[&LabelledSession], spec: &FeatureSpec, max_len: usize, pos_weight: f32, device: &Device) -> Result<Batch, ModelError> {
    let t = sessions.iter().map(|s| s.features.len().min(max_len)).max().unwrap_or(1).max(1);
    let b = sessions.len();
    let mut x = vec![0f32; b * t * FEATURE_DIM];
    let mut items = vec![0u32; b * t];
    let mut categories = vec![0u32; b * t];
    let (mut brands, mut tops) = (vec![0u32; b * t], vec![0u32; b * t]);
    let mut y = vec![0f32; b * t];
    let mut w = vec![0f32; b * t];
    for (i, s) in sessions.iter().enumerate() {
        for j in 0..s.features.len().min(t) {
            let k = i * t + j;
            let row = spec.normalize(&s.features[j]);
            x[k * FEATURE_DIM..(k + 1) * FEATURE_DIM].copy_from_slice(&row.dense);
            items[k] = row.item;
            categories[k] = row.category;
            (brands[k], tops[k]) = (row.brand, row.top_category);
            y[k] = s.labels[j];
            w[k] = s.mask[j] * if s.labels[j] > 0.5 { pos_weight } else { 1.0 };
        }
    }
    Ok(Batch {
        x: Tensor::from_vec(x, (b, t, FEATURE_DIM), device)?,
        items: Tensor::from_vec(items, b * t, device)?,
        categories: Tensor::from_vec(categories, b * t, device)?,
        brands: Tensor::from_vec(brands, b * t, device)?,
        tops: Tensor::from_vec(tops, b * t, device)?,
        y: Tensor::from_vec(y, (b, t), device)?,
        w: Tensor::from_vec(w, (b, t), device)?,
    })
}

/// Logits `(B, T)` of a padded batch, running the cell over time from a zero state.
fn forward(params: &GruParams, batch: &Batch) -> Result<Tensor, ModelError> {
    let (b, t, d) = batch.x.dims3()?;
    let gates = params.cell().gates() * params.hidden_dim();
    let input = params.gru_input(&batch.x.reshape((b * t, d))?, &batch.items, &batch.categories)?;
    let gi = params.input_gates(&input, Projection::Batched)?.reshape((b, t, gates))?;
    let mut h = Tensor::zeros((b, params.state_dim()), DType::F32, batch.x.device())?;
    let mut logits = Vec::with_capacity(t);
    for step in 0..t {
        h = params.step_states(&gi.narrow(1, step, 1)?.squeeze(1)?, &h, Projection::Batched)?;
        logits.push(params.logits(&h, Projection::Batched)?);
    }
    let mut logits = Tensor::stack(&logits, 1)?;
    if let Some(skip) = &params.skip_weight {
        logits = (logits + batch.x.reshape((b * t, d))?.matmul(&skip.t()?)?.reshape((b, t))?)?;
    }
    for (table, buckets) in [(&params.brand_embedding, &batch.brands), (&params.top_category_embedding, &batch.tops)] {
        if let Some(table) = table {
            logits = (logits + table.embedding(buckets)?.reshape((b, t))?)?;
        }
    }
    Ok(logits)
}

/// Weighted mean of binary cross-entropy with logits, in a numerically stable form.
fn bce_with_logits(logits: &Tensor, y: &Tensor, w: &Tensor) -> Result<Tensor, ModelError> {
    let per = ((logits.relu()? - (logits * y)?)? + ((logits.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
    let total = (per * w)?.sum_all()?;
    Ok(total.broadcast_div(&(w.sum_all()? + 1e-9)?)?)
}

fn uniform(rng: &mut ChaCha8Rng, shape: (usize, usize), bound: f32, device: &Device) -> Result<Var, ModelError> {
    let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-bound..bound)).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(data, shape, device)?)?)
}

/// Raw (uncalibrated) network probabilities of every labelled event of `sessions`, in session and
/// event order, with their labels.
fn predict(params: &GruParams, sessions: &[LabelledSession], spec: &FeatureSpec, device: &Device) -> Result<(Vec<f32>, Vec<bool>), ModelError> {
    let (mut scores, mut labels) = (Vec::new(), Vec::new());
    let refs: Vec<&LabelledSession> = sessions.iter().collect();
    for chunk in refs.chunks(256) {
        let batch = make_batch(chunk, spec, usize::MAX, 1.0, device)?;
        let p: Vec<Vec<f32>> = crate::gru::sigmoid(&forward(params, &batch)?)?.to_vec2()?;
        for (s, row) in chunk.iter().zip(&p) {
            for j in 0..s.features.len() {
                if s.mask[j] > 0.0 {
                    scores.push(row[j]);
                    labels.push(s.labels[j] > 0.5);
                }
            }
        }
    }
    Ok((scores, labels))
}

/// Aggregate rows and labels of every labelled event of `sessions`.
fn aggregate_rows(sessions: &[LabelledSession]) -> (Vec<Vec<f64>>, Vec<bool>) {
    sessions
        .iter()
        .flat_map(|s| (0..s.mask.len()).filter(|&j| s.mask[j] > 0.0).map(move |j| (s.aggregates[j].clone(), s.labels[j] > 0.5)))
        .unzip()
}

/// Where the head's skip connection starts: a logistic regression on the normalised
/// [`SKIP_FEATURES`](crate::features::SKIP_FEATURES) of the training split's labelled events
/// (Newton's method, as the baseline), as skip weights and head bias. The bias is shifted by
/// `ln(pos_weight)`, where the weighted loss puts its optimum. Training starts from this
/// regression, with the hidden vector's head weights at zero, and the regression itself is the
/// first candidate of early stopping: the network is kept only where it improves on the regression
/// on validation.
#[derive(Debug, Clone, PartialEq)]
struct WideStart {
    skip: Vec<f32>,
    bias: f32,
    /// 1 for the features the skip reads, 0 for the others (whose weights stay 0).
    mask: Vec<f32>,
}

impl WideStart {
    fn fit(train_set: &[LabelledSession], spec: &FeatureSpec, pos_weight: f32) -> WideStart {
        let mask: Vec<f32> = crate::features::FEATURE_NAMES.iter().map(|n| f32::from(u8::from(crate::features::SKIP_FEATURES.contains(n)))).collect();
        // Features left out are 0 in every row: the regression gives them no weight.
        let (rows, labels): (Vec<Vec<f64>>, Vec<bool>) = train_set
            .iter()
            .flat_map(|s| (0..s.mask.len()).filter(|&j| s.mask[j] > 0.0).map(move |j| (s, j)))
            .map(|(s, j)| (spec.normalize(&s.features[j]).dense.iter().zip(&mask).map(|(&v, &m)| f64::from(v * m)).collect(), s.labels[j] > 0.5))
            .unzip();
        let fitted = Logistic::fit(crate::features::FEATURE_NAMES.iter().map(|n| n.to_string()).collect(), &rows, &labels, 1.0);
        // The regression standardises its inputs again: fold that into the weights.
        let skip: Vec<f64> = fitted.weights.iter().zip(&fitted.std).map(|(w, sd)| w / sd).collect();
        let shift: f64 = skip.iter().zip(&fitted.mean).map(|(w, m)| w * m).sum();
        WideStart { skip: skip.iter().zip(&mask).map(|(&w, &m)| w as f32 * m).collect(), bias: (fitted.bias - shift + f64::from(pos_weight).ln()) as f32, mask }
    }
}

/// One trained member of the seed ensemble.
struct Member {
    params: GruParams,
    best_epoch: usize,
    epochs: usize,
}

/// Trains one network of `cell` from seed `seed` with early stopping on validation PR-AUC.
#[allow(clippy::too_many_arguments)]
fn fit_member(
    cell: Cell,
    train_set: &[LabelledSession],
    val_set: &[LabelledSession],
    spec: &FeatureSpec,
    cfg: &TrainConfig,
    pos_weight: f32,
    wide: Option<&WideStart>,
    seed: u64,
    device: &Device,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<Member, ModelError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (h, (item_rows, item_dim), (cat_rows, cat_dim)) = (cfg.hidden_dim, cfg.item_embedding, cfg.category_embedding);
    let item_dim = if item_rows >= 2 { item_dim } else { 0 };
    let cat_dim = if cat_rows >= 2 { cat_dim } else { 0 };
    let d = FEATURE_DIM + item_dim + cat_dim;
    let bound = 1.0 / (h as f32).sqrt();
    let (g, recurrent) = (cell.gates(), cell.is_recurrent());
    // A convolution has no recurrent weights (a placeholder keeps the positions; it gets no
    // gradient) and a bias on its first tap only.
    let mut vars = vec![
        uniform(&mut rng, (g * h, d), bound, device)?,
        uniform(&mut rng, if recurrent { (g * h, h) } else { (1, 1) }, bound, device)?,
        uniform(&mut rng, (1, if recurrent { g * h } else { h }), bound, device)?,
        uniform(&mut rng, (1, if recurrent { g * h } else { 1 }), bound, device)?,
        uniform(&mut rng, (1, h), bound, device)?,
        uniform(&mut rng, (1, 1), bound, device)?,
    ];
    if item_dim > 0 {
        vars.push(uniform(&mut rng, (item_rows as usize, item_dim), 0.1, device)?);
    }
    if cat_dim > 0 {
        vars.push(uniform(&mut rng, (cat_rows as usize, cat_dim), 0.1, device)?);
    }
    if let Some(wide) = wide {
        vars[4] = Var::from_tensor(&Tensor::zeros((1, h), DType::F32, device)?)?;
        vars[5] = Var::from_tensor(&Tensor::new(&[[wide.bias]], device)?)?;
        vars.push(Var::from_tensor(&Tensor::from_slice(&wide.skip, (1, FEATURE_DIM), device)?)?);
    }
    // The head's brand and top-category terms start at zero: the regression start stays exact.
    let (brand_rows, top_rows) = (spec.brand_buckets as usize, spec.top_category_buckets as usize);
    for rows in [brand_rows, top_rows].into_iter().filter(|&r| r > 0) {
        vars.push(Var::from_tensor(&Tensor::zeros((rows, 1), DType::F32, device)?)?);
    }
    // The trained tensors in `vars` order; biases are held as (1, n) and stored flat.
    let params_of = |t: &[Tensor]| -> Result<GruParams, ModelError> {
        let mut tables = t[6..].iter();
        Ok(GruParams {
            weight_ih: t[0].clone(),
            weight_hh: recurrent.then(|| t[1].clone()),
            bias_ih: if recurrent { t[2].flatten_all()? } else { crate::gru::conv_bias_taps(&t[2].flatten_all()?)? },
            bias_hh: recurrent.then(|| t[3].flatten_all()).transpose()?,
            head_weight: t[4].clone(),
            head_bias: t[5].flatten_all()?,
            item_embedding: if item_dim > 0 { tables.next().cloned() } else { None },
            category_embedding: if cat_dim > 0 { tables.next().cloned() } else { None },
            skip_weight: match wide {
                Some(wide) => {
                    let skip = tables.next().expect("a skip tensor after the embeddings");
                    Some(skip.broadcast_mul(&Tensor::from_slice(&wide.mask, (1, FEATURE_DIM), skip.device())?)?)
                }
                None => None,
            },
            brand_embedding: if brand_rows > 0 { tables.next().cloned() } else { None },
            top_category_embedding: if top_rows > 0 { tables.next().cloned() } else { None },
        })
    };
    let live = |vars: &[Var]| vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>();
    let mut opt = AdamW::new(vars.clone(), ParamsAdamW { lr: cfg.learning_rate, weight_decay: cfg.weight_decay, ..Default::default() })?;

    // Length buckets: sessions of similar length share a batch, so little is padding.
    let mut by_len: Vec<&LabelledSession> = train_set.iter().collect();
    by_len.sort_by_key(|s| s.features.len());
    let mut batches = Vec::new();
    for chunk in by_len.chunks(cfg.batch_size.max(1)) {
        batches.push(make_batch(chunk, spec, cfg.max_len, pos_weight, device)?);
    }

    // Epoch 0 is the regression the skip connection starts from, kept if no epoch beats it.
    let mut best: Option<(f64, usize, Vec<Tensor>)> = match wide {
        None => None,
        Some(_) => {
            let (scores, labels) = predict(&params_of(&live(&vars))?, val_set, spec, device)?;
            let snapshot = vars.iter().map(|v| v.as_tensor().copy()).collect::<Result<Vec<_>, _>>()?;
            Some((eval::pr_auc(&scores, &labels).unwrap_or(0.0), 0, snapshot))
        }
    };
    let mut epochs = 0;
    for epoch in 1..=cfg.epochs {
        epochs = epoch;
        batches.shuffle(&mut rng);
        let mut loss_sum = 0f64;
        for batch in &batches {
            let params = params_of(&live(&vars))?;
            let loss = bce_with_logits(&forward(&params, batch)?, &batch.y, &batch.w)?;
            opt.backward_step(&loss)?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?);
        }
        let params = params_of(&live(&vars))?;
        let (scores, labels) = predict(&params, val_set, spec, device)?;
        let val_pr = eval::pr_auc(&scores, &labels);
        let criterion = val_pr.unwrap_or(0.0);
        let improved = best.as_ref().is_none_or(|(c, _, _)| criterion > *c);
        on_epoch(&EpochReport {
            cell,
            epoch,
            train_loss: loss_sum / batches.len().max(1) as f64,
            val_log_loss: eval::log_loss(&scores, &labels),
            val_roc_auc: eval::roc_auc(&scores, &labels),
            val_pr_auc: val_pr,
            best: improved,
        });
        if improved {
            let snapshot = vars.iter().map(|v| v.as_tensor().copy()).collect::<Result<Vec<_>, _>>()?;
            best = Some((criterion, epoch, snapshot));
        } else if best.as_ref().is_some_and(|(_, e, _)| epoch - e >= cfg.patience) {
            break;
        }
    }
    let (_, best_epoch, snapshot) = best.ok_or_else(|| ModelError::Training("epochs must be at least 1".into()))?;
    Ok(Member { params: params_of(&snapshot)?.to_device(&Device::Cpu)?, best_epoch, epochs })
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

/// One cell trained by [`train`] and how it validated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CellTrial {
    /// The cell.
    pub cell: Cell,
    /// Validation ROC-AUC of its packed model.
    pub val_roc_auc: Option<f64>,
    /// Validation PR-AUC of its packed model, the criterion.
    pub val_pr_auc: Option<f64>,
    /// For a cell not served: the paired session bootstrap's probability that it beats the
    /// served cell on validation PR-AUC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_better_than_served: Option<f64>,
}

/// How sure the validation must be before a dearer cell is served: the paired session
/// bootstrap's probability that it beats the cheaper cell on PR-AUC.
pub const DEARER_CELL_CONFIDENCE: f64 = 0.9;

/// Which of the cells trained (in the order given, cheapest first: [`Cell::ALL`]) to serve: the
/// first, unless a later one beats the one chosen so far on validation PR-AUC with probability
/// at least [`DEARER_CELL_CONFIDENCE`] (paired session bootstrap, 500 replicates). A dearer cell
/// costs state bytes and step time on every event, so a difference the validation split cannot
/// tell from noise does not buy it.
fn choose_cell(val_scores: &[Vec<f32>], val: &ValidationEvents, seed: u64) -> usize {
    (1..val_scores.len()).fold(0, |best, i| if val.p_better(&val_scores[i], &val_scores[best], seed) >= DEARER_CELL_CONFIDENCE { i } else { best })
}

/// The labels and sessions of the validation split's labelled events, in the order of
/// [`predict`]'s scores: what the paired bootstrap resamples.
struct ValidationEvents {
    labels: Vec<bool>,
    groups: Vec<usize>,
}

impl ValidationEvents {
    fn of(val_set: &[LabelledSession]) -> ValidationEvents {
        let labels = val_set.iter().flat_map(|s| s.labels.iter().zip(&s.mask).filter(|(_, m)| **m > 0.0).map(|(l, _)| *l > 0.5)).collect();
        let groups = val_set.iter().enumerate().flat_map(|(k, s)| s.mask.iter().filter(|m| **m > 0.0).map(move |_| k)).collect();
        ValidationEvents { labels, groups }
    }

    /// The paired session bootstrap's probability that scores `a` beat scores `b` on PR-AUC.
    fn p_better(&self, a: &[f32], b: &[f32], seed: u64) -> f64 {
        let c = eval::paired_bootstrap(("a", "b"), (a, b), &self.labels, &self.groups, 500, seed, ("pr_auc", eval::pr_auc));
        c.probability_a_better.unwrap_or(0.0)
    }
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
/// documentation). `on_epoch` sees (member, epoch report), for progress display.
///
/// # Errors
///
/// [`ModelError::Training`] when a split has nothing to learn from (no sessions, or no
/// positive label in training or validation); candle errors otherwise.
pub fn train(events: &[Event], cfg: &TrainConfig, device: &Device, on_epoch: impl FnMut(usize, &EpochReport) + Send) -> Result<Trained, ModelError> {
    let unfitted = cfg.feature_spec();
    unfitted.validate().map_err(ModelError::Training)?;
    let sessions = labelled_sessions(events, &unfitted, cfg.label);
    let train_set = cfg.split.part(&sessions, Part::Train);
    let val_set = cfg.split.part(&sessions, Part::Validation);
    let count = |set: &[LabelledSession], positive: bool| -> usize {
        set.iter().map(|s| s.labels.iter().zip(&s.mask).filter(|(l, m)| **m > 0.0 && (!positive || **l > 0.5)).count()).sum()
    };
    let (labelled, positives) = (count(train_set, false), count(train_set, true));
    if positives == 0 || positives == labelled || count(val_set, true) == 0 {
        return Err(ModelError::Training(format!(
            "{} training sessions ({labelled} labelled events, {positives} positive) and {} validation sessions ({} positive): \
             both splits need events with and without a later purchase",
            train_set.len(),
            val_set.len(),
            count(val_set, true)
        )));
    }
    let train_rows: Vec<Features> = train_set.iter().flat_map(|s| s.features.iter().copied()).collect();
    let spec = unfitted.fit(&train_rows);
    let pos_weight = cfg.pos_weight.unwrap_or_else(|| ((labelled - positives) as f64 / positives as f64).sqrt());

    let wide = cfg.skip.then(|| WideStart::fit(train_set, &spec, pos_weight as f32));

    // The baselines do not depend on the cell: fitted once, on the same splits.
    let (train_agg, train_agg_labels) = aggregate_rows(train_set);
    let names = AGGREGATE_NAMES.iter().map(|s| s.to_string()).collect();
    let logistic = Logistic::fit(names, &train_agg, &train_agg_labels, 1.0);
    let (val_agg, val_labels) = aggregate_rows(val_set);
    let lr_val: Vec<f32> = val_agg.iter().map(|r| logistic.predict(r) as f32).collect();
    let boosting = GradientBoosting::fit(AGGREGATE_NAMES.iter().map(|s| s.to_string()).collect(), (&train_agg, &train_agg_labels), (&val_agg, &val_labels));
    let gb_val: Vec<f32> = val_agg.iter().map(|r| boosting.predict(r) as f32).collect();

    let on_epoch = std::sync::Mutex::new(on_epoch);
    // Each cell's packed model, and its raw validation scores for the choice below.
    let fit_cell = |cell: Cell| -> Result<(Trained, Vec<f32>), ModelError> {
        // Members are independent (each from its own seed): on the CPU they train side by side
        // on all cores, each giving the bits it gives alone.
        let fit = |member: usize| {
            let seed = cfg.seed.wrapping_add(member as u64 * 1_000_003);
            fit_member(cell, train_set, val_set, &spec, cfg, pos_weight as f32, wide.as_ref(), seed, device, |r| {
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
        let (raw_val, val_labels) = predict(&params, val_set, &spec, &Device::Cpu)?;
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
            train_sessions: train_set.len(),
            val_sessions: val_set.len(),
            test_sessions: cfg.split.part(&sessions, Part::Test).len(),
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
    let val = ValidationEvents::of(val_set);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` sessions of four labelled events each, every third session a buying one.
    fn sessions(n: usize) -> Vec<LabelledSession> {
        (0..n)
            .map(|k| {
                let label = if k % 3 == 0 { 1.0 } else { 0.0 };
                LabelledSession { start_ms: k as i64, features: Vec::new(), labels: vec![label; 4], mask: vec![1.0; 4], aggregates: Vec::new(), events: Vec::new() }
            })
            .collect()
    }

    #[test]
    fn a_dearer_cell_is_served_only_when_it_validates_better_beyond_doubt() {
        let sessions = sessions(60);
        let val = ValidationEvents::of(&sessions);
        let labels: Vec<f32> = sessions.iter().flat_map(|s| s.labels.clone()).collect();
        // A scorer that ranks every buying session first, and one that is noise.
        let perfect: Vec<f32> = labels.iter().map(|&l| 0.2 + 0.6 * l).collect();
        let noise: Vec<f32> = (0..labels.len()).map(|i| ((i * 7919) % 101) as f32 / 101.0).collect();
        assert_eq!(choose_cell(&[noise.clone(), perfect.clone()], &val, 7), 1, "clearly better: served");
        assert_eq!(choose_cell(&[perfect.clone(), noise.clone()], &val, 7), 0, "worse: not served");
        assert_eq!(choose_cell(&[perfect.clone(), perfect.clone()], &val, 7), 0, "as good: the cheaper is kept");
        // A little better on one session only: not beyond doubt.
        let mut nudged = noise.clone();
        nudged[0] += 0.5;
        assert!(val.p_better(&nudged, &noise, 7) < DEARER_CELL_CONFIDENCE);
        assert_eq!(choose_cell(&[noise, nudged], &val, 7), 0);
    }
}
