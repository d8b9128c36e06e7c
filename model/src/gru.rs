//! The purchase-intent network: hashed item and category embeddings, one sequence layer ([`Cell`]:
//! a GRU or an LSTM with PyTorch's `nn.GRU` / `nn.LSTM` semantics and tensor names, or a causal
//! `nn.Conv1d`) and a linear head with a sigmoid. (The module and [`GruParams`] keep their first
//! names.)
//!
//! The cell's input `x` is the event's dense features followed by the embedding rows of its item
//! bucket and its category bucket. For hidden `h`, a GRU (gate order r, z, n as in PyTorch):
//!
//! ```text
//! r  = σ(W_ir x + b_ir + W_hr h + b_hr)
//! z  = σ(W_iz x + b_iz + W_hz h + b_hz)
//! n  = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
//! h' = (1 − z) ⊙ n + z ⊙ h
//! p  = σ(head.weight · h' + head.bias + skip.weight · dense)
//! ```
//!
//! An LSTM (gate order i, f, g, o) also carries a memory `c`; its state is `[h | c]`, twice the
//! width, and the head reads `h`:
//!
//! ```text
//! i, f, o = σ(W_i· x + b_i· + W_h· h + b_h·)      g = tanh(W_ig x + b_ig + W_hg h + b_hg)
//! c' = f ⊙ c + i ⊙ g                              h' = o ⊙ tanh(c')
//! ```
//!
//! A causal temporal convolution (PyTorch `nn.Conv1d` over the session's events, padded on the
//! left) reads the event and the [`CNN_TAPS`]` − 1` before it, `y_t = relu(b + Σ_j W_j x_{t−j})`,
//! and the head reads `y`. It streams without keeping past events: its state is `[y | P_1 | P_2]`
//! where `P_m` is what the events so far add to the output `m` events ahead (`P_1' = W_1 x +
//! P_2`, `P_2' = W_2 x`); a new session starts from zeros, the convolution's zero padding.
//!
//! The optional skip connection (`skip.weight`) gives the head the event's dense features
//! directly, beside the cell's summary of the session: the session and history aggregates among
//! them then count as in a logistic regression on them, whatever the cell learns on top (a "wide
//! and deep" head). A model without it has no skip term. Two optional hashed embeddings of
//! width 1 add the brand's and the category path's top level's own terms to the same logit
//! (`brand_embedding.weight[brand bucket] + top_category_embedding.weight[top bucket]`).
//!
//! Over 400 lines: the parameters, their PyTorch names and the packing of the seed ensemble must
//! change together; the CPU serving step moves to its own kernel module with the performance work.

use candle_core::{DType, Device, Tensor, D};

/// The sequence cell of a network. PyTorch stores `nn.GRU` and `nn.LSTM` under the same tensor
/// names, stacking 3 and 4 gates: their cell is told by the shape of the recurrent weights; a
/// convolution is stored as `conv.weight` and has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cell {
    /// Gated recurrent unit: the state is the hidden vector.
    #[default]
    Gru,
    /// Long short-term memory: the state is the hidden vector and the cell's memory.
    Lstm,
    /// Causal temporal convolution over the last [`CNN_TAPS`] events of the session: the state
    /// is its output and its partial sums for the outputs ahead.
    Cnn,
}

/// Events a convolution reads: the current one and the two before it.
pub const CNN_TAPS: usize = 3;

impl Cell {
    /// Every cell, cheapest to serve first: the order `train --arch auto` tries them in.
    pub const ALL: [Cell; 3] = [Cell::Gru, Cell::Lstm, Cell::Cnn];

    /// Row blocks stacked in the input weights: gates, or a convolution's taps.
    pub fn gates(self) -> usize {
        match self {
            Cell::Gru => 3,
            Cell::Lstm => 4,
            Cell::Cnn => CNN_TAPS,
        }
    }

    /// Values in a user's state for hidden size `h`: `h`; `[h | c]` for an LSTM; `[y | P_1 |
    /// P_2]` for a convolution.
    pub fn state_dim(self, h: usize) -> usize {
        match self {
            Cell::Gru => h,
            Cell::Lstm => 2 * h,
            Cell::Cnn => CNN_TAPS * h,
        }
    }

    /// Whether the cell has recurrent weights (`weight_hh_l0`).
    pub fn is_recurrent(self) -> bool {
        self != Cell::Cnn
    }

    /// The name used on the command line, in `model.json` and in model versions.
    pub fn name(self) -> &'static str {
        match self {
            Cell::Gru => "gru",
            Cell::Lstm => "lstm",
            Cell::Cnn => "cnn",
        }
    }
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Tensor names in `model.safetensors`, the same as the `state_dict` of this PyTorch module:
///
/// ```python
/// class Intent(nn.Module):
///     def __init__(self, dense, hidden, item_buckets, item_dim, category_buckets, category_dim):
///         super().__init__()
///         self.item_embedding = nn.Embedding(item_buckets, item_dim)
///         self.category_embedding = nn.Embedding(category_buckets, category_dim)
///         self.gru = nn.GRU(dense + item_dim + category_dim, hidden, batch_first=True)  # or nn.LSTM
///         self.head = nn.Linear(hidden, 1)
///         self.skip = nn.Linear(dense, 1, bias=False)   # optional
///         self.brand_embedding = nn.Embedding(brand_buckets, 1)          # optional
///         self.top_category_embedding = nn.Embedding(top_buckets, 1)     # optional
///
/// state = {k.removeprefix("gru."): v for k, v in Intent(...).state_dict().items()}
/// safetensors.torch.save_file(state, "model.safetensors")
/// ```
///
/// The embeddings are optional (a model without them has `D` dense inputs only).
pub mod names {
    /// `(G·H, D)` input-to-hidden weights, gates stacked (G = 3 for a GRU: r, z, n; 4 for an
    /// LSTM: i, f, g, o).
    pub const WEIGHT_IH: &str = "weight_ih_l0";
    /// `(G·H, H)` hidden-to-hidden weights.
    pub const WEIGHT_HH: &str = "weight_hh_l0";
    /// `(G·H)` input-to-hidden bias.
    pub const BIAS_IH: &str = "bias_ih_l0";
    /// `(G·H)` hidden-to-hidden bias.
    pub const BIAS_HH: &str = "bias_hh_l0";
    /// `(C, D, k)` a convolution's weights, as `nn.Conv1d` stores them (instead of the four
    /// tensors above).
    pub const CONV_WEIGHT: &str = "conv.weight";
    /// `(C)` a convolution's bias.
    pub const CONV_BIAS: &str = "conv.bias";
    /// `(1, H)` head weight.
    pub const HEAD_WEIGHT: &str = "head.weight";
    /// `(1)` head bias.
    pub const HEAD_BIAS: &str = "head.bias";
    /// `(item buckets, item dim)` hashed item embedding table (optional).
    pub const ITEM_EMBEDDING: &str = "item_embedding.weight";
    /// `(category buckets, category dim)` hashed category embedding table (optional).
    pub const CATEGORY_EMBEDDING: &str = "category_embedding.weight";
    /// `(1, dense)` weights of the dense features in the head's logit (optional).
    pub const SKIP_WEIGHT: &str = "skip.weight";
    /// `(brand buckets, 1)` the brand's term in the head's logit (optional).
    pub const BRAND_EMBEDDING: &str = "brand_embedding.weight";
    /// `(top-category buckets, 1)` the category path's top level's term in the head's logit
    /// (optional).
    pub const TOP_CATEGORY_EMBEDDING: &str = "top_category_embedding.weight";
}

/// The parameter tensors of the network.
#[derive(Debug, Clone)]
pub struct GruParams {
    /// See [`names::ITEM_EMBEDDING`].
    pub item_embedding: Option<Tensor>,
    /// See [`names::CATEGORY_EMBEDDING`].
    pub category_embedding: Option<Tensor>,
    /// See [`names::WEIGHT_IH`]; for a convolution its taps stacked, the current event's first
    /// (`weight_ih[j·C + c, d] = conv.weight[c, d, k − 1 − j]`).
    pub weight_ih: Tensor,
    /// See [`names::WEIGHT_HH`] (none for a convolution).
    pub weight_hh: Option<Tensor>,
    /// See [`names::BIAS_IH`]; for a convolution `conv.bias` followed by zeros for the other
    /// taps.
    pub bias_ih: Tensor,
    /// See [`names::BIAS_HH`] (none for a convolution).
    pub bias_hh: Option<Tensor>,
    /// See [`names::HEAD_WEIGHT`].
    pub head_weight: Tensor,
    /// See [`names::HEAD_BIAS`].
    pub head_bias: Tensor,
    /// See [`names::SKIP_WEIGHT`].
    pub skip_weight: Option<Tensor>,
    /// See [`names::BRAND_EMBEDDING`].
    pub brand_embedding: Option<Tensor>,
    /// See [`names::TOP_CATEGORY_EMBEDDING`].
    pub top_category_embedding: Option<Tensor>,
}

/// Sigmoid through differentiable primitives, so the same cell serves training and inference.
pub(crate) fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// How rows are multiplied by a weight matrix `W` `(N, K)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    /// One matrix product `X·Wᵀ` over all rows: what training uses. The matrix kernel picks
    /// its blocking from the number of rows, so the last bits of a row's result can depend on
    /// how many rows share the product.
    Batched,
    /// One matrix-vector product `W·x` per row (a stride-0 batch of `W`, which candle runs as
    /// one GEMV per row): each row's result is bit-for-bit the same whatever other rows the
    /// batch holds, so a user's state does not depend on how a stream was cut into batches.
    PerRow,
}

impl Projection {
    /// `x·Wᵀ` for `x` `(B, K)` and `w` `(N, K)`; returns `(B, N)`.
    fn apply(self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Projection::Batched => x.matmul(&w.t()?),
            Projection::PerRow => {
                let (b, k) = x.dims2()?;
                w.broadcast_as((b, w.dim(0)?, k))?.matmul(&x.unsqueeze(2)?)?.squeeze(2)
            }
        }
    }
}

impl GruParams {
    /// Hidden size H (the width the head reads).
    pub fn hidden_dim(&self) -> usize {
        self.head_weight.dim(1).unwrap_or(0)
    }

    /// The cell: a convolution without `weight_hh`; else from the gates stacked in it (4: an
    /// LSTM; else a GRU, which validation checks has 3).
    pub fn cell(&self) -> Cell {
        let Some(w) = &self.weight_hh else { return Cell::Cnn };
        match (w.dim(0), w.dim(1)) {
            (Ok(rows), Ok(h)) if h > 0 && rows == 4 * h => Cell::Lstm,
            _ => Cell::Gru,
        }
    }

    /// Values in a user's state: [`Cell::state_dim`] of the hidden size.
    pub fn state_dim(&self) -> usize {
        self.cell().state_dim(self.hidden_dim())
    }

    /// Input size of the cell: dense features plus both embedding widths.
    pub fn input_dim(&self) -> usize {
        self.weight_ih.dim(1).unwrap_or(0)
    }

    /// `(buckets, width)` of the item embedding, `(0, 0)` without one.
    pub fn item_shape(&self) -> (usize, usize) {
        table_shape(self.item_embedding.as_ref())
    }

    /// `(buckets, width)` of the category embedding, `(0, 0)` without one.
    pub fn category_shape(&self) -> (usize, usize) {
        table_shape(self.category_embedding.as_ref())
    }

    /// Number of dense features the cell expects before the embeddings.
    pub fn dense_dim(&self) -> usize {
        self.input_dim().saturating_sub(self.item_shape().1 + self.category_shape().1)
    }

    /// Builds the cell's input `(N, D)`: dense features `(N, dense)` followed by the embedding rows
    /// of the item and category buckets (`u32` tensors of length N).
    pub(crate) fn gru_input(&self, dense: &Tensor, items: &Tensor, categories: &Tensor) -> candle_core::Result<Tensor> {
        let mut parts = vec![dense.clone()];
        if let Some(table) = &self.item_embedding {
            parts.push(table.embedding(items)?);
        }
        if let Some(table) = &self.category_embedding {
            parts.push(table.embedding(categories)?);
        }
        if parts.len() == 1 {
            return Ok(dense.clone());
        }
        Tensor::cat(&parts, 1)
    }

    /// The cell's input `(N, D)` of prepared features, built on `device`.
    pub(crate) fn gru_input_of(&self, inputs: &[crate::Features], device: &Device) -> candle_core::Result<Tensor> {
        let n = inputs.len();
        let dense: Vec<f32> = inputs.iter().flat_map(|f| f.dense).collect();
        let items: Vec<u32> = inputs.iter().map(|f| f.item).collect();
        let categories: Vec<u32> = inputs.iter().map(|f| f.category).collect();
        self.gru_input(
            &Tensor::from_vec(dense, (n, crate::FEATURE_DIM), device)?,
            &Tensor::from_vec(items, n, device)?,
            &Tensor::from_vec(categories, n, device)?,
        )
    }

    /// Reads the tensors of a PyTorch-style `state_dict` (see [`names`]); unknown names are
    /// ignored, missing required ones are an error.
    ///
    /// # Errors
    ///
    /// The name of the first missing tensor, or a shape disagreement.
    pub fn from_state_dict(mut tensors: std::collections::HashMap<String, Tensor>) -> Result<GruParams, String> {
        let conv = tensors.remove(names::CONV_WEIGHT);
        let mut take = |name: &str| tensors.remove(name).ok_or_else(|| format!("no tensor `{name}`"));
        let (weight_ih, weight_hh, bias_ih, bias_hh) = match conv {
            Some(conv) => {
                let (w, b) = conv_to_taps(&conv, &take(names::CONV_BIAS)?).map_err(|e| format!("{}: {e}", names::CONV_WEIGHT))?;
                (w, None, b, None)
            }
            None => (take(names::WEIGHT_IH)?, Some(take(names::WEIGHT_HH)?), take(names::BIAS_IH)?, Some(take(names::BIAS_HH)?)),
        };
        let params = GruParams {
            weight_ih,
            weight_hh,
            bias_ih,
            bias_hh,
            head_weight: take(names::HEAD_WEIGHT)?,
            head_bias: take(names::HEAD_BIAS)?,
            item_embedding: tensors.remove(names::ITEM_EMBEDDING),
            category_embedding: tensors.remove(names::CATEGORY_EMBEDDING),
            skip_weight: tensors.remove(names::SKIP_WEIGHT),
            brand_embedding: tensors.remove(names::BRAND_EMBEDDING),
            top_category_embedding: tensors.remove(names::TOP_CATEGORY_EMBEDDING),
        };
        params.validate()?;
        Ok(params)
    }

    /// The tensors under their `state_dict` names (a convolution's as `nn.Conv1d` stores them).
    ///
    /// # Errors
    ///
    /// Candle errors of laying a convolution's taps out.
    pub fn state_dict(&self) -> candle_core::Result<Vec<(&'static str, Tensor)>> {
        let mut out = match (&self.weight_hh, &self.bias_hh) {
            (Some(w_hh), Some(b_hh)) => vec![
                (names::WEIGHT_IH, self.weight_ih.clone()),
                (names::WEIGHT_HH, w_hh.clone()),
                (names::BIAS_IH, self.bias_ih.clone()),
                (names::BIAS_HH, b_hh.clone()),
            ],
            _ => {
                let (w, b) = taps_to_conv(&self.weight_ih, &self.bias_ih, self.hidden_dim())?;
                vec![(names::CONV_WEIGHT, w), (names::CONV_BIAS, b)]
            }
        };
        out.extend([(names::HEAD_WEIGHT, self.head_weight.clone()), (names::HEAD_BIAS, self.head_bias.clone())]);
        let optional = [
            (names::ITEM_EMBEDDING, &self.item_embedding),
            (names::CATEGORY_EMBEDDING, &self.category_embedding),
            (names::SKIP_WEIGHT, &self.skip_weight),
            (names::BRAND_EMBEDDING, &self.brand_embedding),
            (names::TOP_CATEGORY_EMBEDDING, &self.top_category_embedding),
        ];
        out.extend(optional.into_iter().filter_map(|(name, t)| t.clone().map(|t| (name, t))));
        Ok(out)
    }

    /// Input projection `x·W_ihᵀ + b_ih` for `x` of shape `(N, D)`; returns `(N, G·H)`.
    pub(crate) fn input_gates(&self, x: &Tensor, how: Projection) -> candle_core::Result<Tensor> {
        how.apply(x, &self.weight_ih)?.broadcast_add(&self.bias_ih)
    }

    /// One step of the cell from precomputed input gates `gi` `(B, G·H)` and states `(B, S)`
    /// (`S` = [`state_dim`](Self::state_dim)); returns the new states.
    pub(crate) fn step_states(&self, gi: &Tensor, state: &Tensor, how: Projection) -> candle_core::Result<Tensor> {
        let hd = self.hidden_dim();
        let recurrent = |h: &Tensor| -> candle_core::Result<Tensor> {
            match (&self.weight_hh, &self.bias_hh) {
                (Some(w), Some(b)) => how.apply(h, w)?.broadcast_add(b),
                _ => Err(candle_core::Error::Msg("a recurrent step without recurrent weights".into())),
            }
        };
        match self.cell() {
            Cell::Gru => {
                let h = state;
                let gh = recurrent(h)?;
                let r = sigmoid(&(gi.narrow(1, 0, hd)? + gh.narrow(1, 0, hd)?)?)?;
                let z = sigmoid(&(gi.narrow(1, hd, hd)? + gh.narrow(1, hd, hd)?)?)?;
                let n = (gi.narrow(1, 2 * hd, hd)? + (r * gh.narrow(1, 2 * hd, hd)?)?)?.tanh()?;
                // (1 - z) * n + z * h  ==  n + z * (h - n)
                n.clone() + (z * (h - n)?)?
            }
            Cell::Lstm => {
                let (h, c) = (state.narrow(1, 0, hd)?, state.narrow(1, hd, hd)?);
                let g = (gi + recurrent(&h)?)?;
                let i = sigmoid(&g.narrow(1, 0, hd)?)?;
                let f = sigmoid(&g.narrow(1, hd, hd)?)?;
                let cand = g.narrow(1, 2 * hd, hd)?.tanh()?;
                let o = sigmoid(&g.narrow(1, 3 * hd, hd)?)?;
                let c = ((f * c)? + (i * cand)?)?;
                let h = (o * c.tanh()?)?;
                Tensor::cat(&[h, c], 1)
            }
            Cell::Cnn => {
                // y = relu(u_0 + P_1); P_m' = u_m + P_{m+1}; the last tap's P' = u_{k−1}.
                let tap = |m: usize| gi.narrow(1, m * hd, hd);
                let partial = |m: usize| state.narrow(1, m * hd, hd);
                let mut parts = vec![(tap(0)? + partial(1)?)?.relu()?];
                for m in 1..CNN_TAPS {
                    parts.push(if m + 1 < CNN_TAPS { (tap(m)? + partial(m + 1)?)? } else { tap(m)? });
                }
                Tensor::cat(&parts, 1)
            }
        }
    }

    /// Head logits `(B)` for states `(B, S)` (the head reads their hidden part), without the
    /// skip term.
    pub(crate) fn logits(&self, state: &Tensor, how: Projection) -> candle_core::Result<Tensor> {
        let h = state.narrow(1, 0, self.hidden_dim())?;
        how.apply(&h, &self.head_weight)?.broadcast_add(&self.head_bias)?.squeeze(D::Minus1)
    }

    /// The skip weights as host values (empty without a skip connection), for
    /// [`skip_term`].
    pub(crate) fn skip_values(&self) -> candle_core::Result<Vec<f32>> {
        host_values(self.skip_weight.as_ref())
    }

    /// The head's brand and top-category terms per bucket as host values (empty without them).
    pub(crate) fn head_table_values(&self) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        Ok((host_values(self.brand_embedding.as_ref())?, host_values(self.top_category_embedding.as_ref())?))
    }

    /// Checks shapes and dtypes against each other.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let (d, h) = (self.input_dim(), self.hidden_dim());
        for (name, table) in [(names::ITEM_EMBEDDING, &self.item_embedding), (names::CATEGORY_EMBEDDING, &self.category_embedding)] {
            if let Some(t) = table {
                if t.rank() != 2 || t.dim(0).unwrap_or(0) == 0 || t.dtype() != DType::F32 {
                    return Err(format!("tensor {name} must be a non-empty f32 matrix, got {:?} {:?}", t.dims(), t.dtype()));
                }
            }
        }
        if self.item_shape().1 + self.category_shape().1 >= d {
            return Err(format!("embedding widths leave no dense inputs in {} = {d}", names::WEIGHT_IH));
        }
        if let Some(t) = &self.skip_weight {
            if t.dims() != [1, self.dense_dim()] || t.dtype() != DType::F32 {
                return Err(format!("tensor {} has shape {:?} {:?}, expected [1, {}] f32", names::SKIP_WEIGHT, t.dims(), t.dtype(), self.dense_dim()));
            }
            if self.skip_values().map_err(|e| e.to_string())?.iter().any(|w| !w.is_finite()) {
                return Err(format!("tensor {} holds a value that is not finite", names::SKIP_WEIGHT));
            }
        }
        for (name, table) in [(names::BRAND_EMBEDDING, &self.brand_embedding), (names::TOP_CATEGORY_EMBEDDING, &self.top_category_embedding)] {
            if let Some(t) = table {
                if t.rank() != 2 || t.dim(1).unwrap_or(0) != 1 || t.dim(0).unwrap_or(0) == 0 || t.dtype() != DType::F32 {
                    return Err(format!("tensor {name} must be a non-empty f32 column (buckets, 1), got {:?} {:?}", t.dims(), t.dtype()));
                }
                if host_values(Some(t)).map_err(|e| e.to_string())?.iter().any(|w| !w.is_finite()) {
                    return Err(format!("tensor {name} holds a value that is not finite"));
                }
            }
        }
        let g = self.cell().gates();
        if let Some(w) = &self.weight_hh {
            if w.rank() != 2 || w.dim(0).unwrap_or(0) != g * h {
                return Err(format!("tensor {} has shape {:?}: 3 (GRU) or 4 (LSTM) gates of H rows expected", names::WEIGHT_HH, w.dims()));
            }
        }
        if self.weight_hh.is_some() != self.bias_hh.is_some() {
            return Err(format!("tensors {} and {} come together", names::WEIGHT_HH, names::BIAS_HH));
        }
        let mut want = vec![
            (names::WEIGHT_IH, &self.weight_ih, vec![g * h, d]),
            (names::BIAS_IH, &self.bias_ih, vec![g * h]),
            (names::HEAD_WEIGHT, &self.head_weight, vec![1, h]),
            (names::HEAD_BIAS, &self.head_bias, vec![1]),
        ];
        if let (Some(w), Some(b)) = (&self.weight_hh, &self.bias_hh) {
            want.extend([(names::WEIGHT_HH, w, vec![g * h, h]), (names::BIAS_HH, b, vec![g * h])]);
        }
        for (name, t, dims) in want {
            if t.dims() != dims.as_slice() {
                return Err(format!("tensor {name} has shape {:?}, expected {dims:?}", t.dims()));
            }
            if t.dtype() != DType::F32 {
                return Err(format!("tensor {name} has dtype {:?}, expected f32", t.dtype()));
            }
        }
        if h == 0 || d == 0 {
            return Err("zero-sized model".into());
        }
        if self.cell() == Cell::Cnn && host_values(Some(&self.bias_ih)).map_err(|e| e.to_string())?[h..].iter().any(|b| *b != 0.0) {
            return Err(format!("a convolution's bias is {} on its current-event tap: the other taps' biases must be zero", names::CONV_BIAS));
        }
        Ok(())
    }

    /// Packs independently trained networks of equal shape and cell into one network whose state
    /// is their states side by side, part by part (all hidden vectors, then all of an LSTM's
    /// memories, or a convolution's partial sums): the input weights keep each member's rows, the
    /// recurrent weights are block-diagonal, the embedding tables are concatenated column-wise,
    /// and the head averages the members' logits (skip weights are averaged too, so the skip
    /// term is the mean of the members' skip terms). One step of the packed network equals one
    /// step of every member, so a seed ensemble streams through the same single call (and stays a
    /// plain `nn.GRU` / `nn.LSTM` / `nn.Conv1d` state_dict).
    ///
    /// # Errors
    ///
    /// When there are no members or their shapes differ.
    pub fn pack(members: &[GruParams]) -> Result<GruParams, crate::ModelError> {
        let first = members.first().ok_or_else(|| crate::ModelError::Invalid("no members to pack".into()))?;
        let (h, d, dense) = (first.hidden_dim(), first.input_dim(), first.dense_dim());
        let ((ni, ei), (nc, ec)) = (first.item_shape(), first.category_shape());
        let head_tables = |m: &GruParams| (table_shape(m.brand_embedding.as_ref()), table_shape(m.top_category_embedding.as_ref()));
        if members.iter().any(|m| {
            (m.cell(), m.hidden_dim(), m.input_dim(), m.item_shape(), m.category_shape(), m.skip_weight.is_some(), head_tables(m))
                != (first.cell(), h, d, (ni, ei), (nc, ec), first.skip_weight.is_some(), head_tables(first))
        }) {
            return Err(crate::ModelError::Invalid("members to pack differ in shape".into()));
        }
        let (k, g) = (members.len(), first.cell().gates());
        let (hp, dp) = (k * h, dense + k * (ei + ec));
        let recurrent = first.cell().is_recurrent();
        let mut w_ih = vec![0f32; g * hp * dp];
        let mut w_hh = vec![0f32; if recurrent { g * hp * hp } else { 0 }];
        let (mut b_ih, mut b_hh) = (vec![0f32; g * hp], vec![0f32; if recurrent { g * hp } else { 0 }]);
        let mut head = vec![0f32; hp];
        let mut head_bias = 0f32;
        let mut skip = first.skip_weight.as_ref().map(|_| vec![0f32; dense]);
        let mut items = vec![0f32; ni * k * ei];
        let mut categories = vec![0f32; nc * k * ec];
        for (m, p) in members.iter().enumerate() {
            let wi: Vec<Vec<f32>> = p.weight_ih.to_vec2()?;
            let wh: Vec<Vec<f32>> = p.weight_hh.as_ref().map_or(Ok(Vec::new()), |w| w.to_vec2())?;
            let bi: Vec<f32> = p.bias_ih.to_vec1()?;
            let bh: Vec<f32> = p.bias_hh.as_ref().map_or(Ok(Vec::new()), |b| b.to_vec1())?;
            for gate in 0..g {
                for r in 0..h {
                    let (src, dst) = (gate * h + r, gate * hp + m * h + r);
                    let row = &mut w_ih[dst * dp..(dst + 1) * dp];
                    row[..dense].copy_from_slice(&wi[src][..dense]);
                    row[dense + m * ei..dense + (m + 1) * ei].copy_from_slice(&wi[src][dense..dense + ei]);
                    let cat_at = dense + k * ei + m * ec;
                    row[cat_at..cat_at + ec].copy_from_slice(&wi[src][dense + ei..]);
                    b_ih[dst] = bi[src];
                    if recurrent {
                        w_hh[dst * hp + m * h..dst * hp + (m + 1) * h].copy_from_slice(&wh[src]);
                        b_hh[dst] = bh[src];
                    }
                }
            }
            for (j, w) in p.head_weight.flatten_all()?.to_vec1::<f32>()?.into_iter().enumerate() {
                head[m * h + j] = w / k as f32;
            }
            head_bias += p.head_bias.to_vec1::<f32>()?[0] / k as f32;
            if let Some(acc) = &mut skip {
                for (a, w) in acc.iter_mut().zip(p.skip_values()?) {
                    *a += w / k as f32;
                }
            }
            for (table, out, rows, width) in [(&p.item_embedding, &mut items, ni, ei), (&p.category_embedding, &mut categories, nc, ec)] {
                if let Some(t) = table {
                    for (r, row) in t.to_vec2::<f32>()?.into_iter().enumerate().take(rows) {
                        out[r * k * width + m * width..r * k * width + (m + 1) * width].copy_from_slice(&row);
                    }
                }
            }
        }
        let dev = first.weight_ih.device();
        let table = |data: Vec<f32>, rows: usize, width: usize| -> candle_core::Result<Option<Tensor>> {
            if rows == 0 { Ok(None) } else { Tensor::from_vec(data, (rows, k * width), dev).map(Some) }
        };
        Ok(GruParams {
            weight_ih: Tensor::from_vec(w_ih, (g * hp, dp), dev)?,
            weight_hh: recurrent.then(|| Tensor::from_vec(w_hh, (g * hp, hp), dev)).transpose()?,
            bias_ih: Tensor::from_vec(b_ih, g * hp, dev)?,
            bias_hh: recurrent.then(|| Tensor::from_vec(b_hh, g * hp, dev)).transpose()?,
            head_weight: Tensor::from_vec(head, (1, hp), dev)?,
            head_bias: Tensor::from_vec(vec![head_bias], 1, dev)?,
            item_embedding: table(items, ni, ei)?,
            category_embedding: table(categories, nc, ec)?,
            skip_weight: skip.map(|w| Tensor::from_vec(w, (1, dense), dev)).transpose()?,
            // Width-1 terms of the averaged logit: their mean over the members.
            brand_embedding: mean_of(members.iter().map(|m| m.brand_embedding.as_ref()))?,
            top_category_embedding: mean_of(members.iter().map(|m| m.top_category_embedding.as_ref()))?,
        })
    }

    /// Moves every tensor to `device`.
    pub(crate) fn to_device(&self, device: &Device) -> candle_core::Result<GruParams> {
        let move_table = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device)).transpose();
        Ok(GruParams {
            item_embedding: move_table(&self.item_embedding)?,
            category_embedding: move_table(&self.category_embedding)?,
            weight_ih: self.weight_ih.to_device(device)?,
            weight_hh: move_table(&self.weight_hh)?,
            bias_ih: self.bias_ih.to_device(device)?,
            bias_hh: move_table(&self.bias_hh)?,
            head_weight: self.head_weight.to_device(device)?,
            head_bias: self.head_bias.to_device(device)?,
            skip_weight: move_table(&self.skip_weight)?,
            brand_embedding: move_table(&self.brand_embedding)?,
            top_category_embedding: move_table(&self.top_category_embedding)?,
        })
    }
}

/// The skip term `Σ skip[i] · dense[i]` of one row, summed in slot order (0 without a skip
/// connection): the one place every serving path adds it, so a score does not depend on which
/// path computed the hidden state's part.
pub(crate) fn skip_term(skip: &[f32], dense: &[f32]) -> f32 {
    skip.iter().zip(dense).fold(0.0, |acc, (w, x)| acc + w * x)
}

/// A convolution's `nn.Conv1d` weight `(C, D, k)` and bias `(C)` as stacked taps: `(k·C, D)`,
/// the current event's tap first, and `(k·C)` with the bias on the first tap.
fn conv_to_taps(conv: &Tensor, bias: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let (c, _, k) = conv.dims3()?;
    if k != CNN_TAPS || bias.dims() != [c] {
        return Err(candle_core::Error::Msg(format!("shape {:?} with bias {:?}: (C, D, {CNN_TAPS}) and (C) expected", conv.dims(), bias.dims())));
    }
    let taps: Vec<Tensor> = (0..k).map(|j| conv.narrow(2, k - 1 - j, 1)?.squeeze(2)).collect::<candle_core::Result<_>>()?;
    Ok((Tensor::cat(&taps, 0)?.contiguous()?, conv_bias_taps(bias)?))
}

/// A convolution's bias `(C)` as the stacked taps' bias `(k·C)`: on the current event's tap,
/// zero on the others (the bias is added once per output, as in `nn.Conv1d`).
///
/// # Errors
///
/// Candle errors (a bias that is not a vector).
pub fn conv_bias_taps(bias: &Tensor) -> candle_core::Result<Tensor> {
    let rest = Tensor::zeros((CNN_TAPS - 1) * bias.dim(0)?, bias.dtype(), bias.device())?;
    Tensor::cat(&[bias, &rest], 0)
}

/// The inverse of [`conv_to_taps`] for hidden size `c`.
fn taps_to_conv(weight_ih: &Tensor, bias_ih: &Tensor, c: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let k = weight_ih.dim(0)? / c.max(1);
    let taps: Vec<Tensor> = (0..k).map(|i| weight_ih.narrow(0, (k - 1 - i) * c, c)?.unsqueeze(2)).collect::<candle_core::Result<_>>()?;
    Ok((Tensor::cat(&taps, 2)?.contiguous()?, bias_ih.narrow(0, 0, c)?.contiguous()?))
}

/// A tensor's values on the host, flattened (empty for none).
fn host_values(t: Option<&Tensor>) -> candle_core::Result<Vec<f32>> {
    t.map_or(Ok(Vec::new()), |t| t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1())
}

/// The element-wise mean of equally shaped tensors (`None` when the first is absent).
fn mean_of<'a>(mut tables: impl ExactSizeIterator<Item = Option<&'a Tensor>>) -> candle_core::Result<Option<Tensor>> {
    let k = tables.len() as f64;
    let Some(first) = tables.next().flatten() else { return Ok(None) };
    let mut sum = first.clone();
    for t in tables.flatten() {
        sum = (sum + t)?;
    }
    Ok(Some((sum / k)?))
}

/// The term of `bucket` in a width-1 head table (0 without a table; the last row for a bucket
/// past it).
pub(crate) fn head_term(table: &[f32], bucket: u32) -> f32 {
    table.get((bucket as usize).min(table.len().saturating_sub(1))).copied().unwrap_or(0.0)
}

fn table_shape(table: Option<&Tensor>) -> (usize, usize) {
    table.and_then(|t| t.dims2().ok()).unwrap_or((0, 0))
}

/// Networks of pseudo-random weights for tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Deterministic pseudo-random values in [-0.5, 0.5).
    pub fn values(seed: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    /// A network of `cell` with `dense` dense inputs, hidden size `h`, and `(buckets, width)`
    /// item and category embeddings.
    pub fn network(cell: Cell, seed: u64, dense: usize, h: usize, item: (usize, usize), category: (usize, usize)) -> GruParams {
        let mut s = seed;
        let mut t = |rows: usize, cols: usize| Tensor::from_vec(values(&mut s, rows * cols), (rows, cols), &Device::Cpu).unwrap();
        let g = cell.gates();
        let recurrent = cell.is_recurrent();
        let weight_ih = t(g * h, dense + item.1 + category.1);
        let weight_hh = recurrent.then(|| t(g * h, h));
        let bias_ih = t(1, g * h).flatten_all().unwrap();
        let bias_ih = if recurrent { bias_ih } else { conv_bias_taps(&bias_ih.narrow(0, 0, h).unwrap()).unwrap() };
        let bias_hh = recurrent.then(|| t(1, g * h).flatten_all().unwrap());
        GruParams {
            weight_ih,
            weight_hh,
            bias_ih,
            bias_hh,
            head_weight: t(1, h),
            head_bias: t(1, 1).flatten_all().unwrap(),
            item_embedding: Some(t(item.0, item.1)),
            category_embedding: Some(t(category.0, category.1)),
            skip_weight: Some(t(1, dense)),
            brand_embedding: Some(t(5, 1)),
            top_category_embedding: Some(t(3, 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(cell: Cell, seed: u64, dense: usize, h: usize) -> GruParams {
        testing::network(cell, seed, dense, h, (6, 2), (4, 3))
    }

    fn step(p: &GruParams, dense: &Tensor, items: &Tensor, cats: &Tensor, h: &Tensor) -> (Tensor, Vec<f32>) {
        let how = Projection::Batched;
        let h1 = p.step_states(&p.input_gates(&p.gru_input(dense, items, cats).unwrap(), how).unwrap(), h, how).unwrap();
        let mut logits: Vec<f32> = p.logits(&h1, how).unwrap().to_vec1().unwrap();
        let skip = p.skip_values().unwrap();
        // The item and category buckets stand in for the brand and top-category ones.
        let (brand, top) = p.head_table_values().unwrap();
        let (item_buckets, category_buckets): (Vec<u32>, Vec<u32>) = (items.to_vec1().unwrap(), cats.to_vec1().unwrap());
        for (k, (l, row)) in logits.iter_mut().zip(dense.to_vec2::<f32>().unwrap()).enumerate() {
            *l += skip_term(&skip, &row) + head_term(&brand, item_buckets[k]) + head_term(&top, category_buckets[k]);
        }
        (h1, logits)
    }

    #[test]
    fn a_packed_ensemble_steps_like_its_members_averaged() {
        for cell in Cell::ALL {
            let (dense_dim, h) = (5, 3);
            let members: Vec<GruParams> = (1..=3).map(|s| member(cell, s, dense_dim, h)).collect();
            let packed = GruParams::pack(&members).unwrap();
            packed.validate().unwrap();
            assert_eq!((packed.cell(), packed.hidden_dim(), packed.dense_dim(), packed.item_shape(), packed.category_shape()), (cell, 9, 5, (6, 6), (4, 9)));
            let dense = Tensor::from_vec((0..10).map(|i| i as f32 * 0.1 - 0.4).collect::<Vec<f32>>(), (2, dense_dim), &Device::Cpu).unwrap();
            let items = Tensor::from_vec(vec![1u32, 5], 2, &Device::Cpu).unwrap();
            let cats = Tensor::from_vec(vec![3u32, 0], 2, &Device::Cpu).unwrap();
            // Two steps, so the recurrent blocks are exercised from a non-zero state.
            let mut hs: Vec<Tensor> = members.iter().map(|m| Tensor::zeros((2, m.state_dim()), DType::F32, &Device::Cpu).unwrap()).collect();
            let mut hp = Tensor::zeros((2, packed.state_dim()), DType::F32, &Device::Cpu).unwrap();
            for _ in 0..2 {
                let mut mean = [0f32; 2];
                for (m, p) in members.iter().enumerate() {
                    let (h1, logits) = step(p, &dense, &items, &cats, &hs[m]);
                    hs[m] = h1;
                    for (acc, l) in mean.iter_mut().zip(logits) {
                        *acc += l / 3.0;
                    }
                }
                let (h1, logits) = step(&packed, &dense, &items, &cats, &hp);
                hp = h1;
                for (a, b) in logits.iter().zip(mean) {
                    assert!((a - b).abs() < 1e-5, "{cell}: packed {logits:?} vs mean of members {mean:?}");
                }
                // The packed state is the members' hidden vectors side by side, then (an LSTM)
                // their memories side by side.
                let parts = cell.state_dim(h) / h;
                let joined: Vec<Tensor> = (0..parts).flat_map(|part| hs.iter().map(move |s| s.narrow(1, part * h, h).unwrap())).collect();
                let joined = Tensor::cat(&joined, 1).unwrap().to_vec2::<f32>().unwrap();
                for (a, b) in hp.to_vec2::<f32>().unwrap().concat().iter().zip(joined.concat()) {
                    assert!((a - b).abs() < 1e-6, "{cell}");
                }
            }
        }
    }

    #[test]
    fn the_cell_is_told_by_the_recurrent_weights_shape() {
        let (gru, lstm) = (member(Cell::Gru, 1, 5, 3), member(Cell::Lstm, 1, 5, 3));
        assert_eq!((gru.cell(), gru.state_dim()), (Cell::Gru, 3));
        assert_eq!((lstm.cell(), lstm.state_dim()), (Cell::Lstm, 6));
        let odd = GruParams { weight_hh: Some(Tensor::zeros((6, 3), DType::F32, &Device::Cpu).unwrap()), ..gru };
        assert!(odd.validate().unwrap_err().contains("gates"), "two gates are neither cell");
        let cnn = member(Cell::Cnn, 1, 5, 3);
        assert_eq!((cnn.cell(), cnn.state_dim()), (Cell::Cnn, 9));
    }

    #[test]
    fn a_convolution_is_stored_as_pytorch_conv1d_and_streams_as_one() {
        let cnn = member(Cell::Cnn, 4, 5, 3);
        let dict: std::collections::HashMap<String, Tensor> = cnn.state_dict().unwrap().into_iter().map(|(n, t)| (n.to_string(), t)).collect();
        let conv = &dict[names::CONV_WEIGHT];
        assert_eq!((conv.dims(), dict[names::CONV_BIAS].dims()), ([3, 5 + 2 + 3, CNN_TAPS].as_slice(), [3].as_slice()));
        assert!(!dict.contains_key(names::WEIGHT_IH) && !dict.contains_key(names::WEIGHT_HH));
        let back = GruParams::from_state_dict(dict.clone()).unwrap();
        assert_eq!(back.weight_ih.to_vec2::<f32>().unwrap(), cnn.weight_ih.to_vec2::<f32>().unwrap());
        assert_eq!(back.bias_ih.to_vec1::<f32>().unwrap(), cnn.bias_ih.to_vec1::<f32>().unwrap());
        // A bias on another tap would not survive as conv.bias: refused.
        let taps_bias = GruParams { bias_ih: Tensor::ones(CNN_TAPS * 3, DType::F32, &Device::Cpu).unwrap(), ..cnn.clone() };
        assert!(taps_bias.validate().unwrap_err().contains("other taps"));

        // Streamed one event at a time, the output is PyTorch's causal Conv1d (left padding
        // k − 1) over the whole sequence, then a ReLU.
        let x: Vec<Vec<f32>> = (0..5).map(|t| (0..10).map(|d| ((t * 10 + d) as f32 * 0.37).sin()).collect()).collect();
        let w: Vec<Vec<Vec<f32>>> = conv.to_vec3().unwrap();
        let b: Vec<f32> = dict[names::CONV_BIAS].to_vec1().unwrap();
        let mut state = Tensor::zeros((1, cnn.state_dim()), DType::F32, &Device::Cpu).unwrap();
        for t in 0..x.len() {
            let row = Tensor::from_slice(&x[t], (1, 10), &Device::Cpu).unwrap();
            state = cnn.step_states(&cnn.input_gates(&row, Projection::Batched).unwrap(), &state, Projection::Batched).unwrap();
            let y: Vec<f32> = state.narrow(1, 0, 3).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for c in 0..3 {
                let mut acc = b[c];
                for i in 0..CNN_TAPS {
                    // Tap i of Conv1d reads position t − (k − 1) + i; before the start: padding.
                    if let Some(xt) = (t + i).checked_sub(CNN_TAPS - 1).map(|p| &x[p]) {
                        acc += (0..10).map(|d| w[c][d][i] * xt[d]).sum::<f32>();
                    }
                }
                assert!((y[c] - acc.max(0.0)).abs() < 1e-5, "t {t} channel {c}: streamed {} vs convolution {}", y[c], acc.max(0.0));
            }
        }
    }
}
