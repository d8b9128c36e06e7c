//! `intentflow erase`: the erasure path for a shopper's data (a GDPR delete request).
//!
//! The command does not touch any state itself: it writes one request per user to the erasure
//! topic (`erasure_topic`, `<group>-erasures` by default), keyed by the user id and sent to the
//! partition of the user's events (`input_partitioner`). The operator that owns that partition
//! consumes the request with its input, in the same transaction as everything else: it deletes
//! the user's state from its store and writes a tombstone for it to the changelog, so that no
//! restore brings it back, and commits the request's offset with it. A request written while no
//! operator runs waits in the topic and is applied when one starts. `--wait-seconds` waits until
//! the group has committed past every request, i.e. until they are applied.

use crate::config::KafkaArgs;
use crate::kafka::{admin, DeliveryWindow};
use anyhow::{bail, Context, Result};
use clap::Args;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::time::{Duration, Instant};

/// `intentflow erase`.
#[derive(Debug, Clone, Args)]
pub struct EraseArgs {
    /// A user id whose state is to be deleted (repeat for several).
    #[arg(long = "user", required = true)]
    pub users: Vec<String>,
    /// Wait up to this many seconds until the operators have applied the requests (0: only
    /// write them).
    #[arg(long, default_value_t = 0)]
    pub wait_seconds: u64,
    /// The brokers and the run's configuration (`--config`): the group, input topics,
    /// `input_partitioner`, `erasure_topic` and Kafka security settings.
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// One written request: where it lies in the erasure topic.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    /// The user.
    pub user: String,
    /// Partition of the erasure topic, that of the user's events.
    pub partition: i32,
    /// Offset of the request.
    pub offset: i64,
}

/// Writes the requests, then (with `--wait-seconds`) waits for them to be applied.
///
/// # Errors
///
/// An empty user id, input topics that do not exist, an erasure topic with another partition
/// count than the input, a failed delivery, or requests still unapplied when the wait is over.
pub async fn erase_cmd(args: &EraseArgs) -> Result<()> {
    let cfg = args.kafka.run_config()?;
    if let Some(bad) = args.users.iter().find(|u| u.is_empty() || u.len() > 1024) {
        bail!("user id {bad:?} cannot be erased: ids are 1 to 1024 bytes");
    }
    let clients = cfg.clients();
    let topic = cfg.erasure_topic();
    if let Some(missing) = cfg.input_topics.iter().find(|t| !matches!(admin::partition_count(&clients, t), Ok(Some(_)))) {
        bail!("input topic {missing} does not exist on {}: erase takes the run's configuration (--config), whose input topics give the partition of each user", cfg.brokers);
    }
    let partitions = admin::input_partition_count(&clients, &cfg.input_topics)?;
    admin::ensure_erasure_topic(&clients, &topic, partitions).await?;
    let producer = clients.producer(&[])?;
    let mut window = DeliveryWindow::new(&producer, 1024);
    let now = intentflow_schemas::format_ts_ms(chrono::Utc::now().timestamp_millis());
    let mut requests = Vec::with_capacity(args.users.len());
    for user in &args.users {
        let partition = cfg.input_partitioner.partition(user.as_bytes(), partitions);
        let payload = serde_json::json!({ "user_id": user, "requested_at": now }).to_string();
        window.send_tracked(&topic, partition, user.as_bytes(), payload.as_bytes()).await?;
        // One at a time, so that each request's offset is known.
        window.finish().await?;
        let offset = window.tracked()[&partition];
        println!("erasure of user {user} requested: {topic} partition {partition} offset {offset}");
        requests.push(Request { user: user.clone(), partition, offset });
    }
    if args.wait_seconds == 0 {
        println!("the operators of group {} apply them with their next commit (intentflow erase --wait-seconds N waits for it)", cfg.group);
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(args.wait_seconds);
    for request in &requests {
        tokio::task::block_in_place(|| await_applied(&clients, &cfg.group, &topic, request, deadline))?;
        println!("erasure of user {} applied: its state, if its partition held one, is deleted and tombstoned on the changelog", request.user);
    }
    Ok(())
}

/// Waits until `group` has committed an offset past `request` on its partition: the operator
/// applied it (the commit is the transaction that deleted the state).
fn await_applied(clients: &crate::kafka::KafkaClients, group: &str, topic: &str, request: &Request, deadline: Instant) -> Result<()> {
    let consumer: BaseConsumer = clients.reader_config(group, "read_committed").create().context("creating a Kafka consumer")?;
    loop {
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(topic, request.partition);
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
        let offset = committed.elements().first().and_then(|e| e.offset().to_raw()).unwrap_or(-1);
        if offset > request.offset {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the erasure of user {} ({topic} partition {} offset {}) is not applied yet: is an operator of group {group} running? \
                 The request stays in the topic and is applied when one is",
                request.user,
                request.partition,
                request.offset
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
