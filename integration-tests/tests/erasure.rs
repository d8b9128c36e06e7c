//! Erasure and expiry on the real broker: `intentflow erase` deletes users' states from the
//! running operator's store and tombstones them on the changelog, so that a restore into an
//! empty state directory does not bring them back; users inactive for longer than
//! `state_ttl_ms` are deleted the same way by the sweep.

use intentflow_integration_tests::*;
use intentflow_pipeline::kafka::read::read_topic;
use intentflow_pipeline::kafka::KafkaClients;
use intentflow_schemas::Event;
use intentflow_state::changelog::ChangelogKey;
use intentflow_state::UserState;
use rdkafka::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const IDLE: Duration = Duration::from_secs(120);

/// The last changelog record of each user key: its state, or `None` for a tombstone.
fn changelog_users(brokers: &str, changelog: &str) -> BTreeMap<String, Option<Vec<u8>>> {
    let records = read_topic(&KafkaClients::new(brokers), changelog, Duration::from_secs(5), |_| false).unwrap();
    let mut last = BTreeMap::new();
    for m in &records {
        if let Some(ChangelogKey::User(user)) = m.key().and_then(|k| ChangelogKey::decode(k).ok()) {
            last.insert(user.to_string(), m.payload().map(<[u8]>::to_vec));
        }
    }
    last
}

/// Waits until the `/metrics` series `series` reaches `n`; panics with the log after `limit`.
fn wait_for_metric(addr: &str, series: &str, n: u64, op: &mut Operator, limit: Duration) {
    let started = Instant::now();
    loop {
        let got = metric(&http_get(addr, "/metrics"), series);
        if got >= n {
            assert_eq!(got, n, "{series}");
            return;
        }
        assert!(op.exited().is_none() && started.elapsed() < limit, "{series} = {got}, waiting for {n}; log:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts an operator and waits until it serves: assigned partitions, restored, ready.
fn start_serving(sc: &Scenario, log: &str, args: &[String], env: &[(&str, &str)], addr: &str) -> Operator {
    let mut op = Operator::spawn_env("run", args, sc.dir.path().join(format!("{log}.log")), env).unwrap();
    let started = Instant::now();
    loop {
        let (code, health) = probe(addr, "/health");
        if code == 200 && health["assigned_partitions"].as_u64() > Some(0) && health["restoring"].as_object().is_some_and(|r| r.is_empty()) {
            return op;
        }
        assert!(op.exited().is_none() && started.elapsed() < IDLE, "{log} is not serving; log:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn erased_users_are_gone_from_the_store_and_the_changelog_and_no_restore_brings_them_back() {
    let sc = Scenario::new("erasure", 3);
    let addr = free_addr();
    let args = sc.run_args(&["--metrics-addr", &addr, "--instance-id", "erase-a"]);
    let mut op = start_serving(&sc, "first", &args, &[], &addr);
    let events = generated_events(150, 3_000, 31);
    produce_events(&sc.brokers, &sc.input, &events).unwrap();
    assert_eq!(sc.intents(events.len(), IDLE).len(), events.len());
    let users: BTreeSet<String> = events.iter().map(|e| e.user_id.to_string()).collect();
    let erased: Vec<String> = users.iter().step_by(10).cloned().collect();
    assert_eq!(erased.len(), 15);

    // `erase` with the run's configuration (group and input topic) from its config file.
    let config = sc.dir.path().join("run.toml");
    std::fs::write(&config, format!("brokers = \"{}\"\ninput_topics = [\"{}\"]\ngroup = \"{}\"\n", sc.brokers, sc.input, sc.group)).unwrap();
    let mut erase: Vec<&str> = vec!["erase", "--config", config.to_str().unwrap(), "--wait-seconds", "60"];
    for u in erased.iter().map(String::as_str).chain(["nobody-here"]) {
        erase.extend(["--user", u]);
    }
    let (status, stderr) = intentflow(&erase);
    assert!(status.success(), "erase failed: {stderr}\n{}", op.log_text());
    wait_for_metric(&addr, "intentflow_erasure_requests_total{result=\"deleted\"}", 15, &mut op, IDLE);
    assert_eq!(metric(&http_get(&addr, "/metrics"), "intentflow_erasure_requests_total{result=\"absent\"}"), 1);
    for u in &erased {
        assert_eq!(probe(&addr, &format!("/v1/users/{u}/intent")).0, 404, "{u} is still answered after its erasure");
    }
    let kept = users.iter().find(|u| !erased.contains(u)).unwrap();
    assert_eq!(probe(&addr, &format!("/v1/users/{kept}/intent")).0, 200);

    // Two erased users come back: their new events start a new state from nothing.
    let back: Vec<Event> = erased[..2].iter().flat_map(|u| events.iter().filter(move |e| e.user_id == *u).take(3).cloned()).collect();
    assert_eq!(back.len(), 6);
    produce_events(&sc.brokers, &sc.input, &back).unwrap();
    let intents = sc.intents(events.len() + back.len(), IDLE);
    assert_eq!(intents.len(), events.len() + back.len());
    let by_user = intents_by_user(&intents);
    for u in &erased[..2] {
        // A user's intents are in order: the new ones come last.
        let all = &by_user[u];
        let new = &all[all.len() - 3..];
        assert_eq!(new[0].session_events, 1, "{u}: the first intent after the erasure starts from no state: {:?}", new[0]);
        assert_eq!(new[0].session_seq, 0);
    }
    let (status, log) = op.terminate().unwrap();
    assert!(status.success(), "{log}");

    let before = stored_states(&sc.state);
    let gone: BTreeSet<&String> = erased[2..].iter().collect();
    assert!(gone.iter().all(|u| !before.contains_key(*u)), "erased users still in the store");
    assert_eq!(before.len(), users.len() - gone.len());
    let changelog = changelog_users(&sc.brokers, &format!("{}-changelog", sc.group));
    for u in &gone {
        assert_eq!(changelog.get(*u), Some(&None), "{u}: the changelog's last record is not a tombstone");
    }
    assert!(changelog[&erased[0]].is_some() && changelog[kept].is_some());

    // A new instance with an empty state directory restores every partition from the changelog.
    let restored_dir = sc.dir.path().join("restored");
    let addr2 = free_addr();
    let args2 = sc.run_args(&["--metrics-addr", &addr2, "--instance-id", "erase-b", "--state-dir", restored_dir.to_str().unwrap()]);
    let op2 = start_serving(&sc, "restored", &args2, &[], &addr2);
    for u in &gone {
        assert_eq!(probe(&addr2, &format!("/v1/users/{u}/intent")).0, 404, "{u} came back with the restore");
    }
    let (status, log) = op2.terminate().unwrap();
    assert!(status.success(), "{log}");
    let after = stored_states(&restored_dir);
    assert_eq!(after.keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>(), "the restore holds exactly the users that were not erased");
    assert!(after.iter().all(|(u, s)| before[u] == *s));
}

#[test]
fn users_inactive_past_the_ttl_expire_under_at_least_once_and_stay_expired_after_a_restore() {
    let sc = Scenario::new("expiry", 2);
    let addr = free_addr();
    let args = sc.run_args(&["--metrics-addr", &addr, "--processing-guarantee", "at_least_once"]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    // Half the users last clicked two days ago, half in the last minutes.
    let mut events = generated_events(80, 1_600, 37);
    let first = events.iter().map(|e| e.ts).min().unwrap();
    let span = (events.iter().map(|e| e.ts).max().unwrap() - first).max(1);
    let users: Vec<String> = events.iter().map(|e| e.user_id.to_string()).collect::<BTreeSet<_>>().into_iter().collect();
    let old: BTreeSet<&String> = users.iter().step_by(2).collect();
    for e in &mut events {
        // Each half squeezed into ten minutes, order kept.
        let offset = (e.ts - first) * 600_000 / span;
        e.ts = if old.contains(&e.user_id.to_string()) { now - 2 * 86_400_000 + offset } else { now - 600_000 + offset };
    }
    events.sort_by_key(|e| e.ts);
    // The first life scores everything without a TTL; the second sweeps what the store holds
    // (an old user scored mid-sweep could otherwise expire twice).
    let first = start_serving(&sc, "first", &args, &[], &addr);
    produce_events(&sc.brokers, &sc.input, &events).unwrap();
    assert_eq!(sc.intents(events.len(), IDLE).len(), events.len());
    let (status, log) = first.terminate().unwrap();
    assert!(status.success(), "{log}");
    assert_eq!(stored_states(&sc.state).len(), users.len());
    let ttl = [("INTENTFLOW_STATE_TTL_MS", "86400000"), ("INTENTFLOW_STATE_TTL_SWEEP_MS", "1000")];
    let mut op = start_serving(&sc, "second", &args, &ttl, &addr);
    wait_for_metric(&addr, "intentflow_users_expired_total", old.len() as u64, &mut op, IDLE);
    let (status, log) = op.terminate().unwrap();
    assert!(status.success(), "{log}");

    let stored: BTreeMap<String, UserState> = stored_states(&sc.state);
    let fresh: Vec<&String> = users.iter().filter(|u| !old.contains(u)).collect();
    assert_eq!(stored.keys().collect::<Vec<_>>(), fresh, "only the users active within the TTL are kept");
    let changelog = changelog_users(&sc.brokers, &format!("{}-changelog", sc.group));
    assert!(old.iter().all(|u| changelog.get(*u) == Some(&None)), "every expired user ends on a tombstone");

    // Restored without a TTL: the expired users stay gone.
    let restored_dir = sc.dir.path().join("restored");
    let addr2 = free_addr();
    let args2 = sc.run_args(&["--metrics-addr", &addr2, "--processing-guarantee", "at_least_once", "--instance-id", "expiry-b", "--state-dir", restored_dir.to_str().unwrap()]);
    let op2 = start_serving(&sc, "restored", &args2, &[], &addr2);
    let (status, log) = op2.terminate().unwrap();
    assert!(status.success(), "{log}");
    assert_eq!(stored_states(&restored_dir), stored);
}
