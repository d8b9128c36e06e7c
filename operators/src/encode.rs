//! Encoding scored intents for the output topic.

use intentflow_schemas::ScoredIntent;

/// Serialises an intent as one JSON object (schema v1).
pub fn encode_intent(intent: &ScoredIntent) -> Vec<u8> {
    let mut out = Vec::with_capacity(384);
    encode_intent_into(intent, &mut out);
    out
}

/// Appends an intent as one JSON object (schema v1) to `out`, a buffer reused across intents.
pub fn encode_intent_into(intent: &ScoredIntent, out: &mut Vec<u8>) {
    // Serialising a struct of strings and numbers into a Vec cannot fail.
    serde_json::to_writer(out, intent).expect("ScoredIntent serialises");
}
