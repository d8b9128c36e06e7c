//! Topics: creation with the operator's settings, and partition counts.

use super::KafkaClients;
use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::time::Duration;

/// Metadata and admin requests give up after this long.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Further attempts of a metadata request whose connection failed (0.5, 1, 1.5 s apart).
const METADATA_RETRIES: u32 = 3;

/// Creates `topic` with `partitions` partitions (the broker's default replication factor) if it
/// does not exist yet. Returns the topic's partition count.
///
/// # Errors
///
/// If the broker cannot be reached or refuses the topic.
pub async fn ensure_topic(clients: &KafkaClients, topic: &str, partitions: i32) -> Result<i32> {
    ensure_topic_with(clients, topic, partitions, &[]).await
}

/// Creates the erasure topic (`erasure_topic`) if it does not exist: compacted, so that the
/// latest request of every erased user is kept (a state replayed from history later has them
/// applied again when it goes live), with one partition per input partition.
///
/// # Errors
///
/// Admin failures, and an existing topic with another partition count than the input.
pub async fn ensure_erasure_topic(clients: &KafkaClients, topic: &str, input_partitions: i32) -> Result<()> {
    let found = ensure_topic_with(clients, topic, input_partitions, &[("cleanup.policy", "compact")]).await?;
    if found != input_partitions {
        bail!("erasure topic {topic} has {found} partitions, the input has {input_partitions}: it needs one per input partition (the partition of a user's events)");
    }
    Ok(())
}

/// [`ensure_topic`] with topic configs (such as `cleanup.policy = compact`) for a new topic.
///
/// # Errors
///
/// If the broker cannot be reached or refuses the topic.
pub async fn ensure_topic_with(clients: &KafkaClients, topic: &str, partitions: i32, configs: &[(&str, &str)]) -> Result<i32> {
    if let Some(n) = partition_count(clients, topic)? {
        return Ok(n);
    }
    let admin: AdminClient<DefaultClientContext> = clients.base().create().context("creating a Kafka admin client")?;
    let new = configs.iter().fold(NewTopic::new(topic, partitions, TopicReplication::Fixed(-1)), |t, (k, v)| t.set(k, v));
    let results = admin
        .create_topics([&new], &AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT)))
        .await
        .with_context(|| format!("creating topic {topic}"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("creating topic {name}: {code}"),
        }
    }
    // Creation is asynchronous on the broker: wait until metadata shows the partitions.
    for _ in 0..100 {
        if let Some(n) = partition_count(clients, topic)? {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("topic {topic} was created but its metadata did not appear")
}

/// Deletes `topics` (those that do not exist are no error).
///
/// # Errors
///
/// If the broker cannot be reached or refuses.
pub async fn delete_topics(clients: &KafkaClients, topics: &[&str]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = clients.base().create().context("creating a Kafka admin client")?;
    let results = admin.delete_topics(topics, &AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT))).await.context("deleting topics")?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((name, code)) => bail!("deleting topic {name}: {code}"),
        }
    }
    Ok(())
}

/// The number of partitions of `topic`, or `None` if it does not exist.
///
/// # Errors
///
/// If the broker cannot be reached (or refuses the client's credentials).
pub fn partition_count(clients: &KafkaClients, topic: &str) -> Result<Option<i32>> {
    let client = clients.metadata_client()?;
    // A connection the broker drops (a restarting or overloaded broker, a SASL handshake cut
    // short) fails at once rather than within the timeout: try a few more times before giving up.
    let mut attempt = 0;
    let md = loop {
        match client.fetch_metadata(Some(topic), ADMIN_TIMEOUT) {
            Err(KafkaError::MetadataFetch(code @ (RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown))) if attempt < METADATA_RETRIES => {
                attempt += 1;
                tracing::warn!(topic, brokers = %clients.brokers, error = %code, attempt, "fetching metadata failed; trying again");
                std::thread::sleep(Duration::from_millis(500 * u64::from(attempt)));
            }
            result => break result.with_context(|| format!("fetching metadata of {topic} from {}", clients.brokers))?,
        }
    };
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len() as i32))
}

/// The partition count of the input topics, which must be co-partitioned (each partition's
/// users, states and changelog partition are shared by all of them); 4 for topics that do not
/// exist yet (auto-created).
///
/// # Errors
///
/// Input topics with different partition counts, and an unreachable broker.
pub fn input_partition_count(clients: &KafkaClients, topics: &[String]) -> Result<i32> {
    let mut counts = Vec::with_capacity(topics.len());
    for t in topics {
        counts.push((t, partition_count(clients, t)?));
    }
    let known: Vec<i32> = counts.iter().filter_map(|(_, n)| *n).collect();
    if known.windows(2).any(|w| w[0] != w[1]) {
        let list: Vec<String> = counts.iter().map(|(t, n)| format!("{t}: {}", n.map_or("missing".into(), |n| n.to_string()))).collect();
        bail!("input topics must be co-partitioned by user id (the same partition count), but they have {}", list.join(", "));
    }
    Ok(known.first().copied().unwrap_or(4))
}
