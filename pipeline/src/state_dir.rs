//! The life of a state directory, owned in one place.
//!
//! A state directory holds the RocksDB store of user states and a few marker files that say
//! what the directory is and may become:
//!
//! * `INSTANCE_ID` — written by the first `intentflow run`: the directory is a live operator's
//!   (its transactional id and static group membership derive from it). A replay refuses it.
//! * `REPLAY` — written by `intentflow replay`: `model <version>`, `source topics|files`, and
//!   `status running` from its first written batch until the store is flushed, `status complete`
//!   after. An unfinished
//!   replay is refused by a new replay and by `run`; a complete one is handed over by `run`
//!   (see `runtime::handover`), which renames it `ADOPTED`.
//!
//! [`StateDir::adopt_model`] decides, for the whole store, whether its states may continue under
//! the loaded model; each user's state is checked again when it is loaded or restored.

use anyhow::{bail, Context, Result};
use intentflow_state::changelog::{check_model, ModelCheck, ModelPolicy};
use intentflow_state::{StateStore, StoreOptions};
use std::path::{Path, PathBuf};

const INSTANCE_ID: &str = "INSTANCE_ID";
const REPLAY: &str = "REPLAY";
const ADOPTED: &str = "ADOPTED";

/// What a replay read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplaySource {
    /// Kafka topics: users keyed by input partition, as the live operator keys them.
    Topics,
    /// Event files: every user on partition 0.
    Files,
}

/// What a replay marker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayStatus {
    /// The replay is writing (or crashed while writing): the states are partial.
    Running,
    /// The replay finished and flushed its store.
    Complete,
}

/// A state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// The state directory at `path` (it need not exist yet).
    pub fn new(path: &Path) -> StateDir {
        StateDir { path: path.to_path_buf() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens (creating if needed) the RocksDB store.
    ///
    /// # Errors
    ///
    /// If RocksDB cannot open it, for instance because another process holds it.
    pub fn open_store(&self, options: StoreOptions) -> Result<StateStore> {
        std::fs::create_dir_all(&self.path).with_context(|| format!("creating {}", self.path.display()))?;
        StateStore::open(&self.path, options).with_context(|| format!("opening state store {}", self.path.display()))
    }

    /// Whether a live operator has used this directory.
    pub fn is_live(&self) -> bool {
        self.path.join(INSTANCE_ID).exists()
    }

    /// This instance's stable id: `configured` if not empty, otherwise the one kept in the
    /// directory (created on first start), so that a restarted instance reuses its
    /// transactional id and its first `init_transactions` aborts whatever its previous life left
    /// open.
    ///
    /// # Errors
    ///
    /// If the id file cannot be written.
    pub fn instance_id(&self, configured: &str) -> Result<String> {
        if !configured.is_empty() {
            return Ok(configured.to_string());
        }
        let path = self.path.join(INSTANCE_ID);
        if let Ok(id) = std::fs::read_to_string(&path) {
            return Ok(id.trim().to_string());
        }
        std::fs::create_dir_all(&self.path).with_context(|| format!("creating {}", self.path.display()))?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        let id = format!("{:012x}", (nanos ^ (u128::from(std::process::id()) << 40)) & 0xffff_ffff_ffff);
        std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
        Ok(id)
    }

    /// What the replay marker says, or `None` without one. (Markers written before the status
    /// line existed count as complete.)
    ///
    /// # Errors
    ///
    /// If the marker cannot be read.
    pub fn replay_status(&self) -> Result<Option<ReplayStatus>> {
        Ok(self.replay_marker_says("status running")?.map(|running| if running { ReplayStatus::Running } else { ReplayStatus::Complete }))
    }

    /// What the replay marker says the replay read (topics for markers without the line).
    ///
    /// # Errors
    ///
    /// If the marker cannot be read.
    pub fn replay_source(&self) -> Result<Option<ReplaySource>> {
        Ok(self.replay_marker_says("source files")?.map(|files| if files { ReplaySource::Files } else { ReplaySource::Topics }))
    }

    /// Whether the replay marker has the line `line`; `None` without a marker.
    fn replay_marker_says(&self, line: &str) -> Result<Option<bool>> {
        let path = self.path.join(REPLAY);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Some(text.lines().any(|l| l.trim() == line)))
    }

    /// Writes the replay marker.
    ///
    /// # Errors
    ///
    /// If it cannot be written.
    pub fn mark_replay(&self, model: &str, source: ReplaySource, status: ReplayStatus) -> Result<()> {
        let path = self.path.join(REPLAY);
        let status = match status {
            ReplayStatus::Running => "running",
            ReplayStatus::Complete => "complete",
        };
        // Once a directory holds a file replay's users (keyed by file), it stays one.
        let files = source == ReplaySource::Files || self.replay_source()? == Some(ReplaySource::Files);
        let source = if files { "files" } else { "topics" };
        std::fs::write(&path, format!("model {model}\nsource {source}\nstatus {status}\n")).with_context(|| format!("writing {}", path.display()))
    }

    /// Marks a complete replay as handed over to the live operator.
    ///
    /// # Errors
    ///
    /// If the marker cannot be renamed.
    pub fn mark_adopted(&self) -> Result<()> {
        std::fs::rename(self.path.join(REPLAY), self.path.join(ADOPTED)).with_context(|| format!("marking {} adopted", self.path.display()))
    }

    /// Refuses a directory whose replay did not finish.
    ///
    /// # Errors
    ///
    /// When the directory holds an unfinished replay, or its marker cannot be read.
    pub fn refuse_unfinished(&self) -> Result<()> {
        if self.replay_status()? == Some(ReplayStatus::Running) {
            bail!(
                "{} holds a replay that did not finish (its states are partial and, written without a write-ahead log, \
                 may not even match its offsets); replay again into a fresh --state-dir",
                self.path.display()
            );
        }
        Ok(())
    }

    /// Refuses what a replay must not write into: a live operator's directory or an unfinished
    /// replay.
    ///
    /// # Errors
    ///
    /// As said.
    pub fn refuse_for_replay(&self) -> Result<()> {
        if self.is_live() {
            bail!("{} is a live operator's state directory; a replay needs its own", self.path.display());
        }
        self.refuse_unfinished()
    }

    /// Decides whether the states of `store` may continue under the loaded model: a store
    /// without a recorded model takes it; another model's states are refused, or (under
    /// [`ModelPolicy::Reset`]) dropped so that every user starts from zero, or (under
    /// [`ModelPolicy::Migrate`]) kept for the operator to migrate user by user. Records the
    /// loaded model as the store's.
    ///
    /// # Errors
    ///
    /// A store built by another model under [`ModelPolicy::Refuse`], and RocksDB errors.
    pub fn adopt_model(store: &StateStore, loaded: &str, policy: ModelPolicy) -> Result<()> {
        match check_model(store.model_version()?.as_deref(), loaded, policy != ModelPolicy::Refuse) {
            ModelCheck::Same => return Ok(()),
            ModelCheck::Fresh => {}
            ModelCheck::Reset { previous } if policy == ModelPolicy::Migrate => {
                tracing::info!(previous = %previous, loaded, "the state was built by another model: each user's hidden vector restarts from zero at its next event (model_reload)");
            }
            ModelCheck::Reset { previous } => {
                tracing::warn!(previous = %previous, loaded, "the state was built by another model: every user starts from zero");
                store.clear_users()?;
            }
            ModelCheck::Refuse { previous } => bail!(
                "the state directory was built by model {previous}, the loaded model is {loaded}: hidden states of one model mean nothing to \
                 another. Replay history into a fresh state directory with the new model (`intentflow replay`, docs/replay.md), or pass \
                 --reset-state-on-model-change to start every user from zero"
            ),
        }
        store.set_model_version(loaded)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unfinished_replay_is_refused_and_a_finished_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(dir.path());
        assert_eq!(sd.replay_status().unwrap(), None);
        sd.refuse_unfinished().unwrap();
        sd.mark_replay("abc", ReplaySource::Files, ReplayStatus::Running).unwrap();
        assert_eq!(sd.replay_status().unwrap(), Some(ReplayStatus::Running));
        let err = sd.refuse_for_replay().unwrap_err().to_string();
        assert!(err.contains("did not finish") && err.contains("fresh --state-dir"), "{err}");
        sd.mark_replay("abc", ReplaySource::Files, ReplayStatus::Complete).unwrap();
        sd.refuse_unfinished().unwrap();
        assert_eq!(sd.replay_source().unwrap(), Some(ReplaySource::Files));
        sd.mark_replay("abc", ReplaySource::Topics, ReplayStatus::Complete).unwrap();
        assert_eq!(sd.replay_source().unwrap(), Some(ReplaySource::Files), "a topic replay on top does not re-key the file replay's users");
        std::fs::write(dir.path().join(REPLAY), "model abc\n").unwrap();
        assert_eq!(sd.replay_status().unwrap(), Some(ReplayStatus::Complete), "markers from before the status line");
        assert_eq!(sd.replay_source().unwrap(), Some(ReplaySource::Topics), "markers from before the source line");
        sd.mark_adopted().unwrap();
        assert_eq!(sd.replay_status().unwrap(), None);
    }

    #[test]
    fn a_live_directory_keeps_its_instance_id_and_refuses_replays() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::new(&dir.path().join("state"));
        assert!(!sd.is_live());
        let id = sd.instance_id("").unwrap();
        assert_eq!(sd.instance_id("").unwrap(), id);
        assert_eq!(sd.instance_id("pod-3").unwrap(), "pod-3");
        assert!(sd.is_live());
        assert!(sd.refuse_for_replay().unwrap_err().to_string().contains("live operator"));
    }

    #[test]
    fn a_store_continues_only_under_its_model() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateDir::new(dir.path()).open_store(StoreOptions::default()).unwrap();
        let s = intentflow_state::UserState { model_version: "a".into(), ..Default::default() };
        store.commit([(0, "u", &s)], [], []).unwrap();
        StateDir::adopt_model(&store, "a", ModelPolicy::Refuse).unwrap();
        let err = StateDir::adopt_model(&store, "b", ModelPolicy::Refuse).unwrap_err().to_string();
        assert!(err.contains("built by model a") && err.contains("reset-state-on-model-change"), "{err}");
        StateDir::adopt_model(&store, "c", ModelPolicy::Migrate).unwrap();
        assert_eq!((store.model_version().unwrap().as_deref(), store.users().unwrap().len()), (Some("c"), 1), "migrated states are kept");
        StateDir::adopt_model(&store, "b", ModelPolicy::Reset).unwrap();
        assert!(store.users().unwrap().is_empty(), "reset states are dropped");
        assert!(store.users().unwrap().is_empty());
        assert_eq!(store.model_version().unwrap().as_deref(), Some("b"));
    }
}
