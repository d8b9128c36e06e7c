//! Importing and learning from the real REES46 and Taobao samples in `../shared/data`.
//!
//! The samples sit next to the project checkout, not in it; in a plain clone these tests skip
//! with a visible `SKIP` line that `scripts/test` counts (see [`real_sample`]).

use intentflow_formats::{read_events, Format};
use intentflow_integration_tests::real_sample;
use intentflow_model::assess::assess;
use intentflow_model::train::{train, Part, TrainConfig};
use intentflow_model::{Device, IntentModel};
use intentflow_schemas::EventType;
use std::collections::HashSet;

fn count(events: &[intentflow_schemas::Event], kind: EventType) -> usize {
    events.iter().filter(|e| e.kind == kind).count()
}

#[test]
fn rees46_sample_imports_completely_and_the_default_model_clears_quality_floors() {
    let Some(path) = real_sample("rees46_sample_imports_completely_and_the_default_model_clears_quality_floors", "rees46-2019-10-sample.csv") else { return };
    let got = read_events(&path, Format::Rees46).unwrap();
    assert!(got.bad.is_empty(), "{:?}", &got.bad[..got.bad.len().min(5)]);
    let e = &got.events;
    // The facts of ../shared/data/README.md.
    assert_eq!(e.len(), 17_435);
    assert_eq!((count(e, EventType::View), count(e, EventType::AddToCart), count(e, EventType::Purchase)), (17_056, 165, 214));
    assert_eq!(e.iter().map(|e| &e.user_id).collect::<HashSet<_>>().len(), 4_505);
    // The README's 5,067 sessions count one row whose user_session is empty; it imports
    // without a session id (sessions are then cut by time).
    assert_eq!(e.iter().filter_map(|e| e.session_id.as_ref()).collect::<HashSet<_>>().len(), 5_066);
    assert_eq!(e.iter().filter(|e| e.session_id.is_none()).count(), 1);
    assert!(e.windows(2).all(|w| w[0].ts <= w[1].ts), "time order");
    // The attributes stay apart: every row has a category id, and the path and brand are kept
    // where the file has them (the README: products with a path get 67 % of the views).
    assert!(e.iter().all(|e| e.category_id.is_some()));
    let with_path = e.iter().filter(|e| e.kind == EventType::View && e.category.is_some()).count() as f64 / count(e, EventType::View) as f64;
    assert!((0.6..0.75).contains(&with_path), "{with_path} of views have a category path");
    assert!(e.iter().any(|e| e.brand.is_some()) && e.iter().any(|e| e.brand.is_none()));

    // The configuration of docs/model.md's table: defaults, hour of day off (the sample spans
    // three hours, so the hour only tells the split's sides apart).
    let cfg = TrainConfig { disabled: vec!["hour_sin".into(), "hour_cos".into()], ..TrainConfig::default() };
    let trained = train(e, &cfg, &Device::Cpu, |_, _| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    trained.save(dir.path()).unwrap();
    let model = IntentModel::load(dir.path(), &Device::Cpu).unwrap();
    let a = assess(&model, e, None, Part::Test, 100, 1).unwrap();
    let (gru, lr) = (a.scorer("gru").unwrap(), a.scorer("logistic_regression").unwrap());
    eprintln!("REES46 test split: GRU ROC-AUC {:?} PR-AUC {:?} ECE {:.4}; LR ROC-AUC {:?}", gru.roc_auc, gru.pr_auc, gru.ece, lr.roc_auc);
    // The held-out 30 % of sessions by start time: 1,559 sessions, 3,993 labelled events.
    assert_eq!((gru.sessions, gru.events), (1_559, 3_993));
    // Quality floors below what docs/model.md reports (0.734 / 0.211 / 0.005), so the test
    // guards against a broken workbench rather than pinning one number: above what the model
    // scored before it kept the category path and the user's history (0.634), above the base
    // rate, and calibrated.
    assert!(gru.roc_auc.unwrap() > 0.68, "GRU ROC-AUC {:?}", gru.roc_auc);
    assert!(gru.pr_auc.unwrap() > 3.0 * gru.base_rate, "GRU PR-AUC {:?} vs base rate {}", gru.pr_auc, gru.base_rate);
    assert!(gru.ece < 0.02, "ECE {}", gru.ece);
    assert!(lr.roc_auc.unwrap() > 0.7, "baseline ROC-AUC {:?}", lr.roc_auc);
}

/// A Taobao sample's events, imported without a bad row (`None`, after a SKIP line, without
/// the samples).
fn taobao_sample(test: &str, file: &str) -> Option<Vec<intentflow_schemas::Event>> {
    let path = real_sample(test, file)?;
    let got = read_events(&path, Format::Taobao).unwrap();
    assert!(got.bad.is_empty(), "{:?}", &got.bad[..got.bad.len().min(5)]);
    Some(got.events)
}

/// A Taobao sample's facts as ../shared/data/README.md gives them: rows; views, carts,
/// favourites, purchases; users; buying users.
fn taobao_facts(e: &[intentflow_schemas::Event]) -> (usize, (usize, usize, usize, usize), usize, usize) {
    let counts = (count(e, EventType::View), count(e, EventType::AddToCart), count(e, EventType::Wishlist), count(e, EventType::Purchase));
    let users = e.iter().map(|e| &e.user_id).collect::<HashSet<_>>().len();
    let buyers = e.iter().filter(|e| e.kind == EventType::Purchase).map(|e| &e.user_id).collect::<HashSet<_>>().len();
    (e.len(), counts, users, buyers)
}

#[test]
fn taobao_sample_imports_completely() {
    let Some(e) = taobao_sample("taobao_sample_imports_completely", "taobao-userbehavior-114-users.csv") else { return };
    assert_eq!(taobao_facts(&e), (10_000, (9_046, 536, 212, 206), 114, 74));
}

#[test]
fn taobao_814_users_import_completely_with_their_history() {
    let Some(events) = taobao_sample("taobao_814_users_import_completely_with_their_history", "taobao-userbehavior-814-users.csv") else { return };
    let e = &events;
    assert_eq!(taobao_facts(e), (84_287, (75_693, 4_494, 2_351, 1_749), 814, 558));
    assert!(e.iter().all(|e| e.category_id.is_some() && e.category.is_none() && e.brand.is_none()));
    // Complete histories: the session rule sees returning users, and their history survives
    // the session boundary.
    let cfg = intentflow_schemas::SessionConfig::default();
    let mut states: std::collections::HashMap<&str, intentflow_schemas::SessionState> = std::collections::HashMap::new();
    let (mut returning, mut returning_buyers) = (0, 0);
    for ev in e {
        let s = states.entry(ev.user_id.as_str()).or_default();
        if s.advance(ev, &cfg).new_session && s.session_seq > 0 {
            returning += 1;
            returning_buyers += usize::from(s.history.purchases > 0);
        }
    }
    assert!(returning > 10_000 && returning_buyers > 1_000, "{returning} returning sessions, {returning_buyers} of buyers");
}

#[test]
fn real_samples_round_trip_through_parquet() {
    for (name, format) in [("rees46-2019-10-sample.csv", Format::Rees46), ("taobao-userbehavior-114-users.csv", Format::Taobao)] {
        let Some(path) = real_sample("real_samples_round_trip_through_parquet", name) else { return };
        let events = read_events(&path, format).unwrap().events;
        let dir = tempfile::tempdir().unwrap();
        let parquet = dir.path().join("events.parquet");
        let mut writer = intentflow_formats::columnar::EventWriter::create(&parquet).unwrap();
        events.iter().for_each(|e| writer.write(e).unwrap());
        assert_eq!(writer.finish().unwrap(), events.len() as u64);
        let back = read_events(&parquet, Format::Parquet).unwrap();
        assert!(back.bad.is_empty(), "{name}: {:?}", &back.bad[..back.bad.len().min(5)]);
        assert!(back.events == events, "{name}: the Parquet round trip changed events");
        assert_eq!(Format::detect(&parquet).unwrap(), Format::Parquet);
        assert_eq!(Format::detect(&path).unwrap(), Format::Jsonl, "anything else is read as JSONL");
    }
}
