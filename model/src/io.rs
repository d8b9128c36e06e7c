//! Model directories: `model.safetensors` (weights) and `model.json` (metadata).

use crate::baseline::Baselines;
use crate::train::{Trained, TrainingSummary};
use crate::{Calibration, Cell, FeatureSpec, GruParams, IntentModel, ModelError, StatePrecision};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// Weights file name inside a model directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// Metadata file name inside a model directory.
pub const META_FILE: &str = "model.json";
/// Sub-directory of a model directory that holds the cells trained beside the served one
/// (`candidates/lstm/`, …), each a model directory of its own.
pub const CANDIDATES_DIR: &str = "candidates";
/// Version of the `model.json` layout (2 added embeddings, calibration and baselines).
const META_FORMAT: u32 = 2;

/// Contents of `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// Layout version of this file.
    pub format: u32,
    /// The cell's name (`gru-`, `lstm-`) + the first 12 hex digits of SHA-256 over the weights
    /// file, the feature spec, the calibration and (when not f32) the state precision.
    pub version: String,
    /// The recurrent cell (absent: a GRU, as every model before LSTMs).
    #[serde(default)]
    pub cell: Cell,
    /// Input size D of the cell (dense features plus embedding widths).
    pub input_dim: usize,
    /// Hidden size H of the cell.
    pub hidden_dim: usize,
    /// Feature contract.
    pub features: FeatureSpec,
    /// Calibration applied to the GRU's probability before it is emitted.
    #[serde(default)]
    pub calibration: Calibration,
    /// Decision threshold on the calibrated score (F1-maximising on validation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Baselines and ensemble fitted with the model, for `intentflow eval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baselines: Option<Baselines>,
    /// Training record, if the model was trained by this project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingSummary>,
    /// Precision of the hidden states between steps (absent: f32).
    #[serde(default, skip_serializing_if = "StatePrecision::is_f32")]
    pub state_precision: StatePrecision,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.to_path_buf(), source }
}

fn content_version(weights: &[u8], meta: &ModelMeta) -> Result<String, ModelError> {
    let mut hasher = Sha256::new();
    hasher.update(weights);
    hasher.update(serde_json::to_vec(&meta.features)?);
    hasher.update(serde_json::to_vec(&meta.calibration)?);
    // Rounded states make other states and scores: another model. (f32 adds nothing, so the
    // versions of models from before this setting stay what they were.)
    if !meta.state_precision.is_f32() {
        hasher.update(serde_json::to_vec(&meta.state_precision)?);
    }
    let digest = hasher.finalize();
    // The weights' shapes tell the cell, so the hash already differs; the prefix says it.
    Ok(format!("{}-{}", meta.cell, digest.iter().take(6).map(|b| format!("{b:02x}")).collect::<String>()))
}

/// The model directories of the cells trained beside the model in `dir` (see
/// [`CANDIDATES_DIR`]), by name; empty when there are none.
pub fn candidate_dirs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<std::path::PathBuf> = std::fs::read_dir(dir.join(CANDIDATES_DIR))
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.join(META_FILE).is_file()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs
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
            return Err(ModelError::Invalid(format!(
                "model.json format {} (this build reads {META_FORMAT}); retrain with `intentflow train`",
                meta.format
            )));
        }
        let bytes = std::fs::read(&weights_path).map_err(io_err(&weights_path))?;
        let expected = content_version(&bytes, &meta)?;
        if expected != meta.version {
            return Err(ModelError::Invalid(format!(
                "model.json says version {} but the files hash to {expected}; the directory was edited or mixed",
                meta.version
            )));
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        let params = GruParams::from_state_dict(tensors).map_err(|e| ModelError::Invalid(format!("{MODEL_FILE}: {e}")))?;
        IntentModel::new(params, meta, device.clone())
    }

    /// Writes `params` with `features` and `calibration` to `dir` as a model directory,
    /// computing the version. Use [`Trained::save`] for a model fresh from training.
    ///
    /// # Errors
    ///
    /// I/O and candle errors.
    pub fn save(dir: &Path, params: &GruParams, features: FeatureSpec, calibration: Calibration) -> Result<ModelMeta, ModelError> {
        save_dir(dir, params, ModelMeta {
            format: META_FORMAT,
            version: String::new(),
            cell: params.cell(),
            input_dim: params.input_dim(),
            hidden_dim: params.hidden_dim(),
            features,
            calibration,
            threshold: None,
            baselines: None,
            training: None,
            state_precision: StatePrecision::F32,
        })
    }
}

impl Trained {
    /// Writes the model, its calibration, threshold, baselines and training record to `dir`,
    /// and each of its [`candidates`](Trained::candidates) to `dir/candidates/<cell>/` (the
    /// candidates of an earlier model in `dir` are removed first).
    ///
    /// # Errors
    ///
    /// I/O and candle errors.
    pub fn save(&self, dir: &Path) -> Result<ModelMeta, ModelError> {
        let candidates = dir.join(CANDIDATES_DIR);
        if candidates.exists() {
            std::fs::remove_dir_all(&candidates).map_err(io_err(&candidates))?;
        }
        for candidate in &self.candidates {
            candidate.save(&candidates.join(candidate.params.cell().name()))?;
        }
        save_dir(dir, &self.params, ModelMeta {
            format: META_FORMAT,
            version: String::new(),
            cell: self.params.cell(),
            input_dim: self.params.input_dim(),
            hidden_dim: self.params.hidden_dim(),
            features: self.features.clone(),
            calibration: self.calibration.clone(),
            threshold: Some(self.threshold),
            baselines: Some(self.baselines.clone()),
            training: Some(self.summary.clone()),
            state_precision: self.state_precision,
        })
    }
}

/// Writes the weights, then `meta` with its version computed from them.
fn save_dir(dir: &Path, params: &GruParams, mut meta: ModelMeta) -> Result<ModelMeta, ModelError> {
    params.validate().map_err(ModelError::Invalid)?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tensors: HashMap<&str, Tensor> = params
        .state_dict()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
        .collect::<Result<_, candle_core::Error>>()?;
    let weights_path = dir.join(MODEL_FILE);
    candle_core::safetensors::save(&tensors, &weights_path)?;
    let bytes = std::fs::read(&weights_path).map_err(io_err(&weights_path))?;
    meta.version = content_version(&bytes, &meta)?;
    let meta_path = dir.join(META_FILE);
    std::fs::write(&meta_path, serde_json::to_vec_pretty(&meta)?).map_err(io_err(&meta_path))?;
    Ok(meta)
}
