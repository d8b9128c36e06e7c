//! `intentflow bench`: the operator's hot path measured in-process, without Kafka, or with
//! `--brokers` the live operator through the real broker (`bench/live.rs`), or with `--replay`
//! a backfill by `intentflow replay` from a Parquet file (`bench/replay.rs`).
//!
//! Generated events, written as the JSON records a topic would hold, go through everything the
//! live operator does to a batch between the consumer and the producer: decode, the users' states
//! read from RocksDB (one batched read), featurize and step the model in waves, the intents encoded as
//! JSON into one reused buffer, the states encoded and committed with the input offsets in one
//! write batch (without RocksDB's write-ahead log, as `run` writes: its changelog is the log;
//! `--write-ahead-log` measures the store with it), written on a thread of its own while the
//! next batch is scored, which reads those states meanwhile ([`WriteBehind`], as `run` writes a
//! commit's and `replay` a batch's). Kafka's share (fetch, produce,
//! transactions) is measured with `--brokers` against the live `run` (`bench/live.rs`), and by
//! `scripts/bench`.
//!
//! Each run reports events/s, event→score latency percentiles, CPU seconds per million events,
//! peak RSS, the state's bytes per user on disk once compacted, and the bytes written to storage
//! per event (procfs `write_bytes`: memtable flushes, compactions, any write-ahead log). Latency
//! is measured on a clock that stops while events are generated (in chunks of many batches,
//! once the last state write is done, so that no write runs uncounted):
//!
//! * at an offered load (`--rates 250000`), event *i* arrives at *i*/rate seconds; a batch takes
//!   whatever has arrived (up to `--batch`), and an event's latency runs from its arrival until
//!   its batch's intents are encoded and its states handed to the writer (after the batch
//!   before it was written);
//! * flat out (`--rates flat`), a full batch is always waiting, and an event's latency is its
//!   batch's processing time.

mod live;
mod replay;

use anyhow::{bail, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use intentflow_formats::generate::{generate, GeneratorConfig};
use intentflow_model::train::{train, TrainConfig};
use intentflow_model::{Device, DeviceKind, IntentModel};
use intentflow_operators::decode::decode_records;
use intentflow_operators::{EmittedAt, IntentOperator, SourceRecord};
use intentflow_schemas::EventDecoder;
use intentflow_state::{StateStore, StoreOptions, WriteBehind};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `intentflow bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Distinct users; events pick their user uniformly, so nearly all of them appear.
    #[arg(long, default_value_t = 1_000_000)]
    pub users: u64,
    /// Events per run (default: twice `--users`).
    #[arg(long)]
    pub events: Option<u64>,
    /// Most records per batch (the operator's `max_batch_records`).
    #[arg(long, default_value_t = 4_096)]
    pub batch: usize,
    /// Input partitions the users are spread over (states are keyed by partition and user).
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Offered loads in events/s, comma-separated; `flat` runs flat out. One run each, each with
    /// a fresh state store.
    #[arg(long, value_delimiter = ',', default_value = "flat")]
    pub rates: Vec<String>,
    /// Model directory (`intentflow train`); without it a small model is trained on generated
    /// events first (it has the default architecture, so its step costs what a real one does).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Memory for user states in MiB, split as `run` splits it (its `state_cache_mib`): a
    /// quarter RocksDB block cache, three quarters the cache of recently written states.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(0..=1 << 20))]
    pub state_cache_mib: u32,
    /// Device of the model: `cpu`, or `cuda` in a build with the `cuda` feature (then the
    /// operator keeps `--gpu-resident-users` users' hidden states on the GPU, as `run` does).
    #[arg(long, default_value = "cpu", value_parser = crate::config::parse_device)]
    pub device: DeviceKind,
    /// With `--device cuda`: users whose hidden states stay resident on the GPU.
    #[arg(long, default_value_t = crate::config::DEFAULT_GPU_RESIDENT_USERS)]
    pub gpu_resident_users: usize,
    /// Intents carry their reasons, as `run --reasons`.
    #[arg(long)]
    pub reasons: bool,
    /// Where the state stores go (default: a temporary directory, removed afterwards).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Random seed of the events.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// In-process: state writes go through RocksDB's write-ahead log. `run` writes without it
    /// (its changelog topic is the log), and so does the bench by default.
    #[arg(long, conflicts_with = "brokers")]
    pub write_ahead_log: bool,
    /// Measure the live operator (`intentflow run` as a child process) through these brokers
    /// instead of the hot path in-process.
    #[arg(long)]
    pub brokers: Option<String>,
    /// With `--brokers`: the operator's `commit_interval_ms` (how often it commits; under
    /// exactly-once one transaction spans the interval).
    #[arg(long, default_value_t = 100)]
    pub commit_interval_ms: u64,
    /// Measure `intentflow replay` instead (in-process, flat out): the events are generated
    /// into a Parquet file first, then replayed from it into a fresh state directory and a
    /// Parquet file of intents, as `replay` runs by default: its batches and bulk-load store
    /// (`--batch`, `--partitions` and `--state-cache-mib` do not apply).
    #[arg(long, conflicts_with_all = ["brokers", "write_ahead_log"])]
    pub replay: bool,
    /// With `--brokers`: the operator's `processing_guarantee`.
    #[arg(long, default_value = "exactly_once", value_parser = ["exactly_once", "at_least_once"])]
    pub processing_guarantee: String,
}

/// What one run measured.
struct RunResult {
    mode: String,
    rate: Option<f64>,
    events: u64,
    users: u64,
    seconds: f64,
    cpu_seconds: f64,
    latency_us: Histogram<u64>,
    peak_rss: u64,
    state_bytes: u64,
    /// Bytes written to storage (the store's files, its write-ahead log if any).
    disk_bytes: u64,
    batches: u64,
    stages: Stages,
}

/// Wall time per stage of the batch, summed over a run.
#[derive(Default)]
struct Stages {
    /// Decode; state read, featurize and model steps (`IntentOperator::process`); intents and
    /// states encoded; waiting for the last batch's state write (each batch's runs on a thread of
    /// its own while the next is scored).
    seconds: [f64; 4],
}

impl Stages {
    const NAMES: [&'static str; 4] = ["decode", "state read + model (process)", "encode intents + states", "waiting for the last state write"];

    fn add(&mut self, stages: [Duration; 4]) {
        for (total, d) in self.seconds.iter_mut().zip(stages) {
            *total += d.as_secs_f64();
        }
    }
}

/// Runs the benchmark and prints its table.
///
/// # Errors
///
/// Bad arguments, model or state store failures.
pub async fn bench_cmd(args: &BenchArgs) -> Result<()> {
    let events = args.events.unwrap_or(args.users * 2);
    if args.users == 0 || args.batch == 0 || args.partitions == 0 || events == 0 {
        bail!("--users, --events, --batch and --partitions must be at least 1");
    }
    let rates = args
        .rates
        .iter()
        .map(|r| match r.as_str() {
            "flat" => Ok(None),
            r => r.parse::<f64>().ok().filter(|r| r.is_finite() && *r > 0.0).map(Some).with_context(|| format!("--rates: {r:?} is neither `flat` nor a positive number")),
        })
        .collect::<Result<Vec<_>>>()?;
    if args.replay && rates.iter().any(Option::is_some) {
        bail!("--replay runs flat out: a replay reads its file as fast as it can (--rates flat)");
    }
    let tmp = tempfile::tempdir()?;
    let work = args.work_dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let model_dir = match &args.model_dir {
        Some(dir) => dir.clone(),
        None => tokio::task::block_in_place(|| train_small_model(&work.join("model")))?,
    };
    let model = IntentModel::load(&model_dir, &args.device.open()?)?;
    let mut results = Vec::new();
    for (i, rate) in rates.iter().enumerate() {
        eprintln!("bench: run {} of {}: {} events, {} users, {}", i + 1, rates.len(), events, args.users, describe_rate(*rate));
        match &args.brokers {
            Some(brokers) => results.push(live::run_live(args, brokers, &model_dir, &work, events, *rate).await?),
            None if args.replay => {
                results.push(replay::run_replay(args, &model_dir, &work, events, i).await?);
            }
            None => {
                let dir = work.join(format!("state-{i}"));
                let _ = std::fs::remove_dir_all(&dir);
                results.push(tokio::task::block_in_place(|| run_once(args, &model, &dir, events, *rate))?);
                std::fs::remove_dir_all(&dir)?;
            }
        }
    }
    let mut out = std::io::stdout().lock();
    out.write_all(table(args, &model, &results).as_bytes())?;
    Ok(())
}

fn describe_rate(rate: Option<f64>) -> String {
    rate.map_or_else(|| "flat out".to_string(), |r| format!("{r:.0} events/s offered"))
}

/// Trains the default architecture briefly on generated events, as `scripts/bench` does.
fn train_small_model(dir: &Path) -> Result<PathBuf> {
    eprintln!("bench: no --model-dir; training a small model on 40,000 generated events");
    let events: Vec<_> = generate(&GeneratorConfig { users: 2_000, events: 40_000, seed: 99, ..Default::default() }).into_iter().map(|g| g.event).collect();
    let trained = train(&events, &TrainConfig { epochs: 2, ..TrainConfig::default() }, &Device::Cpu, |_, _| {})?;
    trained.save(dir)?;
    Ok(dir.to_path_buf())
}

/// Writes event *i* as a schema-v1 JSON record. Its user is drawn from a hash of `seed` and
/// *i*; the in-process bench gives events times one millisecond apart, so a user's sessions
/// split on the 30-minute gap as real ones do, the live bench the time of producing.
struct Synth {
    seed: u64,
    users: u64,
}

impl Synth {
    fn hash(&self, i: u64, salt: u64) -> u64 {
        // splitmix64
        let mut z = self.seed.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_add(salt.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn user(&self, i: u64) -> u64 {
        self.hash(i, 1) % self.users
    }

    fn write(&self, i: u64, ts_ms: i64, buf: &mut Vec<u8>) {
        let r = self.hash(i, 2);
        let kind = match r % 100 {
            0..=1 => "purchase",
            2..=8 => "cart",
            9..=30 => "click",
            _ => "view",
        };
        let (item, category, cents) = ((r >> 8) % 50_000, (r >> 24) % 300, 100 + (r >> 40) % 50_000);
        // The category goes in `category` (a path, to the model) as in the measurements of
        // docs/performance.md, so that their commands still give the same events.
        // Writing into a Vec cannot fail.
        let _ = std::io::Write::write_fmt(
            buf,
            format_args!(
            r#"{{"user_id":"u{:08}","ts":{},"type":"{kind}","event_id":"b{i}","item_id":"i{item}","category":"c{category}","price":{}.{:02}}}"#,
            self.user(i),
            ts_ms,
                cents / 100,
                cents % 100
            ),
        );
    }
}

/// A clock that stops while events are generated, so that generating them costs the measured
/// operator nothing.
struct Clock {
    start: Instant,
    paused: Duration,
}

impl Clock {
    fn now(&self) -> Duration {
        self.start.elapsed() - self.paused
    }
    fn pause<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.paused += t.elapsed();
        out
    }
}

fn run_once(args: &BenchArgs, model: &IntentModel, dir: &Path, events: u64, rate: Option<f64>) -> Result<RunResult> {
    reset_peak_rss();
    let options = StoreOptions::with_cache_budget((args.state_cache_mib as usize) << 20);
    let store = std::sync::Arc::new(StateStore::open(dir, if args.write_ahead_log { options } else { options.changelog_backed() })?);
    let mut writer = WriteBehind::new(store.clone());
    let operator = IntentOperator::new(model.clone()).with_reasons(args.reasons).with_gpu_resident_slots(args.gpu_resident_users)?;
    let decoder = EventDecoder::default();
    let synth = Synth { seed: args.seed, users: args.users };
    let mut seen = Seen::new(args.users);
    let mut latency_us = latency_histogram()?;
    // Generated events [generated_from, generated_from + ends.len()): their JSON, where each
    // ends in `buf`, their partitions.
    let (mut buf, mut ends, mut partitions) = (Vec::new(), Vec::new(), Vec::new());
    let mut generated_from = 0u64;
    let chunk = (args.batch as u64 * 16).max(1 << 16);
    let mut offsets = vec![0i64; args.partitions as usize];
    let mut intents = Vec::with_capacity(1 << 20);
    let (mut next, mut batches) = (0u64, 0u64);
    let mut cpu_paused = 0.0;
    let mut stages = Stages::default();
    let cpu_start = cpu_seconds(SELF);
    let disk_start = disk_write_bytes(SELF);
    let mut clock = Clock { start: Instant::now(), paused: Duration::ZERO };
    while next < events {
        let now = clock.now().as_secs_f64();
        let arrived = match rate {
            Some(r) => ((now * r) as u64).saturating_add(1).min(events),
            None => events,
        };
        if arrived <= next {
            let r = rate.expect("flat out never waits");
            std::thread::sleep(Duration::from_secs_f64((next as f64 / r - now).max(0.0)));
            continue;
        }
        let n = (arrived - next).min(args.batch as u64);
        if next + n > generated_from + ends.len() as u64 {
            // The next chunk of events, generated on the stopped clock once the last write is
            // done: a write running meanwhile would go uncounted, in time and in CPU.
            let waiting = clock.now();
            writer.wait()?;
            let waited = clock.now() - waiting;
            stages.add([Duration::ZERO, Duration::ZERO, Duration::ZERO, waited]);
            let cpu_before = cpu_seconds(SELF);
            clock.pause(|| {
                buf.clear();
                ends.clear();
                partitions.clear();
                generated_from = next;
                for i in next..(next + chunk).min(events) {
                    synth.write(i, 1_704_067_200_000 + i as i64, &mut buf);
                    ends.push(buf.len());
                    let user = synth.user(i);
                    seen.insert(user);
                    partitions.push((user % u64::from(args.partitions)) as i32);
                }
            });
            cpu_paused += cpu_seconds(SELF) - cpu_before;
        }
        let fetched = clock.now();
        let first = (next - generated_from) as usize;
        let mut start = if first == 0 { 0 } else { ends[first - 1] };
        let batch = first..first + n as usize;
        let records: Vec<SourceRecord> = ends[batch.clone()].iter().zip(&partitions[batch]).map(|(&end, &partition)| {
            let payload = &buf[start..end];
            start = end;
            let offset = &mut offsets[partition as usize];
            *offset += 1;
            SourceRecord { topic: TOPIC, partition, offset: *offset - 1, timestamp_ms: None, payload: Some(payload) }
        }).collect();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let decoded = decode_records(&decoder, &records, now_ms);
        if !decoded.rejected.is_empty() {
            bail!("the generator wrote a record the decoder rejects: {:?}", decoded.rejected[0].error);
        }
        let t_decoded = clock.now();
        let out = operator.process(&decoded.events, &writer.view(), EmittedAt::Now(now_ms))?;
        let t_scored = clock.now();
        intents.clear();
        for scored in &out.scored {
            out.encode_intent(&decoded.events, scored, &mut intents);
        }
        let mut staged = writer.next_batch();
        for (p, u, s) in &out.states {
            staged.put_user(*p, u, s.encode());
        }
        for (p, o) in offsets.iter().enumerate() {
            staged.put_offset(TOPIC.to_string(), p as i32, *o);
        }
        let t_encoded = clock.now();
        // Written while the next batch is scored, as `run` and `replay` write.
        writer.write(staged)?;
        let done = clock.now();
        stages.add([t_decoded - fetched, t_scored - t_decoded, t_encoded - t_scored, done - t_encoded]);
        for i in next..next + n {
            let arrival = match rate {
                Some(r) => Duration::from_secs_f64(i as f64 / r),
                None => fetched,
            };
            latency_us.saturating_record(done.saturating_sub(arrival).as_micros().max(1) as u64);
        }
        next += n;
        batches += 1;
    }
    writer.wait()?;
    let seconds = clock.now().as_secs_f64();
    let cpu_seconds = cpu_seconds(SELF) - cpu_start - cpu_paused;
    let peak_rss = peak_rss_bytes(SELF);
    // What the run wrote once all of it is on disk.
    store.flush()?;
    let disk_bytes = disk_write_bytes(SELF) - disk_start;
    store.compact()?;
    let state_bytes = store.sst_bytes()?;
    Ok(RunResult {
        mode: "in-process".into(),
        rate,
        events,
        users: seen.count(),
        seconds,
        cpu_seconds,
        latency_us,
        peak_rss,
        state_bytes,
        disk_bytes,
        batches,
        stages,
    })
}

fn table(args: &BenchArgs, model: &IntentModel, results: &[RunResult]) -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut s = String::new();
    let store = if args.replay {
        "the replay's store (bulk load: large memtables, no write-ahead log)".to_string()
    } else {
        // `--write-ahead-log` is refused with `--brokers`: a live `run` always writes without.
        format!(
            "state cache {} MiB (a quarter RocksDB block cache), RocksDB {} its write-ahead log",
            args.state_cache_mib,
            if args.write_ahead_log { "with" } else { "without" }
        )
    };
    let _ = writeln!(
        s,
        "intentflow bench: intentflow {}, model {} ({} state of {} values) on {}, batch {}, {} partitions, {store}, {cores} cores",
        env!("CARGO_PKG_VERSION"),
        model.version(),
        model.cell(),
        model.state_dim(),
        match args.device {
            DeviceKind::Cpu => "the CPU".to_string(),
            DeviceKind::Cuda => format!("CUDA, {} resident users", args.gpu_resident_users),
        },
        if args.replay { crate::replay::MAX_BATCH_RECORDS } else { args.batch },
        // A file replay reads one stream.
        if args.replay { 1 } else { args.partitions },
    );
    let _ = writeln!(s, "| mode | offered | events | users | events/s | p50 ms | p99 ms | p99.9 ms | CPU s per M events | peak RSS MiB | state B/user | disk writes B/event | batches |");
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        // A replay has no latency to report.
        let ms = |q: f64| if r.latency_us.is_empty() { "–".to_string() } else { format!("{:.2}", r.latency_us.value_at_quantile(q) as f64 / 1000.0) };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {:.2} | {:.0} | {:.1} | {:.0} | {} |",
            r.mode,
            r.rate.map_or_else(|| "flat out".to_string(), |r| format!("{r:.0}/s")),
            r.events,
            r.users,
            r.events as f64 / r.seconds,
            ms(0.5),
            ms(0.99),
            ms(0.999),
            r.cpu_seconds * 1e6 / r.events as f64,
            r.peak_rss as f64 / f64::from(1 << 20),
            r.state_bytes as f64 / r.users.max(1) as f64,
            r.disk_bytes as f64 / r.events.max(1) as f64,
            r.batches
        );
    }
    if results.iter().all(|r| r.batches == 0) {
        return s;
    }
    let _ = writeln!(s, "\nWall time per stage, µs per event:\n\n| offered | {} |", Stages::NAMES.join(" | "));
    let _ = writeln!(s, "|---|{}", "---:|".repeat(Stages::NAMES.len()));
    for r in results.iter().filter(|r| r.batches > 0) {
        let cells: Vec<String> = r.stages.seconds.iter().map(|t| format!("{:.2}", t * 1e6 / r.events as f64)).collect();
        let _ = writeln!(s, "| {} | {} |", r.rate.map_or_else(|| "flat out".to_string(), |r| format!("{r:.0}/s")), cells.join(" | "));
    }
    s
}

/// The procfs entry of this process, for [`cpu_seconds`] and [`peak_rss_bytes`].
const SELF: &str = "self";

/// Bytes of the state store a run left in `dir`, compacted (what an idle user costs on disk).
fn compacted_state_bytes(dir: &Path) -> Result<u64> {
    let store = StateStore::open(dir, StoreOptions::default())?;
    store.compact()?;
    Ok(store.sst_bytes()?)
}

/// The topic the generated records claim to come from.
const TOPIC: &str = "bench-events";

/// User + system CPU seconds so far (all threads) of the process `proc` (a pid, or [`SELF`]),
/// from procfs; 0 where there is none.
fn cpu_seconds(proc: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{proc}/stat")) else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15, in
    // clock ticks (USER_HZ, 100 on every Linux architecture intentflow builds for).
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|t| t.parse::<f64>().ok()).sum());
    ticks / 100.0
}

/// Bytes the process `proc` (a pid, or [`SELF`]) has had written to storage so far, all threads
/// (procfs `write_bytes`); 0 where there is none.
fn disk_write_bytes(proc: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{proc}/io"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("write_bytes:").and_then(|v| v.trim().parse::<u64>().ok())))
        .unwrap_or(0)
}

/// Resets the kernel's peak-RSS mark of this process (`/proc/self/clear_refs`, Linux ≥ 4.0).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size (`VmHWM`) of the process `proc` (a pid, or [`SELF`]) since its start
/// or, for this one, [`reset_peak_rss`].
fn peak_rss_bytes(proc: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{proc}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmHWM:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())))
        .map_or(0, |kb| kb * 1024)
}

/// Which of `n` indices (users, events) a run has met.
struct Seen {
    words: Vec<u64>,
}

impl Seen {
    fn new(n: u64) -> Seen {
        Seen { words: vec![0; n.div_ceil(64) as usize] }
    }

    /// Marks `i` (below `n`); whether it is new.
    fn insert(&mut self, i: u64) -> bool {
        let (word, bit) = (&mut self.words[(i / 64) as usize], 1u64 << (i % 64));
        let new = *word & bit == 0;
        *word |= bit;
        new
    }

    fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// A histogram of latencies in microseconds, 1 µs to an hour, three significant digits.
fn latency_histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 3_600_000_000, 3)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_records_decode_and_spread_over_users() {
        let synth = Synth { seed: 1, users: 1_000 };
        let decoder = EventDecoder::default();
        let mut users = std::collections::HashSet::new();
        for i in 0..5_000 {
            let mut buf = Vec::new();
            synth.write(i, 1_704_067_200_000, &mut buf);
            let event = decoder.decode(&buf, 1_800_000_000_000).unwrap();
            assert_eq!(event.user_id, format!("u{:08}", synth.user(i)));
            users.insert(event.user_id);
        }
        assert!(users.len() > 990, "5,000 uniform draws over 1,000 users miss only a few: {}", users.len());
    }

    #[test]
    fn process_counters_read_procfs() {
        assert!(peak_rss_bytes(SELF) > 0);
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(cpu_seconds(SELF) > 0.0, "{x}");
    }
}
