//! The batch-style commands, one module each: `generate`, `import`, `train`, `eval`, `tail`, `bench`, `config`, `erase`
//! (`run` is [`crate::runtime`], `replay` is [`crate::replay`]).
//!
//! Shared here: how a command names an input file ([`InputArgs`]) and where event commands write
//! ([`EventOutputArgs`]).

pub mod anticipation;
pub mod bench;
pub mod config;
pub mod erase;
pub mod eval;
pub mod generate;
pub mod import;
pub mod status;
pub mod tail;
pub mod train;

use crate::config::KafkaArgs;
use crate::output::{ensure_output_topic, Output, Record};
use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use intentflow_formats::{Format, Imported};
use intentflow_schemas::{EventDecoder, Limits};
use std::path::{Path, PathBuf};

/// `--format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// Schema-v1 events, one JSON object per line.
    Jsonl,
    /// Schema-v1 events as Parquet columns.
    Parquet,
    /// REES46 "eCommerce behavior data from multi category store" CSV.
    Rees46,
    /// Alibaba Tianchi Taobao UserBehavior CSV.
    Taobao,
    /// RetailRocket e-commerce dataset `events.csv`.
    Retailrocket,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Jsonl => Format::Jsonl,
            FormatArg::Parquet => Format::Parquet,
            FormatArg::Rees46 => Format::Rees46,
            FormatArg::Taobao => Format::Taobao,
            FormatArg::Retailrocket => Format::RetailRocket,
        }
    }
}

/// An input event file.
#[derive(Debug, Clone, Args)]
pub struct InputArgs {
    /// Input file.
    #[arg(long)]
    pub input: PathBuf,
    /// Layout of the input file.
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: FormatArg,
}

/// Reads an input file in time order, validated under `limits` (the operator's), with a progress
/// bar over its bytes on a terminal for files over 8 MiB, and reports the rows skipped.
///
/// # Errors
///
/// If the file cannot be read.
pub fn read_input(args: &InputArgs, limits: Limits) -> Result<Imported> {
    let path = &args.input;
    let imported = intentflow_formats::read_events_with(path, args.format.into(), &EventDecoder::new(limits), progress_reader(path))?;
    report_bad_rows(path, &imported.bad, imported.bad.len());
    Ok(imported)
}

/// Wraps a file being read in a progress bar over its bytes, on a terminal for files over 8 MiB.
pub fn progress_reader(path: &Path) -> impl FnOnce(std::fs::File, u64) -> Box<dyn std::io::Read> + '_ {
    move |file, size| {
        if size > 8 << 20 && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = ProgressBar::new(size);
            bar.set_style(ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}").expect("valid template"));
            bar.set_message(format!("reading {}", path.display()));
            Box::new(bar.wrap_read(file))
        } else {
            Box::new(file)
        }
    }
}

/// Writes `records` spread over about `seconds`: each when its time's share of their span has
/// passed (records come in time order; an earlier one after a later goes at once).
async fn paced<R: Record>(out: &mut Output<'_, R>, records: Vec<R>, seconds: f64) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let (first, last) = records.iter().fold((i64::MAX, i64::MIN), |(lo, hi), r| (lo.min(r.time_ms()), hi.max(r.time_ms())));
    let span = (last - first).max(1) as f64;
    let start = tokio::time::Instant::now();
    let mut due: Vec<R> = Vec::new();
    for r in records {
        let at = std::time::Duration::from_secs_f64((r.time_ms() - first) as f64 / span * seconds);
        // Sleeps of at least 50 ms: what is due by then goes out together.
        if at > start.elapsed() + std::time::Duration::from_millis(50) {
            out.write(due.drain(..)).await?;
            tokio::time::sleep_until(start + at).await;
        }
        due.push(r);
    }
    out.write(due).await
}

/// Prints the first of `total` skipped rows of `path` (`first` holds at least the first ten).
pub fn report_bad_rows(path: &Path, first: &[intentflow_formats::BadRow], total: usize) {
    for b in first.iter().take(10) {
        eprintln!("{}:{}: skipped: {}", path.display(), b.line, b.reason);
    }
    if total > 10 {
        eprintln!("{}: {} more rows skipped", path.display(), total - 10);
    }
}

/// Where event commands write: a JSONL or Parquet file, or a Kafka topic.
#[derive(Debug, Clone, Args)]
pub struct EventOutputArgs {
    /// Write to this file: Parquet if it ends in `.parquet`, schema-v1 JSONL otherwise.
    #[arg(long, conflicts_with = "topic", required_unless_present = "topic")]
    pub output: Option<PathBuf>,
    /// Produce to this Kafka topic, keyed by user id.
    #[arg(long)]
    pub topic: Option<String>,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Partitions of the topic if it has to be created.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// With --topic: stamp each record with its event time instead of the producer's clock, so
    /// that `intentflow replay --from/--to` times select by event time. A topic created here
    /// then gets unlimited time retention (`retention.ms=-1`): under the broker's default of 7
    /// days, records stamped with a past event time are deleted within minutes. Give an
    /// existing topic that setting yourself.
    #[arg(long, requires = "topic")]
    pub event_time: bool,
    /// With --topic: spread the events over about this many seconds, each sent when its share of
    /// the events' time span has passed: their own rhythm, compressed (or stretched), for a live
    /// demonstration. Without it events go as fast as the broker takes them.
    #[arg(long, requires = "topic")]
    pub pace_seconds: Option<f64>,
}

impl EventOutputArgs {
    /// Writes `records`; returns how many.
    ///
    /// # Errors
    ///
    /// File or Kafka failures.
    pub async fn write<R: Record>(&self, records: Vec<R>) -> Result<u64> {
        let n = records.len() as u64;
        if let Some(path) = &self.output {
            let mut out = Output::file(path)?;
            out.write(records).await?;
            out.finish().await?;
            return Ok(n);
        }
        let topic = self.topic.as_deref().expect("clap requires --output or --topic");
        let clients = self.kafka.clients()?;
        ensure_output_topic(&clients, topic, self.partitions, self.event_time).await?;
        let producer = clients.producer(&[])?;
        let mut out = Output::topic(&producer, topic, self.event_time);
        match self.pace_seconds.filter(|s| *s > 0.0) {
            Some(seconds) => paced(&mut out, records, seconds).await?,
            None => out.write(records).await?,
        }
        out.finish().await?;
        Ok(n)
    }

    /// Where the events went, for the summary line.
    pub fn describe(&self) -> String {
        match (&self.output, &self.topic) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(t)) => format!("topic {t} on {}", self.kafka.run_config().map(|c| c.brokers).unwrap_or_default()),
            (None, None) => String::new(),
        }
    }
}
