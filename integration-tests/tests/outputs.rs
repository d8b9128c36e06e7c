//! `[[output]]`s with emit policies on the real broker: each output publishes exactly what its
//! policy decides on each user's scores in order, across SIGKILLs, in the schema it is set to
//! (every record checked against `docs/schemas/intent-v*.schema.json`), and a replay of the same
//! history builds the same memories into its states.

use intentflow_integration_tests::*;
use intentflow_pipeline::kafka::read::read_topic;
use intentflow_pipeline::kafka::KafkaClients;
use rdkafka::message::Headers;
use rdkafka::Message;
use intentflow_operators::emit::{memory_id, EmitMemory, EmitPolicy};
use intentflow_schemas::{Crossing, EventType, ScoredIntent};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::Duration;

const IDLE: Duration = Duration::from_secs(180);

/// One output's intents per user: (score, previous score, crossing, segment).
type PerUser = BTreeMap<String, Vec<(f32, Option<f32>, Option<Crossing>, Option<String>)>>;

fn per_user(intents: &[ScoredIntent]) -> PerUser {
    let mut by: PerUser = BTreeMap::new();
    for i in intents {
        let p = &i.placement;
        by.entry(i.user_id.clone()).or_default().push((i.score, p.previous_score, p.crossing, p.segment.clone()));
    }
    by
}

/// Checks every record of `topic` against `docs/schemas/intent-v<version>.schema.json` and its
/// `intentflow.schema` header; returns how many there were.
fn assert_schema(brokers: &str, topic: &str, version: u32) -> usize {
    let path = format!("{}/../docs/schemas/intent-v{version}.schema.json", env!("CARGO_MANIFEST_DIR"));
    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{path}: {e}"));
    let records = read_topic(&KafkaClients::new(brokers), topic, Duration::from_secs(5), |_| false).unwrap();
    for m in &records {
        let value: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{topic}@{}: {value} breaks {path}: {errors:?}", m.offset());
        let header = m.headers().and_then(|h| h.iter().find(|x| x.key == "intentflow.schema")).and_then(|x| x.value).map(|v| String::from_utf8_lossy(v).into_owned());
        assert_eq!(header, Some(format!("intent/{version}")), "{topic}@{}", m.offset());
    }
    records.len()
}

/// What `policy` publishes of each user's intents on the every-event output, in order.
fn expected(all: &[ScoredIntent], policy: &EmitPolicy, names: &[&str], exclude_purchases: bool) -> (PerUser, BTreeMap<String, EmitMemory>) {
    let (mut out, mut memories) = (PerUser::new(), BTreeMap::new());
    for (user, theirs) in intents_by_user(all) {
        let mut memory = EmitMemory::default();
        for i in theirs {
            if exclude_purchases && i.event_type == EventType::Purchase {
                continue;
            }
            if let Some(e) = policy.decide(&mut memory, i.score) {
                let (crossing, segment) = match policy {
                    EmitPolicy::Threshold { .. } => (Some(if e.level == 1 { Crossing::Up } else { Crossing::Down }), None),
                    EmitPolicy::Segments { .. } => (None, Some(names[usize::from(e.level)].to_string())),
                    _ => (None, None),
                };
                out.entry(user.clone()).or_default().push((i.score, e.previous, crossing, segment));
            }
        }
        memories.insert(user, memory);
    }
    (out, memories)
}

#[test]
fn policy_outputs_publish_each_decision_exactly_once_across_sigkills_and_a_replay_remembers_the_same() {
    let sc = Scenario::new("outputs", 3);
    let events = generated_events(600, 30_000, 41);
    // Cut-offs some users cross: quantiles of the scores the model gives these events.
    let mut scores: Vec<f32> = offline_scores(&events).values().flat_map(|s| s.scores.iter().copied()).collect();
    scores.sort_by(f32::total_cmp);
    let q = |p: f64| scores[((scores.len() - 1) as f64 * p) as usize];
    let (enter, leave, cut_warm, cut_hot) = (q(0.85), q(0.75), q(0.5), q(0.85));
    let (alerts, moves, segments) = (unique("alerts"), unique("moves"), unique("segments"));
    let config = sc.dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[[output]]\ntopic = \"{alerts}\"\npolicy = \"threshold\"\nenter = {enter}\nleave = {leave}\nexclude_purchases = true\n\n\
             [[output]]\ntopic = \"{moves}\"\npolicy = \"delta\"\nmin_change = 0.05\nschema = 2\n\n\
             [[output]]\ntopic = \"{segments}\"\npolicy = \"segments\"\ncuts = [{cut_warm}, {cut_hot}]\n"
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    // The every-event output in schema v2 too, and every record with its schema in a header.
    let args = sc.run_args(&["--config", &config_arg, "--max-batch-records", "500", "--output-schema", "2", "--output-headers"]);

    // Three lives killed at random moments of their own part of the input, then a last one.
    let records: Vec<(String, Vec<u8>)> = events.iter().map(|e| (e.user_id.to_string(), serde_json::to_vec(e).unwrap())).collect();
    let parts: Vec<&[(String, Vec<u8>)]> = records.chunks(records.len().div_ceil(4)).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
    let mut produced = 0;
    for (life, part) in parts[..3].iter().enumerate() {
        produce(&sc.brokers, &sc.input, part).unwrap();
        let at = produced + rng.random_range(1..=part.len()) as i64;
        produced += part.len() as i64;
        let mut op = sc.start(&format!("life{life}"), &args);
        wait_for_committed(&sc.brokers, &sc.group, &sc.input, at, &mut op, IDLE);
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        op.crash().unwrap();
    }
    produce(&sc.brokers, &sc.input, parts[3]).unwrap();
    let last = sc.start("final", &args);
    let all = sc.intents(events.len(), IDLE);
    let (status, log) = last.terminate().unwrap();
    assert!(status.success(), "exit {status}; log:\n{log}");
    let states = stored_states(&sc.state);
    assert_exactly_once(&all, &events, &states);

    // Each output holds exactly its policy's decisions on the every-event output's scores:
    // none lost, none twice, in each user's order, with the previous score, crossing, segment.
    let outputs = [
        (&alerts, EmitPolicy::Threshold { enter, leave }, true),
        (&moves, EmitPolicy::Delta { min_change: 0.05 }, false),
        (&segments, EmitPolicy::Segments { cuts: vec![cut_warm, cut_hot], names: vec!["cold".into(), "warm".into(), "hot".into()] }, false),
    ];
    let mut counts = Vec::new();
    for (topic, policy, exclude_purchases) in &outputs {
        let (want, memories) = expected(&all, policy, &["cold", "warm", "hot"], *exclude_purchases);
        let n: usize = want.values().map(Vec::len).sum();
        let got = read_intents(&sc.brokers, topic, usize::MAX, Duration::from_secs(5)).unwrap();
        assert_eq!(got.len(), n, "{topic}: {} intents, the policy decides {n}", got.len());
        assert_eq!(per_user(&got), want, "{topic}");
        for (user, memory) in &memories {
            assert_eq!(states[user].output_memory(memory_id(topic, policy)), *memory, "{topic}: the memory of {user}");
        }
        counts.push(n);
    }
    assert!(counts[0] > 0 && counts[0] < counts[1] && counts[1] < all.len() && counts[2] > 600, "{counts:?} of {}", all.len());
    // Every record in its schema: v2 on the every-event and moves outputs, v1 elsewhere.
    assert!(all.iter().all(|i| i.v == 2 && i.detail.cart_count.is_some()));
    for (topic, version, n) in [(&sc.output, 2, all.len()), (&alerts, 1, counts[0]), (&moves, 2, counts[1]), (&segments, 1, counts[2])] {
        assert_eq!(assert_schema(&sc.brokers, topic, version), n, "{topic}");
    }
    let v2 = read_intents(&sc.brokers, &moves, usize::MAX, Duration::from_secs(5)).unwrap();
    assert!(v2.iter().all(|i| i.v == 2 && i.detail.horizon.as_deref() == Some("session") && i.detail.decision.is_some() && i.detail.price.is_some()));
    assert!(v2.iter().any(|i| i.detail.cart_count > Some(0)) && v2.iter().any(|i| i.detail.decision == Some(true)));

    // A replay of the topic with the same configuration remembers the same of every user.
    let replayed = sc.dir.path().join("replayed");
    let (status, out) = intentflow(&[
        "replay", "--config", &config_arg, "--brokers", &sc.brokers, "--input-topic", &sc.input, "--model-dir", &trained_model_dir().display().to_string(),
        "--state-dir", &replayed.display().to_string(), "--output", &sc.dir.path().join("replayed.jsonl").display().to_string(),
    ]);
    assert!(status.success(), "{out}");
    let replayed = stored_states(&replayed);
    assert_eq!(replayed.len(), states.len());
    for (user, state) in &states {
        assert_eq!(replayed[user].outputs, state.outputs, "{user}");
    }
    eprintln!("outputs test: {} events; published alerts {}, moves {}, segments {}", all.len(), counts[0], counts[1], counts[2]);
}
