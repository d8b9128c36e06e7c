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

/// How many times in a row a changing directory is waited for before the look is given up
/// (the next one tries again).
const SETTLE_TRIES: u32 = 20;

/// Each file of a directory, symbolic links followed (a Kubernetes ConfigMap or projected
/// volume is links to links): name, where it leads, size, modification time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint(Vec<(PathBuf, Option<PathBuf>, u64, Option<SystemTime>)>);

impl Fingerprint {
    /// The fingerprint of `dir` now (empty when it cannot be read).
    pub fn of(dir: &Path) -> Fingerprint {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let meta = std::fs::metadata(e.path()).ok()?;
                let target = std::fs::canonicalize(e.path()).ok();
                meta.is_file().then(|| (e.file_name().into(), target, meta.len(), meta.modified().ok()))
            })
            .collect();
        files.sort();
        Fingerprint(files)
    }
}

/// The watcher's inputs taken before the model is loaded at start-up, so that nothing written
/// or signalled while the operator starts is missed: the model directory's fingerprint and the
/// SIGHUP stream (installed now: SIGHUP would otherwise end the process).
pub struct Before {
    fingerprint: Fingerprint,
    hangups: tokio::signal::unix::Signal,
}

impl Before {
    /// Takes them for `cfg`'s model directory.
    ///
    /// # Errors
    ///
    /// If the SIGHUP handler cannot be installed.
    pub fn take(cfg: &RunConfig) -> Result<Before> {
        let hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        Ok(Before { fingerprint: Fingerprint::of(&cfg.model_dir), hangups })
    }
}

/// Starts the watcher of `cfg.model_dir` (on `device`, serving `served` now, loaded after
/// `before` was taken). The receiver yields each checked new model, ready to serve; it never
/// yields with `model_reload = "off"`.
pub fn watch(cfg: &RunConfig, before: Before, device: Device, served: &str) -> mpsc::Receiver<Serving> {
    let (tx, rx) = mpsc::channel(1);
    let Before { fingerprint: mut known, mut hangups } = before;
    let (cfg, mut served) = (cfg.clone(), served.to_string());
    tokio::spawn(async move {
        let every = (cfg.model_reload == ModelReload::Reset && cfg.model_watch_ms > 0).then(|| Duration::from_millis(cfg.model_watch_ms));
        // A look right away: the directory may have changed while the operator started.
        let mut first = true;
        loop {
            let hangup = if std::mem::take(&mut first) {
                false
            } else {
                tokio::select! {
                    h = hangups.recv() => h.is_some(),
                    () = async {
                        match every {
                            Some(d) => tokio::time::sleep(d).await,
                            None => std::future::pending().await,
                        }
                    } => false,
                }
            };
            if cfg.model_reload == ModelReload::Off {
                if hangup {
                    tracing::warn!("SIGHUP received: ignored, model_reload is off (docs/model-updates.md)");
                }
                continue;
            }
            let mut now = Fingerprint::of(&cfg.model_dir);
            if now == known && !hangup {
                continue;
            }
            // Wait for the writer to finish: the files must stay as they are for SETTLE.
            let mut tries = 0;
            loop {
                tokio::time::sleep(SETTLE).await;
                let again = Fingerprint::of(&cfg.model_dir);
                if again == now {
                    break;
                }
                now = again;
                tries += 1;
                if tries == SETTLE_TRIES {
                    break;
                }
            }
            if tries == SETTLE_TRIES {
                tracing::warn!(dir = %cfg.model_dir.display(), "model_dir keeps changing: looked at again later");
                continue;
            }
            known = now;
            let (job_cfg, dev, current) = (cfg.clone(), device.clone(), served.clone());
            let began = std::time::Instant::now();
            // Loading, checking and building the operator (a GPU slab included) off the runtime's threads.
            let checked = tokio::task::spawn_blocking(move || check(&job_cfg.model_dir, &dev, &current).and_then(|m| m.map(|m| Serving::new(&job_cfg, m)).transpose())).await;
            let serving = match checked {
                Ok(Ok(Some(serving))) => Ok(serving),
                Ok(Ok(None)) => {
                    if hangup {
                        tracing::info!(model = %served, "model_dir holds the model already served: nothing to switch to");
                    }
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
    rx
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
        assert_eq!(Fingerprint::of(dir.path()), Fingerprint::default());
        std::fs::write(dir.path().join("model.json"), "{}").unwrap();
        let one = Fingerprint::of(dir.path());
        assert_eq!(one.0.len(), 1);
        assert_eq!(Fingerprint::of(dir.path()), one);
        std::fs::write(dir.path().join("model.json"), "{ }").unwrap();
        assert_ne!(Fingerprint::of(dir.path()), one, "a new size");
        // A link to another file of the same size and time, as a ConfigMap update makes.
        let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
        std::fs::write(&a, "1").unwrap();
        std::fs::copy(&a, &b).unwrap();
        let linked = dir.path().join("linked");
        std::fs::create_dir(&linked).unwrap();
        std::os::unix::fs::symlink(&a, linked.join("model.json")).unwrap();
        let via_a = Fingerprint::of(&linked);
        assert_eq!(via_a.0.len(), 1, "a link to a file counts as the file");
        std::fs::remove_file(linked.join("model.json")).unwrap();
        std::os::unix::fs::symlink(&b, linked.join("model.json")).unwrap();
        assert_ne!(Fingerprint::of(&linked), via_a, "the link leads elsewhere");
        assert_eq!(Fingerprint::of(&dir.path().join("missing")), Fingerprint::default());
    }

    #[test]
    fn a_directory_without_a_model_is_rejected_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.json"), "{ half written").unwrap();
        let err = check(dir.path(), &Device::Cpu, "v1").unwrap_err();
        assert!(format!("{err:#}").contains("loading the model in"), "{err:#}");
    }
}
