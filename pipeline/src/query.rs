//! Per-user queries: `GET /v1/users/{id}/intent` on the operator's HTTP address.
//!
//! An instance answers from its own state store for the users of the input partitions it owns:
//! the user's latest score, session counters, history, last event time and model, as committed
//! (the store is written after each commit). A user's partition is the producers' partitioner
//! applied to the user id (`input_partitioner`: librdkafka's `consistent_random`, CRC32, or
//! Java's `murmur2_random`). For a partition another instance owns, the answer is a redirect
//! (307) to that instance, found in the consumer group's membership: each instance advertises its
//! query address in its consumer's `client.id` (`intentflow-<instance>@<host:port>`), and the
//! group's assignment names its partitions. Answers are JSON; the status codes say what happened
//! (`docs/metrics.md`, "Per-user queries").

use crate::kafka::KafkaClients;
use crate::telemetry::Health;
use anyhow::{Context, Result};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use intentflow_state::{Loaded, StateStore};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a description of the group's owners is reused before the group is read again.
const OWNERS_FOR: Duration = Duration::from_secs(2);

/// How producers spread user ids over partitions (`input_partitioner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// librdkafka's default for keyed records: CRC32 of the key modulo the partitions.
    ConsistentRandom,
    /// The Java client's default (and librdkafka's `murmur2_random`): Kafka's murmur2 of the key,
    /// made positive, modulo the partitions.
    Murmur2Random,
}

impl Partitioner {
    /// The partition of `key` among `partitions`.
    pub fn partition(self, key: &[u8], partitions: i32) -> i32 {
        let n = partitions.max(1) as u32;
        match self {
            Partitioner::ConsistentRandom => (crc32fast::hash(key) % n) as i32,
            Partitioner::Murmur2Random => ((murmur2(key) & 0x7fff_ffff) % n) as i32,
        }
    }
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), seed `0x9747b28c`.
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, b) in rest.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The `client.id` of an instance's group consumer: its instance id and query address.
pub fn advertised_client_id(instance: &str, address: &str) -> String {
    format!("intentflow-{instance}@{address}")
}

/// A group member that can answer queries.
#[derive(Debug, Clone, PartialEq)]
struct Owner {
    instance: String,
    address: String,
}

/// What answers queries, once the operator has started.
pub struct Query {
    /// The state store.
    pub store: Arc<StateStore>,
    /// Input partitions (of each co-partitioned input topic).
    pub partitions: i32,
    /// The first input topic: the one whose assignment names the owners.
    pub topic: String,
    /// The producers' partitioner.
    pub partitioner: Partitioner,
    /// The consumer group.
    pub group: String,
    /// This instance's id.
    pub instance: String,
    /// A client for group descriptions.
    metadata: BaseConsumer,
    /// The owner of each partition, as last read from the group, and when.
    owners: Mutex<Option<(Instant, BTreeMap<i32, Owner>)>>,
}

impl std::fmt::Debug for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query").field("topic", &self.topic).field("partitions", &self.partitions).field("partitioner", &self.partitioner).field("group", &self.group).field("instance", &self.instance).finish_non_exhaustive()
    }
}

impl Query {
    /// A query handle for `store`, looking owners up in `group` through `clients`.
    ///
    /// # Errors
    ///
    /// If the metadata client cannot be created.
    pub fn new(clients: &KafkaClients, store: Arc<StateStore>, topic: &str, partitions: i32, partitioner: Partitioner, group: &str, instance: &str) -> Result<Query> {
        Ok(Query {
            store,
            partitions,
            topic: topic.to_string(),
            partitioner,
            group: group.to_string(),
            instance: instance.to_string(),
            metadata: clients.metadata_client()?,
            owners: Mutex::new(None),
        })
    }

    /// The answer for `user`.
    pub fn answer(&self, health: &Health, user: &str) -> Response {
        let partition = self.partitioner.partition(user.as_bytes(), self.partitions);
        let owned = health.partition_progress();
        match owned.get(&partition) {
            Some(Some(records)) => {
                return error(StatusCode::SERVICE_UNAVAILABLE, json!({"error": format!("partition {partition} is restoring ({records} changelog records so far)"), "user_id": user, "partition": partition}))
            }
            Some(None) => {}
            None => return self.elsewhere(user, partition),
        }
        // The computed partition first; a producer with another partitioner may have put the
        // user in another partition of this instance.
        let mut candidates: Vec<i32> = vec![partition];
        candidates.extend(owned.iter().filter(|(p, restoring)| **p != partition && restoring.is_none()).map(|(p, _)| *p));
        for p in candidates {
            match self.store.get_many([(p, user)]) {
                Ok(mut found) => match found.pop() {
                    Some(Loaded::State(state)) => {
                        let s = &state.session;
                        let format = intentflow_schemas::format_ts_ms;
                        return Json(UserIntent {
                            user_id: user,
                            score: state.last_score,
                            model_version: &state.model_version,
                            updated_at: format(s.last_ts_ms),
                            session: SessionView {
                                seq: s.session_seq,
                                events: s.events,
                                cart_count: s.cart_count,
                                cart_value: s.cart_value,
                                started_at: format(s.started_ms),
                                purchased: s.purchased,
                            },
                            history: HistoryView { purchases: s.history.purchases, carts: s.history.carts },
                            total_events: s.total_events,
                            partition: p,
                            instance: &self.instance,
                        })
                        .into_response();
                    }
                    Some(Loaded::Invalid { error: e, .. }) => {
                        return error(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": format!("the stored state does not decode: {e}"), "user_id": user, "partition": p}))
                    }
                    _ => {}
                },
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": e.to_string(), "user_id": user})),
            }
        }
        error(StatusCode::NOT_FOUND, json!({"error": "unknown user", "user_id": user, "partition": partition, "instance": self.instance}))
    }

    /// The answer for a user of a partition this instance does not own: a redirect to its owner.
    fn elsewhere(&self, user: &str, partition: i32) -> Response {
        match self.owner(partition) {
            // The group already names this instance, whose assignment has not arrived yet.
            Ok(Some(owner)) if owner.instance == self.instance => {
                error(StatusCode::SERVICE_UNAVAILABLE, json!({"error": format!("partition {partition} is being assigned to this instance (a rebalance)"), "user_id": user, "partition": partition}))
            }
            Ok(Some(owner)) => {
                let location = format!("http://{}/v1/users/{}/intent", owner.address, encode_path(user));
                let body = json!({"user_id": user, "partition": partition, "owner": {"instance": owner.instance, "address": owner.address}, "location": location});
                (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)], Json(body)).into_response()
            }
            Ok(None) => error(StatusCode::SERVICE_UNAVAILABLE, json!({"error": format!("no instance owns partition {partition} now (a rebalance?)"), "user_id": user, "partition": partition})),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, json!({"error": format!("the group's members could not be read: {e:#}"), "user_id": user, "partition": partition})),
        }
    }

    /// The member of the group assigned `partition` of the input, from the group's description
    /// (read again when the last one is older than [`OWNERS_FOR`], or does not name the partition).
    fn owner(&self, partition: i32) -> Result<Option<Owner>> {
        let mut cached = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((read, owners)) = cached.as_ref() {
            if read.elapsed() < OWNERS_FOR && owners.contains_key(&partition) {
                return Ok(owners.get(&partition).cloned());
            }
        }
        let groups = self.metadata.fetch_group_list(Some(&self.group), Duration::from_secs(5)).context("describing the consumer group")?;
        let mut owners = BTreeMap::new();
        for group in groups.groups() {
            for member in group.members() {
                let Some((instance, address)) = member.client_id().strip_prefix("intentflow-").and_then(|id| id.rsplit_once('@')) else {
                    continue;
                };
                for p in member.assignment().map(|a| assigned(a, &self.topic)).unwrap_or_default() {
                    owners.insert(p, Owner { instance: instance.to_string(), address: address.to_string() });
                }
            }
        }
        let owner = owners.get(&partition).cloned();
        *cached = Some((Instant::now(), owners));
        Ok(owner)
    }
}

/// The answer for a user this instance holds.
#[derive(serde::Serialize)]
struct UserIntent<'a> {
    user_id: &'a str,
    /// The score of the user's latest event (absent for a state written before scores were kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<f32>,
    model_version: &'a str,
    /// The time of the user's latest event.
    updated_at: String,
    session: SessionView,
    history: HistoryView,
    total_events: u64,
    partition: i32,
    instance: &'a str,
}

/// The current session in a [`UserIntent`].
#[derive(serde::Serialize)]
struct SessionView {
    seq: u32,
    events: u32,
    cart_count: u32,
    cart_value: f64,
    started_at: String,
    purchased: bool,
}

/// The user's history in a [`UserIntent`].
#[derive(serde::Serialize)]
struct HistoryView {
    purchases: u32,
    carts: u32,
}

/// A JSON error answer.
fn error(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

/// `user` for a URL path: unreserved bytes as they are, every other byte percent-encoded.
fn encode_path(user: &str) -> String {
    user.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// The partitions of `topic` in a consumer-protocol assignment (version, then per topic its name
/// and partitions, then user data); none if it does not parse.
fn assigned(assignment: &[u8], topic: &str) -> Vec<i32> {
    fn take<'b>(b: &'b [u8], at: &mut usize, n: usize) -> Option<&'b [u8]> {
        let head = b.get(*at..*at + n)?;
        *at += n;
        Some(head)
    }
    fn parse(b: &[u8], topic: &str) -> Option<Vec<i32>> {
        let mut at = 0;
        let mut take = |n: usize| take(b, &mut at, n);
        let _version = take(2)?;
        let topics = i32::from_be_bytes(take(4)?.try_into().ok()?);
        let mut out = Vec::new();
        for _ in 0..topics.max(0) {
            let len = i16::from_be_bytes(take(2)?.try_into().ok()?).max(0) as usize;
            let name = take(len)?.to_vec();
            let n = i32::from_be_bytes(take(4)?.try_into().ok()?);
            for _ in 0..n.max(0) {
                let p = i32::from_be_bytes(take(4)?.try_into().ok()?);
                if name == topic.as_bytes() {
                    out.push(p);
                }
            }
        }
        Some(out)
    }
    parse(assignment, topic).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_is_kafkas() {
        // org.apache.kafka.common.utils.UtilsTest#testMurmur2.
        for (key, expected) in [
            (&b"21"[..], -973_932_308i32),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ] {
            assert_eq!(murmur2(key) as i32, expected, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn partitioners_spread_keys_like_the_clients() {
        // CRC32("123456789") = 0xCBF43926, the check value of the standard CRC-32.
        assert_eq!(Partitioner::ConsistentRandom.partition(b"123456789", 1_000), (0xCBF4_3926u32 % 1_000) as i32);
        assert_eq!(Partitioner::Murmur2Random.partition(b"21", 7), ((-973_932_308i32 as u32 & 0x7fff_ffff) % 7) as i32);
        for p in [Partitioner::ConsistentRandom, Partitioner::Murmur2Random] {
            assert!((0..500).all(|i| (0..4).contains(&p.partition(format!("u{i}").as_bytes(), 4))));
        }
    }

    #[test]
    fn assignments_parse_and_garbage_gives_none() {
        // Version 0; two topics: "in" with partitions 1 and 3, "other" with 0; no user data.
        let mut b = vec![0, 0, 0, 0, 0, 2];
        b.extend_from_slice(&[0, 2, b'i', b'n', 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 3]);
        b.extend_from_slice(&[0, 5, b'o', b't', b'h', b'e', b'r', 0, 0, 0, 1, 0, 0, 0, 0]);
        b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(assigned(&b, "in"), [1, 3]);
        assert_eq!(assigned(&b, "other"), [0]);
        assert_eq!(assigned(&b[..9], "in"), Vec::<i32>::new());
        assert_eq!(encode_path("a b/é"), "a%20b%2F%C3%A9");
    }
}
