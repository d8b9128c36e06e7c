//! `intentflow generate`: a seeded synthetic clickstream into a file or a topic.

use super::EventOutputArgs;
use anyhow::{bail, Result};
use clap::Args;
use intentflow_formats::generate::{generate, GeneratorConfig};

/// `intentflow generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Number of users.
    #[arg(long, default_value_t = 1_000)]
    pub users: usize,
    /// Number of events in all.
    #[arg(long, default_value_t = 20_000)]
    pub events: usize,
    /// Random seed; the same seed gives the same events.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub output: EventOutputArgs,
}

/// Generates a synthetic clickstream. JSONL files carry the generator's oracle
/// (`latent_intent`) with each event; Parquet files and topics the events alone.
///
/// # Errors
///
/// Invalid sizes, file or Kafka failures.
pub async fn generate_cmd(args: &GenerateArgs) -> Result<()> {
    if args.users == 0 || args.events < args.users {
        bail!("--events ({}) must be at least --users ({}), and --users at least 1", args.events, args.users);
    }
    let events = generate(&GeneratorConfig { users: args.users, events: args.events, seed: args.seed, ..Default::default() });
    let n = args.output.write(events).await?;
    eprintln!("generated {n} events for {} users (seed {}) into {}", args.users, args.seed, args.output.describe());
    Ok(())
}
