//! The `intentflow` binary's library: CLI commands, configuration, Kafka wiring and the
//! streaming runtime. This is the only crate that knows Kafka.
//!
//! * [`config`] — `intentflow run` configuration (TOML + flags) and its checks.
//! * [`runtime`] — the consume → score → produce → store → commit loop.
//! * [`kafka`] — client configs, topic creation, bounded delivery windows, topic reads.
//! * [`telemetry`] — Prometheus metrics and the health endpoint.
//! * [`import`] — event files (schema-v1 JSONL, REES46 and Taobao CSV).
//! * [`commands`] — `generate`, `import`, `train` and `tail`.
//! * [`replay`] — `intentflow replay`: bounded, deterministic reprocessing of topics or files.

pub mod commands;
pub mod config;
pub mod import;
pub mod kafka;
pub mod replay;
pub mod runtime;
pub mod telemetry;
