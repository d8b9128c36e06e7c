//! Configuration of `intentflow run`: a TOML file, command-line flags over it (`args`), and
//! checks.
//!
//! Plain data with units in the names, `deny_unknown_fields` so a typo is an error, and
//! cross-field checks in [`RunConfig::validate`]. The reference is `docs/config.md`.

mod args;

pub use args::{KafkaArgs, RunArgs};

use intentflow_model::DeviceKind;

/// Users whose hidden states a GPU operator keeps resident by default: 160 MiB of device memory
/// for the default model's 40 hidden units.
pub const DEFAULT_GPU_RESIDENT_USERS: usize = 1 << 20;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Everything `intentflow run` needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Input topics (co-partitioned by user id when more than one).
    pub input_topics: Vec<String>,
    /// Output topic of scored intents.
    pub output_topic: String,
    /// Dead-letter topic: every record that cannot be decoded or validated goes here with its
    /// original bytes and headers naming the reason and the source position.
    pub dlq_topic: String,
    /// Consumer group id; instances with the same group share the partitions.
    pub group: String,
    /// Directory of the RocksDB state store.
    pub state_dir: PathBuf,
    /// Directory of the trained model (`model.safetensors`, `model.json`).
    pub model_dir: PathBuf,
    /// Device of the GRU.
    pub device: DeviceKind,
    /// What to do when a partition's committed offset no longer exists (deleted by retention).
    pub offset_reset: OffsetReset,
    /// Exactly-once (Kafka transactions) or at-least-once.
    pub processing_guarantee: ProcessingGuarantee,
    /// Compacted changelog topic backing the state store; empty means `<group>-changelog`.
    pub changelog_topic: String,
    /// This instance's stable id, the suffix of its transactional id; empty means the id kept
    /// in the state directory (created on first start).
    pub instance_id: String,
    /// Kafka transaction timeout: how long a crashed instance's open transaction can hold back
    /// `read_committed` readers before the broker aborts it.
    pub transaction_timeout_ms: u64,
    /// Before going live, build the states from history starting at this time (RFC 3339) or
    /// `earliest`, with `intentflow replay`, and adopt them; empty: no bootstrap. Skipped when
    /// the state directory is already live.
    pub bootstrap_from: String,
    /// With `bootstrap_from`: also send the history's intents to this topic (a backfill
    /// topic); empty: the history's intents are not emitted.
    pub bootstrap_output_topic: String,
    /// Start every user from zero when the state directory was built by another model
    /// (otherwise the operator refuses to start).
    pub reset_state_on_model_change: bool,
    /// Whether each intent carries the signals that raised its score most (`reasons`,
    /// `docs/schemas.md`); off by default.
    pub reasons: bool,
    /// Most records per micro-batch (a batch is what has arrived, up to this many).
    pub max_batch_records: usize,
    /// Most waves (batched model steps) per micro-batch: a user with more events in a batch
    /// has the rest deferred to the next one, so one hot user cannot turn a batch into
    /// thousands of one-row steps. 0: no cap.
    pub max_waves_per_batch: usize,
    /// How often results are committed; under exactly-once one transaction spans the batches of
    /// this interval. 0 commits after every batch.
    pub commit_interval_ms: u64,
    /// Memory for user states in MiB: a quarter is RocksDB's block cache, three quarters the
    /// in-process cache of recently written states (memtables, up to 2 × 64 MiB, come on top).
    pub state_cache_mib: usize,
    /// With `device = "cuda"`: users whose hidden states stay resident on the GPU (least
    /// recently used out first; RocksDB stays the record); 0 sends every wave's states up and
    /// down instead.
    pub gpu_resident_users: usize,
    /// Address of the `/metrics`, `/health`, `/livez` and `/readyz` endpoints; empty to disable.
    pub metrics_addr: String,
    /// How long the batch loop may stay in one batch, commit or restore report before `/livez`
    /// answers 503 (waiting for records never fails it).
    pub liveness_timeout_ms: u64,
    /// Largest accepted input record in bytes.
    pub max_record_bytes: usize,
    /// With several input topics: how long a partition's records wait for a co-partitioned topic
    /// that has no record buffered but is not known to be at its end, before they are processed
    /// anyway (Kafka Streams' `max.task.idle.ms`). Records of one partition are processed in
    /// timestamp order across its topics (ties: topic order, then offset), the order a replay
    /// uses.
    pub max_task_idle_ms: u64,
    /// librdkafka properties: `common` for every client (security), then `consumer` / `producer`.
    pub kafka: KafkaOverrides,
}

/// librdkafka properties passed through as they are (see librdkafka's CONFIGURATION.md).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaOverrides {
    /// Properties of every client: admin, metadata, consumers and producers of every command,
    /// e.g. `"security.protocol" = "SASL_SSL"`, `"sasl.mechanism" = "SCRAM-SHA-512"`.
    pub common: BTreeMap<String, String>,
    /// Consumer properties, e.g. `"fetch.max.bytes" = "52428800"`.
    pub consumer: BTreeMap<String, String>,
    /// Producer properties, e.g. `"compression.type" = "lz4"`.
    pub producer: BTreeMap<String, String>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            brokers: "127.0.0.1:9092".into(),
            input_topics: vec!["events".into()],
            output_topic: "intents".into(),
            dlq_topic: "intentflow-dlq".into(),
            group: "intentflow".into(),
            state_dir: PathBuf::from("./intentflow-state"),
            model_dir: PathBuf::from("./intentflow-model"),
            device: DeviceKind::Cpu,
            offset_reset: OffsetReset::Earliest,
            processing_guarantee: ProcessingGuarantee::ExactlyOnce,
            changelog_topic: String::new(),
            instance_id: String::new(),
            transaction_timeout_ms: 30_000,
            reset_state_on_model_change: false,
            reasons: false,
            bootstrap_from: String::new(),
            bootstrap_output_topic: String::new(),
            max_batch_records: 4096,
            max_waves_per_batch: 64,
            commit_interval_ms: 100,
            state_cache_mib: 256,
            gpu_resident_users: DEFAULT_GPU_RESIDENT_USERS,
            metrics_addr: "127.0.0.1:9464".into(),
            liveness_timeout_ms: 60_000,
            max_record_bytes: 64 * 1024,
            max_task_idle_ms: 1_000,
            kafka: KafkaOverrides::default(),
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML file is malformed or has unknown keys.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        source: toml::de::Error,
    },
    /// A value or a combination of values is invalid.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Delivery guarantee of the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ProcessingGuarantee {
    /// The intents, dead letters, changelog records and input offsets of each commit interval
    /// are one Kafka transaction: read with `read_committed`, every valid input has exactly one
    /// intent.
    #[value(name = "exactly_once")]
    ExactlyOnce,
    /// No transactions: after a crash the outputs since the last commit may repeat (with equal scores);
    /// states still apply every event once.
    #[value(name = "at_least_once")]
    AtLeastOnce,
}

/// Policy for a committed offset that retention has deleted (or a group without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    /// Resume at the oldest record still kept.
    Earliest,
    /// Resume at the end, skipping everything retained.
    Latest,
    /// Stop the operator with an error.
    Fail,
}

impl OffsetReset {
    /// The librdkafka `auto.offset.reset` value.
    pub fn librdkafka(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
            OffsetReset::Fail => "error",
        }
    }
}

/// Parses `cpu` or `cuda`.
///
/// # Errors
///
/// A message naming the accepted values.
pub fn parse_device(s: &str) -> Result<DeviceKind, String> {
    match s {
        "cpu" => Ok(DeviceKind::Cpu),
        "cuda" => Ok(DeviceKind::Cuda),
        other => Err(format!("unknown device `{other}` (cpu or cuda)")),
    }
}

impl RunConfig {
    /// Reads a TOML file; absent keys keep their defaults.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Read`] and [`ConfigError::Parse`].
    pub fn from_file(path: &Path) -> Result<RunConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
    }

    /// Cross-field checks.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.brokers.trim().is_empty() {
            return bad("brokers must not be empty".into());
        }
        if self.input_topics.is_empty() || self.input_topics.iter().any(|t| t.trim().is_empty()) {
            return bad("at least one non-empty input topic is needed".into());
        }
        if self.input_topics.contains(&self.output_topic) {
            return bad(format!("output topic `{}` is also an input topic: scores would feed back", self.output_topic));
        }
        if self.input_topics.contains(&self.dlq_topic) || self.dlq_topic == self.output_topic {
            return bad(format!("dead-letter topic `{}` must differ from the input and output topics", self.dlq_topic));
        }
        if self.output_topic.trim().is_empty() || self.dlq_topic.trim().is_empty() || self.group.trim().is_empty() {
            return bad("output topic, dead-letter topic and group must not be empty".into());
        }
        if self.liveness_timeout_ms == 0 {
            return bad("liveness_timeout_ms must be at least 1".into());
        }
        if self.max_batch_records == 0 {
            return bad("max_batch_records must be at least 1".into());
        }
        if self.commit_interval_ms > 10_000 {
            return bad(format!("commit_interval_ms = {} exceeds 10 s: scores would lag", self.commit_interval_ms));
        }
        let changelog = self.changelog();
        if self.input_topics.contains(&changelog) || [&self.output_topic, &self.dlq_topic].contains(&&changelog) {
            return bad(format!("changelog topic `{changelog}` must differ from the input, output and dead-letter topics"));
        }
        if !(1_000..=900_000).contains(&self.transaction_timeout_ms) || self.transaction_timeout_ms < 10 * self.commit_interval_ms {
            return bad(format!(
                "transaction_timeout_ms = {} must be within 1 s..15 min and at least 10 × commit_interval_ms",
                self.transaction_timeout_ms
            ));
        }
        if self.state_cache_mib > 1 << 20 {
            return bad(format!("state_cache_mib = {} is over 1 TiB", self.state_cache_mib));
        }
        if self.gpu_resident_users >= u32::MAX as usize {
            return bad(format!("gpu_resident_users = {} is over 2^32 - 1", self.gpu_resident_users));
        }
        if let Some(strategy) = self.kafka.consumer.get("partition.assignment.strategy").filter(|s| s.contains("cooperative")) {
            return bad(format!("partition.assignment.strategy = {strategy}: only eager assignors (range, roundrobin) are supported"));
        }
        if !self.instance_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return bad(format!("instance_id `{}` may hold only letters, digits, '-', '_' and '.'", self.instance_id));
        }
        if self.max_record_bytes < 64 {
            return bad("max_record_bytes must be at least 64".into());
        }
        if self.max_task_idle_ms > 600_000 {
            return bad(format!("max_task_idle_ms = {} exceeds 10 minutes", self.max_task_idle_ms));
        }
        self.metrics_socket()?;
        Ok(())
    }

    /// The Kafka clients of this configuration.
    pub fn clients(&self) -> crate::kafka::KafkaClients {
        crate::kafka::KafkaClients {
            brokers: self.brokers.clone(),
            common: self.kafka.common.clone(),
            consumer: self.kafka.consumer.clone(),
            producer: self.kafka.producer.clone(),
        }
    }

    /// The validation limits of input records.
    pub fn limits(&self) -> intentflow_schemas::Limits {
        intentflow_schemas::Limits { max_record_bytes: self.max_record_bytes, ..intentflow_schemas::Limits::default() }
    }

    /// The changelog topic: `changelog_topic`, or `<group>-changelog` when empty.
    pub fn changelog(&self) -> String {
        if self.changelog_topic.is_empty() {
            format!("{}-changelog", self.group)
        } else {
            self.changelog_topic.clone()
        }
    }

    /// The metrics address, or `None` when disabled.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for an unparseable address.
    pub fn metrics_socket(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.metrics_addr.trim().is_empty() {
            return Ok(None);
        }
        self.metrics_addr
            .parse()
            .map(Some)
            .map_err(|e| ConfigError::Invalid(format!("metrics_addr `{}`: {e}", self.metrics_addr)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(
            &path,
            "brokers = \"k1:9092\"\ninput_topics = [\"a\", \"b\"]\ngroup = \"g\"\n[kafka.consumer]\n\"fetch.max.bytes\" = \"1048576\"\n",
        )
        .unwrap();
        let args = RunArgs { config: Some(path), group: Some("g2".into()), ..Default::default() };
        let cfg = RunConfig::resolve(&args).unwrap();
        assert_eq!(cfg.brokers, "k1:9092");
        assert_eq!(cfg.input_topics, ["a", "b"]);
        assert_eq!(cfg.group, "g2");
        assert_eq!(cfg.output_topic, "intents");
        assert_eq!(cfg.kafka.consumer["fetch.max.bytes"], "1048576");
    }

    #[test]
    fn rejects_unknown_keys_and_feedback_loops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "brokerz = \"x\"\n").unwrap();
        let err = RunConfig::resolve(&RunArgs { config: Some(path), ..Default::default() }).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        let args = RunArgs { input_topics: vec!["intents".into()], ..Default::default() };
        assert!(RunConfig::resolve(&args).unwrap_err().to_string().contains("feed back"));
        let args = RunArgs { dlq_topic: Some("events".into()), ..Default::default() };
        assert!(RunConfig::resolve(&args).unwrap_err().to_string().contains("dead-letter topic `events`"));
        let args = RunArgs { changelog_topic: Some("intents".into()), ..Default::default() };
        assert!(RunConfig::resolve(&args).unwrap_err().to_string().contains("changelog topic `intents`"));
        let args = RunArgs { group: Some("shop".into()), ..Default::default() };
        let cfg = RunConfig::resolve(&args).unwrap();
        assert_eq!((cfg.changelog(), cfg.processing_guarantee), ("shop-changelog".to_string(), ProcessingGuarantee::ExactlyOnce));
        let args = RunArgs { commit_interval_ms: Some(5_000), ..Default::default() };
        assert!(RunConfig::resolve(&args).unwrap_err().to_string().contains("10 × commit_interval_ms"));
    }
}
