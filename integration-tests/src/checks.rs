//! What the end-to-end tests assert: streamed scores and states equal an uninterrupted offline
//! pass, dead letters read back with their headers.

use crate::{topic_size, trained_model_dir, Operator};
use intentflow_model::{Device, IntentModel};
use intentflow_pipeline::kafka::read::read_topic;
use intentflow_pipeline::kafka::KafkaClients;
use intentflow_schemas::{Event, ScoredIntent};
use rdkafka::Message;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Offline scores per user: each user's events scored one by one from a fresh state.
pub fn offline_scores(events: &[Event]) -> BTreeMap<String, intentflow_model::SequenceScores> {
    offline_scores_of(trained_model_dir(), events)
}

/// [`offline_scores`] under the model in `model_dir`.
pub fn offline_scores_of(model_dir: &Path, events: &[Event]) -> BTreeMap<String, intentflow_model::SequenceScores> {
    let model = IntentModel::load(model_dir, &Device::Cpu).expect("model");
    let mut by_user: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events {
        by_user.entry(&e.user_id).or_default().push(e);
    }
    by_user.into_iter().map(|(u, evs)| (u.to_string(), model.score_sequence(evs).expect("offline scoring"))).collect()
}

/// Groups intents by user, in the order they were read (per user that is partition order).
pub fn intents_by_user(intents: &[ScoredIntent]) -> BTreeMap<String, Vec<&ScoredIntent>> {
    let mut out: BTreeMap<String, Vec<&ScoredIntent>> = BTreeMap::new();
    for i in intents {
        out.entry(i.user_id.clone()).or_default().push(i);
    }
    out
}

/// A record read back from a dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// `intentflow.error.kind`.
    pub kind: String,
    /// `intentflow.error.reason`.
    pub reason: String,
    /// `intentflow.source.topic`.
    pub source_topic: String,
    /// `intentflow.source.partition`.
    pub source_partition: i32,
    /// `intentflow.source.offset`.
    pub source_offset: i64,
    /// `intentflow.source.timestamp` (empty for state records, which have none).
    pub source_timestamp: Option<i64>,
    /// The original bytes.
    pub value: Vec<u8>,
}

/// Reads a dead-letter topic until `expected` records arrived or it stays idle.
pub fn dead_letters(brokers: &str, topic: &str, expected: usize) -> Vec<DeadLetter> {
    use intentflow_pipeline::dlq::{DLQ_ERROR_KIND, DLQ_REASON, DLQ_SOURCE_OFFSET, DLQ_SOURCE_PARTITION, DLQ_SOURCE_TIMESTAMP, DLQ_SOURCE_TOPIC};
    use rdkafka::message::Headers;
    let records = read_topic(&KafkaClients::new(brokers), topic, Duration::from_secs(5), |n| n >= expected).expect("reading the dead-letter topic");
    records
        .iter()
        .map(|m| {
            let headers = m.headers().expect("dead letters carry headers");
            let get = |name: &str| -> String {
                headers
                    .iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_else(|| panic!("header {name} missing"))
            };
            DeadLetter {
                kind: get(DLQ_ERROR_KIND),
                reason: get(DLQ_REASON),
                source_topic: get(DLQ_SOURCE_TOPIC),
                source_partition: get(DLQ_SOURCE_PARTITION).parse().expect("partition"),
                source_offset: get(DLQ_SOURCE_OFFSET).parse().expect("offset"),
                source_timestamp: Some(get(DLQ_SOURCE_TIMESTAMP)).filter(|t| !t.is_empty()).map(|t| t.parse().expect("timestamp")),
                value: m.payload().unwrap_or_default().to_vec(),
            }
        })
        .collect()
}

/// The exactly-once check: exactly one intent per valid event (none lost, none doubled), each
/// user's intents in event order, and scores and final `states` bit-for-bit equal to an
/// uninterrupted offline pass over each user's events.
pub fn assert_exactly_once(intents: &[ScoredIntent], events: &[Event], states: &BTreeMap<String, intentflow_state::UserState>) {
    let sources: std::collections::HashSet<(i32, i64)> = intents.iter().map(|i| (i.source.partition, i.source.offset)).collect();
    assert_eq!(sources.len(), intents.len(), "an input was scored twice: {} intents for {} inputs", intents.len(), sources.len());
    assert_eq!(intents.len(), events.len(), "one intent per valid input");
    let offline = offline_scores(events);
    let by_user = intents_by_user(intents);
    assert_eq!(by_user.len(), offline.len());
    let mut expected_ids: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in events {
        expected_ids.entry(&e.user_id).or_default().push(e.event_id.as_deref().expect("generated events have ids"));
    }
    for (user, got) in &by_user {
        let ids: Vec<&str> = got.iter().map(|i| i.event_id.as_deref().unwrap_or_default()).collect();
        assert_eq!(ids, expected_ids[user.as_str()], "user {user}: intents out of event order");
        let scores: Vec<u32> = got.iter().map(|i| i.score.to_bits()).collect();
        let want: Vec<u32> = offline[user].scores.iter().map(|s| s.to_bits()).collect();
        assert_eq!(scores, want, "user {user}: streamed scores differ from the offline pass");
    }
    assert_states_match(states, &offline);
}

/// Every user's final state equals one uninterrupted offline pass over all `events`, bit for
/// bit: each event applied exactly once.
pub fn assert_states_match_offline(states: &BTreeMap<String, intentflow_state::UserState>, events: &[Event]) {
    assert_states_match(states, &offline_scores(events));
}

/// Every user's state in `states` equals `offline` (per user), bit for bit.
pub fn assert_states_match(states: &BTreeMap<String, intentflow_state::UserState>, offline: &BTreeMap<String, intentflow_model::SequenceScores>) {
    assert_eq!(states.len(), offline.len(), "one state per user");
    for (user, state) in states {
        let want = &offline[user];
        assert_eq!(state.session, want.session, "user {user}: session state ({} events applied)", state.session.total_events);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&state.hidden), bits(&want.hidden), "user {user}: hidden state not bit-identical");
    }
}

/// Every user state in a state directory, by user id.
pub fn stored_states(dir: &Path) -> BTreeMap<String, intentflow_state::UserState> {
    let store = intentflow_state::StateStore::open(dir, intentflow_state::StoreOptions::default()).expect("opening the state store");
    store.users().expect("reading states").into_iter().map(|(_, user, state)| (user, state)).collect()
}

/// Waits until `topic` holds at least `n` offsets (see [`topic_size`]); panics with `op`'s log
/// if `op` exits or after `limit`.
pub fn wait_for_size(brokers: &str, topic: &str, n: i64, op: &mut Operator, limit: Duration) {
    let started = Instant::now();
    while topic_size(brokers, topic).unwrap_or(0) < n {
        if let Some(status) = op.exited() {
            panic!("the operator exited ({status}) before {topic} reached {n}; log:\n{}", op.log_text());
        }
        assert!(started.elapsed() < limit, "{topic} did not reach {n} in {limit:?}; log:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the consumer group `group` has committed at least `n` records of `topic` (see
/// [`crate::committed_records`]): unlike [`wait_for_size`], records of aborted transactions do
/// not count. Panics with `op`'s log if `op` exits or after `limit`.
pub fn wait_for_committed(brokers: &str, group: &str, topic: &str, n: i64, op: &mut Operator, limit: Duration) {
    let started = Instant::now();
    while crate::committed_records(brokers, group, topic).unwrap_or(0) < n {
        if let Some(status) = op.exited() {
            panic!("the operator exited ({status}) before {n} records of {topic} were committed; log:\n{}", op.log_text());
        }
        assert!(started.elapsed() < limit, "{n} records of {topic} not committed in {limit:?}; log:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `group` has committed at least `n` records on every partition of `topic`, so
/// that each partition has state in the changelog to hand over. Panics with `op`'s log if `op`
/// exits or after `limit`.
pub fn wait_for_committed_everywhere(brokers: &str, group: &str, topic: &str, n: i64, op: &mut Operator, limit: Duration) {
    let started = Instant::now();
    loop {
        let offsets = crate::committed_offsets(brokers, group, topic).unwrap_or_default();
        if !offsets.is_empty() && offsets.iter().all(|o| *o >= n) {
            return;
        }
        if let Some(status) = op.exited() {
            panic!("the operator exited ({status}) before every partition of {topic} had {n} records committed; log:\n{}", op.log_text());
        }
        assert!(started.elapsed() < limit, "committed offsets of {topic} still {offsets:?} after {limit:?}; log:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `op` has logged a line containing `line`; panics with its log after `limit`.
pub fn wait_for_log(op: &Operator, line: &str, limit: Duration) {
    let started = Instant::now();
    while !op.log_text().contains(line) {
        assert!(started.elapsed() < limit, "`{line}` not logged; log:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `GET` of `path` on `addr` (the operator's metrics server): the whole HTTP response.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// A probe's status code and JSON body (`(0, null)` when nothing answered).
pub fn probe(addr: &str, path: &str) -> (u16, serde_json::Value) {
    let response = http_get(addr, path);
    let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).and_then(|b| serde_json::from_str(b).ok()).unwrap_or_default();
    (code, body)
}

/// The value of the Prometheus series `series` (name with labels) in `/metrics` text, 0 if
/// absent.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse::<f64>().ok())).map_or(0, |v| v as u64)
}

/// A free local address for an operator's metrics server.
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}
