//! Model updates without a restart (`model_reload = "reset"`).
//!
//! [`watch`] starts a task that looks at `model_dir` every `model_watch_ms`, and at once on
//! SIGHUP. When the directory's files have changed (names, sizes, modification times) and then
//! stay unchanged for [`SETTLE`] (a trainer may still be writing them), the task loads the model
//! and checks it ([`check`]) in the background, while the batch loop goes on with the model it
//! serves. A model that does not load, scores a probe clickstream outside `[0, 1]` or is the
//! version already served is not switched to: it is logged (and counted in
//! `intentflow_model_reloads_total{result="rejected"}`), and the files are looked at again only
//! once they change again. A good one is built into an operator like the first ([`Serving::new`])
//! and handed to the loop, which commits its open unit, serves the new model from the next batch
//! on and records it as the store's model. No event is lost or scored twice across the switch:
//! it happens between two commits, each of them exactly-once as always.
//!
//! Every intent names the model that scored it (`model_version`, and the `intentflow.model`
//! header with `output_headers`). States are migrated lazily
//! ([`intentflow_state::changelog::ModelPolicy::Migrate`]): a state of an earlier model has its
//! hidden vector restarted from zero at its user's next event; its session counters, fences and
//! output memories go on. Rolling a model forward with a warm state for every user instead is the
//! replay-based blue/green procedure of `docs/replay.md`.
//!
//! With `model_reload = "off"` a SIGHUP is logged and otherwise ignored (rather than ending the
//! process, which is what SIGHUP does by default).

use super::startup::Serving;
use crate::config::{ModelReload, RunConfig};
use anyhow::{bail, Context, Result};
use intentflow_model::{Device, IntentModel};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// How long a changed model directory must stay unchanged before it is loaded.
pub const SETTLE: Duration = Duration::from_millis(500);

/// Each file of a directory: name, size, modification time.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut files: Fingerprint = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            meta.is_file().then(|| (e.file_name().into(), meta.len(), meta.modified().ok()))
        })
        .collect();
    files.sort();
    files
}

/// Starts the watcher of `cfg.model_dir` (on `device`, serving `served` now). The receiver
/// yields each checked new model, ready to serve; it never yields with `model_reload = "off"`.
///
/// # Errors
///
/// If the SIGHUP handler cannot be installed.
pub fn watch(cfg: &RunConfig, device: Device, served: &str) -> Result<mpsc::Receiver<Serving>> {
    let (tx, rx) = mpsc::channel(1);
    let mut hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let (cfg, mut served) = (cfg.clone(), served.to_string());
    tokio::spawn(async move {
        let every = (cfg.model_reload == ModelReload::Reset && cfg.model_watch_ms > 0).then(|| Duration::from_millis(cfg.model_watch_ms));
        let mut known = fingerprint(&cfg.model_dir);
        loop {
            let hangup = tokio::select! {
                h = hangups.recv() => h.is_some(),
                () = async {
                    match every {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                } => false,
            };
            if cfg.model_reload == ModelReload::Off {
                tracing::warn!("SIGHUP received: ignored, model_reload is off (docs/model-updates.md)");
                continue;
            }
            let now = fingerprint(&cfg.model_dir);
            if now == known && !hangup {
                continue;
            }
            tokio::time::sleep(SETTLE).await;
            if fingerprint(&cfg.model_dir) != now {
                // Still being written: the next look tries again.
                continue;
            }
            known = now;
            let (dir, dev, current) = (cfg.model_dir.clone(), device.clone(), served.clone());
            let began = std::time::Instant::now();
            let checked = tokio::task::spawn_blocking(move || check(&dir, &dev, &current)).await;
            let serving = match checked {
                Ok(Ok(Some(model))) => Serving::new(&cfg, model),
                Ok(Ok(None)) => {
                    tracing::info!(model = %served, hangup, "model_dir holds the model already served: nothing to switch to");
                    continue;
                }
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::anyhow!("the model check panicked: {e}")),
            };
            match serving {
                Ok(s) => {
                    tracing::info!(model = s.version(), served = %served, seconds = began.elapsed().as_secs_f64(), "new model loaded and checked: switching at the next commit");
                    served = s.version().to_string();
                    if tx.send(s).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    crate::telemetry::model_reloads("rejected").increment(1);
                    tracing::error!(dir = %cfg.model_dir.display(), served = %served, error = format!("{e:#}"), "the model in model_dir is rejected; the served model goes on");
                }
            }
        }
    });
    Ok(rx)
}

/// Loads the model in `dir` on `device` and checks that it can serve: `None` when it is the
/// version `served` already; an error when it does not load or when its scores of a probe
/// clickstream (generated, 32 users) are not probabilities.
///
/// # Errors
///
/// What is wrong with the model.
pub fn check(dir: &Path, device: &Device, served: &str) -> Result<Option<IntentModel>> {
    let model = IntentModel::load(dir, device).with_context(|| format!("loading the model in {}", dir.display()))?;
    if model.version() == served {
        return Ok(None);
    }
    let probe = intentflow_formats::generate::generate(&intentflow_formats::generate::GeneratorConfig { users: 32, events: 640, seed: 7, ..Default::default() });
    let mut by_user: std::collections::BTreeMap<&str, Vec<&intentflow_schemas::Event>> = std::collections::BTreeMap::new();
    for g in &probe {
        by_user.entry(g.event.user_id.as_str()).or_default().push(&g.event);
    }
    for (user, events) in by_user {
        let scores = model.score_sequence(events).with_context(|| format!("model {} fails to score the probe clickstream", model.version()))?.scores;
        if let Some(bad) = scores.iter().find(|s| !(0.0..=1.0).contains(*s)) {
            bail!("model {} scores the probe user {user} with {bad}, not a probability", model.version());
        }
    }
    Ok(Some(model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_file_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let before = fingerprint(dir.path());
        assert!(before.is_empty());
        std::fs::write(dir.path().join("model.json"), "{}").unwrap();
        let one = fingerprint(dir.path());
        assert_eq!(one.len(), 1);
        std::fs::write(dir.path().join("model.json"), "{ }").unwrap();
        assert_ne!(fingerprint(dir.path()), one, "a new size");
        assert!(fingerprint(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn a_directory_without_a_model_is_rejected_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.json"), "{ half written").unwrap();
        let err = check(dir.path(), &Device::Cpu, "v1").unwrap_err();
        assert!(format!("{err:#}").contains("loading the model in"), "{err:#}");
    }
}
