//! The purchase-intent model of Intentflow, in candle. No Kafka, no storage.
//!
//! * [`features`] — the single feature path: an event plus the user's session state becomes a
//!   normalised network input, identically in training, offline scoring and streaming.
//! * [`IntentModel`] — a trained network ([`Cell`]: GRU, LSTM or causal convolution) + head
//!   loaded from a model directory (`model.safetensors` with PyTorch `nn.GRU` / `nn.LSTM` /
//!   `nn.Conv1d` tensor names, `model.json` with dimensions, feature spec and a content-hash
//!   version). The parameter type keeps its first name, [`GruParams`], for every cell. [`IntentModel::step`] advances a whole batch of users by one event
//!   each; the host-side `f32` buffers in and out keep tensors out of the state layer.
//! * [`train`] — labels, time split, class-weighted BCE + AdamW with early stopping on
//!   validation PR-AUC, then calibration, baselines and the ensemble, fitted on validation.
//! * [`baseline`] — base rate and logistic regression on session aggregates;
//!   [`boosting`] — gradient-boosted trees on the same aggregates.
//! * [`calibrate`] — Platt scaling and isotonic regression, stored with the model.
//! * [`eval`] — ROC/PR-AUC, log loss, Brier, P/R/F1, calibration error, bootstrap intervals;
//!   [`report`] renders them as a self-contained HTML page.
//!
//! * [`resident`] — hidden states kept by slot where the step runs ([`ResidentStates`]): on the
//!   CPU, and with the `cuda` feature on a GPU ([`cuda`]), where one fused kernel steps them in
//!   place with the CPU kernel's arithmetic, bit for bit.
//!
//! The model runs on candle's CPU device, or on CUDA when built with the `cuda` feature.

pub mod assess;
pub mod baseline;
pub mod boosting;
pub mod calibrate;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod eval;
pub mod features;
mod gru;
mod io;
pub mod kernel;
mod logistic;
pub mod report;
pub mod resident;
pub mod train;

pub use calibrate::Calibration;
pub use features::{FeatureSpec, Features, Prepared, FEATURE_DIM, REASON_NAMES, SKIP_FEATURES};
pub use gru::{conv_bias_taps, names, Cell, GruParams, Projection, CNN_TAPS};
pub use io::{candidate_dirs, ModelMeta, CANDIDATES_DIR, MODEL_FILE, META_FILE};
pub use train::{SplitSpec, TrainingSummary};
pub use logistic::Logistic;
pub use resident::{HostStates, ResidentRow, ResidentStates};

pub use candle_core::Device;
use candle_core::Tensor;
use intentflow_schemas::{Event, SessionState};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The precision hidden states are kept in between steps.
///
/// A model trained with `--state-precision int8` (the default) or `f16` rounds every new
/// hidden vector inside its step (so a state is the same whether it stayed in memory or went
/// through RocksDB, where it then takes about 1 or 2 bytes a value); `intentflow eval
/// --state-precision` rounds any model's states so, to measure what that costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatePrecision {
    /// As computed: 32-bit floats.
    #[default]
    F32,
    /// Rounded to IEEE half precision after every step.
    F16,
    /// Rounded to bfloat16 after every step (same size as f16, fewer mantissa bits).
    Bf16,
    /// Rounded to 8-bit integers after every step, in blocks of 8 consecutive values that
    /// share one power-of-two scale ([`intentflow_schemas::int8`]): a state then takes a byte a
    /// value and one a block.
    Int8,
}

impl StatePrecision {
    /// Whether states are kept as computed.
    pub fn is_f32(&self) -> bool {
        *self == StatePrecision::F32
    }

    /// Rounds `values` to this precision (to nearest, ties to even), in place. f16 and bf16:
    /// the same bits as a conversion there and back with `half` (tested on every `f32`), in
    /// plain integer and `f32` operations that the compiler vectorises (`half` converts one
    /// value per call). Int8: blocks of 8 from the start of `values`, so pass a whole state row.
    pub fn round(self, values: &mut [f32]) {
        match self {
            StatePrecision::F32 => {}
            StatePrecision::F16 => values.iter_mut().for_each(|v| *v = round_f16(*v)),
            StatePrecision::Bf16 => values.iter_mut().for_each(|v| *v = round_bf16(*v)),
            StatePrecision::Int8 => intentflow_schemas::int8::round_int8(values),
        }
    }
}

/// `v` rounded to IEEE half precision and back: `half::f16::from_f32(v).to_f32()`.
#[inline(always)]
fn round_f16(v: f32) -> f32 {
    /// The smallest normal f16, 2^-14: below it f16 steps by 2^-24.
    const MIN_NORMAL: f32 = 6.103_515_6e-5;
    /// Halfway between the largest f16 (65,504) and 65,536: from here on, infinity.
    const OVERFLOW: f32 = 65_520.0;
    let bits = v.to_bits();
    let sign = bits & 0x8000_0000;
    let a = f32::from_bits(bits ^ sign);
    let ab = a.to_bits();
    // Subnormal f16: f32 addition at 0.5 (an ulp of 2^-24) rounds to nearest, ties to even.
    let subnormal = ((a + 0.5) - 0.5).to_bits();
    // Normal f16: the 13 mantissa bits f16 lacks, rounded away to nearest, ties to even.
    let normal = (ab + 0x0FFF + ((ab >> 13) & 1)) & !0x1FFF;
    // Infinity, or a NaN made quiet with its payload's upper bits kept.
    let big = if a.is_nan() { (ab & !0x1FFF) | 0x0040_0000 } else { 0x7F80_0000 };
    let r = if a < MIN_NORMAL {
        subnormal
    } else if a < OVERFLOW {
        normal
    } else {
        big
    };
    f32::from_bits(sign | r)
}

/// `v` rounded to bfloat16 and back: `half::bf16::from_f32(v).to_f32()`.
#[inline(always)]
fn round_bf16(v: f32) -> f32 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
    // A NaN is made quiet with its payload's upper bits kept; anything else rounds, overflow to
    // infinity included.
    f32::from_bits(if v.is_nan() { (bits & 0xFFFF_0000) | 0x0040_0000 } else { rounded })
}

/// Errors of the model crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A candle tensor operation failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a model file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No model at the given directory.
    #[error("no trained model in {0} (expected model.safetensors and model.json); train one with `intentflow train --input EVENTS.jsonl --model-dir {0}`")]
    Missing(PathBuf),
    /// The model files are inconsistent or do not match this build.
    #[error("invalid model: {0}")]
    Invalid(String),
    /// `model.json` could not be parsed.
    #[error("model.json: {0}")]
    Json(#[from] serde_json::Error),
    /// CUDA was asked for but is not available.
    #[error("CUDA device unavailable: {0}")]
    CudaUnavailable(String),
    /// Training could not run (no data, no labels).
    #[error("training: {0}")]
    Training(String),
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// candle's CPU backend.
    #[default]
    Cpu,
    /// The first CUDA GPU (needs the `cuda` cargo feature).
    Cuda,
}

impl DeviceKind {
    /// Opens the candle device.
    ///
    /// # Errors
    ///
    /// [`ModelError::CudaUnavailable`] when CUDA is asked for in a build without the `cuda`
    /// feature or on a machine without a usable GPU.
    pub fn open(self) -> Result<Device, ModelError> {
        match self {
            DeviceKind::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => Device::new_cuda(0).map_err(|e| ModelError::CudaUnavailable(e.to_string())),
            #[cfg(not(feature = "cuda"))]
            DeviceKind::Cuda => Err(ModelError::CudaUnavailable(
                "this binary was built without the `cuda` feature (cargo build --features cuda)".into(),
            )),
        }
    }
}

/// Most reasons an intent carries.
pub const MAX_REASONS: usize = 3;

/// A skip term must add at least this much to the logit for its signal to be a reason.
pub const REASON_MIN_LOGIT: f32 = 0.25;

/// Up to [`MAX_REASONS`] signals that raised one score, strongest first: indices into
/// [`features::REASON_NAMES`], kept without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reasons {
    slots: [u8; MAX_REASONS],
    len: u8,
}

impl Reasons {
    /// The signals' names, strongest first.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.slots[..usize::from(self.len)].iter().map(|&i| features::REASON_NAMES[usize::from(i)])
    }

    /// Indices into [`features::SKIP_FEATURES`], strongest first.
    pub fn indices(&self) -> &[u8] {
        &self.slots[..usize::from(self.len)]
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Result of one batched step: new states (row-major `B × S`) and scores (`B`).
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// States after the step, `B × S` ([`IntentModel::state_dim`]).
    pub hidden: Vec<f32>,
    /// Purchase probabilities after the step.
    pub scores: Vec<f32>,
}

/// A trained purchase-intent model on a device.
#[derive(Debug, Clone)]
pub struct IntentModel {
    params: GruParams,
    meta: ModelMeta,
    device: Device,
    projection: Projection,
    /// The fused step's weight layout, built at load on every device.
    kernel: Arc<kernel::FusedStep>,
    serving: Serving,
    /// The skip weights on the host (empty: none); the skip term is added to the fused
    /// kernels' logits here, not in them.
    skip: Arc<[f32]>,
    /// The dense slot of each of [`features::SKIP_FEATURES`].
    skip_slots: [usize; features::SKIP_FEATURES.len()],
    /// The head's brand and top-category terms per bucket (empty: none), added with the skip
    /// term.
    head_tables: Arc<(Vec<f32>, Vec<f32>)>,
}

/// What runs [`IntentModel::step`].
#[derive(Clone)]
enum Serving {
    /// The fused CPU kernel.
    Cpu,
    /// The fused GPU kernel on a slab used as scratch (rows in slots `0..B`), regrown as needed.
    Gpu(Arc<Mutex<Box<dyn ResidentStates>>>),
    /// candle's tensors: the reference.
    Candle,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Serving::Cpu => "Cpu",
            Serving::Gpu(_) => "Gpu",
            Serving::Candle => "Candle",
        })
    }
}

impl IntentModel {
    /// Builds a model from parameters and metadata, moving the parameters to `device`.
    ///
    /// # Errors
    ///
    /// [`ModelError::Invalid`] when shapes disagree with each other or with the metadata;
    /// [`ModelError::CudaUnavailable`] when the GPU step cannot be loaded on a CUDA device.
    pub fn new(params: GruParams, meta: ModelMeta, device: Device) -> Result<IntentModel, ModelError> {
        params.validate().map_err(ModelError::Invalid)?;
        meta.features.validate().map_err(ModelError::Invalid)?;
        if params.dense_dim() != FEATURE_DIM || params.hidden_dim() != meta.hidden_dim || meta.input_dim != params.input_dim() || params.cell() != meta.cell {
            return Err(ModelError::Invalid(format!(
                "dimensions disagree: tensors {} D={} (dense {}) H={}, model.json {} D={} H={}, this build has {FEATURE_DIM} dense features",
                params.cell(),
                params.input_dim(),
                params.dense_dim(),
                params.hidden_dim(),
                meta.cell,
                meta.input_dim,
                meta.hidden_dim
            )));
        }
        let spec = &meta.features;
        let head_rows = |t: &Option<Tensor>| t.as_ref().map_or(0, |t| t.dim(0).unwrap_or(0));
        if head_rows(&params.brand_embedding) != spec.brand_buckets as usize || head_rows(&params.top_category_embedding) != spec.top_category_buckets as usize {
            return Err(ModelError::Invalid(format!(
                "the head's brand and top-category tables have {} and {} rows, the feature spec hashes into {} and {}",
                head_rows(&params.brand_embedding),
                head_rows(&params.top_category_embedding),
                spec.brand_buckets,
                spec.top_category_buckets
            )));
        }
        if params.item_shape().0 != spec.item_buckets as usize || params.category_shape().0 != spec.category_buckets as usize {
            return Err(ModelError::Invalid(format!(
                "embedding tables have {} item and {} category rows, the feature spec hashes into {} and {}",
                params.item_shape().0,
                params.category_shape().0,
                spec.item_buckets,
                spec.category_buckets
            )));
        }
        let params = params.to_device(&device)?;
        // Every row is stepped on its own (the fused kernels, or candle's
        // [`Projection::PerRow`]), so a user's hidden state is bit-for-bit the same however the
        // stream was cut into batches, and the same on the CPU and a GPU: what makes crash
        // recovery and replays reproduce states.
        let projection = if device.is_cpu() { Projection::PerRow } else { Projection::Batched };
        let members = meta.training.as_ref().map_or(1, |t| t.members);
        let kernel = Arc::new(kernel::FusedStep::new(&params, members).map_err(|e| ModelError::Invalid(e.to_string()))?.with_state_precision(meta.state_precision));
        let skip = params.skip_values()?.into();
        let skip_slots = features::skip_slots();
        let head_tables = Arc::new(params.head_table_values()?);
        let mut model = IntentModel { params, meta, device, projection, kernel, serving: Serving::Cpu, skip, skip_slots, head_tables };
        if !model.device.is_cpu() {
            model.serving = Serving::Gpu(Arc::new(Mutex::new(model.resident_states(1024)?)));
        }
        Ok(model)
    }

    /// A slab of `capacity` resident states (all zero) on the model's device, stepped
    /// by the fused kernel of that device.
    ///
    /// # Errors
    ///
    /// [`ModelError::CudaUnavailable`] when the device cannot hold it or has no fused step.
    pub fn resident_states(&self, capacity: usize) -> Result<Box<dyn ResidentStates>, ModelError> {
        if self.device.is_cpu() {
            return Ok(Box::new(HostStates::new(self.kernel.clone(), capacity)));
        }
        #[cfg(feature = "cuda")]
        if self.device.is_cuda() {
            return Ok(Box::new(cuda::CudaStates::new(&self.kernel, &self.device, capacity)?));
        }
        Err(ModelError::CudaUnavailable(format!("no fused step on {:?}", self.device)))
    }

    /// The calibrated purchase probability of a step's head logit (what the fused kernels
    /// return) for a row with input `features`: the skip term of the dense features is added
    /// here, the same way on every serving path.
    pub fn probability(&self, logit: f32, features: &Features) -> f32 {
        let mut logit = if self.skip.is_empty() { logit } else { logit + gru::skip_term(&self.skip, &features.dense) };
        let (brand, top) = &*self.head_tables;
        if !brand.is_empty() || !top.is_empty() {
            logit += gru::head_term(brand, features.brand) + gru::head_term(top, features.top_category);
        }
        self.meta.calibration.apply(kernel::sigmoid(logit))
    }

    /// The signals that raised the score of a row with input `features` most: the skip terms
    /// (`skip.weight[i] · dense[i]`, dense features normalised so that 0 is the training mean)
    /// of signals above their mean with a positive weight, of at least [`REASON_MIN_LOGIT`],
    /// strongest first, ties by feature order. Deterministic, about 17 multiply-adds; empty for
    /// a model without a skip connection.
    pub fn reasons(&self, features: &Features) -> Reasons {
        let mut out = Reasons::default();
        if self.skip.is_empty() {
            return out;
        }
        let mut best = [(0f32, 0u8); MAX_REASONS];
        for (i, &slot) in self.skip_slots.iter().enumerate() {
            // More of the signal than the average event has, and the model counts it for
            // buying: less of something that counts against is no reason.
            let (w, x) = (self.skip[slot], features.dense[slot]);
            let c = w * x;
            if x <= 0.0 || w <= 0.0 || c < REASON_MIN_LOGIT {
                continue;
            }
            let n = usize::from(out.len);
            // Insert by strength; a later feature with an equal term goes after.
            let at = best[..n].iter().position(|&(b, _)| c > b).unwrap_or(n);
            if at < MAX_REASONS {
                best.copy_within(at..MAX_REASONS - 1, at + 1);
                best[at] = (c, i as u8);
                out.len = (out.len + 1).min(MAX_REASONS as u8);
            }
        }
        for (slot, (_, i)) in out.slots.iter_mut().zip(best).take(usize::from(out.len)) {
            *slot = i;
        }
        out
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The same model stepped by candle on the CPU instead of the fused kernel: the reference
    /// the kernel is checked against, and the baseline of its benchmark.
    pub fn with_candle_step(&self) -> IntentModel {
        IntentModel { serving: Serving::Candle, ..self.clone() }
    }

    /// The same weights keeping states in `precision` instead of the trained one: a reference
    /// for checks (candle's unrounded step against the fused kernel's, which a rounding step
    /// apart could not compare within 1e-5) and for measurements. Its version stays the trained
    /// model's, so it is not for serving.
    ///
    /// # Errors
    ///
    /// As [`IntentModel::resident_states`], on a GPU.
    pub fn with_state_precision(&self, precision: StatePrecision) -> Result<IntentModel, ModelError> {
        let mut model = self.clone();
        model.meta.state_precision = precision;
        model.kernel = Arc::new(self.kernel.as_ref().clone().with_state_precision(precision));
        if let Serving::Gpu(_) = model.serving {
            model.serving = Serving::Gpu(Arc::new(Mutex::new(model.resident_states(1024)?)));
        }
        Ok(model)
    }

    /// The model's metadata (`model.json`).
    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    /// Content-hash version, e.g. `gru-3f9a0c1b2d4e` (the cell, then the hash).
    pub fn version(&self) -> &str {
        &self.meta.version
    }

    /// The recurrent cell.
    pub fn cell(&self) -> Cell {
        self.meta.cell
    }

    /// Hidden size H.
    pub fn hidden_dim(&self) -> usize {
        self.meta.hidden_dim
    }

    /// Values in a user's state ([`Cell::state_dim`]): `H`; `2H` for an LSTM (`[h | c]`); `3H`
    /// for a convolution (`[y | P_1 | P_2]`).
    /// What [`step`](Self::step) takes and returns per row.
    pub fn state_dim(&self) -> usize {
        self.meta.cell.state_dim(self.meta.hidden_dim)
    }

    /// The feature contract to prepare inputs with.
    pub fn features(&self) -> &FeatureSpec {
        &self.meta.features
    }

    /// The parameters (on the model's device).
    pub fn params(&self) -> &GruParams {
        &self.params
    }

    /// Advances `B = inputs.len()` users by one event each.
    ///
    /// `hidden` holds their current states row-major (`B × S`, `S` =
    /// [`state_dim`](Self::state_dim); zeros for a new session). Returns the new states and the
    /// calibrated purchase probabilities.
    ///
    /// # Errors
    ///
    /// [`ModelError::Invalid`] if `hidden` has the wrong length; candle errors otherwise.
    pub fn step(&self, inputs: &[Features], hidden: &[f32]) -> Result<StepOutput, ModelError> {
        let (b, h) = (inputs.len(), self.state_dim());
        if hidden.len() != b * h {
            return Err(ModelError::Invalid(format!("hidden buffer holds {} values, expected {b}×{h}", hidden.len())));
        }
        if b == 0 {
            return Ok(StepOutput { hidden: Vec::new(), scores: Vec::new() });
        }
        match &self.serving {
            Serving::Cpu => {
                let mut next = hidden.to_vec();
                let mut logits = vec![0f32; b];
                self.kernel.step(inputs, &mut next, &mut logits);
                let scores = logits.into_iter().zip(inputs).map(|(l, f)| self.probability(l, f)).collect();
                return Ok(StepOutput { hidden: next, scores });
            }
            Serving::Gpu(scratch) => {
                let mut slab = scratch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if slab.capacity() < b {
                    *slab = self.resident_states(b.next_power_of_two())?;
                }
                let slots: Vec<u32> = (0..b as u32).collect();
                slab.load(&slots, hidden)?;
                let rows: Vec<ResidentRow> = inputs.iter().zip(&slots).map(|(f, &slot)| ResidentRow { slot, reset: false, features: *f }).collect();
                let (mut logits, mut next) = (Vec::with_capacity(b), Vec::with_capacity(b * h));
                slab.step(&rows, &mut logits)?;
                slab.read(&slots, &mut next)?;
                let scores = logits.into_iter().zip(inputs).map(|(l, f)| self.probability(l, f)).collect();
                return Ok(StepOutput { hidden: next, scores });
            }
            Serving::Candle => {}
        }
        let x = self.params.gru_input_of(inputs, &self.device)?;
        let h0 = Tensor::from_slice(hidden, (b, h), &self.device)?;
        let how = self.projection;
        let mut h1 = self.params.step_states(&self.params.input_gates(&x, how)?, &h0, how)?;
        match self.meta.state_precision {
            StatePrecision::F32 => {}
            StatePrecision::F16 => h1 = h1.to_dtype(candle_core::DType::F16)?.to_dtype(candle_core::DType::F32)?,
            StatePrecision::Bf16 => h1 = h1.to_dtype(candle_core::DType::BF16)?.to_dtype(candle_core::DType::F32)?,
            StatePrecision::Int8 => {
                // Block scales have no tensor op: rounded row by row on the host, as the kernel does.
                let mut rows: Vec<f32> = h1.flatten_all()?.to_vec1()?;
                rows.chunks_mut(h).for_each(|row| StatePrecision::Int8.round(row));
                h1 = Tensor::from_vec(rows, (b, h), &self.device)?;
            }
        }
        let logits: Vec<f32> = self.params.logits(&h1, how)?.to_vec1()?;
        let scores = logits.into_iter().zip(inputs).map(|(l, f)| self.probability(l, f)).collect();
        Ok(StepOutput { hidden: h1.flatten_all()?.to_vec1()?, scores })
    }

    /// Scores one user's events one at a time, in the given order, from a fresh state: the
    /// reference that the streaming operator must reproduce. Returns every score and the
    /// final state.
    ///
    /// # Errors
    ///
    /// Candle errors.
    pub fn score_sequence<'a>(&self, events: impl IntoIterator<Item = &'a Event>) -> Result<SequenceScores, ModelError> {
        let mut out = SequenceScores { scores: Vec::new(), hidden: vec![0f32; self.state_dim()], session: SessionState::default() };
        for ev in events {
            let prepared = self.features().featurize(&mut out.session, ev);
            if prepared.reset_hidden {
                out.hidden.fill(0.0);
            }
            let step = self.step(&[prepared.features], &out.hidden)?;
            out.hidden = step.hidden;
            out.scores.push(step.scores[0]);
        }
        Ok(out)
    }
}

/// Offline scores of one user's sequence and the state it ends in.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceScores {
    /// One score per event.
    pub scores: Vec<f32>,
    /// State after the last event.
    pub hidden: Vec<f32>,
    /// Session state after the last event.
    pub session: SessionState,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// The vectorisable roundings give `half`'s bits for every `f32` there is: zeros,
    /// subnormals, ties, the overflow edge, infinities and NaN payloads.
    #[test]
    fn state_roundings_equal_half_on_every_f32() {
        let differ = |round: fn(f32) -> f32, reference: fn(f32) -> f32| -> Option<u32> {
            (0..=u16::MAX).into_par_iter().find_map_any(|high| {
                (0..=u16::MAX).map(|low| (u32::from(high) << 16) | u32::from(low)).find(|&bits| {
                    let v = f32::from_bits(bits);
                    round(v).to_bits() != reference(v).to_bits()
                })
            })
        };
        assert_eq!(differ(round_f16, |v| half::f16::from_f32(v).to_f32()), None, "f16");
        assert_eq!(differ(round_bf16, |v| half::bf16::from_f32(v).to_f32()), None, "bf16");
    }
}
