//! A model update without a restart, on the real broker: the operator runs with
//! `model_reload = "reset"`, a new model is written into its model directory while events are
//! being scored, and the operator is SIGKILLed after the switch and started again. Every event is
//! scored exactly once; each user's intents are the old model's and then the new one's; and the
//! scores are bit for bit those of the old model up to the switch and of the new one after it,
//! with each user's session going on and its hidden vector restarted from zero.

use intentflow_integration_tests::*;
use intentflow_model::{Device, IntentModel};
use intentflow_operators::{EmittedAt, IntentOperator, PositionedEvent};
use intentflow_schemas::{Event, SourcePosition};
use intentflow_state::changelog::ModelPolicy;
use intentflow_state::{StateStore, StoreOptions};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

const IDLE: Duration = Duration::from_secs(120);

/// Copies a model's files into `to` through a temporary name each, as a deployment would.
fn install_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let tmp = to.join(format!(".{}.tmp", entry.file_name().to_string_lossy()));
        std::fs::copy(entry.path(), &tmp).unwrap();
        std::fs::rename(&tmp, to.join(entry.file_name())).unwrap();
    }
}

/// One user's events scored in process: the first `switch` by `old` from no state, the rest by
/// `new` continuing from that state as the operator migrates it. Scores and final state.
fn reference(old: &IntentModel, new: &IntentModel, events: &[&Event], switch: usize) -> (Vec<f32>, intentflow_state::UserState) {
    let positioned: Vec<PositionedEvent> = events
        .iter()
        .enumerate()
        .map(|(i, e)| PositionedEvent { source: SourcePosition { topic: "t".into(), partition: 0, offset: i as i64 }, event: (*e).clone() })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
    let mut scores = Vec::new();
    let mut state = None;
    for (model, part, policy) in [(old, &positioned[..switch], ModelPolicy::Refuse), (new, &positioned[switch..], ModelPolicy::Migrate)] {
        if part.is_empty() {
            continue;
        }
        let out = IntentOperator::new(model.clone()).with_model_policy(policy).process(part, &store, EmittedAt::EventTime).unwrap();
        scores.extend(out.scored.iter().map(|s| s.score));
        store.commit(out.states.iter().map(|(p, u, s)| (*p, u.as_str(), s)), [], []).unwrap();
        state = out.states.into_iter().next().map(|(_, _, s)| s);
    }
    (scores, state.expect("the user has events"))
}

#[test]
fn a_model_switched_mid_stream_and_a_crash_after_it_score_every_event_exactly_once() {
    let sc = Scenario::new("reload", 3);
    let model_dir = sc.dir.path().join("model");
    install_model(trained_model_dir(), &model_dir);
    let other = other_model_dir(16);
    let (old, new) = (IntentModel::load(trained_model_dir(), &Device::Cpu).unwrap(), IntentModel::load(other.path(), &Device::Cpu).unwrap());
    assert_ne!(old.version(), new.version());
    let addr = free_addr();
    let args = sc.run_args(&["--metrics-addr", &addr, "--model-dir", model_dir.to_str().unwrap()]);
    let env = [("INTENTFLOW_MODEL_RELOAD", "reset"), ("INTENTFLOW_MODEL_WATCH_MS", "200")];
    let start = |log: &str| Operator::spawn_env("run", &args, sc.dir.path().join(format!("{log}.log")), &env).unwrap();

    let events = generated_events(300, 12_000, 41);
    let mut op = start("first");
    produce_events(&sc.brokers, &sc.input, &events[..5_000]).unwrap();
    wait_for_committed(&sc.brokers, &sc.group, &sc.input, 3_000, &mut op, IDLE);
    // The new model arrives while the first events are being scored; the rest follow the switch.
    install_model(other.path(), &model_dir);
    let started = Instant::now();
    while metric(&http_get(&addr, "/metrics"), "intentflow_model_reloads_total{result=\"switched\"}") < 1 {
        assert!(op.exited().is_none() && started.elapsed() < IDLE, "no switch; log:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    produce_events(&sc.brokers, &sc.input, &events[5_000..]).unwrap();
    assert!(op.log_text().contains("model switched"), "{}", op.log_text());
    wait_for_committed(&sc.brokers, &sc.group, &sc.input, 9_000, &mut op, IDLE);
    op.crash().unwrap();

    // Started again, it loads the new model and goes on with the states of both.
    let op = start("second");
    let intents = sc.intents(events.len(), IDLE);
    // The store writes without a write-ahead log, so the crash took back what the first life
    // wrote since its last flush (the switch): the second life restores it from the changelog
    // before the store is read below, even when no event is left for it to score.
    wait_for_log(&op, "assigned partitions are up to date with the changelog", IDLE);
    let (status, log) = op.terminate().unwrap();
    assert!(status.success(), "{log}");
    assert!(!log.contains("model switched"), "the second life serves the new model from the start");

    let sources: HashSet<(i32, i64)> = intents.iter().map(|i| (i.source.partition, i.source.offset)).collect();
    assert_eq!(sources.len(), intents.len(), "an event was scored twice");
    assert_eq!(intents.len(), events.len(), "one intent per event");
    let mut by_event: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in &events {
        by_event.entry(&e.user_id).or_default().push(e);
    }
    let states = stored_states(&sc.state);
    let (mut switched, mut only_old, mut only_new) = (0, 0, 0);
    for (user, got) in intents_by_user(&intents) {
        let mine = &by_event[user.as_str()];
        let ids: Vec<_> = got.iter().map(|i| i.event_id.as_deref()).collect();
        assert_eq!(ids, mine.iter().map(|e| e.event_id.as_deref()).collect::<Vec<_>>(), "{user}: intents out of event order");
        // The old model's intents, then the new one's.
        let switch = got.iter().take_while(|i| i.model_version == old.version()).count();
        assert!(got[switch..].iter().all(|i| i.model_version == new.version()), "{user}: {:?}", got.iter().map(|i| &i.model_version).collect::<Vec<_>>());
        match (switch, got.len() - switch) {
            (0, _) => only_new += 1,
            (_, 0) => only_old += 1,
            _ => switched += 1,
        }
        let (scores, state) = reference(&old, &new, mine, switch);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.iter().map(|i| i.score).collect::<Vec<_>>()), bits(&scores), "{user}: scores differ from the old model up to event {switch} and the new one after");
        let stored = &states[&user];
        assert_eq!((&stored.session, bits(&stored.hidden), &stored.model_version), (&state.session, bits(&state.hidden), &state.model_version), "{user}: final state");
    }
    assert!(switched > 50 && only_old + only_new + switched == by_event.len(), "users switched mid-history: {switched}, old only: {only_old}, new only: {only_new}");
}
