//! One writer for every command's outputs: a Kafka topic, a JSONL file, a Parquet file, or
//! nowhere.
//!
//! `generate` and `import` write events, `replay` (and a bootstrap with a backfill topic)
//! writes scored intents; both go through [`Output`], so a topic is produced to the same way and
//! a Parquet file has the same chunking whoever writes it. [`Record`] says how a record is keyed,
//! timestamped and serialised.

use crate::kafka::{admin, DeliveryWindow, KafkaClients};
use anyhow::{Context, Result};
use intentflow_formats::columnar::{EventWriter, IntentWriter};
use intentflow_formats::generate::GeneratedEvent;
use intentflow_formats::is_parquet_name;
use intentflow_schemas::{Event, ScoredIntent};
use rdkafka::producer::FutureProducer;
use std::io::Write;
use std::path::Path;

/// Something an [`Output`] writes.
pub trait Record: Sized {
    /// The Parquet writer of this kind of record.
    type Parquet: ParquetRows<Self>;
    /// Its Kafka key: the user id.
    fn key(&self) -> &str;
    /// Its time (epoch ms), the record timestamp when a topic is stamped with event time.
    fn time_ms(&self) -> i64;
    /// Appends its JSON form (one line, no newline) to `out`.
    fn write_json(&self, out: &mut Vec<u8>);
}

/// A Parquet file of records of one kind.
pub trait ParquetRows<R>: Sized {
    /// Creates (or truncates) the file.
    ///
    /// # Errors
    ///
    /// If it cannot be created.
    fn create(path: &Path) -> Result<Self>;
    /// Appends one record.
    ///
    /// # Errors
    ///
    /// Write failures.
    fn push(&mut self, record: R) -> Result<()>;
    /// Writes the footer; returns the rows written.
    ///
    /// # Errors
    ///
    /// Write failures.
    fn close(self) -> Result<u64>;
}

impl ParquetRows<Event> for EventWriter {
    fn create(path: &Path) -> Result<Self> {
        Ok(EventWriter::create(path)?)
    }
    fn push(&mut self, record: Event) -> Result<()> {
        Ok(self.write(&record)?)
    }
    fn close(self) -> Result<u64> {
        Ok(self.finish()?)
    }
}

impl ParquetRows<GeneratedEvent> for EventWriter {
    fn create(path: &Path) -> Result<Self> {
        Ok(EventWriter::create(path)?)
    }
    /// Parquet takes the event alone, without the generator's oracle.
    fn push(&mut self, record: GeneratedEvent) -> Result<()> {
        Ok(self.write(&record.event)?)
    }
    fn close(self) -> Result<u64> {
        Ok(self.finish()?)
    }
}

impl ParquetRows<ScoredIntent> for IntentWriter {
    fn create(path: &Path) -> Result<Self> {
        Ok(IntentWriter::create(path)?)
    }
    fn push(&mut self, record: ScoredIntent) -> Result<()> {
        Ok(self.write([record])?)
    }
    fn close(self) -> Result<u64> {
        Ok(self.finish()?)
    }
}

impl Record for Event {
    type Parquet = EventWriter;
    fn key(&self) -> &str {
        &self.user_id
    }
    fn time_ms(&self) -> i64 {
        self.ts
    }
    fn write_json(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(out, self).expect("an event serialises");
    }
}

impl Record for GeneratedEvent {
    type Parquet = EventWriter;
    fn key(&self) -> &str {
        &self.event.user_id
    }
    fn time_ms(&self) -> i64 {
        self.event.ts
    }
    /// The event with the generator's oracle (`latent_intent`), which `eval` reads back.
    fn write_json(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(out, self).expect("a generated event serialises");
    }
}

impl Record for ScoredIntent {
    type Parquet = IntentWriter;
    fn key(&self) -> &str {
        &self.user_id
    }
    fn time_ms(&self) -> i64 {
        chrono::DateTime::parse_from_rfc3339(&self.event_ts).map_or(0, |t| t.timestamp_millis())
    }
    fn write_json(&self, out: &mut Vec<u8>) {
        intentflow_operators::encode::encode_intent_into(self, out);
    }
}

/// Where records go.
pub enum Output<'p, R: Record> {
    /// A Kafka topic, keyed by user id; with `event_time`, each record's timestamp is its time.
    Topic {
        /// In-flight deliveries.
        window: DeliveryWindow<'p>,
        /// The topic.
        topic: String,
        /// Stamp records with their own time instead of the producer's clock.
        event_time: bool,
    },
    /// A JSONL file.
    Jsonl(std::io::BufWriter<std::fs::File>),
    /// A Parquet file.
    Parquet(R::Parquet),
    /// Nowhere: the records are dropped without being serialised.
    Discard,
}

impl<'p, R: Record> Output<'p, R> {
    /// A file: Parquet if its name ends in `.parquet`, JSONL otherwise.
    ///
    /// # Errors
    ///
    /// If it cannot be created.
    pub fn file(path: &Path) -> Result<Output<'p, R>> {
        if is_parquet_name(path) {
            return Ok(Output::Parquet(R::Parquet::create(path)?));
        }
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Output::Jsonl(std::io::BufWriter::with_capacity(1 << 20, file)))
    }

    /// A topic produced to by `producer`.
    pub fn topic(producer: &'p FutureProducer, topic: &str, event_time: bool) -> Output<'p, R> {
        Output::Topic { window: DeliveryWindow::new(producer, 200_000), topic: topic.to_string(), event_time }
    }

    /// Writes records.
    ///
    /// # Errors
    ///
    /// The first failed write or delivery.
    pub async fn write(&mut self, records: impl IntoIterator<Item = R>) -> Result<()> {
        let mut buf = Vec::with_capacity(512);
        match self {
            Output::Topic { window, topic, event_time } => {
                for r in records {
                    buf.clear();
                    r.write_json(&mut buf);
                    if *event_time {
                        window.send_at(topic, r.key().as_bytes(), &buf, r.time_ms()).await?;
                    } else {
                        window.send(topic, r.key().as_bytes(), &buf).await?;
                    }
                }
            }
            Output::Jsonl(w) => {
                for r in records {
                    buf.clear();
                    r.write_json(&mut buf);
                    buf.push(b'\n');
                    w.write_all(&buf)?;
                }
            }
            Output::Parquet(w) => {
                for r in records {
                    w.push(r)?;
                }
            }
            Output::Discard => {}
        }
        Ok(())
    }

    /// Flushes everything and awaits every delivery; returns the records written (Parquet and
    /// topics; `None` for JSONL and discarded outputs, whose callers count themselves).
    ///
    /// # Errors
    ///
    /// The first failed write or delivery.
    pub async fn finish(self) -> Result<Option<u64>> {
        Ok(match self {
            Output::Topic { mut window, .. } => Some(window.finish().await?),
            Output::Jsonl(mut w) => {
                w.flush()?;
                None
            }
            Output::Parquet(w) => Some(w.close()?),
            Output::Discard => None,
        })
    }
}

/// Creates `topic` (with `partitions` partitions) unless it exists; with `event_time`, a topic
/// created here keeps records forever (`retention.ms=-1`): under the broker's default of 7 days,
/// records stamped with a past event time would be deleted within minutes.
///
/// # Errors
///
/// If the broker refuses.
pub async fn ensure_output_topic(clients: &KafkaClients, topic: &str, partitions: i32, event_time: bool) -> Result<i32> {
    let configs: &[(&str, &str)] = if event_time { &[("retention.ms", "-1")] } else { &[] };
    admin::ensure_topic_with(clients, topic, partitions, configs).await
}
