//! Model-level behaviour: training learns a learnable signal, a saved model loads back
//! identically, and a batched step equals single steps.

use candle_core::Device;
use intentflow_model::train::{labelled_sessions, train, TrainConfig};
use intentflow_model::{IntentModel, ModelError, FEATURE_DIM};
use intentflow_schemas::{Event, EventType, SessionConfig};

fn ev(user: usize, ts_s: i64, kind: EventType) -> Event {
    Event {
        user_id: format!("u{user}"),
        ts: 1_700_000_000_000 + ts_s * 1000,
        kind,
        event_id: None,
        session_id: None,
        item_id: None,
        category: None,
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
    TrainConfig { hidden_dim: 8, epochs: 25, batch_size: 32, learning_rate: 1e-2, ..TrainConfig::default() }
}

#[test]
fn labels_mark_events_before_the_purchase() {
    let sessions = labelled_sessions(&learnable_events()[..0], SessionConfig::default());
    assert!(sessions.is_empty());
    let events = vec![ev(1, 0, EventType::View), ev(1, 10, EventType::AddToCart), ev(1, 20, EventType::Purchase), ev(1, 30, EventType::View)];
    let sessions = labelled_sessions(&events, SessionConfig::default());
    assert_eq!(sessions.len(), 2, "the purchase closes the first session");
    assert_eq!(sessions[0].labels, [1.0, 1.0, 0.0]);
    assert_eq!(sessions[0].mask, [1.0, 1.0, 0.0]);
    assert_eq!(sessions[1].labels, [0.0]);
}

#[test]
fn training_learns_cart_leads_to_purchase_and_round_trips() {
    let events = learnable_events();
    let (params, spec, summary) = train(&events, &quick_config(), &Device::Cpu, |_, _, _, _| {}).unwrap();
    // The first two events of every session look alike whatever follows, so the best possible
    // ranking ties them: ROC-AUC 28/32 = 0.875 (2 of 4 positives and 4 of 8 negatives per three
    // sessions are indistinguishable).
    let auc = summary.val_roc_auc.expect("validation has both classes");
    assert!(auc > 0.85, "validation ROC-AUC {auc}");

    let dir = tempfile::tempdir().unwrap();
    let meta = IntentModel::save(dir.path(), &params, spec, Some(summary)).unwrap();
    assert!(meta.version.starts_with("gru-") && meta.version.len() == 16);
    let model = IntentModel::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(model.version(), meta.version);

    // After a cart the score is higher than after plain browsing.
    let cart = model.score_sequence(&[ev(9001, 0, EventType::View), ev(9001, 20, EventType::AddToCart)]).unwrap();
    let browse = model.score_sequence(&[ev(9002, 0, EventType::View), ev(9002, 20, EventType::Click)]).unwrap();
    assert!(cart.scores[1] > browse.scores[1] + 0.2, "cart {:?} vs browse {:?}", cart.scores, browse.scores);

    // A batch of users stepped together equals each stepped alone.
    let inputs: Vec<[f32; FEATURE_DIM]> = (0..5).map(|i| [i as f32 * 0.1 - 0.2; FEATURE_DIM]).collect();
    let hidden: Vec<f32> = (0..5 * 8).map(|i| (i as f32 * 0.37).sin() * 0.5).collect();
    let batched = model.step(&inputs, &hidden).unwrap();
    for i in 0..5 {
        let single = model.step(&inputs[i..=i], &hidden[i * 8..(i + 1) * 8]).unwrap();
        assert!((single.scores[0] - batched.scores[i]).abs() < 1e-6);
        for (a, b) in single.hidden.iter().zip(&batched.hidden[i * 8..(i + 1) * 8]) {
            assert!((a - b).abs() < 1e-6);
        }
    }

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
    let err = train(&events, &quick_config(), &Device::Cpu, |_, _, _, _| {}).unwrap_err();
    assert!(matches!(err, ModelError::Training(_)), "{err}");
}
