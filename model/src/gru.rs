//! The purchase-intent network: one GRU layer (PyTorch `nn.GRU` semantics and tensor names)
//! followed by a linear head and a sigmoid.
//!
//! For input `x` and hidden `h` (gate order r, z, n as in PyTorch):
//!
//! ```text
//! r  = σ(W_ir x + b_ir + W_hr h + b_hr)
//! z  = σ(W_iz x + b_iz + W_hz h + b_hz)
//! n  = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
//! h' = (1 − z) ⊙ n + z ⊙ h
//! p  = σ(head.weight · h' + head.bias)
//! ```

use candle_core::{DType, Device, Tensor, D};

/// Tensor names in `model.safetensors`, the same as a PyTorch `state_dict` of
/// `gru = nn.GRU(input_dim, hidden_dim, batch_first=True)` saved under no prefix plus
/// `head = nn.Linear(hidden_dim, 1)` saved under the prefix `head.`.
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
}

/// The six parameter tensors of the network.
#[derive(Debug, Clone)]
pub struct GruParams {
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

    /// Input size D.
    pub fn input_dim(&self) -> usize {
        self.weight_ih.dim(1).unwrap_or(0)
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
        Ok(GruParams {
            weight_ih: self.weight_ih.to_device(device)?,
            weight_hh: self.weight_hh.to_device(device)?,
            bias_ih: self.bias_ih.to_device(device)?,
            bias_hh: self.bias_hh.to_device(device)?,
            head_weight: self.head_weight.to_device(device)?,
            head_bias: self.head_bias.to_device(device)?,
        })
    }
}
