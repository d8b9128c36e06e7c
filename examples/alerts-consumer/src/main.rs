//! An example consumer of Intentflow's output, for a marketing or support team to start from.
//!
//! It reads scored intents with `isolation.level = read_committed` (only what the operator
//! committed: under exactly-once, nothing of an aborted transaction), keeps each shopper's last
//! score in memory, and prints one line when a shopper's purchase intent crosses `--min-score`
//! upwards, instead of one per click. A crossing on a purchase itself is not printed (the shopper
//! already bought; `--include-purchases` prints it too):
//!
//! ```text
//! 2019-10-01T02:27:05.000Z  user 555463090  intent 0.63 (crossed 0.50) after add_to_cart, event 2 of the session  why: cart_added  [lstm-2618e5c3cd89]
//! ```
//!
//! Given the operator's own alerts topic instead (an `[[output]]` with `policy = "threshold"`),
//! whose records carry the operator's decision (`"crossing":"up"` or `"down"`, kept exactly-once
//! in the user state), it prints each `up` crossing as it is, with the score before it, and
//! ignores `--min-score` (`--include-exits` prints the `down` ones too):
//!
//! ```text
//! 2019-10-01T02:27:05.000Z  user 555463090  intent 0.63 (up from 0.41) after add_to_cart, event 2 of the session  [lstm-2618e5c3cd89]
//! ```
//!
//! It decodes only the fields it uses; the others (and fields a later schema version adds) are
//! ignored. A record that does not decode is reported on stderr with its topic, partition and
//! offset, and skipped.
//!
//! ```sh
//! cargo run --release -p intentflow-alerts-consumer -- --brokers 127.0.0.1:9092 --topic intents --min-score 0.5
//! ```

use anyhow::{Context, Result};
use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;
use serde::Deserialize;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Prints shoppers whose purchase intent crosses a threshold.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The operator's output topic.
    #[arg(long, default_value = "intents")]
    topic: String,
    /// Consumer group of this consumer.
    #[arg(long, default_value = "intentflow-alerts-example")]
    group: String,
    /// Score a shopper's intent must reach to be printed (again only after falling below it).
    #[arg(long, default_value_t = 0.5)]
    min_score: f32,
    /// Start from the topic's earliest records when the group has no committed offset (else the latest).
    #[arg(long)]
    from_beginning: bool,
    /// Also print crossings scored on a purchase event (by default only those before one).
    #[arg(long)]
    include_purchases: bool,
    /// On an alerts topic (records with `crossing`): also print the `down` crossings.
    #[arg(long)]
    include_exits: bool,
    /// Exit after this many seconds without a record (0: run until stopped).
    #[arg(long, default_value_t = 0)]
    idle_seconds: u64,
}

/// The fields of a scored intent that this consumer acts on.
#[derive(Deserialize)]
struct Intent {
    user_id: String,
    score: f32,
    event_ts: String,
    event_type: String,
    #[serde(default)]
    session_events: u32,
    model_version: String,
    #[serde(default)]
    reasons: Vec<String>,
    /// `up` or `down` on an operator's threshold output; absent on the every-event output.
    #[serde(default)]
    crossing: Option<String>,
    /// On a policy output: the score it published before this one.
    #[serde(default)]
    previous_score: Option<f32>,
}

/// Whether `score` is an upward crossing of `min`, given the shopper's previous score.
fn crossed(previous: Option<f32>, score: f32, min: f32) -> bool {
    score >= min && previous.is_none_or(|p| p < min)
}

/// The line printed for a crossing: of `min`, or as the operator decided it.
fn line(i: &Intent, min: f32) -> String {
    let why = if i.reasons.is_empty() { String::new() } else { format!("  why: {}", i.reasons.join(", ")) };
    let how = match (&i.crossing, i.previous_score) {
        (Some(direction), Some(previous)) => format!("{direction} from {previous:.2}"),
        (Some(direction), None) => format!("{direction}, first score"),
        (None, _) => format!("crossed {min:.2}"),
    };
    format!("{}  user {}  intent {:.2} ({how}) after {}, event {} of the session{why}  [{}]", i.event_ts, i.user_id, i.score, i.event_type, i.session_events, i.model_version)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", &args.group)
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", if args.from_beginning { "earliest" } else { "latest" })
        .create()
        .context("creating the consumer")?;
    consumer.subscribe(&[&args.topic]).with_context(|| format!("subscribing to {}", args.topic))?;
    let mut last: HashMap<String, f32> = HashMap::new();
    let mut heard = Instant::now();
    loop {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            if args.idle_seconds > 0 && heard.elapsed() >= Duration::from_secs(args.idle_seconds) {
                return Ok(());
            }
            continue;
        };
        heard = Instant::now();
        let m = message.context("consuming")?;
        match serde_json::from_slice::<Intent>(m.payload().unwrap_or_default()) {
            Ok(intent) => {
                let actionable = args.include_purchases || intent.event_type != "purchase";
                let hit = match intent.crossing.as_deref() {
                    // The operator's threshold output decided already.
                    Some(direction) => direction == "up" || args.include_exits,
                    None => crossed(last.insert(intent.user_id.clone(), intent.score), intent.score, args.min_score),
                };
                if actionable && hit {
                    println!("{}", line(&intent, args.min_score));
                }
            }
            Err(e) => eprintln!("skipped {}/{}@{}: not an intent: {e}", m.topic(), m.partition(), m.offset()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shopper_is_printed_once_per_rise_above_the_threshold() {
        let scores = [0.1, 0.6, 0.7, 0.4, 0.55, 0.5];
        let mut previous = None;
        let printed: Vec<f32> = scores
            .iter()
            .filter(|&&s| {
                let hit = crossed(previous, s, 0.5);
                previous = Some(s);
                hit
            })
            .copied()
            .collect();
        assert_eq!(printed, [0.6, 0.55]);
        assert!(crossed(None, 0.9, 0.5), "a shopper first seen above the threshold");
    }

    #[test]
    fn the_operators_crossings_print_as_decided() {
        let raw = br#"{"v":1,"user_id":"u1","score":0.63,"event_ts":"2019-10-01T02:27:05.000Z","event_type":"add_to_cart","session_events":2,"model_version":"gru-1","previous_score":0.41,"crossing":"up"}"#;
        let i: Intent = serde_json::from_slice(raw).unwrap();
        assert_eq!(line(&i, 0.9), "2019-10-01T02:27:05.000Z  user u1  intent 0.63 (up from 0.41) after add_to_cart, event 2 of the session  [gru-1]");
    }

    #[test]
    fn intents_of_later_schemas_decode_and_print() {
        let raw = br#"{"v":2,"user_id":"u1","score":0.8123,"event_ts":"2019-10-01T02:27:05.000Z","event_type":"add_to_cart","session_events":2,"model_version":"gru-1","reasons":["cart_added"],"item_id":"42"}"#;
        let i: Intent = serde_json::from_slice(raw).unwrap();
        assert_eq!(
            line(&i, 0.5),
            "2019-10-01T02:27:05.000Z  user u1  intent 0.81 (crossed 0.50) after add_to_cart, event 2 of the session  why: cart_added  [gru-1]"
        );
    }
}
