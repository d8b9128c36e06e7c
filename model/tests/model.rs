//! Model-level behaviour: training learns a learnable signal, a saved model loads back
//! identically, and a batched step equals single steps.

use candle_core::Device;
use intentflow_model::assess::assess;
use intentflow_model::train::{labelled_sessions, train, train_sessions, LabelHorizon, Part, SessionsBuilder, TrainConfig};
use intentflow_model::{Cell, FeatureSpec, Features, IntentModel, ModelError, FEATURE_DIM};
use intentflow_schemas::{Event, EventType, SessionConfig, SessionState};

fn ev(user: usize, ts_s: i64, kind: EventType) -> Event {
    Event {
        user_id: format!("u{user}").into(),
        ts: 1_700_000_000_000 + ts_s * 1000,
        kind,
        event_id: None,
        session_id: None,
        item_id: None,
        category: None,
        category_id: None,
        brand: None,
        price: Some(20.0),
        quantity: None,
    }
}

/// Sessions where adding to cart leads to a purchase and browsing alone does not.
fn learnable_events() -> Vec<Event> {
    let mut events = Vec::new();
    for u in 0..400 {
        let t = (u as i64) * 10;
        events.push(ev(u, t, EventType::View));
        events.push(ev(u, t + 20, EventType::View));
        if u % 3 == 0 {
            events.push(ev(u, t + 40, EventType::AddToCart));
            events.push(ev(u, t + 60, EventType::View));
            events.push(ev(u, t + 80, EventType::Purchase));
        } else {
            events.push(ev(u, t + 40, EventType::Click));
            events.push(ev(u, t + 60, EventType::View));
        }
    }
    events
}

fn quick_config() -> TrainConfig {
    TrainConfig { hidden_dim: 8, members: 2, epochs: 25, batch_size: 32, learning_rate: 1e-2, ..TrainConfig::default() }
}

#[test]
fn labels_mark_events_before_the_purchase() {
    let spec = FeatureSpec::identity(SessionConfig::default());
    let sessions = labelled_sessions(&learnable_events()[..0], &spec, LabelHorizon::Session);
    assert!(sessions.is_empty());
    let events = vec![ev(1, 0, EventType::View), ev(1, 10, EventType::AddToCart), ev(1, 20, EventType::Purchase), ev(1, 30, EventType::View)];
    let sessions = labelled_sessions(&events, &spec, LabelHorizon::Session);
    assert_eq!(sessions.len(), 2, "the purchase closes the first session");
    assert_eq!(sessions[0].labels, [1.0, 1.0, 0.0]);
    assert_eq!(sessions[0].mask, [1.0, 1.0, 0.0]);
    assert_eq!(sessions[1].labels, [0.0]);
    assert_eq!(sessions[0].events, [0, 1, 2]);
}

#[test]
fn the_24_hour_label_looks_across_sessions() {
    let spec = FeatureSpec::identity(SessionConfig::default());
    let hour = 3_600;
    // A browse session, a purchase 20 h later in a new session, and a visit 2 days later.
    let events = vec![ev(1, 0, EventType::View), ev(1, 20 * hour, EventType::View), ev(1, 20 * hour + 60, EventType::Purchase), ev(1, 70 * hour, EventType::View)];
    let sessions = labelled_sessions(&events, &spec, LabelHorizon::Within24h);
    assert_eq!(sessions.len(), 3);
    assert_eq!(sessions[0].labels, [1.0], "purchase within 24 h, though in a later session");
    assert_eq!((sessions[1].labels.as_slice(), sessions[1].mask.as_slice()), ([1.0, 0.0].as_slice(), [1.0, 0.0].as_slice()));
    assert_eq!(sessions[2].labels, [0.0]);
    // The same events under the session label: the first session never purchases.
    assert_eq!(labelled_sessions(&events, &spec, LabelHorizon::Session)[0].labels, [0.0]);
}

#[test]
fn training_learns_cart_leads_to_purchase_and_round_trips() {
    let events = learnable_events();
    let mut epochs = 0;
    let trained = train(&events, &quick_config(), &Device::Cpu, |_, _| epochs += 1).unwrap();
    assert_eq!(epochs, trained.summary.epochs);
    // The first two events of every session look alike whatever follows, so the best possible
    // ranking ties them: ROC-AUC 28/32 = 0.875 (2 of 4 positives and 4 of 8 negatives per three
    // sessions are indistinguishable).
    let auc = trained.summary.val_roc_auc.expect("validation has both classes");
    assert!(auc > 0.85, "validation ROC-AUC {auc}");
    assert_eq!(trained.summary.train_sessions + trained.summary.val_sessions + trained.summary.test_sessions, 400);
    assert_eq!(trained.summary.test_sessions, 120, "30 % held out");

    let dir = tempfile::tempdir().unwrap();
    let meta = trained.save(dir.path()).unwrap();
    assert!(meta.version.starts_with("gru-") && meta.version.len() == 16);
    let model = IntentModel::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(model.version(), meta.version);

    // After a cart the score is higher than after plain browsing.
    let cart = model.score_sequence(&[ev(9001, 0, EventType::View), ev(9001, 20, EventType::AddToCart)]).unwrap();
    let browse = model.score_sequence(&[ev(9002, 0, EventType::View), ev(9002, 20, EventType::Click)]).unwrap();
    assert!(cart.scores[1] > browse.scores[1] + 0.2, "cart {:?} vs browse {:?}", cart.scores, browse.scores);

    // A batch of users stepped together equals each stepped alone.
    let inputs: Vec<Features> = (0..5).map(|i| Features { item: i * 100, ..Features::dense([i as f32 * 0.1 - 0.2; FEATURE_DIM]) }).collect();
    let h = model.hidden_dim();
    assert_eq!(h, 2 * 8, "two members of hidden size 8, packed");
    let hidden: Vec<f32> = (0..5 * h).map(|i| (i as f32 * 0.37).sin() * 0.5).collect();
    let batched = model.step(&inputs, &hidden).unwrap();
    for i in 0..5 {
        let single = model.step(&inputs[i..=i], &hidden[i * h..(i + 1) * h]).unwrap();
        assert!((single.scores[0] - batched.scores[i]).abs() < 1e-6);
        for (a, b) in single.hidden.iter().zip(&batched.hidden[i * h..(i + 1) * h]) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    // The head reads the session and history aggregates directly (the skip connection, which
    // starts as a regression on them): the other features have no skip weight, and the fused
    // serving step adds the skip term as candle's reference step does.
    let skip: Vec<f32> = model.params().skip_weight.as_ref().expect("trained with a skip connection").flatten_all().unwrap().to_vec1().unwrap();
    for (name, w) in intentflow_model::features::FEATURE_NAMES.iter().zip(&skip) {
        assert!(intentflow_model::features::SKIP_FEATURES.contains(name) || *w == 0.0, "{name} has skip weight {w}");
    }
    assert!(skip.iter().any(|w| w.abs() > 1e-3), "{skip:?}");
    let reference = model.with_candle_step().step(&inputs, &hidden).unwrap();
    for (a, b) in reference.scores.iter().zip(&batched.scores) {
        assert!((a - b).abs() < 1e-5, "candle {a} vs fused {b}");
    }
    let mut without_skip = model.params().clone();
    without_skip.skip_weight = None;
    let without = IntentModel::new(without_skip, model.meta().clone(), Device::Cpu).unwrap().step(&inputs, &hidden).unwrap();
    assert!(without.scores.iter().zip(&batched.scores).any(|(a, b)| (a - b).abs() > 1e-4), "the skip term counts");

    // A tampered weights file is refused.
    let weights = dir.path().join(intentflow_model::MODEL_FILE);
    let mut bytes = std::fs::read(&weights).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    assert!(matches!(IntentModel::load(dir.path(), &Device::Cpu), Err(ModelError::Invalid(_))));
}

#[test]
fn missing_model_says_how_to_make_one() {
    let dir = tempfile::tempdir().unwrap();
    let err = IntentModel::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("intentflow train"), "{err}");
}

#[test]
fn training_without_purchases_is_an_error() {
    let events: Vec<Event> = (0..50).map(|u| ev(u, 0, EventType::View)).collect();
    let err = train(&events, &quick_config(), &Device::Cpu, |_, _| {}).unwrap_err();
    assert!(matches!(err, ModelError::Training(_)), "{err}");
}

#[test]
fn training_and_streaming_compute_identical_inputs() {
    // The tensors training feeds the GRU and the ones the operator feeds it come from the same
    // events through the same code: compare them bit for bit on varied events.
    let mut events = Vec::new();
    for u in 0..30usize {
        for k in 0..(3 + u % 7) {
            let kind = EventType::ALL[(u + k) % 6];
            let mut e = ev(u, (k as i64) * (40 + u as i64 * 17), kind);
            e.item_id = Some(format!("item{}", (u * 7 + k) % 11).into());
            e.category = (k % 3 != 0).then(|| format!("cat{}", u % 4).into());
            e.price = (k % 4 != 1).then_some(3.5 * (k + 1) as f64);
            e.session_id = Some(format!("s{}", k / 5).into());
            events.push(e);
        }
    }
    let trained = train(&learnable_events(), &quick_config(), &Device::Cpu, |_, _| {}).unwrap();
    let spec = trained.features.clone();
    let sessions = labelled_sessions(&events, &spec, LabelHorizon::Session);
    let mut from_training: Vec<(usize, Features)> =
        sessions.iter().flat_map(|s| s.events.iter().zip(&s.features).map(|(&i, raw)| (i, spec.normalize(raw)))).collect();
    from_training.sort_by_key(|(i, _)| *i);
    let mut states: std::collections::HashMap<&str, SessionState> = Default::default();
    let streamed: Vec<(usize, Features)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (i, spec.featurize(states.entry(e.user_id.as_str()).or_default(), e).features))
        .collect();
    assert_eq!(from_training.len(), events.len());
    assert_eq!(from_training, streamed);
    assert!(streamed.iter().any(|(_, f)| f.item != 0) && streamed.iter().any(|(_, f)| f.category != 0));
}

#[test]
fn assessment_scores_the_held_out_sessions_with_every_scorer() {
    let events = learnable_events();
    let trained = train(&events, &quick_config(), &Device::Cpu, |_, _| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    trained.save(dir.path()).unwrap();
    let model = IntentModel::load(dir.path(), &Device::Cpu).unwrap();
    let oracle: Vec<f64> = events.iter().map(|e| if e.user_id.trim_start_matches('u').parse::<usize>().unwrap() % 3 == 0 { 0.9 } else { 0.1 }).collect();
    let a = assess(&model, &events, Some(&oracle), Part::Test, 50, 3).unwrap();
    let names: Vec<&str> = a.scorers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["gru", "logistic_regression", "ensemble", "gradient_boosting", "base_rate", "oracle"]);
    let gru = a.scorer("gru").unwrap();
    // 120 test sessions: 40 buy (4 labelled events each), 80 do not (4 each).
    assert_eq!((gru.sessions, gru.events), (120, 480));
    assert!((gru.base_rate - 160.0 / 480.0).abs() < 1e-9);
    assert!(gru.roc_auc.unwrap() > 0.85, "{:?}", gru.roc_auc);
    let oracle = a.scorer("oracle").unwrap();
    assert_eq!(oracle.roc_auc, Some(1.0), "the oracle knows every buyer");
    assert_eq!(a.scorer("base_rate").unwrap().roc_auc, Some(0.5));
    let ci = gru.roc_auc_ci.unwrap();
    assert!(ci.lo <= gru.roc_auc.unwrap() && gru.roc_auc.unwrap() <= ci.hi);
    assert_eq!(gru.auc_by_events.iter().map(|b| b.count).sum::<usize>(), 480);
    // The GRU against the regression, paired, on both metrics; and for the ensemble.
    let compared: Vec<(&str, &str, &str)> = a.comparisons.iter().map(|c| (c.a.as_str(), c.b.as_str(), c.metric.as_str())).collect();
    assert_eq!(
        compared,
        [
            ("gru", "logistic_regression", "roc_auc"),
            ("gru", "logistic_regression", "pr_auc"),
            ("ensemble", "logistic_regression", "roc_auc"),
            ("ensemble", "logistic_regression", "pr_auc"),
            ("gru", "gradient_boosting", "roc_auc"),
            ("gru", "gradient_boosting", "pr_auc")
        ]
    );
    assert!(a.scorer("gradient_boosting").unwrap().roc_auc.unwrap() > 0.8, "the trees learn the carts too");
    assert!(a.comparisons.iter().all(|c| c.probability_a_better.is_some_and(|p| (0.0..=1.0).contains(&p))));
    assert_eq!(gru.lift.iter().map(|r| r.events).collect::<Vec<_>>(), [5, 24, 48]);
    // Reasons: the first one named is, of the signals that could be reasons, the one whose
    // removal moves the whole model's score most (GRU included), for most events.
    let reasons = a.reasons.as_ref().expect("a model with a skip connection has reasons");
    assert_eq!(reasons.events, 480);
    assert!(reasons.with_reasons > 0 && reasons.top_agrees.unwrap() > 0.6, "{reasons:?}");
    let html = intentflow_model::report::render_html(&a, "learnable.jsonl");
    assert!(html.contains("<svg") && html.contains("logistic_regression") && html.contains(model.version()) && html.contains("Paired session bootstrap"));
}

/// Crash recovery and replays cut a stream into different batches; a user's state must not
/// depend on the cut. On the CPU each row is stepped on its own, so a row's new hidden vector
/// and score are bit-for-bit the same whatever rows share its batch.
#[test]
fn a_rows_step_is_bit_identical_whatever_batch_it_shares() {
    let cfg = TrainConfig { hidden_dim: 16, members: 1, epochs: 2, ..TrainConfig::default() };
    let trained = train(&learnable_events(), &cfg, &Device::Cpu, |_, _| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    trained.save(dir.path()).unwrap();
    let model = IntentModel::load(dir.path(), &Device::Cpu).unwrap();
    let h = model.state_dim();
    let n = 3_000;
    let inputs: Vec<Features> = (0..n)
        .map(|i| Features { item: (i * 7 % 1_000) as u32, category: (i % 200) as u32, ..Features::dense([((i * 13 % 17) as f32).sin(); FEATURE_DIM]) })
        .collect();
    let hidden: Vec<f32> = (0..n * h).map(|i| (i as f32 * 0.37).sin() * 0.5).collect();
    let whole = model.step(&inputs, &hidden).unwrap();
    for size in [1usize, 2, 3, 7, 16, 33, 100, 513] {
        for start in (0..n - size).step_by(size * 5 + 1) {
            let part = model.step(&inputs[start..start + size], &hidden[start * h..(start + size) * h]).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&part.scores), bits(&whole.scores[start..start + size]), "scores of rows {start}.. in a batch of {size}");
            assert_eq!(bits(&part.hidden), bits(&whole.hidden[start * h..(start + size) * h]), "hidden of rows {start}.. in a batch of {size}");
        }
    }
}

/// Members train side by side on the CPU; each must give the bits it gives alone, so the packed
/// model does not depend on how the threads interleave.
#[test]
fn members_trained_together_equal_members_trained_alone() {
    let events = learnable_events();
    let cfg = TrainConfig { members: 2, epochs: 3, ..quick_config() };
    let together = train(&events, &cfg, &Device::Cpu, |_, _| {}).unwrap();
    let alone: Vec<_> = [cfg.seed, cfg.seed.wrapping_add(1_000_003)]
        .iter()
        .map(|&seed| train(&events, &TrainConfig { members: 1, seed, ..cfg.clone() }, &Device::Cpu, |_, _| {}).unwrap().params)
        .collect();
    let packed = intentflow_model::GruParams::pack(&alone).unwrap();
    for ((name, a), (_, b)) in together.params.state_dict().unwrap().into_iter().zip(packed.state_dict().unwrap()) {
        let (a, b): (Vec<f32>, Vec<f32>) = (a.flatten_all().unwrap().to_vec1().unwrap(), b.flatten_all().unwrap().to_vec1().unwrap());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs");
    }
}

#[test]
fn two_cells_train_the_cheaper_is_served_unless_the_dearer_validates_better_beyond_doubt() {
    let cfg = TrainConfig { cells: vec![Cell::Gru, Cell::Lstm], members: 1, ..quick_config() };
    let trained = train(&learnable_events(), &cfg, &Device::Cpu, |_, _| {}).unwrap();
    let trials = &trained.summary.trials;
    assert_eq!(trials.iter().map(|t| t.cell).collect::<Vec<_>>(), [Cell::Gru, Cell::Lstm]);
    // The GRU is served unless the LSTM beats it on validation beyond doubt.
    let served = trained.params.cell();
    let (mine, other) = (trials.iter().find(|t| t.cell == served).unwrap(), trials.iter().find(|t| t.cell != served).unwrap());
    assert_eq!((trained.summary.val_pr_auc, mine.p_better_than_served), (mine.val_pr_auc, None));
    let p = other.p_better_than_served.expect("the cell not served is compared with the served one");
    match served {
        Cell::Gru => assert!(p < intentflow_model::train::DEARER_CELL_CONFIDENCE, "the LSTM beat the GRU with P = {p} and was not served"),
        Cell::Lstm => assert!(p <= 1.0 - intentflow_model::train::DEARER_CELL_CONFIDENCE + 1e-9, "the LSTM was served though the GRU beat it with P = {p}"),
        Cell::Cnn => unreachable!("not trained"),
    }
    assert_eq!(trained.candidates.len(), 1);
    assert_ne!(trained.candidates[0].params.cell(), trained.params.cell());

    let dir = tempfile::tempdir().unwrap();
    let meta = trained.save(dir.path()).unwrap();
    assert!(meta.version.starts_with(&format!("{}-", meta.cell)));
    let candidates = intentflow_model::candidate_dirs(dir.path());
    assert_eq!(candidates.len(), 1);
    let models = [IntentModel::load(dir.path(), &Device::Cpu).unwrap(), IntentModel::load(&candidates[0], &Device::Cpu).unwrap()];
    let lstm = models.iter().find(|m| m.cell() == Cell::Lstm).expect("an LSTM among the two");
    assert_eq!((lstm.hidden_dim(), lstm.state_dim()), (8, 16), "the state is [h | c]");
    streams_like_candle(lstm);

    // Training again into the same directory with one cell leaves no stale candidate.
    let gru_only = train(&learnable_events(), &TrainConfig { members: 1, ..quick_config() }, &Device::Cpu, |_, _| {}).unwrap();
    gru_only.save(dir.path()).unwrap();
    assert!(intentflow_model::candidate_dirs(dir.path()).is_empty());
}

#[test]
fn a_causal_convolution_trains_and_streams_like_candle() {
    let cnn = train(&learnable_events(), &TrainConfig { cells: vec![Cell::Cnn], ..quick_config() }, &Device::Cpu, |_, _| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    cnn.save(dir.path()).unwrap();
    let model = IntentModel::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!((model.cell(), model.hidden_dim(), model.state_dim()), (Cell::Cnn, 16, 48), "two members of 8 channels; [y | P_1 | P_2]");
    assert!(model.version().starts_with("cnn-"));
    streams_like_candle(&model);
}

/// A trained model of any cell learns the cart rule, streams through the fused step as candle
/// computes it, and a user's state does not depend on the batch it was stepped in.
fn streams_like_candle(model: &IntentModel) {
    let auc = model.meta().training.as_ref().unwrap().val_roc_auc.unwrap();
    assert!(auc > 0.85, "the {} learns the cart rule too: validation ROC-AUC {auc}", model.cell());
    let events = [ev(9001, 0, EventType::View), ev(9001, 20, EventType::AddToCart), ev(9001, 40, EventType::View)];
    let fused = model.score_sequence(&events).unwrap();
    let reference = model.with_candle_step().score_sequence(&events).unwrap();
    for (a, b) in fused.scores.iter().zip(&reference.scores).chain(fused.hidden.iter().zip(&reference.hidden)) {
        assert!((a - b).abs() < 1e-5, "fused {a} vs candle {b}");
    }
    let s = model.state_dim();
    let inputs: Vec<Features> = (0..600).map(|i| Features { item: i * 7, ..Features::dense([(i % 13) as f32 * 0.1 - 0.6; FEATURE_DIM]) }).collect();
    let states: Vec<f32> = (0..600 * s).map(|i| (i as f32 * 0.37).sin() * 0.5).collect();
    let batched = model.step(&inputs, &states).unwrap();
    for i in [0, 299, 599] {
        let single = model.step(&inputs[i..=i], &states[i * s..(i + 1) * s]).unwrap();
        assert_eq!(single.scores[0].to_bits(), batched.scores[i].to_bits());
        assert_eq!(single.hidden, batched.hidden[i * s..(i + 1) * s]);
    }
}

/// Sessions spilled to disk one user at a time read back as `labelled_sessions` cuts them, in
/// the same order, and train the same model as the events in memory.
#[test]
fn sessions_spilled_user_by_user_train_the_model_of_the_events_in_memory() {
    let mut events = learnable_events();
    // Within-24h labels look ahead across sessions; a second session per user.
    events.extend((0..400).filter(|u| u % 4 == 0).map(|u| ev(u, 5_000 + u as i64, EventType::View)));
    let cfg = quick_config();
    let spec = cfg.feature_spec();
    let dir = tempfile::tempdir().unwrap();
    for horizon in [LabelHorizon::Session, LabelHorizon::Within24h] {
        let mut builder = SessionsBuilder::create(dir.path(), &spec, horizon).unwrap();
        let mut users: Vec<&str> = events.iter().map(|e| e.user_id.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        for user in users {
            let mut of_user: Vec<Event> = events.iter().filter(|e| e.user_id == user).cloned().collect();
            of_user.sort_by_key(|e| e.ts);
            builder.add_user(&of_user).unwrap();
        }
        assert_eq!(builder.events(), events.len());
        let spilled = builder.finish().unwrap();
        let in_memory = labelled_sessions(&events, &spec, horizon);
        assert_eq!(spilled.len(), in_memory.len());
        for (i, want) in in_memory.iter().enumerate() {
            let got = spilled.get(i);
            assert_eq!((got.start_ms, &got.features, &got.labels, &got.mask, &got.aggregates), (want.start_ms, &want.features, &want.labels, &want.mask, &want.aggregates), "session {i}");
        }
        if horizon == LabelHorizon::Session {
            let from_disk = train_sessions(&spilled, &cfg, &Device::Cpu, |_, _| {}).unwrap();
            let from_memory = train(&events, &cfg, &Device::Cpu, |_, _| {}).unwrap();
            let (a, b) = (dir.path().join("a"), dir.path().join("b"));
            assert_eq!(from_disk.save(&a).unwrap().version, from_memory.save(&b).unwrap().version);
            // A set trains again (its batches go to a file of their own each time).
            let again = train_sessions(&spilled, &TrainConfig { epochs: 2, ..cfg.clone() }, &Device::Cpu, |_, _| {}).unwrap();
            assert_eq!(again.summary.train_sessions, from_disk.summary.train_sessions);
            assert_eq!(std::fs::read(a.join("model.safetensors")).unwrap(), std::fs::read(b.join("model.safetensors")).unwrap());
        }
    }
    // Only the two model directories are left: the spill directories went with their sets.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}
