//! Handing a state directory written by `intentflow replay` over to the live operator.
//!
//! Every replayed state goes to the changelog (so a partition that later moves takes its
//! replayed states with it), then the replay's input offsets go to the changelog and become the
//! group's committed offsets, so live processing continues exactly where the replay ended.
//!
//! The states are streamed from RocksDB in chunks of [`CHUNK_USERS`], each chunk one transaction
//! under exactly-once (a few megabytes, far inside the transaction timeout), whatever the number
//! of users. After each chunk the store records the last user sent (`handover` meta key): a
//! hand-over that dies in the middle resumes after that user. A chunk sent but not recorded is
//! sent again, which changes nothing (the same states). The offsets come last, in their own
//! transaction with the consumer offsets; only then is the replay marker renamed `ADOPTED`.
//!
//! Until the offsets are committed the partitions' input positions are not on the changelog, but
//! every replayed state carries its fences, so even an instance that restored a half-sent
//! hand-over would not apply a replayed event to a state twice.

use super::sink::{changelog_positions, keep_highest, offsets_tpl, BatchSink};
use super::RebalanceContext;
use crate::state_dir::{ReplaySource, StateDir};
use anyhow::{bail, Context, Result};
use intentflow_state::StateStore;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use std::collections::BTreeMap;
use std::time::Instant;

/// Users per hand-over chunk (one transaction under exactly-once).
pub const CHUNK_USERS: usize = 50_000;
/// The store's meta key holding the last user key sent.
const PROGRESS: &str = "handover";

/// Hands the replayed state in `store` over; `input_topics` and `partitions` name the input
/// partitions whose offsets the replay recorded.
///
/// # Errors
///
/// A file replay's state with partitioned inputs (its users are not keyed by input partition),
/// Kafka and RocksDB errors; the hand-over resumes on the next start.
pub async fn hand_over(
    sink: &BatchSink<'_>,
    consumer: &StreamConsumer<RebalanceContext>,
    store: &StateStore,
    dir: &StateDir,
    input_topics: &[String],
    partitions: i32,
) -> Result<()> {
    if dir.replay_source()? == Some(ReplaySource::Files) && partitions > 1 {
        bail!(
            "{} holds a replay of event files, whose users are keyed by file, not by the {partitions} partitions of {input_topics:?}: \
             it cannot go live. Load the files into the input topic (intentflow import --topic … --event-time) and replay the topic \
             into a fresh state directory instead",
            dir.path().display()
        );
    }
    let started = Instant::now();
    let mut after = store.meta(PROGRESS)?;
    if after.is_some() {
        tracing::info!("resuming an interrupted hand-over after the last user it recorded");
    }
    let (mut users, mut chunks) = (0u64, 0u64);
    let mut changelog_next: BTreeMap<i32, i64> = BTreeMap::new();
    loop {
        let chunk = store.users_after(after.as_deref(), CHUNK_USERS)?;
        let Some(last) = chunk.last() else { break };
        let last_key = last.key.clone();
        sink.begin()?;
        let mut window = sink.window();
        sink.send_users(&mut window, chunk.iter().map(|u| (u.partition, u.user.as_str(), u.value.as_slice()))).await?;
        window.finish().await?;
        sink.commit(None).context("committing a hand-over chunk")?;
        keep_highest(&mut changelog_next, window.tracked());
        store.set_meta(PROGRESS, Some(&last_key))?;
        users += chunk.len() as u64;
        chunks += 1;
        tracing::info!(users, chunk = chunks, "hand-over: replayed states sent to the changelog");
        fail::fail_point!("handover-chunk", |_| {
            tracing::error!("failpoint handover-chunk: aborting");
            std::process::abort()
        });
        after = Some(last_key);
    }

    let mut next = BTreeMap::new();
    for topic in input_topics {
        for p in 0..partitions {
            if let Some(o) = store.offset(topic, p)? {
                next.insert((topic.clone(), p), o);
            }
        }
    }
    let tpl = offsets_tpl(&next)?;
    sink.begin()?;
    let mut window = sink.window();
    sink.send_offsets(&mut window, &next).await?;
    window.finish().await?;
    if sink.exactly_once {
        let group = consumer.group_metadata().context("the consumer has no group metadata")?;
        sink.commit(Some((&group, &tpl)))?;
    } else {
        consumer.commit(&tpl, CommitMode::Sync).context("committing the replay's offsets")?;
    }
    keep_highest(&mut changelog_next, window.tracked());
    // The local store already holds the states: record that it reflects the changelog so far.
    store.commit_encoded([], [], changelog_positions(&changelog_next))?;
    // Durable before the directory says so: the live store writes without a write-ahead log.
    store.flush()?;
    // Adopted first, then the progress forgotten: a crash in between leaves an adopted
    // directory with a stale key, never a replay that hands everything over again.
    dir.mark_adopted()?;
    store.set_meta(PROGRESS, None)?;
    tracing::info!(
        users,
        chunks,
        seconds = started.elapsed().as_secs_f64(),
        offsets = ?next,
        "replayed state handed over: live processing continues where the replay ended"
    );
    Ok(())
}
