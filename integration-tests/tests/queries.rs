//! Per-user queries on the real broker, with two instances sharing the partitions: each user is
//! answered by the instance that owns its partition, with the score of its latest intent, and
//! the other instance redirects to it; an unknown user is a 404 from its partition's owner.

use intentflow_integration_tests::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const IDLE: Duration = Duration::from_secs(120);

/// A `GET` on `addr`: the status code, the JSON body and the `Location` header.
fn get(addr: &str, path: &str) -> (u16, serde_json::Value, Option<String>) {
    let response = http_get(addr, path);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let location = head.lines().find_map(|l| l.strip_prefix("location: ").or_else(|| l.strip_prefix("Location: "))).map(str::to_string);
    (code, serde_json::from_str(body).unwrap_or_default(), location)
}

/// Asks `first` about `user`, following a redirect once: the final answer and whether it was
/// redirected (to where).
fn ask(first: &str, user: &str) -> ((u16, serde_json::Value), Option<String>) {
    let path = format!("/v1/users/{user}/intent");
    let (code, body, location) = get(first, &path);
    if code != 307 {
        return ((code, body), None);
    }
    let location = location.unwrap_or_else(|| panic!("a 307 without a location: {body}"));
    let rest = location.strip_prefix("http://").unwrap_or_else(|| panic!("{location}"));
    let (addr, path) = rest.split_at(rest.find('/').unwrap());
    let (code, body, _) = get(addr, path);
    ((code, body), Some(addr.to_string()))
}

#[test]
fn each_user_is_answered_by_its_partitions_owner_and_redirected_to_it_by_the_other() {
    let sc = Scenario::new("queries", 4);
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let b_state = sc.dir.path().join("b-state").display().to_string();
    let mut a = sc.start("a", &sc.run_args(&["--metrics-addr", &a_addr, "--instance-id", "query-a"]));
    let mut b = sc.start("b", &sc.run_args(&["--metrics-addr", &b_addr, "--instance-id", "query-b", "--state-dir", &b_state]));
    // Both in the group with partitions of their own, restored.
    let started = Instant::now();
    let serving = |addr: &str| {
        let (code, health) = probe(addr, "/health");
        code == 200 && health["assigned_partitions"].as_u64() > Some(0) && health["restoring"].as_object().is_some_and(|r| r.is_empty()) && probe(addr, "/readyz").0 == 200
    };
    while !(serving(&a_addr) && serving(&b_addr)) {
        assert!(a.exited().is_none() && b.exited().is_none() && started.elapsed() < IDLE, "not both ready:\n{}\n{}", a.log_text(), b.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    let events = generated_events(120, 2_400, 23);
    produce_events(&sc.brokers, &sc.input, &events).unwrap();
    let intents = sc.intents(events.len(), IDLE);
    assert_eq!(intents.len(), events.len());
    let latest: BTreeMap<String, f32> = intents_by_user(&intents).into_iter().map(|(u, i)| (u, i.last().unwrap().score)).collect();

    // The store is written right after each commit: ask until every answer has the latest score.
    let mut redirected = BTreeMap::new();
    for (user, score) in &latest {
        let first = if user.bytes().map(u32::from).sum::<u32>() % 2 == 0 { &a_addr } else { &b_addr };
        let started = Instant::now();
        loop {
            let ((code, body), via) = ask(first, user);
            if code == 200 && body["score"].as_f64().map(|s| s as f32) == Some(*score) {
                let owner = if body["instance"] == "query-a" { &a_addr } else { &b_addr };
                assert_eq!(via.as_ref().is_some(), owner != first, "{user}: answered by {} after asking {first}", body["instance"]);
                if let Some(to) = via {
                    assert_eq!(&to, owner, "{user}: redirected to the instance that answered");
                    *redirected.entry(body["instance"].as_str().unwrap().to_string()).or_insert(0) += 1;
                }
                assert_eq!(body["user_id"], user.as_str());
                assert!(body["session"]["events"].as_u64().unwrap() >= 1 && body["model_version"].as_str().unwrap().contains('-'), "{body}");
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{user}: {code} {body}, expected the score {score}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert_eq!(redirected.len(), 2, "both instances were redirected to: {redirected:?}");

    // What a consumer sees, for the docs: a redirect and the answer behind it.
    let user = latest.keys().next().unwrap();
    for addr in [&a_addr, &b_addr] {
        let (code, body, location) = get(addr, &format!("/v1/users/{user}/intent"));
        eprintln!("GET {addr}/v1/users/{user}/intent: {code} {location:?} {body}");
    }

    // A user no event named: a 404 from whichever instance owns its partition.
    let ((code, body), _) = ask(&a_addr, "nobody-at-all");
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["error"], "unknown user");

    for op in [a, b] {
        let (status, log) = op.terminate().unwrap();
        assert!(status.success(), "exit {status}; log:\n{log}");
    }
    eprintln!("queries test: {} users answered, redirects by answering instance: {redirected:?}", latest.len());
}
