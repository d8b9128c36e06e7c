//! `intentflow bench --brokers …`: the live operator measured through the real broker.
//!
//! The bench starts `intentflow run` (this binary) as a child process on fresh topics and a
//! fresh state directory, waits for it to own its partitions, then produces the events at the
//! offered load (or flat out), each stamped with the time it was handed to the producer. A
//! `read_committed` consumer of the output topic takes each intent's latency as the time it
//! arrives minus its event's stamp: what a downstream consumer sees, transactions included. The
//! first tenth of the events is a warm-up and not counted in the latency: metadata requests and
//! first connections cost one-off hundreds of milliseconds (the bench's own producer takes about
//! 0.5 s to deliver its first record to a topic just created). At an offered load the bench then
//! waits until every warm-up intent has been read back, so that the measured events do not queue
//! behind that start; latency at an offered load is the steady state's. Flat out it does not
//! wait (throughput counts from the first event).
//! The operator's CPU time and peak RSS are read from procfs before it is stopped with SIGTERM;
//! its state is then compacted and measured, and the run's topics are deleted.

use super::{compacted_state_bytes, cpu_seconds, disk_write_bytes, latency_histogram, peak_rss_bytes, BenchArgs, RunResult, Seen, Stages, Synth};
use crate::kafka::{admin, DeliveryWindow, KafkaClients};
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use intentflow_model::DeviceKind;
use intentflow_schemas::ScoredIntent;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long the operator may take to start and own its partitions.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the reader waits for the next intent before it gives up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Stops the child operator when dropped (an error path), with SIGTERM.
struct Operator(Child);

impl Operator {
    fn terminate(&mut self) -> Result<()> {
        let status = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status().context("running kill")?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.0.id());
        }
        let exit = self.0.wait()?;
        if !exit.success() {
            bail!("the operator exited with {exit} after SIGTERM");
        }
        Ok(())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The last lines of the operator's log, for an error message (the log may live in a temporary
/// directory that is gone once the error is reported).
fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// One run against the live operator.
pub(super) async fn run_live(args: &BenchArgs, brokers: &str, model_dir: &Path, work: &Path, events: u64, rate: Option<f64>) -> Result<RunResult> {
    let clients = KafkaClients::new(brokers);
    let id = format!("{}-{}", chrono::Utc::now().timestamp_millis(), std::process::id());
    let (input, output, group) = (format!("bench-events-{id}"), format!("bench-intents-{id}"), format!("bench-{id}"));
    let partitions = i32::try_from(args.partitions)?;
    admin::ensure_topic(&clients, &input, partitions).await?;
    admin::ensure_topic(&clients, &output, partitions).await?;
    let state_dir = work.join(format!("live-state-{id}"));
    let log_path = work.join(format!("live-operator-{id}.log"));
    let log = std::fs::File::create(&log_path)?;
    let child = Command::new(std::env::current_exe()?)
        .args(["run", "--brokers", brokers, "--input-topic", &input, "--output-topic", &output, "--group", &group])
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--model-dir")
        .arg(model_dir)
        .args(["--processing-guarantee", &args.processing_guarantee, "--metrics-addr", ""])
        .args(["--max-batch-records", &args.batch.to_string(), "--state-cache-mib", &args.state_cache_mib.to_string()])
        .args(["--commit-interval-ms", &args.commit_interval_ms.to_string()])
        .args(args.reasons.then_some("--reasons"))
        .args(match args.device {
            DeviceKind::Cpu => vec![],
            DeviceKind::Cuda => vec!["--device".to_string(), "cuda".into(), "--gpu-resident-users".into(), args.gpu_resident_users.to_string()],
        })
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting `intentflow run`")?;
    let mut operator = Operator(child);
    let pid = operator.0.id();
    let started = Instant::now();
    while !std::fs::read_to_string(&log_path)?.contains("assigned partitions are up to date") {
        if let Some(status) = operator.0.try_wait()? {
            bail!("the operator exited with {status} before it was ready; the end of its log:\n{}", log_tail(&log_path));
        }
        if started.elapsed() > START_TIMEOUT {
            bail!("the operator did not own its partitions within {START_TIMEOUT:?}; the end of its log:\n{}", log_tail(&log_path));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = pid.to_string();
    let (cpu_start, disk_start) = (cpu_seconds(&pid), disk_write_bytes(&pid));

    // The reader of the intents runs on its own thread while this one produces.
    let warm_seen = std::sync::Arc::new(AtomicU64::new(0));
    let reader = {
        // A fetch that finds nothing new waits at most 10 ms at the broker (librdkafka's default
        // is 500 ms, which would be measured as the operator's latency).
        let consumer: BaseConsumer = clients.reader_config(&format!("{group}-reader"), "read_committed").set("fetch.wait.max.ms", "10").create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&output, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let warm_seen = warm_seen.clone();
        std::thread::spawn(move || read_latencies(&consumer, events, &warm_seen))
    };

    let producer = clients.producer(&[])?;
    let mut window = DeliveryWindow::new(&producer, 100_000);
    let synth = Synth { seed: args.seed, users: args.users };
    let t0 = Instant::now();
    let mut buf = Vec::with_capacity(256);
    let mut key = String::new();
    let mut seen = Seen::new(args.users);
    // Where the offered load's clock starts: the first event, then the first measured one.
    let (mut paced_from, mut paced_at) = (0, t0);
    // The wait for the warm-up's intents: not counted in the run's seconds.
    let mut drained = Duration::ZERO;
    for i in 0..events {
        if let Some(r) = rate {
            if i == warm_up(events) {
                window.finish().await?;
                let waited = Instant::now();
                while warm_seen.load(Ordering::Relaxed) < warm_up(events) {
                    if waited.elapsed() > DRAIN_TIMEOUT {
                        bail!("the warm-up's intents were not all read back within {DRAIN_TIMEOUT:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                drained = waited.elapsed();
                (paced_from, paced_at) = (i, Instant::now());
            }
            let due = Duration::from_secs_f64((i - paced_from) as f64 / r);
            if let Some(wait) = due.checked_sub(paced_at.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        buf.clear();
        synth.write(i, chrono::Utc::now().timestamp_millis(), &mut buf);
        let user = synth.user(i);
        seen.insert(user);
        key.clear();
        let _ = write!(key, "u{user:08}");
        window.send(&input, key.as_bytes(), &buf).await?;
    }
    window.finish().await?;
    let read = tokio::task::spawn_blocking(move || reader.join().expect("the reader thread does not panic")).await?;
    let (latency_us, last_arrival) = read.map_err(|e| e.context(format!("reading the intents back; the end of the operator's log:\n{}", log_tail(&log_path))))?;
    let seconds = (last_arrival.duration_since(t0) - drained).as_secs_f64();
    let cpu_seconds = cpu_seconds(&pid) - cpu_start;
    let peak_rss = peak_rss_bytes(&pid);
    // Up to the last intent: what its shutdown flushes is not counted, so a run too short to
    // fill a memtable (64 MiB) may show next to nothing.
    let disk_bytes = disk_write_bytes(&pid) - disk_start;
    operator.terminate()?;
    let state_bytes = compacted_state_bytes(&state_dir)?;
    std::fs::remove_dir_all(&state_dir)?;
    admin::delete_topics(&clients, &[&input, &output, &format!("{group}-changelog"), &format!("{group}-erasures")]).await?;
    Ok(RunResult {
        mode: format!("live run, {}, commit interval {} ms", args.processing_guarantee, args.commit_interval_ms),
        rate,
        events,
        users: seen.count(),
        seconds,
        cpu_seconds,
        latency_us,
        peak_rss,
        state_bytes,
        disk_bytes,
        batches: 0,
        stages: Stages::default(),
    })
}

/// The events that warm the clients up: the first tenth.
fn warm_up(events: u64) -> u64 {
    events / 10
}

/// Reads the intents of all `events` events (each counted once: an at-least-once repeat does
/// not hide a missing one); each one's latency, after the warm-up, is its arrival minus its
/// event's time (milliseconds: the resolution of event times). Counts the warm-up's intents
/// read in `warm_seen`.
fn read_latencies(consumer: &BaseConsumer, events: u64, warm_seen: &AtomicU64) -> Result<(Histogram<u64>, Instant)> {
    let mut latency_us = latency_histogram()?;
    let mut scored = Seen::new(events);
    let mut seen = 0u64;
    let mut last = Instant::now();
    while seen < events {
        if last.elapsed() > DRAIN_TIMEOUT {
            bail!("no intent for {DRAIN_TIMEOUT:?}; {seen} of {events} arrived");
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
        let message = message?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        last = Instant::now();
        let intent: ScoredIntent = serde_json::from_slice(message.payload().unwrap_or_default()).context("an intent that does not parse")?;
        let index: u64 = intent.event_id.as_deref().and_then(|id| id.strip_prefix('b')).and_then(|i| i.parse().ok()).context("an intent without its bench event id")?;
        if index >= events || !scored.insert(index) {
            continue;
        }
        seen += 1;
        // The first tenth of the events warms the clients up (metadata, connections, the first
        // fetches): their latency is not the steady state's.
        if index < warm_up(events) {
            warm_seen.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let event_ms = chrono::DateTime::parse_from_rfc3339(&intent.event_ts)?.timestamp_millis();
        latency_us.saturating_record(((now_ms - event_ms).max(0) as u64 * 1_000).max(1));
    }
    Ok((latency_us, last))
}
