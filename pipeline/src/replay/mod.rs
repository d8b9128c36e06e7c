//! `intentflow replay`: bounded, deterministic reprocessing of historical topics or event files
//! (Parquet or JSONL) into a separate state directory, with outputs to a backfill topic or a
//! Parquet or JSONL file.
//!
//! A replay fixes every partition's range `[from, to)` at start (timestamps are resolved per
//! partition with the broker's offsets-for-times), reads the partitions one after another —
//! several input topics of one partition merged in the live operator's order ([`topics`]) —
//! scores them with the same operator as `intentflow run`, under the run's validation limits,
//! writes states and offsets to its own RocksDB store, and exits with a summary. It never joins
//! or commits to a consumer group. Its intents carry the event's own time as `emitted_at`, and
//! the GRU's per-row steps do not depend on batch cuts, so replaying the same range with the same
//! model and the same starting state gives byte-identical outputs and states.
//!
//! The store is opened for bulk loading (no write-ahead log, large memtables) and flushed at
//! the end. The replay marker says `running` until then (see [`crate::state_dir`]), so a state
//! directory left by a crashed replay is refused, both by a new replay and by `run`, instead of
//! being continued.
//!
//! Modules: [`range`] (bounds), [`topics`] and [`files`] (the two kinds of source),
//! and [`progress`]; files larger than memory are put in time order by
//! [`crate::external_sort`].

mod files;
mod progress;
pub mod range;
mod topics;

pub use range::{resolve, Bound, PartitionEnds};

use crate::config::{parse_device, KafkaArgs, RunConfig};
use crate::kafka::{admin, KafkaClients};
use crate::output::Output;
use crate::state_dir::{ReplaySource, ReplayStatus, StateDir};
use anyhow::{bail, Context, Result};
use clap::Args;
use intentflow_model::{DeviceKind, IntentModel};
use intentflow_operators::emit::PolicyOutput;
use intentflow_operators::{EmittedAt, IntentOperator, PositionedEvent};
use intentflow_schemas::{IntentSchema, Limits, ScoredIntent};
use intentflow_state::changelog::ModelPolicy;
use intentflow_state::{StoreOptions, WriteBehind};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// Default of `--max-events-in-memory`: about 500 MB of events.
pub const MAX_EVENTS_IN_MEMORY: usize = 2_000_000;

/// Default of `--max-batch-records`, and the batch of `run --bootstrap-from`.
pub const MAX_BATCH_RECORDS: usize = 16_384;

/// Flags of `intentflow replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// `--brokers`, and `--config`: the operator's config file, whose Kafka client properties and
    /// validation limits (`max_record_bytes`) the replay uses, so that it sees exactly the
    /// records the live operator sees.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Input topic to replay; repeat for several, in the live operator's order (records of one
    /// partition are merged by timestamp, ties going to the earlier topic) [default: the config
    /// file's input topics].
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
    #[arg(long, default_value_t = MAX_BATCH_RECORDS)]
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
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceKind,
}

/// What a replay reads.
#[derive(Debug, Clone)]
pub enum Inputs {
    /// Kafka topics, in the live operator's order.
    Topics(Vec<String>),
    /// Event files and directories.
    Files(Vec<PathBuf>),
}

/// Where a replay's intents go.
#[derive(Debug, Clone)]
pub enum Target {
    /// A (backfill) topic.
    Topic(String),
    /// A Parquet or JSONL file.
    File(PathBuf),
    /// Nowhere: only the states are built (a bootstrap without a backfill topic).
    Discard,
}

/// A replay, resolved from flags or from the run's configuration.
#[derive(Debug, Clone)]
pub struct ReplayJob {
    /// The cluster's clients.
    pub clients: KafkaClients,
    /// What to read.
    pub inputs: Inputs,
    /// Start of the range.
    pub from: Bound,
    /// End of the range (exclusive).
    pub to: Bound,
    /// Trained model directory.
    pub model_dir: PathBuf,
    /// The replay's state directory.
    pub state_dir: PathBuf,
    /// Where intents go.
    pub target: Target,
    /// Records per batch.
    pub max_batch_records: usize,
    /// File replays: events held in memory while sorting.
    pub max_events_in_memory: usize,
    /// File replays: where sorted runs are spilled.
    pub spill_dir: Option<PathBuf>,
    /// Device of the model.
    pub device: DeviceKind,
    /// Validation limits of input records (the run's).
    pub limits: Limits,
    /// Whether intents carry their reasons (the run's `reasons`).
    pub reasons: bool,
    /// The run's `[[output]]`s: their memories are built into the states (so the live operator
    /// goes on deciding from the history), their intents are not written.
    pub outputs: Vec<PolicyOutput>,
    /// The schema of the intents written (the run's `output_schema`).
    pub schema: IntentSchema,
}

impl ReplayArgs {
    /// The replay these flags ask for.
    ///
    /// # Errors
    ///
    /// Unparseable bounds, no input, an unreadable config file, an input topic as the output.
    pub fn job(&self) -> Result<ReplayJob> {
        let run = self.kafka.run_config()?;
        let inputs = if !self.input_files.is_empty() {
            Inputs::Files(self.input_files.clone())
        } else if !self.input_topics.is_empty() {
            Inputs::Topics(self.input_topics.clone())
        } else if self.kafka.config.is_some() {
            Inputs::Topics(run.input_topics.clone())
        } else {
            bail!("nothing to replay: give --input-topic or --input-file");
        };
        let target = match (&self.output, &self.output_topic, &inputs) {
            (Some(path), _, _) => Target::File(path.clone()),
            (None, Some(topic), _) => Target::Topic(topic.clone()),
            (None, None, Inputs::Topics(topics)) => Target::Topic(format!("{}-backfill", topics[0])),
            (None, None, Inputs::Files(_)) => Target::Topic("events-backfill".into()),
        };
        if let (Target::Topic(t), Inputs::Topics(topics)) = (&target, &inputs) {
            if topics.contains(t) {
                bail!("output topic {t} is an input topic");
            }
        }
        Ok(ReplayJob {
            clients: run.clients(),
            inputs,
            from: self.from.parse().map_err(anyhow::Error::msg).context("--from")?,
            to: self.to.parse().map_err(anyhow::Error::msg).context("--to")?,
            model_dir: self.model_dir.clone(),
            state_dir: self.state_dir.clone(),
            target,
            max_batch_records: self.max_batch_records.max(1),
            max_events_in_memory: self.max_events_in_memory,
            spill_dir: self.spill_dir.clone(),
            device: self.device,
            limits: run.limits(),
            reasons: run.reasons,
            outputs: run.policy_outputs()?,
            schema: run.output_schema,
        })
    }
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

/// Runs a replay.
///
/// # Errors
///
/// Bad ranges, a live operator's state directory, Kafka, model, file and state errors.
pub async fn replay(job: &ReplayJob) -> Result<ReplaySummary> {
    let dir = StateDir::new(&job.state_dir);
    dir.refuse_for_replay()?;
    let started = Instant::now();
    let model = IntentModel::load(&job.model_dir, &job.device.open()?)?;
    tracing::info!(version = model.version(), "model loaded");
    let source = match job.inputs {
        Inputs::Topics(_) => ReplaySource::Topics,
        Inputs::Files(_) => ReplaySource::Files,
    };
    // A file row's position is no Kafka offset, and file names repeat across directories: no
    // fences from files.
    let operator = IntentOperator::new(model)
        .with_fencing(source == ReplaySource::Topics)
        .with_reasons(job.reasons)
        .with_outputs(job.outputs.clone())?
        .with_gpu_resident_slots(crate::config::DEFAULT_GPU_RESIDENT_USERS)?;
    let store = std::sync::Arc::new(dir.open_store(StoreOptions::bulk())?);
    StateDir::adopt_model(&store, operator.model().version(), ModelPolicy::Refuse)?;

    let producer;
    let mut output: Output<'_, ScoredIntent> = match &job.target {
        Target::File(path) => Output::file(path)?,
        Target::Discard => Output::Discard,
        Target::Topic(topic) => {
            let partitions = match &job.inputs {
                Inputs::Topics(t) => admin::input_partition_count(&job.clients, t)?,
                Inputs::Files(_) => 4,
            };
            admin::ensure_topic(&job.clients, topic, partitions).await?;
            producer = job.clients.producer(&[("linger.ms", "50")])?;
            Output::topic(&producer, topic, false)
        }
    };
    let mut summary = ReplaySummary::default();
    let mut scorer = Scorer { operator: &operator, writer: WriteBehind::new(store.clone()), summary: &mut summary, dir: &dir, source, schema: job.schema, writing: false };
    match &job.inputs {
        Inputs::Topics(topics) => topics::replay_topics(job, topics, &job.from, &job.to, &mut scorer, &mut output).await?,
        Inputs::Files(inputs) => {
            let window = |b: &Bound, default: i64| match b {
                Bound::Time(ms) => Ok(*ms),
                Bound::Earliest | Bound::Latest => Ok(default),
                Bound::Offsets(_) => bail!("file replays take time bounds, not partition offsets"),
            };
            let span = (window(&job.from, i64::MIN)?, window(&job.to, i64::MAX)?);
            files::replay_files(job, inputs, span, &mut scorer, &mut output).await?;
        }
    }
    // The last batch's states land before the store is flushed.
    scorer.writer.wait()?;
    output.finish().await?;
    store.flush()?;
    dir.mark_replay(operator.model().version(), source, ReplayStatus::Complete)?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Scores batches into the replay's store and counts them.
pub struct Scorer<'a> {
    operator: &'a IntentOperator,
    /// Writes each batch's states and next offsets while the next batch is scored.
    writer: WriteBehind,
    summary: &'a mut ReplaySummary,
    dir: &'a StateDir,
    source: ReplaySource,
    /// The schema of the intents returned.
    schema: IntentSchema,
    /// Whether states have been written (and the marker says `running`).
    writing: bool,
}

impl Scorer<'_> {
    /// Scores one batch of valid events, hands the states and the next offsets to the writer
    /// (they reach RocksDB while the next batch is scored, which reads them meanwhile), returns
    /// the intents. The first batch marks the state directory `running`: a replay that fails
    /// before (a bad file, an unreachable broker) leaves the directory as it was. A batch's
    /// intents go out before its write is known to have succeeded; a failed write fails the
    /// next batch or the end of the replay, which leaves the directory marked `running`:
    /// refused by `run` and by a new replay, as after a crash.
    ///
    /// # Errors
    ///
    /// Marker, scoring and state errors (of this batch's read, or of the last batch's write).
    pub fn score<'o>(&mut self, events: &[PositionedEvent], next: impl IntoIterator<Item = (&'o str, i32, i64)>) -> Result<Vec<ScoredIntent>> {
        if !self.writing {
            self.dir.mark_replay(self.operator.model().version(), self.source, ReplayStatus::Running)?;
            self.writing = true;
        }
        let out = self.operator.process(events, &self.writer.view(), EmittedAt::EventTime)?;
        let mut staged = self.writer.next_batch();
        for (p, u, s) in &out.states {
            staged.put_user(*p, u, s.encode());
        }
        for (topic, p, o) in next {
            staged.put_offset(topic.to_string(), p, o);
        }
        self.writer.write(staged)?;
        self.summary.events += events.len() as u64;
        self.summary.outputs += out.scored.len() as u64;
        Ok(out.intents_as(events, self.schema).collect())
    }
}

/// `intentflow run --bootstrap-from`: replays the input topics from `cfg.bootstrap_from` to
/// their current end into the operator's (not yet live) state directory, emitting the
/// history's intents only to `cfg.bootstrap_output_topic` if one is set (otherwise they are not
/// even serialised); the runtime then adopts the replayed state and goes live where the replay
/// ended. Does nothing when no bootstrap is asked for or the state directory is already live.
///
/// # Errors
///
/// Whatever the replay fails with.
pub async fn bootstrap(cfg: &RunConfig) -> Result<()> {
    if cfg.bootstrap_from.is_empty() {
        return Ok(());
    }
    if StateDir::new(&cfg.state_dir).is_live() {
        tracing::info!(state_dir = %cfg.state_dir.display(), "bootstrap skipped: the state directory is already live");
        return Ok(());
    }
    let job = ReplayJob {
        clients: cfg.clients(),
        inputs: Inputs::Topics(cfg.input_topics.clone()),
        from: cfg.bootstrap_from.parse().map_err(anyhow::Error::msg).context("bootstrap_from")?,
        to: Bound::Latest,
        model_dir: cfg.model_dir.clone(),
        state_dir: cfg.state_dir.clone(),
        target: if cfg.bootstrap_output_topic.is_empty() { Target::Discard } else { Target::Topic(cfg.bootstrap_output_topic.clone()) },
        max_batch_records: MAX_BATCH_RECORDS,
        max_events_in_memory: MAX_EVENTS_IN_MEMORY,
        spill_dir: None,
        device: cfg.device,
        limits: cfg.limits(),
        reasons: cfg.reasons,
        outputs: cfg.policy_outputs()?,
        schema: cfg.output_schema,
    };
    let s = replay(&job).await?;
    tracing::info!(events = s.events, invalid = s.invalid, seconds = s.seconds, ranges = ?s.ranges, "bootstrap: states built from history");
    Ok(())
}
