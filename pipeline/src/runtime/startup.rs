//! Start-up of `intentflow run`: everything the batch loop needs, opened in order.
//!
//! 1. a bootstrap from history, if asked for (`--bootstrap-from`, a replay into the state
//!    directory); a directory left by an unfinished replay is refused;
//! 2. the model, and the state store with the model check ([`StateDir::adopt_model`]);
//! 3. the output (`output_topic` and each `[[output]]`), dead-letter, changelog and erasure
//!    topics (one changelog and one erasure partition per input partition);
//! 4. the producer; under exactly-once `init_transactions` fences an earlier life of this
//!    instance and aborts its open transaction before any changelog partition is restored;
//! 5. the consumer, whose rebalance context restores assigned partitions in the background;
//! 6. the hand-over of a replayed state, if the directory holds one;
//! 7. the subscription: the input topics and the erasure topic.

use super::handover::hand_over;
use super::rebalance::RebalanceContext;
use super::restore::{RestoreDone, Restorer, RestorerConfig};
use super::sink::{BatchSink, RETRY_FOR, TXN_TIMEOUT};
use super::watchdog::Watchdog;
use crate::config::{ProcessingGuarantee, RunConfig};
use crate::kafka::{admin, KafkaClients};
use crate::state_dir::StateDir;
use crate::telemetry::Health;
use anyhow::{bail, Context, Result};
use intentflow_model::IntentModel;
use intentflow_schemas::IntentSchema;
use intentflow_operators::IntentOperator;
use intentflow_state::{StateStore, StoreOptions};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, Producer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Everything the batch loop works with.
pub struct Started {
    /// The configuration.
    pub cfg: RunConfig,
    /// The operator and model served at start-up (the loop switches to others on a reload).
    pub serving: Arc<Serving>,
    /// The state store.
    pub store: Arc<StateStore>,
    /// The producer (transactional under exactly-once).
    pub producer: FutureProducer,
    /// Watches transaction calls.
    pub watchdog: Watchdog,
    /// The changelog topic.
    pub changelog: String,
    /// The subscribed consumer.
    pub consumer: StreamConsumer<RebalanceContext>,
}

/// What scores the batches: the operator with its model, and the headers of intent records that
/// name the model.
pub struct Serving {
    /// The scoring operator with its model.
    pub operator: IntentOperator,
    /// The headers of intent records in each schema (`output_headers`), or none.
    pub intent_headers: Option<IntentHeaders>,
}

impl Serving {
    /// `model` in an operator set up as `cfg` says: the policy for other models' states,
    /// reasons, the wave cap, the `[[output]]`s, GPU-resident states.
    ///
    /// # Errors
    ///
    /// An invalid `[[output]]` and a GPU that cannot hold the resident slab.
    pub fn new(cfg: &RunConfig, model: IntentModel) -> Result<Serving> {
        let operator = IntentOperator::new(model)
            .with_model_policy(cfg.model_policy())
            .with_reasons(cfg.reasons)
            .with_wave_cap(std::num::NonZeroUsize::new(cfg.max_waves_per_batch))
            .with_outputs(cfg.policy_outputs()?)?
            .with_gpu_resident_slots(cfg.gpu_resident_users)?;
        let intent_headers = cfg.output_headers.then(|| IntentHeaders::new(operator.model().version()));
        Ok(Serving { operator, intent_headers })
    }

    /// The version of the model served.
    pub fn version(&self) -> &str {
        self.operator.model().version()
    }
}

/// The headers of intent records with `output_headers`: the schema and the model.
pub struct IntentHeaders {
    v1: OwnedHeaders,
    v2: OwnedHeaders,
}

impl IntentHeaders {
    /// The headers of records scored by `model_version`.
    fn new(model_version: &str) -> IntentHeaders {
        let of = |schema: IntentSchema| {
            let schema = format!("intent/{}", schema.number());
            OwnedHeaders::new()
                .insert(Header { key: "intentflow.schema", value: Some(schema.as_str()) })
                .insert(Header { key: "intentflow.model", value: Some(model_version) })
        };
        IntentHeaders { v1: of(IntentSchema::V1), v2: of(IntentSchema::V2) }
    }

    /// The headers of a record in `schema`.
    pub fn of(&self, schema: IntentSchema) -> &OwnedHeaders {
        match schema {
            IntentSchema::V1 => &self.v1,
            IntentSchema::V2 => &self.v2,
        }
    }
}

impl Started {
    /// Whether batches are Kafka transactions (`processing_guarantee = "exactly_once"`).
    pub fn exactly_once(&self) -> bool {
        self.cfg.processing_guarantee == ProcessingGuarantee::ExactlyOnce
    }

    /// The sink of the batches' results, with `serving`'s `[[output]]`s and headers.
    pub fn sink(&self, serving: Arc<Serving>) -> BatchSink<'_> {
        BatchSink {
            producer: &self.producer,
            output_topic: &self.cfg.output_topic,
            output_schema: self.cfg.output_schema,
            dlq_topic: &self.cfg.dlq_topic,
            changelog: &self.changelog,
            watchdog: &self.watchdog,
            exactly_once: self.exactly_once(),
            serving,
        }
    }
}

/// Opens everything, hands over a replayed state if there is one, and subscribes. Also returns
/// the receiver of finished restores, for the loop to resume their partitions.
///
/// # Errors
///
/// No model, a state store locked or built by another model, a broker that cannot be reached,
/// a changelog with too few partitions, a failed bootstrap or hand-over.
pub async fn start(cfg: RunConfig, health: &Arc<Health>) -> Result<(Started, mpsc::UnboundedReceiver<RestoreDone>)> {
    let dir = StateDir::new(&cfg.state_dir);
    crate::replay::bootstrap(&cfg).await.context("bootstrapping states from history")?;
    dir.refuse_unfinished()?;
    let device = cfg.device.open()?;
    let model = IntentModel::load(&cfg.model_dir, &device)?;
    tracing::info!(version = model.version(), hidden = model.hidden_dim(), device = ?cfg.device, "model loaded");
    let policy = cfg.model_policy();
    let serving = Arc::new(Serving::new(&cfg, model)?);
    // The changelog is the store's log: a store that lost its latest writes in a crash catches
    // up from it, so its writes skip RocksDB's write-ahead log (as Kafka Streams' stores do).
    let store = Arc::new(dir.open_store(StoreOptions::with_cache_budget(cfg.state_cache_mib << 20).changelog_backed())?);
    StateDir::adopt_model(&store, serving.version(), policy)?;

    let clients = cfg.clients();
    let changelog = cfg.changelog();
    let input_partitions = admin::input_partition_count(&clients, &cfg.input_topics)?;
    for topic in std::iter::once(&cfg.output_topic).chain(cfg.outputs.iter().map(|o| &o.topic)) {
        admin::ensure_topic(&clients, topic, input_partitions).await?;
    }
    admin::ensure_topic(&clients, &cfg.dlq_topic, input_partitions).await?;
    let changelog_partitions = admin::ensure_topic_with(&clients, &changelog, input_partitions, &[("cleanup.policy", "compact")]).await?;
    if changelog_partitions < input_partitions {
        bail!("changelog topic {changelog} has {changelog_partitions} partitions, the input has {input_partitions}: it needs one per input partition");
    }
    // Erasure requests are consumed with the input: partition p's requests with partition p's
    // events (the range assignor gives one member the same partition of every topic).
    let erasures = cfg.erasure_topic();
    admin::ensure_erasure_topic(&clients, &erasures, input_partitions).await?;

    let instance = dir.instance_id(&cfg.instance_id)?;
    health.live.identify(serving.version(), &instance);
    let exactly_once = cfg.processing_guarantee == ProcessingGuarantee::ExactlyOnce;
    let producer = transactional_producer(&clients, &cfg, &instance)?;

    let (done_tx, restores) = mpsc::unbounded_channel();
    let restorer = Restorer::new(RestorerConfig {
        clients: clients.clone(),
        topic: changelog.clone(),
        store: store.clone(),
        model: serving.version().to_string(),
        policy,
        dlq_topic: cfg.dlq_topic.clone(),
        health: health.clone(),
    })?;
    let context = RebalanceContext::new(health.clone(), Arc::new(restorer), done_tx, cfg.offset_reset, erasures.clone(), (!exactly_once).then(|| producer.clone()));
    let mut consumer_config = clients.group_consumer_config(&cfg.group, &instance, cfg.offset_reset.librdkafka());
    // Per-user queries: the instance's address, advertised to the group through its client id.
    if let Some(address) = cfg.query_address()? {
        if let Some(id) = cfg.kafka.consumer.get("client.id").or_else(|| cfg.kafka.common.get("client.id")) {
            tracing::warn!(configured = %id, "the group consumer's client.id advertises the query address instead of the configured one (docs/metrics.md)");
        }
        consumer_config.set("client.id", crate::query::advertised_client_id(&instance, &address));
        let query = crate::query::Query::new(&clients, store.clone(), &cfg.input_topics[0], input_partitions, cfg.input_partitioner, &cfg.group, &instance)?;
        if health.query.set(query).is_err() {
            tracing::warn!("per-user queries were already set up");
        }
    }
    let consumer: StreamConsumer<RebalanceContext> = consumer_config.create_with_context(context).context("creating the Kafka consumer")?;
    // Beyond the retries of a transaction call plus a margin.
    let watchdog = Watchdog::start(RETRY_FOR + Duration::from_secs(30));
    let started = Started { cfg, serving, store, producer, watchdog, changelog, consumer };

    if dir.replay_status()?.is_some() {
        let (cfg, store) = (&started.cfg, &started.store);
        hand_over(&started.sink(started.serving.clone()), &started.consumer, store, &dir, &cfg.input_topics, input_partitions).await.context("handing the replayed state over")?;
    }
    let topics: Vec<&str> = started.cfg.input_topics.iter().map(String::as_str).chain([erasures.as_str()]).collect();
    started.consumer.subscribe(&topics)?;
    let cfg = &started.cfg;
    tracing::info!(
        topics = ?cfg.input_topics, erasures = %erasures, group = %cfg.group, output = %cfg.output_topic, policy_outputs = ?cfg.outputs.iter().map(|o| &o.topic).collect::<Vec<_>>(), changelog = %started.changelog,
        guarantee = ?cfg.processing_guarantee, exactly_once, "subscribed"
    );
    Ok((started, restores))
}

/// The operator's producer: under exactly-once with a transactional id derived from the group
/// and the instance, and its transactions initialised (which fences an earlier life of this
/// instance and aborts the transaction it left open, if any).
fn transactional_producer(clients: &KafkaClients, cfg: &RunConfig, instance: &str) -> Result<FutureProducer> {
    if cfg.processing_guarantee != ProcessingGuarantee::ExactlyOnce {
        return clients.producer(&[]);
    }
    // The producer's own transactional settings win over the run's (`KafkaClients::producer`
    // leaves them to this one producer).
    let timeout = cfg.transaction_timeout_ms.to_string();
    let timeout = cfg.kafka.producer.get("transaction.timeout.ms").unwrap_or(&timeout).clone();
    let default_id = format!("intentflow-{}-{instance}", cfg.group);
    let id = cfg.kafka.producer.get("transactional.id").unwrap_or(&default_id).clone();
    let mut extra: Vec<(&str, &str)> = vec![("transactional.id", &id), ("transaction.timeout.ms", &timeout)];
    if !cfg.kafka.producer.contains_key("message.timeout.ms") {
        extra.push(("message.timeout.ms", &timeout));
    }
    let producer = clients.producer(&extra)?;
    tokio::task::block_in_place(|| producer.init_transactions(TXN_TIMEOUT)).context("initialising Kafka transactions")?;
    tracing::info!(transactional_id = %id, "transactions initialised");
    Ok(producer)
}
