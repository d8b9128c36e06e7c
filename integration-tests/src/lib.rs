//! Helpers for Intentflow's end-to-end tests against a real Apache Kafka broker.
//!
//! The broker is the one `scripts/kafka start` runs (or `INTENTFLOW_TEST_BROKERS`). Every
//! test uses its own topics and consumer group, so tests can share the broker and run in
//! parallel. The `intentflow` binary under test is the one built next to the test executable
//! (`scripts/test` builds it first).

use anyhow::{bail, Context, Result};
use intentflow_model::train::{train, TrainConfig};
use intentflow_model::{Device, IntentModel};
use intentflow_operators::generate::{generate, GeneratorConfig};
use intentflow_pipeline::kafka::{self, DeliveryWindow};
use intentflow_schemas::{Event, ScoredIntent};
use rdkafka::Message;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Bootstrap servers of the test broker.
pub fn brokers() -> String {
    std::env::var("INTENTFLOW_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Fails with instructions when no broker answers.
pub fn require_broker() -> String {
    let b = brokers();
    if let Err(e) = kafka::partition_count(&b, "__intentflow_probe") {
        panic!("no Kafka broker at {b} ({e:#}); start one with `scripts/kafka start` or run `scripts/test`");
    }
    b
}

/// A topic or group name unique to this test run.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("it-{name}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// The `intentflow` binary built alongside the test executable.
pub fn intentflow_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = dir.join("intentflow");
    assert!(bin.is_file(), "{} is missing: build it with `cargo build -p intentflow-pipeline` (scripts/test does)", bin.display());
    bin
}

/// Generated events for `users` users, in time order.
pub fn generated_events(users: usize, events: usize, seed: u64) -> Vec<Event> {
    generate(&GeneratorConfig { users, events, seed, ..Default::default() }).into_iter().map(|g| g.event).collect()
}

/// A model trained once per test process on generated data (hidden size 16, 2 epochs).
pub fn trained_model_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let events = generated_events(800, 16_000, 42);
        let cfg = TrainConfig { hidden_dim: 16, members: 1, epochs: 2, ..TrainConfig::default() };
        let trained = train(&events, &cfg, &Device::Cpu, |_, _| {}).expect("training");
        let dir = tempfile::tempdir().expect("tempdir");
        trained.save(dir.path()).expect("saving model");
        dir
    })
    .path()
}

/// Creates a topic with `partitions` partitions.
pub fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let n = rt.block_on(kafka::ensure_topic(brokers, topic, partitions))?;
    if n != partitions {
        bail!("topic {topic} has {n} partitions, wanted {partitions}");
    }
    Ok(())
}

/// Deletes the records of `topic`/`partition` below `before`, as retention would; returns the
/// new low watermark.
pub fn delete_records_before(brokers: &str, topic: &str, partition: i32, before: i64) -> Result<i64> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = kafka::client_config(brokers, &BTreeMap::new()).create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(before))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let done = rt.block_on(admin.delete_records(&tpl, &AdminOptions::new()))?;
    let entry = done.find_partition(topic, partition).context("delete_records result lacks the partition")?;
    entry.error()?;
    match entry.offset() {
        rdkafka::Offset::Offset(low) => Ok(low),
        other => bail!("unexpected low watermark {other:?}"),
    }
}

/// Produces `(key, value)` records in order (per key order is kept by the idempotent producer).
pub fn produce(brokers: &str, topic: &str, records: &[(String, Vec<u8>)]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let producer = kafka::producer(brokers, &Default::default())?;
        let mut window = DeliveryWindow::new(&producer, 50_000);
        for (k, v) in records {
            window.send(topic, k.as_bytes(), v).await?;
        }
        window.finish().await?;
        Ok(())
    })
}

/// Runs `intentflow <args>` to completion; returns its status and stderr.
pub fn intentflow(args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(intentflow_bin()).args(args).env("INTENTFLOW_LOG", "info").output().expect("running intentflow");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Produces events as schema-v1 JSON keyed by user id.
pub fn produce_events(brokers: &str, topic: &str, events: &[Event]) -> Result<()> {
    let records: Vec<(String, Vec<u8>)> = events.iter().map(|e| (e.user_id.clone(), serde_json::to_vec(e).unwrap())).collect();
    produce(brokers, topic, &records)
}

/// Reads scored intents from `topic` until `expected` arrived or none came for `idle`.
pub fn read_intents(brokers: &str, topic: &str, expected: usize, idle: Duration) -> Result<Vec<ScoredIntent>> {
    kafka::read_topic(brokers, topic, idle, |n| n >= expected)?
        .iter()
        .map(|m| serde_json::from_slice(m.payload().unwrap_or_default()).context("output is not a scored intent"))
        .collect()
}

/// Offsets in use in `topic` so far: the sum of its partitions' high minus low watermarks. An
/// instant progress probe while an operator runs; under exactly-once it also counts transaction
/// markers and aborted records, so it is an upper bound of the committed records.
pub fn topic_size(brokers: &str, topic: &str) -> Result<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let Some(partitions) = kafka::partition_count(brokers, topic)? else { return Ok(0) };
    let consumer: BaseConsumer = kafka::client_config(brokers, &Default::default()).create()?;
    let mut total = 0;
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        total += high - low;
    }
    Ok(total)
}

/// A running `intentflow run` process.
pub struct Operator {
    child: Child,
    /// File with the operator's stderr log.
    pub log: PathBuf,
}

impl Operator {
    /// Starts `intentflow run` with the given flags; logs go to `log`.
    pub fn start(args: &[String], log: PathBuf) -> Result<Operator> {
        Operator::spawn("run", args, log)
    }

    /// Starts `intentflow <command>` with the given flags; logs go to `log`.
    pub fn spawn(command: &str, args: &[String], log: PathBuf) -> Result<Operator> {
        let file = std::fs::File::create(&log)?;
        let child = Command::new(intentflow_bin())
            .arg(command)
            .args(args)
            .env("INTENTFLOW_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("starting intentflow")?;
        Ok(Operator { child, log })
    }

    /// Sends SIGTERM and waits for the exit (up to 60 s, then kills). Returns the exit status
    /// and the whole log.
    pub fn terminate(mut self) -> Result<(ExitStatus, String)> {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok((s, self.log_text()));
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!("intentflow did not exit within 60 s of SIGTERM; log: {}", self.log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `limit` for the process to exit by itself; returns its status and log, or
    /// `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<Option<(ExitStatus, String)>> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some((s, self.log_text())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(None)
    }

    /// Kills the process with SIGKILL (a crash: no batch is finished, nothing is committed)
    /// and reaps it.
    pub fn crash(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's own topics, consumer group and state directory on the shared broker.
pub struct Scenario {
    /// Bootstrap servers.
    pub brokers: String,
    /// Input topic.
    pub input: String,
    /// Output topic.
    pub output: String,
    /// Dead-letter topic (created by the operator).
    pub dlq: String,
    /// Consumer group.
    pub group: String,
    /// State directory of the operator.
    pub state: PathBuf,
    /// Holds the state directory and the logs.
    pub dir: tempfile::TempDir,
}

impl Scenario {
    /// Creates input and output topics with `partitions` partitions each on the test broker.
    pub fn new(name: &str, partitions: i32) -> Scenario {
        Scenario::on(&require_broker(), name, partitions)
    }

    /// [`Scenario::new`] on the cluster at `brokers`.
    pub fn on(brokers: &str, name: &str, partitions: i32) -> Scenario {
        let brokers = brokers.to_string();
        let (input, output, group) = (unique(&format!("{name}-in")), unique(&format!("{name}-out")), unique(name));
        let dlq = unique(&format!("{name}-dlq"));
        create_topic(&brokers, &input, partitions).unwrap();
        create_topic(&brokers, &output, partitions).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        Scenario { brokers, input, output, dlq, group, state, dir }
    }

    /// `intentflow run` flags for this scenario, then `extra` (metrics are off unless `extra`
    /// sets `--metrics-addr`; a scenario flag that `extra` names again, such as `--state-dir`,
    /// `--group` or `--model-dir`, takes `extra`'s value).
    pub fn run_args(&self, extra: &[&str]) -> Vec<String> {
        let (state, model) = (self.state.display().to_string(), trained_model_dir().display().to_string());
        let base = [
            ("--brokers", self.brokers.as_str()), ("--input-topic", &self.input), ("--output-topic", &self.output),
            ("--dlq-topic", &self.dlq), ("--group", &self.group), ("--state-dir", &state), ("--model-dir", &model),
        ];
        let mut extra: Vec<&str> = extra.to_vec();
        let mut args: Vec<String> = Vec::new();
        for (flag, value) in base {
            let value = match extra.iter().position(|a| *a == flag) {
                Some(i) if i + 1 < extra.len() => {
                    let v = extra.remove(i + 1);
                    extra.remove(i);
                    v.to_string()
                }
                _ => value.to_string(),
            };
            args.extend([flag.to_string(), value]);
        }
        if !extra.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr".to_string(), String::new()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts an operator with `args`, logging to `<log>.log` in the scenario directory.
    pub fn start(&self, log: &str, args: &[String]) -> Operator {
        Operator::start(args, self.dir.path().join(format!("{log}.log"))).unwrap()
    }

    /// Reads intents from the output topic until `expected` arrived or none came for `idle`.
    pub fn intents(&self, expected: usize, idle: Duration) -> Vec<ScoredIntent> {
        read_intents(&self.brokers, &self.output, expected, idle).unwrap()
    }

    /// Runs an operator with `args` (logging to `<log>.log`) until `expected` intents are on
    /// the output topic or none came for `idle`, stops it with SIGTERM and asserts a clean
    /// exit. Returns the intents read and the operator's log.
    pub fn run_until(&self, log: &str, args: &[String], expected: usize, idle: Duration) -> (Vec<ScoredIntent>, String) {
        let op = self.start(log, args);
        let intents = self.intents(expected, idle);
        let (status, text) = op.terminate().unwrap();
        assert!(status.success(), "{log}: exit {status}; log:\n{text}");
        (intents, text)
    }
}

/// Offline scores per user: each user's events scored one by one from a fresh state.
pub fn offline_scores(events: &[Event]) -> BTreeMap<String, intentflow_model::SequenceScores> {
    let model = IntentModel::load(trained_model_dir(), &Device::Cpu).expect("model");
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
    /// `intentflow.source.timestamp`.
    pub source_timestamp: i64,
    /// The original bytes.
    pub value: Vec<u8>,
}

/// Reads a dead-letter topic until `expected` records arrived or it stays idle.
pub fn dead_letters(brokers: &str, topic: &str, expected: usize) -> Vec<DeadLetter> {
    use intentflow_pipeline::runtime::{DLQ_ERROR_KIND, DLQ_REASON, DLQ_SOURCE_OFFSET, DLQ_SOURCE_PARTITION, DLQ_SOURCE_TIMESTAMP, DLQ_SOURCE_TOPIC};
    use rdkafka::message::Headers;
    let records = kafka::read_topic(brokers, topic, Duration::from_secs(5), |n| n >= expected).expect("reading the dead-letter topic");
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
                source_timestamp: get(DLQ_SOURCE_TIMESTAMP).parse().expect("timestamp"),
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

fn assert_states_match(states: &BTreeMap<String, intentflow_state::UserState>, offline: &BTreeMap<String, intentflow_model::SequenceScores>) {
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
        if let Ok(Some(status)) = op.child.try_wait() {
            panic!("the operator exited ({status}) before {topic} reached {n}; log:\n{}", op.log_text());
        }
        assert!(started.elapsed() < limit, "{topic} did not reach {n} in {limit:?}; log:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The three-node cluster of `scripts/kafka-cluster` (replication factor 3, min ISR 2), started
/// for a test and stopped and removed when dropped.
pub struct Cluster {
    /// Bootstrap servers of all three nodes.
    pub brokers: String,
}

impl Cluster {
    fn script(args: &[&str]) -> Result<String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka-cluster");
        let out = Command::new(script).args(args).output().context("running scripts/kafka-cluster")?;
        if !out.status.success() {
            bail!("scripts/kafka-cluster {args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts the cluster (from a clean state) and waits until all three nodes serve.
    pub fn start() -> Cluster {
        Cluster::script(&["reset"]).unwrap();
        Cluster::script(&["start"]).unwrap();
        Cluster { brokers: Cluster::script(&["brokers"]).unwrap().trim().to_string() }
    }

    /// SIGKILLs node `n` (1–3).
    pub fn kill(&self, n: u8) {
        Cluster::script(&["kill", &n.to_string()]).unwrap();
    }

    /// Starts node `n` again and waits until it serves.
    pub fn restart(&self, n: u8) {
        Cluster::script(&["restart", &n.to_string()]).unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Cluster::script(&["reset"]);
    }
}
