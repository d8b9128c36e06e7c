//! The purchase-intent network: hashed item and category embeddings, one GRU layer (PyTorch
//! `nn.GRU` semantics and tensor names) and a linear head with a sigmoid.
//!
//! The GRU input `x` is the event's dense features followed by the embedding rows of its item
//! bucket and its category bucket. For hidden `h` (gate order r, z, n as in PyTorch):
//!
//! ```text
//! r  = σ(W_ir x + b_ir + W_hr h + b_hr)
//! z  = σ(W_iz x + b_iz + W_hz h + b_hz)
//! n  = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
//! h' = (1 − z) ⊙ n + z ⊙ h
//! p  = σ(head.weight · h' + head.bias)
//! ```

use candle_core::{DType, Device, Tensor, D};

/// Tensor names in `model.safetensors`, the same as the `state_dict` of this PyTorch module:
///
/// ```python
/// class Intent(nn.Module):
///     def __init__(self, dense, hidden, item_buckets, item_dim, category_buckets, category_dim):
///         super().__init__()
///         self.item_embedding = nn.Embedding(item_buckets, item_dim)
///         self.category_embedding = nn.Embedding(category_buckets, category_dim)
///         self.gru = nn.GRU(dense + item_dim + category_dim, hidden, batch_first=True)
///         self.head = nn.Linear(hidden, 1)
///
/// state = {k.removeprefix("gru."): v for k, v in Intent(...).state_dict().items()}
/// safetensors.torch.save_file(state, "model.safetensors")
/// ```
///
/// The embeddings are optional (a model without them has `D` dense inputs only).
pub mod names {
    /// `(3·H, D)` input-to-hidden weights, gates r, z, n stacked.
    pub const WEIGHT_IH: &str = "weight_ih_l0";
    /// `(3·H, H)` hidden-to-hidden weights.
    pub const WEIGHT_HH: &str = "weight_hh_l0";
    /// `(3·H)` input-to-hidden bias.
    pub const BIAS_IH: &str = "bias_ih_l0";
    /// `(3·H)` hidden-to-hidden bias.
    pub const BIAS_HH: &str = "bias_hh_l0";
    /// `(1, H)` head weight.
    pub const HEAD_WEIGHT: &str = "head.weight";
    /// `(1)` head bias.
    pub const HEAD_BIAS: &str = "head.bias";
    /// `(item buckets, item dim)` hashed item embedding table (optional).
    pub const ITEM_EMBEDDING: &str = "item_embedding.weight";
    /// `(category buckets, category dim)` hashed category embedding table (optional).
    pub const CATEGORY_EMBEDDING: &str = "category_embedding.weight";
}

/// The parameter tensors of the network.
#[derive(Debug, Clone)]
pub struct GruParams {
    /// See [`names::ITEM_EMBEDDING`].
    pub item_embedding: Option<Tensor>,
    /// See [`names::CATEGORY_EMBEDDING`].
    pub category_embedding: Option<Tensor>,
    /// See [`names::WEIGHT_IH`].
    pub weight_ih: Tensor,
    /// See [`names::WEIGHT_HH`].
    pub weight_hh: Tensor,
    /// See [`names::BIAS_IH`].
    pub bias_ih: Tensor,
    /// See [`names::BIAS_HH`].
    pub bias_hh: Tensor,
    /// See [`names::HEAD_WEIGHT`].
    pub head_weight: Tensor,
    /// See [`names::HEAD_BIAS`].
    pub head_bias: Tensor,
}

/// Sigmoid through differentiable primitives, so the same cell serves training and inference.
pub(crate) fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

impl GruParams {
    /// Hidden size H.
    pub fn hidden_dim(&self) -> usize {
        self.weight_hh.dim(1).unwrap_or(0)
    }

    /// Input size of the GRU: dense features plus both embedding widths.
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

    /// Number of dense features the GRU expects before the embeddings.
    pub fn dense_dim(&self) -> usize {
        self.input_dim().saturating_sub(self.item_shape().1 + self.category_shape().1)
    }

    /// Builds the GRU input `(N, D)`: dense features `(N, dense)` followed by the embedding rows
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

    /// The GRU input `(N, D)` of prepared features, built on `device`.
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
        let mut take = |name: &str| tensors.remove(name).ok_or_else(|| format!("no tensor `{name}`"));
        let params = GruParams {
            weight_ih: take(names::WEIGHT_IH)?,
            weight_hh: take(names::WEIGHT_HH)?,
            bias_ih: take(names::BIAS_IH)?,
            bias_hh: take(names::BIAS_HH)?,
            head_weight: take(names::HEAD_WEIGHT)?,
            head_bias: take(names::HEAD_BIAS)?,
            item_embedding: tensors.remove(names::ITEM_EMBEDDING),
            category_embedding: tensors.remove(names::CATEGORY_EMBEDDING),
        };
        params.validate()?;
        Ok(params)
    }

    /// The tensors under their `state_dict` names.
    pub fn state_dict(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = vec![
            (names::WEIGHT_IH, &self.weight_ih),
            (names::WEIGHT_HH, &self.weight_hh),
            (names::BIAS_IH, &self.bias_ih),
            (names::BIAS_HH, &self.bias_hh),
            (names::HEAD_WEIGHT, &self.head_weight),
            (names::HEAD_BIAS, &self.head_bias),
        ];
        if let Some(t) = &self.item_embedding {
            out.push((names::ITEM_EMBEDDING, t));
        }
        if let Some(t) = &self.category_embedding {
            out.push((names::CATEGORY_EMBEDDING, t));
        }
        out
    }

    /// Input projection `x·W_ihᵀ + b_ih` for `x` of shape `(N, D)`; returns `(N, 3H)`.
    pub(crate) fn input_gates(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight_ih.t()?)?.broadcast_add(&self.bias_ih)
    }

    /// One GRU step from precomputed input gates `gi` `(B, 3H)` and hidden `h` `(B, H)`.
    pub(crate) fn cell(&self, gi: &Tensor, h: &Tensor) -> candle_core::Result<Tensor> {
        let hd = self.hidden_dim();
        let gh = h.matmul(&self.weight_hh.t()?)?.broadcast_add(&self.bias_hh)?;
        let r = sigmoid(&(gi.narrow(1, 0, hd)? + gh.narrow(1, 0, hd)?)?)?;
        let z = sigmoid(&(gi.narrow(1, hd, hd)? + gh.narrow(1, hd, hd)?)?)?;
        let n = (gi.narrow(1, 2 * hd, hd)? + (r * gh.narrow(1, 2 * hd, hd)?)?)?.tanh()?;
        // (1 - z) * n + z * h  ==  n + z * (h - n)
        n.clone() + (z * (h - n)?)?
    }

    /// Head logits `(B)` for hidden states `(B, H)`.
    pub(crate) fn logits(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        h.matmul(&self.head_weight.t()?)?.broadcast_add(&self.head_bias)?.squeeze(D::Minus1)
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
        let want = [
            (names::WEIGHT_IH, &self.weight_ih, vec![3 * h, d]),
            (names::WEIGHT_HH, &self.weight_hh, vec![3 * h, h]),
            (names::BIAS_IH, &self.bias_ih, vec![3 * h]),
            (names::BIAS_HH, &self.bias_hh, vec![3 * h]),
            (names::HEAD_WEIGHT, &self.head_weight, vec![1, h]),
            (names::HEAD_BIAS, &self.head_bias, vec![1]),
        ];
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
        Ok(())
    }

    /// Moves every tensor to `device`.
    pub(crate) fn to_device(&self, device: &Device) -> candle_core::Result<GruParams> {
        let move_table = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device)).transpose();
        Ok(GruParams {
            item_embedding: move_table(&self.item_embedding)?,
            category_embedding: move_table(&self.category_embedding)?,
            weight_ih: self.weight_ih.to_device(device)?,
            weight_hh: self.weight_hh.to_device(device)?,
            bias_ih: self.bias_ih.to_device(device)?,
            bias_hh: self.bias_hh.to_device(device)?,
            head_weight: self.head_weight.to_device(device)?,
            head_bias: self.head_bias.to_device(device)?,
        })
    }
}

fn table_shape(table: Option<&Tensor>) -> (usize, usize) {
    table.and_then(|t| t.dims2().ok()).unwrap_or((0, 0))
}
