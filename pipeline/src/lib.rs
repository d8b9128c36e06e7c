//! The `intentflow` binary's library: CLI commands, configuration, Kafka wiring and the
//! streaming runtime. This is the only crate that knows Kafka.
//!
//! * [`config`] — the configuration in layers (defaults, TOML, environment, flags), its checks
//!   and the redaction of secrets.
//! * [`kafka`] — every client's properties in one place, topics, bounded deliveries and reads.
//! * [`state_dir`] — the life of a state directory: instance id, replay markers, model adoption.
//! * [`runtime`] — the consume → score → produce → store → commit loop, with background
//!   restores, the transactional sink and the hand-over of replayed states.
//! * [`replay`] — `intentflow replay`: bounded, deterministic reprocessing of topics or files.
//! * [`output`] — one writer for topic, JSONL, Parquet (or no) outputs.
//! * [`dlq`] — what goes to the dead-letter topic, with which headers; [`offsets`] — the offset
//!   decisions as pure functions. Both serve the runtime and replays, which depend on them and
//!   not on each other (a bootstrap is a replay the runtime runs).
//! * [`commands`] — `generate`, `import`, `train`, `eval`, `tail`, `bench` and `config`.
//! * [`external_sort`] — event files larger than memory in time order (replays) or user order
//!   (training).
//! * [`telemetry`] — Prometheus metrics, the probes and the HTTP endpoints; [`live`] — what the
//!   status page shows; [`query`] — per-user queries, answered locally or redirected to the
//!   partition's owner.

pub mod commands;
pub mod config;
pub mod dlq;
pub mod external_sort;
pub mod kafka;
pub mod live;
pub mod offsets;
pub mod output;
pub mod query;
pub mod replay;
pub mod runtime;
pub mod state_dir;
pub mod telemetry;
