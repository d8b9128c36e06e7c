//! Helpers for Intentflow's end-to-end tests against a real Apache Kafka broker.
//!
//! The broker is the one `scripts/kafka start` runs (or `INTENTFLOW_TEST_BROKERS`). Every
//! test uses its own topics and consumer group, so tests can share the broker and run in
//! parallel. The `intentflow` binary under test is the one built next to the test executable
//! (`scripts/test` builds it first).
//!
//! * [`broker`] — the broker, topics, records in and intents out, the trained test model;
//! * [`operator`] — a running `intentflow` process and a test's [`Scenario`];
//! * [`checks`] — the exactly-once and offline-equality assertions, dead letters;
//! * [`cluster`] — the three-node cluster of the broker-failure test;
//! * [`real_sample`] — the real samples beside the checkout, or a visible [`skip`].

pub mod broker;
pub mod checks;
pub mod cluster;
pub mod operator;

pub use broker::*;
pub use checks::*;
pub use cluster::*;
pub use operator::*;

use std::io::Write;
use std::path::PathBuf;

/// The real sample `name` from `../shared/data` beside the project checkout, or `None` after
/// announcing a [`skip`].
pub fn real_sample(test: &str, name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data").join(name);
    if path.is_file() {
        return Some(path);
    }
    skip(test, &format!("real sample {} not found (it exists only beside the project checkout, as ../shared/data)", path.display()));
    None
}

/// Announces that `test` skips, and why.
///
/// A skip is printed as a `SKIP` line straight to stderr (past the test harness's capture, so it
/// shows even when the test passes) and, when `INTENTFLOW_SKIP_LOG` names a file, appended there:
/// `scripts/test` counts those lines and fails when the samples are present yet a real-data test
/// skipped.
pub fn skip(test: &str, why: &str) {
    let line = format!("SKIP {test}: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(log) = std::env::var_os("INTENTFLOW_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = f.write_all(line.as_bytes());
        }
    }
}
