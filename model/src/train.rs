//! Training of the intent GRU on labelled sessions.
//!
//! Label: for every event of a session before its first purchase, 1 if the session purchases
//! later, else 0. Sessions are cut by [`intentflow_schemas::SessionState::advance`], which also
//! closes a session at its purchase; the purchase event itself carries no label. Sessions are
//! split by start time (the latest `val_fraction` validate), features are normalised with
//! statistics of the training split, and the weights with the best validation log loss are kept.

use crate::{eval, FeatureSpec, Features, GruParams, ModelError, TrainingSummary, FEATURE_DIM};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use intentflow_schemas::{Event, EventType, SessionConfig, SessionState};
use rand::{seq::SliceRandom, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Hyper-parameters of [`train`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// GRU hidden size.
    pub hidden_dim: usize,
    /// Passes over the training split.
    pub epochs: usize,
    /// Sessions per batch.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Longer sessions are cut to their first `max_len` events for training.
    pub max_len: usize,
    /// Share of sessions, the latest by start time, held out for validation.
    pub val_fraction: f64,
    /// Seed for initialisation and batch order.
    pub seed: u64,
    /// How sessions are cut.
    pub session: SessionConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            hidden_dim: 32,
            epochs: 12,
            batch_size: 64,
            learning_rate: 3e-3,
            weight_decay: 1e-4,
            max_len: 64,
            val_fraction: 0.2,
            seed: 7,
            session: SessionConfig::default(),
        }
    }
}

/// One session as a training sequence (raw, unnormalised features).
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledSession {
    /// Time of the session's first event.
    pub start_ms: i64,
    /// Raw features per event.
    pub features: Vec<Features>,
    /// 1.0 if the session purchases after this event.
    pub labels: Vec<f32>,
    /// 1.0 where the label counts (0 for the purchase event that closes the session).
    pub mask: Vec<f32>,
}

/// Cuts events into labelled sessions. Events are grouped by user and ordered by time; events
/// with equal times keep their input order.
pub fn labelled_sessions(events: &[Event], session: SessionConfig) -> Vec<LabelledSession> {
    let spec = FeatureSpec::identity(session);
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by(|&a, &b| events[a].user_id.cmp(&events[b].user_id).then(events[a].ts.cmp(&events[b].ts)));
    let mut out: Vec<LabelledSession> = Vec::new();
    let mut state = SessionState::default();
    let mut user: Option<&str> = None;
    for &i in &order {
        let ev = &events[i];
        if user != Some(ev.user_id.as_str()) {
            user = Some(&ev.user_id);
            state = SessionState::default();
        }
        let (raw, new_session) = spec.featurize_raw(&mut state, ev);
        if new_session {
            out.push(LabelledSession { start_ms: ev.ts, features: Vec::new(), labels: Vec::new(), mask: Vec::new() });
        }
        let s = out.last_mut().expect("the first event of a user opens a session");
        s.features.push(raw);
        let purchase = ev.kind == EventType::Purchase;
        s.labels.push(0.0);
        s.mask.push(if purchase { 0.0 } else { 1.0 });
        if purchase {
            s.labels.iter_mut().for_each(|l| *l = 1.0);
            // The purchase closes the session: the next event opens a new one.
            *s.labels.last_mut().expect("just pushed") = 0.0;
        }
    }
    out
}

/// A padded batch on the device: inputs `(B, T, D)`, labels and weights `(B, T)`.
struct Batch {
    x: Tensor,
    y: Tensor,
    w: Tensor,
}

fn make_batch(sessions: &[&LabelledSession], spec: &FeatureSpec, max_len: usize, device: &Device) -> Result<Batch, ModelError> {
    let t = sessions.iter().map(|s| s.features.len().min(max_len)).max().unwrap_or(1);
    let b = sessions.len();
    let mut x = vec![0f32; b * t * FEATURE_DIM];
    let mut y = vec![0f32; b * t];
    let mut w = vec![0f32; b * t];
    for (i, s) in sessions.iter().enumerate() {
        for j in 0..s.features.len().min(t) {
            let row = spec.normalize(&s.features[j]);
            x[(i * t + j) * FEATURE_DIM..(i * t + j + 1) * FEATURE_DIM].copy_from_slice(&row);
            y[i * t + j] = s.labels[j];
            w[i * t + j] = s.mask[j];
        }
    }
    Ok(Batch {
        x: Tensor::from_vec(x, (b, t, FEATURE_DIM), device)?,
        y: Tensor::from_vec(y, (b, t), device)?,
        w: Tensor::from_vec(w, (b, t), device)?,
    })
}

/// Logits `(B, T)` of a padded batch, running the cell over time from a zero state.
fn forward(params: &GruParams, x: &Tensor) -> Result<Tensor, ModelError> {
    let (b, t, d) = x.dims3()?;
    let hd = params.hidden_dim();
    let gi = params.input_gates(&x.reshape((b * t, d))?)?.reshape((b, t, 3 * hd))?;
    let mut h = Tensor::zeros((b, hd), DType::F32, x.device())?;
    let mut logits = Vec::with_capacity(t);
    for step in 0..t {
        h = params.cell(&gi.narrow(1, step, 1)?.squeeze(1)?, &h)?;
        logits.push(params.logits(&h)?);
    }
    Ok(Tensor::stack(&logits, 1)?)
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

/// Scores and labels of every labelled event of `sessions`.
fn predict(params: &GruParams, sessions: &[&LabelledSession], spec: &FeatureSpec, cfg: &TrainConfig, device: &Device) -> Result<(Vec<f32>, Vec<bool>), ModelError> {
    let (mut scores, mut labels) = (Vec::new(), Vec::new());
    for chunk in sessions.chunks(cfg.batch_size.max(1) * 4) {
        let batch = make_batch(chunk, spec, cfg.max_len, device)?;
        let p: Vec<Vec<f32>> = crate::gru::sigmoid(&forward(params, &batch.x)?)?.to_vec2()?;
        let (y, w): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (batch.y.to_vec2()?, batch.w.to_vec2()?);
        for i in 0..chunk.len() {
            for j in 0..p[i].len() {
                if w[i][j] > 0.0 {
                    scores.push(p[i][j]);
                    labels.push(y[i][j] > 0.5);
                }
            }
        }
    }
    Ok((scores, labels))
}

/// Trains a model on `events`. Returns the parameters (on CPU), the fitted feature spec and
/// a summary. `on_epoch` is called after each epoch with (epoch, train loss, validation log
/// loss, validation ROC-AUC), for progress display.
///
/// # Errors
///
/// [`ModelError::Training`] when there is nothing to learn from (no sessions, or no positive
/// label); candle errors otherwise.
pub fn train(
    events: &[Event],
    cfg: &TrainConfig,
    device: &Device,
    mut on_epoch: impl FnMut(usize, f64, f64, Option<f64>),
) -> Result<(GruParams, FeatureSpec, TrainingSummary), ModelError> {
    let mut sessions = labelled_sessions(events, cfg.session);
    sessions.sort_by_key(|s| s.start_ms);
    let n_val = ((sessions.len() as f64) * cfg.val_fraction).round() as usize;
    let (train_set, val_set) = sessions.split_at(sessions.len() - n_val.min(sessions.len()));
    let train_rows: Vec<Features> = train_set.iter().flat_map(|s| s.features.iter().copied()).collect();
    let labelled: usize = train_set.iter().map(|s| s.mask.iter().filter(|m| **m > 0.0).count()).sum();
    let positives: usize = train_set.iter().map(|s| s.labels.iter().zip(&s.mask).filter(|(l, m)| **l > 0.5 && **m > 0.0).count()).sum();
    if labelled == 0 || positives == 0 {
        return Err(ModelError::Training(format!(
            "{} training sessions with {labelled} labelled events and {positives} positives: need events with purchases",
            train_set.len()
        )));
    }
    let spec = FeatureSpec::fit(cfg.session, &train_rows);

    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let (d, h) = (FEATURE_DIM, cfg.hidden_dim);
    let bound = 1.0 / (h as f32).sqrt();
    let vars = [
        uniform(&mut rng, (3 * h, d), bound, device)?,
        uniform(&mut rng, (3 * h, h), bound, device)?,
        uniform(&mut rng, (1, 3 * h), bound, device)?,
        uniform(&mut rng, (1, 3 * h), bound, device)?,
        uniform(&mut rng, (1, h), bound, device)?,
        uniform(&mut rng, (1, 1), bound, device)?,
    ];
    // The trained tensors in `vars` order; biases are held as (1, n) and stored flat.
    let params_of = |t: &[Tensor]| -> Result<GruParams, ModelError> {
        Ok(GruParams {
            weight_ih: t[0].clone(),
            weight_hh: t[1].clone(),
            bias_ih: t[2].flatten_all()?,
            bias_hh: t[3].flatten_all()?,
            head_weight: t[4].clone(),
            head_bias: t[5].flatten_all()?,
        })
    };
    let live = |vars: &[Var; 6]| vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>();
    let mut opt = AdamW::new(
        vars.to_vec(),
        ParamsAdamW { lr: cfg.learning_rate, weight_decay: cfg.weight_decay, ..Default::default() },
    )?;

    // Length buckets: sessions of similar length share a batch, so little is padding.
    let mut by_len: Vec<&LabelledSession> = train_set.iter().collect();
    by_len.sort_by_key(|s| s.features.len());
    let mut batches = Vec::new();
    for chunk in by_len.chunks(cfg.batch_size.max(1)) {
        batches.push(make_batch(chunk, &spec, cfg.max_len, device)?);
    }
    let val_refs: Vec<&LabelledSession> = val_set.iter().collect();

    let mut best: Option<(f64, usize, Vec<Tensor>)> = None;
    let mut last_auc = None;
    for epoch in 1..=cfg.epochs {
        batches.shuffle(&mut rng);
        let mut loss_sum = 0f64;
        for batch in &batches {
            let params = params_of(&live(&vars))?;
            let loss = bce_with_logits(&forward(&params, &batch.x)?, &batch.y, &batch.w)?;
            opt.backward_step(&loss)?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?);
        }
        let train_loss = loss_sum / batches.len().max(1) as f64;
        let params = params_of(&live(&vars))?;
        // Without a validation split, the training loss picks the epoch.
        let (val_loss, val_auc) = if val_refs.is_empty() {
            (train_loss, None)
        } else {
            let (scores, labels) = predict(&params, &val_refs, &spec, cfg, device)?;
            (eval::log_loss(&scores, &labels), eval::roc_auc(&scores, &labels))
        };
        on_epoch(epoch, train_loss, val_loss, val_auc);
        if best.as_ref().is_none_or(|(l, _, _)| val_loss < *l) {
            let snapshot = vars.iter().map(|v| v.as_tensor().copy()).collect::<Result<Vec<_>, _>>()?;
            best = Some((val_loss, epoch, snapshot));
            last_auc = val_auc;
        }
    }
    let (val_log_loss, best_epoch, snapshot) = best.ok_or_else(|| ModelError::Training("epochs must be at least 1".into()))?;
    let params = params_of(&snapshot)?.to_device(&Device::Cpu)?;
    let summary = TrainingSummary {
        seed: cfg.seed,
        epochs: cfg.epochs,
        best_epoch,
        train_sessions: train_set.len(),
        val_sessions: val_set.len(),
        train_events: labelled,
        train_base_rate: positives as f64 / labelled as f64,
        val_roc_auc: last_auc,
        val_log_loss,
    };
    Ok((params, spec, summary))
}
