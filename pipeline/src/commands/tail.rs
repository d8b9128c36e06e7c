//! `intentflow tail`: scored intents from the output topic, as a table or the top prospects.

use crate::config::KafkaArgs;
use crate::kafka::read::read_topic;
use anyhow::Result;
use clap::Args;
use intentflow_schemas::{EventType, ScoredIntent};
use rdkafka::Message;
use std::time::Duration;

/// `intentflow tail`.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Topic of scored intents.
    #[arg(long, default_value = "intents")]
    pub topic: String,
    /// Stop after this many records.
    #[arg(long, default_value_t = 20)]
    pub max: usize,
    /// Stop when no record arrived for this many milliseconds.
    #[arg(long, default_value_t = 3_000)]
    pub idle_ms: u64,
    /// Print raw JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Read the whole topic and show the N users, among those who have not just purchased,
    /// whose latest score is highest.
    #[arg(long, conflicts_with = "json")]
    pub top: Option<usize>,
}

/// Prints scored intents from the output topic (committed records only).
///
/// # Errors
///
/// Kafka failures.
pub fn tail_cmd(args: &TailArgs) -> Result<()> {
    let max = if args.top.is_some() { usize::MAX } else { args.max };
    let records = read_topic(&args.kafka.clients()?, &args.topic, Duration::from_millis(args.idle_ms), |n| n >= max)?;
    if args.json {
        for m in &records {
            println!("{}", String::from_utf8_lossy(m.payload().unwrap_or_default()));
        }
        eprintln!("{} records from {}", records.len(), args.topic);
        return Ok(());
    }
    let intents: Vec<ScoredIntent> = records.iter().filter_map(|m| serde_json::from_slice(m.payload().unwrap_or_default()).ok()).collect();
    let shown: Vec<&ScoredIntent> = match args.top {
        None => intents.iter().collect(),
        Some(n) => {
            // The latest intent per user is the user's current intent; a user whose latest event
            // is a purchase has already bought, so is not a prospect.
            let mut latest: std::collections::HashMap<&str, &ScoredIntent> = std::collections::HashMap::new();
            for i in &intents {
                latest.insert(&i.user_id, i);
            }
            let mut top: Vec<&ScoredIntent> = latest.into_values().filter(|i| i.event_type != EventType::Purchase).collect();
            top.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.user_id.cmp(&b.user_id)));
            top.truncate(n);
            top
        }
    };
    // Reasons get a column when some intent has them (`run --reasons`).
    let reasons = shown.iter().any(|i| !i.reasons.is_empty());
    let width = if reasons { 30 } else { 0 };
    println!("{:<14} {:>7}  {:<16} {:>4}  {:<24} {:<width$}{}", "user", "score", "last event", "#", "event time", "source", if reasons { " reasons" } else { "" });
    for i in shown {
        let source = format!("{}/{}@{}", i.source.topic, i.source.partition, i.source.offset);
        println!(
            "{:<14} {:>7.4}  {:<16} {:>4}  {:<24} {:<width$}{}",
            i.user_id,
            i.score,
            i.event_type.as_str(),
            i.session_events,
            i.event_ts,
            source,
            if reasons { format!(" {}", i.reasons.join(", ")) } else { String::new() }
        );
    }
    eprintln!("{} records from {} ({} scored intents)", records.len(), args.topic, intents.len());
    Ok(())
}
