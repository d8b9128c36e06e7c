//! `intentflow import`: a dataset file (REES46, Taobao, RetailRocket, JSONL, Parquet) into
//! schema-v1 events in a file or a topic, validated like records on Kafka (under the limits of
//! the operator's `--config`, when given).

use super::{read_input, EventOutputArgs, InputArgs};
use anyhow::Result;
use clap::Args;

/// `intentflow import`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub output: EventOutputArgs,
}

/// Converts a dataset file into schema-v1 events in time order.
///
/// # Errors
///
/// File or Kafka failures.
pub async fn import_cmd(args: &ImportArgs) -> Result<()> {
    let imported = read_input(&args.input, args.output.kafka.run_config()?.limits())?;
    let summary = imported.summary();
    let n = args.output.write(imported.events).await?;
    eprintln!("imported from {}: {summary}", args.input.input.display());
    eprintln!("wrote {n} events to {}", args.output.describe());
    Ok(())
}
