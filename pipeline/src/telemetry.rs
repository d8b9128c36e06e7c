//! Metrics (Prometheus text on `/metrics`) and health (`/health`) of a running operator.
//!
//! Naming follows `docs/metrics.md`: counters end in `_total`, durations are `_seconds`, label
//! values come from bounded sets, and everything is emitted once per batch with handles
//! registered up front.

use axum::{routing::get, Json, Router};
use intentflow_schemas::DecodeError;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Installs the global Prometheus recorder. Call once per process.
///
/// # Errors
///
/// If a recorder is already installed.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    Ok(PrometheusBuilder::new()
        .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])?
        .install_recorder()?)
}

/// Live status shared between the runtime and the `/health` endpoint.
#[derive(Debug, Default)]
pub struct Health {
    /// The consumer has joined its group and holds an assignment.
    pub assigned_partitions: AtomicUsize,
    /// The operator is in its processing loop.
    pub running: AtomicBool,
    /// Wall-clock time of the last completed batch (epoch ms, 0 before the first).
    pub last_batch_ms: AtomicI64,
    /// Records consumed.
    pub records_in: AtomicU64,
    /// Intents produced and acknowledged.
    pub intents_out: AtomicU64,
    /// Records rejected as invalid.
    pub invalid: AtomicU64,
}

#[derive(Serialize)]
struct HealthReport {
    status: &'static str,
    assigned_partitions: usize,
    last_batch_ms: i64,
    records_in: u64,
    intents_out: u64,
    invalid: u64,
}

impl Health {
    fn report(&self) -> HealthReport {
        HealthReport {
            status: if self.running.load(Ordering::Relaxed) { "running" } else { "starting" },
            assigned_partitions: self.assigned_partitions.load(Ordering::Relaxed),
            last_batch_ms: self.last_batch_ms.load(Ordering::Relaxed),
            records_in: self.records_in.load(Ordering::Relaxed),
            intents_out: self.intents_out.load(Ordering::Relaxed),
            invalid: self.invalid.load(Ordering::Relaxed),
        }
    }
}

/// Serves `/metrics` and `/health` on `addr` until the task is dropped.
///
/// # Errors
///
/// If the address cannot be bound.
pub async fn serve(addr: SocketAddr, prometheus: PrometheusHandle, health: Arc<Health>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(prometheus.render())))
        .route("/health", get(move || std::future::ready(Json(health.report()))));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics and /health");
    axum::serve(listener, app).await?;
    Ok(())
}

/// What one batch did, for [`BatchMetrics::emit`].
#[derive(Debug, Default, Clone)]
pub struct BatchStats {
    /// Records consumed in the batch.
    pub records: u64,
    /// Records skipped because the state already reflected them.
    pub skipped: u64,
    /// Intents produced.
    pub intents: u64,
    /// Rejections by [`DecodeError::kind`].
    pub invalid: HashMap<&'static str, u64>,
    /// Users whose hidden vector was restarted because it did not fit the model.
    pub state_resets: u64,
    /// Wall time of the batch.
    pub seconds: f64,
    /// GRU steps (waves) in the batch.
    pub waves: u64,
}

/// Metric handles registered once and updated per batch.
pub struct BatchMetrics {
    records_in: Counter,
    skipped: Counter,
    intents_out: Counter,
    invalid: HashMap<&'static str, Counter>,
    state_resets: Counter,
    batches: Counter,
    batch_seconds: Histogram,
    batch_records: Histogram,
    waves: Counter,
}

impl Default for BatchMetrics {
    fn default() -> Self {
        BatchMetrics {
            records_in: metrics::counter!("intentflow_records_in_total"),
            skipped: metrics::counter!("intentflow_records_skipped_total"),
            intents_out: metrics::counter!("intentflow_intents_out_total"),
            invalid: DecodeError::KINDS
                .iter()
                .map(|k| (*k, metrics::counter!("intentflow_records_invalid_total", "error_type" => *k)))
                .collect(),
            state_resets: metrics::counter!("intentflow_state_resets_total"),
            batches: metrics::counter!("intentflow_batches_total"),
            batch_seconds: metrics::histogram!("intentflow_batch_seconds"),
            batch_records: metrics::histogram!("intentflow_batch_records"),
            waves: metrics::counter!("intentflow_model_steps_total"),
        }
    }
}

impl BatchMetrics {
    /// Records one batch.
    pub fn emit(&self, stats: &BatchStats, health: &Health) {
        self.records_in.increment(stats.records);
        self.skipped.increment(stats.skipped);
        self.intents_out.increment(stats.intents);
        let mut invalid = 0;
        for (kind, n) in &stats.invalid {
            invalid += n;
            if let Some(c) = self.invalid.get(kind) {
                c.increment(*n);
            }
        }
        self.state_resets.increment(stats.state_resets);
        self.batches.increment(1);
        self.batch_seconds.record(stats.seconds);
        self.batch_records.record(stats.records as f64);
        self.waves.increment(stats.waves);
        health.records_in.fetch_add(stats.records, Ordering::Relaxed);
        health.intents_out.fetch_add(stats.intents, Ordering::Relaxed);
        health.invalid.fetch_add(invalid, Ordering::Relaxed);
        health.last_batch_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    }
}
