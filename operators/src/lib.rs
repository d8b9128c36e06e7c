//! The Kafka-agnostic stream operators of Intentflow.
//!
//! The life of a micro-batch, whoever feeds it (a Kafka consumer, a file replay, a test):
//!
//! 1. **decode** — raw record bytes become validated [`Event`]s or [`Rejected`] records with a
//!    reason ([`decode::decode_batch`]).
//! 2. **featurize + score** — [`IntentOperator::process`] loads each user's [`UserState`] from the
//!    [`StateStore`], then advances the users in *waves*: wave *k* holds the *k*-th event of
//!    every user in the batch, so each wave is one batched GRU step across many users while each
//!    user's events are applied strictly in their order.
//! 3. **encode** — [`encode::encode_intent`] writes a [`ScoredIntent`] as JSON.
//!
//! On a GPU, [`IntentOperator::with_resident_slots`] keeps users' hidden states on the device
//! between batches ([`resident`]): a cache checked against the store, never the record.
//!
//! With several co-partitioned input topics, [`merge::TopicMerge`] fixes the order in which one
//! partition's records of the different topics are applied, the same live and in a replay.
//!
//! [`emit`] decides when an output publishes a user's intent (every event, a change, a threshold
//! crossing, a segment change), from what the output remembers of the user.
//!
//! The caller (the pipeline) produces the outputs, then writes the returned states and commits
//! offsets; nothing here touches Kafka or files (those live in `intentflow-formats`).

pub mod decode;
pub mod emit;
pub mod encode;
pub mod merge;
pub mod resident;
mod score;

pub use decode::{Decoded, Rejected, SourceRecord};
pub use intentflow_schemas::{Event, ScoredIntent, SourcePosition};
pub use intentflow_state::{StateStore, UserState};
pub use resident::ResidentBatch;
pub use score::{BatchOutput, EmittedAt, IntentOperator, InvalidState, PositionedEvent, Scored};

/// Errors of the operators.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The model failed to step.
    #[error(transparent)]
    Model(#[from] intentflow_model::ModelError),
    /// The state store failed.
    #[error(transparent)]
    State(#[from] intentflow_state::StateError),
}
