//! `intentflow replay`: bounded, deterministic reprocessing of historical topics or event files
//! (Parquet or JSONL) into a separate state directory, with outputs to a backfill topic or a
//! Parquet or JSONL file.
//!
//! A replay fixes every partition's range `[from, to)` at start (timestamps are resolved per
//! partition with the broker's offsets-for-times), reads the partitions one after another in
//! offset order, scores them with the same operator as `intentflow run`, writes states and
//! offsets to its own RocksDB store, and exits with a summary. It never joins or commits to a
//! consumer group. Its intents carry the event's own time as `emitted_at`, and the GRU's per-row
//! steps do not depend on batch cuts, so replaying the same range with the same model and the
//! same starting state gives byte-identical outputs and states.
//!
//! The store is opened for bulk loading (no write-ahead log, large memtables) and flushed at
//! the end. The `REPLAY` marker says `running` until then, so a state directory left by a
//! crashed replay is refused, both by a new replay and by `run`, instead of being continued.

mod merge;

use crate::kafka::{self, DeliveryWindow};
use anyhow::{bail, Context, Result};
use clap::Args;
use intentflow_model::{DeviceKind, IntentModel};
use intentflow_operators::columnar::IntentWriter;
use intentflow_operators::{decode::decode_batch, encode::encode_intent, EmittedAt, IntentOperator, PositionedEvent, SourceRecord};
use intentflow_schemas::{EventDecoder, Limits, SourcePosition};
use intentflow_state::{StateStore, StoreOptions};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Default of `--max-events-in-memory`: about 500 MB of events.
const MAX_EVENTS_IN_MEMORY: usize = 2_000_000;

/// Flags of `intentflow replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Input topic to replay; repeat for several.
    #[arg(long = "input-topic")]
    pub input_topics: Vec<String>,
    /// Event file or directory to replay instead of topics: Parquet or schema-v1 JSONL, told
    /// apart by content; directories are searched for *.parquet, *.jsonl, *.ndjson and *.json.
    /// Repeat for several. All are read, then replayed together in event-time order; time
    /// bounds apply to the event time.
    #[arg(long = "input-file", conflicts_with = "input_topics")]
    pub input_files: Vec<PathBuf>,
    /// Start of the range: `earliest`, `latest`, an RFC 3339 time, or `partition:offset,…`.
    #[arg(long, default_value = "earliest")]
    pub from: String,
    /// End of the range (exclusive), same forms as `--from`; `latest` is the end when the replay starts.
    #[arg(long, default_value = "latest")]
    pub to: String,
    /// Trained model directory.
    #[arg(long)]
    pub model_dir: PathBuf,
    /// State directory of the replay: a new one, or one a replay wrote, never a live operator's.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Output topic [default: `<first input topic>-backfill`].
    #[arg(long, conflicts_with = "output")]
    pub output_topic: Option<String>,
    /// Write intents to this file instead of a topic: Parquet if it ends in `.parquet`, JSONL
    /// otherwise.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Records per batch.
    #[arg(long, default_value_t = 16_384)]
    pub max_batch_records: usize,
    /// File replays: events held in memory while sorting them by time (about 250 bytes each).
    /// Beyond it, sorted runs are spilled to disk and merged; the output is the same.
    #[arg(long, default_value_t = MAX_EVENTS_IN_MEMORY)]
    pub max_events_in_memory: usize,
    /// File replays: where sorted runs are spilled [default: the state directory]. Needs about
    /// the events' size as JSON; removed when the replay ends.
    #[arg(long)]
    pub spill_dir: Option<PathBuf>,
    /// Device: cpu or cuda.
    #[arg(long, default_value = "cpu", value_parser = crate::config::parse_device)]
    pub device: DeviceKind,
}

/// One end of a replay range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    /// The partition's oldest retained offset.
    Earliest,
    /// The partition's end when the replay starts.
    Latest,
    /// The first offset whose timestamp is at or after this time (epoch ms).
    Time(i64),
    /// Explicit offsets per partition; partitions not listed take `Earliest` (for `--from`) or
    /// `Latest` (for `--to`).
    Offsets(BTreeMap<i32, i64>),
}

impl std::str::FromStr for Bound {
    type Err = String;

    fn from_str(s: &str) -> Result<Bound, String> {
        match s.trim() {
            "earliest" => Ok(Bound::Earliest),
            "latest" => Ok(Bound::Latest),
            t if t.contains(':') && !t.contains('T') => t
                .split(',')
                .map(|pair| {
                    let (p, o) = pair.split_once(':').ok_or_else(|| format!("`{pair}` is not partition:offset"))?;
                    Ok((p.trim().parse::<i32>().map_err(|e| format!("partition `{p}`: {e}"))?, o.trim().parse::<i64>().map_err(|e| format!("offset `{o}`: {e}"))?))
                })
                .collect::<Result<BTreeMap<_, _>, String>>()
                .map(Bound::Offsets),
            t => chrono::DateTime::parse_from_rfc3339(t)
                .map(|d| Bound::Time(d.timestamp_millis()))
                .map_err(|e| format!("`{t}` is neither earliest, latest, an RFC 3339 time nor partition:offset,…: {e}")),
        }
    }
}

/// What is known of a partition when its range is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionEnds {
    /// Oldest retained offset.
    pub low: i64,
    /// High watermark when the replay starts.
    pub high: i64,
}

/// The offset a bound stands for on one partition, clamped to `[low, high]`. `by_time` is the
/// broker's answer to offsets-for-times for a [`Bound::Time`] (`None`: no record that late).
pub fn resolve(bound: &Bound, partition: i32, ends: PartitionEnds, by_time: Option<i64>, is_start: bool) -> i64 {
    let offset = match bound {
        Bound::Earliest => ends.low,
        Bound::Latest => ends.high,
        Bound::Time(_) => by_time.unwrap_or(ends.high),
        Bound::Offsets(map) => map.get(&partition).copied().unwrap_or(if is_start { ends.low } else { ends.high }),
    };
    offset.clamp(ends.low, ends.high)
}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReplaySummary {
    /// Valid events scored.
    pub events: u64,
    /// Intents written.
    pub outputs: u64,
    /// Records rejected as invalid.
    pub invalid: u64,
    /// Per source `(topic or file, partition)`: the replayed range `[from, to)`.
    pub ranges: BTreeMap<(String, i32), (i64, i64)>,
    /// Wall time.
    pub seconds: f64,
}

/// Where a replay's intents go.
enum Output<'p> {
    Topic { window: DeliveryWindow<'p>, topic: String },
    Jsonl(std::io::BufWriter<std::fs::File>),
    Parquet(IntentWriter),
}

impl Output<'_> {
    async fn write(&mut self, intents: Vec<intentflow_schemas::ScoredIntent>) -> Result<()> {
        match self {
            Output::Topic { window, topic } => {
                for i in &intents {
                    window.send(topic, i.user_id.as_bytes(), &encode_intent(i)).await?;
                }
            }
            Output::Jsonl(w) => {
                for i in &intents {
                    w.write_all(&encode_intent(i))?;
                    w.write_all(b"\n")?;
                }
            }
            Output::Parquet(w) => w.write(intents)?,
        }
        Ok(())
    }

    async fn finish(self) -> Result<()> {
        match self {
            Output::Topic { mut window, .. } => {
                window.finish().await?;
            }
            Output::Jsonl(mut w) => w.flush()?,
            Output::Parquet(w) => {
                w.finish()?;
            }
        }
        Ok(())
    }
}

/// Marker file a replay leaves in its state directory: the model, then `status running` until
/// the replay has flushed its store, `status complete` after.
pub const REPLAY_MARKER: &str = "REPLAY";

/// Whether the replay that wrote `state_dir` finished: `None` if no replay marker is there.
/// (Markers written before the status line existed count as complete.)
///
/// # Errors
///
/// If the marker cannot be read.
pub fn replay_complete(state_dir: &Path) -> Result<Option<bool>> {
    let path = state_dir.join(REPLAY_MARKER);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(!text.lines().any(|l| l.trim() == "status running")))
}

/// Refuses a state directory whose replay did not finish.
///
/// # Errors
///
/// When the directory holds an unfinished replay, or its marker cannot be read.
pub fn refuse_unfinished(state_dir: &Path) -> Result<()> {
    if replay_complete(state_dir)? == Some(false) {
        bail!(
            "{} holds a replay that did not finish (its states are partial and, written without a write-ahead log, \
             may not even match its offsets); replay again into a fresh --state-dir",
            state_dir.display()
        );
    }
    Ok(())
}

/// Runs `intentflow replay`.
///
/// # Errors
///
/// Bad ranges, a live operator's state directory, Kafka, model, file and state errors.
pub async fn replay(args: &ReplayArgs) -> Result<ReplaySummary> {
    if args.input_topics.is_empty() && args.input_files.is_empty() {
        bail!("nothing to replay: give --input-topic or --input-file");
    }
    if args.state_dir.join("INSTANCE_ID").exists() {
        bail!("{} is a live operator's state directory; a replay needs its own", args.state_dir.display());
    }
    refuse_unfinished(&args.state_dir)?;
    let from: Bound = args.from.parse().map_err(anyhow::Error::msg).context("--from")?;
    let to: Bound = args.to.parse().map_err(anyhow::Error::msg).context("--to")?;
    let started = Instant::now();
    let model = IntentModel::load(&args.model_dir, &args.device.open()?)?;
    tracing::info!(version = model.version(), "model loaded");
    let operator = IntentOperator::new(model);
    let store = StateStore::open(&args.state_dir, StoreOptions::bulk()).with_context(|| format!("opening {}", args.state_dir.display()))?;
    crate::runtime::adopt_model(&store, operator.model().version(), false)?;
    let marker = Marker { path: args.state_dir.join(REPLAY_MARKER), model: operator.model().version().to_string() };

    let producer;
    let mut output = match &args.output {
        Some(path) if crate::commands::is_parquet_name(path) => Output::Parquet(IntentWriter::create(path)?),
        Some(path) => Output::Jsonl(std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?)),
        None => {
            let topic = args.output_topic.clone().unwrap_or_else(|| format!("{}-backfill", args.input_topics.first().map_or("events", String::as_str)));
            if args.input_topics.contains(&topic) {
                bail!("output topic {topic} is an input topic");
            }
            let partitions = match args.input_topics.first() {
                Some(t) => kafka::partition_count(&args.brokers, t)?.unwrap_or(4),
                None => 4,
            };
            kafka::ensure_topic(&args.brokers, &topic, partitions).await?;
            producer = kafka::producer(&args.brokers, &[("linger.ms".to_string(), "50".to_string())].into())?;
            Output::Topic { window: DeliveryWindow::new(&producer, 200_000), topic }
        }
    };
    let mut summary = ReplaySummary::default();
    let mut scorer = Scorer { operator: &operator, store: &store, summary: &mut summary, marker: &marker, writing: false };
    if args.input_files.is_empty() {
        replay_topics(args, &from, &to, &mut scorer, &mut output).await?;
    } else {
        let window = |b: &Bound, default: i64| match b {
            Bound::Time(ms) => Ok(*ms),
            Bound::Earliest | Bound::Latest => Ok(default),
            Bound::Offsets(_) => bail!("file replays take time bounds, not partition offsets"),
        };
        let span = (window(&from, i64::MIN)?, window(&to, i64::MAX)?);
        replay_files(args, span, &mut scorer, &mut output).await?;
    }
    output.finish().await?;
    store.flush()?;
    marker.set("complete")?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// The replay marker of a state directory.
struct Marker {
    path: PathBuf,
    model: String,
}

impl Marker {
    fn set(&self, status: &str) -> Result<()> {
        std::fs::write(&self.path, format!("model {}\nstatus {status}\n", self.model)).with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Scores batches into the replay's store and counts them.
struct Scorer<'a> {
    operator: &'a IntentOperator,
    store: &'a StateStore,
    summary: &'a mut ReplaySummary,
    marker: &'a Marker,
    /// Whether states have been written (and the marker says `running`).
    writing: bool,
}

impl Scorer<'_> {
    /// Scores one batch of valid events, writes the states and the next offsets, returns the
    /// intents. The first batch marks the state directory `running`: a replay that fails
    /// before (a bad file, an unreachable broker) leaves the directory as it was.
    fn score(&mut self, events: &[PositionedEvent], next: Option<(&str, i32, i64)>) -> Result<Vec<intentflow_schemas::ScoredIntent>> {
        if !self.writing {
            self.marker.set("running")?;
            self.writing = true;
        }
        let out = self.operator.process(events, self.store, EmittedAt::EventTime)?;
        self.store.commit(out.states.iter().map(|(p, u, s)| (*p, u.as_str(), s)), next, [])?;
        self.summary.events += events.len() as u64;
        self.summary.outputs += out.intents.len() as u64;
        Ok(out.intents)
    }
}

async fn replay_topics(args: &ReplayArgs, from: &Bound, to: &Bound, scorer: &mut Scorer<'_>, output: &mut Output<'_>) -> Result<()> {
    let mut cfg = kafka::reader_config(&args.brokers, &BTreeMap::new(), "intentflow-replay", "read_committed");
    cfg.set("fetch.max.bytes", "104857600")
        .set("max.partition.fetch.bytes", "16777216")
        .set("queued.min.messages", "200000");
    let consumer: BaseConsumer = cfg.create()?;
    let decoder = EventDecoder::new(Limits::default());

    // Fix every range before reading anything.
    let mut ranges = Vec::new();
    for topic in &args.input_topics {
        let partitions = kafka::partition_count(&args.brokers, topic)?.with_context(|| format!("topic {topic} does not exist"))?;
        let by_time = |bound: &Bound| -> Result<BTreeMap<i32, i64>> {
            let Bound::Time(ms) = bound else { return Ok(BTreeMap::new()) };
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition_offset(topic, p, Offset::Offset(*ms))?;
            }
            let found = consumer.offsets_for_times(tpl, Duration::from_secs(30))?;
            Ok(found.elements().iter().filter_map(|e| e.offset().to_raw().filter(|o| *o >= 0).map(|o| (e.partition(), o))).collect())
        };
        let (from_times, to_times) = (by_time(from)?, by_time(to)?);
        for p in 0..partitions {
            let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(30))?;
            let ends = PartitionEnds { low, high };
            let start = resolve(from, p, ends, from_times.get(&p).copied(), true);
            let end = resolve(to, p, ends, to_times.get(&p).copied(), false).max(start);
            ranges.push((topic.clone(), p, start, end));
        }
    }
    let total: i64 = ranges.iter().map(|(_, _, s, e)| e - s).sum();
    tracing::info!(partitions = ranges.len(), offsets = total, "replay ranges fixed");
    let progress = Progress::new(ranges.iter().map(|(t, p, s, e)| (format!("{t}/{p}"), (e - s) as u64)).collect());

    for (index, (topic, partition, start, end)) in ranges.into_iter().enumerate() {
        scorer.summary.ranges.insert((topic.clone(), partition), (start, end));
        if start >= end {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition, Offset::Offset(start))?;
        consumer.assign(&tpl)?;
        let mut batch: Vec<rdkafka::message::OwnedMessage> = Vec::with_capacity(args.max_batch_records);
        loop {
            let done = kafka::read_range(&consumer, &topic, partition, end, args.max_batch_records, |m| {
                batch.push(m.detach());
                Ok(())
            })?;
            let intents = score_records(&decoder, &batch, scorer)?;
            output.write(intents).await?;
            progress.advance(index, batch.len() as u64);
            batch.clear();
            if done.is_some() {
                break;
            }
        }
    }
    progress.finish();
    Ok(())
}

/// Decodes and scores consumed records of one partition, in offset order.
fn score_records(decoder: &EventDecoder, batch: &[rdkafka::message::OwnedMessage], scorer: &mut Scorer<'_>) -> Result<Vec<intentflow_schemas::ScoredIntent>> {
    let Some(last) = batch.last() else { return Ok(Vec::new()) };
    let records = batch.iter().map(|m| SourceRecord {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        payload: m.payload(),
    });
    let decoded = decode_batch(decoder, records, chrono::Utc::now().timestamp_millis());
    scorer.summary.invalid += decoded.rejected.len() as u64;
    crate::runtime::log_rejections(&decoded.rejected);
    scorer.score(&decoded.events, Some((last.topic(), last.partition(), last.offset() + 1)))
}

/// Replays event files (and the event files under directories) in event-time order, keeping
/// the events with `span.0 <= time < span.1`. The files are streamed into an external sort
/// (bounded by `--max-events-in-memory`), so their size is bounded by disk, not memory.
///
/// Order: by time, then file (as given), then row, the stable time order of all files' rows.
/// Positions: the file, and the event's index in the file's time order, so a row keeps its
/// position whatever the time window.
async fn replay_files(args: &ReplayArgs, span: (i64, i64), scorer: &mut Scorer<'_>, output: &mut Output<'_>) -> Result<()> {
    let files = expand_inputs(&args.input_files)?;
    let names: Vec<String> = files.iter().map(|p| file_name(p)).collect();
    let mut sort = merge::ExternalSort::new(args.max_events_in_memory, args.spill_dir.as_deref().unwrap_or(&args.state_dir));
    // Per file: valid events before the window (where its kept events start in its time order).
    let mut before = vec![0u64; files.len()];
    for (index, path) in files.iter().enumerate() {
        let (mut invalid, kept_from) = (0u64, sort.len());
        let mut pushed = Ok(());
        crate::import::for_each_event(path, |row, event| match event {
            Ok(e) if e.ts < span.0 => before[index] += 1,
            Ok(e) if e.ts >= span.1 => {}
            Ok(event) if pushed.is_ok() => pushed = sort.push(merge::Keyed { file: index as u32, row: row as u64, event }),
            Ok(_) => {}
            Err(reason) => {
                invalid += 1;
                if invalid <= 10 {
                    tracing::warn!(file = %path.display(), row, %reason, "invalid event skipped");
                }
            }
        })?;
        pushed?;
        scorer.summary.invalid += invalid;
        let kept = sort.len() - kept_from;
        tracing::info!(file = %path.display(), kept, before_window = before[index], invalid, "file read");
        let range = if kept == 0 { (0, 0) } else { (before[index] as i64, (before[index] + kept) as i64) };
        scorer.summary.ranges.insert((names[index].clone(), 0), range);
    }
    if sort.runs() > 0 {
        // The buffer becomes the last run.
        tracing::info!(events = sort.len(), runs = sort.runs() + 1, "events exceed --max-events-in-memory: merging sorted runs from disk");
    }
    let progress = Progress::new(vec![("files".to_string(), sort.len())]);
    let mut next = before;
    let mut sorted = sort.sorted()?.peekable();
    while sorted.peek().is_some() {
        let chunk: Vec<PositionedEvent> = sorted
            .by_ref()
            .take(args.max_batch_records.max(1))
            .map(|keyed| {
                let merge::Keyed { file, event, .. } = keyed?;
                let offset = &mut next[file as usize];
                *offset += 1;
                Ok(PositionedEvent { source: SourcePosition { topic: names[file as usize].clone(), partition: 0, offset: *offset as i64 - 1 }, event })
            })
            .collect::<Result<_>>()?;
        let intents = scorer.score(&chunk, None)?;
        output.write(intents).await?;
        progress.advance(0, chunk.len() as u64);
    }
    progress.finish();
    Ok(())
}

/// The event files named by `inputs`: files as given, directories searched recursively for
/// `*.parquet`, `*.jsonl`, `*.ndjson` and `*.json` (hidden and `_`-prefixed entries, such as
/// `_SUCCESS`, skipped), in path order.
fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading directory {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for path in entries {
            let name = file_name(&path);
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| ["parquet", "jsonl", "ndjson", "json"].contains(&e.to_ascii_lowercase().as_str())) {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let before = files.len();
            walk(input, &mut files)?;
            if files.len() == before {
                bail!("{} holds no event files (*.parquet, *.jsonl, *.ndjson, *.json)", input.display());
            }
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

/// Progress of a replay, per source partition (or for all files): on a terminal, the bar of the
/// partition being read (events/s, ETA) above a bar for the whole replay, and a line per
/// finished partition; otherwise a log line every 5 s and one per finished partition.
struct Progress {
    parts: Vec<(String, u64)>,
    /// Sum of the parts' lengths.
    all: u64,
    multi: Option<indicatif::MultiProgress>,
    total: Option<indicatif::ProgressBar>,
    /// The part being read: its index, bar and records read.
    current: std::cell::RefCell<Option<(usize, indicatif::ProgressBar, u64)>>,
    last_log: std::cell::Cell<Instant>,
    done: std::cell::Cell<u64>,
    started: Instant,
    /// When the current part began: the previous part's end (or the start), so that a part's time
    /// includes reading and scoring its first batch.
    part_started: std::cell::Cell<Instant>,
}

impl Progress {
    /// `parts`: each partition's label and number of offsets (or events) to read, in read order.
    fn new(parts: Vec<(String, u64)>) -> Progress {
        let all: u64 = parts.iter().map(|(_, n)| n).sum();
        let multi = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(indicatif::MultiProgress::new);
        let total = multi.as_ref().map(|m| {
            let bar = m.add(Self::bar(all));
            bar.set_prefix("all");
            bar
        });
        let now = Instant::now();
        use std::cell::Cell;
        Progress { parts, all, multi, total, current: Default::default(), last_log: Cell::new(now), done: Cell::new(0), started: now, part_started: Cell::new(now) }
    }

    fn bar(len: u64) -> indicatif::ProgressBar {
        let bar = indicatif::ProgressBar::new(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix:>24} [{bar:30}] {human_pos}/{human_len} {rate} ETA {eta}")
                .expect("valid template")
                .with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| write!(w, "{:.0} events/s", state.per_sec()).unwrap_or_default()),
        );
        bar
    }

    /// Records `n` more records read from part `index`.
    fn advance(&self, index: usize, n: u64) {
        let mut current = self.current.borrow_mut();
        if current.as_ref().is_none_or(|(i, ..)| *i != index) {
            self.close(current.take());
            let bar = match &self.multi {
                Some(m) => m.insert(0, Self::bar(self.parts[index].1)),
                None => indicatif::ProgressBar::hidden(),
            };
            bar.set_prefix(self.parts[index].0.clone());
            *current = Some((index, bar, 0));
        }
        let (_, bar, read) = current.as_mut().expect("set above");
        bar.inc(n);
        *read += n;
        self.done.set(self.done.get() + n);
        if let Some(total) = &self.total {
            total.inc(n);
        } else if self.last_log.get().elapsed() > Duration::from_secs(5) {
            let (label, len) = &self.parts[index];
            let rate = self.done.get() as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            let eta = (self.all.saturating_sub(self.done.get())) as f64 / rate.max(1e-9);
            tracing::info!(partition = %label, read = *read, of = len, total_read = self.done.get(), total = self.all, rate = rate.round(), eta_s = eta.round(), "replay progress");
            self.last_log.set(Instant::now());
        }
    }

    fn close(&self, part: Option<(usize, indicatif::ProgressBar, u64)>) {
        let Some((index, bar, read)) = part else { return };
        bar.finish_and_clear();
        let seconds = self.part_started.get().elapsed().as_secs_f64();
        self.part_started.set(Instant::now());
        let line = format!("{}: {read} records in {seconds:.1} s ({:.0}/s)", self.parts[index].0, read as f64 / seconds.max(1e-9));
        match &self.multi {
            Some(m) => m.println(line).unwrap_or_default(),
            None => tracing::info!(partition = %self.parts[index].0, records = read, seconds, "replay partition done"),
        }
    }

    fn finish(&self) {
        self.close(self.current.borrow_mut().take());
        if let Some(total) = &self.total {
            total.finish_and_clear();
        }
    }
}

/// `intentflow run --bootstrap-from`: replays the input topics from `cfg.bootstrap_from` to
/// their current end into the operator's (not yet live) state directory, emitting the
/// history's intents only to `cfg.bootstrap_output_topic` if one is set; the runtime then adopts the replayed state and goes live where the replay ended.
/// Does nothing when no bootstrap is asked for or the state directory is already live.
///
/// # Errors
///
/// Whatever the replay fails with.
pub async fn bootstrap(cfg: &crate::config::RunConfig) -> Result<()> {
    if cfg.bootstrap_from.is_empty() {
        return Ok(());
    }
    if cfg.state_dir.join("INSTANCE_ID").exists() {
        tracing::info!(state_dir = %cfg.state_dir.display(), "bootstrap skipped: the state directory is already live");
        return Ok(());
    }
    let args = ReplayArgs {
        brokers: cfg.brokers.clone(),
        input_topics: cfg.input_topics.clone(),
        input_files: Vec::new(),
        from: cfg.bootstrap_from.clone(),
        to: "latest".into(),
        model_dir: cfg.model_dir.clone(),
        state_dir: cfg.state_dir.clone(),
        output_topic: Some(cfg.bootstrap_output_topic.clone()).filter(|t| !t.is_empty()),
        output: cfg.bootstrap_output_topic.is_empty().then(|| PathBuf::from("/dev/null")),
        max_batch_records: 16_384,
        max_events_in_memory: MAX_EVENTS_IN_MEMORY,
        spill_dir: None,
        device: cfg.device,
    };
    let s = replay(&args).await?;
    tracing::info!(events = s.events, invalid = s.invalid, seconds = s.seconds, ranges = ?s.ranges, "bootstrap: states built from history");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_parse_and_resolve_per_partition() {
        let ends = PartitionEnds { low: 10, high: 100 };
        assert_eq!("earliest".parse::<Bound>().unwrap(), Bound::Earliest);
        assert_eq!("2019-10-01T00:00:00Z".parse::<Bound>().unwrap(), Bound::Time(1_569_888_000_000));
        let offsets: Bound = "0:50, 2:7".parse().unwrap();
        assert_eq!(offsets, Bound::Offsets([(0, 50), (2, 7)].into()));
        assert!("yesterday".parse::<Bound>().is_err());
        assert!("0:x".parse::<Bound>().is_err());

        assert_eq!(resolve(&Bound::Earliest, 0, ends, None, true), 10);
        assert_eq!(resolve(&Bound::Latest, 0, ends, None, false), 100);
        // offsets-for-times found offset 42; found nothing that late: the end.
        assert_eq!(resolve(&Bound::Time(5), 0, ends, Some(42), true), 42);
        assert_eq!(resolve(&Bound::Time(5), 0, ends, None, false), 100);
        // Listed partitions take their offset (clamped to what is retained), others the edge.
        assert_eq!(resolve(&offsets, 0, ends, None, true), 50);
        assert_eq!(resolve(&offsets, 2, ends, None, true), 10, "7 was deleted by retention");
        assert_eq!(resolve(&offsets, 1, ends, None, true), 10);
        assert_eq!(resolve(&offsets, 1, ends, None, false), 100);
    }

    #[test]
    fn an_unfinished_replay_is_refused_and_a_finished_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(replay_complete(dir.path()).unwrap(), None);
        refuse_unfinished(dir.path()).unwrap();
        let marker = dir.path().join(REPLAY_MARKER);
        std::fs::write(&marker, "model abc\nstatus running\n").unwrap();
        assert_eq!(replay_complete(dir.path()).unwrap(), Some(false));
        let err = refuse_unfinished(dir.path()).unwrap_err().to_string();
        assert!(err.contains("did not finish") && err.contains("fresh --state-dir"), "{err}");
        std::fs::write(&marker, "model abc\nstatus complete\n").unwrap();
        refuse_unfinished(dir.path()).unwrap();
        std::fs::write(&marker, "model abc\n").unwrap();
        assert_eq!(replay_complete(dir.path()).unwrap(), Some(true), "markers from before the status line");
    }

    #[test]
    fn directories_expand_to_their_event_files_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b/2.jsonl", "b/1.parquet", "a.ndjson", "_SUCCESS", ".hidden.jsonl", "b/notes.txt", "_tmp/x.jsonl"] {
            let path = dir.path().join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"").unwrap();
        }
        let single = dir.path().join("b/notes.txt");
        let got = expand_inputs(&[dir.path().to_path_buf(), single.clone()]).unwrap();
        let want: Vec<PathBuf> = ["a.ndjson", "b/1.parquet", "b/2.jsonl"].iter().map(|f| dir.path().join(f)).chain([single]).collect();
        assert_eq!(got, want, "files given by name are taken as they are");
        let empty = tempfile::tempdir().unwrap();
        assert!(expand_inputs(&[empty.path().to_path_buf()]).unwrap_err().to_string().contains("holds no event files"));
    }
}
