//! Model directories: `model.safetensors` (weights) and `model.json` (metadata).

use crate::{FeatureSpec, GruParams, IntentModel, ModelError, names};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// Weights file name inside a model directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// Metadata file name inside a model directory.
pub const META_FILE: &str = "model.json";
/// Version of the `model.json` layout.
const META_FORMAT: u32 = 1;

/// What training measured, kept with the model for the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// Seed of weight initialisation and batch order.
    pub seed: u64,
    /// Epochs run.
    pub epochs: usize,
    /// Epoch whose weights were kept (best validation log loss).
    pub best_epoch: usize,
    /// Sessions in the training split.
    pub train_sessions: usize,
    /// Sessions in the validation split (later sessions by start time).
    pub val_sessions: usize,
    /// Labelled events in the training split.
    pub train_events: usize,
    /// Share of positive labels in the training split.
    pub train_base_rate: f64,
    /// ROC-AUC on the validation split (None without both classes).
    pub val_roc_auc: Option<f64>,
    /// Mean log loss on the validation split.
    pub val_log_loss: f64,
}

/// Contents of `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// Layout version of this file.
    pub format: u32,
    /// `gru-` + the first 12 hex digits of SHA-256 over the weights file and the feature spec.
    pub version: String,
    /// GRU input size D.
    pub input_dim: usize,
    /// GRU hidden size H.
    pub hidden_dim: usize,
    /// Feature contract.
    pub features: FeatureSpec,
    /// Training record, if the model was trained by this project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingSummary>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.to_path_buf(), source }
}

fn content_version(weights: &[u8], features: &FeatureSpec) -> Result<String, ModelError> {
    let mut hasher = Sha256::new();
    hasher.update(weights);
    hasher.update(serde_json::to_vec(features)?);
    let digest = hasher.finalize();
    Ok(format!("gru-{}", digest.iter().take(6).map(|b| format!("{b:02x}")).collect::<String>()))
}

impl IntentModel {
    /// Loads the model in `dir` onto `device`.
    ///
    /// # Errors
    ///
    /// [`ModelError::Missing`] if the files are absent, [`ModelError::Invalid`] if they do not
    /// match each other, this build's features, or their recorded content hash.
    pub fn load(dir: &Path, device: &Device) -> Result<IntentModel, ModelError> {
        let weights_path = dir.join(MODEL_FILE);
        let meta_path = dir.join(META_FILE);
        if !weights_path.is_file() || !meta_path.is_file() {
            return Err(ModelError::Missing(dir.to_path_buf()));
        }
        let meta: ModelMeta = serde_json::from_slice(&std::fs::read(&meta_path).map_err(io_err(&meta_path))?)?;
        if meta.format != META_FORMAT {
            return Err(ModelError::Invalid(format!("model.json format {} (this build reads {META_FORMAT})", meta.format)));
        }
        let bytes = std::fs::read(&weights_path).map_err(io_err(&weights_path))?;
        let expected = content_version(&bytes, &meta.features)?;
        if expected != meta.version {
            return Err(ModelError::Invalid(format!(
                "model.json says version {} but the files hash to {expected}; the directory was edited or mixed",
                meta.version
            )));
        }
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        let mut take = |name: &str| {
            tensors.remove(name).ok_or_else(|| ModelError::Invalid(format!("{MODEL_FILE} has no tensor `{name}`")))
        };
        let params = GruParams {
            weight_ih: take(names::WEIGHT_IH)?,
            weight_hh: take(names::WEIGHT_HH)?,
            bias_ih: take(names::BIAS_IH)?,
            bias_hh: take(names::BIAS_HH)?,
            head_weight: take(names::HEAD_WEIGHT)?,
            head_bias: take(names::HEAD_BIAS)?,
        };
        IntentModel::new(params, meta, device.clone())
    }

    /// Writes `params` with `features` to `dir` as a model directory, computing the version.
    ///
    /// # Errors
    ///
    /// I/O and candle errors.
    pub fn save(
        dir: &Path,
        params: &GruParams,
        features: FeatureSpec,
        training: Option<TrainingSummary>,
    ) -> Result<ModelMeta, ModelError> {
        params.validate().map_err(ModelError::Invalid)?;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tensors: HashMap<&str, Tensor> = [
            (names::WEIGHT_IH, &params.weight_ih),
            (names::WEIGHT_HH, &params.weight_hh),
            (names::BIAS_IH, &params.bias_ih),
            (names::BIAS_HH, &params.bias_hh),
            (names::HEAD_WEIGHT, &params.head_weight),
            (names::HEAD_BIAS, &params.head_bias),
        ]
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
        .collect::<Result<_, candle_core::Error>>()?;
        let weights_path = dir.join(MODEL_FILE);
        candle_core::safetensors::save(&tensors, &weights_path)?;
        let bytes = std::fs::read(&weights_path).map_err(io_err(&weights_path))?;
        let meta = ModelMeta {
            format: META_FORMAT,
            version: content_version(&bytes, &features)?,
            input_dim: params.input_dim(),
            hidden_dim: params.hidden_dim(),
            features,
            training,
        };
        let meta_path = dir.join(META_FILE);
        std::fs::write(&meta_path, serde_json::to_vec_pretty(&meta)?).map_err(io_err(&meta_path))?;
        Ok(meta)
    }
}
