//! Ends the process when a transaction call blocks far beyond its timeout.
//!
//! librdkafka's `send_offsets_to_transaction` ignores its timeout and can wait forever for a
//! group coordinator that died (librdkafka issues #5456 and #5511, open in 2.12). A crash is
//! what the exactly-once design recovers from — the broker aborts the open transaction and a
//! restarted instance catches up from the changelog — so a stuck call ends the process with
//! [`Watchdog::EXIT_CODE`] for its supervisor to restart, instead of hanging silently.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Watches transaction calls from a thread of its own.
pub struct Watchdog {
    /// When the watched call started (ms since the epoch), 0 when none is running.
    since_ms: Arc<AtomicI64>,
}

impl Watchdog {
    /// Exit status of a process ended by the watchdog (EX_TEMPFAIL: try again).
    pub const EXIT_CODE: i32 = 75;

    /// Starts the watching thread: a call watched for longer than `limit` ends the process.
    pub fn start(limit: Duration) -> Watchdog {
        let since_ms = Arc::new(AtomicI64::new(0));
        let seen = since_ms.clone();
        std::thread::Builder::new()
            .name("txn-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                let since = seen.load(Ordering::SeqCst);
                let stuck_ms = chrono::Utc::now().timestamp_millis() - since;
                if since > 0 && stuck_ms > limit.as_millis() as i64 {
                    tracing::error!(stuck_ms, "a transaction call has been blocked for {} s; exiting so that a restart recovers (librdkafka #5456)", stuck_ms / 1000);
                    std::process::exit(Watchdog::EXIT_CODE);
                }
            })
            .expect("spawning the transaction watchdog");
        Watchdog { since_ms }
    }

    /// Watches until the returned guard is dropped.
    pub fn watch(&self) -> impl Drop + '_ {
        struct Guard<'w>(&'w AtomicI64);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                self.0.store(0, Ordering::SeqCst);
            }
        }
        self.since_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::SeqCst);
        Guard(&self.since_ms)
    }
}
