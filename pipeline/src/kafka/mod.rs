//! Kafka wiring shared by every command.
//!
//! [`KafkaClients`] is the one place that builds a client's properties: the bootstrap servers,
//! then the `[kafka.common]` properties every client gets (security: `security.protocol`,
//! `sasl.*`, `ssl.*`), then the role's own defaults and `[kafka.consumer]` / `[kafka.producer]`
//! properties. Admin and metadata clients, the operator's consumer and producer, restore and
//! replay readers, `tail`, and `import`/`generate --topic` all come from it, so a secured
//! cluster works with every command once its properties are configured.
//!
//! * [`admin`] — topic creation and partition counts.
//! * [`delivery`] — a bounded window of in-flight deliveries.
//! * [`read`] — bounded reads of assigned partitions and whole topics.

pub mod admin;
pub mod delivery;
pub mod read;

pub use delivery::DeliveryWindow;

use anyhow::{Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::FutureProducer;
use std::collections::BTreeMap;

/// Builds every Kafka client of a command from one set of properties. Its `Debug` redacts
/// secret properties, as [`crate::config::KafkaOverrides`]'s does.
#[derive(Clone, Default, PartialEq)]
pub struct KafkaClients {
    /// Bootstrap servers.
    pub brokers: String,
    /// Properties of every client (security settings above all).
    pub common: BTreeMap<String, String>,
    /// Properties of consumers, applied after `common`.
    pub consumer: BTreeMap<String, String>,
    /// Properties of producers, applied after `common`.
    pub producer: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::config::layers::redacted;
        f.debug_struct("KafkaClients")
            .field("brokers", &self.brokers)
            .field("common", &redacted(&self.common))
            .field("consumer", &redacted(&self.consumer))
            .field("producer", &redacted(&self.producer))
            .finish()
    }
}

impl KafkaClients {
    /// Clients of `brokers` with no extra properties.
    pub fn new(brokers: &str) -> KafkaClients {
        KafkaClients { brokers: brokers.to_string(), ..KafkaClients::default() }
    }

    /// The bootstrap servers and the common properties: what admin and metadata clients use.
    pub fn base(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.common {
            cfg.set(k, v);
        }
        cfg
    }

    /// The common and consumer properties, then `fixed`, which the caller relies on and the
    /// configuration cannot override.
    fn consumer_with(&self, fixed: &[(&str, &str)]) -> ClientConfig {
        let mut cfg = self.base();
        for (k, v) in &self.consumer {
            cfg.set(k, v);
        }
        for (k, v) in fixed {
            cfg.set(*k, *v);
        }
        cfg
    }

    /// A consumer of assigned partitions that never commits: `group` only names it.
    /// `isolation` is `read_committed` or `read_uncommitted`.
    pub fn reader_config(&self, group: &str, isolation: &str) -> ClientConfig {
        self.consumer_with(&[("group.id", group), ("enable.auto.commit", "false"), ("enable.auto.offset.store", "false"), ("isolation.level", isolation)])
    }

    /// The operator's group consumer: `read_committed`, offsets committed by the operator only
    /// (in its transactions or after its batches), the eager assignors, and static membership
    /// as `intentflow-<instance>` so that a restarted instance takes its partitions back without
    /// a rebalance and a second process with the same id is fenced. Session and heartbeat
    /// timings default to 10 s / 2 s, and statistics (the lag metric) to every 5 s; each may be
    /// overridden in `[kafka.consumer]`.
    pub fn group_consumer_config(&self, group: &str, instance: &str, offset_reset: &str) -> ClientConfig {
        let mut cfg = self.base();
        // Statistics feed `intentflow_consumer_lag_records` (runtime::rebalance).
        cfg.set("session.timeout.ms", "10000").set("heartbeat.interval.ms", "2000").set("statistics.interval.ms", "5000");
        for (k, v) in &self.consumer {
            cfg.set(k, v);
        }
        let member = format!("intentflow-{instance}");
        for (k, v) in [
            ("group.id", group),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", offset_reset),
            ("isolation.level", "read_committed"),
            ("partition.assignment.strategy", "range,roundrobin"),
            ("group.instance.id", member.as_str()),
        ] {
            cfg.set(k, v);
        }
        cfg
    }

    /// A client for metadata requests (partition counts, watermarks).
    ///
    /// # Errors
    ///
    /// If librdkafka rejects the configuration.
    pub fn metadata_client(&self) -> Result<BaseConsumer> {
        self.base().set("allow.auto.create.topics", "false").create().context("creating a Kafka metadata client")
    }

    /// An idempotent producer tuned for throughput with bounded latency; `extra` (such as a
    /// transactional id) is applied last. Transactional settings of `[kafka.producer]` are left
    /// to the one producer that asks for them in `extra`: the others (dead letters, replays,
    /// imports) produce without transactions.
    ///
    /// # Errors
    ///
    /// If librdkafka rejects the configuration.
    pub fn producer(&self, extra: &[(&str, &str)]) -> Result<FutureProducer> {
        let mut cfg = self.base();
        cfg.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("queue.buffering.max.messages", "500000")
            .set("message.timeout.ms", "120000");
        for (k, v) in self.producer.iter().filter(|(k, _)| !matches!(k.as_str(), "transactional.id" | "transaction.timeout.ms")) {
            cfg.set(k, v);
        }
        for (k, v) in extra {
            cfg.set(*k, *v);
        }
        cfg.create().context("creating a Kafka producer")
    }
}

/// librdkafka's built-in features (`builtin.features`): what the linked library can do (TLS,
/// SASL mechanisms, codecs, OIDC).
pub fn builtin_features() -> String {
    let cfg = ClientConfig::new();
    let native = cfg.create_native_config().ok();
    native.and_then(|n| n.get("builtin.features").ok()).unwrap_or_default()
}

/// The librdkafka version string.
pub fn librdkafka_version() -> String {
    rdkafka::util::get_rdkafka_version().1
}
