//! The three-node cluster for broker-failure tests.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

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
