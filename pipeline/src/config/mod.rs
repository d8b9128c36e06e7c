//! Configuration of `intentflow run` (and of every command that talks to Kafka): layers of
//! defaults, a TOML file, the environment and command-line flags ([`layers`], flags in
//! [`args`]), and checks.
//!
//! Plain data with units in the names, `deny_unknown_fields` so a typo is an error, and
//! cross-field checks in [`RunConfig::validate`]. Secrets are redacted wherever a configuration
//! is shown. The reference is `docs/configuration.md`, tested against [`RunConfig::default`].

mod args;
pub mod layers;
mod outputs;

pub use args::{KafkaArgs, RunArgs};
pub use outputs::{OutputConfig, PolicyKind};
pub use layers::Environment;

use intentflow_model::DeviceKind;
use intentflow_schemas::IntentSchema;

/// Users whose hidden states a GPU operator keeps resident by default: 160 MiB of device memory
/// for the default model's 40 hidden units.
pub const DEFAULT_GPU_RESIDENT_USERS: usize = 1 << 20;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// Schema of the output topic's intents: 1, or 2 with the event's product, the session's
    /// cart, the decision at the model's threshold and the label horizon (`docs/schemas.md`).
    pub output_schema: IntentSchema,
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
    /// Whether each intent record on the output topic carries the headers `intentflow.schema`
    /// (`intent/1`) and `intentflow.model` (the version of the model that scored it), for
    /// consumers that route or filter without parsing the value; off by default.
    pub output_headers: bool,
    /// Most records per micro-batch (a batch is what has arrived, up to this many).
    pub max_batch_records: usize,
    /// Most waves (batched model steps) per micro-batch: a user with more events in a batch
    /// has the rest deferred to the next one, so one hot user cannot turn a batch into
    /// thousands of one-row steps. 0: no cap.
    pub max_waves_per_batch: usize,
    /// Threads that decode a batch's records and score its users, in shards by user, side by
    /// side (rayon's pool, which the fused model step shares). 0: one per core.
    pub compute_threads: usize,
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
    /// Address of the HTTP server: the status page (`/`, `/status.json`), `/metrics`, `/health`,
    /// `/livez` and `/readyz`; empty to disable.
    pub metrics_addr: String,
    /// The address other instances send per-user queries to (`/v1/users/{id}/intent`) for
    /// users of this instance's partitions, e.g. the pod's IP and port; empty: `metrics_addr`,
    /// with the host name for an unspecified host (`0.0.0.0`).
    pub advertised_addr: String,
    /// How the producers of the input spread user ids over partitions, for per-user queries to
    /// find a user's partition: `consistent_random` (librdkafka's default, CRC32) or
    /// `murmur2_random` (the Java client's default).
    pub input_partitioner: crate::query::Partitioner,
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
    /// Topic of erasure requests (`intentflow erase`), keyed by user id, one partition per input
    /// partition; the operators consume it with the input and delete each named user's state
    /// and changelog record. Empty means `<group>-erasures`.
    pub erasure_topic: String,
    /// Users whose last event is older than this (by the wall clock) are deleted, with a
    /// changelog tombstone, by a periodic sweep; 0 (the default) keeps states forever.
    pub state_ttl_ms: u64,
    /// How often the expiry sweep (`state_ttl_ms`) passes over the assigned partitions.
    pub state_ttl_sweep_ms: u64,
    /// Whether a new model in `model_dir` is loaded without a restart: `off`, or `reset` (on
    /// SIGHUP and on a change seen every `model_watch_ms`, a new model is loaded and checked in
    /// the background and served from the next commit on; a state built by another model has
    /// its hidden vector restarted from zero on its user's next event).
    pub model_reload: ModelReload,
    /// With `model_reload = "reset"`: how often `model_dir` is checked for a new model; 0
    /// leaves reloads to SIGHUP.
    pub model_watch_ms: u64,
    /// Outputs beside `output_topic`, each a topic with its own emit policy (`[[output]]` in
    /// the file; not settable from the environment or flags).
    #[serde(rename = "output")]
    pub outputs: Vec<OutputConfig>,
    /// librdkafka properties: `common` for every client (security), then `consumer` / `producer`.
    pub kafka: KafkaOverrides,
}

/// librdkafka properties passed through as they are (see librdkafka's CONFIGURATION.md). Its
/// `Debug` redacts secret properties ([`layers::is_secret`]).
#[derive(Clone, PartialEq, Default, Serialize, Deserialize)]
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

impl KafkaOverrides {
    /// These properties with the values of secret ones replaced by [`layers::REDACTED`].
    pub fn redacted(&self) -> KafkaOverrides {
        KafkaOverrides { common: layers::redacted(&self.common), consumer: layers::redacted(&self.consumer), producer: layers::redacted(&self.producer) }
    }
}

impl std::fmt::Debug for KafkaOverrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.redacted();
        f.debug_struct("KafkaOverrides").field("common", &shown.common).field("consumer", &shown.consumer).field("producer", &shown.producer).finish()
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            brokers: "127.0.0.1:9092".into(),
            input_topics: vec!["events".into()],
            output_topic: "intents".into(),
            output_schema: IntentSchema::V1,
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
            output_headers: false,
            bootstrap_from: String::new(),
            bootstrap_output_topic: String::new(),
            max_batch_records: 4096,
            max_waves_per_batch: 64,
            compute_threads: 0,
            commit_interval_ms: 100,
            state_cache_mib: 256,
            gpu_resident_users: DEFAULT_GPU_RESIDENT_USERS,
            metrics_addr: "127.0.0.1:9464".into(),
            advertised_addr: String::new(),
            input_partitioner: crate::query::Partitioner::ConsistentRandom,
            liveness_timeout_ms: 60_000,
            max_record_bytes: 64 * 1024,
            max_task_idle_ms: 1_000,
            erasure_topic: String::new(),
            state_ttl_ms: 0,
            state_ttl_sweep_ms: 60_000,
            model_reload: ModelReload::Off,
            model_watch_ms: 5_000,
            outputs: Vec::new(),
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
    /// A layer (the TOML file, an environment variable, a flag) is malformed, has an unknown
    /// key or a value of the wrong type; the message names the layer and the key, with secret
    /// values redacted.
    #[error("invalid configuration: {0}")]
    Load(String),
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

/// Whether the operator loads a new model without a restart (`model_reload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelReload {
    /// The model loaded at start-up is served until the process stops.
    Off,
    /// A new model is loaded, checked and switched to between commits; each state of another
    /// model has its hidden vector restarted on its user's next event (session counters, fences
    /// and output memories stay).
    Reset,
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
    /// This configuration as TOML, secret values redacted: what `intentflow config` prints.
    pub fn to_redacted_toml(&self) -> String {
        let shown = RunConfig { kafka: self.kafka.redacted(), ..self.clone() };
        toml::to_string(&shown).expect("a RunConfig is TOML")
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
        if self.state_ttl_ms > 0 && self.state_ttl_sweep_ms == 0 {
            return bad("state_ttl_sweep_ms must be at least 1 with a state_ttl_ms".into());
        }
        if self.model_reload == ModelReload::Reset && self.model_watch_ms > 0 && self.model_watch_ms < 100 {
            return bad(format!("model_watch_ms = {} is under 100 ms", self.model_watch_ms));
        }
        self.metrics_socket()?;
        self.policy_outputs()?;
        let erasures = self.erasure_topic();
        let mut taken: Vec<&str> = self.input_topics.iter().map(String::as_str).chain([self.output_topic.as_str(), &self.dlq_topic, &changelog, &self.bootstrap_output_topic]).collect();
        if taken.contains(&erasures.as_str()) {
            return bad(format!("erasure topic `{erasures}` must differ from the input, output, bootstrap output, dead-letter and changelog topics"));
        }
        taken.push(&erasures);
        for o in &self.outputs {
            if o.topic.trim().is_empty() {
                return bad("an [[output]] without a topic".into());
            }
            if taken.contains(&o.topic.as_str()) {
                return bad(format!("[[output]] topic `{}` is already an input, output, bootstrap output, dead-letter, changelog, erasure or other [[output]] topic", o.topic));
            }
            taken.push(&o.topic);
        }
        Ok(())
    }

    /// The `[[output]]`s as the operator takes them.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the output and what is wrong with its policy.
    pub fn policy_outputs(&self) -> Result<Vec<intentflow_operators::emit::PolicyOutput>, ConfigError> {
        if self.outputs.len() > 32 {
            return Err(ConfigError::Invalid(format!("{} [[output]]s: at most 32", self.outputs.len())));
        }
        self.outputs.iter().map(OutputConfig::policy_output).collect()
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

    /// The erasure topic: `erasure_topic`, or `<group>-erasures` when empty.
    pub fn erasure_topic(&self) -> String {
        if self.erasure_topic.is_empty() {
            format!("{}-erasures", self.group)
        } else {
            self.erasure_topic.clone()
        }
    }

    /// What to do with a stored state built by another model: migrate it user by user under
    /// `model_reload = "reset"` (states of the models served before remain after a reload),
    /// drop it with `reset_state_on_model_change`, refuse it otherwise.
    pub fn model_policy(&self) -> intentflow_state::changelog::ModelPolicy {
        use intentflow_state::changelog::ModelPolicy;
        match self.model_reload {
            ModelReload::Reset => ModelPolicy::Migrate,
            ModelReload::Off => ModelPolicy::from_reset_flag(self.reset_state_on_model_change),
        }
    }

    /// The changelog topic: `changelog_topic`, or `<group>-changelog` when empty.
    pub fn changelog(&self) -> String {
        if self.changelog_topic.is_empty() {
            format!("{}-changelog", self.group)
        } else {
            self.changelog_topic.clone()
        }
    }

    /// The address advertised for per-user queries: `advertised_addr`, else `metrics_addr` with
    /// an unspecified host replaced by this machine's host name; `None` when the HTTP server is
    /// disabled.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for an unparseable `metrics_addr`.
    pub fn query_address(&self) -> Result<Option<String>, ConfigError> {
        let Some(socket) = self.metrics_socket()? else { return Ok(None) };
        if !self.advertised_addr.trim().is_empty() {
            return Ok(Some(self.advertised_addr.trim().to_string()));
        }
        if !socket.ip().is_unspecified() {
            return Ok(Some(socket.to_string()));
        }
        let host = std::env::var("HOSTNAME").ok().or_else(|| std::fs::read_to_string("/etc/hostname").ok()).map(|h| h.trim().to_string()).filter(|h| !h.is_empty());
        Ok(Some(format!("{}:{}", host.unwrap_or_else(|| "localhost".into()), socket.port())))
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
    use clap::Args as _;

    fn resolve(args: &RunArgs) -> Result<RunConfig, ConfigError> {
        RunConfig::resolve_in(args, &Environment::none())
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("run.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn each_layer_overrides_the_one_below() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "brokers = \"file:9092\"\ngroup = \"file-group\"\noutput_topic = \"file-out\"\nmax_batch_records = 100\n[kafka.common]\n\"client.id\" = \"file\"\n");
        let env = Environment::from_pairs([
            ("INTENTFLOW_GROUP", "env-group"),
            ("INTENTFLOW_OUTPUT_TOPIC", "env-out"),
            ("INTENTFLOW_MAX_BATCH_RECORDS", "200"),
            ("INTENTFLOW_INPUT_TOPICS", "clicks, carts"),
            ("INTENTFLOW_REASONS", "true"),
            ("INTENTFLOW_KAFKA__COMMON__SASL_PASSWORD", "hunter2"),
            ("INTENTFLOW_KAFKA__PRODUCER__COMPRESSION_TYPE", "zstd"),
            // Not keys: the CLI's, and what Kubernetes adds for a service named `intentflow`.
            ("INTENTFLOW_LOG", "debug"),
            ("INTENTFLOW_PORT_9464_TCP_ADDR", "10.0.0.1"),
            ("INTENTFLOW_SERVICE_HOST", "10.0.0.1"),
            ("OTHER_GROUP", "ignored"),
        ]);
        let args = RunArgs { config: Some(path), output_topic: Some("flag-out".into()), ..Default::default() };
        let cfg = RunConfig::resolve_in(&args, &env).unwrap();
        assert_eq!(cfg.brokers, "file:9092", "the file over the defaults");
        assert_eq!((cfg.group.as_str(), cfg.max_batch_records), ("env-group", 200), "the environment over the file");
        assert_eq!(cfg.output_topic, "flag-out", "flags over the environment");
        assert_eq!(cfg.input_topics, ["clicks", "carts"]);
        assert!(cfg.reasons);
        assert_eq!(cfg.dlq_topic, "intentflow-dlq", "the defaults under everything");
        assert_eq!(cfg.kafka.common["client.id"], "file");
        assert_eq!(cfg.kafka.common["sasl.password"], "hunter2");
        assert_eq!(cfg.kafka.producer["compression.type"], "zstd");
        // The other commands: the file, the environment, then --brokers.
        let kafka = KafkaArgs { brokers: Some("flag:9092".into()), config: args.config.clone() };
        assert_eq!(kafka.run_config().unwrap().brokers, "flag:9092");
    }

    #[test]
    fn errors_name_the_layer_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "max_batch_records = \"many\"\n");
        let err = resolve(&RunArgs { config: Some(path.clone()), ..Default::default() }).unwrap_err().to_string();
        assert!(err.contains("max_batch_records") && err.contains("TOML file") && err.contains(&path.display().to_string()), "{err}");
        let env = Environment::from_pairs([("INTENTFLOW_MAX_BATCH_RECORDS", "lots")]);
        let err = RunConfig::resolve_in(&RunArgs::default(), &env).unwrap_err().to_string();
        assert!(err.contains("INTENTFLOW_MAX_BATCH_RECORDS = \"lots\": expected a whole number"), "{err}");
        let env = Environment::from_pairs([("INTENTFLOW_KAFKA__BROKER__X", "1")]);
        let err = RunConfig::resolve_in(&RunArgs::default(), &env).unwrap_err().to_string();
        assert!(err.contains("INTENTFLOW_KAFKA__COMMON|CONSUMER|PRODUCER__<PROPERTY>"), "{err}");
        let env = Environment::from_pairs([("INTENTFLOW_COMMIT_INTERVAL_MS", "60000")]);
        let err = RunConfig::resolve_in(&RunArgs::default(), &env).unwrap_err().to_string();
        assert!(err.contains("exceeds 10 s"), "cross-field checks see the environment too: {err}");
        let err = resolve(&RunArgs { config: Some(dir.path().join("missing.toml")), ..Default::default() }).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }

    #[test]
    fn secrets_never_show_in_printed_configs_or_errors() {
        let dir = tempfile::tempdir().unwrap();
        // Malformed: the parser's message would quote the line holding the secret; ours says
        // where the error is.
        let path = write(&dir, "brokers = \"k:9092\"\n[kafka.common]\n\"sasl.password\" = \"hunter2\n\"sasl.username\" = \"shop\"\n");
        let err = resolve(&RunArgs { config: Some(path), ..Default::default() }).unwrap_err().to_string();
        assert!(!err.contains("hunter2") && err.contains("line 3"), "{err}");
        // Malformed inside a multi-line string that the loose reading cannot see as a value.
        let path = write(&dir, "[kafka.common]\n\"sasl.password\" = \"\"\"\nhunter2\n");
        let err = resolve(&RunArgs { config: Some(path), ..Default::default() }).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        // A secret in an inline table, shown by another key's error.
        let path = write(&dir, "max_batch_records = \"hunter2\"\n[kafka]\ncommon = { \"sasl.password\" = \"hunter2\", \"sasl.username\" = \"shop\" }\n");
        let err = resolve(&RunArgs { config: Some(path), ..Default::default() }).unwrap_err().to_string();
        assert!(!err.contains("hunter2") && err.contains(layers::REDACTED), "{err}");
        // A short secret hides its own value, not the letters of other words.
        let path = write(&dir, "max_batch_records = \"x\"\n[kafka]\ncommon = { \"sasl.password\" = \"x\" }\n");
        let err = resolve(&RunArgs { config: Some(path), ..Default::default() }).unwrap_err().to_string();
        assert!(err.contains("expected") && err.contains("max_batch_records") && !err.contains("\"x\""), "{err}");
        // A multi-line secret, shown by another key's error.
        let path = write(&dir, "max_batch_records = \"hunter2\"\n[kafka.common]\n\"sasl.password\" = \"\"\"\nhunter2\"\"\"\n");
        let err = resolve(&RunArgs { config: Some(path), ..Default::default() }).unwrap_err().to_string();
        assert!(!err.contains("hunter2") && err.contains(layers::REDACTED), "{err}");
        // A wrong type: the message quotes the value.
        let path = write(&dir, "[kafka.common]\n\"ssl.key.password\" = 271828\n");
        let err = resolve(&RunArgs { config: Some(path), ..Default::default() }).unwrap_err().to_string();
        assert!(!err.contains("271828"), "{err}");
        // A secret from the environment in another layer's error.
        let path = write(&dir, "max_batch_records = \"s3cr3t-token\"\n");
        let env = Environment::from_pairs([("INTENTFLOW_KAFKA__COMMON__SASL_OAUTHBEARER_CLIENT_SECRET", "s3cr3t-token")]);
        let err = RunConfig::resolve_in(&RunArgs { config: Some(path), ..Default::default() }, &env).unwrap_err().to_string();
        assert!(!err.contains("s3cr3t-token"), "{err}");
        // Printed and logged configurations.
        let env = Environment::from_pairs([("INTENTFLOW_KAFKA__COMMON__SASL_PASSWORD", "hunter2"), ("INTENTFLOW_KAFKA__COMMON__SASL_USERNAME", "shop")]);
        let cfg = RunConfig::resolve_in(&RunArgs::default(), &env).unwrap();
        for shown in [cfg.to_redacted_toml(), format!("{cfg:?}"), format!("{:?}", cfg.clients())] {
            assert!(!shown.contains("hunter2") && shown.contains("shop") && shown.contains(layers::REDACTED), "{shown}");
        }
        assert_eq!(cfg.kafka.common["sasl.password"], "hunter2", "redaction is for showing only");
    }

    #[test]
    fn the_printed_defaults_pass_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, &RunConfig::default().to_redacted_toml());
        let cfg = resolve(&RunArgs { config: Some(path), ..Default::default() }).unwrap();
        assert_eq!(cfg, RunConfig::default());
    }

    /// `docs/configuration.md`'s table: every key once, with its environment variable, its flag
    /// (which `intentflow run` has) and its default.
    #[test]
    fn the_reference_matches_the_defaults() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md")).unwrap();
        let defaults = toml::Table::try_from(RunConfig::default()).unwrap();
        let run = RunArgs::augment_args(clap::Command::new("run"));
        let flags: Vec<String> = run.get_arguments().filter_map(|a| a.get_long().map(|l| format!("`--{l}`"))).collect();
        let mut seen = Vec::new();
        for row in doc.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
            let key = cells[0].trim_matches('`');
            if key.starts_with('[') {
                continue;
            }
            let Some(default) = defaults.get(key) else { panic!("docs/configuration.md documents `{key}`, which is no key") };
            let shown = match default {
                toml::Value::String(s) if s.is_empty() => "\"\"".to_string(),
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert_eq!(cells[1], format!("`INTENTFLOW_{}`", key.to_uppercase()), "{key}");
            assert!(cells[2] == "—" || flags.iter().any(|f| cells[2].starts_with(f.as_str())), "{key}: no flag {}", cells[2]);
            assert_eq!(cells[3], format!("`{shown}`"), "{key}'s default");
            seen.push(key.to_string());
        }
        let mut keys: Vec<String> = defaults.keys().filter(|k| !["kafka", "output"].contains(&k.as_str())).cloned().collect();
        keys.sort();
        seen.sort();
        assert_eq!(seen, keys, "every key documented once");
    }

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
        let cfg = resolve(&args).unwrap();
        assert_eq!(cfg.brokers, "k1:9092");
        assert_eq!(cfg.input_topics, ["a", "b"]);
        assert_eq!(cfg.group, "g2");
        assert_eq!(cfg.output_topic, "intents");
        assert_eq!(cfg.kafka.consumer["fetch.max.bytes"], "1048576");
    }

    #[test]
    fn outputs_come_from_the_file_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let text = "output_topic = \"scores\"\n[[output]]\ntopic = \"alerts\"\npolicy = \"threshold\"\nenter = 0.6\nleave = 0.5\nexclude_purchases = true\n\n[[output]]\ntopic = \"segments\"\npolicy = \"segments\"\ncuts = [0.2, 0.6]\n";
        let cfg = resolve(&RunArgs { config: Some(write(&dir, text)), ..Default::default() }).unwrap();
        let outputs = cfg.policy_outputs().unwrap();
        assert_eq!(outputs.iter().map(|o| (o.name.as_str(), o.policy.kind(), o.exclude_purchases)).collect::<Vec<_>>(), [("alerts", "threshold", true), ("segments", "segments", false)]);
        // What `intentflow config` prints reads back as the same configuration.
        let printed = cfg.to_redacted_toml();
        assert!(printed.contains("[[output]]"), "{printed}");
        assert_eq!(resolve(&RunArgs { config: Some(write(&dir, &printed)), ..Default::default() }).unwrap(), cfg);
        for (text, says) in [
            ("[[output]]\ntopic = \"intents\"\npolicy = \"every\"\n", "`intents` is already"),
            ("[[output]]\ntopic = \"a\"\npolicy = \"every\"\n[[output]]\ntopic = \"a\"\npolicy = \"delta\"\nmin_change = 0.1\n", "`a` is already"),
            ("[[output]]\ntopic = \"a\"\npolicy = \"delta\"\n", "needs `min_change`"),
            ("bootstrap_output_topic = \"b\"\n[[output]]\ntopic = \"b\"\npolicy = \"every\"\n", "`b` is already"),
        ] {
            let err = resolve(&RunArgs { config: Some(write(&dir, text)), ..Default::default() }).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
        let env = Environment::from_pairs([("INTENTFLOW_OUTPUT", "alerts")]);
        let err = RunConfig::resolve_in(&RunArgs::default(), &env).unwrap_err().to_string();
        assert!(err.contains("INTENTFLOW_OUTPUT") && err.contains("config file only"), "{err}");
    }

    #[test]
    fn rejects_unknown_keys_and_feedback_loops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "brokerz = \"x\"\n").unwrap();
        let err = resolve(&RunArgs { config: Some(path), ..Default::default() }).unwrap_err();
        assert!(matches!(err, ConfigError::Load(_)), "{err}");
        let args = RunArgs { input_topics: vec!["intents".into()], ..Default::default() };
        assert!(resolve(&args).unwrap_err().to_string().contains("feed back"));
        let args = RunArgs { dlq_topic: Some("events".into()), ..Default::default() };
        assert!(resolve(&args).unwrap_err().to_string().contains("dead-letter topic `events`"));
        let args = RunArgs { changelog_topic: Some("intents".into()), ..Default::default() };
        assert!(resolve(&args).unwrap_err().to_string().contains("changelog topic `intents`"));
        let args = RunArgs { group: Some("shop".into()), ..Default::default() };
        let cfg = resolve(&args).unwrap();
        assert_eq!((cfg.changelog(), cfg.processing_guarantee), ("shop-changelog".to_string(), ProcessingGuarantee::ExactlyOnce));
        let args = RunArgs { commit_interval_ms: Some(5_000), ..Default::default() };
        assert!(resolve(&args).unwrap_err().to_string().contains("10 × commit_interval_ms"));
    }
}
