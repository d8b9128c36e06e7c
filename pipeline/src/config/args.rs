//! Command-line flags: those of `intentflow run`, which override its config file, and the Kafka
//! flags of the other commands.

use super::layers::{self, Environment};
use super::{ConfigError, OffsetReset, ProcessingGuarantee, RunConfig};
use clap::Args;
use serde::Serialize;
use intentflow_model::DeviceKind;
use std::path::PathBuf;

/// Command-line flags of `intentflow run`; each one overrides the environment and the config
/// file. Serialized, they are the top layer: unset flags serialize to nothing.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct RunArgs {
    /// TOML config file (flags override its values).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers [default: 127.0.0.1:9092].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    /// Input topic; repeat for several [default: events].
    #[arg(long = "input-topic")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub input_topics: Vec<String>,
    /// Output topic of scored intents [default: intents].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_topic: Option<String>,
    /// Schema of the output topic's intents: 1 or 2 (docs/schemas.md) [default: 1].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=2))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<u32>,
    /// Dead-letter topic of rejected records [default: intentflow-dlq].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dlq_topic: Option<String>,
    /// Consumer group [default: intentflow].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// RocksDB state directory [default: ./intentflow-state].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Trained model directory [default: ./intentflow-model].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_dir: Option<PathBuf>,
    /// Device: cpu or cuda [default: cpu].
    #[arg(long, value_parser = super::parse_device)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceKind>,
    /// When a committed offset was deleted by retention: earliest, latest or fail [default: earliest].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset_reset: Option<OffsetReset>,
    /// exactly_once (Kafka transactions) or at_least_once [default: exactly_once].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processing_guarantee: Option<ProcessingGuarantee>,
    /// Compacted changelog topic of the state [default: <group>-changelog].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changelog_topic: Option<String>,
    /// Stable instance id (transactional id suffix) [default: kept in the state directory].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Build states from history first: an RFC 3339 time or `earliest` (see docs/replay.md).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_from: Option<String>,
    /// With --bootstrap-from: also send the history's intents to this (backfill) topic.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_output_topic: Option<String>,
    /// Start every user from zero if the state was built by another model (otherwise refuse).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reset_state_on_model_change: bool,
    /// Each intent carries the signals that raised its score most (`reasons`).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reasons: bool,
    /// Intent records carry the headers intentflow.schema and intentflow.model.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub output_headers: bool,
    /// Most records per micro-batch [default: 4096].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_records: Option<usize>,
    /// Most model steps per micro-batch; a user's events beyond it wait for the next batch (0: no cap) [default: 64].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_waves_per_batch: Option<usize>,
    /// Threads that decode and score a batch's records side by side (0: one per core) [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_threads: Option<usize>,
    /// Milliseconds the batch loop may spend in one batch or commit before /livez answers 503 [default: 60000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub liveness_timeout_ms: Option<u64>,
    /// Milliseconds between commits; under exactly-once one transaction spans them [default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_interval_ms: Option<u64>,
    /// MiB for user states: RocksDB's block cache and the cache of recently written states [default: 256].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_cache_mib: Option<usize>,
    /// With --device cuda: users whose hidden states stay resident on the GPU [default: 1048576].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_resident_users: Option<usize>,
    /// Address of the status page (/, /status.json), /metrics, /health, /livez and /readyz, or "" to disable [default: 127.0.0.1:9464].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

/// Where a command other than `run` finds its Kafka cluster: `--brokers`, and the `brokers`
/// and `[kafka.*]` client properties (security settings) of the operator's config file.
#[derive(Debug, Clone, Default, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers [default: the config file's, else 127.0.0.1:9092].
    #[arg(long)]
    pub brokers: Option<String>,
    /// The operator's TOML config file: its `brokers`, `[kafka.common]` and `[kafka.consumer]` /
    /// `[kafka.producer]` properties (SASL, TLS) are used, so a secured cluster is reached the
    /// same way by every command.
    #[arg(long = "config")]
    pub config: Option<PathBuf>,
}

/// The flag of [`KafkaArgs`] that is a configuration key, as a layer.
#[derive(Serialize)]
struct BrokersFlag<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    brokers: Option<&'a String>,
}

impl KafkaArgs {
    /// The operator's configuration as this command sees it: the defaults, the config file, the
    /// environment (`INTENTFLOW_…`), then `--brokers`.
    ///
    /// # Errors
    ///
    /// An unreadable or invalid config file, or an invalid environment variable.
    pub fn run_config(&self) -> Result<RunConfig, ConfigError> {
        layers::load(self.config.as_deref(), &Environment::process(), Some(BrokersFlag { brokers: self.brokers.as_ref() }))
    }

    /// The Kafka clients these flags describe.
    ///
    /// # Errors
    ///
    /// An unreadable or invalid config file.
    pub fn clients(&self) -> Result<crate::kafka::KafkaClients, ConfigError> {
        Ok(self.run_config()?.clients())
    }
}

impl RunConfig {
    /// Builds the effective configuration of `intentflow run`: the defaults, the config file,
    /// the environment (`INTENTFLOW_…`), the flags; validated.
    ///
    /// # Errors
    ///
    /// Any [`ConfigError`].
    pub fn resolve(args: &RunArgs) -> Result<RunConfig, ConfigError> {
        RunConfig::resolve_in(args, &Environment::process())
    }

    /// [`RunConfig::resolve`] with the given environment.
    ///
    /// # Errors
    ///
    /// Any [`ConfigError`].
    pub fn resolve_in(args: &RunArgs, env: &Environment) -> Result<RunConfig, ConfigError> {
        let cfg = layers::load(args.config.as_deref(), env, Some(args))?;
        cfg.validate()?;
        Ok(cfg)
    }
}
