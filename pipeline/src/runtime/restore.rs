//! Bringing partitions' local state up to date from the changelog topic.
//!
//! When partitions are assigned (at start-up or in a rebalance), each one is restored on its own
//! thread, so a long changelog partition does not hold up the others' restores: read the
//! changelog partition with `read_committed` from the offset the local store recorded
//! ([`plan_restore`]) up to the partition's high watermark, applying records to RocksDB in
//! atomic chunks that also record how far they got. Reaching the high watermark (not merely the
//! last stable offset) means an open transaction of a crashed instance is waited out: it is
//! either aborted (its records are skipped) or committed (its records are applied), never half
//! seen. Input processing resumes at the committed consumer offsets, which the restored states
//! reflect exactly (see `intentflow_state::changelog`).

use anyhow::{bail, Context, Result};
use intentflow_state::changelog::{plan_restore, RestorePlan};
use intentflow_state::StateStore;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Records applied to RocksDB per atomic write while restoring.
const CHUNK: usize = 20_000;

/// What restoring one partition did.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    /// Changelog (= input) partition.
    pub partition: i32,
    /// The decision taken.
    pub plan: RestorePlan,
    /// Changelog records applied.
    pub records: u64,
    /// The changelog offset the store now reflects.
    pub changelog_offset: i64,
    /// Wall time of the restore.
    pub seconds: f64,
}

/// Restores partitions of one changelog topic into one store.
pub struct Restorer {
    brokers: String,
    topic: String,
    store: Arc<StateStore>,
    consumer_overrides: BTreeMap<String, String>,
}

impl Restorer {
    /// A restorer reading `topic` on `brokers` into `store`; `consumer_overrides` are the
    /// operator's librdkafka consumer properties (security settings and the like).
    pub fn new(brokers: &str, topic: &str, store: Arc<StateStore>, consumer_overrides: &BTreeMap<String, String>) -> Restorer {
        Restorer { brokers: brokers.to_string(), topic: topic.to_string(), store, consumer_overrides: consumer_overrides.clone() }
    }

    /// Restores every partition in `partitions`, each on its own thread; returns once all are
    /// up to date.
    ///
    /// # Errors
    ///
    /// The first partition that failed (Kafka errors, undecodable records, RocksDB errors).
    pub fn restore_all(&self, partitions: &[i32]) -> Result<Vec<Restored>> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = partitions.iter().map(|&p| scope.spawn(move || self.restore(p))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| bail!("restore thread panicked"))).collect()
        })
    }

    fn consumer(&self, isolation: &str) -> Result<BaseConsumer> {
        let mut cfg = crate::kafka::reader_config(&self.brokers, &self.consumer_overrides, "intentflow-restore", isolation);
        cfg.set("enable.partition.eof", "true")
            .set("fetch.max.bytes", "52428800")
            .set("max.partition.fetch.bytes", "10485760");
        cfg.create().context("creating the changelog restore consumer")
    }

    /// Restores one partition.
    ///
    /// # Errors
    ///
    /// Kafka errors, undecodable records, RocksDB errors.
    pub fn restore(&self, partition: i32) -> Result<Restored> {
        let started = Instant::now();
        // Watermarks from a read_uncommitted client: the high watermark, past any open transaction.
        let (low, high) = self
            .consumer("read_uncommitted")?
            .fetch_watermarks(&self.topic, partition, Duration::from_secs(30))
            .with_context(|| format!("watermarks of changelog {}/{partition}", self.topic))?;
        let local = self.store.changelog_offset(partition)?;
        let plan = plan_restore(local, low, high);
        let from = match &plan {
            RestorePlan::UpToDate => {
                return Ok(Restored { partition, plan, records: 0, changelog_offset: local.unwrap_or(high), seconds: started.elapsed().as_secs_f64() })
            }
            RestorePlan::CatchUp { from } => *from,
            RestorePlan::Rebuild { from, reason } => {
                tracing::warn!(partition, reason = %reason, "rebuilding the partition's local state from the changelog");
                self.store.clear_partition(partition)?;
                *from
            }
        };

        let consumer = self.consumer("read_committed")?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(from))?;
        consumer.assign(&tpl)?;
        let mut chunk: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::with_capacity(CHUNK);
        let mut records = 0u64;
        // Reaching the high watermark, not just the last stable offset, waits out a transaction
        // that a crashed instance left open.
        let next = crate::kafka::read_range(&consumer, &self.topic, partition, high, usize::MAX, |m| {
            chunk.push((m.key().unwrap_or_default().to_vec(), m.payload().map(<[u8]>::to_vec)));
            if chunk.len() >= CHUNK {
                records += self.apply(partition, &mut chunk, m.offset() + 1)?;
            }
            Ok(())
        })
        .with_context(|| format!("restoring changelog {}/{partition}", self.topic))?
        .unwrap_or(high);
        records += self.apply(partition, &mut chunk, next)?;
        Ok(Restored { partition, plan, records, changelog_offset: next, seconds: started.elapsed().as_secs_f64() })
    }

    fn apply(&self, partition: i32, chunk: &mut Vec<(Vec<u8>, Option<Vec<u8>>)>, next: i64) -> Result<u64> {
        let n = self.store.apply_changelog(partition, chunk.iter().map(|(k, v)| (k.as_slice(), v.as_deref())), next)?;
        chunk.clear();
        Ok(n as u64)
    }
}
