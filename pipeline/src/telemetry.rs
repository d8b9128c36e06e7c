//! Metrics (Prometheus text on `/metrics`), health (`/health`) and the Kubernetes probes
//! (`/livez`, `/readyz`) of a running operator.
//!
//! Naming follows `docs/metrics.md`: counters end in `_total`, durations are `_seconds`, label
//! values come from bounded sets, every histogram has buckets in its own unit, and everything is
//! emitted once per batch with handles registered up front.

use axum::http::StatusCode;
use axum::{routing::get, Json, Router};
use intentflow_schemas::DecodeError;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Buckets of histograms in seconds (batch and commit times): up to the minute a transaction may
/// stay open by default (`transaction.timeout.ms`), and beyond, so a stalled commit is seen.
const SECONDS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Buckets of restore durations: from an up-to-date partition to a changelog of many millions.
const RESTORE_SECONDS: &[f64] = &[0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];
/// Buckets of batch sizes in records (up to the largest `max_batch_records` worth using).
const RECORDS: &[f64] = &[1.0, 10.0, 100.0, 500.0, 1000.0, 2000.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0];
/// Buckets of batches per commit.
const BATCHES: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];
/// Buckets of one model step (a wave): from a few rows on the CPU to a full batch.
const STEP_SECONDS: &[f64] = &[0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1];
/// Buckets of latencies to a produced intent: milliseconds live, up to days for replayed or
/// late history (event time).
const LATENCY_SECONDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86_400.0];
/// How often the exporter's upkeep (draining histogram samples) and the state store's figures run.
pub const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the global Prometheus recorder. Call once per process.
///
/// # Errors
///
/// If a recorder is already installed.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(SECONDS)?
        .set_buckets_for_metric(Matcher::Full("intentflow_restore_seconds".into()), RESTORE_SECONDS)?
        .set_buckets_for_metric(Matcher::Full("intentflow_batch_records".into()), RECORDS)?
        .set_buckets_for_metric(Matcher::Full("intentflow_commit_batches".into()), BATCHES)?
        .set_buckets_for_metric(Matcher::Full("intentflow_model_step_seconds".into()), STEP_SECONDS)?
        .set_buckets_for_metric(Matcher::Full("intentflow_event_to_produce_seconds".into()), LATENCY_SECONDS)?
        .set_buckets_for_metric(Matcher::Full("intentflow_consume_to_produce_seconds".into()), LATENCY_SECONDS)?
        .install_recorder()?;
    describe();
    register();
    Ok(handle)
}

/// Registers every series whose labels are known up front, so that each is exported (at 0)
/// from start-up rather than from its first event.
fn register() {
    drop(BatchMetrics::default());
    metrics::counter!("intentflow_offsets_lost_total").absolute(0);
    metrics::counter!("intentflow_restored_records_total").absolute(0);
    drop(metrics::histogram!("intentflow_restore_seconds"));
    metrics::gauge!("intentflow_restoring_partitions").set(0.0);
    for source in ["store", "changelog"] {
        state_records_invalid(source).absolute(0);
    }
    for result in ["switched", "rejected"] {
        model_reloads(result).absolute(0);
    }
}

/// The `# HELP` text of every series (docs/metrics.md says more).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("intentflow_records_in_total", "Input records consumed.");
    describe_counter!("intentflow_records_skipped_total", "Records the state already reflected (the partition's stored offset or the user's fence): not applied again.");
    describe_counter!("intentflow_intents_out_total", "Intents produced and acknowledged (counted when their commit succeeds).");
    describe_counter!("intentflow_output_intents_total", "Intents an [[output]] published under its emit policy, by output (its topic); counted when their commit succeeds.");
    describe_counter!("intentflow_records_invalid_total", "Input records rejected and dead-lettered, by error_type.");
    describe_counter!("intentflow_state_resets_total", "Stored states restarted from zero, by reason (hidden_size, foreign_model).");
    describe_counter!("intentflow_erasure_requests_total", "Erasure requests (intentflow erase) applied, by result: deleted (a state was deleted and tombstoned), absent (no state here), invalid (no usable user id).");
    describe_counter!("intentflow_model_reloads_total", "Model reloads (model_reload), by result: switched, or rejected (did not load or failed its check; the served model went on).");
    describe_counter!("intentflow_users_expired_total", "Users deleted (and tombstoned on the changelog) by the expiry sweep: no event for state_ttl_ms.");
    describe_counter!("intentflow_state_records_invalid_total", "State records that did not decode and were quarantined, by source (store, changelog).");
    describe_counter!("intentflow_batches_total", "Micro-batches processed.");
    describe_histogram!("intentflow_batch_seconds", Unit::Seconds, "Wall time of a micro-batch.");
    describe_histogram!("intentflow_batch_records", Unit::Count, "Records per micro-batch.");
    describe_counter!("intentflow_model_steps_total", "Batched model steps (a wave of one shard of a batch).");
    describe_counter!("intentflow_events_deferred_total", "Events the wave cap (max_waves_per_batch) left for the next batch.");
    describe_gauge!("intentflow_gpu_resident_users", Unit::Count, "Users whose hidden states are resident on the GPU.");
    describe_counter!("intentflow_gpu_state_loads_total", "Hidden states uploaded to GPU slots.");
    describe_counter!("intentflow_gpu_evictions_total", "GPU slots reused for other users (least recently used first).");
    describe_counter!("intentflow_gpu_fallback_batches_total", "Batches too large for the GPU slab, stepped without resident states.");
    describe_counter!("intentflow_commits_total", "Commits (under exactly-once, transactions committed).");
    describe_histogram!("intentflow_commit_batches", Unit::Count, "Batches per commit.");
    describe_histogram!("intentflow_commit_open_seconds", Unit::Seconds, "How long a commit's unit stayed open, from its first batch to the end of its commit.");
    describe_counter!("intentflow_transactions_aborted_total", "Transactions aborted (after a failure or at a rebalance); their batches are processed again.");
    describe_counter!("intentflow_restored_records_total", "Changelog records applied to the local store when partitions were assigned.");
    describe_histogram!("intentflow_restore_seconds", Unit::Seconds, "Wall time of each partition's restore from the changelog.");
    describe_counter!("intentflow_offsets_lost_total", "Input offsets deleted by retention before they were processed.");
    describe_gauge!("intentflow_consumer_lag_records", Unit::Count, "Records of an assigned input partition not yet consumed, to its last stable offset.");
    describe_gauge!("intentflow_build_info", "1, labelled with the build's version and git commit and the served model's version.");
    describe_histogram!("intentflow_event_to_produce_seconds", Unit::Seconds, "From an event's own time to its intent produced (committed under exactly-once).");
    describe_histogram!("intentflow_consume_to_produce_seconds", Unit::Seconds, "From a record handed to the operator to its intent produced (committed under exactly-once).");
    describe_histogram!("intentflow_model_step_seconds", Unit::Seconds, "Wall time of one batched model step (a wave).");
    describe_histogram!("intentflow_commit_seconds", Unit::Seconds, "Wall time of a commit: the last acknowledgements, the transaction (or offset) commit and the state store's write (on its own thread while the next unit is scored).");
    describe_gauge!("intentflow_restoring_partitions", Unit::Count, "Assigned partitions still restoring from the changelog.");
    describe_gauge!("intentflow_state_size_bytes", Unit::Bytes, "Bytes of the RocksDB state store (SST files and memtables).");
    describe_gauge!("intentflow_state_keys", Unit::Count, "RocksDB's estimate of the keys in the state store (user states and a few offset records).");
    describe_gauge!("intentflow_state_pending_compaction_bytes", Unit::Bytes, "RocksDB's estimate of the bytes compaction has yet to rewrite.");
    describe_counter!("intentflow_state_block_cache_hits_total", "RocksDB block cache hits (the hit ratio is their rate over hits plus misses).");
    describe_counter!("intentflow_state_block_cache_misses_total", "RocksDB block cache misses.");
}

/// Puts `intentflow_state_*` figures of `store` into their gauges and counters.
pub fn store_figures(store: &intentflow_state::StateStore) {
    let s = match store.stats() {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "could not read the state store's figures"),
    };
    metrics::gauge!("intentflow_state_size_bytes").set(s.size_bytes as f64);
    metrics::gauge!("intentflow_state_keys").set(s.estimated_keys as f64);
    metrics::gauge!("intentflow_state_pending_compaction_bytes").set(s.pending_compaction_bytes as f64);
    metrics::counter!("intentflow_state_block_cache_hits_total").absolute(s.block_cache_hits);
    metrics::counter!("intentflow_state_block_cache_misses_total").absolute(s.block_cache_misses);
}

/// Where the operator is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Phase {
    /// Loading the model, opening the store, creating topics, handing over a replay.
    Starting = 0,
    /// Subscribed, no partition assigned yet.
    WaitingForAssignment = 1,
    /// Some assigned partitions are still restoring from the changelog (the others run).
    Restoring = 2,
    /// Every assigned partition is processing.
    Running = 3,
    /// SIGTERM received: finishing the batch in hand.
    Stopping = 4,
    /// The loop has ended.
    Stopped = 5,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        [Phase::Starting, Phase::WaitingForAssignment, Phase::Restoring, Phase::Running, Phase::Stopping, Phase::Stopped][usize::from(v).min(5)]
    }
}

/// Live status shared between the runtime and the `/health` endpoint.
#[derive(Debug, Default)]
pub struct Health {
    phase: AtomicU8,
    /// Assigned partitions, each with its restore progress (`None` once it processes).
    partitions: Mutex<BTreeMap<i32, Option<u64>>>,
    /// Wall-clock time of the last completed batch (epoch ms, 0 before the first).
    pub last_batch_ms: AtomicI64,
    /// Records consumed.
    pub records_in: AtomicU64,
    /// Intents produced and acknowledged.
    pub intents_out: AtomicU64,
    /// Records rejected as invalid.
    pub invalid: AtomicU64,
    /// Whether the last rebalance event assigned partitions (possibly none), rather than
    /// revoking them or failing.
    holds_assignment: AtomicBool,
    /// When the batch loop began the batch, commit or restore report in hand ([`monotonic_ms`]),
    /// 0 while it waits.
    busy_since_ms: AtomicI64,
    /// How long the loop may stay in one piece of work before `/livez` fails (ms).
    liveness_timeout_ms: AtomicU64,
    /// What the status page shows.
    pub live: crate::live::Live,
    /// What answers per-user queries, once the operator has opened its state.
    pub query: OnceLock<crate::query::Query>,
}

/// Milliseconds on a monotonic clock (since its first use, plus one, so never 0): a wall-clock
/// step cannot fake or hide a stall.
fn monotonic_ms() -> i64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as i64 + 1
}

/// The batch loop at work: [`Health::busy`] until dropped.
pub struct Busy<'a>(&'a Health);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy_since_ms.store(0, Ordering::Relaxed);
    }
}

/// A probe's answer: whether it passes, the phase, and why (also when it passes).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Probe {
    /// Whether the probe passes (200) or not (503).
    pub ok: bool,
    /// The operator's phase.
    pub status: Phase,
    /// What decided it, in words.
    pub reasons: Vec<String>,
}

impl Probe {
    /// The answer of `/readyz`: ready once the partitions assigned to this instance are
    /// restored and processing (or an assignment gave it none: the group has more instances than
    /// partitions); not while starting, between a revocation (or a failed rebalance) and the
    /// next assignment, while any assigned partition restores, or when stopping.
    pub fn readiness(status: Phase, holds_assignment: bool, assigned: usize, restoring: &BTreeMap<i32, u64>) -> Probe {
        let (ok, reasons) = match status {
            Phase::Starting => (false, vec!["starting: loading the model, opening the state store, creating topics or handing over a replay".to_string()]),
            Phase::WaitingForAssignment if !holds_assignment => (false, vec!["joining the consumer group: no partition assignment yet".to_string()]),
            Phase::WaitingForAssignment => (true, vec!["no partitions assigned: the group has more instances than input partitions".to_string()]),
            Phase::Restoring => (false, restoring.iter().map(|(p, n)| format!("partition {p} restoring from the changelog ({n} records applied)")).collect()),
            Phase::Running => (true, vec![format!("{assigned} partitions assigned, restored and processing")]),
            Phase::Stopping => (false, vec!["stopping: finishing the batch in hand after SIGTERM".to_string()]),
            Phase::Stopped => (false, vec!["stopped".to_string()]),
        };
        Probe { ok, status, reasons }
    }

    /// The answer of `/livez`: live unless the batch loop has been inside one batch, commit or
    /// restore report (`busy_since_ms`, 0 when it waits) for longer than `timeout_ms`, or has
    /// ended. Waiting for records, however long, is live; so is starting (a bootstrap replay
    /// may take hours and reports its own progress).
    pub fn liveness(status: Phase, busy_since_ms: i64, now_ms: i64, timeout_ms: u64) -> Probe {
        let busy_ms = (busy_since_ms > 0).then(|| (now_ms - busy_since_ms).max(0));
        let (ok, reason) = match (status, busy_ms) {
            (Phase::Stopped, _) => (false, "the batch loop has ended".to_string()),
            (_, Some(ms)) if ms as u64 > timeout_ms => (false, format!("the batch loop has been in one batch or commit for {ms} ms (liveness_timeout_ms = {timeout_ms})")),
            (_, Some(ms)) => (true, format!("processing: in the current batch or commit for {ms} ms")),
            (Phase::Starting, None) => (true, "starting".to_string()),
            (_, None) => (true, "waiting for records".to_string()),
        };
        Probe { ok, status, reasons: vec![reason] }
    }

    fn answer(self) -> (StatusCode, Json<Probe>) {
        (if self.ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(self))
    }
}

#[derive(Serialize)]
struct HealthReport {
    status: Phase,
    assigned_partitions: usize,
    /// Partitions restoring from the changelog, with the records applied so far.
    restoring: BTreeMap<i32, u64>,
    last_batch_ms: i64,
    records_in: u64,
    intents_out: u64,
    invalid: u64,
}

impl Health {
    /// Enters a phase of the operator's life (`Restoring` and `Running` follow the partitions).
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    /// Sets how long the batch loop may stay in one piece of work before `/livez` fails.
    pub fn set_liveness_timeout_ms(&self, ms: u64) {
        self.liveness_timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// Marks the batch loop at work until the guard is dropped (for `/livez`).
    pub fn busy(&self) -> Busy<'_> {
        self.busy_since_ms.store(monotonic_ms(), Ordering::Relaxed);
        Busy(self)
    }

    /// `/readyz`.
    pub fn readiness(&self) -> Probe {
        let p = self.partitions.lock().expect("health lock");
        Probe::readiness(self.phase(), self.holds_assignment.load(Ordering::Relaxed), p.len(), &restoring(&p))
    }

    /// `/livez`.
    pub fn liveness(&self) -> Probe {
        Probe::liveness(self.phase(), self.busy_since_ms.load(Ordering::Relaxed), monotonic_ms(), self.liveness_timeout_ms.load(Ordering::Relaxed))
    }

    /// The partitions were revoked (or the rebalance failed): none is held until the next
    /// assignment.
    pub fn revoked(&self) {
        self.live.clear_lag();
        let mut p = self.partitions.lock().expect("health lock");
        self.holds_assignment.store(false, Ordering::Relaxed);
        p.clear();
        self.follow_partitions(&p);
    }

    /// The assigned partitions, each with its restore progress (`None` once it processes).
    pub fn partition_progress(&self) -> BTreeMap<i32, Option<u64>> {
        self.partitions.lock().expect("health lock").clone()
    }

    /// A new assignment: every partition in it starts restoring.
    pub fn assigned(&self, partitions: &[i32]) {
        let mut p = self.partitions.lock().expect("health lock");
        self.holds_assignment.store(true, Ordering::Relaxed);
        *p = partitions.iter().map(|&k| (k, Some(0))).collect();
        self.follow_partitions(&p);
    }

    /// Records restore progress of a partition: `records` applied so far, for the probes and
    /// the status page (the restore counts `intentflow_restored_records_total` itself, so that
    /// a cancelled restore's late report cannot count twice).
    pub fn restoring(&self, partition: i32, records: u64) {
        if let Some(Some(so_far)) = self.partitions.lock().expect("health lock").get_mut(&partition) {
            *so_far = records;
        }
    }

    /// Totals for the status page.
    pub fn totals(&self) -> crate::live::Totals {
        crate::live::Totals {
            records_in: self.records_in.load(Ordering::Relaxed),
            intents_out: self.intents_out.load(Ordering::Relaxed),
            invalid: self.invalid.load(Ordering::Relaxed),
        }
    }

    /// A partition finished restoring and processes.
    pub fn ready(&self, partition: i32) {
        let mut p = self.partitions.lock().expect("health lock");
        if let Some(slot) = p.get_mut(&partition) {
            *slot = None;
        }
        self.follow_partitions(&p);
    }

    fn follow_partitions(&self, p: &BTreeMap<i32, Option<u64>>) {
        metrics::gauge!("intentflow_restoring_partitions").set(p.values().filter(|v| v.is_some()).count() as f64);
        if matches!(self.phase(), Phase::Starting | Phase::Stopping | Phase::Stopped) {
            return;
        }
        let phase = if p.is_empty() {
            Phase::WaitingForAssignment
        } else if p.values().any(Option::is_some) {
            Phase::Restoring
        } else {
            Phase::Running
        };
        self.set_phase(phase);
    }

    fn report(&self) -> HealthReport {
        let p = self.partitions.lock().expect("health lock");
        HealthReport {
            status: self.phase(),
            assigned_partitions: p.len(),
            restoring: restoring(&p),
            last_batch_ms: self.last_batch_ms.load(Ordering::Relaxed),
            records_in: self.records_in.load(Ordering::Relaxed),
            intents_out: self.intents_out.load(Ordering::Relaxed),
            invalid: self.invalid.load(Ordering::Relaxed),
        }
    }
}

/// The assigned partitions still restoring, with the changelog records applied so far.
fn restoring(partitions: &BTreeMap<i32, Option<u64>>) -> BTreeMap<i32, u64> {
    partitions.iter().filter_map(|(k, v)| v.map(|n| (*k, n))).collect()
}

/// The status page: one self-contained file that polls `status.json`.
const STATUS_PAGE: &str = include_str!("../assets/status.html");

/// Serves the status page (`/`, `/status.json`), `/metrics`, `/health`, `/livez`, `/readyz` and
/// the per-user query (`/v1/users/{id}/intent`, [`crate::query`]) on `addr` until the task is
/// dropped, and runs the exporter's upkeep every [`UPKEEP`].
///
/// # Errors
///
/// If the address cannot be bound.
pub async fn serve(addr: SocketAddr, prometheus: PrometheusHandle, health: Arc<Health>) -> anyhow::Result<()> {
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let (live, ready, status, query) = (health.clone(), health.clone(), health.clone(), health.clone());
    let app = Router::new()
        .route("/", get(|| std::future::ready(axum::response::Html(STATUS_PAGE))))
        .route("/status.json", get(move || std::future::ready(Json(status.live.status(&status)))))
        .route("/metrics", get(move || std::future::ready(prometheus.render())))
        .route("/health", get(move || std::future::ready(Json(health.report()))))
        .route("/livez", get(move || std::future::ready(live.liveness().answer())))
        .route("/readyz", get(move || std::future::ready(ready.readiness().answer())))
        .route("/v1/users/{id}/intent", get(move |axum::extract::Path(id): axum::extract::Path<String>| user_intent(query.clone(), id)));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving the status page (/), /status.json, /metrics, /health, /livez, /readyz and /v1/users/{{id}}/intent");
    axum::serve(listener, app).await?;
    Ok(())
}

/// The answer to `GET /v1/users/{id}/intent` (blocking reads, off the async workers).
async fn user_intent(health: Arc<Health>, user: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    let answer = tokio::task::spawn_blocking(move || match health.query.get() {
        Some(query) => query.answer(&health, &user),
        None => (axum::http::StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": "starting: the state is not open yet", "user_id": user}))).into_response(),
    });
    answer.await.unwrap_or_else(|e| (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())
}

/// What one batch did, for [`BatchMetrics::emit`].
#[derive(Debug, Default, Clone)]
pub struct BatchStats {
    /// Records consumed in the batch.
    pub records: u64,
    /// Records skipped because the state already reflected them (the partition's offset, or the
    /// user's fence).
    pub skipped: u64,
    /// Intents produced.
    pub intents: u64,
    /// Intents each `[[output]]` published, by output index.
    pub published: Vec<u64>,
    /// Rejections by [`DecodeError::kind`].
    pub invalid: HashMap<&'static str, u64>,
    /// Users whose hidden vector was restarted because it did not fit the model.
    pub state_resets: u64,
    /// Users whose state was built by another model and was dropped.
    pub foreign_states: u64,
    /// Wall time of the batch.
    pub seconds: f64,
    /// Batched model steps in the batch (a wave of each of its shards).
    pub waves: u64,
    /// Events the wave cap left for the next batch (`max_waves_per_batch`).
    pub deferred: u64,
    /// Wall time of each model step (wave).
    pub step_seconds: Vec<f64>,
    /// With hidden states resident on a GPU: what the slab did for the batch.
    pub resident: Option<intentflow_operators::ResidentBatch>,
    /// Erasure requests that deleted a state.
    pub erased: u64,
    /// Erasure requests of users without a state here.
    pub erasures_absent: u64,
    /// Erasure requests without a usable user id.
    pub erasures_invalid: u64,
    /// Users deleted by the expiry sweep.
    pub expired: u64,
}

impl BatchStats {
    /// Adds `other`'s counts (records, skipped, intents, rejections, resets, waves) to these.
    pub fn add(&mut self, other: &BatchStats) {
        self.records += other.records;
        self.skipped += other.skipped;
        self.intents += other.intents;
        if self.published.len() < other.published.len() {
            self.published.resize(other.published.len(), 0);
        }
        self.published.iter_mut().zip(&other.published).for_each(|(a, b)| *a += b);
        for (kind, n) in &other.invalid {
            *self.invalid.entry(kind).or_default() += n;
        }
        self.state_resets += other.state_resets;
        self.foreign_states += other.foreign_states;
        self.waves += other.waves;
        self.erased += other.erased;
        self.erasures_absent += other.erasures_absent;
        self.erasures_invalid += other.erasures_invalid;
        self.expired += other.expired;
    }
}

/// Metric handles registered once and updated per batch.
pub struct BatchMetrics {
    records_in: Counter,
    skipped: Counter,
    intents_out: Counter,
    /// `intentflow_output_intents_total` of each `[[output]]`, by output index.
    published: Vec<Counter>,
    invalid: HashMap<&'static str, Counter>,
    state_resets: Counter,
    foreign_states: Counter,
    /// `intentflow_erasure_requests_total` by result: deleted, absent, invalid.
    erasures: [Counter; 3],
    expired: Counter,
    batches: Counter,
    batch_seconds: Histogram,
    batch_records: Histogram,
    waves: Counter,
    deferred: Counter,
    gpu_resident_users: Gauge,
    gpu_state_loads: Counter,
    gpu_evictions: Counter,
    gpu_fallback_batches: Counter,
    commits: Counter,
    commit_batches: Histogram,
    commit_open_seconds: Histogram,
    commit_seconds: Histogram,
    model_step_seconds: Histogram,
    event_to_produce: Histogram,
    consume_to_produce: Histogram,
    aborted: Counter,
}

impl Default for BatchMetrics {
    fn default() -> Self {
        BatchMetrics {
            records_in: metrics::counter!("intentflow_records_in_total"),
            skipped: metrics::counter!("intentflow_records_skipped_total"),
            intents_out: metrics::counter!("intentflow_intents_out_total"),
            published: Vec::new(),
            invalid: DecodeError::KINDS
                .iter()
                .map(|k| (*k, metrics::counter!("intentflow_records_invalid_total", "error_type" => *k)))
                .collect(),
            state_resets: metrics::counter!("intentflow_state_resets_total", "reason" => "hidden_size"),
            foreign_states: metrics::counter!("intentflow_state_resets_total", "reason" => "foreign_model"),
            erasures: ["deleted", "absent", "invalid"].map(|r| metrics::counter!("intentflow_erasure_requests_total", "result" => r)),
            expired: metrics::counter!("intentflow_users_expired_total"),
            batches: metrics::counter!("intentflow_batches_total"),
            batch_seconds: metrics::histogram!("intentflow_batch_seconds"),
            batch_records: metrics::histogram!("intentflow_batch_records"),
            waves: metrics::counter!("intentflow_model_steps_total"),
            deferred: metrics::counter!("intentflow_events_deferred_total"),
            gpu_resident_users: metrics::gauge!("intentflow_gpu_resident_users"),
            gpu_state_loads: metrics::counter!("intentflow_gpu_state_loads_total"),
            gpu_evictions: metrics::counter!("intentflow_gpu_evictions_total"),
            gpu_fallback_batches: metrics::counter!("intentflow_gpu_fallback_batches_total"),
            commits: metrics::counter!("intentflow_commits_total"),
            commit_batches: metrics::histogram!("intentflow_commit_batches"),
            commit_open_seconds: metrics::histogram!("intentflow_commit_open_seconds"),
            commit_seconds: metrics::histogram!("intentflow_commit_seconds"),
            model_step_seconds: metrics::histogram!("intentflow_model_step_seconds"),
            event_to_produce: metrics::histogram!("intentflow_event_to_produce_seconds"),
            consume_to_produce: metrics::histogram!("intentflow_consume_to_produce_seconds"),
            aborted: metrics::counter!("intentflow_transactions_aborted_total"),
        }
    }
}

/// Sets `intentflow_build_info{version, git_sha, model_version}` to 1: which build serves which
/// model, for dashboards and alerts across a rolling update.
pub fn build_info(model_version: &str) {
    build_info_series(model_version).set(1.0);
}

/// After a model reload: `intentflow_build_info` is 0 for the model served before and 1 for the
/// one served now, and `intentflow_model_reloads_total{result="switched"}` counts it.
pub fn model_switched(previous: &str, now: &str) {
    build_info_series(previous).set(0.0);
    build_info(now);
    model_reloads("switched").increment(1);
}

/// The counter of model reloads by result: `switched`, or `rejected` (a model that did not load
/// or failed its check; the served one went on).
pub fn model_reloads(result: &'static str) -> Counter {
    metrics::counter!("intentflow_model_reloads_total", "result" => result)
}

fn build_info_series(model_version: &str) -> Gauge {
    metrics::gauge!(
        "intentflow_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "git_sha" => env!("INTENTFLOW_GIT_SHA"),
        "model_version" => model_version.to_string()
    )
}

/// The counter of quarantined state records: `source` is `store` (the local RocksDB) or
/// `changelog` (a restore).
pub fn state_records_invalid(source: &'static str) -> Counter {
    metrics::counter!("intentflow_state_records_invalid_total", "source" => source)
}

impl BatchMetrics {
    /// These metrics with a counter of published intents for each of `outputs` (their topics),
    /// registered at zero.
    pub fn with_outputs<'o>(mut self, outputs: impl IntoIterator<Item = &'o str>) -> BatchMetrics {
        self.published = outputs
            .into_iter()
            .map(|topic| {
                let c = metrics::counter!("intentflow_output_intents_total", "output" => topic.to_string());
                c.absolute(0);
                c
            })
            .collect();
        self
    }

    /// Records a committed unit (a transaction under exactly-once): its batches, how long it
    /// stayed open from its first batch to the end of its commit, and how long the commit took.
    pub fn unit_committed(&self, batches: u64, open_seconds: f64, commit_seconds: f64) {
        self.commits.increment(1);
        self.commit_batches.record(batches as f64);
        self.commit_open_seconds.record(open_seconds);
        self.commit_seconds.record(commit_seconds);
    }

    /// Records an aborted transaction.
    pub fn unit_aborted(&self) {
        self.aborted.increment(1);
    }

    /// Records the latencies of a committed unit's intents: per batch, when its records were
    /// handed to the operator and its intents' event times (epoch ms); `now_ms` and `now` are
    /// the commit's end on the wall and monotonic clocks.
    pub fn produced(&self, batches: &[(Instant, Vec<i64>)], now_ms: i64, now: Instant, health: &Health) {
        for (consumed, event_ms) in batches {
            let waited = now.saturating_duration_since(*consumed).as_secs_f64();
            self.consume_to_produce.record_many(waited, event_ms.len());
            let event_to_produce = event_ms.iter().map(|&t| (now_ms - t).max(0) as f64 / 1000.0);
            event_to_produce.clone().for_each(|s| self.event_to_produce.record(s));
            health.live.produced(event_to_produce, std::iter::repeat_n(waited, event_ms.len()));
        }
    }

    /// Records one batch.
    pub fn emit_batch(&self, stats: &BatchStats, health: &Health) {
        self.records_in.increment(stats.records);
        self.batches.increment(1);
        self.batch_seconds.record(stats.seconds);
        self.batch_records.record(stats.records as f64);
        self.waves.increment(stats.waves);
        self.deferred.increment(stats.deferred);
        stats.step_seconds.iter().for_each(|&s| self.model_step_seconds.record(s));
        if let Some(r) = &stats.resident {
            self.gpu_resident_users.set(r.held as f64);
            self.gpu_state_loads.increment(r.loaded as u64);
            self.gpu_evictions.increment(r.evicted);
            self.gpu_fallback_batches.increment(u64::from(!r.on_device));
        }
        health.records_in.fetch_add(stats.records, Ordering::Relaxed);
        health.last_batch_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// Records the outcomes of a committed unit's batches (`stats` summed with
    /// [`BatchStats::add`]): intents produced and acknowledged, records rejected, skipped and
    /// states reset. An aborted unit's batches are processed again and counted then.
    pub fn emit_committed(&self, stats: &BatchStats, health: &Health) {
        self.skipped.increment(stats.skipped);
        self.intents_out.increment(stats.intents);
        self.published.iter().zip(&stats.published).for_each(|(c, n)| c.increment(*n));
        let mut invalid = 0;
        for (kind, n) in &stats.invalid {
            invalid += n;
            if let Some(c) = self.invalid.get(kind) {
                c.increment(*n);
            }
        }
        self.state_resets.increment(stats.state_resets);
        self.foreign_states.increment(stats.foreign_states);
        for (c, n) in self.erasures.iter().zip([stats.erased, stats.erasures_absent, stats.erasures_invalid]) {
            c.increment(n);
        }
        self.expired.increment(stats.expired);
        health.intents_out.fetch_add(stats.intents, Ordering::Relaxed);
        health.invalid.fetch_add(invalid, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_follows_assignment_and_restores() {
        let h = Health::default();
        assert_eq!(h.phase(), Phase::Starting);
        h.assigned(&[0, 1]);
        assert_eq!(h.phase(), Phase::Starting, "start-up is not over before the loop says so");
        h.set_phase(Phase::WaitingForAssignment);
        h.assigned(&[0, 1]);
        assert_eq!(h.phase(), Phase::Restoring);
        h.restoring(1, 500);
        h.ready(0);
        assert_eq!(h.report().restoring, BTreeMap::from([(1, 500)]));
        assert_eq!(h.phase(), Phase::Restoring);
        h.ready(1);
        assert_eq!(h.phase(), Phase::Running);
        h.assigned(&[]);
        assert_eq!(h.phase(), Phase::WaitingForAssignment);
        h.set_phase(Phase::Stopped);
        h.assigned(&[2]);
        assert_eq!(h.phase(), Phase::Stopped, "nothing moves a stopped operator back");
        let json = serde_json::to_string(&h.report()).unwrap();
        assert!(json.contains("\"status\":\"stopped\""), "{json}");
    }

    #[test]
    fn readiness_waits_for_an_assignment_and_its_restores() {
        let h = Health::default();
        let ready = |h: &Health| (h.readiness().ok, h.readiness().status);
        assert_eq!(ready(&h), (false, Phase::Starting));
        h.set_phase(Phase::WaitingForAssignment);
        assert_eq!(ready(&h), (false, Phase::WaitingForAssignment), "{:?}", h.readiness());
        h.assigned(&[0, 3]);
        h.restoring(3, 180_000);
        h.ready(0);
        let restoring = h.readiness();
        assert!(!restoring.ok);
        assert_eq!(restoring.reasons, ["partition 3 restoring from the changelog (180000 records applied)"]);
        h.ready(3);
        assert_eq!(ready(&h), (true, Phase::Running));
        // A revocation (every eager rebalance begins with one) is not ready until the next
        // assignment; an empty assignment (more instances than partitions) is: nothing to own.
        h.revoked();
        assert_eq!(ready(&h), (false, Phase::WaitingForAssignment));
        h.assigned(&[]);
        assert_eq!(ready(&h), (true, Phase::WaitingForAssignment));
        h.set_phase(Phase::Stopping);
        assert_eq!(ready(&h), (false, Phase::Stopping));
        let json = serde_json::to_string(&restoring).unwrap();
        assert_eq!(json, r#"{"ok":false,"status":"restoring","reasons":["partition 3 restoring from the changelog (180000 records applied)"]}"#);
    }

    #[test]
    fn liveness_fails_only_when_one_piece_of_work_outlasts_the_timeout() {
        let live = |status, since, now| Probe::liveness(status, since, now, 60_000);
        assert!(live(Phase::Running, 0, 1_000_000).ok, "waiting for records, however long, is live");
        assert!(live(Phase::Starting, 0, 1_000_000).ok);
        assert!(live(Phase::Running, 1_000_000, 1_060_000).ok);
        let stalled = live(Phase::Running, 1_000_000, 1_060_001);
        assert!(!stalled.ok);
        assert_eq!(stalled.reasons, ["the batch loop has been in one batch or commit for 60001 ms (liveness_timeout_ms = 60000)"]);
        assert!(!live(Phase::Stopped, 0, 1).ok);
        let h = Health::default();
        h.set_liveness_timeout_ms(0);
        h.set_phase(Phase::Running);
        {
            let _busy = h.busy();
            std::thread::sleep(std::time::Duration::from_millis(5));
            assert!(!h.liveness().ok, "{:?}", h.liveness());
        }
        assert!(h.liveness().ok, "the guard marks the loop waiting again");
    }
}
