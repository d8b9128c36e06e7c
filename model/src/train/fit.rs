//! Training one member: padded length-bucketed batches, the cell run over time, the weighted
//! loss, AdamW with early stopping on validation PR-AUC, and the wide start the head begins from.

use super::store::{HostBatch, Split, TrainBatches};
use super::{EpochReport, LabelledSession, TrainConfig};
use crate::{eval, Cell, FeatureSpec, GruParams, Logistic, ModelError, Projection, FEATURE_DIM};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{seq::SliceRandom, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::borrow::Borrow;

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

impl Batch {
    /// `host` on `device`.
    fn of(host: &HostBatch, device: &Device) -> Result<Batch, ModelError> {
        let (b, t) = (host.rows, host.steps);
        Ok(Batch {
            x: Tensor::from_slice(&host.x, (b, t, FEATURE_DIM), device)?,
            items: Tensor::from_slice(&host.items, b * t, device)?,
            categories: Tensor::from_slice(&host.categories, b * t, device)?,
            brands: Tensor::from_slice(&host.brands, b * t, device)?,
            tops: Tensor::from_slice(&host.tops, b * t, device)?,
            y: Tensor::from_slice(&host.y, (b, t), device)?,
            w: Tensor::from_slice(&host.w, (b, t), device)?,
        })
    }
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
/// event order, with their labels; 256 sessions at a time are read and stepped.
pub(super) fn predict(params: &GruParams, sessions: &Split<'_>, spec: &FeatureSpec, device: &Device) -> Result<(Vec<f32>, Vec<bool>), ModelError> {
    let (mut scores, mut labels) = (Vec::new(), Vec::new());
    let mut chunk: Vec<LabelledSession> = Vec::with_capacity(256);
    let mut all = sessions.iter().peekable();
    while all.peek().is_some() {
        chunk.clear();
        chunk.extend(all.by_ref().take(256));
        let batch = Batch::of(&HostBatch::of(&chunk.iter().collect::<Vec<_>>(), spec, usize::MAX, 1.0), device)?;
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

/// Aggregate rows and labels of every `stride`-th labelled event of `sessions` (every one with a
/// stride of 1).
pub(super) fn aggregate_rows<S: Borrow<LabelledSession>>(sessions: impl IntoIterator<Item = S>, stride: usize) -> (Vec<Vec<f64>>, Vec<bool>) {
    let (mut rows, mut labels) = (Vec::new(), Vec::new());
    each_labelled(sessions, stride, |s, j| {
        rows.push(s.aggregates[j].clone());
        labels.push(s.labels[j] > 0.5);
    });
    (rows, labels)
}

/// Calls `f` with every `stride`-th labelled event of `sessions` (the first, then every
/// `stride`-th after it), as (session, index in it).
fn each_labelled<S: Borrow<LabelledSession>>(sessions: impl IntoIterator<Item = S>, stride: usize, mut f: impl FnMut(&LabelledSession, usize)) {
    let mut k = 0usize;
    for s in sessions {
        let s = s.borrow();
        for j in (0..s.mask.len()).filter(|&j| s.mask[j] > 0.0) {
            if k % stride.max(1) == 0 {
                f(s, j);
            }
            k += 1;
        }
    }
}

/// Where the head's skip connection starts: a logistic regression on the normalised
/// [`SKIP_FEATURES`](crate::features::SKIP_FEATURES) of the training split's labelled events
/// (Newton's method, as the baseline), as skip weights and head bias. The bias is shifted by
/// `ln(pos_weight)`, where the weighted loss puts its optimum. Training starts from this
/// regression, with the hidden vector's head weights at zero, and the regression itself is the
/// first candidate of early stopping: the network is kept only where it improves on the regression
/// on validation.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct WideStart {
    skip: Vec<f32>,
    bias: f32,
    /// 1 for the features the skip reads, 0 for the others (whose weights stay 0).
    mask: Vec<f32>,
}

impl WideStart {
    /// Fits the regression on every `stride`-th labelled event of the training split.
    pub(super) fn fit<S: Borrow<LabelledSession>>(train_set: impl IntoIterator<Item = S>, stride: usize, spec: &FeatureSpec, pos_weight: f32) -> WideStart {
        let mask: Vec<f32> = crate::features::FEATURE_NAMES.iter().map(|n| f32::from(u8::from(crate::features::SKIP_FEATURES.contains(n)))).collect();
        // Features left out are 0 in every row: the regression gives them no weight.
        let (mut rows, mut labels): (Vec<Vec<f64>>, Vec<bool>) = (Vec::new(), Vec::new());
        each_labelled(train_set, stride, |s, j| {
            rows.push(spec.normalize(&s.features[j]).dense.iter().zip(&mask).map(|(&v, &m)| f64::from(v * m)).collect());
            labels.push(s.labels[j] > 0.5);
        });
        let fitted = Logistic::fit(crate::features::FEATURE_NAMES.iter().map(|n| n.to_string()).collect(), &rows, &labels, 1.0);
        // The regression standardises its inputs again: fold that into the weights.
        let skip: Vec<f64> = fitted.weights.iter().zip(&fitted.std).map(|(w, sd)| w / sd).collect();
        let shift: f64 = skip.iter().zip(&fitted.mean).map(|(w, m)| w * m).sum();
        WideStart { skip: skip.iter().zip(&mask).map(|(&w, &m)| w as f32 * m).collect(), bias: (fitted.bias - shift + f64::from(pos_weight).ln()) as f32, mask }
    }
}

/// One trained member of the seed ensemble.
pub(super) struct Member {
    pub(super) params: GruParams,
    pub(super) best_epoch: usize,
    pub(super) epochs: usize,
}

/// Trains one network of `cell` from seed `seed` with early stopping on validation PR-AUC.
#[allow(clippy::too_many_arguments)]
pub(super) fn fit_member(
    cell: Cell,
    batches: &TrainBatches,
    val_set: &Split<'_>,
    spec: &FeatureSpec,
    cfg: &TrainConfig,
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

    // The batches' order, shuffled each epoch (the same permutations as shuffling the batches).
    let mut order: Vec<usize> = (0..batches.len()).collect();

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
        order.shuffle(&mut rng);
        let mut loss_sum = 0f64;
        for &k in &order {
            let batch = &Batch::of(&batches.get(k), device)?;
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
