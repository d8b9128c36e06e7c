//! Encoding scored intents for the output topic.

use intentflow_schemas::ScoredIntent;

/// Serialises an intent as one JSON object (schema v1).
pub fn encode_intent(intent: &ScoredIntent) -> Vec<u8> {
    // Serialising a struct of strings and numbers into a Vec cannot fail.
    serde_json::to_vec(intent).expect("ScoredIntent serialises")
}
