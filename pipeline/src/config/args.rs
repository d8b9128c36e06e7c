//! Command-line flags: those of `intentflow run`, which override its config file, and the Kafka
//! flags of the other commands.

use super::{ConfigError, OffsetReset, ProcessingGuarantee, RunConfig};
use clap::Args;
use intentflow_model::DeviceKind;
use std::path::PathBuf;

/// Command-line flags of `intentflow run`; each one overrides the config file.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML config file (flags override its values).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers [default: 127.0.0.1:9092].
    #[arg(long)]
    pub brokers: Option<String>,
    /// Input topic; repeat for several [default: events].
    #[arg(long = "input-topic")]
    pub input_topics: Vec<String>,
    /// Output topic of scored intents [default: intents].
    #[arg(long)]
    pub output_topic: Option<String>,
    /// Dead-letter topic of rejected records [default: intentflow-dlq].
    #[arg(long)]
    pub dlq_topic: Option<String>,
    /// Consumer group [default: intentflow].
    #[arg(long)]
    pub group: Option<String>,
    /// RocksDB state directory [default: ./intentflow-state].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Trained model directory [default: ./intentflow-model].
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Device: cpu or cuda [default: cpu].
    #[arg(long, value_parser = super::parse_device)]
    pub device: Option<DeviceKind>,
    /// When a committed offset was deleted by retention: earliest, latest or fail [default: earliest].
    #[arg(long, value_enum)]
    pub offset_reset: Option<OffsetReset>,
    /// exactly_once (Kafka transactions) or at_least_once [default: exactly_once].
    #[arg(long, value_enum)]
    pub processing_guarantee: Option<ProcessingGuarantee>,
    /// Compacted changelog topic of the state [default: <group>-changelog].
    #[arg(long)]
    pub changelog_topic: Option<String>,
    /// Stable instance id (transactional id suffix) [default: kept in the state directory].
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Build states from history first: an RFC 3339 time or `earliest` (see docs/replay.md).
    #[arg(long)]
    pub bootstrap_from: Option<String>,
    /// With --bootstrap-from: also send the history's intents to this (backfill) topic.
    #[arg(long)]
    pub bootstrap_output_topic: Option<String>,
    /// Start every user from zero if the state was built by another model (otherwise refuse).
    #[arg(long)]
    pub reset_state_on_model_change: bool,
    /// Each intent carries the signals that raised its score most (`reasons`).
    #[arg(long)]
    pub reasons: bool,
    /// Most records per micro-batch [default: 4096].
    #[arg(long)]
    pub max_batch_records: Option<usize>,
    /// Most model steps per micro-batch; a user's events beyond it wait for the next batch (0: no cap) [default: 64].
    #[arg(long)]
    pub max_waves_per_batch: Option<usize>,
    /// Milliseconds the batch loop may spend in one batch or commit before /livez answers 503 [default: 60000].
    #[arg(long)]
    pub liveness_timeout_ms: Option<u64>,
    /// Milliseconds between commits; under exactly-once one transaction spans them [default: 100].
    #[arg(long)]
    pub commit_interval_ms: Option<u64>,
    /// MiB for user states: RocksDB's block cache and the cache of recently written states [default: 256].
    #[arg(long)]
    pub state_cache_mib: Option<usize>,
    /// With --device cuda: users whose hidden states stay resident on the GPU [default: 1048576].
    #[arg(long)]
    pub gpu_resident_users: Option<usize>,
    /// Address for /metrics and /health, or "" to disable [default: 127.0.0.1:9464].
    #[arg(long)]
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

impl KafkaArgs {
    /// The config file (or the defaults) with `--brokers` applied.
    ///
    /// # Errors
    ///
    /// An unreadable or invalid config file.
    pub fn run_config(&self) -> Result<RunConfig, ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => RunConfig::from_file(path)?,
            None => RunConfig::default(),
        };
        if let Some(b) = &self.brokers {
            cfg.brokers.clone_from(b);
        }
        Ok(cfg)
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
    /// Builds the effective configuration: defaults, then the file, then the flags; validated.
    ///
    /// # Errors
    ///
    /// Any [`ConfigError`].
    pub fn resolve(args: &RunArgs) -> Result<RunConfig, ConfigError> {
        let mut cfg = match &args.config {
            Some(path) => RunConfig::from_file(path)?,
            None => RunConfig::default(),
        };
        if let Some(v) = &args.brokers {
            cfg.brokers.clone_from(v);
        }
        if !args.input_topics.is_empty() {
            cfg.input_topics.clone_from(&args.input_topics);
        }
        if let Some(v) = &args.output_topic {
            cfg.output_topic.clone_from(v);
        }
        if let Some(v) = &args.dlq_topic {
            cfg.dlq_topic.clone_from(v);
        }
        if let Some(v) = &args.group {
            cfg.group.clone_from(v);
        }
        if let Some(v) = &args.state_dir {
            cfg.state_dir.clone_from(v);
        }
        if let Some(v) = &args.model_dir {
            cfg.model_dir.clone_from(v);
        }
        if let Some(v) = args.device {
            cfg.device = v;
        }
        if let Some(v) = args.offset_reset {
            cfg.offset_reset = v;
        }
        if let Some(v) = args.processing_guarantee {
            cfg.processing_guarantee = v;
        }
        if let Some(v) = &args.changelog_topic {
            cfg.changelog_topic.clone_from(v);
        }
        if let Some(v) = &args.instance_id {
            cfg.instance_id.clone_from(v);
        }
        if let Some(v) = &args.bootstrap_from {
            cfg.bootstrap_from.clone_from(v);
        }
        if let Some(v) = &args.bootstrap_output_topic {
            cfg.bootstrap_output_topic.clone_from(v);
        }
        if args.reasons {
            cfg.reasons = true;
        }
        if args.reset_state_on_model_change {
            cfg.reset_state_on_model_change = true;
        }
        if let Some(v) = args.max_batch_records {
            cfg.max_batch_records = v;
        }
        if let Some(v) = args.max_waves_per_batch {
            cfg.max_waves_per_batch = v;
        }
        if let Some(v) = args.liveness_timeout_ms {
            cfg.liveness_timeout_ms = v;
        }
        if let Some(v) = args.commit_interval_ms {
            cfg.commit_interval_ms = v;
        }
        if let Some(v) = args.state_cache_mib {
            cfg.state_cache_mib = v;
        }
        if let Some(v) = args.gpu_resident_users {
            cfg.gpu_resident_users = v;
        }
        if let Some(v) = &args.metrics_addr {
            cfg.metrics_addr.clone_from(v);
        }
        cfg.validate()?;
        Ok(cfg)
    }
}
