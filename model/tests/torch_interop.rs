//! Weights trained in PyTorch load and step exactly as in PyTorch.
//!
//! `fixtures/torch_gru.safetensors` was written by `fixtures/make_torch_gru.py` (PyTorch
//! 2.15.0), which saves the `state_dict` of
//!
//! ```python
//! class Intent(nn.Module):
//!     def __init__(self):
//!         super().__init__()
//!         self.item_embedding = nn.Embedding(5, 2)
//!         self.category_embedding = nn.Embedding(4, 2)
//!         self.gru = nn.GRU(17 + 2 + 2, 4, batch_first=True)
//!         self.head = nn.Linear(4, 1)
//!
//!     def forward(self, dense, items, categories, h0):
//!         x = torch.cat([dense, self.item_embedding(items), self.category_embedding(categories)], dim=-1)
//!         out, h1 = self.gru(x.unsqueeze(1), h0.unsqueeze(0))
//!         return h1[0], torch.sigmoid(self.head(h1[0])).squeeze(-1)
//!
//! torch.manual_seed(0)
//! m = Intent().eval()
//! save_file({k.removeprefix("gru."): v.contiguous() for k, v in m.state_dict().items()}, "torch_gru.safetensors")
//! dense = torch.linspace(-1.0, 1.0, 34).reshape(2, 17)
//! h1, p = m(dense, torch.tensor([1, 3]), torch.tensor([2, 0]),
//!           torch.tensor([[0.1, -0.2, 0.3, 0.0], [0.0, 0.5, -0.5, 0.25]]))
//! ```
//!
//! and printed the reference numbers below.
//!
//! The fixture predates the sixteen dense features added after the first 17 (category path and
//! brand present, the user's history, the session's counts and prices). The test widens its `weight_ih_l0` with zero columns for
//! them, as a PyTorch model trained on the first 17 would be served: whatever those inputs hold,
//! the step must still equal PyTorch's.

use candle_core::Device;
use intentflow_model::{Calibration, FeatureSpec, Features, GruParams, IntentModel, ModelMeta, FEATURE_DIM};
use intentflow_schemas::SessionConfig;

/// Dense inputs of the PyTorch module that wrote the fixture.
const TORCH_DENSE: usize = 17;

/// `weight_ih_l0` with zero columns for the dense features after the first [`TORCH_DENSE`].
fn widen(tensors: &mut std::collections::HashMap<String, candle_core::Tensor>) {
    let w = &tensors["weight_ih_l0"];
    let rows = w.dim(0).unwrap();
    let zeros = candle_core::Tensor::zeros((rows, FEATURE_DIM - TORCH_DENSE), w.dtype(), w.device()).unwrap();
    let parts = [w.narrow(1, 0, TORCH_DENSE).unwrap(), zeros, w.narrow(1, TORCH_DENSE, w.dim(1).unwrap() - TORCH_DENSE).unwrap()];
    let widened = candle_core::Tensor::cat(&parts, 1).unwrap();
    tensors.insert("weight_ih_l0".into(), widened);
}
use std::path::PathBuf;

const H1: [f32; 8] = [-0.2474110, 0.0635583, 0.2741688, 0.2179607, -0.3079793, 0.7226425, -0.3828281, 0.3185961];
const P: [f32; 2] = [0.5741528, 0.5738866];

#[test]
fn a_pytorch_state_dict_steps_like_pytorch() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_gru.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert_eq!(tensors["weight_ih_l0"].dims(), [12, TORCH_DENSE + 4]);
    widen(&mut tensors);
    let params = GruParams::from_state_dict(tensors).unwrap();
    assert_eq!((params.dense_dim(), params.hidden_dim(), params.item_shape(), params.category_shape()), (FEATURE_DIM, 4, (5, 2), (4, 2)));
    let meta = ModelMeta {
        format: 2,
        version: "gru-torchfixture".into(),
        cell: Default::default(),
        input_dim: params.input_dim(),
        hidden_dim: 4,
        features: FeatureSpec::identity(SessionConfig::default()).with_buckets(5, 4),
        calibration: Calibration::None,
        threshold: None,
        baselines: None,
        training: None,
        state_precision: Default::default(),
    };
    let model = IntentModel::new(params, meta, Device::Cpu).unwrap();
    // PyTorch's inputs in the first 17 slots; anything in the rest, which has zero weights.
    let dense = |row: usize| -> [f32; FEATURE_DIM] {
        std::array::from_fn(|i| if i < TORCH_DENSE { -1.0 + 2.0 * (row * TORCH_DENSE + i) as f32 / 33.0 } else { 0.75 - row as f32 })
    };
    let inputs = [Features { item: 1, category: 2, ..Features::dense(dense(0)) }, Features { item: 3, category: 0, ..Features::dense(dense(1)) }];
    let h0 = [0.1, -0.2, 0.3, 0.0, 0.0, 0.5, -0.5, 0.25];
    let out = model.step(&inputs, &h0).unwrap();
    for (got, want) in out.hidden.iter().zip(H1) {
        assert!((got - want).abs() < 1e-5, "hidden {:?} vs PyTorch {H1:?}", out.hidden);
    }
    for (got, want) in out.scores.iter().zip(P) {
        assert!((got - want).abs() < 1e-5, "scores {:?} vs PyTorch {P:?}", out.scores);
    }
}

#[test]
fn a_state_dict_missing_a_tensor_is_refused_by_name() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_gru.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.remove("weight_hh_l0");
    let err = GruParams::from_state_dict(tensors).unwrap_err();
    assert!(err.contains("weight_hh_l0"), "{err}");
}
